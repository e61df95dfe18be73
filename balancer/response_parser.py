"""Sans-IO parsing of backend responses over httptools (llhttp).

Events, in order, in the list `events` (a list, not a deque: mypyc compiles a
list's operations to C calls, a deque's are Python calls by name): a
`ResponseHead`, body pieces (framing removed), `END`. A body piece is
`bytes`, or a `balancer.spans.Span` ``(data, start)`` when it is the end of
a larger read (`_take_body`: the body after a repeated head, which is sent
from where it lies instead of being sliced out; `span_bytes` copies it). 1xx interim
responses give their own head and END before the final one; a 101 completes
the parser with `upgraded` set and the bytes after the head in `leftover`.

Invariants:
* llhttp validates every byte; this module registers no per-field callback.
  Once: a response whose first read begins with a head that repeats the last
  one read from the same backend (`HeadMemo`, shared by its connections) byte
  for byte, which llhttp read as final, keep-alive and with a Content-Length
  body, is taken without llhttp (`_take_repeat`, `_take_body`): llhttp would
  read the same head (what it reads from a head depends on its bytes alone),
  count the body's bytes without looking at them and end at a message
  boundary, where it already is. The events are the same, and bytes after
  the body are judged as `feed` judges those after a complete response.
* A parser holds its response's head until the connection goes idle (`idle`):
  a pooled connection keeps no head (~1 KiB with its bytes); the backend's
  `HeadMemo` keeps the last one for every connection's next response.
* A parser holds an llhttp parser only while llhttp reads its response: taken
  from its callbacks' spares (`ResponseCallbacks.take`) at the first read
  `_take_repeat` does not take, given back (`give`) after the read that ended
  a response that stays keep-alive, where llhttp is at a message boundary
  with nothing left of it (a read with bytes after the response ends in an
  error: that parser is dropped, as one after any error, a HEAD response's
  or a 101's). So a pooled connection holds none (~550 bytes with llhttp's
  state and settings), nor does one waiting for its response.
* The head's field block is kept raw (see `balancer.fields`) and forwarded
  with hop-by-hop fields cut out, which costs a few substring searches.
* `ProtocolError` is the only exception (status 502: the backend is at fault).
* Three heads llhttp refuses are read as HAProxy reads them (RFC 9112 §6.3,
  §2.2), each without doubt about where the response ends: a
  Transfer-Encoding beside a Content-Length frames the body, and the
  Content-Length goes (§6.3: the former overrides); a Content-Length
  repeated, or a list, with one value is merged (`balancer.lengths`, as a
  request's); lines ended by a bare LF are read as ended by CRLF (§2.2). Such
  a head is held whole once llhttp refused it (`_hold`), mended (`_mended`)
  and parsed again by a new llhttp parser, which judges the rest (a
  Transfer-Encoding but ``chunked``, lengths that differ, a bare CR, a bare LF
  in chunk framing: a 502); and the connection is not reused after it (§6.3:
  such a response may be an attempt at response splitting).
* A status line reaches the client only with a code of 100-599, a space after
  it and a reason phrase without control bytes (RFC 9112 §4); llhttp checks
  neither the first nor the last.
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
* A chunked response's trailer section is bounded like a head
  (`max_header_bytes`, `max_headers`): body-phase reads that bring no body
  byte count against it, and once the response is complete its trailer fields
  are read back from the end of the bytes fed (llhttp validated them) into
  `last_chunk`, without those only a head may carry (`TRAILER_DROPPED`).
  A `Connection` trailer field makes the connection not reusable.
  Nothing of this runs for a response that is not chunked.
"""

from __future__ import annotations

from typing import Any, Final

import httptools

from balancer.chunks import LONG_LINE, ChunkedBody
from balancer.fields import field_keys, field_list, without_fields
from balancer.http11 import (
    DEFAULT_LIMITS,
    END,
    HOP_BY_HOP,
    LAST_CHUNK,
    LOWER,
    MAX_LENGTH,
    SP,
    TAB,
    Limits,
    ProtocolError,
    Spares,
    add_connection_tokens,
    is_chunked_only,
)
from balancer.lengths import MERGEABLE, merged_lengths

_CRLFCRLF: Final = b"\r\n\r\n"


class _Stop(Exception):
    """Raised in a callback to stop llhttp: the response ended before llhttp knows it."""


# `ResponseParser._hp` while a head llhttp refused is held to be mended (`_hold`)
HOLDING: Final = object()
# `ResponseParser._error` once a head was mended (`_hold`): every head after it on
# the connection, an interim's final head too, is not kept alive (module doc)
MENDED: Final = ProtocolError(502, "mended response head")


# The fields the proxy acts on: framing (Content-Length, Transfer-Encoding),
# Connection, and those it never forwards (hop-by-hop, X-Request-Id). A field
# whose first letter is not one of theirs is passed over without a look at its
# name: most fields of a response (Date, Server, ETag...) cost one
# table lookup.
NOT_FORWARDED: Final = HOP_BY_HOP | {b"x-request-id"}
# What a response's Connection may not remove: Content-Length frames the body
# the client gets (bug: "Connection: close, Content-Length" sent it unframed,
# and the client read the next response on the connection as its body).
NEVER_NAMED: Final = HOP_BY_HOP | {b"content-length"}
# Per first byte of a field line (either case), the lower-case "name:" prefixes of
# the special fields starting with it. A line is matched with `translate` and
# `startswith`, which mypyc compiles to C calls: `partition` and `lower` were
# Python method calls (looked up by name), two per special line, ~6k instructions
# per proxied response of nginx (Content-Type, Content-Length, Connection).
_PREFIXES: Final[tuple[tuple[bytes, ...], ...]] = tuple(
    tuple(sorted(name + b":" for name in NOT_FORWARDED | {b"content-length"}
                 if name[0] == bytes((b,)).lower()[0]))
    for b in range(256))
_NO_TOKENS: Final[frozenset[bytes]] = frozenset()
# llhttp's reasons for refusing a head that `_mended` may mend: a Content-Length
# repeated or a list (`balancer.lengths.MERGEABLE`) or beside a Transfer-Encoding, a
# status line or field ended by a bare LF. By reason, not by a look at the bytes: a
# head refused or held whatever the reads it came in (llhttp's reason for a byte
# depends on the bytes before it alone). (A blank line alone a bare LF after
# CRLF-ended fields is "Invalid header field char", as garbage: a 502.)
MENDABLE: Final = MERGEABLE | frozenset((
    "Transfer-Encoding can't be present with Content-Length",
    "Content-Length can't be present with Transfer-Encoding",
    "Missing expected CR after response line", "Missing expected CR after header value"))
# Body-phase bytes with no body byte in them may pass the trailer limit by this
# much (chunk lines around the section) before the exact measure at the end.
FRAMING_ROOM: Final = 4096
# Never forwarded as response trailers (RFC 9110 §6.5.1): framing, routing,
# response control data, payload processing and authentication fields, which
# only a head may carry, and what is never forwarded at all.
TRAILER_DROPPED: Final = NOT_FORWARDED | frozenset((
    b"content-length", b"host", b"age", b"cache-control", b"expires", b"date",
    b"location", b"retry-after", b"vary", b"warning", b"content-encoding",
    b"content-type", b"content-range", b"authorization", b"set-cookie",
    b"www-authenticate"))


def _skip_empty_lines(buf: bytes) -> bytes:
    """`buf` without the empty lines before a status line (llhttp skips them)."""
    start = 0
    while buf.startswith(b"\r\n", start):
        start += 2
    return buf[start:] if start else buf


def _repeats(buf: bytes, raw: bytes) -> bool:
    """Whether `buf` begins with the head `raw` and the blank line that ended it
    (`raw` was cut at its first CRLFCRLF, so `buf`'s first is there too)."""
    end = len(raw)
    return (len(buf) >= end + 4 and buf.startswith(raw) and buf[end] == 13
            and buf[end + 1] == 10 and buf[end + 2] == 13 and buf[end + 3] == 10)


class ResponseHead:
    """A response head: status, its raw field block and the framing it implies.

    `forwarded` is the field block as the client gets it: without the fields
    never forwarded (hop-by-hop, those named in Connection, X-Request-Id).
    Only `keep_alive` changes after it is made; `says_keep_alive` is what llhttp
    read from its bytes (`keep_alive` when made).
    """

    __slots__ = ("status", "status_line", "block", "content_length", "chunked",
                 "keep_alive", "connection_tokens", "no_body", "forwarded", "announced",
                 "upgrade", "raw", "says_keep_alive")
    status: int
    status_line: bytes
    block: bytes
    forwarded: bytes
    content_length: int | None
    chunked: bool
    connection_tokens: frozenset[bytes]
    announced: bytes
    upgrade: bytes

    def __init__(self, status: int, head: bytes, keep_alive: bool, no_body: bool,
                 max_fields: int = DEFAULT_LIMITS.max_headers,
                 last: ResponseHead | None = None) -> None:
        """`head`: the status line and the fields, without the blank line. `last`:
        the previous head of the same backend (`HeadMemo`: parsers with the same
        limits); when `head` is the same
        bytes (a backend that repeats itself: the same page within the same
        second of its Date), what was read from them is taken from it instead of
        being read again (~10k instructions of the ~84k of a proxied request)."""
        self.raw = head
        self.status = status
        self.keep_alive = self.says_keep_alive = keep_alive
        self.no_body = no_body
        if last is not None and last.raw == head:  # `no_body` changes none of them
            self.status_line = last.status_line
            self.block = last.block
            self.forwarded = last.forwarded
            self.content_length = last.content_length
            self.chunked = last.chunked
            self.connection_tokens = last.connection_tokens
            self.announced = last.announced
            self.upgrade = last.upgrade
            return
        lines = head.split(b"\r\n")  # [status line, field, field...]
        if len(lines) > max_fields + 1:
            raise ProtocolError(502, "too many header fields from backend")
        line = lines[0]
        # llhttp checked the line is "HTTP/d.d NNN", then the end or a space and
        # any bytes but CR and LF: keep code and reason, which RFC 9112 §4 bounds
        # to HTAB, SP, VCHAR and obs-text (bug: a NUL or a DEL in it reached the
        # client, and the connection went back to the pool)
        if _has_control(line, 13):
            raise ProtocolError(502, "invalid reason phrase from backend")
        # as the client will see it, with the space a line without reason lacked
        # (bug: "HTTP/1.1 200" was forwarded so, which RFC 9112 §4 does not allow)
        self.status_line = b"HTTP/1.1 " + line[9:] if len(line) > 12 else \
            b"HTTP/1.1 " + line[9:] + b" "
        self.block = block = head[len(line):]
        lines[0] = b""  # joined, the kept lines make a block again
        content_length = None
        chunked = False
        tokens: frozenset[bytes] = _NO_TOKENS
        kept: list[bytes] | None = None  # the lines forwarded, once one was cut
        announced = b""  # the Trailer fields, each with its CRLF before it
        upgrade = b""  # the protocols a 101 switches to (its Upgrade fields)
        for i in range(1, len(lines)):
            line = lines[i]
            prefixes = _PREFIXES[line[0]]
            if prefixes:
                name = _special(line.translate(LOWER), prefixes)  # b"name:", or b""
                if name == b"content-length:":
                    content_length = int(line[15:])  # llhttp rejected duplicates
                    if status < 200 or status == 204:  # never sent on (RFC 9110 §8.6)
                        if kept is None:
                            kept = lines[:i]
                        continue
                    if content_length > MAX_LENGTH:  # (bug: forwarded, the client hung)
                        raise ProtocolError(502, "Content-Length too large from backend")
                    if line[-1] == SP or line[-1] == TAB:  # RFC 9110 §5.5: not the value's
                        line = b"Content-Length: %d" % content_length  # (HAProxy's too)
                        if kept is None:
                            kept = lines[:i]
                elif name:  # never forwarded
                    if kept is None:
                        kept = lines[:i]
                    if name == b"connection:":
                        tokens = add_connection_tokens(tokens, line[11:])
                    elif name == b"transfer-encoding:":
                        if not is_chunked_only(chunked, line[18:]):
                            raise ProtocolError(
                                502, "backend used a transfer coding other than chunked")
                        chunked = True
                    elif name == b"trailer:":
                        announced += b"\r\n" + line
                    elif name == b"upgrade:" and status == 101:
                        value = line[8:].strip(b" \t")
                        upgrade = upgrade + b", " + value if upgrade else value
                    continue
            if kept is not None:
                kept.append(line)
        if kept is not None:
            block = b"\r\n".join(kept)
        if tokens and not tokens <= HOP_BY_HOP:  # fields named by Connection are hop-by-hop too
            block = without_fields(block, block.lower(), field_keys(tokens - NEVER_NAMED))
        self.forwarded = block
        self.content_length = None if chunked else content_length
        self.chunked = chunked
        self.connection_tokens = tokens
        # Forwarded with the trailers themselves, only when the client gets them.
        self.announced = announced if chunked else b""
        self.upgrade = upgrade

    @property
    def close_delimited(self) -> bool:
        return not self.no_body and not self.chunked and self.content_length is None

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """(name, value) pairs, parsed on demand (not on the hot path)."""
        return field_list(self.block)

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status}>"


def _has_control(line: bytes, start: int) -> bool:
    """Whether `line` has a control byte but HTAB from `start` on (DEL too: RFC
    9112 §4's reason phrase is HTAB, SP, VCHAR and obs-text). A loop, which mypyc
    compiles to C: `bytes.translate` with the bytes to delete cost ~2,300
    instructions per head (it builds its table at each call)."""
    for i in range(start, len(line)):
        byte = line[i]
        if byte < 32 and byte != 9 or byte == 127:
            return True
    return False


def _special(low: bytes, prefixes: tuple[bytes, ...]) -> bytes:
    """The prefix of `prefixes` the lower-case field line `low` starts with, or b""."""
    for prefix in prefixes:
        if low.startswith(prefix):
            return prefix
    return b""


class HeadMemo:
    """The last response head read from one backend (`balancer.pool.Backend.heads`),
    shared by the parsers of its connections: a head that repeats its bytes is
    taken from it, not read again, on whichever connection it comes. One
    reference, replaced whole (threads of the threaded baseline share it)."""

    __slots__ = ("last",)

    def __init__(self) -> None:
        self.last: ResponseHead | None = None


class ResponseCallbacks(Spares):
    """httptools' protocol object for response parsers, as
    `balancer.http11.RequestCallbacks` is for requests: the callbacks go to the
    parser being fed (`parser`); a gevent worker's parsers share one
    (`balancer.connection.Context.response_callbacks`) instead of four bound
    methods per backend connection, and the llhttp parsers made for it that
    no response is being read by (`Spares`)."""

    def __init__(self) -> None:
        super().__init__()
        self.parser: ResponseParser | None = None
        # bound once: httptools takes each by name (`getattr`) for every parser it
        # makes, and a method looked up is a new bound object each time
        self.on_message_begin: Any = self._on_message_begin
        self.on_headers_complete: Any = self._on_headers_complete
        self.on_body: Any = self._on_body
        self.on_message_complete: Any = self._on_message_complete

    def new_parser(self) -> Any:
        return httptools.HttpResponseParser(self)

    def _on_message_begin(self) -> None:
        parser = self.parser
        assert parser is not None  # httptools calls back only within a feed
        parser.on_message_begin()

    def _on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None  # httptools calls back only within a feed
        parser.on_headers_complete()

    def _on_body(self, body: bytes) -> None:
        parser = self.parser
        assert parser is not None  # httptools calls back only within a feed
        parser.events.append(body)

    def _on_message_complete(self) -> None:
        parser = self.parser
        assert parser is not None  # httptools calls back only within a feed
        parser.on_message_complete()


class ResponseParser:
    """Parses the responses of one backend connection, one `begin` at a time.

    `for_head`: the request was HEAD; `memo`: the backend's last head (its own
    when not given)."""

    __slots__ = ("events", "complete", "upgraded", "leftover", "for_head", "last_chunk",
                 "_hp", "_parts", "_buffered", "_in_head", "_limit", "_max_fields", "_head",
                 "_error", "_framing", "_quiet", "_quiet_bytes", "_callbacks", "_memo",
                 "_rest")

    def __init__(self, limits: Limits = DEFAULT_LIMITS, for_head: bool = False,
                 callbacks: ResponseCallbacks | None = None,
                 memo: HeadMemo | None = None) -> None:
        self.events: list[Any] = []
        # httptools calls back through this (shared by a worker's parsers)
        self._callbacks = callbacks if callbacks is not None else ResponseCallbacks()
        self._limit = limits.max_header_bytes  # status line to the blank line
        self._max_fields = limits.max_headers
        self._parts: list[bytes] = []  # what was fed since the head began (joined once)
        self._hp: Any = None  # httptools.HttpResponseParser, while llhttp reads (`take`)
        self.upgraded = False
        self.leftover = b""
        self._head: ResponseHead | None = None  # the response's, until `idle`
        self._memo = memo if memo is not None else HeadMemo()
        self._rest = 0  # body bytes still due of a response llhttp does not read (`_take_repeat`)
        self._error: ProtocolError | None = None
        # A chunked response's: the end of its body for the client, trailers and all.
        self.last_chunk = LAST_CHUNK
        self._quiet: list[bytes] = []  # the reads since the last that brought body bytes
        self._quiet_bytes = 0  # what those brought but the first (trailers, chunk framing)
        # In the body of a chunked response (its trailers are watched): its framing,
        # located as llhttp reads it (its size lines bounded: `_bound_lines`). (No
        # other slot: one more moves the parser to a larger allocator size class.)
        self._framing: ChunkedBody | None = None
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
        self._head = None
        self._rest = 0
        self._hp = None  # (given back once its response ended, else dropped: module doc)

    def idle(self) -> None:
        """The response is over and the connection waits for the next request:
        drop its head (the backend's memo keeps the last read)."""
        self._head = None

    def close(self) -> None:
        """Drop the llhttp parser."""
        self._hp = None

    def head_begun(self) -> bool:
        """Whether a byte of the unfinished head came, the empty lines before it
        aside: llhttp skips those, and nothing bounds how many come (`_bound_unfinished`
        drops them), so a read of only them is no progress of the head
        (`balancer.relay.arm_head`). Looked at only after a read that left no
        event: the bytes held are at most about `max_header_bytes`."""
        return any(part.strip(b"\r\n") for part in self._parts)

    def feed(self, data: bytes) -> None:
        """Parse `data` from the backend. Raises ProtocolError."""
        more = self._read(data)
        while more:  # a mended head and what came after it (`_hold`): a loop, not
            more = self._read(more)  # recursion (a read may hold thousands of 1xx heads)

    def _read(self, data: bytes) -> bytes:
        """`feed` `data`; what to read next: a head mended and the bytes after it
        (`_hold`), else b""."""
        if self.complete:
            head = self._head
            if head is not None and not self.upgraded and data.strip(b"\r\n"):  # as llhttp,
                head.keep_alive = False  # empty lines aside
            return b""
        if self._rest:
            self._take_body(data)
            return b""
        if self._in_head:
            if not self._parts and self._take_repeat(data):
                return b""
            self._parts.append(data)
            self._buffered += len(data)
            if self._hp is HOLDING:
                return self._hold(data)
        chunked_body = self._framing is not None
        before = len(self.events) if chunked_body else 0
        callbacks = self._callbacks
        hp = self._hp
        if hp is None:
            hp = self._hp = callbacks.take()
        callbacks.parser = self
        try:
            hp.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._hp = None
            self.upgraded = True
            self.leftover = data[exc.args[0]:]
        except httptools.HttpParserError as exc:
            self._hp = None  # llhttp stays in its error state: dropped, not given back
            if self.complete and self._head.status != 101:  # 101: no "Connection: upgrade"
                # The response is whole; what followed it (HEAD: its body) was consumed.
                if not self.for_head:
                    self._head.keep_alive = False
            elif self._error is not None and self._error is not MENDED:
                raise self._error from None
            else:
                self._error = ProtocolError(502, f"invalid response from backend: {exc}")
                if not self._in_head or str(exc) not in MENDABLE:
                    raise self._error from None
                self._hp = HOLDING
                return self._hold(b"")
        else:
            callbacks.parser = None  # (after an error it is kept until the next feed)
            if self._in_head:
                if self._buffered > self._limit:
                    self._bound_unfinished()
            elif self._framing is not None:
                if chunked_body:  # (else the head's read: scanned at its end)
                    self._bound_lines(data, 0)
                moved = not chunked_body or len(self.events) - (1 if self.complete else 0) > before
                self._watch_trailers(data, moved)
            if self.complete:
                self._give_back()
        return b""

    def _hold(self, data: bytes) -> bytes:
        """The head llhttp refused (`_error`) may be mended (`MENDABLE`): once
        its end came, a new llhttp parser reads it mended (`_mended`) and the
        bytes after it (returned, for `feed` to read: b"" while it is held); a head
        as llhttp refused it again is refused (module doc).
        `data`: the read just held (b"": llhttp refused the head in the bytes
        held). The bytes held were searched: only `data` is, with the two bytes
        before it, and they are joined once, when the head's end came (bug: each
        read joined and searched them all, 4 s of CPU for a 64 KiB head dripped
        byte by byte)."""
        parts = self._parts
        if data:
            before = parts[-2][-2:]  # (each part has a byte at least)
            if len(before) < 2 and len(parts) > 2:
                before = parts[-3][-1:] + before
            window = before + data
            if b"\n\n" not in window and b"\n\r\n" not in window:
                if self._buffered > self._limit + 4:
                    raise ProtocolError(502, "backend response head too large")
                return b""
        # (llhttp skips CRs and LFs before a status line; bug: a bare LF pair
        # each was mended and parsed again, recursively: a RecursionError)
        buf = (parts[0] if len(parts) == 1 else b"".join(parts)).lstrip(b"\r\n")
        end = _blank_line(buf)
        if end < 0 or end > self._limit + 4:
            if len(buf) > self._limit + 4:
                raise ProtocolError(502, "backend response head too large")
            self._parts = [buf]
            self._buffered = len(buf)
            return b""
        head = buf[:end]
        mended = _mended(head)
        error = self._error
        assert error is not None  # (what llhttp said of the head)
        if mended == head:
            raise error
        self._error = MENDED  # (each head from now on: `on_headers_complete`)
        self._parts = []
        self._buffered = 0
        self._hp = None
        # (refused again, it is held again, and refused: mending it changes nothing)
        return mended + buf[end:]

    def _give_back(self) -> None:
        """After a read that ended the response without an error: llhttp is at a
        message boundary if the response stays keep-alive (else llhttp refuses what
        may follow: a `Connection` trailer turns it off as a head's field does, bug:
        given back, that parser failed the next response with a 502): its callbacks
        keep it for the next response."""
        hp, head = self._hp, self._head
        if hp is not None and head is not None and head.keep_alive:
            self._hp = None
            self._callbacks.give(hp)

    def _take_repeat(self, data: bytes) -> bool:
        """Take the first read of a response without llhttp if it begins with a head
        that repeats the last one's, which llhttp read as final, keep-alive and
        with a body of Content-Length bytes (llhttp's parser is at a message
        boundary, and stays there); whether it did. Skips ~4,000 instructions of
        llhttp and its callbacks per response of a backend that repeats itself."""
        last = self._memo.last
        if last is None or self.for_head or not last.says_keep_alive or self._error is not None:
            return False
        status, length, raw = last.status, last.content_length, last.raw
        if length is None or status < 200 or status == 204 or status == 304:
            return False
        if not _repeats(data, raw):
            return False
        head = ResponseHead(status, raw, True, False, self._max_fields, last)
        self._head = self._memo.last = head
        self.events.append(head)
        self._in_head = False
        self._rest = length
        end = len(raw) + 4
        if len(data) > end or not length:
            self._take_body(data, end)
        return True

    def _take_body(self, data: bytes, start: int = 0) -> None:
        """Body bytes of a response `_take_repeat` took, from `start` in `data`: the
        `_rest` still due end it, and what follows them is judged by `feed` (as
        llhttp would). Bytes to the end of `data` after `start` become a span of
        it (`balancer.spans`), not a slice: the body after its head leaves from
        the read it came in (`balancer.relay`)."""
        rest = self._rest
        events = self.events
        size = len(data) - start
        if size < rest:
            if size:
                events.append((data, start) if start else data)
                self._rest = rest - size
            return
        if rest:
            if size > rest:  # bytes follow (the connection is not reused): sliced
                events.append(data[start:start + rest])
            else:
                events.append((data, start) if start else data)
        events.append(END)
        self._rest = 0
        self.complete = True
        if size > rest:
            self.feed(data[start + rest:])

    def _bound_lines(self, data: bytes, start: int) -> None:
        """Bound each chunk size line of a chunked response, as a request's
        (`balancer.chunks`: at most `max_header_bytes`, extensions included, however
        it was split): llhttp takes extensions at any length, and the quiet-read
        bound (`_watch_trailers`) misses a line that came with body bytes (bug: a
        64 KiB extension in one read went on, re-chunked). A 502; the connection
        is not reused."""
        framing = self._framing
        assert framing is not None  # (in a chunked body)
        if framing.scan(data, start, []) == LONG_LINE:  # (once it ended: DONE, no scan)
            self._hp = None
            self._error = ProtocolError(502, "backend chunk size line too long")
            raise self._error

    def _watch_trailers(self, data: bytes, moved: bool) -> None:
        """Bound and, once the response is complete, read its trailer section.
        `moved`: this read brought body bytes (or the head)."""
        quiet = self._quiet
        if self.complete:
            self._framing = None
            raw = data if moved or not quiet else b"".join(quiet) + data
            quiet.clear()
            self.last_chunk = self._trailer_chunk(raw)
            return
        if moved:
            quiet.clear()
            self._quiet_bytes = 0
        else:
            self._quiet_bytes += len(data)
            if self._quiet_bytes > self._limit + FRAMING_ROOM:
                self._hp = None
                raise ProtocolError(502, "backend trailer section too large")
        quiet.append(data)

    def _trailer_chunk(self, raw: bytes) -> bytes:
        """The last chunk for the client, with the trailer fields that end `raw`
        (the bytes of a complete chunked response from its last read that brought
        body bytes) but those in `TRAILER_DROPPED` or named by Connection.

        Read backwards: the lines before the blank one are trailer fields (llhttp
        checked each has a name and a colon) up to the last-chunk line, ``0``
        and maybe extensions, which no field line can look like."""
        fields: list[bytes] = []
        size = 0
        end = len(raw)
        while end >= 2 and raw.endswith(b"\r\n", 0, end):
            start = raw.rfind(b"\r\n", 0, end - 2) + 2  # 0 for the first line (rfind: -1)
            line = raw[start:end - 2]
            end = start
            if not line:  # the blank line ending the message (or empty lines after it)
                if fields:
                    break
                continue
            if line[0] == 48 and line.lstrip(b"0")[:1] in (b"", b";", b" ", b"\t"):  # "0"
                return self._kept_trailers(fields)
            fields.append(line)
            size += len(line) + 2
            if size > self._limit or len(fields) > self._max_fields:
                self._hp = None
                raise ProtocolError(502, "backend trailer section too large")
        return LAST_CHUNK  # not found whole (bytes followed the response): none forwarded

    def _kept_trailers(self, fields: list[bytes]) -> bytes:
        """The last chunk with `fields` (read backwards) that may be forwarded."""
        if not fields:
            return LAST_CHUNK
        head = self._head
        tokens = head.connection_tokens if head is not None else _NO_TOKENS
        lines = [b"0"]
        for i in range(len(fields) - 1, -1, -1):
            line = fields[i]
            name = line.partition(b":")[0].lower()
            if name not in TRAILER_DROPPED and name not in tokens:
                lines.append(line)
            elif name == b"connection" and head is not None:
                # llhttp reads it as a head's: after "close" its parser refuses the
                # next response (bug: pooled, and that request got a 502)
                head.keep_alive = False
        if len(lines) == 1:
            return LAST_CHUNK
        lines.append(b"\r\n")
        return b"\r\n".join(lines)

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
        parts = self._parts
        buf = parts[0] if len(parts) == 1 else b"".join(parts)
        if buf[:1] == b"\r":
            buf = _skip_empty_lines(buf)
        memo = self._memo
        last = memo.last
        if last is not None and _repeats(buf, last.raw):
            # the last head's bytes again (a backend that repeats itself): llhttp
            # read the same status and keep-alive from them (~2,000 instructions
            # of calls into httptools and a search), and `ResponseHead` copies the rest
            raw, status, keep_alive = last.raw, last.status, last.says_keep_alive
        else:
            raw, status, keep_alive = self._read_head(buf)
        end = len(raw)
        no_body = self.for_head or status < 200 or status == 204 or status == 304
        try:
            head = ResponseHead(status, raw, keep_alive, no_body, self._max_fields, last)
        except ProtocolError as exc:
            self._error = exc
            raise
        except ValueError:
            self._error = ProtocolError(502, "invalid Content-Length from backend")
            raise self._error from None
        if self._error is MENDED:  # (bug: a final head read after a mended 1xx
            head.keep_alive = False  # in another read was kept alive)
        self._head = memo.last = head
        parts.clear()
        self._buffered = 0
        if status < 200:  # a 1xx: the next message began
            rest = buf[end + 4:]
            parts.append(rest)
            self._buffered = len(rest)
        self._in_head = False
        self.events.append(head)
        if head.chunked and not no_body:
            self.last_chunk = LAST_CHUNK
            self._quiet.clear()
            self._framing = ChunkedBody(self._limit)
            self._bound_lines(buf, end + 4)  # (what came after the head in its read)
        if self.for_head and status >= 200:
            # llhttp cannot be told "no body follows" (HEAD); the message ends here,
            # and a body the backend sent anyway must not become events after END.
            self._finish()
            if buf[end + 4:].strip(b"\r\n"):
                head.keep_alive = False
            raise _Stop

    def _read_head(self, buf: bytes) -> tuple[bytes, int, bool]:
        """The head's bytes (status line and fields, without the blank line), its
        status and whether llhttp says the connection stays open; raises ProtocolError."""
        # (find, not partition: the bytes after the head, the body most often, are
        # copied only for the two cases that look at them)
        end = buf.find(_CRLFCRLF)
        if end < 0 or end + 4 > self._limit:  # bare LFs; or one large read
            self._error = ProtocolError(502, "backend response head too large" if end >= 0
                                        else "invalid response head from backend")
            raise self._error
        hp = self._hp
        status: int = hp.get_status_code()
        if not 100 <= status <= 599:  # llhttp takes any three digits (RFC 9110 §15)
            self._error = ProtocolError(502, f"invalid status {status} from backend")
            raise self._error
        return buf[:end], status, bool(hp.should_keep_alive())

    def on_message_complete(self) -> None:
        if not self.complete:
            self._finish()

    def _finish(self) -> None:
        self.events.append(END)
        head = self._head
        status = head.status if head is not None else 0
        self.complete = status >= 200 or status == 101
        self._in_head = not self.complete




def _blank_line(buf: bytes) -> int:
    """Where the first blank line of `buf` ends (its lines ending in CRLF or a
    bare LF), or -1."""
    lf, crlf = buf.find(b"\n\n"), buf.find(b"\n\r\n")
    if lf < 0:
        return crlf + 3 if crlf >= 0 else -1
    return lf + 2 if crlf < 0 or lf < crlf else crlf + 3


def _mended(head: bytes) -> bytes:
    """`head` (to its blank line) with its lines ending in CRLF (RFC 9112 §2.2: a
    bare LF read as a line's end; a bare CR stays, for llhttp to refuse), without
    its Content-Length fields if it has a Transfer-Encoding (§6.3), else with
    its equal Content-Length fields merged into one (`balancer.lengths`)."""
    head = head.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    lines = head.split(b"\r\n")
    names = [line.partition(b":")[0].lower() for line in lines]
    if b"transfer-encoding" in names:  # (the status line has no colon: its "name"
        return b"\r\n".join(line for line, name in zip(lines, names, strict=True)  # is
                              if name != b"content-length")  # never a field's)
    merged = merged_lengths(head)
    return merged if merged is not None else head


def final_head(parser: ResponseParser) -> ResponseHead | None:
    """The final (or 101) response head among `parser`'s events, if any (the
    interim 1xx heads before it passed over)."""
    for event in parser.events:
        if isinstance(event, ResponseHead) and (event.status >= 200 or event.status == 101):
            return event
    return None
