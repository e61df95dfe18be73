"""Review probes of the 2026-12-07 merges (http2, probe-rules), through real
sockets: the fields around a rewritten Content-Length are cut or kept as
without it, on both kinds of listener and in a pipelined head split across
reads; `ip_hash` on a trusted listener reads the last X-Forwarded-For entry of
the last field, and a blank or over-long one as none."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.rawpeer import RawBackend
from tests.support import Balancer, wait_for

pytestmark = pytest.mark.data_plane

WAIT = 10.0
FIELDS = (b"X-Forwarded-For: 6.6.6.6\r\nConnection: x-drop, te\r\nX-Drop: 1\r\n"
          b"TE: trailers\r\nKeep-Alive: 5\r\nX-Real-IP: 6.6.6.6\r\nX-Keep: k\r\n")


def answer_ok(conn: socket.socket, _request: bytes) -> bool:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    return True


def exchange(port: int, pieces: list[bytes], answers: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        for piece in pieces:
            sock.sendall(piece)
        got = b""
        while got.count(b"\r\n\r\nok") < answers:
            more = sock.recv(65536)
            assert more, got
            got += more
        return got


def heads(backend: RawBackend) -> list[tuple[bytes, bytes]]:
    return [request.partition(b"\r\n\r\n")[::2] for request in backend.requests]


@pytest.mark.parametrize("value", [b"0002\t", b"2 ", b"02"])
@pytest.mark.parametrize("internal", [False, True])
def test_fields_after_a_rewritten_length_are_cut_as_without_it(
        tmp_path: Path, value: bytes, internal: bool) -> None:
    backend = RawBackend(answer_ok)
    bal = Balancer(tmp_path, {"app.test": {"action": "proxy", "backends": [backend.address]}},
                   internal=internal)
    try:
        port = bal.ports["internal"] if internal else bal.port
        plain = b"POST /a HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2\r\n" + FIELDS
        odd = b"POST /a HTTP/1.1\r\nHost: app.test\r\ncontent-length: " + value + b"\r\n" + FIELDS
        exchange(port, [plain + b"\r\nab"], 1)
        exchange(port, [odd + b"\r\nab"], 1)
        wait_for(lambda: len(backend.requests) == 2, WAIT, what="both at the backend")
        (want, want_body), (got, got_body) = heads(backend)
        cut = [line for line in want.split(b"\r\n") if not line.startswith(b"X-Request-Id")]
        assert [line for line in got.split(b"\r\n")
                if not line.startswith(b"X-Request-Id")] == cut
        assert got_body == want_body == b"ab"
    finally:
        bal.stop()
        backend.stop()


def test_a_rewrite_in_a_pipelined_second_head_split_across_reads(proxy_to: Any) -> None:
    backend = RawBackend(answer_ok)
    bal = proxy_to(backend)
    first = b"POST /1 HTTP/1.1\r\nHost: app.test\r\nContent-Length: 1\r\n\r\nx"
    second = (b"POST /2 HTTP/1.1\r\nHost: app.test\r\nX-A: a\r\nContent-Length: 0003 \r\n"
              + FIELDS + b"\r\nabc")
    third = b"GET /3 HTTP/1.1\r\nHost: app.test\r\nContent-Length: 00\r\nX-B: b\r\n\r\n"
    data = first + second + third
    cut = len(first) + 40
    exchange(bal.port, [data[:cut], data[cut:cut + 7], data[cut + 7:]], 3)
    wait_for(lambda: len(backend.requests) == 3, WAIT, what="three at the backend")
    (_, b1), (h2, b2), (h3, b3) = heads(backend)
    assert (b1, b2, b3) == (b"x", b"abc", b"")
    assert b"\r\nContent-Length: 3\r\n" in h2 + b"\r\n" and b"\r\nX-Keep: k\r\n" in h2 + b"\r\n"
    assert b"X-Drop" not in h2 and b"6.6.6.6" not in h2 and b"Keep-Alive" not in h2
    assert b"\r\nContent-Length: 0\r\n" in h3 + b"\r\n" and b"\r\nX-B: b\r\n" in h3 + b"\r\n"


def test_ip_hash_reads_the_last_entry_of_the_last_forwarded_for_field(tmp_path: Path) -> None:
    """Several X-Forwarded-For fields are one list (RFC 9110 §5.3): the last entry
    of the last field is the client; an empty, blank or over-long last entry is
    none (the front proxy's address is hashed, as without the field)."""
    from tests.support import Backend
    backends = [Backend(f"b{n}") for n in range(4)]
    rule = {"action": "proxy", "algorithm": "ip_hash", "backends": [b.address for b in backends]}
    bal = Balancer(tmp_path, {"ip.test": rule}, internal=True)
    port = bal.ports["internal"]

    def picked(*values: str) -> str:
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
        with sock:
            fields = b"".join(b"X-Forwarded-For: %s\r\n" % v.encode() for v in values)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: ip.test\r\n" + fields
                         + b"Connection: close\r\n\r\n")
            got = b""
            while more := sock.recv(65536):
                got += more
        assert got.startswith(b"HTTP/1.1 200 "), got[:100]
        return str(json.loads(got.partition(b"\r\n\r\n")[2])["backend"])

    try:
        plain = picked()
        spread = set()
        for n in range(12):
            one = picked(f"198.51.100.{n}")
            spread.add(one)
            assert picked("203.0.113.9", f"198.51.100.{n}") == one
            assert picked(f"203.0.113.9, 198.51.100.{n}\t") == one
            assert picked(f"198.51.100.{n}, ") == plain  # a blank last entry: none
            assert picked(f"198.51.100.{n}, " + "1" * 65) == plain  # over-long: none
        assert len(spread) > 1
        assert {picked(f"2001:db8::{n:x}") for n in range(12)} != {plain}
    finally:
        bal.stop()
        for backend in backends:
            backend.stop()
