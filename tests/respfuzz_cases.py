"""Mutated backend responses, seeded and deterministic: the generator half of
the response-side fuzz (`tests/respfuzz.py` drives them through a proxy).

A `Case` is what a scripted backend writes for one request and what the
client may get for it (`Want`): the response as the backend meant it (status
and body, framing aside), a 502, or, once the backend's body went wrong after
its head, a response cut short (the client's connection closed before its end).
`reusable`: the backend sent one well-framed keep-alive response and nothing
more, so its connection may go back to the pool; every other case's
connection must never carry another request.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace

LEFTOVER = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nLEFTOVER"
CHUNKED = b"Transfer-Encoding: chunked\r\n"
LAST = b"0\r\n\r\n"  # the last chunk, no trailers


@dataclass(frozen=True)
class Want:
    """What the client may get. `status` None: only a 502."""

    status: int | None
    body: bytes = b""
    may_502: bool = False  # a 502 is right too (RFC 9110/9112 let a recipient refuse it)
    may_cut: bool = False  # the body may end early, the client's connection closed
    absent: tuple[bytes, ...] = ()  # field names (lower case) the client must not get

    def allows_502(self) -> bool:
        return self.status is None or self.may_502


@dataclass(frozen=True)
class Case:
    name: str
    pieces: tuple[bytes, ...]  # written in order, `pause` seconds apart
    want: Want
    reusable: bool = False
    close: bool = False  # the backend closes once it has written (else waits for more)
    extra: bytes = b""  # after the response, in its last write (so no later than its end)
    stray: bytes = b""  # written on the connection once the client has the response
    pause: float = 0.0
    method: bytes = b"GET"  # or HEAD, or POST (a small body)
    version: bytes = b"1.1"  # the client's request
    pipelined: bool = False  # the client sends its next request with this one

    @property
    def data(self) -> bytes:
        return b"".join(self.pieces)

    def writes(self) -> list[bytes]:
        """What the backend writes, in order (`extra` with the last piece)."""
        return [*self.pieces[:-1], self.pieces[-1] + self.extra]


def response(status: bytes = b"200 OK", fields: bytes = b"", body: bytes = b"",
             version: bytes = b"HTTP/1.1", length: bool = True) -> bytes:
    if length:
        fields = b"Content-Length: %d\r\n" % len(body) + fields
    return version + b" " + status + b"\r\n" + fields + b"\r\n" + body


def chunked(fields: bytes = b"", chunks: tuple[bytes, ...] = (), trailers: bytes = b"",
            status: bytes = b"200 OK") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\n" + CHUNKED + fields + b"\r\n"
            + b"".join(chunks) + b"0\r\n" + trailers + b"\r\n")


def chunk(data: bytes, size: bytes | None = None, ext: bytes = b"") -> bytes:
    return (size if size is not None else b"%x" % len(data)) + ext + b"\r\n" + data + b"\r\n"


# Each template: (rnd, body) -> Case; `body` is unique to the case.
Template = Callable[[random.Random, bytes], Case]


def _status_lines(rnd: random.Random, body: bytes) -> Case:
    good = [b"HTTP/1.1 200 OK", b"HTTP/1.1 200", b"HTTP/1.1 200 ", b"HTTP/1.1 200 \xe9t\xe9",
            b"HTTP/1.1 200 a\tb", b"HTTP/1.1 200 " + b"r" * 2000, b"HTTP/1.1 299 Odd",
            b"HTTP/1.1 599 Odd", b"HTTP/1.1 200 OK HTTP/1.1 200"]
    bad = [b"HTTP/1.1 000 Zero", b"HTTP/1.1 099 Low", b"HTTP/1.1 600 High", b"HTTP/1.1 999 X",
           b"HTTP/1.1 20 OK", b"HTTP/1.1 2000 OK", b"http/1.1 200 OK", b"HTTP/1.1 2x0 OK",
           b"HTTP/1.1  200 OK", b"HTTP/1.1 200 O\x00K", b"HTTP/1.1 200 O\rK", b"HTTP/11 200 OK",
           b"HTTP/1.1 200 O\x7fK", b"HTTP/1.1\t200 OK"]
    odd = [b"HTTP/2.0 200 OK", b"HTTP/1.2 200 OK", b"HTTP/1.0 200 OK", b"HTTP/9.9 200 OK"]
    kind = rnd.randrange(3)
    line = rnd.choice((good, bad, odd)[kind])
    data = line + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    status = int(line[9:12]) if kind != 1 else None
    want = Want(status, body, may_502=kind == 2 or line.endswith(b"200"))
    return Case("status " + repr(line[:40]), (data,), want, reusable=kind == 0,
                close=kind == 2)


def _http09(rnd: random.Random, body: bytes) -> Case:
    data = rnd.choice([body, b"\r\n" + body, b"<html>" + body, b"HTTP" + body, b"\x00" + body])
    return Case("http/0.9-like", (data,), Want(None), close=True)


def _interims(rnd: random.Random, body: bytes) -> Case:
    heads = [b"HTTP/1.1 100 Continue\r\n\r\n",
             b"HTTP/1.1 102 Processing\r\nX-Progress: 1\r\n\r\n",
             b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n",
             b"HTTP/1.1 103 Early Hints\r\nContent-Length: 5\r\n\r\n",
             b"HTTP/1.1 100 Continue\r\nTransfer-Encoding: chunked\r\n\r\n",
             b"HTTP/1.1 199 Whatever\r\nX-A: b\r\n\r\n",
             b"HTTP/1.0 100 Continue\r\n\r\n"]
    pieces = tuple(rnd.choice(heads) for _ in range(rnd.randint(1, 4)))
    final = response(body=body)
    version = rnd.choice([b"1.1", b"1.0"])
    return Case("interims", (*pieces, final), Want(200, body, may_502=True), reusable=True,
                version=version)


def _unasked_101(rnd: random.Random, body: bytes) -> Case:
    fields = rnd.choice([b"", b"Connection: upgrade\r\nUpgrade: websocket\r\n",
                         b"Upgrade: h2c\r\n"])
    data = b"HTTP/1.1 101 Switching Protocols\r\n" + fields + b"\r\n" + body
    return Case("101 not asked", (data,), Want(None), close=True)


def _no_body_statuses(rnd: random.Random, body: bytes) -> Case:
    status = rnd.choice([b"204 No Content", b"304 Not Modified"])
    fields = rnd.choice([b"Content-Length: %d\r\n" % len(body), b"Content-Length: 0\r\n",
                         b"Transfer-Encoding: chunked\r\n", b""])
    extra = rnd.choice([body, b"", LEFTOVER, b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)])
    return Case("no-body status", (response(status, fields, length=False),),
                Want(int(status[:3]), may_502=b"Transfer" in fields), reusable=not extra,
                extra=extra)


def _lengths(rnd: random.Random, body: bytes) -> Case:
    n = len(body)
    good = [b"Content-Length: %d\r\n" % n, b"Content-Length: 00%d\r\n" % n,
            b"content-length:%d \r\n" % n, b"CONTENT-LENGTH:\t%d\r\n" % n]
    dup = [b"Content-Length: %d\r\nContent-Length: %d\r\n" % (n, n),
           b"Content-Length: %d, %d\r\n" % (n, n), b"Content-Length: %d,%d\r\n" % (n, n)]
    bad = [b"Content-Length: %d\r\nContent-Length: %d\r\n" % (n, n + 1),
           b"Content-Length: +%d\r\n" % n, b"Content-Length: 0x%x\r\n" % n,
           b"Content-Length: %d %d\r\n" % (n, n), b"Content-Length: -1\r\n",
           b"Content-Length: \r\n", b"Content-Length: %da\r\n" % n, b"Content-Length: 1_0\r\n",
           b"Content-Length: %d, %d\r\n" % (n, n + 1), b"Content-Length : %d\r\n" % n,
           b"Content-Length: 99999999999999999999999\r\n"]
    te = [b"Transfer-Encoding: chunked\r\nContent-Length: %d\r\n" % n,
          b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n" % n,
          b"Transfer-Encoding: chunked, chunked\r\n", b"Transfer-Encoding: identity\r\n",
          b"Transfer-Encoding: gzip\r\n", b"Transfer-Encoding: chunked\r\nTransfer-Encoding: x\r\n",
          b"Transfer-Encoding: \x0bchunked\r\n", b"Transfer-Encoding: chunked\r\n\tgzip\r\n"]
    kind = rnd.randrange(4)
    fields = rnd.choice((good, dup, bad, te)[kind])
    if kind == 3:
        data = response(fields=fields, length=False) + chunk(body) + LAST
        return Case("te " + repr(fields[:50]), (data,), Want(200, body, may_502=True,
                                                              may_cut=True), close=True)
    data = response(fields=fields, body=body, length=False)
    want = Want(200, body) if kind == 0 else Want(None if kind == 2 else 200, body,
                                                  may_502=True)
    return Case("length " + repr(fields[:50]), (data,), want, reusable=kind == 0)


def _chunked(rnd: random.Random, body: bytes) -> Case:
    half = len(body) // 2
    first, second = body[:half], body[half:]
    sizes = [(b"%x" % len(first), b""), (b"000%x" % len(first), b""), (b"%X" % len(first), b""),
             (b"%x" % len(first), b";a=b"), (b"%x" % len(first), b';a="x;y\\"z"'),
             (b"%x" % len(first), b" ;a"), (b"%x" % len(first), b";" + b"e" * 3000)]
    bad_sizes = [(b"-%x" % len(first), b""), (b"1" + b"0" * 17, b""), (b"0x%x" % len(first), b""),
                 (b"%x" % len(first), b"\x00"), (b"", b""), (b"%x" % (len(first) + 3), b"")]
    trailers = [b"", b"X-Sum: 1\r\n", b"Content-Length: 3\r\n", b"Connection: close\r\n",
                b"Set-Cookie: a=b\r\n", b"Transfer-Encoding: chunked\r\n",
                b"X-Bad: a\x00b\r\n", b"X-Fold: a\r\n b\r\n"]
    bad = rnd.random() < 0.3
    size, ext = rnd.choice(bad_sizes if bad else sizes)
    trailer = rnd.choice(trailers)
    # llhttp refuses a Content-Length trailer (a sender must not send one, RFC 9110
    # §6.5.1): a 502, or the body cut once streamed
    refused = b"Content-Length" in trailer
    data = chunked(chunks=(chunk(first, size, ext), chunk(second)), trailers=trailer)
    broken = bad or b"\x00" in trailer or b"\r\n " in trailer
    reusable = not broken and b"Connection" not in trailer
    odd = broken or refused or ext[:1] == b" " or b"e" * 3000 in ext
    if size == b"%x" % (len(first) + 3):  # the data the size says, cut: what follows is
        body = first + b"\r\n" + chunk(second)[:1]  # not a size line
    return Case(f"chunked {size[:20]!r}{ext[:10]!r} {trailer!r}", (data,),
                Want(200, body, may_502=odd, may_cut=odd),
                reusable=reusable and not refused, close=broken)


def _field_bytes(rnd: random.Random, body: bytes) -> Case:
    ok = [b"X-A: \xe9\xff\r\n", b"X-A: a\tb\r\n", b"X-A:\r\n", b"X-A:   a   \r\n"]
    bad = [b"X-A: a\r\n b\r\n", b"X-A: a\r\n\tb\r\n", b"X-A: a\rb\r\n", b"X-A: a\nb\r\n",
           b"X-A: a\x00b\r\n", b"X\x00A: b\r\n", b"X\xe9: b\r\n", b"X-A b\r\n", b": b\r\n",
           b" X-A: b\r\n", b"X-A: a\x7fb\r\n", b"X-A: a\x01b\r\n", b"X@A: b\r\n",
           b"X-A: b\n", b"X-A: a\r\r\n", b"\x0bX-A: b\r\n"]
    kind = rnd.randrange(2)
    fields = rnd.choice((ok, bad)[kind])
    data = response(fields=fields, body=body)
    bare = rnd.random() < 0.2  # every line ended by a bare LF (RFC 9112 §2.2: a
    if bare:  # recipient may take it for CRLF, as HAProxy does, or refuse it)
        data = data.replace(b"\r\n", b"\n")
    if fields == b"X-A: b\n" or bare and fields == b"X-A: a\r\r\n":  # (then a CRLF)
        kind = 2  # a bare LF ends a line, as HAProxy reads it: never reused after it
    return Case("field " + ("LF " if bare else "") + repr(fields[:30]), (data,),
                Want(None if kind == 1 else 200, body, may_502=True),  # (bug: 2 was None)
                reusable=kind == 0 and not bare, close=kind == 1 or bare)


def _limits(rnd: random.Random, body: bytes) -> Case:
    fields = rnd.choice([b"X-Big: " + b"v" * rnd.choice([8000, 65400, 70000]) + b"\r\n",
                         b"".join(b"X-%d: v\r\n" % i for i in range(rnd.choice([99, 101, 400]))),
                         b"X-" + b"n" * 70000 + b": v\r\n"])
    return Case("big head", (response(fields=fields, body=body),),
                Want(200, body, may_502=True), close=True)


def _head_requests(rnd: random.Random, body: bytes) -> Case:
    data, extra = rnd.choice([
        (response(fields=b"Content-Length: %d\r\n" % len(body), length=False), body),
        (response(fields=CHUNKED, length=False), chunk(body) + LAST),
        (response(fields=CHUNKED, length=False), b""),
        (response(length=False), body)])
    return Case("HEAD with body", (data,), Want(200, may_502=True), close=rnd.random() < 0.5,
                reusable=not extra, method=b"HEAD", extra=extra)


def _body_sizes(rnd: random.Random, body: bytes) -> Case:
    kind = rnd.randrange(3)
    if kind == 0:  # longer than announced
        data = response(fields=b"Content-Length: %d\r\n" % (len(body) - 3), length=False)
        return Case("body longer", (data + body[:-3],), Want(200, body[:-3]), extra=body[-3:])
    if kind == 1:  # shorter, then EOF
        data = response(fields=b"Content-Length: %d\r\n" % (len(body) + 5), length=False) + body
        return Case("body shorter", (data,), Want(200, body, may_502=True, may_cut=True),
                    close=True)
    fields = rnd.choice([b"", b"Connection: keep-alive\r\n", b"Connection: close\r\n"])
    data = response(fields=fields, body=body, length=False)  # close-delimited
    return Case("close-delimited " + repr(fields), (data,), Want(200, body), close=True)


def _extra(rnd: random.Random, body: bytes) -> Case:
    extra = rnd.choice([LEFTOVER, b"garbage", b"\r\n", b"\r\n\r\n" + LEFTOVER, b"H"])
    stray = rnd.random() < 0.5
    return Case("extra " + ("stray " if stray else "") + repr(extra[:12]),
                (response(body=body),), Want(200, body), reusable=extra == b"\r\n" and not stray,
                extra=b"" if stray else extra, stray=extra if stray else b"")


def _http10(rnd: random.Random, body: bytes) -> Case:
    fields = rnd.choice([b"", b"Connection: keep-alive\r\n", b"Transfer-Encoding: chunked\r\n"])
    if b"chunked" in fields:
        data = response(fields=fields, version=b"HTTP/1.0", length=False) + chunk(body) + LAST
        return Case("1.0 chunked", (data,), Want(200, body, may_502=True, may_cut=True),
                    close=True)
    data = response(fields=fields, body=body, version=b"HTTP/1.0")
    return Case("1.0 " + repr(fields), (data,), Want(200, body), reusable=bool(fields))


def _hop_by_hop(rnd: random.Random, body: bytes) -> Case:
    fields = rnd.choice([
        (b"Connection: x-secret\r\nX-Secret: 1\r\n", b"x-secret"),
        (b"X-Secret: 1\r\nConnection: keep-alive, X-SECRET\r\n", b"x-secret"),
        (b"Keep-Alive: timeout=1\r\n", b"keep-alive"),
        (b"Proxy-Connection: x\r\n", b"proxy-connection"),
        (b"Trailer: x-sum\r\n", b"trailer"), (b"Upgrade: h2c\r\n", b"upgrade"),
        (b"TE: trailers\r\n", b"te"), (b"Connection: close\r\nConnection: x-secret\r\n"
                                        b"X-Secret: 1\r\n", b"x-secret")])
    data = response(fields=fields[0], body=body)
    return Case("hop-by-hop " + repr(fields[0][:30]), (data,), Want(200, body, absent=(fields[1],)),
                reusable=b"close" not in fields[0], close=b"close" in fields[0])


def check_head(body: bytes) -> bytes:
    """The head the backend's ``/check/N`` answers have, for a body of that size."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)


def _repeated_head(rnd: random.Random, body: bytes) -> Case:
    """The head of the last check's answer again (the balancer's repeated-head
    path, `ResponseParser._take_repeat`), with odd bytes after it."""
    size = len(b"check %d" % rnd.randrange(10, 100))
    own = body[:size].ljust(size, b"y")
    kind = rnd.randrange(4)
    head = check_head(own)
    if kind == 0:
        return Case("repeated head", (head + own,), Want(200, own), reusable=True)
    if kind == 1:
        return Case("repeated head, extra", (head + own,), Want(200, own),
                    extra=rnd.choice([LEFTOVER, b"x", b"\r\n\r\nH"]))
    if kind == 2:
        return Case("repeated head, short", (head + own[:-2],),
                    Want(200, own, may_502=True, may_cut=True), close=True)
    return Case("repeated head, HEAD", (head,), Want(200), method=b"HEAD", extra=own)


TEMPLATES: tuple[Template, ...] = (
    _status_lines, _http09, _interims, _unasked_101, _no_body_statuses, _lengths, _chunked,
    _field_bytes, _limits, _head_requests, _body_sizes, _extra, _http10, _hop_by_hop,
    _repeated_head, _repeated_head)


def delivered(case: Case, rnd: random.Random) -> Case:
    """The same bytes in one write, two (split anywhere), or a slow trickle."""
    how = rnd.random()
    data = case.data
    if how < 0.6 or len(data) < 2:
        return case
    if how < 0.9 or len(data) > 400:
        at = rnd.randrange(1, len(data))
        return replace(case, pieces=(data[:at], data[at:]), pause=0.002)
    return replace(case, pieces=tuple(data[i:i + 1] for i in range(len(data))), pause=0.0005)


def generate(seed: int, count: int) -> list[Case]:
    """`count` cases from `seed`, each with a body unique to it."""
    rnd = random.Random(seed)
    cases = []
    for i in range(count):
        body = b"body-%d-" % i + b"x" * rnd.choice([0, 1, 10, 100, 5000, 5000, 70000])
        case = rnd.choice(TEMPLATES)(rnd, body)
        if case.method == b"GET" and not case.stray and rnd.random() < 0.2:
            case = replace(case, pipelined=True)
        if case.version == b"1.1" and rnd.random() < 0.1:  # keep-alive, no 1xx, no trailers
            case = replace(case, version=b"1.0")
        if case.method == b"GET" and rnd.random() < 0.1:  # with a body
            case = replace(case, method=b"POST")
        cases.append(delivered(case, rnd))
    return cases


def every_split(data: bytes, want: Want, reusable: bool, close: bool = False) -> list[Case]:
    """`data` in two writes, cut at every byte boundary."""
    return [Case(f"split at {at}", (data[:at], data[at:]), want, reusable, close, pause=0.002)
            for at in range(1, len(data))]
