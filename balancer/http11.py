"""Sans-IO HTTP/1.x parsing over httptools (llhttp).

No sockets here: a parser takes bytes through `feed` and appends events to
`events`, in order:

* a `RequestHead` / `ResponseHead` when a message head is complete,
* a body piece for each piece of body: `bytes`, or a `balancer.spans.Span` (the
  bytes of a read from where the body begins in it to its end): a Content-Length
  body's bytes, a chunked body's framing as it is forwarded (`balancer.chunks`),
* `END` when the message is complete.

Invariants:
* llhttp validates every byte of a request. A head is kept as its raw field
  block (`RequestHead.block`, see `balancer.fields`), found in the bytes fed:
  llhttp calls back once per head, not per field (its parser's protocol object,
  `RequestCallbacks`, has no ``on_header``), and the fields the balancer acts
  on are located once (`RequestHead.marks`, `MARKED`). A chunked request's head
  too: its body (and trailers) is read by a second parser with per-field
  callbacks (`FieldCallbacks`, for its trailers), up to its end; the requests
  after it are raw heads again.
* A request parser holds an llhttp parser only while llhttp may be inside a
  message: it takes one from its callbacks' spares (`Spares.take`) when a feed
  needs llhttp and gives it back (`Spares.give`) after a feed that was exactly
  one whole bodyless keep-alive head (`_remember`), where llhttp is between
  messages with nothing left of the last. So a parked keep-alive connection
  holds none (~550 bytes with llhttp's state and settings); a repeated head
  needs none (`repeat_head`).
* Every request line is read by one function, `RequestParser._request_line`,
  from the bytes, so the same checks (505 for any version but HTTP/1.0 and
  HTTP/1.1, RTSP and HTTP/0.9 included; HTTP/1.2 to 1.9 are HTTP/1.1) hold
  for every head.
* `ProtocolError` is the only exception `feed` raises; it carries the status
  to answer (client side) and the parser is unusable afterwards.
* Nothing that could be smuggled passes: conflicting or repeated
  Content-Length, any Transfer-Encoding but a single final ``chunked``, bad
  chunk framing, invalid header names or values, bare CR or LF, obs-fold,
  missing, repeated or invalid Host on HTTP/1.1, versions other than 1.x,
  a fragment (``#``) in the target, ``*`` but with OPTIONS.
* Memory is bounded: an unfinished head never grows past the configured
  limits, and body bytes are handed out as they arrive.
* A Content-Length body is not copied out of the reads it came in: llhttp
  counts its bytes with no callback (`RequestCallbacks` has no ``on_body``),
  and the parser, which knows where the body begins and how much of it is left
  (`_at`, `_body_left`), queues each read's part: the read itself when all of it
  is body, a span ``(read, start)`` when the body begins inside it (after its
  head) and goes on to its end, and a slice only when another message follows
  it in the same read (pipelining). Nor is a chunked body decoded: its framing
  is located in each read (`balancer.chunks`) before llhttp checks the same
  bytes, and queued as pieces of the reads, its size lines rewritten where they
  are not canonical (`FieldCallbacks` has no ``on_body``). The head's bytes are split at
  CRLFs without the body behind them (`_raw_head`): a large feed is searched
  for the head's end first.
* Limits do not depend on how the bytes were split: the feed-level counts
  bound an unfinished head (memory), and a completed head whose counts could
  be off (it began inside a feed, or that feed was large) is measured exactly.
  The head (request line to the blank line) is at most `max_header_bytes`,
  its fields at most `max_headers`, and the request line `max_request_line`.
* A chunked request's trailer fields (bounded like a head) are kept on its
  head (`RequestHead.trailers`) once the message is complete.
* An ``Upgrade: h2c`` is no upgrade here (no HTTP/2 behind a proxy of HTTP/1.x,
  as HAProxy and nginx): the token is removed, and HTTP2-Settings, its
  companion, is hop-by-hop. Nor is an ``Upgrade`` in an HTTP/1.0 request
  (RFC 9110 §7.8: ignored there): the field is cut, the request answered.
* After an Upgrade head, parsing pauses: `upgraded` is set and `leftover`
  holds the bytes after the head. `resume()` continues as HTTP (the backend
  refused the upgrade). An Upgrade request has no body: llhttp would hand the
  body over as tunnel data, so such a request is rejected. A head whose upgrade
  is none here (h2c alone, HTTP/1.0) may have one: llhttp ended its message at
  the head, and its body is read by a new raw parser (`_reframe`; a chunked
  one by the body parser, as any chunked body).
* Bytes after a request that closes the connection are ignored (RFC 9112
  §9.6); the caller closes after answering it.
* A `RequestHead` is never changed once queued, but for the trailers of a
  chunked request. A feed that was exactly one whole bodyless keep-alive head,
  fed between messages, is remembered with that head (`repeat_head`): the same
  bytes fed again between messages queue the same head object and `END`
  without llhttp (what llhttp and the checks would give again: their state
  between messages does not depend on the messages before), or, with nothing
  queued, are given by `again` without queueing anything. Any other feed
  forgets it until the parser is between messages at a feed boundary again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, NoReturn, cast

import httptools

from balancer.chunks import LAST_CHUNK, LONG_LINE, ChunkedBody
from balancer.fields import CLIENT_FIELDS, spellings
from balancer.lengths import LENGTH_DIGITS, MERGEABLE, merged_lengths

END: Final = object()  # sentinel event: the current message is complete

# Proxy-Connection: llhttp reads it as Connection (its keep-alive); we forward neither.
REQUEST_SPECIAL: Final = frozenset((b"host", b"expect", b"upgrade", b"proxy-connection"))
FRAMING: Final = frozenset((b"content-length", b"transfer-encoding", b"connection"))
# Content_Length, Transfer_Encoding: CGI-style servers (Rack's Puma, WSGI, PHP) read
# them as the framing fields they spell; one a backend frames the body by, and the
# balancer not, smuggles a request past it (CVE-2026-68006's class): refused (400)
UNDERSCORE_FRAMING: Final = spellings((b"content-length", b"transfer-encoding")) - FRAMING
SPECIAL: Final = REQUEST_SPECIAL | FRAMING | UNDERSCORE_FRAMING
# llhttp's version text → ours (a line alone): HTTP/1.2 to HTTP/1.9 are HTTP/1.1
# (RFC 9110 §2.5: a higher minor version is read as the highest one implemented)
VERSIONS: Final = {"1.1": b"1.1", "1.0": b"1.0"} | {f"1.{n}": b"1.1" for n in range(2, 10)}
VERSION_11: Final = b" HTTP/1.1"  # the end of a request line before its CRLF
VERSION_10: Final = b" HTTP/1.0"
VERSION_1X: Final = b" HTTP/1."
# RFC 3986 reg-name / IP-literal characters and ":" port: anything else in Host is a 400.
HOST_CHARS: Final = (b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                     b"-._~%!$&'()*+,;=:[]")
# Maps the bytes not in HOST_CHARS to NUL (itself not one): a Host is valid if its
# translation holds no NUL. (`translate` with deletions builds a table per call.)
NOT_HOST_TO_NUL: Final = bytes(b if b in HOST_CHARS else 0 for b in range(256))
# "#" as its byte value: `int in bytes` is a memchr, while `b"#" in bytes` first
# fails to read b"#" as an integer (an exception made and cleared: ~2,500
# instructions per request, bench_hotpath --instructions).
HASH: Final = ord("#")
# llhttp parsers a protocol object keeps for the next message (`Spares`): as many
# as messages llhttp reads at once, a message that comes in several reads holding
# its own to its end (beyond this many, made and dropped as needed).
SPARE_PARSERS: Final = 64
NO_TOKENS: Final[frozenset[bytes]] = frozenset()
# What `RequestParser._scan` returns but the host, when Host is the only special field.
NO_FRAMING: Final = (None, False, False, False, b"", NO_TOKENS)
# `connection_tokens` of the usual Connection values, without splitting them.
COMMON_TOKENS: Final = {value: frozenset((value.lower(),)) for value in (
    b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")}
# ASCII lower-casing as a `bytes.translate` table (mypyc calls translate directly)
LOWER: Final = bytes.maketrans(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"abcdefghijklmnopqrstuvwxyz")
HOP_BY_HOP: Final = frozenset((
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization",
    b"http2-settings",  # RFC 9113 §3.2.1 (HTTP/1.1 Upgrade to h2c): connection-specific
))
Field = tuple[bytes, bytes, bytes]  # (name, lower-case name, value)
Mark = tuple[bytes, int, int]  # a field of a head's block: (lower-case name, start, end)
# The fields a head's `marks` locate: those the parser checks (`SPECIAL`) and those
# balancer.forwarding drops, extends or keeps (hop-by-hop, the client fields in
# both spellings, X-Request-Id), so that no consumer reads the whole block.
# And Close: a field of that name goes when `Connection: close` names it (a reserved
# name, RFC 9110 §16.3.2.2, so seldom there), and marked, the forwarded head of
# every such request is cut at its marks, not searched whole for it (~12k
# instructions, a sixth of a new connection's, issue 21).
MARKED: Final = (SPECIAL | HOP_BY_HOP | CLIENT_FIELDS
                 | spellings((b"x-request-id", b"x-forwarded-for")) | {b"close"})


def _first_two(names: frozenset[bytes]) -> bytes:
    """A table of 65,536 bytes: 1 at ``first << 8 | second`` for the first two bytes,
    in either case, of each of `names` (all at least two bytes long)."""
    table = bytearray(65536)
    for name in names:
        for a in {name[0], bytes((name[0],)).upper()[0]}:
            for b in {name[1], bytes((name[1],)).upper()[0]}:
                table[a << 8 | b] = 1
    return bytes(table)


MAYBE_MARKED: Final = _first_two(MARKED)
NO_FIELDS: Final[tuple[Field, ...]] = ()
# The bytes a head that begins inside a feed is first looked for in (`_raw_head`).
WINDOW: Final = 4096
# A feed of at most this many bytes that was exactly one whole bodyless keep-alive
# head is remembered (`RequestParser.repeat_head`): the same bytes again give it again.
REPEAT_MAX: Final = 1024
# What a chunked body's parser reads before the body (`_Parser._to_body`): llhttp
# parses a body only after a head, and the real one was checked by the raw parser.
BODY_HEAD: Final = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
# the head a new raw parser reads before a Content-Length body llhttp left (`_reframe`)
LENGTH_HEAD: Final = b"POST / HTTP/1.1\r\nContent-Length: %d\r\n%s\r\n"
# A chunked body's part llhttp reads is copied up to this size, else viewed (`_part`).
SLICE_MAX: Final = 2048
NO_CALLBACKS: Final = object()  # httptools' protocol object for a parser that calls back nothing
CR: Final = 13
LF: Final = 10
SP: Final = 32
TAB: Final = 9
COLON: Final = 58
ZERO: Final = 48
# The largest Content-Length taken: a signed 64-bit integer's (HAProxy's, and most
# servers'; llhttp takes up to 2^64 - 1: a backend that wraps or refuses a larger
# one reads the body otherwise than the balancer). Above it: 400.
MAX_LENGTH: Final = (1 << 63) - 1


class ProtocolError(Exception):
    """A message that must not be processed; `status` is what to answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Limits:
    """Parser limits (SPEC §4), with their defaults: declared here only, the
    settings (`limits.*`) take theirs from `DEFAULT_LIMITS`."""

    max_request_line: int = 8192
    max_header_bytes: int = 65536
    max_headers: int = 100


DEFAULT_LIMITS: Final = Limits()


class RequestHead:
    """A parsed request head. `block` is its field block as received (each field
    after a CRLF, `balancer.fields`), `marks` the fields of it the balancer acts on
    (`MARKED`): (lower-case name, start, end) with `block[start:end]` the CRLF and
    the field. `headers` lists every field, read from the block on demand."""

    __slots__ = ("method", "target", "version", "block", "marks", "host", "content_length",
                 "chunked", "has_body", "keep_alive", "expect_continue", "upgrade",
                 "connection_tokens", "trailers", "chunks")

    def __init__(self, method: bytes, target: bytes, version: bytes, block: bytes,
                 marks: list[Mark], host: bytes,
                 content_length: int | None, chunked: bool, has_body: bool, keep_alive: bool,
                 expect_continue: bool, upgrade: bytes, connection_tokens: frozenset[bytes]
                 ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.block = block
        self.marks = marks
        self.host = host
        self.content_length = content_length
        self.chunked = chunked
        self.has_body = has_body  # chunked, or a Content-Length above 0
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.upgrade = upgrade
        self.connection_tokens = connection_tokens
        self.trailers = NO_FIELDS  # a chunked body's trailer fields, once it is complete
        self.chunks: ChunkedBody | None = None  # a chunked body's framing (sizes, bytes)

    @property
    def headers(self) -> list[Field]:
        """(name, lower-case name, value) of every field, in order (off the hot path:
        made at each call). Values as llhttp gives them: no blanks before them."""
        fields = []
        for line in self.block.split(b"\r\n"):
            if line:
                name, _, value = line.partition(b":")
                fields.append((name, name.translate(LOWER), value.lstrip(b" \t")))
        return fields

    def field(self, lname: bytes, lower: bytes = b"") -> bytes | None:
        """The value of the last field named `lname` (lower-case), or None (off the hot
        path: the block is searched, lower-cased here unless `lower` is that copy)."""
        block = self.block
        key = b"\r\n" + lname + b":"
        start = (lower or block.translate(LOWER)).rfind(key)
        if start < 0:
            return None
        end = block.find(b"\r\n", start + 2)
        return _value(block, start + len(key), len(block) if end < 0 else end)

    def __repr__(self) -> str:
        return f"<RequestHead {self.method.decode()} {self.target!r} host={self.host!r}>"


def declared_body(head: RequestHead) -> int:
    """The body bytes `head` announced: its Content-Length, or the sizes of its
    chunks whose size line was read so far (the limits are checked against it)."""
    chunks = head.chunks
    return chunks.declared if chunks is not None else head.content_length or 0


def mark_value(head: RequestHead, mark: Mark) -> bytes:
    """The value of one of `head.marks` (no blanks before it, as llhttp's)."""
    lname, start, end = mark
    return _value(head.block, start + 3 + len(lname), end)


def _value(block: bytes, start: int, end: int) -> bytes:
    """`block[start:end]` without the blanks it begins with (a native loop: lstrip is
    a method call)."""
    while start < end and (block[start] == SP or block[start] == TAB):
        start += 1
    return block[start:end]


def _marks(lines: list[bytes], blank: int) -> list[Mark]:
    """The `MARKED` fields (see `RequestHead.marks`) of a block split at its CRLFs:
    `lines[1:blank]` (`lines[0]`, what was before the first, is not a field). A field whose first
    two bytes begin no marked name (Accept, Referer, Sec-*...) costs a table
    lookup; the others a native loop to the colon, a slice and a set lookup."""
    marks: list[Mark] = []
    pos = 0
    for i in range(1, blank):
        line = lines[i]  # a name, ":" and a value (llhttp checked)
        end = pos + 2 + len(line)
        if line.startswith(b"Host:"):  # (the usual spelling: no slice nor set lookup)
            marks.append((b"host", pos, end))
        elif MAYBE_MARKED[(line[0] << 8) | line[1]]:
            colon = 1
            while line[colon] != COLON:
                colon += 1
            lname = line[:colon].translate(LOWER)
            if lname in MARKED:
                marks.append((lname, pos, end))
        pos = end
    return marks


def _plain_length(block: bytes, marks: list[Mark], at: int, length: int) -> bytes:
    """`block` with its Content-Length field (the mark beginning at `at`) written plainly, as
    ``Content-Length: <decimal>``, and the marks after it moved (in place). RFC 9110
    §5.5: the blanks after a value are no part of it (bug: ``2<TAB>`` was forwarded
    as it came, which a backend may refuse), and a leading zero could be read as
    octal (``010``) by a backend's ``strtol(value, 0)``. HAProxy writes the first as
    this does, and forwards the second as it came."""
    index = 0
    while marks[index][1] != at:
        index += 1
    lname, start, end = marks[index]
    field = b"\r\nContent-Length: %d" % length
    shift = len(field) - (end - start)
    marks[index] = (lname, start, start + len(field))
    for i in range(index + 1, len(marks)):
        name, after, until = marks[i]
        marks[i] = (name, after + shift, until + shift)
    return block[:start] + field + block[end:]


def connection_tokens(value: bytes) -> frozenset[bytes]:
    """The lower-case tokens of a Connection header value."""
    tokens = COMMON_TOKENS.get(value)
    if tokens is None:
        tokens = frozenset(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


# Framing fields, read the same way from requests and responses --------------------
def add_connection_tokens(tokens: frozenset[bytes], value: bytes) -> frozenset[bytes]:
    """`tokens` and those of one more Connection field `value` (it may repeat)."""
    more = connection_tokens(value.strip(b" \t"))
    return tokens | more if tokens else more


def is_chunked_only(chunked: bool, value: bytes) -> bool:
    """Whether a message whose earlier Transfer-Encoding fields made it `chunked`
    stays framed by a single, final ``chunked`` with one more field `value`:
    any other coding, or a repeated field, cannot be framed safely (smuggling).
    llhttp, which frames the body, reads ``chunked`` followed by a tab as another
    coding (a request: 400; a response: read to the close): only spaces may follow
    (bug: a response's tab was stripped here, and its body framed twice)."""
    return not chunked and value.lstrip(b" \t").rstrip(b" ").lower() == b"chunked"


def _length(value: bytes) -> int:
    """A Content-Length `value` llhttp took (digits, blanks after them) as a number;
    `MAX_LENGTH` + 1 (refused: "Content-Length too large") for one whose digits,
    leading zeros and all, are more than Python reads as a number (4,300: bug, a
    400 "User callback error"). nginx and HAProxy take such a value."""
    digits = value.rstrip(b" \t")
    if len(digits) > LENGTH_DIGITS:
        return MAX_LENGTH + 1
    return int(digits)


def _host_value(value: bytes) -> bytes:
    """A Host field's value without trailing blanks; NUL when empty (a 400 later)."""
    if value and value[-1] != 32 and value[-1] != 9:  # (rstrip is a method call)
        return value
    return value.rstrip(b" \t") or b"\0"


class _Parser:
    """The feed-level machinery of `RequestParser`: head limits, where heads begin,
    trailers.

    Two ways to read a head, one llhttp parser at a time:
    * raw (the usual): llhttp validates and calls back only at the head's end, a
      body piece and the message's end; the head's bytes are found in what was
      fed since it began (`_parts`, the first from `_start`), which is known
      because every message before it ended at a known place: at its head's end,
      or Content-Length bytes later (`_at`, `_body_left`).
    * body (`_fielded`): a chunked request's head is read raw, and checked and
      queued as any other; the raw parser, which reads on past it in the same
      feed, is then ignored (`_switching`: its callbacks return at once, its
      errors are dropped) and dropped after that feed, unless the whole request
      came in it (`_to_body`: it then ended the message on the same byte, and
      reads the requests after it). A body parser, with
      per-field callbacks (its trailers, collected as (name, lower name, value)
      triples in `_fields`; a spare one from its callbacks, where it goes back
      after a body without trailers: `_to_raw`), reads `BODY_HEAD` (a fixed
      chunked head: llhttp parses a body only after a head) and then the body
      from its first byte (`_body_at`), up to the message's end, where a raw
      parser takes over.
      Where that end is, `balancer.chunks` finds in each read before llhttp
      parses it (`_feed_chunked`): llhttp is fed up to there, must end the
      message on its last byte (else a 400), and the bytes after it go to the
      raw parser. So the body's framing is checked by llhttp exactly as if the
      head had gone before it (a chunked body's parse depends on nothing in the
      head but its Transfer-Encoding; the fields that could change it, an
      Upgrade, a Content-Length beside it, HTTP/1.0, are refused with the head).
      llhttp judges the head's framing fields after its callback returned: an
      error from the ignored raw parser is checked against the head alone
      (`_check_chunked_head`), a 400 when the head is the cause.
    """

    events: list  # in order; a list, not a deque: an empty deque holds a 528-byte block
    _callbacks: RequestCallbacks  # httptools' protocol object for raw heads
    _hp: Any  # the httptools parser (None between messages and once closed)
    _keep_alive: bool  # (RequestParser) whether the current request keeps the connection

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._head_max = limits.max_header_bytes  # request line and fields
        self._line_max = limits.max_request_line + 1  # + 1: the CR ending the line
        self.events = []
        self._head: RequestHead | None = None  # the last head parsed (trailers go there)
        # llhttp is between messages and every byte fed so far was parsed whole
        self._between = True
        self._repeat = b""  # the last feed that was exactly `repeat_head`'s bytes
        self.repeat_head: RequestHead | None = None  # what `_repeat` fed again gives
        self.repeats = 0  # how many times it was given again
        self.upgraded = False
        self.leftover = b""
        self._error: ProtocolError | None = None
        self._closed = False  # a request that closes the connection is complete
        # (closed) the head being read while `_merge` waits for its end (one slot,
        # None: one more moves the parser to a larger allocator size class)
        self._held: _Held | None = None
        # llhttp ended the message at its head, an upgrade none here, before its
        # Content-Length body (`_reframe`)
        self._unframed = False
        self._fields: list[tuple[bytes, bytes, bytes]] = []
        self._fielded = False  # llhttp calls back per field (see the class doc)
        self._idle = False  # (fields) the message ended
        self._body: ChunkedBody | None = None  # (fields) the chunked body's framing
        self._body_at = 0  # (switching) where the chunked body begins in the feed
        self._ending = False  # (fields) llhttp is fed the byte the framing ends at
        self._parts: list[bytes] = []  # (raw) the feeds since the head began
        self._start = 0  # where in `_parts[0]` it began
        self._feed = b""  # the bytes being fed (during `feed`)
        self._at = 0  # (raw) where in `_feed` the current message's body begins
        self._body_left = 0  # (raw) body bytes from `_at` to the message's end
        self._switching = False  # (raw) a chunked head ended in the feed: `_to_body`
        self._head_line = b""  # (raw) the request line of the last chunked head
        self._raw_ended = False  # (raw, switching) the ignored raw parser ended a message
        self._raw_kept: Any = None  # (fields) the raw parser after the body (`_to_body`)
        self._begin()

    def _begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0  # bytes fed since the head began at a feed boundary
        self._line_done = False
        self._quiet_bytes = 0  # body-phase bytes that produced no event (framing, trailers)

    def on_header(self, name: bytes, value: bytes) -> None:
        # (fields) Only collect here; the head is checked once it is complete.
        # After the head, fields are trailers: validated by llhttp, checked at the end.
        self._fields.append((name, name.translate(LOWER), value))

    def _fail(self, status: int, reason: str) -> NoReturn:
        self._error = ProtocolError(status, reason)
        raise self._error

    def again(self, data: bytes) -> RequestHead | None:
        """`repeat_head` if `data` brings it again with no event queued: what `feed`
        would queue then (it and END) and the caller take at once, without
        the list (appended to empty, its array is allocated; emptied, freed:
        ~300 instructions a request). None: `feed` it."""
        repeat = self.repeat_head
        if self._between and repeat is not None and data == self._repeat and not self.events:
            self.repeats += 1
            return repeat
        return None

    def feed(self, data: bytes) -> None:
        """Parse `data`; events are appended to `events`. Raises ProtocolError.
        One step per parser that reads a part of it (`_step`): a step that hands
        the rest to another (a chunked body's, the raw one after it, a merged
        head's) says where in `data` the next one begins. A loop over offsets:
        neither recursion nor a copy of the rest per message (bug: each pipelined
        chunked request or merged head re-fed a copy of the rest of the read,
        recursively: quadratic, and a RecursionError at ~1,000 in one read)."""
        between, repeat = self._between, self.repeat_head
        if between and repeat is not None and data == self._repeat:  # again: module doc
            self.repeats += 1
            events = self.events
            events.append(repeat)
            events.append(END)
            return
        at = self._step(data, 0, between)
        while at >= 0:
            at = self._step(data, at, False)

    def _step(self, data: bytes, off: int, between: bool) -> int:
        """Parse `data` from `off` (a message boundary, or a body's first byte,
        when above 0) with the current parser; where in `data` the next step
        begins, or -1 when every byte was read."""
        if self._closed:
            if self._held is not None:  # (a head with a repeated Content-Length: `_merge`)
                return self._hold(data)
            return -1
        self._between = False
        in_head = self._in_head
        fielded = self._fielded
        before = len(self.events)
        if not in_head:
            events = self.events
            quiet = len(events)
        elif off:  # a head begins at `off` (`_raw_head` measures it exactly)
            self._parts = [data]
            self._start = off
            self._head_bytes = len(data) - off
        else:
            self._parts.append(data)  # (never fielded: that parser reads bodies only)
            self._head_bytes += len(data)
        self._feed = data
        self._at = off
        callbacks: _Callbacks = self._callbacks.fields if fielded else self._callbacks
        callbacks.parser = cast(RequestParser, self)  # the only kind of `_Parser`
        end = -1  # (fields) where in `data` the message ended
        kept: Any = None  # (fields) the raw parser for after the body, in this feed only
        try:
            if fielded:
                kept, self._raw_kept = self._raw_kept, None
                end = self._feed_chunked(data, off)
            else:
                hp = self._hp
                if hp is None:  # (given back between messages: `_remember`)
                    hp = self._hp = self._callbacks.take()
                hp.feed_data(_part(data, off, len(data)) if off else data)
        except httptools.HttpParserUpgrade as exc:
            if self._switching:  # (bytes after a chunked head: the body parser reads them)
                return self._to_body(False)
            if self._unframed:
                return self._reframe(data, off + exc.args[0])
            self.upgraded = True
            self.leftover = data[off + exc.args[0]:]
        except httptools.HttpParserError as exc:
            if self._switching:  # (the same, once the head is known to be llhttp's: it
                if not self._raw_ended:  # is, when the raw parser ended its message)
                    self._check_chunked_head()
                return self._to_body(False)
            if self._error is not None:
                raise self._error from None
            if self._closed:  # llhttp refuses bytes after "Connection: close"
                return -1
            reason = str(exc)
            if reason in MERGEABLE and not fielded:
                return self._merge(reason, data)
            raise ProtocolError(400, reason) from None
        callbacks.parser = None  # (after an error it is kept until the next feed)
        if self._switching:  # a chunked head ended in `data`: its body parser reads on
            return self._to_body(True)
        self._feed = b""
        if fielded:
            if end >= 0 and not self._closed and not self.upgraded:
                self._to_raw(kept if end == len(data) else None)
                if end < len(data):  # the next request, read raw from here
                    return end
        elif not self._in_head:  # in a body framed by Content-Length: its piece here
            at = self._at
            if at < len(data) and self._body_left:  # (not after an Upgrade head)
                self.events.append((data, at) if at else data)
            self._body_left -= len(data) - at
        if self._in_head:
            if self._parts and not self._line_done:
                # (raw) an unfinished head's line, bounded after llhttp read it (a whole
                # head is measured exactly, without this search: its `_parts` are gone)
                self._check_line(data)
            if self._head_bytes > self._head_max:
                raise ProtocolError(431, "request head too large")
            if between:
                self._remember(data, before)
            return -1
        if not in_head:
            self._quiet_bytes = self._quiet_bytes + len(data) if quiet == len(events) else 0
        if self._quiet_bytes or self._fields:
            self._check_quiet()
        return -1

    def _merge(self, reason: str, data: bytes) -> int:
        """llhttp refused a repeated or listed Content-Length (`reason`) in the head
        being read (`data` its last part): it is merged at once if it ended in
        `data` (`_release`), else its bytes so far are held (`_held`; the parser is
        `_closed` to `feed` meanwhile) until it is whole (`_hold`). Returns where
        the next step begins in `data` (`_step`)."""
        parts = self._parts
        buf = parts[0] if len(parts) == 1 else b"".join(parts)
        start = self._start
        while start < len(buf) and (buf[start] == CR or buf[start] == LF):
            start += 1  # (llhttp skips empty lines before a request)
        self._held = _Held([], reason)
        self._hp = None  # (llhttp stays in its error state: dropped)
        self._parts = []
        self._closed = True
        return self._release(buf, start, data)

    def _hold(self, data: bytes) -> int:
        """Hold `data` after a head `_merge` holds, until the head is whole
        (`_release`). The bytes held are joined once, when the head's end came."""
        assert self._held is not None  # (`_merge` holds a head)
        held = self._held.parts
        window = b"".join(held[-3:])[-3:] + data  # (each part has a byte at least)
        held.append(data)
        self._head_bytes += len(data)
        if b"\r\n\r\n" not in window:
            self._bound_held()
            return -1
        return self._release(b"".join(held), 0, data)

    def _release(self, whole: bytes, start: int, data: bytes) -> int:
        """The held head begins at `start` in `whole`, whose last bytes are `data`:
        once its end is there, it is parsed again with its Content-Length fields
        merged (`balancer.lengths`), as a read of its own, and the next step reads
        `data` from its end (`_step`); or it is refused (llhttp's reason; 431 past
        the head limit, as any head). -1 while it is not whole."""
        assert self._held is not None  # (`_merge` holds a head)
        end = whole.find(b"\r\n\r\n", start, start + self._head_max + 4)
        if end < 0:
            self._held.parts = [whole[start:start + self._head_max + 5]]
            self._head_bytes = len(whole) - start
            self._bound_held()
            return -1
        head = merged_lengths(whole[start:end + 4])
        if head is None:
            self._fail(400, self._held.reason)
        self._held = None
        self._closed = False
        self._hp = self._callbacks.take()
        self._start = 0
        self._begin()
        self._step(head, 0, False)  # (a whole head: it reads no further, `_reframe` too)
        after = end + 4 - (len(whole) - len(data))  # (its end is in `data`: llhttp
        return after if after < len(data) else -1  # refused a field of it there)

    def _bound_held(self) -> None:
        if self._head_bytes > self._head_max + 4:
            self._fail(431, "request head too large")

    def _check_line(self, data: bytes) -> None:
        """The request line of the unfinished head `data` ends: 414 past the limit,
        whether the head began at a feed boundary or inside `data` (after another
        message: bug, its line was never measured, and a 431 came at the head
        limit instead)."""
        start, fed = 0, self._head_bytes - len(data)  # (its bytes before `data`)
        if len(self._parts) == 1:  # it began in `data`, at `_start`
            start, fed = self._start, 0
        if not fed:  # none of its line yet: the empty lines llhttp skips before a
            skipped = start  # request are no part of it (nor of the head's bytes)
            while start < len(data) and (data[start] == CR or data[start] == LF):
                start += 1
            self._head_bytes -= start - skipped
            if start == len(data):  # no head yet: its bytes are not kept (bug: each
                self._parts = []  # read of empty lines was, unbounded; nginx drops
                self._start = 0  # them too)
                return
        end = data.find(b"\n", start)
        if fed + (len(data) if end < 0 else end) - start > self._line_max:
            self._fail(414, "request line too long")
        self._line_done = end >= 0

    def _feed_chunked(self, data: bytes, start: int) -> int:
        """Feed `data` from `start` to the field parser, its chunked body located first
        (`balancer.chunks`): llhttp must end the message exactly where the framing
        does (at its last byte, not before) or not at all if it goes on (else a
        400), and only then are its pieces queued (after its head, which llhttp
        may have queued; then `LAST_CHUNK` unless the framing had it or trailers
        end it, and `END`). Returns where in `data` the message ended, or -1 if it
        goes on."""
        body, hp = self._body, self._hp
        assert body is not None  # (fields) set with the field parser
        pieces: list = []
        end = body.scan(data, start, pieces)
        if end == LONG_LINE:
            self._fail(400, "chunk size line too long")
        self._ending = False
        if end < 0:
            hp.feed_data(_part(data, start, len(data)))
        else:
            if end - 1 > start:
                hp.feed_data(_part(data, start, end - 1))
            self._ending = True  # (`on_message_complete` refuses to end the message before)
            hp.feed_data(data[end - 1:end])  # (one byte: CPython's cached bytes object)
            if not self._idle:
                self._fail(400, "chunked body framing not understood")
        events = self.events
        events.extend(pieces)
        if end >= 0:  # (`_end_chunked` ended the message)
            head = self._head
            assert head is not None  # (fields) set with the head
            if not head.trailers and not body.whole_end:
                events.append(LAST_CHUNK)  # (trailers: `forwarding.last_chunk` ends the body)
            events.append(END)
        return end

    def _to_body(self, clean: bool) -> int:
        """After a chunked head ended in the bytes fed (raw, `_switching`): a body
        parser, with field callbacks for the trailers, reads the body from
        `_body_at`, which is returned (the next `_step`'s start; see the class
        doc). The raw parser, which read on past the head (what it made of the
        rest was ignored; at the next head after the message it ended, the body
        is read and it reads on: `_read_on`), is dropped, but when it read all of
        them with no error (`clean`) and ended a message in them: if the body
        parser ends the message at the end of `data` too, the raw parser reads the
        requests after it (`_raw_kept`). It then ended that message on the same
        byte, and is between messages: both parsed the same body bytes from the
        same state (a chunked body's parse depends on nothing in the head but its
        Transfer-Encoding, which llhttp read as chunked, or it would have failed)."""
        self._switching = False
        self._callbacks.parser = None
        self._feed = b""
        self._raw_kept = self._hp if clean and self._raw_ended else None
        self._raw_ended = False
        self._body_parser()
        return self._body_at

    def _body_parser(self) -> None:
        """A body parser (`_fielded`, a spare one) past `BODY_HEAD`, for the body
        at `_body_at`."""
        callbacks = self._callbacks.fields
        hp = self._hp = callbacks.take()
        self._fielded = True
        callbacks.parser = cast(RequestParser, self)
        hp.feed_data(BODY_HEAD)  # (its head is ignored: `on_headers_complete`)
        callbacks.parser = None
        self._parts = []
        self._fields = []

    def _read_on(self) -> None:
        """(switching) The ignored raw parser ended the chunked message and came
        to the end of the next head in the same feed: the body parser reads the
        body now, to where its framing ends (`_feed_chunked`, which queues it and
        `END`), and the raw parser, which ended the message on the same byte
        (`_to_body`), reads on: the next head is read from there as any. Bug: the
        raw parser was stopped there by an error raised in its callback and a new
        one made for the rest of the feed, each pipelined chunked request ~5 times a GET's
        cost. (No next head after a request that closes: llhttp refuses it.)"""
        data, raw = self._feed, self._hp
        self._switching = self._raw_ended = False
        self._callbacks.parser = None
        self._body_parser()
        fields = self._callbacks.fields
        fields.parser = cast(RequestParser, self)
        end = self._feed_chunked(data, self._body_at)
        fields.parser = None
        if end < 0:  # (llhttp ended the message before: `_end_chunked` refused it)
            self._fail(400, "chunked body framing not understood")
        head = self._head
        assert head is not None  # (fields) set with the head
        if not head.trailers:  # (`_to_raw`)
            fields.give(self._hp)
        self._hp = raw
        self._fielded = self._idle = False
        self._callbacks.parser = cast(RequestParser, self)
        self._feed = data
        self._parts = [data]
        self._start = end
        self._head_bytes = len(data) - end

    def _reframe(self, data: bytes, at: int) -> int:
        """After a head llhttp read as an upgrade's, which is none here (h2c
        alone, HTTP/1.0: `_check_upgrade`), with a Content-Length body: llhttp
        ended the message at the head (`at` in `data`) and would read the body as
        tunnel data. A new raw parser reads `LENGTH_HEAD` (ignored: `_unframed`)
        with the same length and keep-alive, then the body from `at` and the
        requests after it, as after any head with that body. Returns where the
        next `_step` begins (`at`), -1 at the end of `data`."""
        callbacks = self._callbacks
        hp = self._hp = callbacks.take()
        callbacks.parser = cast(RequestParser, self)
        hp.feed_data(LENGTH_HEAD % (self._body_left,
                                    b"" if self._keep_alive else b"Connection: close\r\n"))
        callbacks.parser = None
        self._unframed = False
        self._feed = b""
        return at if at < len(data) else -1

    def _check_chunked_head(self) -> None:
        """The raw parser refused something after a chunked head it called back for:
        if it was the head itself (llhttp checks the framing fields once the head's
        callback returned: a Transfer-Encoding it does not read as chunked, such as
        ``chunked<TAB>``), a 400; else (the body, or the bytes after it) the body
        parser and the raw parser after it find it again. (Errors only: a new parser
        reads the head alone.)"""
        head = self._head
        assert head is not None  # (switching) set with the head
        try:
            new_llhttp(NO_CALLBACKS).feed_data(
                self._head_line + head.block + b"\r\n\r\n")
        except httptools.HttpParserError as exc:
            self._fail(400, str(exc))

    def _to_raw(self, raw: Any) -> None:
        """The chunked message ended (fields): a raw parser reads the next, `raw`
        if given (`_to_body`), and the body parser, between messages, is kept for
        the next chunked body (`Spares`); neither after trailer fields (a
        ``Connection: close`` among them leaves llhttp closed)."""
        head = self._head
        if head is not None and not head.trailers:
            self._callbacks.fields.give(self._hp)
        else:
            raw = None
        self._hp = raw if raw is not None else self._callbacks.take()
        self._fielded = self._idle = False
        self._parts = []
        self._start = 0

    def _remember(self, data: bytes, before: int) -> None:
        """After a feed that began between messages: if `data` was exactly one whole
        bodyless keep-alive head (it queued two events and ended in a head: that
        head, the last parsed, and END; and it ends the head with CRLF CRLF: no byte
        of a next message follows), remember it."""
        head, size = self._head, len(data)
        self.repeats = 0
        if (head is None or len(self.events) != before + 2 or size > REPEAT_MAX or size < 4
                or data[size - 1] != LF or data[size - 2] != CR
                or data[size - 3] != LF or data[size - 4] != CR
                or not head.keep_alive or head.has_body or head.upgrade or self.upgraded):
            self._repeat, self.repeat_head = b"", None
            return
        self._between = True
        self._repeat, self.repeat_head = data, head
        hp = self._hp  # between messages, nothing left of this one: given back
        if hp is not None:
            self._hp = None
            self._callbacks.give(hp)

    def _check_quiet(self) -> None:
        """Bound body-phase bytes that produced no event: a chunk size line (its
        extensions; each is bounded too: `balancer.chunks`), trailers.

        httptools buffers a trailer field whole until it ends (bug: unbounded, with
        quadratic copies); complete trailer fields are kept until the message ends.
        A 400, not a 431, as HAProxy: a body's framing is no head (bug: a 431, a
        head's status, came in the middle of a body).
        """
        if self._quiet_bytes > self._head_max or len(self._fields) > self.limits.max_headers:
            self._fail(400, "chunk size line or trailer section too large")

    def _check_trailers(self) -> tuple[Field, ...]:
        """The trailer fields of the message that ends; 400 over the head limits
        (`_check_quiet`)."""
        fields = self._fields
        size = sum(len(name) + len(value) + 4 for name, _, value in fields)
        if size > self._head_max or len(fields) > self.limits.max_headers:
            self._fail(400, "chunked trailer section too large")
        self._fields = []
        return tuple(fields)

    def forget_repeat(self) -> None:
        """Keep no repeated head (memory): the next whole one is remembered again."""
        self._repeat, self.repeat_head, self.repeats = b"", None, 0

    def close(self) -> None:
        """Drop the httptools parser (it references this object: a cycle); what is
        fed from now on is ignored (`feed` would take another: `Spares`)."""
        self._hp = None
        self._between = False
        self._closed = True
        self._parts = []
        self._held = None


class _Held:
    """A head `_Parser._merge` holds: its bytes so far, and why llhttp refused it."""

    __slots__ = ("parts", "reason")

    def __init__(self, parts: list[bytes], reason: str) -> None:
        self.parts = parts
        self.reason = reason


def _part(data: bytes, start: int, end: int) -> Any:
    """`data[start:end]` for llhttp to read: `data` itself, a copy when it is small
    (SLICE_MAX: a memoryview and its slice cost ~1,400 instructions, a copy of
    2 KiB ~100), else a memoryview of it."""
    if not start and end == len(data):
        return data
    if end - start <= SLICE_MAX:
        return data[start:end]
    return memoryview(data)[start:end]


def new_llhttp(protocol: object) -> Any:
    """An llhttp request parser calling back `protocol`, with two leniencies, each
    as nginx and HAProxy read requests (bug: a 400 for each):
    * blanks (SP, HTAB) after a chunk size: RFC 9112 §7.1.1's BWS before a chunk
      extension's ";" (``3 ;ext``), and so ``3<SP>`` alone too. Never forwarded
      so: such a size line goes as its size alone (`balancer.chunks`).
    * any version ``HTTP/D.D``: HTTP/1.2 to 1.9 are read as HTTP/1.1 (RFC 9110
      §2.5), others get 505 (`RequestParser._request_line`), as HTTP/2.0 did."""
    hp = httptools.HttpRequestParser(protocol)
    hp.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True, lenient_version=True)
    return hp


class Spares:
    """What a protocol object keeps of the llhttp parsers made for it: those no
    message is being read by (`spare`, at most SPARE_PARSERS), each between
    messages with nothing left of its last, for the next `take`."""

    def __init__(self) -> None:
        self.spare: list[Any] = []

    def new_parser(self) -> Any:
        """A new llhttp parser calling back this object."""
        raise NotImplementedError

    def take(self) -> Any:
        """An llhttp parser at a message boundary (a spare one, else a new one)."""
        spare = self.spare
        if spare:
            return spare.pop()
        return self.new_parser()

    def give(self, hp: Any) -> None:
        """Keep `hp`, between messages with nothing left of its last, for the next
        `take` (unless SPARE_PARSERS are kept already)."""
        spare = self.spare
        if len(spare) < SPARE_PARSERS:
            spare.append(hp)


class _Callbacks(Spares):
    """What both kinds of protocol object call back: each callback goes to the
    parser being fed (`parser`, set by `feed` around httptools' ``feed_data``)."""

    def __init__(self) -> None:
        super().__init__()
        self.parser: RequestParser | None = None
        # bound once: httptools takes each by name (`getattr`) for every parser it
        # makes, and a method looked up is a new bound object each time. No
        # ``on_body``: a raw parser's bodies have a Content-Length, queued by
        # `_Parser.feed` without a copy (module doc); `FieldCallbacks` has one.
        self.on_headers_complete: Any = self._on_headers_complete
        self.on_message_complete: Any = self._on_message_complete

    def new_parser(self) -> Any:
        return new_llhttp(self)

    def _on_headers_complete(self) -> None:
        parser = self.parser
        assert parser is not None  # httptools calls back only within a feed
        parser.on_headers_complete()

    def _on_message_complete(self) -> None:
        parser = self.parser
        assert parser is not None  # httptools calls back only within a feed
        parser.on_message_complete()


class FieldCallbacks(_Callbacks):
    """The protocol object of a parser that reads a chunked request's body and its
    trailers field by field (`_Parser`), after `BODY_HEAD`; its head was read raw."""

    def __init__(self) -> None:
        super().__init__()
        self.on_header: Any = self._on_header  # (no ``on_body``: `balancer.chunks`)

    def _on_header(self, name: bytes, value: bytes) -> None:
        parser = self.parser
        assert parser is not None  # httptools calls back only within a feed
        parser.on_header(name, value)


class RequestCallbacks(_Callbacks):
    """httptools' protocol object for request parsers reading raw heads: it has no
    ``on_header`` (nor ``on_url``, ``on_message_begin``), so httptools makes no
    bytes and no call per field; `fields` is the one for field by field reading.

    httptools binds a protocol's callbacks when a parser is made: bound to the
    `RequestParser` itself they were six bound methods per connection (72 bytes
    each, and a reference cycle). A gevent worker's parsers share one of these
    (`balancer.connection.Context.request_callbacks`): one thread, and a feed
    runs to its end without switching greenlets, so the parser being fed is the
    one called back. Elsewhere (the threaded baseline) each parser has its own."""

    def __init__(self) -> None:
        super().__init__()
        self.fields = FieldCallbacks()


class RequestParser(_Parser):
    """Parses requests from a client; pipelined requests queue up in order."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS,
                 callbacks: RequestCallbacks | None = None) -> None:
        # httptools calls back through this (shared by a worker's parsers: `RequestCallbacks`)
        self._callbacks = callbacks if callbacks is not None else RequestCallbacks()
        super().__init__(limits)
        self._max_headers = limits.max_headers
        self._keep_alive = True
        self._valid_host: bytes | None = None  # the last Host found valid (not empty)
        self._hp = None  # taken by the first feed

    def resume(self) -> None:
        """Continue parsing HTTP after an upgrade the peer did not accept."""
        leftover, self.leftover, self.upgraded = self.leftover, b"", False
        self._hp = self._callbacks.take()
        self._fielded = self._idle = False
        self._between = False  # (no head to repeat: an Upgrade head is never remembered)
        self._fields = []
        self._parts = []
        self._start = 0
        self._begin()
        if leftover:
            self.feed(leftover)

    # httptools callbacks, through `RequestCallbacks` / `FieldCallbacks` ----------
    def on_headers_complete(self) -> None:
        """Check the head, in the order of the errors it can raise, and queue it."""
        # `BODY_HEAD`, after a chunked head, or `LENGTH_HEAD`
        if self._fielded or self._switching or self._unframed:
            if not (self._raw_ended and self._switching):
                return
            self._read_on()  # the head after a chunked message, in its feed
        method, url, version, lines, blank, block = self._raw_head()
        marks = _marks(lines, blank)
        count = blank - 1
        self._parts = []
        if count > self._max_headers:
            self._fail(431, "too many headers")
        self._fields = []  # the trailers, if any
        if len(marks) == 1 and marks[0][0] == b"host":  # the usual head: no framing,
            mark = marks[0]  # Connection, Upgrade or Expect field
            plain, host = True, _host_value(_value(block, mark[1] + 7, mark[2]))
            content_length, chunked, has_body, expect_continue, upgrade, tokens = NO_FRAMING
        else:
            (plain, host, content_length, chunked, has_body, expect_continue, upgrade,
             tokens, block) = self._scan(block, marks)
        if method == b"CONNECT":
            self._fail(501, "CONNECT is not supported")
        if url[:1] == b"/" and HASH not in url:
            target = url
        else:
            host, target = self._other_target(method, url, host, version)
        if host != self._valid_host:  # (a keep-alive client's Host is checked once)
            if host and 0 not in host.translate(NOT_HOST_TO_NUL):
                self._valid_host = host
            else:
                self._check_host(host, version)
        if version == b"1.0":
            if chunked:
                self._fail(400, "Transfer-Encoding in an HTTP/1.0 request")
            expect_continue = False  # RFC 9110 §10.1.1: ignored in HTTP/1.0
        hp = self._hp
        if plain:  # what llhttp would say without Upgrade and (Proxy-)Connection fields
            keep_alive = version == b"1.1"
        else:
            if hp.should_upgrade():
                upgrade = self._check_upgrade(upgrade, has_body, version)
                # (bug: a curl --http2 upload, h2c and a body, got a 400)
                self._unframed = bool(content_length) and not chunked
            else:
                upgrade = b""
            keep_alive = hp.should_keep_alive()
        self._keep_alive = keep_alive
        self._in_head = False
        self._body_left = content_length or 0
        self._head = head = RequestHead(
            method, target, version, block, marks, host, content_length, chunked, has_body,
            keep_alive, expect_continue, upgrade, tokens)
        if chunked:  # its body is read by another parser (class doc), from here
            self._head_line = lines[0]  # (`_check_chunked_head`)
            self._body = head.chunks = ChunkedBody(self._head_max)
            self._body_at = self._at
            self._switching = True
        self.events.append(head)

    def _raw_head(self) -> tuple[bytes, bytes, bytes, list[bytes], int, bytes]:
        """Method, target, version (`_request_line`), lines (the request
        line, then each field, then what follows the head) with the index of its
        blank line, and field block of the head that just ended, read
        from the bytes fed since it began (`_Parser`); `_at` is set to its end in
        the current feed. Raises the size limits' errors. (One `split`, which takes
        its arguments directly: `find` parses a tuple of them, ~700 instructions a
        call.)"""
        parts, feed = self._parts, self._feed
        buf = parts[0] if len(parts) == 1 else b"".join(parts)
        start = self._start
        total = len(buf)
        while start < total and (buf[start] == CR or buf[start] == LF):  # llhttp skips them
            start += 1
        # split at CRLFs up to the field limit (a body after the head stays one piece):
        # [request line, field..., b"" (the blank line), what follows]; a head that does
        # not begin the bytes is split from a copy of the next 4 KiB first, then of all
        # the head may be (pipelined heads: no copy of the whole rest for each)
        room = total - start
        size = room if not start else min(room, WINDOW)
        if room > WINDOW:  # a body may follow: split the head alone (no copy of the rest)
            found = buf.find(b"\r\n\r\n", start, start + self._head_max + 4)
            if found >= 0:
                size = found + 4 - start
        while True:
            window = buf if size == total else buf[start:start + size]
            lines = window.split(b"\r\n", self._max_headers + 2)
            blank = 1
            count = len(lines)
            # (the last piece of a window that ends before the bytes do may go on
            # past it: empty, it is a field's CRLF there, not the blank line)
            ends = count if size == room else count - 1
            while blank < ends and len(lines[blank]):
                blank += 1
            if blank < ends or size == room or size >= self._head_max + 4:
                break
            size = min(room, self._head_max + 4)
        if blank >= ends:  # no blank line in the split (HTTP/0.9: a line alone)
            if VERSIONS.get(self._hp.get_http_version()) is None:
                self._fail(505, "HTTP version not supported")
            if count > self._max_headers + 2:  # the split's limit
                self._fail(431, "too many headers")
            self._fail(431, "request head too large")
        line = lines[0]
        length = len(line)
        end = length  # the head's bytes but its blank line
        for i in range(1, blank):
            end += 2 + len(lines[i])
        after = len(feed) - (total - start - end - 4)  # the head's end in the current feed
        if after < 0:
            self._fail(400, "request head not found")  # (llhttp read another: never)
        self._at = after
        if length > self.limits.max_request_line:
            self._fail(414, "request line too long")
        if end + 4 > self._head_max:
            self._fail(431, "request head too large")
        method, target, version = self._request_line(line)
        return method, target, version, lines, blank, window[length:end]

    def _request_line(self, line: bytes) -> tuple[bytes, bytes, bytes]:
        """Method, target and version of a request `line` llhttp accepted (without its
        CRLF): every head's, whichever way its fields are read (module doc). 505 for
        any version but HTTP/1.0 and HTTP/1.1 (HTTP/1.2 to 1.9 read as HTTP/1.1):
        llhttp takes HTTP/0.9, HTTP/2.0, any D.D (`new_llhttp`), RTSP/1.0 and
        ICE/1.0 (SOURCE) too."""
        # (LF as its byte value, as HASH: `b"\n" in line` made and cleared a TypeError)
        if LF in line:  # an HTTP/0.9 line ending in a bare LF: the next line, with its
            self._fail(505, "HTTP version not supported")  # field, is not this one's end
        if line.endswith(VERSION_11):
            version = b"1.1"
        elif line.endswith(VERSION_10):
            version = b"1.0"
        elif line[-9:-1] == VERSION_1X and ZERO + 2 <= line[-1] <= ZERO + 9:
            version = b"1.1"  # HTTP/1.2 to 1.9: as HTTP/1.1 (`VERSIONS`; bug: a 400)
        else:
            self._fail(505, "HTTP version not supported")
        method_end = 0
        while line[method_end] != SP:  # (native loops: a method has a few bytes)
            method_end += 1
        first, last = method_end + 1, len(line) - 9  # before " HTTP/1.1"
        while line[first] == SP:  # llhttp takes several spaces between the parts
            first += 1
        while last > first and line[last - 1] == SP:
            last -= 1
        return line[:method_end], line[first:last], version

    def _scan(self, block: bytes, marks: list[Mark]) -> tuple[
            bool, bytes, int | None, bool, bool, bool, bytes, frozenset[bytes], bytes]:
        """Check the special fields of the head, in order; returns whether Host was the
        only one, and what they set: host, content_length, chunked, has_body,
        expect_continue, upgrade, connection_tokens, and the block (`block`, or
        a copy with its Content-Length value made plain: `_plain_length`)."""
        host = upgrade = b""
        content_length = None
        odd = -1  # where a Content-Length field not written plainly begins in `block`
        chunked = expect_continue = False
        tokens = NO_TOKENS
        specials = 0
        for lname, start, end in marks:
            if lname not in SPECIAL:
                continue
            specials += 1
            value = _value(block, start + 3 + len(lname), end)
            if lname == b"host":
                if host:
                    self._fail(400, "repeated Host header")
                host = _host_value(value)
            elif lname == b"proxy-connection":
                continue  # llhttp's keep-alive reads it
            elif lname == b"connection":
                tokens = add_connection_tokens(tokens, value)
            elif lname == b"content-length":
                if content_length is not None:
                    self._fail(400, "repeated Content-Length")
                content_length = _length(value)
                if content_length > MAX_LENGTH:
                    self._fail(400, "Content-Length too large")
                if value[-1] == SP or value[-1] == TAB or (value[0] == ZERO and len(value) > 1):
                    odd = start
            elif lname == b"transfer-encoding":
                if not is_chunked_only(chunked, value):
                    self._refuse_codings(block, marks)
                chunked = True
            elif lname == b"expect":
                expect_continue = self._expectation(value) or expect_continue
            elif lname == b"upgrade":
                upgrade = value.strip()
            else:  # UNDERSCORE_FRAMING
                self._fail(400, "framing field spelt with an underscore")
        if chunked:
            content_length = None
        elif odd >= 0:
            block = _plain_length(block, marks, odd, content_length or 0)
        has_body = chunked or bool(content_length)
        plain = specials == 1 and bool(host)
        return (plain, host, content_length, chunked, has_body, expect_continue, upgrade, tokens,
                block)

    def _refuse_codings(self, block: bytes, marks: list[Mark]) -> NoReturn:
        """Refuse a Transfer-Encoding other than a single ``chunked``: 501 for a
        coding the balancer does not take before a final ``chunked``, else 400 (RFC
        9112 §6.1: with ``chunked`` not last, or applied twice, the body's length
        cannot be known; bug: ``gzip`` alone got a 501; ``chunked`` and a tab, which
        llhttp does not read as chunked, is no other coding: 400, also after
        ``gzip,``, which got a 501)."""
        codings = [token.lstrip(b" \t").rstrip(b" ").translate(LOWER)  # (`is_chunked_only`)
                   for mark in marks if mark[0] == b"transfer-encoding"
                   for token in _value(block, mark[1] + 3 + len(mark[0]), mark[2]).split(b",")]
        codings = [coding for coding in codings if coding]
        if len(codings) > 1 and codings[-1] == b"chunked" and codings.count(b"chunked") == 1:
            self._fail(501, "unsupported Transfer-Encoding")
        self._fail(400, "Transfer-Encoding does not end with a single chunked")

    def _expectation(self, value: bytes) -> bool:
        """Whether an Expect field `value` asks for 100-continue; 417 for any other
        member. Its empty list elements are ignored (RFC 9110 §5.6.1.2; bug:
        ``100-continue,`` and an empty Expect, no expectation at all, got a 417)."""
        if value.strip().lower() == b"100-continue":  # (the usual value: no split)
            return True
        members = [m for m in value.translate(LOWER).split(b",") if m.strip(b" \t")]
        for member in members:
            if member.strip(b" \t") != b"100-continue":
                self._fail(417, "unsupported Expect")
        return bool(members)

    def _other_target(self, method: bytes, url: bytes, host: bytes,
                      version: bytes) -> tuple[bytes, bytes]:
        """The host and target of a request whose target is not a plain origin-form:
        ``OPTIONS *`` (RFC 9112 §3.2.4: no other method), or absolute-form, which
        an HTTP/1.1 request sends with a Host all the same (§3.2: else a 400;
        bug: it was served). A fragment is in no request target (§3.2): a cache
        or router behind could read ``/index.html#.png`` otherwise than the
        backend (HAProxy refuses it). The target's authority routes an
        absolute-form request, but its Host must be valid all the same (§3.2; bug:
        any value was served), or empty (NUL here, `_host_value`)."""
        if HASH in url:
            self._fail(400, "fragment in the request target")
        if url == b"*":
            if method != b"OPTIONS":
                self._fail(400, "* is a target of OPTIONS only")
            return host, url
        if not host and version == b"1.1":
            self._fail(400, "missing Host header")
        if host and host != b"\0" and 0 in host.translate(NOT_HOST_TO_NUL):
            self._fail(400, "invalid Host header")
        return self._absolute_form(url)

    def _absolute_form(self, url: bytes) -> tuple[bytes, bytes]:
        """The host and origin-form target of an absolute-form `url` (no fragment)."""
        lower = url[:8].lower()
        if lower.startswith(b"http://") or lower.startswith(b"https://"):
            rest = url.split(b"://", 1)[1]
            # The authority ends at the path or the query (bug: "?" was kept in it).
            authority = rest.partition(b"/")[0].partition(b"?")[0]
            path = rest[len(authority):]
            # imported here: a module-level name cost every request ~49 instructions
            # (bench_hotpath --instructions), absolute-form or not
            from balancer.authority import is_valid_authority
            if not is_valid_authority(authority):  # (bug: "http://*" was served)
                self._fail(400, "bad absolute-form target")
            return authority, path if path[:1] == b"/" else b"/" + path
        self._fail(400, "bad request target")

    def _check_host(self, host: bytes, version: bytes) -> None:
        """For a host that is empty or has a byte outside HOST_CHARS (NUL: an empty Host)."""
        if not host:
            if version == b"1.1":
                self._fail(400, "missing Host header")
        elif host == b"\0":
            self._fail(400, "empty Host header")
        else:
            self._fail(400, "invalid Host header")

    def _check_upgrade(self, upgrade: bytes, has_body: bool, version: bytes) -> bytes:
        """The protocols to ask the backend for ("" when only h2c was asked, or on
        HTTP/1.0)."""
        if not upgrade:  # "Upgrade: a" then an empty "Upgrade:"
            self._fail(400, "empty Upgrade header")
        if b"h2c" in upgrade.lower():  # bug: forwarded without its HTTP2-Settings
            upgrade = b", ".join(token for token in (t.strip() for t in upgrade.split(b","))
                                 if token and token.lower() != b"h2c")
        if version == b"1.0":  # RFC 9110 §7.8: ignored in HTTP/1.0 (bug: a tunnel,
            return b""  # and a 101, a 1xx no HTTP/1.0 client may get, §15.2)
        # llhttp stops after this head; whatever follows is tunnel data, so a
        # body would be smuggled past the framing (bug: forwarded on refusal).
        if upgrade and has_body:
            self._fail(400, "Upgrade request with a body")
        return upgrade

    def _end_chunked(self) -> None:
        """(fields) The chunked message ends where its framing did: its trailers go
        on its head (`_feed_chunked` then queues its last pieces and `END`)."""
        if not self._ending:  # llhttp ended it before: never, but never forwarded
            self._fail(400, "chunked body framing not understood")
        if self._fields:
            head = self._head
            assert head is not None  # (fields) set with the head
            head.trailers = self._check_trailers()
        self._begin()
        self._closed = not self._keep_alive
        self._idle = True

    def _last_piece(self) -> Any:
        """The piece of the current feed that ends a Content-Length body (module
        doc): the feed, a span of it, or a slice when a message follows."""
        feed, at = self._feed, self._at
        end = at + self._body_left
        if end == len(feed):
            return (feed, at) if at else feed
        return feed[at:end]

    def on_message_complete(self) -> None:
        if self._fielded:
            self._end_chunked()
            return
        if self._switching:  # the raw parser after a chunked head: ignored (`_to_body`)
            self._raw_ended = True
            return
        if self._unframed:  # llhttp's end of an upgrade's head: the body follows
            return
        if self._body_left:  # a Content-Length body's last piece
            self.events.append(self._last_piece())
        self.events.append(END)
        self._begin()
        # Bug: bytes after it used to become a 400 (or 414/431) for an answerable request.
        self._closed = not self._keep_alive
        feed, start = self._feed, self._at + self._body_left  # the next message's start
        if start < len(feed):
            self._parts = [feed]
            self._start = start
            self._head_bytes = len(feed) - start
        else:
            self._parts = []
            self._start = 0
