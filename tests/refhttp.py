"""A reference reading of HTTP/1.x request streams, written from RFC 9112 alone
(no llhttp): what a client's bytes mean, for the framing fuzzer
(tests/framefuzz.py, tests/fuzzpeer.py) to hold the balancer's forwarding
against, and for reading what a backend received.

`read_stream(data)` reads requests up to the first one that must be refused
(with the statuses such a refusal may have), or the end of the bytes. Where
the RFC lets a recipient either refuse or read a message one way
(`Transfer-Encoding` beside `Content-Length`, a `Content-Length` list of one
value repeated, obs-fold, an expectation it does not know), strict reading
refuses and lenient reading (`lenient=True`) takes the RFC's one meaning:
whatever a proxy forwards must mean what one of the two readings says.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field

TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
                  b"ABCDEFGHIJKLMNOPQRSTUVWXYZ")
# field-value bytes (RFC 9110 §5.5): VCHAR, obs-text, SP, HTAB
VALUE_BYTES = frozenset(range(0x21, 0x7F)) | frozenset(range(0x80, 0x100)) | {0x20, 0x09}
TARGET_BYTES = frozenset(range(0x21, 0x7F)) - {ord("#")}  # no fragment in a request
HOST_BYTES = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                       b"-._~%!$&'()*+,;=:[]")
QDTEXT = frozenset({0x09, 0x20, 0x21}) | frozenset(range(0x23, 0x5C)) \
    | frozenset(range(0x5D, 0x7F)) | frozenset(range(0x80, 0x100))
VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]\Z")
OWS = b" \t"
MAX_SIZE_DIGITS = 16  # a chunk size past 64 bits is refused
BAD = (400,)
FRAMING_STATUSES = (400, 501)  # an unknown or refused transfer coding: 501 or 400


class Refused(Exception):
    """The request cannot be read; `statuses`: the answers it may get."""

    def __init__(self, reason: str, statuses: tuple[int, ...] = BAD) -> None:
        super().__init__(reason)
        self.reason = reason
        self.statuses = statuses


class Incomplete(Exception):
    """The bytes end inside a request."""


@dataclass
class Request:
    method: bytes
    target: bytes  # as sent
    version: bytes  # b"1.0" or b"1.1"
    fields: list[tuple[bytes, bytes]]  # (lower-case name, value), in order
    host: bytes  # the authority the request is for (absolute-form's, else Host)
    path: bytes  # origin-form target (an absolute-form target's path and query)
    body: bytes = b""
    chunked: bool = False
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    keep_alive: bool = True
    start: int = 0  # where in the stream it began and ended
    end: int = 0

    def values(self, name: bytes) -> list[bytes]:
        return [value for lname, value in self.fields if lname == name]


@dataclass
class Reading:
    requests: list[Request]
    end: str  # "whole" (every byte read, or ignored after a closing request), "incomplete",
    # "refused"
    reason: str = ""
    statuses: tuple[int, ...] = ()


def read_stream(data: bytes, lenient: bool = False, framing_only: bool = False) -> Reading:
    """Every request in `data`, in order, up to the first refused or unfinished one
    (`framing_only`: what a backend behind a proxy checks: the syntax and the
    framing, not the target, Host or Expect, which are the proxy's to judge)."""
    requests: list[Request] = []
    pos = 0
    while True:
        while data.startswith(b"\r\n", pos):  # empty lines before a request line (§2.2)
            pos += 2
        while lenient and data[pos:pos + 1] in (b"\r", b"\n"):  # (§2.2: bare LF may end one)
            pos += 1
        if pos >= len(data):
            return Reading(requests, "whole")
        try:
            request = read_request(data, pos, lenient, framing_only)
        except Refused as exc:
            return Reading(requests, "refused", exc.reason, exc.statuses)
        except Incomplete:
            return Reading(requests, "incomplete")
        requests.append(request)
        pos = request.end
        if not request.keep_alive:
            return Reading(requests, "whole")


def read_request(data: bytes, pos: int, lenient: bool, framing_only: bool = False
                 ) -> Request:
    start = pos
    head_end = data.find(b"\r\n\r\n", pos)
    if head_end < 0:
        check_partial_head(data[pos:])
        raise Incomplete
    lines = data[pos:head_end].split(b"\r\n")
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise Refused("bare CR or LF in the head")
    method, target, version = request_line(lines[0], lenient)
    fields = head_fields(lines[1:], lenient)
    request = Request(method, target, version, fields, b"", b"")
    request.start = start
    if framing_only:
        request.host = (request.values(b"host") or [b""])[0]
        request.path = request.target
        match = re.match(rb"(?i)https?://([^/?]*)(.*)\Z", request.target)
        if match:  # (absolute-form forwarded as it came)
            request.host = match.group(1)
            rest = match.group(2)
            request.path = rest if rest.startswith(b"/") else b"/" + rest
    else:
        route(request)
    pos = head_end + 4
    length, request.chunked = framing(request, lenient)
    if request.chunked:
        pos = read_chunked(data, pos, request, lenient)
    else:
        if len(data) - pos < length:
            raise Incomplete
        request.body = data[pos:pos + length]
        pos += length
    request.end = pos
    request.keep_alive = keeps_alive(request)
    if not framing_only:
        expectation(request, lenient)
    return request


def check_partial_head(part: bytes) -> None:
    """An unfinished head that already cannot be read is refused, not waited for."""
    for i, byte in enumerate(part):
        if byte == 0x0A and (i == 0 or part[i - 1] != 0x0D):
            raise Refused("bare LF in the head")
        if byte == 0x0D and i + 1 < len(part) and part[i + 1] != 0x0A:
            raise Refused("bare CR in the head")


def request_line(line: bytes, lenient: bool) -> tuple[bytes, bytes, bytes]:
    """(§3: a recipient may read the parts between runs of whitespace: `lenient`.)"""
    parts = line.split() if lenient and b"\x0b" not in line and b"\x0c" not in line \
        else line.split(b" ")
    if len(parts) != 3:
        raise Refused("request line is not method SP target SP version")
    method, target, version = parts
    if not method or not set(method) <= TCHAR:
        raise Refused("bad method")
    if not VERSION.match(version):
        raise Refused("bad version")
    if lenient and version[:7] == b"HTTP/1." and version[7:] >= b"2":
        version = b"HTTP/1.1"  # RFC 9110 §2.5: a higher minor version, as the highest
    if version not in (b"HTTP/1.0", b"HTTP/1.1"):
        raise Refused("version not supported", (505, 400))
    if not target or not set(target) <= TARGET_BYTES:
        raise Refused("bad request target")
    return method, target, version[5:]


def head_fields(lines: list[bytes], lenient: bool) -> list[tuple[bytes, bytes]]:
    fields: list[tuple[bytes, bytes]] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not lenient or not fields:
                raise Refused("obs-fold")
            name, value = fields[-1]  # §5.2: replaced by SP
            fields[-1] = (name, (value + b" " + line.strip(OWS)).strip(OWS))
            check_value(fields[-1][1])
            continue
        fields.append(parse_field(line))
    return fields


def parse_field(line: bytes) -> tuple[bytes, bytes]:
    name, colon, value = line.partition(b":")
    if not colon or not name or not set(name) <= TCHAR:  # whitespace before ":" too (§5.1)
        raise Refused("bad field name")
    value = value.strip(OWS)
    check_value(value)
    return name.lower(), value


def check_value(value: bytes) -> None:
    if not set(value) <= VALUE_BYTES:
        raise Refused("control byte in a field value")


def route(request: Request) -> None:
    """`host` and `path` of the request (RFC 9112 §3.2, §3.2.2)."""
    hosts = request.values(b"host")
    if len(hosts) > 1:
        raise Refused("repeated Host")
    if request.version == b"1.1" and not hosts:
        raise Refused("missing Host")
    host = hosts[0] if hosts else b""
    if not set(host) <= HOST_BYTES:  # whatever the target (§3.2)
        raise Refused("invalid Host")
    target = request.target
    if hosts and not host and not target.lower().startswith((b"http://", b"https://")):
        raise Refused("empty Host")  # (valid, but then the target must name the host)
    if target.startswith(b"/"):
        request.host, request.path = host, target
        return
    if target == b"*" and request.method == b"OPTIONS":
        request.host, request.path = host, target
        return
    if request.method == b"CONNECT":
        raise Refused("CONNECT", (501, 405, 400))
    match = re.match(rb"(?i)https?://([^/?]*)(.*)\Z", target)
    if not match or not names_a_host(match.group(1)):
        raise Refused("bad request target")
    rest = match.group(2)
    request.host = match.group(1)  # the authority wins over Host (§3.2.2)
    request.path = rest if rest.startswith(b"/") else b"/" + rest


def names_a_host(authority: bytes) -> bool:
    """An absolute-form authority the balancer routes (docs/proxying.md): RFC 3986's
    ``host [":" port]`` without userinfo, an empty host (RFC 9110 §4.2.1) or a
    reg-name no host name has (``*``, sub-delims, ``%``, ``_``: nginx refuses
    them in a request line); an IP literal holds an IPv6 address or an IPvFuture."""
    literal = re.fullmatch(rb"\[([^\]]*)\](?::[0-9]*)?", authority)
    if literal:
        inner = literal.group(1)
        if re.fullmatch(rb"v[0-9A-Fa-f]+\.[A-Za-z0-9._~!$&'()*+,;=:-]+", inner):
            return True
        try:
            socket.inet_pton(socket.AF_INET6, inner.decode("ascii"))
        except (OSError, UnicodeDecodeError):
            return False
        return True
    host = re.sub(rb":[0-9]*\Z", b"", authority)
    labels = host[:-1].split(b".") if host.endswith(b".") else host.split(b".")
    return all(label and re.fullmatch(rb"[A-Za-z0-9-]+", label) for label in labels)


def framing(request: Request, lenient: bool) -> tuple[int, bool]:
    """(Content-Length, chunked) of the request (RFC 9112 §6)."""
    codings = request.values(b"transfer-encoding")
    lengths = request.values(b"content-length")
    if codings:
        if request.version == b"1.0":  # §6.1: framing faulty
            raise Refused("Transfer-Encoding in HTTP/1.0")
        tokens = [t.strip(OWS).lower() for value in codings for t in value.split(b",")]
        tokens = [t for t in tokens if t]
        if not tokens or tokens[-1] != b"chunked" or tokens.count(b"chunked") > 1:
            raise Refused("chunked is not the final coding, or not once", BAD)  # (§6.1)
        if tokens != [b"chunked"]:
            raise Refused("a coding besides chunked", FRAMING_STATUSES)
        if lengths and not lenient:  # §6.3 (3): may be refused; else TE wins
            raise Refused("Transfer-Encoding and Content-Length")
        return 0, True
    if not lengths:
        return 0, False
    values = {v.strip(OWS) for value in lengths for v in value.split(b",")}
    if lenient and all(v.isdigit() and len(v) <= 18 for v in values):  # one number
        values = {b"%d" % int(v) for v in values}  # however written (`00`, `0`: HAProxy)
    # §6.3 (5): a list of one value repeated may be read as that value
    if (len(lengths) > 1 or b"," in lengths[0]) and (not lenient or len(values) != 1):
        raise Refused("repeated Content-Length")
    (value,) = values if len(values) == 1 else (b"x",)
    if not value.isdigit() or len(value) > 18:
        raise Refused("bad Content-Length")
    return int(value), False


def read_chunked(data: bytes, pos: int, request: Request, lenient: bool) -> int:
    """Decode the chunked body at `pos` into `request`; where it ends (§7.1)."""
    body = []
    while True:
        line_end = data.find(b"\r\n", pos)
        line = data[pos:] if line_end < 0 else data[pos:line_end]
        if b"\r" in line or b"\n" in line:
            raise Refused("bare CR or LF in a chunk size line")
        if line_end < 0:
            raise Incomplete
        size = chunk_size(line, lenient)
        pos = line_end + 2
        if size == 0:
            break
        if len(data) - pos < size + 2:
            if len(data) - pos > size and data[pos + size] != 0x0D:
                raise Refused("chunk data not followed by CRLF")
            raise Incomplete
        body.append(data[pos:pos + size])
        if data[pos + size:pos + size + 2] != b"\r\n":
            raise Refused("chunk data not followed by CRLF")
        pos += size + 2
    request.body = b"".join(body)
    end = data.find(b"\r\n\r\n", pos - 2)
    if end < 0:
        check_partial_head(data[pos:])
        raise Incomplete
    lines = data[pos:end].split(b"\r\n") if end >= pos else []
    for line in lines:
        if b"\r" in line or b"\n" in line:
            raise Refused("bare CR or LF in the trailers")
    request.trailers = head_fields(lines, False)
    return end + 4


def chunk_size(line: bytes, lenient: bool) -> int:
    """chunk-size [chunk-ext] (§7.1.1); BWS around ";" and "=" only when `lenient`,
    and then blanks after the size with no extension too (nginx and HAProxy take
    them, and the balancer forwards the size alone)."""
    match = re.match(rb"([0-9a-fA-F]+)(.*)\Z", line, re.S)
    if not match:
        raise Refused("bad chunk size")
    digits, ext = match.groups()
    if len(digits.lstrip(b"0")) > MAX_SIZE_DIGITS:
        raise Refused("chunk size too large")
    check_extensions(ext.lstrip(OWS) if lenient else ext, lenient)
    return int(digits, 16)


def check_extensions(ext: bytes, lenient: bool) -> None:
    bws = rb"[ \t]*" if lenient else b""
    token = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
    quoted = rb'"(?:[\t !#-\[\]-~\x80-\xff]|\\[\t -~\x80-\xff])*"'
    one = rb"%s;%s%s(?:%s=%s(?:%s|%s))?" % (bws, bws, token, bws, bws, token, quoted)
    if not re.fullmatch(rb"(?:%s)*" % one, ext):
        raise Refused("bad chunk extension")


def keeps_alive(request: Request) -> bool:
    tokens = {t.strip(OWS).lower() for value in request.values(b"connection")
              for t in value.split(b",")}
    if b"close" in tokens:
        return False
    return request.version == b"1.1" or b"keep-alive" in tokens


def expectation(request: Request, lenient: bool) -> None:
    """An expectation other than 100-continue may get a 417 (RFC 9110 §10.1.1)."""
    if request.version == b"1.0":
        return
    members = [m.strip(OWS).lower() for value in request.values(b"expect")
               for m in value.split(b",")]
    if any(m and m != b"100-continue" for m in members) and not lenient:  # (§5.6.1.2:
        raise Refused("unknown expectation", (417, 400))  # empty elements ignored)
