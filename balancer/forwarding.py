"""The request head a backend receives: the client's, rewritten.

Invariants (docs/headers.md says the same for operators):
* Always HTTP/1.1 and keep-alive; hop-by-hop fields (and those named in
  Connection) are not forwarded. `TE: trailers` is (with its Connection
  option): the body's trailer fields follow it (`last_chunk`).
* External listeners: every field that says who the client is or how it came
  (`balancer.fields.CLIENT_FIELDS`, in both "-" and "_" spellings) is removed,
  then X-Forwarded-For, X-Real-IP, X-Forwarded-Proto and X-Forwarded-Host are
  set from the connection and the request.
* Internal (trusted) listeners: those fields are kept; X-Forwarded-For is
  extended with the peer, and X-Real-IP, X-Forwarded-Proto, X-Forwarded-Host
  are added only when missing. A client's X-Request-Id is kept there
  (`ClientConnection.trusted_id`), replaced elsewhere.
* An HTTP/1.0 request without Host gets the backend's address as Host (nginx's
  `$proxy_host`) and no X-Forwarded-Host.
* Per request: the client's field block (`RequestHead.block`) is forwarded as
  it came, but cut where its marks (`RequestHead.marks`: the fields any
  listener drops, keeps or extends) name a field to drop, one set lookup per
  mark; a field Connection names that has no mark is cut by a search (rare).
  The blanks after a field's colon go as the client sent them. A head the parser
  gives again for the same bytes (`RequestParser.repeat_head`, with a Host) is
  rewritten once per connection, once it was given again (a head sent only once
  costs no second join): the request id is the only part that changes
  (`ClientConnection.forwarded`: the bytes before it and after it).
"""

from __future__ import annotations

from typing import Final

from balancer.connection import ClientConnection, Exchange
from balancer.fields import CLIENT_FIELDS, field_keys, spellings, without_fields
from balancer.http11 import HOP_BY_HOP, LAST_CHUNK, LOWER, MARKED, RequestHead, mark_value

# Never forwarded from a client on an external listener: hop-by-hop fields, and
# every field saying who the client is or how it came (`balancer.fields.CLIENT_FIELDS`;
# the balancer sets its own), in both spellings ("-" and "_").
DROP_EXTERNAL: Final = (HOP_BY_HOP | CLIENT_FIELDS | spellings((b"x-request-id",))
                        | {b"host", b"expect"})
# On a trusted listener the forwarding fields are kept; X-Forwarded-For is extended.
DROP_INTERNAL: Final = HOP_BY_HOP | {b"host", b"expect", b"x-request-id", b"x-forwarded-for"}
# Kept from a trusted listener if there, else set.
TRUSTED_KEPT: Final = frozenset((b"x-forwarded-proto", b"x-forwarded-host", b"x-real-ip"))
# Not forwarded as request trailers: what only a head may carry (framing, routing)
# and what describes the client.
DROP_TRAILER: Final = DROP_EXTERNAL | {b"content-length"}
NOTHING: Final[frozenset[bytes]] = frozenset()
# Never dropped because Connection names it: the body goes on as it came, so its
# Content-Length must too (bug: "Connection: Content-Length" sent the body
# unframed, and the backend read it as the next request: smuggling).
FRAMES_BODY: Final = frozenset((b"content-length",))
END_OF_HEAD: Final = b"\r\n\r\n"  # the request id's line end and the blank line

def request_head(ex: Exchange, chunked: bool) -> bytes:
    """The request head sent to the backend (always HTTP/1.1, keep-alive).

    An HTTP/1.0 request without Host names the backend's address (as nginx's
    default `$proxy_host`), and gets no X-Forwarded-Host. `TE: trailers` is
    forwarded (with its Connection option); other transfer codings are not."""
    head, conn = ex.head, ex.conn
    forwarded = conn.forwarded
    if forwarded is not None and forwarded[0] is head and not chunked:
        return b"".join((forwarded[1], ex.request_id, forwarded[2]))
    tokens = head.connection_tokens
    host = head.host
    if conn.ctx.trusted:
        lines = [head.method, b" ", head.target, b" HTTP/1.1\r\nHost: ",
                 host or ex.backend.encode()]
        te = _trusted_fields(lines, head, tokens, conn.client_ip_bytes, conn.ctx.scheme)
    elif host:  # the usual request: one list, made whole
        lines = [head.method, b" ", head.target, b" HTTP/1.1\r\nHost: ", host,
                 b"\r\nX-Forwarded-Host: ", host, _client_fields(conn)]
        te = _kept_fields(lines, head, DROP_EXTERNAL, tokens)
    else:
        lines = [head.method, b" ", head.target, b" HTTP/1.1\r\nHost: ", ex.backend.encode(),
                 _client_fields(conn)]
        te = _kept_fields(lines, head, DROP_EXTERNAL, tokens)
    lines.append(b"\r\nX-Request-Id: ")
    after = _after_id(head, te, chunked)
    parser = conn.parser
    if host and not chunked and head is parser.repeat_head and parser.repeats:  # module doc
        before = b"".join(lines)
        conn.forwarded = (head, before, after)
        return b"".join((before, ex.request_id, after))
    lines.append(ex.request_id)
    lines.append(after)
    return b"".join(lines)


def _after_id(head: RequestHead, te: bool, chunked: bool) -> bytes:
    """The end of a forwarded head after its request id: Connection, TE and
    Transfer-Encoding when needed, and the blank line."""
    if not (head.upgrade or te or chunked):
        return END_OF_HEAD
    lines = [b"\r\n"]
    if head.upgrade:
        lines.append(b"Connection: upgrade%s\r\nUpgrade: %s\r\n"
                     % (b", te" if te else b"", head.upgrade))
    elif te:
        lines.append(b"Connection: te\r\n")
    if te:
        lines.append(b"TE: trailers\r\n")
    if chunked:
        lines.append(b"Transfer-Encoding: chunked\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def _client_fields(conn: ClientConnection) -> bytes:
    """X-Forwarded-For, X-Real-IP and X-Forwarded-Proto from an external listener,
    each after a CRLF: the same for every request of a connection, so made once."""
    fields = conn.forwarded_fields
    if not fields:
        ip = conn.client_ip_bytes
        fields = conn.forwarded_fields = (b"\r\nX-Forwarded-For: " + ip + b"\r\nX-Real-IP: "
                                          + ip + b"\r\nX-Forwarded-Proto: " + conn.ctx.scheme)
    return fields


def _kept_fields(lines: list[bytes], head: RequestHead, drop: frozenset[bytes],
                 tokens: frozenset[bytes]) -> bool:
    """The client's field block but the fields `drop` names and those Connection
    names, appended to `lines` in pieces (each field after a CRLF): the block is
    cut where its marks (`RequestHead.marks`) say, without reading the rest.
    Returns whether the client takes trailers (TE)."""
    named = _named(tokens, drop)
    block = head.block
    first = len(lines)
    te = False
    pos = 0
    for mark in head.marks:
        lname, start, end = mark
        if lname in drop or lname in named:
            if lname == b"te":
                te = b"trailers" in mark_value(head, mark).lower()
            if start > pos:
                lines.append(block[pos:start])
            pos = end
    if pos < len(block):
        lines.append(block[pos:] if pos else block)
    if named and not named <= MARKED:  # a field Connection names that has no mark
        kept = b"".join(lines[first:])
        del lines[first:]
        lines.append(without_fields(kept, kept.translate(LOWER), field_keys(named - MARKED)))
    return te


def _trusted_fields(lines: list[bytes], head: RequestHead, tokens: frozenset[bytes],
                    client_ip: bytes, scheme: bytes = b"http") -> bool:
    """The fields of a request from a trusted listener: X-Forwarded-For extended,
    the other forwarding fields kept (X-Forwarded-Proto, -Host and X-Real-IP
    added when missing). Returns whether the client takes trailers (TE)."""
    te = _kept_fields(lines, head, DROP_INTERNAL, tokens)
    named = _named(tokens, DROP_INTERNAL)
    forwarded_for, seen = [], set()
    for mark in head.marks:
        lname = mark[0]
        if lname == b"x-forwarded-for":
            forwarded_for.append(mark_value(head, mark))
        elif lname in TRUSTED_KEPT and lname not in named:
            seen.add(lname)
    forwarded_for.append(client_ip)
    lines += (b"\r\nX-Forwarded-For: ", b", ".join(forwarded_for))
    if b"x-real-ip" not in seen:
        lines += (b"\r\nX-Real-IP: ", client_ip)
    if b"x-forwarded-proto" not in seen:
        lines += (b"\r\nX-Forwarded-Proto: ", scheme)
    if b"x-forwarded-host" not in seen and head.host:
        lines += (b"\r\nX-Forwarded-Host: ", head.host)
    return te


def _named(tokens: frozenset[bytes], drop: frozenset[bytes]) -> frozenset[bytes]:
    """The Connection options naming fields `drop` does not already drop, but
    Content-Length, which frames the body forwarded (`FRAMES_BODY`). Not
    ``drop | tokens``: a union copies the whole of `drop` (14k instructions for
    every ``Connection: close`` request, a fifth of a new connection's cost in
    Python, issue 21)."""
    if not tokens or tokens <= drop:
        return NOTHING
    return tokens - FRAMES_BODY


def last_chunk(head: RequestHead) -> bytes:
    """The end of a chunked request body toward the backend, with the client's
    trailer fields (but those only a head may carry, and the client's forwarding
    fields)."""
    if not head.trailers:
        return LAST_CHUNK
    lines = [b"0\r\n"]
    for name, lname, value in head.trailers:
        if lname not in DROP_TRAILER:
            lines += (name, b": ", value, b"\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)
