"""The process log's stream: stderr written by a thread of its own.

Bug: a process whose stderr is a pipe nobody reads (journald or a supervisor
stuck, a terminal paused with Ctrl-S) blocked in its next log line once the
pipe was full, and a worker's requests all stalled behind it. `install`
replaces `sys.stderr` (and the logging handlers' stream) with a
`QueuedStderr`: `write` queues the text and wakes a writer thread, which
writes it to descriptor 2 with blocking writes.

Invariants:
* `write` never blocks and never raises: at most `QUEUE_BYTES` (text, plus
  `WRITE_COST` per write) wait; what comes past it is dropped and counted by
  its lines (`dropped`, ``balancer_process_log_dropped_lines_total``), the
  oldest lines kept, as the access log does. A write that fails (stderr a
  closed pipe) drops its text the same way. Once a write goes through again,
  one line says how many were dropped meanwhile.
* A line is queued or dropped whole: text that does not end a line waits
  in `write` (bounded by `QUEUE_BYTES`) until the write that ends it, or a
  `flush`. Bug: `print` writes its text and its newline in two writes, so
  near the bound the text was queued and its newline dropped, and the next
  line was glued to it.
* The writer is a native thread, whatever gevent patched: its blocking write
  holds neither the gevent hub nor the GIL. It never logs (the handlers'
  locks may be gevent's): it writes its own line itself.
* A fork's child forgets its parent's queue (the parent writes it) and its
  count, and starts a writer of its own at its first write.
* Start-up errors are written directly: `install` is called once the
  balancer has started (`Arbiter.run`), and the children it forks inherit
  the queue. `drain(timeout)`, at every process exit, waits for what is
  queued to be written, at most `timeout` seconds (a stuck stderr must not
  keep a stopping process alive). The process that installed it drains at
  exit too (`atexit`): an uncaught exception's traceback is written after
  every ``finally`` (bug: with stderr slow to read, the balancer's fatal
  error was queued, then lost with the writer thread as the process exited).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
import time
from collections import deque
from typing import Any, Final

from gevent.monkey import get_original

# the thread module's own functions, not gevent's greenlet versions
_start_thread, _allocate_lock = get_original("_thread", ["start_new_thread", "allocate_lock"])

STDERR_FD: Final = 2
# Text waiting at most per process. The process log writes a few lines a
# second (a failure summary a second, state changes): 1 MiB is minutes of it
# even in a bad spell, and a fixed price per process while stderr is stuck.
QUEUE_BYTES: Final = 1 << 20
WRITE_COST: Final = 64  # counted per write beside its text: a flood of short writes is bounded too
EXIT_WAIT: Final = 2.0  # seconds a process exiting waits for its queued lines (`drain`)


class QueuedStderr:
    """A text stream for `sys.stderr` whose writes queue for a writer thread."""

    def __init__(self, original: Any, fd: int = STDERR_FD, limit: int = QUEUE_BYTES) -> None:
        self.original = original  # what sys.stderr was: for isatty, encoding
        self.encoding = "utf-8"
        self.errors = "backslashreplace"
        self._fd = fd
        self._limit = limit
        self._reset()

    def _reset(self) -> None:
        """A new queue, no writer yet (and after a fork: the parent's forgotten)."""
        self._pending: deque[str] = deque()  # append/popleft are atomic across threads
        self._unended = ""  # text written since the last line's end, not queued yet
        self._wake = _allocate_lock()  # released: text waits (a binary semaphore)
        self._wake.acquire()
        self._emptied = _allocate_lock()  # released: the writer emptied the queue (`wait`)
        self._emptied.acquire()
        # each counter has one writing thread: `write`'s, or the writer's (no lock)
        self._added = self._taken = 0  # bytes (with WRITE_COST) queued, and taken off
        self._refused = 0  # lines `write` dropped, the queue full
        self._failed = 0  # lines the writer dropped, its write failed
        self._told = 0  # lines dropped that a recovery line counted
        self._busy = False  # the writer holds text it took (for `drain`)
        self._started = False
        self._starting = _allocate_lock()

    @property
    def dropped(self) -> int:
        """Lines dropped, ever (a counter)."""
        return self._refused + self._failed

    def write(self, text: str) -> int:
        """Queue `text` for the writer, or drop it past the limit, a line at a time
        (text that does not end a line waits for the write that ends it); never blocks."""
        size = len(text)
        if not text.endswith("\n"):
            self._unended += text
            if len(self._unended) <= self._limit:
                return size
            text = ""  # a line longer than the queue: dropped as it is
        self._queue(self._unended + text)
        self._unended = ""
        return size

    def _queue(self, text: str) -> None:
        cost = len(text) + WRITE_COST
        if self._added - self._taken + cost > self._limit:
            self._refused += _lines(text)
            return
        self._added += cost
        self._pending.append(text)
        if not self._started:
            self._start()
        with contextlib.suppress(RuntimeError):  # released already: the writer will look
            self._wake.release()

    def _start(self) -> None:
        """The writer thread, once (two threads' first writes may race here)."""
        with self._starting:
            if not self._started:
                _start_thread(self._writer_loop, ())
                self._started = True

    def flush(self) -> None:
        """Queue the text of a line not ended yet (the writer writes as soon as it
        can: this never waits)."""
        if self._unended:
            text, self._unended = self._unended, ""
            self._queue(text)

    def fileno(self) -> int:
        return self._fd

    def isatty(self) -> bool:
        return bool(self.original is not None and self.original.isatty())

    def writable(self) -> bool:
        return True

    def is_idle(self) -> bool:
        """Nothing queued and nothing being written."""
        return not self._pending and not self._busy

    def wait(self, timeout: float) -> None:
        """Block until the writer next empties the queue (or did since the last
        wait), at most `timeout` seconds."""
        self._emptied.acquire(timeout=max(0.0, timeout))

    def after_fork(self) -> None:
        """In a fork's child: the parent's queue is the parent's to write."""
        self._reset()

    def _writer_loop(self) -> None:
        """Thread body: wait for text, write all that waits, again."""
        while True:
            self._wake.acquire()
            while self._pending:
                self._write_pending()
            with contextlib.suppress(RuntimeError):  # released already: not waited for yet
                self._emptied.release()

    def _write_pending(self) -> None:
        self._busy = True
        texts = [self._pending.popleft() for _ in range(len(self._pending))]
        text = "".join(texts)
        try:
            _write_all(self._fd, text.encode(self.encoding, self.errors))
            self._tell_recovery()
        except OSError:
            self._failed += _lines(text)
        finally:
            self._taken += len(text) + WRITE_COST * len(texts)
            self._busy = False

    def _tell_recovery(self) -> None:
        """After a write that went through: the lines dropped since the last such line."""
        dropped = self.dropped
        told = self._told
        if dropped > told:
            self._told = dropped
            with contextlib.suppress(OSError):
                _write_all(self._fd, f"balancer: process log: writing again; {dropped - told} "
                                     f"lines were dropped while stderr was blocked or "
                                     f"failing\n".encode())


def _lines(text: str) -> int:
    """The lines `text` holds, one not ended included."""
    return text.count("\n") + (not text.endswith("\n"))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


_installed: QueuedStderr | None = None


def install() -> None:
    """Make this process's stderr (and every child's it forks) a `QueuedStderr`."""
    global _installed
    if _installed is not None:
        return
    with contextlib.suppress(Exception):
        sys.stderr.flush()  # what the stream buffered goes first
    queued = _installed = QueuedStderr(sys.stderr)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
            handler.setStream(queued)  # type: ignore[arg-type]
    sys.stderr = queued  # type: ignore[assignment]
    os.register_at_fork(after_in_child=queued.after_fork)
    atexit.register(drain)  # after the traceback of what ended the process (children: os._exit)


def dropped() -> int:
    """Lines of this process's log dropped so far (0 unless `install`ed)."""
    return _installed.dropped if _installed is not None else 0


def drain(timeout: float = EXIT_WAIT) -> None:
    """Before the process exits: wait until what is queued is written, at most
    `timeout` seconds (woken by the writer thread as it empties the queue; was a
    poll every 10 ms, at every process's exit)."""
    if _installed is None:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        return
    _installed.flush()
    deadline = time.monotonic() + timeout
    while not _installed.is_idle():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        _installed.wait(left)
