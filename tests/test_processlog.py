"""The process log's stream (`balancer.processlog`) over a real FIFO whose reader
stops reading (journald or a supervisor stuck): writes never block, at most
its bound waits, the rest is dropped and counted, and once the reader reads
again what waited comes in order, then the count of what was dropped."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from balancer.processlog import WRITE_COST, QueuedStderr
from tests.support import wait_for
from tests.test_accesslog import F_GETPIPE_SZ, unread

WAIT = 5.0


@pytest.fixture
def fifo(tmp_path: Path):
    """(reader, writer) of a FIFO: the reader never reads unless told, the pipe full."""
    path = tmp_path / "stderr"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(path, os.O_WRONLY)  # blocking, as a process's stderr
    filler = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # a description of its own
    try:
        os.write(filler, b"x" * fcntl.fcntl(reader, F_GETPIPE_SZ))
        assert unread(reader) == fcntl.fcntl(reader, F_GETPIPE_SZ)
        yield reader, writer
    finally:
        for fd in (filler, writer, reader):
            os.close(fd)


def read_until(reader: int, text: bytes) -> bytes:
    """Read the pipe until `text` came (the filler included); what was read."""
    got, deadline = b"", time.monotonic() + WAIT
    while text not in got:
        assert time.monotonic() < deadline, got[-300:]
        try:
            got += os.read(reader, 1 << 16)
        except BlockingIOError:
            time.sleep(0.01)
    return got


def test_writes_never_block_and_what_is_past_the_bound_is_counted(fifo) -> None:
    reader, writer = fifo
    stream = QueuedStderr(None, fd=writer, limit=100 * (WRITE_COST + 10))
    started = time.monotonic()
    for i in range(1000):
        stream.write(f"line {i:04}\n")  # 10 characters each
    assert time.monotonic() - started < 1.0  # the pipe is full: a blocking write never returned
    assert stream.dropped == 900 and not stream.is_idle()
    got = read_until(reader, b"lines were dropped")
    lines = got.lstrip(b"x").decode().splitlines()
    assert lines[:100] == [f"line {i:04}" for i in range(100)]  # the oldest kept, in order
    assert lines[100:] == ["balancer: process log: writing again; 900 lines were dropped "
                           "while stderr was blocked or failing"]
    stream.write("after\n")
    assert read_until(reader, b"after\n") == b"after\n"
    assert stream.dropped == 900


def test_a_closed_pipe_drops_and_counts(tmp_path: Path) -> None:
    reader, writer = os.pipe()
    os.close(reader)  # EPIPE (Python ignores SIGPIPE)
    stream = QueuedStderr(None, fd=writer)
    try:
        stream.write("one\ntwo\n")
        wait_for(lambda: stream.dropped >= 2, WAIT, what="both lines dropped")
        assert stream.dropped == 2
    finally:
        os.close(writer)


def test_after_a_fork_the_child_forgets_its_parents_queue(fifo) -> None:
    reader, writer = fifo
    stream = QueuedStderr(None, fd=writer)
    stream.write("parent's\n")
    pid = os.fork()
    if pid == 0:  # the child: its queue starts empty, its writer its own
        stream.after_fork()
        code = 0 if stream.is_idle() and stream.dropped == 0 else 1
        stream.write("child's\n")
        deadline = time.monotonic() + WAIT
        while not stream.is_idle() and time.monotonic() < deadline:
            time.sleep(0.01)  # the parent reads meanwhile
        os._exit(code)
    got = read_until(reader, b"child's\n")
    if b"parent's" not in got:  # two writers: either may come first
        got += read_until(reader, b"parent's")
    assert os.waitpid(pid, 0)[1] == 0
    assert got.count(b"parent's") == 1 and got.count(b"child's") == 1


FATAL = """
from gevent import monkey; monkey.patch_all()
import sys
from balancer import processlog
processlog.install()
sys.stderr.write("x" * (1 << 17) + "\\n")  # more than the pipe holds: the writer blocks
raise RuntimeError("the fatal error")
"""


def test_an_uncaught_exceptions_traceback_is_written_at_exit() -> None:
    """Bug: the traceback, printed after every ``finally`` (the drains), was queued
    and lost with the writer thread as the process exited; stderr read late."""
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.Popen([sys.executable, "-c", FATAL], stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": root})
    try:
        with contextlib.suppress(subprocess.TimeoutExpired):  # stderr's reader stuck a while:
            proc.wait(timeout=1.0)  # with the fix the process waits for its writer (EXIT_WAIT)
        err = proc.stderr.read()  # type: ignore[union-attr]
        assert proc.wait(timeout=WAIT) == 1
    finally:
        proc.kill()
        proc.wait()
    assert err.endswith(b"RuntimeError: the fatal error\n"), err[-300:]


PRINTS = """
from gevent import monkey; monkey.patch_all()
import sys
from balancer import processlog
from balancer.processlog import QUEUE_BYTES, WRITE_COST
processlog.install()
line = "A" * 10
# the queue left with room for `line` and its newline as one write, not as two
sys.stderr.write("f" * (QUEUE_BYTES - 2 * WRITE_COST - len(line) - 2) + "\\n")
print(line, file=sys.stderr)  # two writes: the text, then the newline
sys.stdout.write("queued\\n")
sys.stdout.flush()
sys.stdin.read()  # until the test read the pipe
print("after", file=sys.stderr)
"""


def test_a_printed_line_is_queued_or_dropped_whole(fifo) -> None:
    """Bug: `print` writes its text and its newline apart; near the bound the text
    was queued and the newline dropped, and the next line was glued to it."""
    reader, writer = fifo
    root = str(Path(__file__).resolve().parent.parent)
    proc = subprocess.Popen([sys.executable, "-c", PRINTS], stderr=writer,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": root})
    try:
        assert proc.stdout.readline() == b"queued\n"  # type: ignore[union-attr]
        got = read_until(reader, b"A" * 10)
        proc.stdin.close()  # type: ignore[union-attr]
        got += read_until(reader, b"after\n")
        assert proc.wait(timeout=WAIT) == 0
    finally:
        proc.kill()
        proc.wait()
    lines = got.lstrip(b"x").split(b"\n")
    assert lines[1:] == [b"A" * 10, b"after", b""], lines[1:]


def test_waiting_for_the_queue_wakes_as_the_writer_empties_it(fifo) -> None:
    """`wait` (what `drain` does at each exit) blocks while stderr is stuck, at most
    its timeout, and returns once the writer emptied the queue, woken by it (was a
    poll every 10 ms)."""
    reader, writer = fifo
    stream = QueuedStderr(None, fd=writer)
    stream.write("last words\n")
    started = time.monotonic()
    stream.wait(0.2)  # (nobody reads: the bound ends it)
    assert time.monotonic() - started >= 0.15 and not stream.is_idle()
    read_until(reader, b"last words\n")
    deadline = time.monotonic() + WAIT
    while not stream.is_idle():  # (bounded: each wait ends at the writer's wake-up)
        assert time.monotonic() < deadline
        stream.wait(WAIT)
    assert time.monotonic() - started < WAIT
