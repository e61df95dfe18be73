"""What scrapes that never read their body, or read it as HTTP/1.0, leave held
or see (through the real management process): `management.metrics.Metrics`."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator

import gevent
import pytest
from gevent.event import Event

from balancer.control import pid_of, worker_sockets
from management.cluster import ClusterRuntime
from tests.support import Balancer, control_socket, wait_for
from tests.test_scrape_slices import read_all

HOSTS = 4000  # a body beyond the socket buffers: a slow scraper's body waits
GET = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"


@pytest.fixture(scope="module")
def bal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    from tests.test_probe_scrape import touch

    names = [f"s{i}.test" for i in range(HOSTS)]
    b = Balancer(tmp_path_factory.mktemp("held"),
                 {name: {"action": "static", "body": "x"} for name in names})
    b.wait_version(1, timeout=30)
    touch(b.port, names)
    yield b
    b.stop()


def head(port: int, request: bytes) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(60)
    sock.connect(("127.0.0.1", port))
    sock.sendall(request)
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(1)
        assert chunk, got
        got += chunk
    assert b" 200 " in got.split(b"\r\n", 1)[0], got
    return sock


def test_head_requests_hold_no_snapshot(bal: Balancer) -> None:
    """HEAD /metrics sends no body: its snapshot is dropped at once, so four of
    them cut no later scrape (bug: each unstarted body stayed listed as being
    sent, holding its snapshot until four newer scrapes cut it)."""
    for _ in range(4):
        status, _ = bal.api("HEAD", "/metrics")
        assert status == 200
    slow = head(bal.mport, GET)
    body = read_all(slow)
    assert body.endswith(b"\r\n0\r\n\r\n"), body[-60:]
    assert "still being sent after" not in bal.output()


def test_a_cut_http10_body_does_not_look_whole(bal: Balancer) -> None:
    """An HTTP/1.0 scraper's body has no chunks: the connection's end ends it. One
    cut (`Rows.cut`) must still look broken (bug: it ended at a line's end,
    a shorter valid exposition)."""
    before = bal.output().count("still being sent after")
    first = head(bal.mport, b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
    others = [head(bal.mport, GET)
              for _ in range(4)]
    wait_for(lambda: bal.output().count("still being sent after") > before, 10,
             what="the cut")
    body = read_all(first)
    for sock in others:
        read_all(sock)
    assert b"# TYPE balancer_backend_up gauge" not in body
    assert body.endswith(b"\nbalancer_scrape_cut_short{"), body[-80:]


def paused_runtime(bal: Balancer) -> tuple[ClusterRuntime, str, Event, Event]:
    """A `ClusterRuntime` of this test process over `bal`'s worker whose pause
    (between two lines of a survey's answer) sets `paused` and waits for `go`;
    the run directory, and the two events."""
    from balancer.stores import open_store

    (worker,) = bal.api("GET", "/api/v1/info")[1]["processes"]
    directory = os.path.dirname(control_socket(worker["pid"]))
    paused, go = Event(), Event()

    def pause() -> None:
        if not go.is_set():
            paused.set()
            go.wait(60)
    runtime = ClusterRuntime(directory, open_store(f"file:{bal.routes}"), 1, pause=pause)
    return runtime, directory, paused, go


def test_hand_over_surveys_anew_not_the_survey_under_way(bal: Balancer) -> None:
    """`hold_all` (a management process's last survey, `hand_over`) retires the
    workers killed since the survey under way began: its own survey, never that
    one's shared snapshot (bug: it waited for the sample's survey, which listed
    the killed worker alive, and that worker's counters were retired by no
    management process)."""
    runtime, directory, paused, go = paused_runtime(bal)
    (killed,) = worker_sockets(directory)
    sample = gevent.spawn(runtime.active)  # the history's sample
    assert paused.wait(30)  # its survey decodes the answers: the worker listed alive then
    os.kill(pid_of(killed), signal.SIGKILL)
    wait_for(lambda: killed not in worker_sockets(directory), 30, what="the socket's end")
    last = gevent.spawn(runtime.hold_all)
    gevent.sleep(0)
    go.set()
    gevent.joinall([sample, last], timeout=60, raise_error=True)
    assert killed not in runtime.held.raw  # retired (its counters held no more)


def test_a_survey_killed_under_way_leaves_its_sharers_their_own(bal: Balancer) -> None:
    """The history's sampler killed (a management process stopping) while a
    scrape waits for its survey: the scrape gets a snapshot of its own (bug: the
    sampler's GreenletExit was raised in the scrape, which ended unanswered)."""
    runtime, _, paused, go = paused_runtime(bal)
    sample = gevent.spawn(runtime.active)
    assert paused.wait(30)
    scrape = gevent.spawn(runtime.active)
    gevent.sleep(0)  # (it waits for the sample's survey)
    sample.kill(block=True, timeout=10)
    go.set()
    merged = scrape.get(timeout=60)
    assert isinstance(merged, dict) and merged["hosts"]


def test_an_older_answer_never_overwrites_a_newer_silence(bal: Balancer) -> None:
    """A survey's answer, still being decoded when the worker stops (`SIGSTOP`)
    and a newer ask finds it silent, leaves it silent: verdicts follow the order
    the asks began in (bug: the older answer, noted last, said "answering", and
    the next ask waited its whole timeout again)."""
    runtime, directory, paused, go = paused_runtime(bal)
    (path,) = worker_sockets(directory)
    sample = gevent.spawn(runtime.active)
    assert paused.wait(30)  # its answer came, and is being decoded
    os.kill(pid_of(path), signal.SIGSTOP)
    try:
        assert runtime.ask_all("version") == []  # begun later: no answer in its time
        assert path in runtime.silent.silent
        go.set()
        assert sample.get(timeout=60)["hosts"]  # the answer still counts
        assert path in runtime.silent.silent
    finally:
        os.kill(pid_of(path), signal.SIGCONT)
        gevent.killall(list(runtime.silent.probers.values()), timeout=10)
    wait_for(lambda: "lagging" not in bal.api("GET", "/api/v1/info")[1], 30,
             what="the worker answering its management process again")
