"""The balancer's stderr a pipe whose reader stopped reading without closing it
(journald or a supervisor stuck). Bug: once the pipe was full, the worker's next
log line (a backend going down, the 502 summary) blocked the worker, and every
request stalled behind it. Now the process log is queued (`balancer.processlog`)
and written by a thread of its own: requests are served as before, and the
lines come once the reader reads again."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from tests.support import Balancer, dead_address, metric, request, wait_for
from tests.test_probe_env import STATIC, WAIT, child_pid

# Run the rest of argv with stdout and stderr a FIFO (argv[1]) and copy what it
# writes to this process's stdout until the management port is announced; then
# fill the pipe, stop reading and say "stderr full"; on SIGUSR2 copy again, to EOF
# (the balancer gets SIGTERM with this process: SIGTERM, or its death).
STUCK = [sys.executable, "-c", """
import ctypes, os, select, signal, subprocess, sys
def die_with_parent():
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
fifo = sys.argv[1]
reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
stderr = os.open(fifo, os.O_WRONLY)  # blocking, as a supervisor's pipe
filler = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # a description of its own
child = subprocess.Popen(sys.argv[2:], stdout=stderr, stderr=stderr,
                         preexec_fn=die_with_parent)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR2])  # (not the child's)
os.close(stderr)
signal.signal(signal.SIGTERM, lambda *_: child.terminate())
def copy():
    select.select([reader], [], [], 0.1)
    try:
        data = os.read(reader, 1 << 16)
    except BlockingIOError:
        return b""
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return data
seen = b""
while b" for management" not in seen and child.poll() is None:
    seen = seen[-100:] + copy()
try:
    while True:
        os.write(filler, b"\\n" * 4096)
except BlockingIOError:
    pass
print("stderr full", flush=True)
signal.sigwait([signal.SIGUSR2])
print("stderr read again", flush=True)
while child.poll() is None:
    copy()
while copy():
    pass
sys.exit(child.wait())
"""]


def dropped_lines(bal: Balancer, process: str) -> float:
    """``balancer_process_log_dropped_lines_total`` of one kind of process."""
    return metric(bal.metrics(), "balancer_process_log_dropped_lines_total", process=process)


def served_in(port: int, host: str, limit: float) -> tuple[int, float]:
    """One request's status and how long it took (at most `limit` s: a timeout fails)."""
    started = time.monotonic()
    status = request(port, host=host, timeout=limit)[0]
    return status, time.monotonic() - started


def test_a_stderr_nobody_reads_never_stalls_requests(tmp_path: Path) -> None:
    fifo = tmp_path / "stderr"
    os.mkfifo(fifo)
    dead = dead_address()
    bal = Balancer(tmp_path, {"app.test": STATIC,
                              "dead.test": {"action": "proxy", "backends": [dead],
                                            "retries": 0}},
                   prefix=[*STUCK, str(fifo)])
    try:
        worker = child_pid(bal, "worker")
        wait_for(lambda: "stderr full" in bal.output(), WAIT, what="the pipe full")
        slowest = 0.0
        until = time.monotonic() + 1.5  # the 502 summary is logged once a second
        while time.monotonic() < until:
            # the third 502 in a row logs "backend ... is down"; then one a second
            for host, status in (("dead.test", 502), ("app.test", 200)):
                got, took = served_in(bal.port, host, limit=WAIT)
                assert got == status
                slowest = max(slowest, took)
        assert slowest < 1.0, slowest
        assert dropped_lines(bal, "worker") == 0  # within the bound
        bal.proc.send_signal(signal.SIGUSR2)  # the reader reads again: what waited comes
        wait_for(lambda: f"backend {dead} is down" in bal.output()
                 and "dead.test: " in bal.output(), WAIT, what="the queued lines")
        assert child_pid(bal, "worker") == worker and "Traceback" not in bal.output()
    finally:
        started = time.monotonic()
        bal.stop()
    assert time.monotonic() - started < 5.0


# Run the rest of argv with stdout and stderr a pipe, copy what it writes to this
# process's stdout until the management port is announced, then close the pipe's
# reading end: every later write to stderr fails (EPIPE). SIGTERM is passed on.
CLOSING = [sys.executable, "-c", """
import ctypes, os, signal, subprocess, sys
reader, writer = os.pipe()
child = subprocess.Popen(sys.argv[1:], stdout=writer, stderr=writer,
                         preexec_fn=lambda: ctypes.CDLL(None).prctl(1, signal.SIGTERM))
os.close(writer)
signal.signal(signal.SIGTERM, lambda *_: child.terminate())
seen = b""
while b" for management" not in seen and (data := os.read(reader, 1 << 16)):
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    seen = seen[-100:] + data
os.close(reader)
sys.exit(child.wait())
"""]


def test_the_arbiters_and_the_management_processs_lost_lines_are_counted(
        tmp_path: Path) -> None:
    """Bug: only the workers' dropped lines were in the metric; the arbiter's and
    the management process's were told in a recovery line only, which a stderr
    that stays broken never shows."""
    bal = Balancer(tmp_path, {"app.test": STATIC}, prefix=CLOSING)
    try:
        wait_for(lambda: "for management" in bal.output(), WAIT, what="the announce")
        arbiter = bal.api("GET", "/api/v1/info")[1]["arbiter"]["pid"]
        os.kill(arbiter, signal.SIGUSR1)  # "SIGUSR1: workers reopen their logs": lost
        wait_for(lambda: dropped_lines(bal, "arbiter") >= 1, WAIT, what="the arbiter's")
        assert bal.api("PUT", "/api/v1/hosts/new.test", STATIC)[0] == 200  # its change line
        wait_for(lambda: dropped_lines(bal, "management") >= 1, WAIT,
                 what="the management process's")
        assert bal.api("GET", "/api/v1/info")[1]["arbiter"]["process_log_dropped"] >= 1
        assert request(bal.port, host="app.test")[0] == 200
    finally:
        started = time.monotonic()
        bal.stop()
    assert time.monotonic() - started < 5.0
