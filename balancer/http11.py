"""Sans-IO HTTP/1.x parsing over httptools (llhttp).

No sockets here: a parser takes bytes through `feed` and appends events to
`events`, in order:

* a `RequestHead` / `ResponseHead` when a message head is complete,
* `bytes` for each piece of decoded body (framing already removed),
* `END` when the message is complete.

Invariants:
* `ProtocolError` is the only exception `feed` raises; it carries the status
  to answer (client side) and the parser is unusable afterwards.
* Nothing that could be smuggled passes: conflicting or repeated
  Content-Length, any Transfer-Encoding but a single final ``chunked``, bad
  chunk framing, invalid header names or values, bare CR or LF, obs-fold,
  missing or repeated Host on HTTP/1.1, versions other than 1.0 and 1.1.
* Memory is bounded: an unfinished head never grows past the configured
  limits, and body bytes are handed out as they arrive.
* After an Upgrade/CONNECT head, parsing pauses: `upgraded` is set and
  `leftover` holds the bytes after the head. `resume()` continues as HTTP
  (the backend refused the upgrade).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import httptools

END = object()  # sentinel event: the current message is complete

REQUEST_SPECIAL = frozenset((b"host", b"expect", b"upgrade"))
FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))
HOP_BY_HOP = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
))


class ProtocolError(Exception):
    """A message that must not be processed; `status` is what to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Limits:
    """Parser limits (SPEC §4)."""

    max_request_line: int = 8192
    max_header_bytes: int = 65536
    max_headers: int = 100


class RequestHead:
    """A parsed request head. `headers` keeps (name, lower-case name, value) as received."""

    __slots__ = ("method", "target", "version", "headers", "host", "content_length",
                 "chunked", "keep_alive", "expect_continue", "upgrade", "connection_tokens")

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.version = b"1.1"
        self.headers: list[tuple[bytes, bytes, bytes]] = []
        self.host = b""
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.expect_continue = False
        self.upgrade = b""
        self.connection_tokens: frozenset[bytes] = frozenset()

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def __repr__(self) -> str:
        return f"<RequestHead {self.method.decode()} {self.target!r} host={self.host!r}>"


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """The lower-case tokens of a Connection header value."""
    return frozenset(t.strip().lower() for t in value.split(b",") if t.strip())


class _Parser:
    """Shared machinery of request and response parsing."""

    events: deque

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.events = deque()
        self.upgraded = False
        self.leftover = b""
        self._error: ProtocolError | None = None
        self._begin()

    def _begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self._line_done = False
        self._raw: list[tuple[bytes, bytes]] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        # Only collect here (one cheap call per header); `_scan` checks them all at once.
        # After the head, fields are chunked-body trailers: validated by llhttp, dropped.
        self._raw.append((name, value))

    def _fail(self, status: int, reason: str) -> None:
        self._error = ProtocolError(status, reason)
        raise self._error

    def feed(self, data: bytes) -> None:
        """Parse `data`; events are appended to `events`. Raises ProtocolError."""
        if self._in_head:
            self._check_head_size(data)
        try:
            self._hp.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgraded = True
            self.leftover = data[exc.args[0]:]
        except httptools.HttpParserError as exc:
            if self._error is not None:
                raise self._error from None
            raise ProtocolError(400, str(exc)) from None
        if self._in_head and self._head_bytes > self._head_limit():
            raise ProtocolError(431, "request head too large")

    def _head_limit(self) -> int:
        return self.limits.max_request_line + self.limits.max_header_bytes

    def _check_head_size(self, data: bytes) -> None:
        if not self._line_done:
            end = data.find(b"\n")
            line = self._head_bytes + (len(data) if end < 0 else end)
            if line > self.limits.max_request_line:
                self._fail(*self._line_too_long())
            self._line_done = end >= 0
        self._head_bytes += len(data)

    def _line_too_long(self) -> tuple[int, str]:
        return 414, "request line too long"

    def _scan(self, head: RequestHead) -> list[tuple[bytes, bytes, bytes]]:
        """Check the collected header fields; returns (name, lower name, value) triples."""
        raw, self._raw = self._raw, []
        if len(raw) > self.limits.max_headers:
            self._fail(431, "too many headers")
        fields = []
        cl_seen = te_seen = False
        for name, value in raw:
            lname = name.lower()
            fields.append((name, lname, value))
            if lname not in FRAMING:
                continue
            value = value.rstrip(b" \t")
            if lname == b"content-length":
                if cl_seen:
                    self._fail(400, "repeated Content-Length")
                cl_seen = True
                head.content_length = int(value)
            elif lname == b"transfer-encoding":
                if te_seen or value.lower() != b"chunked":
                    self._fail(501, "unsupported Transfer-Encoding")
                te_seen = head.chunked = True
            elif lname == b"connection":
                head.connection_tokens = head.connection_tokens | connection_tokens(value)
        if te_seen:
            head.content_length = None
        return fields

    def resume(self) -> None:
        """Continue parsing HTTP after an upgrade the peer did not accept."""
        leftover, self.leftover, self.upgraded = self.leftover, b"", False
        self._hp = self._new_parser()
        self._begin()
        if leftover:
            self.feed(leftover)

    def close(self) -> None:
        """Drop the httptools parser (it references this object: a cycle)."""
        self._hp = None

    def _new_parser(self):  # pragma: no cover - overridden
        raise NotImplementedError


class RequestParser(_Parser):
    """Parses requests from a client; pipelined requests queue up in order."""

    def __init__(self, limits: Limits = Limits()) -> None:
        super().__init__(limits)
        self._hp = self._new_parser()
        self._head: RequestHead | None = None

    def _new_parser(self) -> httptools.HttpRequestParser:
        return httptools.HttpRequestParser(self)

    # httptools callbacks --------------------------------------------------
    def on_message_begin(self) -> None:
        self._head = RequestHead()
        self._url = b""

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_headers_complete(self) -> None:
        head, hp = self._head, self._hp
        head.headers = fields = self._scan(head)
        for _, lname, value in fields:
            if lname in REQUEST_SPECIAL:
                self._special(head, lname, value)
        head.method = hp.get_method()
        head.version = version = hp.get_http_version().encode()
        if version != b"1.1" and version != b"1.0":
            self._fail(505, "HTTP version not supported")
        if head.method == b"CONNECT":
            self._fail(501, "CONNECT is not supported")
        self._set_target(head)
        if version == b"1.1" and not head.host:
            self._fail(400, "missing Host header")
        if head.host == b"\0":
            self._fail(400, "empty Host header")
        if head.chunked and version == b"1.0":
            self._fail(400, "Transfer-Encoding in an HTTP/1.0 request")
        if head.upgrade and b"upgrade" not in head.connection_tokens:
            head.upgrade = b""
        head.keep_alive = hp.should_keep_alive()
        self._in_head = False
        self.events.append(head)

    def _special(self, head: RequestHead, lname: bytes, value: bytes) -> None:
        if lname == b"host":
            if head.host:
                self._fail(400, "repeated Host header")
            head.host = value.rstrip(b" \t") or b"\0"
        elif lname == b"expect":
            if value.strip().lower() != b"100-continue":
                self._fail(417, "unsupported Expect")
            head.expect_continue = True
        else:
            head.upgrade = value.strip()

    def _set_target(self, head: RequestHead) -> None:
        url = self._url
        if url[:1] == b"/" or url == b"*":
            head.target = url
            return
        lower = url[:8].lower()
        if lower.startswith(b"http://") or lower.startswith(b"https://"):
            rest = url.split(b"://", 1)[1]
            slash = rest.find(b"/")
            authority, path = (rest, b"/") if slash < 0 else (rest[:slash], rest[slash:])
            if not authority or b"@" in authority:
                self._fail(400, "bad absolute-form target")
            head.host, head.target = authority, path
            return
        self._fail(400, "bad request target")

    def on_body(self, body: bytes) -> None:
        self.events.append(body)

    def on_message_complete(self) -> None:
        self.events.append(END)
        self._begin()
