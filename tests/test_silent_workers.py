"""A worker that does not answer its control socket (SIGSTOP) costs the
management API one timeout, not one per call (`management.silent`).

A real balancer with 2 workers; one is stopped with SIGSTOP and always
continued (SIGCONT) in a `finally`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancer.control import _hung_up, _read_command, ask
from tests.support import ROOT, Balancer, control_socket, wait_for

RULE = {"action": "empty", "status": 204}
CTL_ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")},
           "PYTHONPATH": str(ROOT)}
QUICK = 1.0  # seconds a call may take once the stopped worker is known (loaded machine)


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[Balancer, int]]:
    bal = Balancer(tmp_path, {"app.test": RULE}, args=["--workers", "2"])
    try:
        wait_for(lambda: len(bal.api("GET", "/api/v1/info")[1]["processes"]) == 2, 20,
                 what="two workers")
        yield bal, bal.api("GET", "/api/v1/info")[1]["processes"][0]["pid"]
    finally:
        bal.stop()


def timed(bal: Balancer, method: str, path: str, body: object = None) -> tuple[float, int, dict]:
    started = time.monotonic()
    status, doc = bal.api(method, path, body)
    return time.monotonic() - started, status, doc


def lagging_pids(doc: dict) -> list[int]:
    return [entry["pid"] for entry in doc.get("lagging", [])]


def test_a_stopped_worker_is_skipped_and_named_until_it_answers(two_workers):
    bal, pid = two_workers
    os.kill(pid, signal.SIGSTOP)
    try:
        took, status, doc = timed(bal, "GET", "/api/v1/stats")  # the one call that waits
        assert status == 200 and lagging_pids(doc) == [pid], doc
        for path in ("/api/v1/stats", "/api/v1/info", "/api/v1/top", "/api/v1/inflight"):
            took, status, doc = timed(bal, "GET", path)
            assert status == 200 and took < QUICK, (path, took, doc)
            assert lagging_pids(doc) == [pid], (path, doc)
            assert "not answering" in doc["lagging"][0]["reason"]
        status, doc = bal.api("GET", "/api/v1/stats/app.test")
        assert status == 200 and lagging_pids(doc) == [pid], doc
        done = subprocess.run([sys.executable, "-m", "management.ctl", "--url",
                               f"http://127.0.0.1:{bal.mport}", "stats"], env=CTL_ENV,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "app.test" in done.stdout, done
        assert f"warning: without worker(s) {pid} (not answering for" in done.stderr, done
        info = bal.api("GET", "/api/v1/info")[1]
        assert [p["pid"] for p in info["processes"]] != [pid] and len(info["processes"]) == 1
        took, status, doc = timed(bal, "PUT", "/api/v1/hosts/new.test", RULE)
        assert status == 202 and took < QUICK, (took, doc)
        assert doc["applied"] is False and lagging_pids(doc) == [pid], doc  # never claimed
        took, status, _ = timed(bal, "GET", "/metrics")
        assert status == 200 and took < QUICK, took
    finally:
        os.kill(pid, signal.SIGCONT)
    # the background probe brings it back: no restart, no call has to wait first
    wait_for(lambda: len(bal.api("GET", "/api/v1/info")[1]["processes"]) == 2, 10,
             what="the continued worker to answer again")
    status, doc = bal.api("GET", "/api/v1/stats")
    assert status == 200 and "lagging" not in doc, doc
    status, doc = bal.api("PUT", "/api/v1/hosts/after.test", RULE)
    assert status == 200 and "applied" not in doc, doc
    reply = ask(control_socket(pid), "version")
    assert reply and reply["version"] >= doc["version"], reply
    wait_for(lambda: f"worker {pid} answers again" in bal.output(), 5, what="the log line")
    assert f"worker {pid} does not answer its control socket" in bal.output()


def test_a_worker_drops_an_ask_whose_client_gave_up():
    """What lets a resumed worker skip the asks queued while it was stopped."""
    for sent, end, dropped in ((b"stats\n", "close", True), (b"stats\n", "", False),
                               (b"", "close", True), (b"stats\n", "shutdown", False)):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            theirs.sendall(sent)
            if end == "close":
                theirs.close()
            elif end == "shutdown":  # done sending, still reading (socat, nc -N)
                theirs.shutdown(socket.SHUT_WR)
            if sent:
                assert _read_command(ours, time.monotonic() + 1.0) == "stats"
            assert _hung_up(ours) is dropped, (sent, end)
        finally:
            ours.close()
            theirs.close()


def test_an_ask_given_up_while_stopped_is_not_carried_out_when_it_resumes(tmp_path):
    bal = Balancer(tmp_path, {"app.test": RULE}, args=["--workers", "1"])
    try:
        pid = wait_for(lambda: bal.api("GET", "/api/v1/info")[1]["processes"], 20,
                       what="the worker")[0]["pid"]
        path = control_socket(pid)
        version = ask(path, "version")["version"]
        apply = ("apply " + json.dumps({"version": version + 1,
                                        "hosts": {"late.test": RULE}}) + "\n").encode()
        os.kill(pid, signal.SIGSTOP)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(2.0)
                sock.connect(path)  # queued in the backlog, then given up
                sock.sendall(apply)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert wait_for(lambda: ask(path, "version"), 10)["version"] == version  # dropped
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:  # one still waiting
            sock.settimeout(5.0)
            sock.connect(path)
            sock.sendall(apply)
            sock.shutdown(socket.SHUT_WR)  # done sending, still reading: answered
            assert json.loads(sock.makefile("rb").read())["version"] == version + 1
    finally:
        bal.stop()


def test_an_older_answer_ends_no_newer_silence_across_a_listing_without_the_worker(
        tmp_path: Path) -> None:
    """`management.silent.SilentWorkers`: a survey's ask (begun first, decoded
    slowly) answers after a later ask found the worker silent; a listing made
    meanwhile lacks the worker's socket (the run directory made again: it binds
    its socket there again soon). The older answer must not end the newer
    silence (bug: the listing forgot the newer verdict, and the stopped worker
    was asked again, each ask waiting a whole timeout)."""
    from management.silent import SilentWorkers

    path = str(tmp_path / "worker-4242.sock")
    stopped = socket.socket(socket.AF_UNIX)  # a stopped worker: accepts, never answers
    stopped.bind(path)
    stopped.listen(8)
    workers = SilentWorkers(lambda reply: None)
    try:
        survey = workers.ask()  # its answer is still being decoded
        later = workers.ask()
        workers.note(path, None, "timed out", later)
        assert path in workers.silent
        assert workers.lagging([]) == []  # the run directory's listing, made again
        workers.note(path, {"pid": 4242}, "", survey)  # the older answer, decoded at last
        assert path in workers.silent, "an older answer ended a newer verdict"
    finally:
        for prober in list(workers.probers.values()):
            prober.kill()
        stopped.close()
