"""Spans: bytes left where they were read, to be sent without being copied out.

Responses and request bodies both use them: a Content-Length request body that
came in the head's read is a span of that read (`balancer.http11`), sent
beside the backend's head (`balancer.relay.send_request`).

A response whose head repeats the last one's, read whole in one recv, is
the head the backend sent and the body behind it in one bytes object. The
client gets another head; instead of slicing the body out (a copy, and a
malloc above pymalloc's 512 bytes) and joining it to that head (another),
the body stays a span of the read, ``(data, start)``: the bytes of `data`
from `start` to its end, and goes out beside the client's head in one
sendmsg (`balancer.sockcalls.send_span_now`; docs/performance.md, "late
night").

Invariants:
* A span is a 2-tuple, never unpacked into a typed one on the way from the
  parser to the syscall: typed as a plain tuple, mypyc keeps the one boxed
  object the parser made (a ``tuple[bytes, int]`` would be unboxed and
  boxed again at each call, a new tuple and int each time).
* It always reaches to the end of its bytes (the response parser slices
  what it would not: bytes after a response, which is then not reused).
* Where both cannot go out side by side (TLS, blocking sockets, bytes
  behind other held bytes), they are joined: one copy, as any write.
"""

from __future__ import annotations

from typing import Any

# (data: bytes, start: int): data[start:]. Variable-length to mypy, so boxed to mypyc.
Span = tuple[Any, ...]
# A body piece: bytes, or a Span.
Piece = bytes | Span


def span_size(span: Span) -> int:
    """How many bytes `span` holds."""
    data: bytes = span[0]
    start: int = span[1]
    return len(data) - start


def span_bytes(piece: Any) -> bytes:
    """A body piece's bytes (a span's copied out: only where they must be)."""
    if isinstance(piece, tuple):
        data: bytes = piece[0]
        start: int = piece[1]
        return data[start:]
    return piece


def piece_size(piece: Any) -> int:
    """How many body bytes a body piece (bytes or a span) holds."""
    if isinstance(piece, tuple):
        return span_size(piece)
    return len(piece)


def span_joined(head: bytes, span: Span) -> bytes:
    """`head` and `span`'s bytes as one bytes object (copied: where they cannot
    go out side by side)."""
    data: bytes = span[0]
    start: int = span[1]
    return head + data if not start else head + data[start:]


def unsent(head: bytes, span: Span, sent: int) -> bytes:
    """What is left of `head` then `span`'s bytes once the first `sent` went."""
    data: bytes = span[0]
    start: int = span[1]
    size = len(head)
    if sent < size:
        return head[sent:] + data[start:]
    return data[start + sent - size:]


def join_pieces(pieces: list[Any]) -> bytes:
    """Body pieces (bytes or spans) as one bytes object: one copy of each, a
    span's read through a memoryview (not sliced out first)."""
    return b"".join([memoryview(piece[0])[piece[1]:] if isinstance(piece, tuple) else piece
                     for piece in pieces])
