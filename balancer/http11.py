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
  missing, repeated or invalid Host on HTTP/1.1, versions other than 1.0 and 1.1.
* Memory is bounded: an unfinished head never grows past the configured
  limits, and body bytes are handed out as they arrive.
* Limits do not depend on how the bytes were split: the feed-level counts
  bound an unfinished head (memory), and a completed head whose counts could
  be off (it began inside a feed, or that feed was large) is measured exactly.
* After an Upgrade head, parsing pauses: `upgraded` is set and `leftover`
  holds the bytes after the head. `resume()` continues as HTTP (the backend
  refused the upgrade). An Upgrade request has no body: llhttp would hand the
  body over as tunnel data, so such a request is rejected.
* Bytes after a request that closes the connection are ignored (RFC 9112
  §9.6); the caller closes after answering it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import httptools

END = object()  # sentinel event: the current message is complete

REQUEST_SPECIAL = frozenset((b"host", b"expect", b"upgrade"))
FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))
SPECIAL = REQUEST_SPECIAL | FRAMING
VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}  # llhttp's version text → ours; others get 505
# RFC 3986 reg-name / IP-literal characters and ":" port: anything else in Host is a 400.
HOST_CHARS = (b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
              b"-._~%!$&'()*+,;=:[]")
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
                 "chunked", "has_body", "keep_alive", "expect_continue", "upgrade",
                 "connection_tokens")

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.version = b"1.1"
        self.headers: list[tuple[bytes, bytes, bytes]] = []
        self.host = b""
        self.content_length: int | None = None
        self.chunked = False
        self.has_body = False  # chunked, or a Content-Length above 0
        self.keep_alive = True
        self.expect_continue = False
        self.upgrade = b""
        self.connection_tokens: frozenset[bytes] = frozenset()

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
        self._head_max = limits.max_request_line + limits.max_header_bytes  # line and fields
        self.events = deque()
        self.upgraded = False
        self.leftover = b""
        self._error: ProtocolError | None = None
        self._closed = False  # a request that closes the connection is complete
        self._begin()

    def _begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0  # bytes fed since the head began at a feed boundary
        self._line_done = False
        self._measure = False  # the counts missed part of this head: measure it exactly
        self._quiet_bytes = 0  # body-phase bytes that produced no event (framing, trailers)
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
        if self._closed:
            return
        events = self.events
        if self._in_head:
            self._check_head_size(data)
            quiet = -1
        else:
            quiet = len(events)
        try:
            self._hp.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self.upgraded = True
            self.leftover = data[exc.args[0]:]
        except httptools.HttpParserError as exc:
            if self._error is not None:
                raise self._error from None
            if self._closed:  # llhttp refuses bytes after "Connection: close"
                return
            raise ProtocolError(400, str(exc)) from None
        if self._in_head:
            if self._head_bytes > self._head_max:
                raise ProtocolError(431, "request head too large")
            return
        if quiet == len(events):
            self._quiet_bytes += len(data)
        elif quiet >= 0:
            self._quiet_bytes = 0
        if self._quiet_bytes or self._raw:
            self._check_quiet()

    def _check_quiet(self) -> None:
        """Bound body-phase bytes that produced no event: chunk framing, trailers.

        httptools buffers a trailer field whole until it ends (bug: unbounded, with
        quadratic copies); complete trailer fields are kept until the message ends.
        """
        if self._quiet_bytes > self._head_max or len(self._raw) > self.limits.max_headers:
            self._fail(431, "chunked trailer section too large")

    def _check_trailers(self) -> None:
        raw = self._raw
        size = sum(len(name) + len(value) + 4 for name, value in raw)
        if size > self._head_max or len(raw) > self.limits.max_headers:
            self._fail(431, "chunked trailer section too large")

    def _check_head_size(self, data: bytes) -> None:
        if not self._line_done:
            end = data.find(b"\n")
            line = self._head_bytes + (len(data) if end < 0 else end)
            if line > self.limits.max_request_line + 1:  # + 1: the CR ending the line
                self._fail(*self._line_too_long())
            self._line_done = end >= 0
        self._head_bytes += len(data)

    def _line_too_long(self) -> tuple[int, str]:
        return 414, "request line too long"

    def _scan(self, head: RequestHead) -> list[tuple[bytes, bytes, bytes]]:
        """Check the collected header fields and fill `head` from the special ones;
        returns (name, lower name, value) triples."""
        raw, self._raw = self._raw, []
        if len(raw) > self.limits.max_headers:
            self._fail(431, "too many headers")
        fields = []
        append = fields.append
        cl_seen = te_seen = False
        for name, value in raw:
            lname = name.lower()
            append((name, lname, value))
            if lname not in SPECIAL:
                continue
            if lname in REQUEST_SPECIAL:
                self._special(head, lname, value)
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
            else:
                head.connection_tokens = head.connection_tokens | connection_tokens(value)
        if te_seen:
            head.content_length = None
        head.has_body = te_seen or bool(head.content_length)
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
        if not self._head_bytes:
            # Began inside the feed that completed the previous request, so the
            # feed-level counts missed its start: measured in `_check_sizes`.
            self._line_done = self._measure = True

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_headers_complete(self) -> None:
        head, hp = self._head, self._hp
        head.method = hp.get_method()
        self._check_sizes(head)
        head.headers = self._scan(head)
        version = VERSIONS.get(hp.get_http_version())
        if version is None:
            self._fail(505, "HTTP version not supported")
        head.version = version
        if head.method == b"CONNECT":
            self._fail(501, "CONNECT is not supported")
        self._set_target(head)
        if version == b"1.1" and not head.host:
            self._fail(400, "missing Host header")
        if head.host == b"\0":
            self._fail(400, "empty Host header")
        if head.host.translate(None, HOST_CHARS):
            self._fail(400, "invalid Host header")
        if version == b"1.0":
            if head.chunked:
                self._fail(400, "Transfer-Encoding in an HTTP/1.0 request")
            head.expect_continue = False  # RFC 9110 §10.1.1: ignored in HTTP/1.0
        if hp.should_upgrade():
            # llhttp stops after this head; whatever follows is tunnel data, so a
            # body would be smuggled past the framing (bug: forwarded on refusal).
            if head.has_body:
                self._fail(400, "Upgrade request with a body")
            if not head.upgrade:  # "Upgrade: a" then an empty "Upgrade:"
                self._fail(400, "empty Upgrade header")
        else:
            head.upgrade = b""
        head.keep_alive = hp.should_keep_alive()
        self._in_head = False
        self.events.append(head)

    def _check_sizes(self, head: RequestHead) -> None:
        """Exact limits, for heads the feed-level counts could not bound (see `_Parser`)."""
        limits = self.limits
        line = len(head.method) + len(self._url) + 10  # "M SP url SP HTTP/1.1"
        if line > limits.max_request_line:
            self._fail(*self._line_too_long())
        if self._measure or self._head_bytes > self._head_max:
            size = line + 4 + sum(len(name) + len(value) + 4 for name, value in self._raw)
            if size > self._head_max:
                self._fail(431, "request head too large")

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
            # The authority ends at the path, the query or the fragment (bug: "?" was kept in it).
            authority = rest.partition(b"/")[0].partition(b"?")[0].partition(b"#")[0]
            path = rest[len(authority):]
            if not authority or b"@" in authority:
                self._fail(400, "bad absolute-form target")
            head.host = authority
            head.target = path if path[:1] == b"/" else b"/" + path
            return
        self._fail(400, "bad request target")

    def on_body(self, body: bytes) -> None:
        self.events.append(body)

    def on_message_complete(self) -> None:
        if self._raw:  # trailer fields
            self._check_trailers()
        self.events.append(END)
        self._begin()
        # Bug: bytes after it used to become a 400 (or 414/431) for an answerable request.
        self._closed = not self._head.keep_alive
