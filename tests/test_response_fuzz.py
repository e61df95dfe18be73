"""The response side fuzzed through a real balancer (client keep-alive, backend
pooling): seeded mutated backend responses (`tests/respfuzz_cases.py`) from a
scripted backend, each followed on the same client connection by a request
that must get its own answer (`tests/respfuzz.py` checks the invariants).
``RESPONSE_FUZZ_CASES=N`` (and ``RESPONSE_FUZZ_SEED=S``) runs longer.

Defects found and fixed (each focused test below fails without its fix):

* A reason phrase with a control byte (NUL, DEL, ``\\x01``: llhttp takes any
  byte but CR and LF there) reached the client raw, and the backend
  connection went back to the pool: RFC 9112 §4 allows HTAB, SP, VCHAR and
  obs-text only. Now a 502, and the connection is closed.
* A status line without reason phrase and without the space before it
  (``HTTP/1.1 200``, which llhttp accepts) was forwarded so: RFC 9112 §4
  requires the space. The client gets ``HTTP/1.1 200 ``.
"""

from __future__ import annotations

import os
import socket

import pytest

from tests.respfuzz import Backend, Reader, read_response, request, run, run_case
from tests.respfuzz_cases import (
    Case,
    Want,
    check_head,
    chunk,
    chunked,
    every_split,
    generate,
    response,
)
from tests.support import Balancer, wait_for

# compiled only (not `data_plane`): the parse paths' compiled and interpreted
# behaviour is held equal by the corpus tests (test_http_corpus.py), and the
# fuzz's cases in both passes cost the CI budget ~20 s

SEED = int(os.environ.get("RESPONSE_FUZZ_SEED", "20261206"))
CASES = int(os.environ.get("RESPONSE_FUZZ_CASES", "250"))
# Cut at every byte boundary (the balancer reads each piece apart).
SPLIT = [
    (chunked(chunks=(chunk(b"hello", ext=b";a=b"), chunk(b"world")),
             trailers=b"X-Sum: 1\r\nSet-Cookie: a=b\r\n"), Want(200, b"helloworld"), True),
    (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + response(body=b"final"),
     Want(200, b"final"), True),
    (check_head(b"check 1x") + b"check 1x", Want(200, b"check 1x"), True),
    (response(b"204 No Content", b"Content-Length: 4\r\n", length=False), Want(204), True),
]


def serve(tmp_path, cases: list[Case]) -> tuple[Balancer, Backend]:
    backend = Backend(cases)
    bal = Balancer(tmp_path, {"app.test": {"action": "proxy", "backends": [backend.address]}},
                   args=["--workers", "1"])
    return bal, backend


def assert_sane(bal: Balancer, requests: int) -> None:
    """Invariant (d): the worker still serves, nothing is left open, and every
    request was counted once, by status class."""
    def settled() -> dict:
        stats = bal.api("GET", "/api/v1/stats")[1]
        host = stats["hosts"]["app.test"]
        backend = next(iter(host["backends"].values()))
        if stats["open_connections"] or host["open_requests"] or backend["in_flight"]:
            return {}
        return host
    host = wait_for(settled, what="connections and requests to end")
    assert host["completed_requests"] == sum(host["responses"].values()) == requests
    log = bal.output()
    assert "Traceback" not in log and "unexpectedly" not in log, log[-3000:]


def report(results: dict[int, tuple[str, list[str]]], cases: list[Case]) -> str:
    return "\n".join(f"{n} {cases[n].name} {cases[n].data[:200]!r}: {outcome} {problems}"
                     for n, (outcome, problems) in results.items() if problems)


def run_all(tmp_path, cases: list[Case]) -> None:
    """Every case through a balancer: each answered as it must be, and the balancer sane."""
    bal, backend = serve(tmp_path, cases)
    try:
        results = run(bal.port, backend)
        assert not report(results, cases), report(results, cases)
        assert_sane(bal, 2 * len(cases))
    finally:
        bal.stop()
        backend.stop()


def test_mutated_responses_never_desynchronise_a_client_or_the_pool(tmp_path) -> None:
    run_all(tmp_path, generate(SEED, CASES))


def test_responses_cut_at_every_byte_keep_their_meaning(tmp_path) -> None:
    run_all(tmp_path, [case for data, want, reusable in SPLIT
                       for case in every_split(data, want, reusable)])


# The focused cases: a control byte in the reason phrase (each a 502, its
# connection closed), and a status line without reason (twice: the second
# through the repeated-head path).
CONTROLS = (b"\x00", b"\x7f", b"\x01", b"\x1b")
FOCUSED = [
    *(Case(f"ctl {byte!r}", (b"HTTP/1.1 200 O" + byte + b"K\r\nContent-Length: 2\r\n\r\nok",),
           Want(None)) for byte in CONTROLS),
    *[Case("no reason", (b"HTTP/1.1 299\r\nContent-Length: 2\r\n\r\nok",), Want(299, b"ok"),
           reusable=True)] * 2]


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    bal, backend = serve(tmp_path_factory.mktemp("fuzz-focused"), FOCUSED)
    yield bal, backend
    bal.stop()
    backend.stop()


def exchange(port: int, number: int) -> tuple[bytes, list[str]]:
    """Case `number` on a new connection: its raw status line and what is wrong
    with the response (`tests.respfuzz.read_response`'s problems)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request(b"/case/%d" % number))
        reader = Reader(sock)
        while b"\r\n" not in reader.buf and reader.more():
            pass
        line = reader.buf.partition(b"\r\n")[0]
        return line, read_response(reader, b"GET", b"1.1").problems


@pytest.mark.parametrize("number", range(len(CONTROLS)))
def test_a_reason_phrase_with_a_control_byte_is_a_bad_gateway(site, number: int) -> None:
    bal, backend = site
    line, problems = exchange(bal.port, number)
    assert line == b"HTTP/1.1 502 Bad Gateway" and not problems, (line, problems)
    # the connection is not reused: the next request to the backend gets its own answer
    outcome, problems = run_case(bal.port, backend, number)
    assert outcome == "502" and not problems, problems
    assert not [misuse for misuse in backend.misuses if misuse.endswith(f"/case/{number}")]


def test_a_status_line_without_reason_reaches_the_client_with_its_space(site) -> None:
    bal, _ = site
    for number in (len(CONTROLS), len(CONTROLS) + 1):
        line, problems = exchange(bal.port, number)
        assert line == b"HTTP/1.1 299 " and not problems, (line, problems)
