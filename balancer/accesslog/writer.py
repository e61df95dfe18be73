"""The access log's writer: records queued by the request path, written off it.

The request path only appends a plain tuple (a record,
`balancer.accesslog.records`) to a deque; the ``writer_loop`` greenlet
formats and writes pending records every ``flush_interval`` seconds, or
sooner once ``batch_size`` records wait. The write itself runs in gevent's
thread pool, so a slow disk or a full stdout pipe delays the log, never the
requests.

Invariants:
* ``log`` is a length check and an append (past ``QUEUE_LIMIT``, a count
  instead), nothing else.
* At most ``QUEUE_LIMIT`` records wait: while a write blocks (stdout a pipe
  whose reader stopped reading, a file on a hung mount) ``log`` refuses the
  records past it and counts them, and the writer reports them as dropped
  (bug: the queue grew with every request until the worker ran out of
  memory). One write is out at a time; ``close`` does not wait for one that
  blocks (a stopping worker waited for it until the arbiter killed it).
* A record no formatter takes (a caller's bug) is skipped and reported once;
  a failing write drops its batch, is reported once, and its recovery says how
  many records were dropped (`dropped_total` counts them all, for
  ``balancer_access_log_dropped_records_total``). Nothing stops the writer but
  ``close``.
* The write in the thread pool never raises: its OSError comes back as a
  value. Bug: gevent's pool printed a traceback for every failed batch (five
  a second per worker with the disk full or stdout a closed pipe), and with
  stderr a closed pipe too, printing it failed inside gevent's loop and the
  batch's result never came: the writer hung, and a stopping worker waited
  for it (5 s, or until the arbiter killed it at ``timeouts.graceful``).
* Every record after a failure starts a line: a write cut short (the disk
  filled, or the file size limit came, in the middle of a batch) leaves the
  file ending in part of a record, and the next write that succeeds starts
  with a line break (bug: the first record after the recovery was glued to
  the torn one, one garbled line).
"""

from __future__ import annotations

import os
import sys
from collections import deque
from typing import Any, Final

import gevent
import gevent.event
import gevent.lock

from balancer.accesslog.formats import FORMATS, FORMATTERS, LINE_FORMATTERS

STDOUT = "-"
OFF = ""
NEWLINE: Final = ord("\n")
# Records a worker keeps waiting for the writer, at most (~0.9 KB each with a
# browser's user agent: ~9 MB). The writer wakes at `batch_size` (1000), so a
# busy worker (30,000 requests a second) rides out a write stalled a third of
# a second without a loss; past that, as HAProxy does when its log socket or
# ring is full, new records are dropped and counted, never the requests held
# (nginx's buffered access log blocks its worker on the write instead).
QUEUE_LIMIT: Final = 10_000
STALL_CHECK: Final = 1.0  # seconds between looks at the queue while a write is out


class AccessLogError(Exception):
    """The access log cannot be used at all (bad format, cannot open the path)."""


class AccessLog:
    """Buffered access log. ``path``: "" off, "-" stdout, else a file (appended to).

    Call ``start()`` in the worker (opens the path, starts ``writer_loop``),
    ``log(record)`` per request, ``reopen()`` on SIGUSR1 and ``close()`` at exit.
    """

    def __init__(self, path: str, fmt: str = "combined", *,
                 flush_interval: float = 0.2, batch_size: int = 1000) -> None:
        if fmt not in FORMATTERS:
            raise AccessLogError(f"access log format must be one of {', '.join(FORMATS)}, "
                                 f"got {fmt!r}")
        self.path = path
        self.fmt = fmt
        self.is_enabled = path != OFF
        self._format_fast, self._format_reference = LINE_FORMATTERS[fmt]
        self._flush_interval = flush_interval
        self._last_before_batch = batch_size - 1  # queued before the record filling a batch
        self._pending: deque[Any] = deque()  # append/popleft are atomic: no lock needed
        self._wake = gevent.event.Event()
        self._writing = gevent.lock.Semaphore()  # one flush at a time (never on the hot path)
        self._fd: int | None = None
        self._writer: gevent.Greenlet | None = None
        self._reopen_requested = False
        self._is_failing = False
        self._is_torn = False  # the file ends in part of a record (a write cut short)
        self._dropped = 0  # records dropped in this spell of failed or blocked writes
        self.dropped_total = 0  # records dropped, ever (a counter)
        self._refused = 0  # records `log` refused (the queue full) since the writer looked
        self._write_out = False  # a write is in the thread pool (may block for ever)
        self._has_reported_malformed = False
        self._is_closed = not self.is_enabled  # off: `log` does nothing at all

    def log(self, record: Any) -> None:
        """Queue one record. Hot path: a length check and an append (or a count), nothing else."""
        if self._is_closed:
            return
        pending = self._pending
        queued = len(pending)
        if queued >= QUEUE_LIMIT:  # a write blocks: the writer counts and reports these
            self._refused += 1
            return
        pending.append(record)
        if queued == self._last_before_batch:
            self._wake.set()

    def start(self) -> None:
        """Open the path and start ``writer_loop``; ``AccessLogError`` if it cannot be opened."""
        if not self.is_enabled or self._writer is not None:
            return
        self._fd = self._open()
        self._writer = gevent.spawn(self.writer_loop)

    def writer_loop(self) -> None:
        """Greenlet body: wake on the interval or a full batch, then ``flush``."""
        while not self._is_closed:
            self._wake.wait(self._flush_interval)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Apply a pending reopen, then format and write every queued record."""
        if self._fd is None:
            return
        with self._writing:
            if self._reopen_requested:
                self._reopen_now()
            batch = [self._pending.popleft() for _ in range(len(self._pending))]
            if batch:
                self._write(self._format_batch(batch))

    def reopen(self) -> None:
        """Ask the writer to reopen the path (logrotate, SIGUSR1); safe from a signal greenlet."""
        self._reopen_requested = True
        self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, stop the writer and close the file; ``log`` becomes a
        no-op. A write that blocks past `timeout` is left to its thread, with what waits."""
        if self._is_closed:
            return
        self._is_closed = True
        self._wake.set()
        if self._writer is not None:
            self._writer.join(timeout)
            self._writer.kill(block=True, timeout=timeout)
        if not self._write_out:
            last = gevent.spawn(self.flush)
            last.join(timeout)
            last.kill(block=True, timeout=timeout)
        fd, self._fd = self._fd, None
        # never under a write still out: its thread would go on writing to whatever
        # file or socket is given the number next
        if fd is not None and self.path != STDOUT and not self._write_out:
            os.close(fd)

    def __repr__(self) -> str:
        state = "off" if not self.is_enabled else "open" if self._fd is not None else "closed"
        return f"<AccessLog {self.path!r} {self.fmt} {state} pending={len(self._pending)}>"

    def _open(self) -> int:
        if self.path == STDOUT:
            return sys.stdout.fileno()
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        try:
            return os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise AccessLogError(
                f"cannot open access log {self.path}: {exc.strerror or exc}") from None

    def _reopen_now(self) -> None:
        self._reopen_requested = False
        if self.path == STDOUT:
            return
        try:
            fd = self._open()
        except AccessLogError as exc:
            self._report(f"{exc}; still writing to the old file")
            return
        old, self._fd = self._fd, fd
        if old is not None:
            os.close(old)
        if os.fstat(fd).st_size == 0:
            self._is_torn = False  # a new file (rotated): nothing to finish

    def _format_batch(self, batch: list[Any]) -> bytes:
        format_fast = self._format_fast
        lines: list[bytes] = []
        append = lines.append
        for record in batch:
            line = format_fast(record)
            append(self._format_slowly(record) if line is None else line)
        return b"".join(lines)

    def _format_slowly(self, record: Any) -> bytes:
        """A record the fast formatter declined: the reference line, or b"" if malformed."""
        try:
            return self._format_reference(record).encode("utf-8", "backslashreplace")
        except Exception as exc:  # a caller's bug must not stop the log: tell once
            if not self._has_reported_malformed:
                self._has_reported_malformed = True
                self._report(f"access log: skipping malformed records, first {record!r}: "
                             f"{exc!r}")
            return b""

    def _write(self, data: bytes) -> None:
        finish = b"\n" if self._is_torn else b""  # ends the torn record's line
        data = finish + data
        written, exc = self._write_in_thread(data)
        if written:
            self._is_torn = data[written - 1] != NEWLINE
        refused = self._take_refused()
        if exc is not None:
            lost = data.count(b"\n", max(written, len(finish)))  # records not written whole
            self._dropped += lost
            self.dropped_total += lost
            self._begin_spell(f"write failed ({exc.strerror or exc})")
            return
        if refused:  # the queue filled while this write was out: the next tells the end
            self._begin_spell(f"the queue was full ({QUEUE_LIMIT} records) during a write")
            return
        if self._is_failing:
            self._is_failing = False
            self._report(f"access log {self.path}: writing again; "
                         f"{self._dropped} records were dropped")
            self._dropped = 0

    def _write_in_thread(self, data: bytes) -> tuple[int, OSError | None]:
        """`_write_all` in the thread pool; while it blocks, every `STALL_CHECK`
        seconds the records `log` refused are counted (and the spell told)."""
        result = gevent.get_hub().threadpool.spawn(_write_all, self._fd, data)
        self._write_out = True  # until it returns (a kill while it blocks leaves it out)
        blocked = 0.0
        while not result.ready():
            result.wait(STALL_CHECK)
            blocked += STALL_CHECK
            if not result.ready() and self._take_refused():
                self._begin_spell(f"a write has been blocked for {blocked:.0f} s with "
                                  f"{QUEUE_LIMIT} records waiting")
        self._write_out = False
        written, exc = result.get()
        return written, exc

    def _take_refused(self) -> int:
        """Count the records `log` refused since the last look as dropped; how many."""
        refused, self._refused = self._refused, 0
        self._dropped += refused
        self.dropped_total += refused
        return refused

    def _begin_spell(self, why: str) -> None:
        """Tell, once per spell of failed or blocked writes, that records are dropped."""
        if not self._is_failing:
            self._is_failing = True
            self._report(f"access log {self.path}: {why}; "
                         "dropping records until writes succeed again")

    @staticmethod
    def _report(message: str) -> None:
        try:
            sys.stderr.write(f"balancer: {message}\n")
            sys.stderr.flush()
        except (OSError, ValueError):  # stderr gone too: nothing left to tell
            pass


def _write_all(fd: int, data: bytes) -> tuple[int, OSError | None]:
    """Write all of ``data`` to ``fd`` (os.write may write part of it): how many
    bytes were written, and the OSError that stopped it (ENOSPC, EFBIG past
    RLIMIT_FSIZE: SIGXFSZ is ignored, as Python starts; EPIPE), or None."""
    view, written = memoryview(data), 0
    try:
        while written < len(data):
            written += os.write(fd, view[written:])
    except OSError as exc:
        return written, exc
    return written, None
