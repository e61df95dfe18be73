"""Seeded, deterministic generator of mutated HTTP/1.x request streams for the
framing fuzzer (tests/fuzzpeer.py runs them).

A case is one to three requests pipelined on a connection, one of them
mutated by one or two operators (`OPERATORS`) aimed at request framing:
Content-Length / Transfer-Encoding mixes, odd spellings of ``chunked``,
obs-fold, whitespace before a colon, bare CR and LF, NUL and high bytes,
chunk size forms and extensions, trailers that carry framing fields,
absolute- and authority-form targets, Host repeated or against the target,
HTTP/1.0 keep-alive, ``Expect`` variants, and bodies that hold a whole request
(a smuggling bait). Every request's target carries its case and index
(``/f<case>-<i>``, bait ``/s<case>``), and so does its last field
(``X-Fuzz-Case: f<case>-<i>``, added after the operators ran, so none changes
it), so whatever reaches a backend is traced to the case that sent it, whatever
its target became. `case(seed, n)` is the n-th case of a seed: the same bytes
on every machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

HOST = b"app.test"
CASE_FIELD = b"X-Fuzz-Case"  # the field naming a request's case and index


@dataclass
class Draft:
    """A request being built: request line parts, fields, body framing."""

    method: bytes
    target: bytes
    version: bytes = b"HTTP/1.1"
    fields: list[bytes] = field(default_factory=list)  # whole lines without CRLF
    body: bytes = b""  # as sent (chunked framing included)
    chunks: list[bytes] = field(default_factory=list)  # the data, when chunked
    trailers: list[bytes] = field(default_factory=list)
    size_lines: list[bytes] = field(default_factory=list)  # one per chunk, then the last
    raw: bytes = b""  # the whole request, when an operator rewrote its bytes
    tag: bytes = b""  # the origin-form target it was made with (``/f<case>-<i>``)

    def __post_init__(self) -> None:
        self.tag = self.tag or self.target

    def frame_chunks(self) -> None:
        """`body` from `chunks`, `size_lines` and `trailers`."""
        parts = []
        for data, line in zip(self.chunks, self.size_lines, strict=False):
            parts.append(line + b"\r\n" + data + b"\r\n")
        last = self.size_lines[len(self.chunks)] if len(self.size_lines) > len(self.chunks) \
            else b"0"
        parts.append(last + b"\r\n" + b"".join(t + b"\r\n" for t in self.trailers) + b"\r\n")
        self.body = b"".join(parts)

    def bytes(self) -> bytes:
        if self.raw:
            return self.raw
        head = b"%s %s %s\r\n" % (self.method, self.target, self.version)
        return (head + b"".join(f + b"\r\n" for f in self.fields)
                + b"%s: %s\r\n\r\n" % (CASE_FIELD, self.tag[1:]) + self.body)


def bait(case_id: int) -> bytes:
    return b"GET /s%d HTTP/1.1\r\nHost: %s\r\n%s: s%d\r\n\r\n" % (case_id, HOST, CASE_FIELD,
                                                                    case_id)


def plain(case_id: int, index: int, rnd: random.Random) -> Draft:
    return Draft(b"GET", b"/f%d-%d" % (case_id, index), fields=[b"Host: " + HOST])


def with_length(case_id: int, index: int, rnd: random.Random) -> Draft:
    body = rnd.choice([b"hello", bait(case_id), b"x" * rnd.randrange(0, 40)])
    return Draft(b"POST", b"/f%d-%d" % (case_id, index),
                 fields=[b"Host: " + HOST, b"Content-Length: %d" % len(body)], body=body)


def chunked(case_id: int, index: int, rnd: random.Random) -> Draft:
    chunks = [rnd.choice([b"abc", b"0123456789", bait(case_id), b"\r\n0\r\n\r\n"])
              for _ in range(rnd.randrange(1, 4))]
    draft = Draft(b"POST", b"/f%d-%d" % (case_id, index),
                  fields=[b"Host: " + HOST, b"Transfer-Encoding: chunked"], chunks=chunks,
                  size_lines=[b"%x" % len(c) for c in chunks] + [b"0"])
    if rnd.random() < 0.3:
        draft.trailers = [b"X-Sum: 1"]
    draft.frame_chunks()
    return draft


BASES: list[Callable[[int, int, random.Random], Draft]] = [plain, with_length, chunked]

TE_VALUES = [b"chunked", b"Chunked", b"CHUNKED", b" chunked", b"chunked ", b"\tchunked",
             b'"chunked"', b"chunked;q=1", b"chunked,", b",chunked", b"chunked, chunked",
             b"chunked, identity", b"identity, chunked", b"gzip, chunked", b"chunked, gzip",
             b"xchunked", b"chunk", b"chunked\x0b", b"chunked\x00", b"", b"identity",
             b"ch\xc3\xbcnked", b"chunked\x85", b"cHuNkEd, "]
CL_VALUES = [b"{n}", b"0{n}", b"+{n}", b"-{n}", b"{n}, {n}", b"{n},{n}", b"{n}, 1",
             b" {n} ", b"{n}.0", b"0x{n}", b"{n}\x00", b"99999999999999999999", b"{n}e0",
             b"", b"\xd9\xa1"]
SIZE_FORMS = [b"{x}", b"0{x}", b"000{x}", b"0x{x}", b"{X}", b"{x} ", b" {x}", b"{x}\t",
              b"-{x}", b"+{x}", b"{x};a=b", b"{x};a", b'{x};a="x;y"', b'{x};a="q\\"r"',
              b"{x} ;a=b", b"{x}; a=b", b"{x};a=b c", b'{x};a="x\ry"', b"{x};a=\x00",
              b"{x};a=\xff", b"1{z}{x}", b"ffffffffffffffff{x}", b"{x}\r", b"{x};\n"]
LAST_FORMS = [b"0", b"00", b"0;a=b", b"0x0", b"0 ", b"-0", b"000000000000000000000"]
TRAILERS = [b"Content-Length: 100", b"Transfer-Encoding: chunked", b"Host: evil.test",
            b"X-Ok: 1", b"Connection: close", b"Content-Length : 5", b" folded",
            b"X-Bad\x00: 1", b"Expect: 100-continue", b"Trailer: X", b"X-Forwarded-For: 6.6.6.6"]
# (absolute-form authorities: docs/proxying.md says which name a host)
TARGETS = [b"http://app.test{p}", b"HTTP://APP.TEST{p}", b"https://app.test:80{p}",
           b"http://other.test{p}", b"http://user@app.test{p}", b"http://{t}",
           b"http://{p}", b"app.test:80", b"http:/{p}", b"//app.test{p}", b"*",
           b"{p}#frag", b"{p}?a=b", b"http://app.test?x={p}", b"{p} HTTP/1.1\r\nX:",
           b"http://*{p}", b"http://*:80{p}", b"http://a*b{p}", b"http://a_b{p}",
           b"http://app.test:{p}", b"http://app.test:x{p}", b"http://[::1]{p}",
           b"http://[::1]:8080{p}", b"http://[1.2.3.4]{p}", b"http://[::1{p}"]
HOSTS = [[b"Host: app.test", b"Host: app.test"], [b"Host: app.test", b"Host: other.test"],
         [b"Host:"], [b"Host: app test"], [], [b"Host: app.test\x00"], [b"host: APP.TEST"],
         [b"Host: app.test:8080"], [b"Host : app.test"], [b"Host: [::1]:80"]]
EXPECTS = [b"100-continue", b"100-Continue", b"100-continue, foo", b"", b"foo",
           b"100-continue ", b"100-continuex"]
INSERTS = [b"\x00", b"\x7f", b"\x80", b"\xff", b"\r", b"\n", b" ", b"\t", b"\x0b", b"\x0c"]
CONNECTIONS = [b"Connection: close", b"Connection: keep-alive", b"Connection: Content-Length",
               b"Connection: Transfer-Encoding", b"Connection: Host", b"Connection: close, "
               b"Upgrade", b"Proxy-Connection: close", b"Keep-Alive: timeout=5"]


def place(draft: Draft, lines: list[bytes], rnd: random.Random) -> None:
    """Put `lines` among the fields at random, in their order, instead of the
    fields of the same names."""
    names = {line.partition(b":")[0].lower() for line in lines}
    draft.fields = [f for f in draft.fields if f.partition(b":")[0].lower() not in names]
    at = 0
    for line in lines:
        at = rnd.randrange(at, len(draft.fields) + 1)
        draft.fields.insert(at, line)
        at += 1


def te_and_length(draft: Draft, rnd: random.Random) -> str:
    if not draft.chunks:
        chunk_body(draft, rnd)
    n = rnd.choice([len(draft.body), len(b"".join(draft.chunks)), 0, 3])
    te, cl = b"Transfer-Encoding: chunked", b"Content-Length: %d" % n
    place(draft, [te, cl] if rnd.random() < 0.5 else [cl, te], rnd)
    return "te+cl"


def te_value(draft: Draft, rnd: random.Random) -> str:
    if not draft.chunks:
        chunk_body(draft, rnd)
    value = rnd.choice(TE_VALUES)
    lines = [b"Transfer-Encoding: " + value]
    if rnd.random() < 0.25:
        lines.append(b"Transfer-Encoding: " + rnd.choice(TE_VALUES))
    place(draft, lines, rnd)
    return "te-value"


def length_value(draft: Draft, rnd: random.Random) -> str:
    n = b"%d" % len(draft.body)
    draft.fields = [f for f in draft.fields if not f.lower().startswith(b"content-length")]
    values = [rnd.choice(CL_VALUES).replace(b"{n}", n)]
    if rnd.random() < 0.3:
        values.append(rnd.choice([n, b"%d" % (len(draft.body) + 1)]))
    place(draft, [b"Content-Length: " + v for v in values], rnd)
    return "cl-value"


def chunk_body(draft: Draft, rnd: random.Random) -> None:
    """Make `draft` chunked (if it was not)."""
    body = draft.body or b"hello"
    draft.fields = [f for f in draft.fields if not f.lower().startswith(b"content-length")]
    draft.method = b"POST"
    draft.chunks = [body[:3], body[3:]] if len(body) > 3 else [body]
    draft.size_lines = [b"%x" % len(c) for c in draft.chunks] + [b"0"]
    draft.frame_chunks()


def size_line(draft: Draft, rnd: random.Random) -> str:
    if not draft.chunks:
        chunk_body(draft, rnd)
        draft.fields.append(b"Transfer-Encoding: chunked")
    i = rnd.randrange(len(draft.size_lines))
    if i == len(draft.chunks):
        draft.size_lines[i] = rnd.choice(LAST_FORMS)
    else:
        size = len(draft.chunks[i])
        form = rnd.choice(SIZE_FORMS)
        draft.size_lines[i] = (form.replace(b"{x}", b"%x" % size).replace(b"{X}", b"%X" % size)
                               .replace(b"{z}", b"0" * 16))
    draft.frame_chunks()
    return "chunk-size"


def trailer(draft: Draft, rnd: random.Random) -> str:
    if not draft.chunks:
        chunk_body(draft, rnd)
        draft.fields.append(b"Transfer-Encoding: chunked")
    draft.trailers = rnd.sample(TRAILERS, rnd.randrange(1, 3))
    draft.frame_chunks()
    return "trailers"


def obs_fold(draft: Draft, rnd: random.Random) -> str:
    i = rnd.randrange(len(draft.fields) + 1)
    fold = rnd.choice([b" chunked", b"\tx", b" ", b" 5"])
    if i == len(draft.fields) and draft.chunks:
        draft.fields.append(b"Transfer-Encoding:")
        draft.fields.append(fold)
    else:
        draft.fields.insert(i, fold)
    return "obs-fold"


def space_before_colon(draft: Draft, rnd: random.Random) -> str:
    if not draft.fields:
        return "noop"
    i = rnd.randrange(len(draft.fields))
    name, colon, value = draft.fields[i].partition(b":")
    if colon:
        draft.fields[i] = name + rnd.choice([b" ", b"\t", b"  "]) + b":" + value
    return "ws-before-colon"


def insert_byte(draft: Draft, rnd: random.Random) -> str:
    where = rnd.choice(["name", "value", "line", "body"])
    byte = rnd.choice(INSERTS)
    if where in ("name", "value") and draft.fields:
        i = rnd.randrange(len(draft.fields))
        line = draft.fields[i]
        colon = max(line.find(b":"), 1)
        at = rnd.randrange(colon) if where == "name" else rnd.randrange(colon, len(line) + 1)
        draft.fields[i] = line[:at] + byte + line[at:]
    elif where == "line":
        at = rnd.randrange(len(draft.target) + 1)
        draft.target = draft.target[:at] + byte + draft.target[at:]
    elif draft.chunks:
        i = rnd.randrange(len(draft.size_lines))
        line = draft.size_lines[i]
        at = rnd.randrange(len(line) + 1)
        draft.size_lines[i] = line[:at] + byte + line[at:]
        draft.frame_chunks()
    return "byte-" + where


def line_ends(draft: Draft, rnd: random.Random) -> str:
    """Bare CR or bare LF for one CRLF of the message, or before it."""
    data = draft.bytes()
    ends = [i for i in range(len(data) - 1) if data[i:i + 2] == b"\r\n"]
    at = rnd.choice(ends)
    new = rnd.choice([b"\n", b"\r", b"\r\r\n", b"\n\r\n"])
    draft.raw = data[:at] + new + data[at + 2:]
    return "line-end"


def target_form(draft: Draft, rnd: random.Random) -> str:
    form = rnd.choice(TARGETS)
    # Bug: a form after one without the tag (`*`, an authority) made a target of no
    # case (``http://*``), forwarded as the stray ``/`` of host ``*``
    path = draft.target if draft.tag[1:] in draft.target else draft.tag
    draft.target = form.replace(b"{p}", path).replace(b"{t}", path[1:])
    if form == b"app.test:80" and rnd.random() < 0.5:
        draft.method = b"CONNECT"
    if rnd.random() < 0.3:
        draft.fields = [f for f in draft.fields if not f.startswith(b"Host:")]
    return "target"


def host_fields(draft: Draft, rnd: random.Random) -> str:
    draft.fields = [f for f in draft.fields if not f.startswith(b"Host:")]
    for line in rnd.choice(HOSTS):
        draft.fields.insert(rnd.randrange(len(draft.fields) + 1), line)
    return "host"


def http10(draft: Draft, rnd: random.Random) -> str:
    draft.version = b"HTTP/1.0"
    if rnd.random() < 0.6:
        draft.fields.append(b"Connection: keep-alive")
    if rnd.random() < 0.3:
        draft.fields = [f for f in draft.fields if not f.startswith(b"Host:")]
    return "http/1.0"


def expect(draft: Draft, rnd: random.Random) -> str:
    draft.fields.append(b"Expect: " + rnd.choice(EXPECTS))
    if not draft.body and rnd.random() < 0.5:
        draft.method, draft.body = b"POST", b"12345"
        draft.fields.append(b"Content-Length: 5")
    return "expect"


def connection(draft: Draft, rnd: random.Random) -> str:
    draft.fields.insert(rnd.randrange(len(draft.fields) + 1), rnd.choice(CONNECTIONS))
    return "connection"


def underscore(draft: Draft, rnd: random.Random) -> str:
    draft.fields.append(rnd.choice([b"Transfer_Encoding: chunked", b"Content_Length: 3",
                                    b"Content-Length\x00: 3", b"Transfer-Encoding\x0b: chunked",
                                    b"Content-Lengthx: 3"]))
    return "odd-name"


def big_head(draft: Draft, rnd: random.Random) -> str:
    """A head past the 4 KiB a pipelined head is first looked for in
    (`balancer.http11.WINDOW`), or with many fields (100 is the limit, the case's
    field one of them)."""
    if rnd.random() < 0.5:
        pad = [b"X-Pad: " + b"a" * rnd.randrange(3000, 9000)]
    else:
        pad = [b"X-Pad-%d: %d" % (i, i) for i in range(rnd.randrange(89, 99))]
    at = rnd.randrange(len(draft.fields) + 1)
    draft.fields[at:at] = pad
    return "big-head"


OPERATORS: list[Callable[[Draft, random.Random], str]] = [
    te_and_length, te_value, length_value, size_line, trailer, obs_fold, space_before_colon,
    insert_byte, line_ends, target_form, host_fields, http10, expect, connection, underscore,
    big_head]


@dataclass
class Case:
    case_id: int
    data: bytes
    labels: list[str]  # the operators applied
    splits: list[int]  # where to cut the bytes into separate sends


def case(seed: int, n: int, case_id: int | None = None) -> Case:
    """The `n`-th case of `seed` (deterministic), its targets tagged with `case_id`
    (`n` by default)."""
    rnd = random.Random(seed * 1_000_003 + n)
    case_id = n if case_id is None else case_id
    drafts = [rnd.choice(BASES)(case_id, i, rnd) for i in range(rnd.randrange(1, 4))]
    target = rnd.randrange(len(drafts))
    labels = [rnd.choice(OPERATORS)(drafts[target], rnd)
              for _ in range(1 if rnd.random() < 0.7 else 2)]
    data = b"".join(d.bytes() for d in drafts)
    if rnd.random() < 0.1:
        data = b"\r\n" * rnd.randrange(1, 3) + data
        labels.append("leading-crlf")
    cuts = sorted(rnd.sample(range(1, len(data)), min(len(data) - 1, rnd.randrange(0, 3))))
    return Case(case_id, data, labels, cuts)
