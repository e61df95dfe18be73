"""Hostile probes of the environment (not of peers), through real processes: a
disk that fills up or a file size limit (RLIMIT_FSIZE, lowered on one running
process with prlimit, so nothing else of the test run is limited) under the
access log and under the file store's writes, a routes file swapped for a huge
one, stdout and stderr closed or a closed pipe. Each case a defect found and
fixed (each test fails without its fix):

* A failed access log write (ENOSPC, EFBIG, EPIPE) printed gevent's traceback
  for every batch (five a second per worker), and with stderr a closed pipe
  too the worker no longer stopped on SIGTERM until the arbiter killed it.
  Now: one line when it starts failing, one when it writes again, the
  records dropped meanwhile in ``balancer_access_log_dropped_records_total``.
* Started with stdout closed, `balancer serve` died before serving.
"""

from __future__ import annotations

import os
import re
import resource
import sys
import time
from pathlib import Path

from tests.support import Balancer, request, wait_for

WAIT = 10.0
STATIC = {"action": "static", "status": 200, "body": "hi"}
# `balancer serve 2>&1 | head`: run the rest of argv with stdout and stderr a pipe,
# copy what it writes until the management port is announced, then close the pipe
# (the balancer gets SIGTERM with this process: SIGTERM, or its death)
HEAD = [sys.executable, "-c", """
import ctypes, signal, subprocess, sys
def die_with_parent():
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         preexec_fn=die_with_parent)
signal.signal(signal.SIGTERM, lambda *_: child.terminate())
for line in child.stdout:
    sys.stdout.buffer.write(line)
    sys.stdout.flush()
    if b" for management" in line:
        break
child.stdout.close()
sys.exit(child.wait())
"""]
# exec the rest of argv with stdout (1) closed
CLOSED_STDOUT = [sys.executable, "-c", "import os, sys; os.close(1); "
                 "os.execvp(sys.argv[1], sys.argv[1:])"]


def child_pid(bal: Balancer, kind: str) -> int:
    """The pid of the balancer's (first) ready `kind`: "worker" or "management"."""
    return int(re.findall(rf"{kind} (\d+) ready", bal.output())[0])


def limit_file_size(pid: int, size: int | None) -> None:
    """Set process `pid`'s soft RLIMIT_FSIZE to `size` bytes (None: back to its
    hard limit). A write past it fails with EFBIG (Python ignores SIGXFSZ)."""
    hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard if size is None else size, hard))


def metric(bal: Balancer, name: str) -> float:
    text = bal.api("GET", "/metrics")[1].decode()
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def serve_some(bal: Balancer, count: int) -> None:
    for _ in range(count):
        assert request(bal.port)[0] == 200


# the access log -------------------------------------------------------------------
def test_an_access_log_past_the_file_size_limit_is_reported_once_and_resumes(
        tmp_path: Path) -> None:
    """The worker's file size limit lowered to the log's size: every write fails
    with EFBIG while requests are served; raised again, the log goes on."""
    log = tmp_path / "access.log"
    bal = Balancer(tmp_path, {"app.test": STATIC}, args=["--access-log", str(log)])
    try:
        serve_some(bal, 1)
        wait_for(lambda: log.stat().st_size > 0, WAIT, what="the first line")
        # room for the operator log (stderr is a file here too); the access log is
        # grown (sparse) to the limit, so its next write is past it
        limit = bal.log_path.stat().st_size + (1 << 20)
        os.truncate(log, limit)
        worker = child_pid(bal, "worker")
        limit_file_size(worker, limit)
        for dropped in (10, 20, 30):  # three batches, each failing on its own
            serve_some(bal, 10)
            wait_for(lambda n=dropped: metric(
                bal, "balancer_access_log_dropped_records_total") >= n, WAIT,
                what=f"{dropped} records dropped")
        out = bal.output()
        assert out.count("write failed (File too large)") == 1, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        limit_file_size(worker, None)
        serve_some(bal, 1)
        wait_for(lambda: "writing again; 30 records were dropped" in bal.output(), WAIT,
                 what="the recovery line")
        assert log.stat().st_size > limit
        assert metric(bal, "balancer_access_log_dropped_records_total") == 30
        assert child_pid(bal, "worker") == worker and "exited" not in bal.output()
    finally:
        bal.stop()


def test_stdout_and_stderr_a_closed_pipe_serve_and_stop_at_once(tmp_path: Path) -> None:
    """``balancer serve --access-log - 2>&1 | head``: the reader gone, every write
    to stdout or stderr is EPIPE. Requests are served by the same worker, and
    SIGTERM stops the balancer at once (bug: printing the access log's failure
    failed inside gevent's loop, the log's writer never returned, and the worker
    waited for it at its stop: 5 s, or until the arbiter's kill)."""
    bal = Balancer(tmp_path, {"app.test": STATIC}, args=["--access-log", "-"], prefix=HEAD)
    try:
        worker = bal.api("GET", "/api/v1/info")[1]["processes"][0]["pid"]
        for dropped in (5, 10, 15):
            serve_some(bal, 5)
            wait_for(lambda n=dropped: metric(
                bal, "balancer_access_log_dropped_records_total") >= n, WAIT,
                what=f"{dropped} records dropped")
        assert bal.api("GET", "/api/v1/info")[1]["processes"][0]["pid"] == worker
    finally:
        started = time.monotonic()
        assert bal.stop() == 0
    assert time.monotonic() - started < 3.0


def test_a_balancer_started_with_stdout_closed_serves(tmp_path: Path) -> None:
    """Descriptor 1 closed at start (``>&-``): it is opened on /dev/null, so the
    access log (``-``) goes nowhere and no file the balancer opens takes it."""
    bal = Balancer(tmp_path, {"app.test": STATIC}, args=["--access-log", "-"],
                   prefix=CLOSED_STDOUT)
    try:
        serve_some(bal, 3)
        for kind in ("worker", "management"):
            assert os.readlink(f"/proc/{child_pid(bal, kind)}/fd/1") == os.devnull
    finally:
        bal.stop()
    assert "Traceback" not in bal.output()


# the routes file ------------------------------------------------------------------
def peak_memory_kib(pid: int) -> int:
    """Process `pid`'s peak resident memory (VmHWM), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def test_a_huge_routes_file_is_refused_unread_and_a_whole_table_repairs_it(
        tmp_path: Path) -> None:
    """A 1 GiB sparse file in place of the routes file (a log or a dump written to
    the wrong path): reported corrupt at once, the last good table served, no
    process reads it (each read it whole before, and held it twice: 2 GB of
    memory apiece and half a minute without serving)."""
    bal = Balancer(tmp_path, {"app.test": STATIC})
    try:
        huge = tmp_path / "huge.tmp"
        with open(huge, "wb") as f:
            f.write(b'{"version": 9, "hosts": {')
            f.truncate(1 << 30)
        os.replace(huge, bal.routes)
        wait_for(lambda: "more than the 256 MiB" in bal.store_problem(), WAIT,
                 what="the huge file reported")
        assert request(bal.port)[2] == b"hi"
        for kind in ("worker", "management"):
            assert peak_memory_kib(child_pid(bal, kind)) < 200 * 1024
        status, answer = bal.api("PUT", "/api/v1/hosts", {"hosts": {
            "app.test": {**STATIC, "body": "repaired"}}})
        assert status == 200, answer
        wait_for(lambda: request(bal.port)[2] == b"repaired" and bal.store_problem() == "",
                 WAIT, what="the repaired table served")
        assert bal.routes.stat().st_size < 4096
    finally:
        bal.stop()
