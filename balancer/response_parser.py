"""Sans-IO parsing of backend responses over httptools (llhttp).

Events, in order, in `events`: a `ResponseHead`, `bytes` body pieces
(framing removed), `END`. 1xx interim responses give their own head and END
before the final one; a 101 completes the parser with `upgraded` set and the
bytes after the head in `leftover`.

Invariants:
* llhttp validates every byte; this module registers no per-field callback.
  The head's field block is kept raw (see `balancer.fields`) and forwarded
  with hop-by-hop fields cut out, which costs a few substring searches.
* `ProtocolError` is the only exception (status 502: the backend is at fault).
* A head (status line to the blank line) is at most `max_header_bytes` and
  `max_headers` fields, as a request's (HAProxy answers 502 too), however
  its bytes were split: an unfinished head is refused once its bytes pass the
  limit, a complete one is measured exactly.
* Content-Length is cut from 1xx and 204 heads (RFC 9110 §8.6: a server must
  not send it there); a 304 keeps it (§8.6 lets it state the length of the
  200 it stands for, and HAProxy, nginx and Varnish forward it). Neither has a body.
* One parser per backend connection: `begin` readies it for the next
  response, keeping llhttp's parser when it ended cleanly (after an error,
  a HEAD response or a 101 a new one is made). `close` drops the llhttp
  parser, which references this object: a cycle.
* Bytes after the final response are not part of it: they are ignored and
  make the connection not reusable (`keep_alive` False), instead of failing a
  response that is whole, and whether they came in its last read or later.
  Empty lines between messages are allowed.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Final

import httptools

from balancer.fields import field_keys, field_list, without_fields
from balancer.http11 import (
    DEFAULT_LIMITS,
    END,
    HOP_BY_HOP,
    Limits,
    ProtocolError,
    add_connection_tokens,
    is_chunked_only,
)

_CRLFCRLF: Final = b"\r\n\r\n"


class _Stop(Exception):
    """Raised in a callback to stop llhttp: the response ended before llhttp knows it."""


# The fields the proxy acts on: framing (Content-Length, Transfer-Encoding),
# Connection, and those it never forwards (hop-by-hop, X-Request-Id). A field
# whose first letter is not one of theirs is passed over without a look at its
# name: most fields of a response (Date, Server, Content-Type...) cost one
# table lookup.
NOT_FORWARDED: Final = HOP_BY_HOP | {b"x-request-id"}
_FIRST: Final = {name[0] for name in NOT_FORWARDED | {b"content-length"}}
SPECIAL_FIRST: Final = bytes(bytes((b,)).lower()[0] in _FIRST for b in range(256))  # 0 or 1
_NO_TOKENS: Final[frozenset[bytes]] = frozenset()


def _skip_empty_lines(buf: bytes) -> bytes:
    """`buf` without the empty lines before a status line (llhttp skips them)."""
    start = 0
    while buf.startswith(b"\r\n", start):
        start += 2
    return buf[start:] if start else buf


class ResponseHead:
    """A response head: status, its raw field block and the framing it implies.

    `forwarded` is the field block as the client gets it: without the fields
    never forwarded (hop-by-hop, those named in Connection, X-Request-Id).
    """

    __slots__ = ("status", "status_line", "block", "content_length", "chunked",
                 "keep_alive", "connection_tokens", "no_body", "forwarded")

    def __init__(self, status: int, head: bytes, keep_alive: bool, no_body: bool,
                 max_fields: int = DEFAULT_LIMITS.max_headers) -> None:
        """`head`: the status line and the fields, without the blank line."""
        lines = head.split(b"\r\n")  # [status line, field, field...]
        if len(lines) > max_fields + 1:
            raise ProtocolError(502, "too many header fields from backend")
        line = lines[0]
        self.status = status
        # llhttp checked the line is "HTTP/d.d NNN reason": keep code and reason
        self.status_line = b"HTTP/1.1 " + line[9:]  # as the client will see it
        self.block = block = head[len(line):]
        self.keep_alive = keep_alive
        self.no_body = no_body
        lines[0] = b""  # joined, the kept lines make a block again
        content_length = None
        chunked = False
        tokens: frozenset[bytes] = _NO_TOKENS
        kept: list[bytes] | None = None  # the lines forwarded, once one was cut
        for i in range(1, len(lines)):
            line = lines[i]
            if SPECIAL_FIRST[line[0]]:
                name, _, value = line.partition(b":")
                name = name.lower()
                if name == b"content-length":
                    content_length = int(value)  # llhttp rejected duplicates
                    if status < 200 or status == 204:  # never sent on (RFC 9110 §8.6)
                        if kept is None:
                            kept = lines[:i]
                        continue
                elif name in NOT_FORWARDED:
                    if kept is None:
                        kept = lines[:i]
                    if name == b"connection":
                        tokens = add_connection_tokens(tokens, value)
                    elif name == b"transfer-encoding":
                        if not is_chunked_only(chunked, value):
                            raise ProtocolError(
                                502, "backend used a transfer coding other than chunked")
                        chunked = True
                    continue
            if kept is not None:
                kept.append(line)
        if kept is not None:
            block = b"\r\n".join(kept)
        if tokens and not tokens <= HOP_BY_HOP:  # fields named by Connection are hop-by-hop too
            block = without_fields(block, block.lower(), field_keys(tokens - HOP_BY_HOP))
        self.forwarded = block
        self.content_length = None if chunked else content_length
        self.chunked = chunked
        self.connection_tokens = tokens

    @property
    def close_delimited(self) -> bool:
        return not self.no_body and not self.chunked and self.content_length is None

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """(name, value) pairs, parsed on demand (not on the hot path)."""
        return field_list(self.block)

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status}>"


class ResponseParser:
    """Parses the responses of one backend connection, one `begin` at a time.

    `for_head`: the request was HEAD."""

    __slots__ = ("events", "complete", "upgraded", "leftover", "for_head", "_hp", "_parts",
                 "_buffered", "_in_head", "_limit", "_max_fields", "_head", "_error")

    def __init__(self, limits: Limits = DEFAULT_LIMITS, for_head: bool = False) -> None:
        self.events: deque = deque()
        self._limit = limits.max_header_bytes  # status line to the blank line
        self._max_fields = limits.max_headers
        self._parts: list[bytes] = []  # what was fed since the head began (joined once)
        self._hp: Any = None  # httptools.HttpResponseParser, None once closed
        self.upgraded = False
        self.leftover = b""
        self._head: ResponseHead | None = None
        self._error: ProtocolError | None = None
        self.begin(for_head)

    def begin(self, for_head: bool = False) -> None:
        """Get ready for the next response (the previous one is complete: an
        upgraded or failed connection is not reused, so `upgraded`, `leftover`
        and `_error` keep their first values)."""
        self.events.clear()
        self.complete = False
        self._parts.clear()
        self._buffered = 0
        self.for_head = for_head
        self._in_head = True
        if self._hp is None:
            self._hp = httptools.HttpResponseParser(self)

    def close(self) -> None:
        """Drop the llhttp parser (and the reference cycle through it)."""
        self._hp = None

    @property
    def closed(self) -> bool:
        """Whether the llhttp parser is gone (closed, or after an error or a 101)."""
        return self._hp is None

    def feed(self, data: bytes) -> None:
        """Parse `data` from the backend. Raises ProtocolError."""
        if self.complete:
            head = self._head
            if head is not None and not self.upgraded and data.strip(b"\r\n"):  # as llhttp,
                head.keep_alive = False  # empty lines aside
            return
        if self._in_head:
            self._parts.append(data)
            self._buffered += len(data)
        try:
            self._hp.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._hp = None
            self.upgraded = True
            self.leftover = data[exc.args[0]:]
        except httptools.HttpParserError as exc:
            self._hp = None  # llhttp stays in its error state: `begin` makes a new one
            if self.complete and self._head.status != 101:  # 101: no "Connection: upgrade"
                # The response is whole; what followed it (HEAD: its body) was consumed.
                if not self.for_head:
                    self._head.keep_alive = False
            elif self._error is not None:
                raise self._error from None
            else:
                raise ProtocolError(502, f"invalid response from backend: {exc}") from None
        else:
            if self._in_head and self._buffered > self._limit:
                self._bound_unfinished()

    def feed_eof(self) -> None:
        """The backend closed: completes a close-delimited body, else raises."""
        if self.complete:
            return
        head = self._head
        if not self._in_head and head is not None and head.close_delimited:
            self.events.append(END)
            self.complete = True
            self._hp = None  # the connection is over
            return
        raise ProtocolError(502, "backend closed the connection mid-response")

    # httptools callbacks --------------------------------------------------
    def on_message_begin(self) -> None:
        head = self._head
        if self.complete and head is not None:  # bytes after the final response, same read
            head.keep_alive = False
            raise _Stop

    def _bound_unfinished(self) -> None:
        """An unfinished head past the limit is refused; empty lines before it
        (which llhttp skips) are dropped rather than kept."""
        buf = _skip_empty_lines(b"".join(self._parts))
        if len(buf) > self._limit:
            raise ProtocolError(502, "backend response head too large")
        self._parts = [buf]
        self._buffered = len(buf)

    def on_headers_complete(self) -> None:
        hp, parts = self._hp, self._parts
        buf = parts[0] if len(parts) == 1 else b"".join(parts)
        if buf[:1] == b"\r":
            buf = _skip_empty_lines(buf)
        raw, blank, rest = buf.partition(_CRLFCRLF)
        if len(raw) + 4 > self._limit or not blank:  # one large read; or bare LFs
            self._error = ProtocolError(502, "backend response head too large" if blank
                                        else "invalid response head from backend")
            raise self._error
        status = hp.get_status_code()
        if not 100 <= status <= 599:  # llhttp takes any three digits (RFC 9110 §15)
            self._error = ProtocolError(502, f"invalid status {status} from backend")
            raise self._error
        no_body = self.for_head or status < 200 or status in (204, 304)
        try:
            head = ResponseHead(status, raw, hp.should_keep_alive(), no_body, self._max_fields)
        except ProtocolError as exc:
            self._error = exc
            raise
        except ValueError:
            self._error = ProtocolError(502, "invalid Content-Length from backend")
            raise self._error from None
        self._head = head
        parts.clear()
        self._buffered = 0
        if status < 200:  # a 1xx: the next message began
            parts.append(rest)
            self._buffered = len(rest)
        self._in_head = False
        self.events.append(head)
        if self.for_head and status >= 200:
            # llhttp cannot be told "no body follows" (HEAD); the message ends here,
            # and a body the backend sent anyway must not become events after END.
            self._finish()
            if rest.strip(b"\r\n"):
                head.keep_alive = False
            raise _Stop

    def on_body(self, body: bytes) -> None:
        self.events.append(body)

    def on_message_complete(self) -> None:
        if not self.complete:
            self._finish()

    def _finish(self) -> None:
        self.events.append(END)
        head = self._head
        status = head.status if head is not None else 0
        self.complete = status >= 200 or status == 101
        self._in_head = not self.complete
