"""The access log written to a pipe whose reader stopped reading, without
closing it (a log shipper stuck, a terminal paused with Ctrl-S; a file on a hung
mount blocks the same way): once the pipe is full, the worker's write blocks.
Bug: every request's record queued behind it, the queue grew until the worker
ran out of memory. Now at most `QUEUE_LIMIT` records wait; those past it are
dropped, counted in ``balancer_access_log_dropped_records_total`` and told once,
and the log goes on by itself once the reader reads again.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from balancer.accesslog.writer import HELD_LIMIT, QUEUE_LIMIT
from tests.support import Balancer, metric, wait_for
from tests.test_accesslog import F_GETPIPE_SZ, unread
from tests.test_probe_data import rss_kib
from tests.test_probe_env import STATIC, WAIT, child_pid

pytestmark = pytest.mark.data_plane  # the access log's writer is compiled: run interpreted too
DROPPED = "balancer_access_log_dropped_records_total"
AGENT = "a" * 2000  # heavy records: the queue's growth shows in the worker's memory
REQUEST = f"GET / HTTP/1.1\r\nHost: app.test\r\nUser-Agent: {AGENT}\r\n\r\n".encode()


def pipelined(port: int, count: int, request: bytes = REQUEST) -> int:
    """Send `count` requests pipelined on one connection (the last closes it);
    how many were answered 200."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    last = request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
    sender = threading.Thread(target=sock.sendall, args=(request * (count - 1) + last,))
    sender.start()
    answered, tail = 0, b""
    try:
        while chunk := sock.recv(1 << 20):
            seen = tail + chunk
            answered += seen.count(b"HTTP/1.1 200 ")
            tail = seen[-12:]  # a status line cut between two reads is counted once
    finally:
        sender.join(WAIT)
        sock.close()
    return answered


def drain(reader: int, lines: int, until: float) -> int:
    """Read what the pipe holds now: `lines` plus the records read."""
    while time.monotonic() < until:
        try:
            data = os.read(reader, 1 << 20)
        except BlockingIOError:
            break
        lines += data.count(b"\n")
    return lines


def test_an_access_log_nobody_reads_keeps_a_bounded_queue_and_resumes(tmp_path: Path) -> None:
    fifo = tmp_path / "access.log"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open, never read (yet)
    bal = Balancer(tmp_path, {"app.test": STATIC}, args=["--access-log", str(fifo)])
    try:
        worker = child_pid(bal, "worker")
        first = QUEUE_LIMIT + 2000
        assert pipelined(bal.port, first) == first
        # the writer counts what `log` refused at its next look (a second)
        wait_for(lambda: metric(bal.metrics(), DROPPED) > 0, WAIT, what="records dropped")
        full = rss_kib(worker)
        more = QUEUE_LIMIT
        assert pipelined(bal.port, more) == more  # served while nothing is written
        # each record held ~2 KB: a queue growing by `more` takes ~20 MB
        assert rss_kib(worker) - full < 6 * 1024, (full, rss_kib(worker))
        total = first + more
        wait_for(lambda: metric(bal.metrics(), DROPPED) >= more, WAIT,
                 what="the new records dropped")
        out = bal.output()
        assert out.count("dropping records until writes succeed again") == 1, out[-2000:]
        assert "a write has been blocked for " in out, out[-2000:]
        lines = 0
        deadline = time.monotonic() + WAIT
        # the reader reads again: what was written or queued comes, the rest was dropped
        while lines + metric(bal.metrics(), DROPPED) < total:
            assert time.monotonic() < deadline, (lines, metric(bal.metrics(), DROPPED), total)
            lines = drain(reader, lines, deadline)
        dropped = int(metric(bal.metrics(), DROPPED))
        assert lines + dropped == total and 0 < lines <= 2 * QUEUE_LIMIT, (lines, dropped)
        wait_for(lambda: f"writing again; {dropped} records were dropped" in bal.output(),
                 WAIT, what="the recovery line")
        assert pipelined(bal.port, 3) == 3
        lines = 0
        while lines < 3:  # the next records come as before
            assert time.monotonic() < deadline, lines
            lines = drain(reader, lines, deadline)
        assert metric(bal.metrics(), DROPPED) == dropped
        assert child_pid(bal, "worker") == worker and "Traceback" not in bal.output()
    finally:
        started = time.monotonic()
        bal.stop()
        os.close(reader)
    assert time.monotonic() - started < 5.0


def test_huge_heads_while_the_log_is_stalled_keep_the_queue_small(tmp_path: Path) -> None:
    """A hostile client sends heads near the 64 KiB limit while the log is stalled.
    Bug: the queue was bounded in records only, and 10,000 records of such heads
    held 600 MB; now the records waiting keep at most `HELD_LIMIT` bytes of their
    requests, and those past it are dropped and counted as the others are."""
    fifo = tmp_path / "access.log"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open, never read (yet)
    bal = Balancer(tmp_path, {"app.test": STATIC}, args=["--access-log", str(fifo)])
    huge = REQUEST.replace(AGENT.encode(), b"h" * 60_000)  # a record keeps ~60 KB
    try:
        worker = child_pid(bal, "worker")
        assert pipelined(bal.port, 3, huge) == 3  # more than the pipe holds: a write blocks
        capacity = fcntl.fcntl(reader, F_GETPIPE_SZ)
        wait_for(lambda: unread(reader) == capacity, WAIT, what="the pipe full")
        before = rss_kib(worker)
        count = 600  # 36 MB of records unless the queue is bounded in bytes
        started = time.monotonic()
        assert pipelined(bal.port, count, huge) == count  # every one served meanwhile
        assert time.monotonic() - started < WAIT
        wait_for(lambda: metric(bal.metrics(), DROPPED) >= count - 2 * HELD_LIMIT // 60_000, WAIT,
                 what="the records past the bound dropped")
        grown = rss_kib(worker) - before
        # the queue (4 MiB) and the batch out: ~4 MiB measured (without the bound: ~38)
        assert grown < 16 * 1024, grown
        lines, deadline = 0, time.monotonic() + WAIT
        while lines + metric(bal.metrics(), DROPPED) < 3 + count:  # the reader reads again
            assert time.monotonic() < deadline, (lines, metric(bal.metrics(), DROPPED))
            lines = drain(reader, lines, deadline)
        assert lines + metric(bal.metrics(), DROPPED) == 3 + count
        assert "Traceback" not in bal.output()
    finally:
        bal.stop()
        os.close(reader)


def open_paths(pid: int) -> set[str]:
    """What process `pid`'s descriptors name."""
    fds = Path(f"/proc/{pid}/fd")
    return {os.readlink(fd) for fd in fds.iterdir() if fd.is_symlink()}


def test_a_reopen_while_a_write_blocks_moves_the_log_to_the_new_file(tmp_path: Path) -> None:
    """logrotate renames an access log whose write blocks (a FIFO nobody reads, a
    file on a hung mount) and sends SIGUSR1. Bug: the reopen waited for the blocked
    write, perhaps for ever; now the log goes on in the new file at once, and the
    blocked write is left to the old one, which is closed once the write returns."""
    fifo, rotated = tmp_path / "access.log", tmp_path / "access.log.1"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open, never read (yet)
    bal = Balancer(tmp_path, {"app.test": STATIC}, args=["--access-log", str(fifo)])
    try:
        worker = child_pid(bal, "worker")
        assert pipelined(bal.port, 40) == 40  # ~80 KB of records: more than the pipe holds
        capacity = fcntl.fcntl(reader, F_GETPIPE_SZ)
        wait_for(lambda: unread(reader) == capacity, WAIT, what="the pipe full")
        os.rename(fifo, rotated)
        bal.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "reopened while a write to the old file blocks" in bal.output(),
                 WAIT, what="the reopen")
        assert pipelined(bal.port, 5) == 5
        wait_for(lambda: fifo.exists() and fifo.read_bytes().count(b"\n") >= 5, WAIT,
                 what="the new records in the new file")
        assert str(rotated) in open_paths(worker)  # under the write left to it
        lines, deadline = 0, time.monotonic() + WAIT
        while lines + fifo.read_bytes().count(b"\n") < 45:  # the old file read again
            assert time.monotonic() < deadline, lines
            lines = drain(reader, lines, deadline)
        assert lines + fifo.read_bytes().count(b"\n") == 45
        wait_for(lambda: str(rotated) not in open_paths(worker), WAIT, what="the old closed")
        assert metric(bal.metrics(), DROPPED) == 0 and "Traceback" not in bal.output()
    finally:
        bal.stop()
        os.close(reader)


def test_an_access_log_fifo_with_no_reader_yet_never_holds_a_worker(tmp_path: Path) -> None:
    """The access log a FIFO whose reader (a log shipper) has not started. Bug: the
    worker opened it at its start and hung there, never serving, and a reload's
    start-up check hung the same way. Now the open waits in the writer's thread:
    the worker serves, one line says so, a reload goes through, and the records
    that waited come once a reader opens the FIFO."""
    fifo = tmp_path / "access.log"
    os.mkfifo(fifo)
    bal = Balancer(tmp_path, {"app.test": STATIC}, args=["--access-log", str(fifo)])
    reader = -1
    try:
        assert pipelined(bal.port, 3) == 3
        wait_for(lambda: "a FIFO nobody reads yet; waiting for a reader" in bal.output(),
                 WAIT, what="the wait told")
        bal.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "(slot 0, generation 2)" in bal.output(), WAIT,
                 what="the reload's worker ready")
        wait_for(lambda: re.search(r"worker \d+ exited", bal.output()), WAIT,
                 what="the first worker gone, no reader seen")
        assert pipelined(bal.port, 4) == 4  # the new worker: its records wait too
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        lines, deadline = 0, time.monotonic() + WAIT
        while lines < 4:  # those of the worker serving now, at least
            assert time.monotonic() < deadline, lines
            lines = drain(reader, lines, deadline)
        # the first worker's 3 waited for a reader it never saw: dropped, counted
        # and told as it stopped (bug: lost, and counted nowhere: 0)
        wait_for(lambda: metric(bal.metrics(), DROPPED) == 3, WAIT,
                 what="the first worker's 3 counted")
        assert "closed with 3 records not written; dropped" in bal.output()
        assert "Traceback" not in bal.output()
    finally:
        started = time.monotonic()
        bal.stop()
        if reader >= 0:
            os.close(reader)
    assert time.monotonic() - started < 5.0


def opening(pid: int) -> bool:
    """Whether a thread of process `pid` waits in the open of a FIFO for a reader."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            if (task / "wchan").read_text() == "wait_for_partner":
                return True
    return False


def test_a_stop_while_a_reopen_waits_for_the_fifo_s_reader_is_not_held(
        tmp_path: Path) -> None:
    """The FIFO's reader (a log shipper) gone, and SIGUSR1: the reopen waits in the
    thread pool for a reader. Bug: a stop then waited for that open too, the
    close's whole 5 s, before the worker could exit."""
    fifo = tmp_path / "access.log"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    bal = Balancer(tmp_path, {"app.test": STATIC}, args=["--access-log", str(fifo)])
    try:
        worker = child_pid(bal, "worker")
        assert pipelined(bal.port, 2) == 2
        lines, deadline = 0, time.monotonic() + WAIT
        while lines < 2:
            assert time.monotonic() < deadline, lines
            lines = drain(reader, lines, deadline)
        os.close(reader)
        reader = -1
        bal.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: opening(worker), WAIT, what="the reopen waiting for a reader")
        assert pipelined(bal.port, 2) == 2  # served meanwhile
        started = time.monotonic()
        assert bal.stop() == 0
        assert time.monotonic() - started < 3.0
        assert "Traceback" not in bal.output()
    finally:
        bal.stop()
        if reader >= 0:
            os.close(reader)
