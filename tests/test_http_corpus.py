"""The HTTP/1.x protocol corpus, replayed through the sans-IO parsers.

Layout (gunicorn style), one case per pair of files:

* ``requests/valid/NAME.http`` + ``NAME.py`` with ``requests = [{...}, ...]``
  (every attribute of every `RequestHead`, its body, and optionally
  ``upgraded``/``leftover``/``limits``);
* ``requests/invalid/NAME.http`` + ``NAME.py`` with ``status = 4xx/5xx``;
* ``responses/valid`` and ``responses/invalid`` likewise (``responses = [...]``,
  ``for_head``, ``eof``; invalid responses are always ``status = 502``).

In a ``.http`` file real newlines are layout only; bytes are written as
``\\r``, ``\\n``, ``\\t``, ``\\0``, ``\\\\`` and ``\\xHH``, so bare CR and LF
are always visible. Every case is replayed whole, one byte at a time and in
seeded random chunks, and every replay must give the same events.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest

from balancer.forwarding import last_chunk
from balancer.http11 import END, Limits, ProtocolError, RequestHead, RequestParser
from balancer.response_parser import ResponseHead, ResponseParser
from balancer.spans import span_bytes
from tests.support import unchunk

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

HERE = Path(__file__).parent
ESCAPES = {b"r": b"\r", b"n": b"\n", b"t": b"\t", b"0": b"\0", b"\\": b"\\"}
ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{2}|[rnt0\\])")
RANDOM_SPLITS = 6
HOST = re.compile(rb"[A-Za-z0-9._~%!$&'()*+,;=:\[\]-]*\Z")  # RFC 3986 host [":" port]

REQUEST_DEFAULTS = {
    "version": b"1.1", "host": b"", "content_length": None, "chunked": False,
    "keep_alive": True, "expect_continue": False, "upgrade": b"",
    "connection_tokens": frozenset(), "body": b"", "complete": True,
}
RESPONSE_DEFAULTS = {
    "content_length": None, "chunked": False, "keep_alive": True, "no_body": False,
    "connection_tokens": frozenset(), "body": b"", "complete": True,
}


# loading ---------------------------------------------------------------------
def load_http(path: Path) -> bytes:
    """The bytes a ``.http`` file stands for."""
    raw = path.read_bytes().replace(b"\n", b"")

    def unescape(match: re.Match) -> bytes:
        code = match.group(1)
        return bytes([int(code[1:], 16)]) if code[:1] == b"x" else ESCAPES[code]

    return ESCAPE.sub(unescape, raw)


def load_expect(path: Path) -> dict:
    """The names a case's ``.py`` file defines."""
    namespace: dict = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)  # noqa: S102 - our own corpus
    return namespace


def cases(kind: str) -> list[Path]:
    found = sorted((HERE / kind).glob("*.http"))
    assert found, f"no corpus under {kind}"
    return found


def case_id(path: Path) -> str:
    return path.stem


# splitting -------------------------------------------------------------------
def splits(data: bytes, seed: str) -> list[list[bytes]]:
    """The same bytes whole, byte by byte, and cut at seeded random points."""
    out = [[data], [data[i:i + 1] for i in range(len(data))]]
    rnd = random.Random(seed)
    for n in range(RANDOM_SPLITS):
        count = min(len(data) - 1, 1 + 3 * n)
        cuts = sorted(rnd.sample(range(1, len(data)), count)) if count > 0 else []
        bounds = [0, *cuts, len(data)]
        out.append([data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)])
    return out


# replay ----------------------------------------------------------------------
def request_view(head: RequestHead) -> dict:
    """Every attribute of a head, with headers as (name, value) pairs."""
    for name, lname, _ in head.headers:
        assert lname == name.lower()
    return {
        "method": head.method, "target": head.target, "version": head.version,
        "host": head.host, "content_length": head.content_length, "chunked": head.chunked,
        "keep_alive": head.keep_alive, "expect_continue": head.expect_continue,
        "upgrade": head.upgrade, "connection_tokens": head.connection_tokens,
        "headers": [(name, value) for name, _, value in head.headers],
    }


def response_view(head: ResponseHead) -> dict:
    return {
        "status": head.status, "status_line": head.status_line, "headers": head.headers,
        "content_length": head.content_length, "chunked": head.chunked,
        "keep_alive": head.keep_alive, "no_body": head.no_body,
        "connection_tokens": head.connection_tokens,
    }


def messages(events, view) -> list[dict]:
    """Events folded into messages: head attributes + joined body + whether END came.
    A chunked request's body pieces are its framing, as forwarded: read strictly,
    with the trailers the relay sends after it (`unchunk`)."""
    out: list[dict] = []
    head = None
    for event in events:
        if event is END:
            assert out and not out[-1]["complete"], "END without an open message"
            out[-1]["complete"] = True
            if isinstance(head, RequestHead) and head.chunked:
                end = last_chunk(head) if head.trailers else b""
                out[-1]["body"] = unchunk(out[-1]["body"] + end)
        elif isinstance(event, (bytes, tuple)):  # a body piece: bytes or a span
            assert out and not out[-1]["complete"], "body bytes outside a message"
            out[-1]["body"] += span_bytes(event)
        else:
            assert not out or out[-1]["complete"], "a head inside an unfinished message"
            out.append({**view(event), "body": b"", "complete": False})
            head = event
    return out


def replay_requests(chunks: list[bytes], limits: Limits) -> dict:
    """Feed `chunks` as a connection would; stop at an upgrade (the rest is tunnel data)."""
    parser = RequestParser(limits)
    for i, chunk in enumerate(chunks):
        parser.feed(chunk)
        if parser.upgraded:
            leftover = parser.leftover + b"".join(chunks[i + 1:])
            return {"messages": messages(parser.events, request_view), "upgraded": True,
                    "leftover": leftover}
    return {"messages": messages(parser.events, request_view), "upgraded": False,
            "leftover": b""}


def replay_responses(chunks: list[bytes], for_head: bool, eof: bool, limits: Limits) -> dict:
    parser = ResponseParser(limits, for_head=for_head)
    leftover = b""
    for i, chunk in enumerate(chunks):
        parser.feed(chunk)
        if parser.upgraded:
            leftover = parser.leftover + b"".join(chunks[i + 1:])
            break
    if eof:
        parser.feed_eof()
    return {"messages": messages(parser.events, response_view), "complete": parser.complete,
            "upgraded": parser.upgraded, "leftover": leftover}


def expected(entries: list[dict], defaults: dict) -> list[dict]:
    return [{**defaults, **entry} for entry in entries]


# valid requests ----------------------------------------------------------------
@pytest.mark.parametrize("path", cases("requests/valid"), ids=case_id)
def test_valid_request(path: Path) -> None:
    data, expect = load_http(path), load_expect(path.with_suffix(".py"))
    limits = expect.get("limits", Limits())
    want = {"messages": expected(expect["requests"], REQUEST_DEFAULTS),
            "upgraded": expect.get("upgraded", False), "leftover": expect.get("leftover", b"")}
    for chunks in splits(data, path.stem):
        got = replay_requests(chunks, limits)
        assert got == want, f"{len(chunks)} chunks: {[len(c) for c in chunks][:20]}"
        for message in got["messages"]:
            assert_safe_request(message)


def assert_safe_request(message: dict) -> None:
    """What the rest of the proxy relies on, whatever the input was."""
    assert message["version"] in (b"1.0", b"1.1")
    assert message["method"] != b"CONNECT"
    assert message["target"][:1] == b"/" or message["target"] == b"*"
    assert HOST.match(message["host"])
    assert not (message["chunked"] and message["content_length"] is not None)
    assert message["content_length"] is None or message["content_length"] >= 0
    assert not (message["upgrade"] and (message["chunked"] or message["content_length"]))
    if message["complete"] and message["content_length"] is not None:
        assert len(message["body"]) == message["content_length"]


# invalid requests --------------------------------------------------------------
@pytest.mark.parametrize("path", cases("requests/invalid"), ids=case_id)
def test_invalid_request(path: Path) -> None:
    data, expect = load_http(path), load_expect(path.with_suffix(".py"))
    limits = expect.get("limits", Limits())
    status = expect["status"]
    assert 400 <= status <= 599
    for chunks in splits(data, path.stem):
        with pytest.raises(ProtocolError) as info:
            replay_requests(chunks, limits)
        assert info.value.status == status, (
            f"{len(chunks)} chunks: got {info.value.status} {info.value.reason}")


# responses ---------------------------------------------------------------------
@pytest.mark.parametrize("path", cases("responses/valid"), ids=case_id)
def test_valid_response(path: Path) -> None:
    data, expect = load_http(path), load_expect(path.with_suffix(".py"))
    for_head, eof = expect.get("for_head", False), expect.get("eof", False)
    limits = expect.get("limits", Limits())
    want = {"messages": expected(expect["responses"], RESPONSE_DEFAULTS),
            "complete": expect.get("complete", True),
            "upgraded": expect.get("upgraded", False), "leftover": expect.get("leftover", b"")}
    for chunks in splits(data, path.stem):
        got = replay_responses(chunks, for_head, eof, limits)
        assert got == want, f"{len(chunks)} chunks: {[len(c) for c in chunks][:20]}"


@pytest.mark.parametrize("path", cases("responses/invalid"), ids=case_id)
def test_invalid_response(path: Path) -> None:
    data, expect = load_http(path), load_expect(path.with_suffix(".py"))
    for_head, eof = expect.get("for_head", False), expect.get("eof", False)
    limits = expect.get("limits", Limits())
    assert expect["status"] == 502
    for chunks in splits(data, path.stem):
        with pytest.raises(ProtocolError) as info:
            replay_responses(chunks, for_head, eof, limits)
        assert info.value.status == 502


def test_corpus_files_come_in_pairs() -> None:
    for kind in ("requests/valid", "requests/invalid", "responses/valid", "responses/invalid"):
        http = {p.stem for p in (HERE / kind).glob("*.http")}
        py = {p.stem for p in (HERE / kind).glob("*.py")}
        assert http == py, f"{kind}: unpaired {sorted(http ^ py)}"


def test_http_files_use_escapes() -> None:
    """A raw CR or a byte outside printable ASCII in a .http file would be invisible."""
    for path in HERE.glob("re*/*/*.http"):
        raw = path.read_bytes()
        assert all(32 <= b < 127 or b == 10 for b in raw), path.name


# mutation fuzzing ----------------------------------------------------------------
FUZZ_CASES = 5000
INTERESTING = b"\r\n\0 \t:,;\x7f\xff0123456789aAzZ-/?#%@\"'()[]{}\\"
TIGHT = Limits(max_request_line=40, max_header_bytes=120, max_headers=6)


def mutate(data: bytes, rnd: random.Random) -> bytes:
    """One to three edits: replace, insert or delete a byte, or repeat a slice."""
    out = bytearray(data)
    for _ in range(rnd.randint(1, 3)):
        op, at = rnd.randrange(5), rnd.randrange(len(out) + 1)
        if op == 0 and out:
            out[min(at, len(out) - 1)] = rnd.choice(INTERESTING)
        elif op == 1:
            out[at:at] = bytes([rnd.choice(INTERESTING)])
        elif op == 2 and out:
            del out[min(at, len(out) - 1)]
        elif op == 3:
            end = rnd.randrange(at, len(out) + 1)
            out[at:at] = out[at:end][:64]
        else:
            out[at:at] = bytes([rnd.randrange(256)])
    return bytes(out)


def random_chunks(data: bytes, rnd: random.Random) -> list[bytes]:
    count = min(len(data) - 1, rnd.randint(1, 10))
    cuts = sorted(rnd.sample(range(1, len(data)), count)) if count > 0 else []
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def outcome(replay, chunks: list[bytes]) -> tuple:
    """What a replay gives: its result, or the ProtocolError status (anything else fails)."""
    try:
        return ("parsed", replay(chunks))
    except ProtocolError as exc:
        assert 400 <= exc.status <= 599
        return ("refused", exc.status)


def test_mutated_requests_parse_or_are_refused() -> None:
    seeds = [load_http(p) for p in cases("requests/valid")]
    seeds = [s for s in seeds if len(s) < 4000]
    rnd = random.Random(20240601)
    kinds = set()
    for _ in range(FUZZ_CASES):
        data = mutate(rnd.choice(seeds), rnd)
        whole = outcome(lambda c: replay_requests(c, Limits()), [data])
        split = outcome(lambda c: replay_requests(c, Limits()), random_chunks(data, rnd))
        assert whole == split, data
        if whole[0] == "parsed":
            for message in whole[1]["messages"]:
                assert_safe_request(message)
        kinds.add(whole[0])
        # Tight limits: the limit checks fire at every point of the head.
        tight = outcome(lambda c: replay_requests(c, TIGHT), random_chunks(data, rnd))
        if tight[0] == "parsed":
            for message in tight[1]["messages"]:
                assert_safe_request(message)
    assert kinds == {"parsed", "refused"}


def test_mutated_responses_parse_or_are_refused() -> None:
    seeds = []
    for path in cases("responses/valid"):
        expect = load_expect(path.with_suffix(".py"))
        seeds.append((load_http(path), expect.get("for_head", False), expect.get("eof", False)))
    rnd = random.Random(20240602)
    kinds = set()
    for _ in range(FUZZ_CASES):
        data, for_head, eof = rnd.choice(seeds)
        data = mutate(data, rnd)

        def replay(chunks, for_head=for_head, eof=eof):
            return replay_responses(chunks, for_head, eof, Limits())

        whole = outcome(replay, [data])
        assert whole == outcome(replay, random_chunks(data, rnd)), data
        kinds.add(whole[0])
    assert kinds == {"parsed", "refused"}
