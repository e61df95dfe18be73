"""Lingering close (balancer/lingering.py), through a real balancer and real sockets.

A client whose request the balancer answers before reading it all (a
backend's early 413, a rule's `max_body_bytes`, a local answer with a large
body unread, a broken chunk framing, an oversized head) and that sends its
whole body before it reads (as most clients do) gets the whole response and
then a clean EOF, on plain and TLS listeners: the balancer half-closes, reads
and drops what still comes, and closes once the client is done. Without
lingering, the close with unread bytes resets the connection: the client's
next send fails and it never reads its answer.

A hostile client that never stops sending is cut off within the bounds
(`timeouts.linger`, `timeouts.linger_idle`, `limits.max_linger_bytes`), and
the worker serves others meanwhile; lingering connections are open
connections (stats, metrics) until they end; a draining worker cuts them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.certificates import make_record
from balancer.stores.file import FileStore
from tests.rawpeer import read_through, serve_each
from tests.support import Balancer, dead_address, metric, request, wait_for
from tests.tlsca import TestCA

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

WAIT = 10.0  # seconds any step may take before the test fails
BLOCK = b"x" * 65536
BODY_BLOCKS = 24  # the honest clients' body: 1.5 MiB, over the drain limit (1 MiB)
PACE = 0.01  # seconds between an honest client's blocks: a slow upload
TOO_BIG = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 8\r\n\r\ntoo big!"
# the `tight` balancer's bounds: linger far enough past linger_idle that a loaded
# machine's stats calls cannot take one for the other
TIGHT_LINGER, TIGHT_IDLE, TIGHT_BYTES = 3.0, 0.75, 4 << 20
CA = TestCA()


class EarlyBackend:
    """Reads a request head, answers 413 at once and closes (not reading the body)."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        serve_each(self.listener, self._serve)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        with conn:
            if read_through(conn) is not None:
                conn.sendall(TOO_BIG)

    def stop(self) -> None:
        self.listener.close()


class SinkBackend(EarlyBackend):
    """Reads and drops what comes until the balancer closes; never answers."""

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(WAIT)
        with conn:
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                return


@pytest.fixture(scope="module")
def backend() -> Iterator[EarlyBackend]:
    b = EarlyBackend()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def sink() -> Iterator[SinkBackend]:
    b = SinkBackend()
    yield b
    b.stop()


def routes(tmp: Path, backend: EarlyBackend, sink: SinkBackend) -> dict[str, Any]:
    hosts: dict[str, Any] = {
        "early.test": {"action": "proxy", "backends": [backend.address]},
        "sink.test": {"action": "proxy", "backends": [sink.address]},
        "limit.test": {"action": "proxy", "backends": [backend.address],
                       "max_body_bytes": 1000},
        "static.test": {"action": "static", "body": "static answer"},
        "dead.test": {"action": "proxy", "backends": [dead_address()]},
        # one request per 1,000 s for the whole rule: the first one uses it up
        "limited.test": {"action": "static", "body": "static answer",
                         "limits": {"rate": 0.001, "burst": 1, "per": "host"}},
    }
    path = tmp / "routes.json"
    path.write_text(json.dumps({"version": 1, "hosts": hosts}))
    chain, key = CA.issue(*hosts)
    for host in hosts:
        FileStore(str(path)).certs().put(host, make_record(host, chain, key))
    return hosts


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, backend: EarlyBackend,
         sink: SinkBackend) -> Iterator[Balancer]:
    """A balancer with the default bounds (30 s, 5 s idle, 64 MiB), plain and TLS."""
    tmp = tmp_path_factory.mktemp("linger")
    bal = Balancer(tmp, routes(tmp, backend, sink), args=["--tls-listen", "127.0.0.1:0"])
    yield bal
    bal.stop()


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory, backend: EarlyBackend,
          sink: SinkBackend) -> Iterator[Balancer]:
    """A balancer with small bounds, for the hostile clients."""
    tmp = tmp_path_factory.mktemp("tight")
    bal = Balancer(tmp, routes(tmp, backend, sink),
                   config=f"[timeouts]\nlinger = {TIGHT_LINGER}\nlinger_idle = {TIGHT_IDLE}\n"
                          f"[limits]\nmax_linger_bytes = {TIGHT_BYTES}\n")
    yield bal
    bal.stop()


def connect(bal: Balancer, tls: bool, host: str) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", bal.ports["tls" if tls else "proxy"]),
                                    timeout=WAIT)
    if not tls:
        return sock
    context = ssl.create_default_context(cafile=str(CA.write(bal.tmp)))
    return context.wrap_socket(sock, server_hostname=host)


def send_all_then_read(sock: socket.socket, head: bytes, body: list[bytes]) -> bytes:
    """Send `head`, then each piece of `body` PACE seconds apart (a slow upload,
    not reading meanwhile), then read until EOF: the answer. A reset fails the
    test (ConnectionResetError, BrokenPipeError)."""
    sock.sendall(head)
    for piece in body:
        sock.sendall(piece)
        time.sleep(PACE)  # pacing the upload, not waiting for anything
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def post_head(host: str, framing: str) -> bytes:
    return f"POST /upload HTTP/1.1\r\nHost: {host}\r\n{framing}\r\n\r\n".encode()


LENGTH = f"Content-Length: {BODY_BLOCKS * len(BLOCK)}"
CHUNK = b"10000\r\n" + BLOCK + b"\r\n"
CASES = {
    # the backend answers 413 after the head, and closes
    "early-answer": ("early.test", post_head("early.test", LENGTH), [BLOCK] * BODY_BLOCKS,
                     b"HTTP/1.1 413 Payload Too Large\r\n", b"too big!"),
    # the rule's max_body_bytes: 413 before the body is read
    "max-body-bytes": ("limit.test", post_head("limit.test", LENGTH), [BLOCK] * BODY_BLOCKS,
                       b"HTTP/1.1 413 ", b"</html>\n"),
    # a local answer; the chunked body is over the drain limit: left unread
    "static-unread-body": ("static.test", post_head("static.test",
                                                    "Transfer-Encoding: chunked"),
                           [CHUNK] * BODY_BLOCKS, b"HTTP/1.1 200 OK\r\n", b"static answer"),
    # the backend cannot be reached: 502, the chunked body unread
    "bad-gateway": ("dead.test", post_head("dead.test", "Transfer-Encoding: chunked"),
                    [CHUNK] * BODY_BLOCKS, b"HTTP/1.1 502 ", b"</html>\n"),
    # the rule's limits: 429 (once the first request used the bucket up)
    "rate-limited": ("limited.test", post_head("limited.test", LENGTH), [BLOCK] * BODY_BLOCKS,
                     b"HTTP/1.1 429 ", b"</html>\n"),
    # the chunk framing breaks after the first chunk: 400
    "broken-chunk-framing": ("sink.test", post_head("sink.test", "Transfer-Encoding: chunked"),
                             [CHUNK, b"zz\r\n"] + [BLOCK] * BODY_BLOCKS,
                             b"HTTP/1.1 400 Bad Request\r\n", b"</html>\n"),
    # a head over max_header_bytes (64 KiB): 431, the rest of it unread
    "head-too-large": ("early.test", b"GET / HTTP/1.1\r\nHost: early.test\r\nX-Big: ",
                       [BLOCK] * BODY_BLOCKS, b"HTTP/1.1 431 ", b"</html>\n"),
}


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_client_sending_its_whole_body_first_reads_the_answer_then_eof(
        site: Balancer, case: str, tls: bool) -> None:
    host, head, body, status, end = CASES[case]
    if case == "rate-limited":  # use the bucket up (the first of these tests gets a 200)
        request(site.port, host=host, timeout=WAIT)
    with connect(site, tls, host) as sock:
        answer = send_all_then_read(sock, head, body)
    assert answer.startswith(status), answer[:300]
    assert b"\r\nConnection: close\r\n" in answer.partition(b"\r\n\r\n")[0] + b"\r\n"
    assert answer.endswith(end), answer[-300:]
    # the connection is done lingering once the client closed (EOF)
    wait_for(lambda: stats(site)["lingering_connections"] == 0, WAIT, what="no lingering")


def stats(bal: Balancer) -> dict[str, Any]:
    return bal.api("GET", "/api/v1/stats")[1]


def answered_by_all(bal: Balancer) -> dict[str, Any] | None:
    """The stats when every worker answered (none skipped, `lagging`), else None."""
    answer = stats(bal)
    return None if "lagging" in answer else answer


def end(sock: socket.socket, how: str) -> None:
    """The client ends its side: closes, half-closes (and stays) or resets."""
    if how == "half-close":
        sock.shutdown(socket.SHUT_WR)
        return
    if how == "reset":  # SO_LINGER 0: the close sends a TCP reset
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
@pytest.mark.parametrize("how", ["close", "half-close", "reset"])
def test_a_lingering_connection_is_an_open_connection_until_the_client_ends_it(
        site: Balancer, how: str, tls: bool) -> None:
    with connect(site, tls, "early.test") as sock:
        sock.sendall(post_head("early.test", LENGTH) + BLOCK)
        answer = read_through(sock, b"too big!")
        assert answer is not None and answer.startswith(b"HTTP/1.1 413 ")
        # answered, half-closed, the body unread: lingering (the client stays)
        assert sock.recv(65536) == b""  # the balancer's FIN
        wait_for(lambda: stats(site)["lingering_connections"] == 1, WAIT, what="lingering")
        assert stats(site)["open_connections"] >= 1
        assert metric(site.metrics(), "balancer_lingering_connections") == 1
        assert metric(site.metrics(), "balancer_open_connections") >= 1
        end(sock, how)
        # at once: well before linger_idle (5 s) would end it
        wait_for(lambda: stats(site)["lingering_connections"] == 0, 2.5,
                 what="lingering ended by the client")
    assert metric(site.metrics(), "balancer_lingering_connections") == 0


def test_a_connection_close_request_read_whole_closes_at_once(site: Balancer) -> None:
    with connect(site, False, "static.test") as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: static.test\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        assert answer.endswith(b"static answer")
        # the client stays: a lingering connection would stay too (linger_idle, 5 s)
        wait_for(lambda: stats(site)["open_connections"] == 0, 2.5, what="closed")
        assert stats(site)["lingering_connections"] == 0


def hostile(bal: Balancer, piece: bytes, pace: float) -> tuple[bytes, float, BaseException]:
    """A client that sends `piece` every `pace` seconds and never stops (for WAIT
    seconds at most); returns the answer it read, the seconds from that answer
    to the cut, and what ended its sending."""
    sock = connect(bal, False, "static.test")
    sock.sendall(post_head("static.test", "Content-Length: 1000000000000"))
    ended: list[BaseException] = []
    done = threading.Event()

    def pump() -> None:
        deadline = time.monotonic() + WAIT
        try:
            while time.monotonic() < deadline:
                sock.sendall(piece)
                if pace:
                    time.sleep(pace)  # a trickle, not waiting for anything
            ended.append(AssertionError("not cut off"))
        except OSError as exc:
            ended.append(exc)
        finally:
            done.set()

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    try:
        answer = read_through(sock, b"static answer") or b""
        answered = time.monotonic()
        assert done.wait(WAIT + 1), "the sender never ended"
        return answer, time.monotonic() - answered, ended[0]
    finally:
        sock.close()
        sender.join(WAIT)


def test_a_client_that_trickles_forever_is_cut_at_the_linger_time(tight: Balancer) -> None:
    served: list[int] = []
    thread = threading.Thread(target=lambda: served.append(
        request(tight.port, host="static.test", timeout=WAIT)[0]), daemon=True)
    answer, took, ended = hostile_with(tight, thread)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert isinstance(ended, (ConnectionResetError, BrokenPipeError)), ended
    # it lingered (it was not reset at once), and no longer than the bound (the
    # watchdog ticks every 0.19 s)
    assert 1.0 < took < TIGHT_LINGER + 1.5, took
    assert served == [200]  # the worker served another client meanwhile
    wait_for(lambda: stats(tight)["lingering_connections"] == 0, WAIT, what="lingering ended")


def hostile_with(bal: Balancer, during: threading.Thread) -> tuple[bytes, float, BaseException]:
    """`hostile` trickling 1 KiB every 20 ms, with `during` run once it lingers."""
    def start_during() -> None:
        wait_for(lambda: stats(bal)["lingering_connections"] == 1, WAIT, what="lingering")
        during.start()
    starter = threading.Thread(target=start_during, daemon=True)
    starter.start()
    result = hostile(bal, b"y" * 1024, 0.02)
    starter.join(WAIT)
    during.join(WAIT)
    return result


def test_a_client_that_sends_at_full_speed_is_cut_at_max_linger_bytes(tight: Balancer) -> None:
    answer, took, ended = hostile(tight, BLOCK, 0)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert isinstance(ended, (ConnectionResetError, BrokenPipeError)), ended
    assert took < TIGHT_LINGER, took  # the bytes, not the time
    wait_for(lambda: stats(tight)["lingering_connections"] == 0, WAIT, what="lingering ended")
    assert request(tight.port, host="static.test", timeout=WAIT)[0] == 200


def test_a_silent_client_is_closed_after_linger_idle(tight: Balancer) -> None:
    with connect(tight, False, "early.test") as sock:
        sock.sendall(post_head("early.test", LENGTH) + BLOCK)
        answer = read_through(sock, b"too big!")
        assert answer is not None and answer.startswith(b"HTTP/1.1 413 ")
        assert sock.recv(65536) == b""  # the balancer's FIN; the client stays, silent
        answered = time.monotonic()
        wait_for(lambda: stats(tight)["lingering_connections"] == 1, WAIT, what="lingering")
        wait_for(lambda: stats(tight)["lingering_connections"] == 0, TIGHT_LINGER + 2.0,
                 what="closed after linger_idle")
        # linger_idle (0.75 s) ended it, not linger (3 s; the watchdog ticks every 0.19 s)
        assert time.monotonic() - answered < TIGHT_LINGER - 0.25


def test_a_client_sending_all_along_outlives_a_worker_stall_past_linger_idle(
        tmp_path: Path, backend: EarlyBackend, sink: SinkBackend) -> None:
    """A loaded machine: the worker gets no CPU for longer than `linger_idle`
    while its lingering client goes on sending. Running again, it reads what
    came before it judges the silence (bug: the watchdog's tick came first, or
    the readiness armed from the tick before the stall, and the client was cut
    at once)."""
    idle = 1.0
    bal = Balancer(tmp_path, routes(tmp_path, backend, sink),
                   config=f"[timeouts]\nlinger_idle = {idle}\n")  # linger: 30 s
    sock = connect(bal, False, "static.test")
    sending = threading.Event()
    ended: list[OSError] = []

    def pump() -> None:
        while sending.is_set():
            try:
                sock.sendall(b"y" * 1024)
            except OSError as exc:
                ended.append(exc)
                return
            time.sleep(0.02)  # a trickle, not waiting for anything

    sender = threading.Thread(target=pump, daemon=True)
    try:
        [worker] = [p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]]
        sock.sendall(post_head("static.test", "Content-Length: 1000000000000"))
        assert (read_through(sock, b"static answer") or b"").startswith(b"HTTP/1.1 200 ")
        wait_for(lambda: stats(bal)["lingering_connections"] == 1, WAIT, what="lingering")
        sending.set()
        sender.start()
        os.kill(worker, signal.SIGSTOP)
        try:
            time.sleep(2.5 * idle)  # the stall itself, not a wait for anything
        finally:
            os.kill(worker, signal.SIGCONT)
        # the worker answers this after its first ticks since the stall; an ask
        # (the history's sampling) timed out during the stall leaves it skipped
        # by the management process until its probe gets an answer: wait for that
        answer = wait_for(lambda: answered_by_all(bal), WAIT,
                          what="the worker answering the management process again")
        assert answer["lingering_connections"] == 1
        assert not ended, ended
    finally:
        sending.clear()
        if sender.is_alive():
            sender.join(WAIT)
        sock.close()
        bal.stop()


def test_a_draining_worker_cuts_lingering_connections(tmp_path: Path, backend: EarlyBackend,
                                                      sink: SinkBackend) -> None:
    # linger_idle far past DRAIN_IDLE: a loaded machine's slow exit is not taken for it
    bal = Balancer(tmp_path, routes(tmp_path, backend, sink),
                   config="[timeouts]\nlinger_idle = 20\n")  # linger: 30 s
    try:
        with connect(bal, False, "early.test") as sock:
            sock.sendall(post_head("early.test", LENGTH) + BLOCK)
            assert read_through(sock, b"too big!") is not None
            wait_for(lambda: stats(bal)["lingering_connections"] == 1, WAIT, what="lingering")
            started = time.monotonic()
            bal.proc.send_signal(signal.SIGTERM)
            bal.proc.wait(WAIT)
            took = time.monotonic() - started
    finally:
        bal.stop()
    assert took < 10.0, took  # DRAIN_IDLE (1 s), not linger_idle (20 s) nor linger (30 s)


class CrowdedIO:
    """An IO whose worker is crowded (more than 1,024 connections)."""

    def is_crowded(self) -> bool:
        return True


class Answered:
    """What `Lingering.start` is handed: an answered connection (a socketpair's end)."""

    def __init__(self, sock: socket.socket, io: Any) -> None:
        self.sock = sock
        self.io = io


@pytest.mark.parametrize(("total", "crowded"), [(0.0, False), (30.0, True)],
                         ids=["linger-0", "crowded"])
def test_no_lingering_when_off_or_crowded(total: float, crowded: bool) -> None:
    from balancer.lingering import Lingering

    ours, theirs = socket.socketpair()
    with ours, theirs:
        io = CrowdedIO() if crowded else None
        assert not Lingering(total, 5.0, 1 << 20, None).start(Answered(ours, io))
        theirs.setblocking(False)
        with pytest.raises(BlockingIOError):  # no half-close: the caller closes at once
            theirs.recv(1)
