"""The access log's writer: records queued by the request path, written off it.

The request path only appends a plain tuple (a record,
`balancer.accesslog.records`) to a deque; the ``writer_loop`` greenlet
formats and writes pending records every ``flush_interval`` seconds, or
sooner once ``batch_size`` records wait. The write itself runs in gevent's
thread pool, so a slow disk or a full stdout pipe delays the log, never the
requests.

Invariants:
* ``log`` is a length check, a sum and an append (past a limit, a count
  instead), nothing else: the caller says what the record keeps of its
  request (`records.held_bytes`; the request path adds the lengths it has).
* At most ``QUEUE_LIMIT`` records wait, keeping at most ``HELD_LIMIT``
  bytes of their requests (a record alone always fits): while a write blocks
  (stdout a pipe whose reader stopped reading, a file on a hung mount)
  ``log`` refuses the records past either and counts them, and the writer
  reports them as dropped (bug: the queue grew with every request until the
  worker ran out of memory; and bug: 10,000 records of 64 KiB heads, a
  hostile client's, held 600 MB). Past ``HELD_BATCH`` bytes the writer is
  woken, as at a full batch: while writes keep up, big heads' records are
  written as they come, long before ``HELD_LIMIT``. One write is out at a
  time, besides at most one a reopen left to the old file; ``close`` does
  not wait for one that blocks (a stopping worker waited for it until the
  arbiter killed it).
* Opening never blocks the worker. A FIFO nobody has opened for reading
  (its reader, a log shipper, not started yet) is opened by the writer in
  the thread pool, where the open waits for a reader; records queue within
  the bounds above meanwhile and those past them are dropped and counted, as
  while a write blocks, told once, and the log starts when a reader comes
  (bug: `start` opened it in the worker, which hung there before serving, and
  so did the start-up check of a reload). As HAProxy does with a log target
  that cannot take lines, not as nginx, whose start hangs on such a FIFO.
* A reopen (SIGUSR1) opens the path in the thread pool (a hung mount blocks
  an open too). Asked for while a write blocks, it is tried within
  ``STALL_CHECK``: if the path names another file (rotated, replaced), the
  log goes on there and the blocked write is left to the old file, closed
  once that write returns (bug: a reopen took effect only once the blocked
  write returned, perhaps never). A path that still names the blocked file
  is not opened twice: two writes out to one file would interleave.
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

import errno
import os
import sys
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import gevent
import gevent.event
import gevent.lock

from balancer.accesslog.files import OPEN_FLAGS, open_path, write_all
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
# Bytes of their requests the records waiting keep at most (`records.held_bytes`:
# host, target, referer, user agent, request id). A browser's record keeps ~300
# bytes, so `QUEUE_LIMIT` records (~3 MB) fit and this never changes what
# ordinary traffic loses; a client sending 64 KiB heads fills it with 64
# records, not 10,000 (640 MB). With the records' own ~600 bytes, a stalled
# log holds at most ~10 MB per worker, whatever the clients send.
HELD_LIMIT: Final = 4 << 20
HELD_BATCH: Final = HELD_LIMIT // 4  # bytes waiting that wake the writer, as a full batch
FULL = f"{QUEUE_LIMIT} records or {HELD_LIMIT >> 20} MiB of their requests"  # for the log
STALL_CHECK: Final = 1.0  # seconds between looks at the queue while a write is out
CLOSING: Final = "the access log is closing"  # why an open was given up (`_open_in_thread`)


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
        # its bound method, called as a value: compiled, `pending.append(r)` looks the
        # method up by name at every call (~110 instructions more per request)
        self._append: Callable[[Any], None] = self._pending.append
        self._held = 0  # bytes of their requests the records in `_pending` keep
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
        self._retiring = False  # a write a reopen left to the old file is out (`_retire`)
        self._has_reported_malformed = False
        self._is_closed = not self.is_enabled  # off: `log` does nothing at all

    def log(self, record: Any, held: int) -> None:
        """Queue one record keeping `held` bytes of its request (`records.held_bytes`).
        Hot path: a length check, a sum and an append (or a count), nothing else."""
        if self._is_closed:
            return
        queued = len(self._pending)
        before = self._held
        after = before + held
        if queued >= QUEUE_LIMIT or (after > HELD_LIMIT and queued):
            self._refused += 1  # a write blocks: the writer counts and reports these
            return
        self._append(record)
        self._held = after
        if queued == self._last_before_batch or after > HELD_BATCH >= before:
            self._wake.set()

    def start(self) -> None:
        """Open the path (a FIFO with no reader yet: in ``writer_loop``) and start
        ``writer_loop``; ``AccessLogError`` if it cannot be opened."""
        if not self.is_enabled or self._writer is not None:
            return
        self._fd = self._open()
        self._writer = gevent.spawn(self.writer_loop)

    def check(self) -> None:
        """``AccessLogError`` unless the path can be opened (a FIFO with no reader
        yet can: the writer waits for one). Opens nothing that stays open."""
        fd = self._open() if self.is_enabled else None
        if fd is not None and self.path != STDOUT:
            os.close(fd)

    def writer_loop(self) -> None:
        """Greenlet body: wake on the interval or a full batch, then ``flush``."""
        if self._fd is None:
            self._await_reader()
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
            self._held = 0  # with the batch taken (no switch between): what waits keeps none
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
        self._drop_unwritten()

    def _drop_unwritten(self) -> None:
        """Count what waits at close as dropped, told once: it is never written (a
        FIFO that no reader opened, a write that still blocks). Bug: those records
        went uncounted (a worker retired by a reload before its FIFO had a reader
        lost them, and `balancer_access_log_dropped_records_total` said 0)."""
        refused = self._take_refused()  # (counted there)
        waiting = len(self._pending)
        self._pending.clear()
        self._held = 0
        self._dropped += waiting
        self.dropped_total += waiting
        if waiting or refused:
            self._report(f"access log {self.path}: closed with {waiting + refused} "
                         "records not written; dropped")

    def __repr__(self) -> str:
        state = "off" if not self.is_enabled else "open" if self._fd is not None else "closed"
        return f"<AccessLog {self.path!r} {self.fmt} {state} pending={len(self._pending)}>"

    def _open(self) -> int | None:
        """The path's descriptor (blocking writes), or None: a FIFO nobody has open
        for reading (opened without waiting: ENXIO)."""
        if self.path == STDOUT:
            return sys.stdout.fileno()
        try:
            fd = os.open(self.path, OPEN_FLAGS | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return None
            raise AccessLogError(
                f"cannot open access log {self.path}: {exc.strerror or exc}") from None
        os.set_blocking(fd, True)  # a write waits in the thread pool, never the worker
        return fd

    def _await_reader(self) -> None:
        """Open a FIFO that had no reader in the thread pool, where the open waits for
        one, until it opens or the log is closed; records `log` refuses meanwhile
        are counted as dropped every `STALL_CHECK` seconds."""
        self._is_failing = True  # the first write tells what was dropped meanwhile
        self._report(f"access log {self.path}: a FIFO nobody reads yet; waiting for a "
                     f"reader, with at most {FULL} waiting, records past them dropped")
        said = ""
        while self._fd is None and not self._is_closed:
            fd, why = self._open_in_thread(-1)
            if fd >= 0:
                self._fd = fd
            elif why == CLOSING:
                return
            elif why != said:  # (replaced by something that cannot be opened)
                said = why
                self._report(f"cannot open access log {self.path}: {why}; trying again")
            else:
                gevent.sleep(STALL_CHECK)

    def _reopen_now(self) -> None:
        self._reopen_requested = False
        if self.path == STDOUT:
            return
        fd, why = self._open_in_thread(-1)
        if why == CLOSING:
            return
        if fd < 0:
            self._report(f"cannot open access log {self.path}: {why}; still writing to "
                         "the old file")
            return
        old, self._fd = self._fd, fd
        if old is not None:
            os.close(old)
        if os.fstat(fd).st_size == 0:
            self._is_torn = False  # a new file (rotated): nothing to finish

    def _reopen_beside(self, result: Any, data: bytes, start: int) -> bool:
        """SIGUSR1 while a write blocks (the file rotated or replaced, the old one
        stuck): if the path now names another file, the log goes on there and the
        blocked write is left to the old file (`_retire`, which closes it once the
        write returns). Whether it did. At most one write is left so at a time:
        while one is, a reopen waits for the write, as any reopen did before."""
        blocked = self._fd
        if self._retiring or self.path == STDOUT or blocked is None:
            return False
        self._reopen_requested = False
        fd, why = self._open_in_thread(blocked)
        if fd >= 0 and result.ready():  # the write returned meanwhile: reopen as usual
            os.close(fd)
            self._reopen_requested = True
            return False
        if fd < 0:
            if why != CLOSING:
                self._report(f"access log {self.path}: not reopened while a write blocks: "
                             f"{why}")
            return False
        self._fd = fd
        self._retiring, self._write_out, self._is_torn = True, False, False
        gevent.spawn(self._retire, blocked, result, data, start)
        self._report(f"access log {self.path}: reopened while a write to the old file "
                     f"blocks; that write's {data.count(NEWLINE, start)} records are left "
                     "to it")
        return True

    def _retire(self, fd: int, result: Any, data: bytes, start: int) -> None:
        """Greenlet body: wait for a write left to the old file, count the records it
        did not write as dropped, then close the old file (never under the write)."""
        result.wait()
        written, exc = result.get()
        if exc is not None:
            lost = data.count(NEWLINE, max(written, start))
            self._dropped += lost
            self.dropped_total += lost
        os.close(fd)
        self._retiring = False

    def _open_in_thread(self, beside: int) -> tuple[int, str]:
        """`open_path` in the thread pool (a hung mount blocks an open too); while
        it blocks, the records `log` refused are counted every `STALL_CHECK` seconds.
        Given up, (-1, CLOSING), once the log is closed: the open is left to its
        thread (the worker stops). Bug: a stop waited for a reopen that waited for
        a FIFO's reader, the close's whole timeout (5 s)."""
        result = gevent.get_hub().threadpool.spawn(open_path, self.path, beside)
        while not result.ready():
            if self._is_closed:
                return -1, CLOSING
            result.wait(STALL_CHECK)
            self._take_refused()
        fd, why = result.get()
        return fd, why

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
        outcome = self._write_in_thread(data, len(finish))
        if outcome is None:  # a reopen moved the log to another file: the old one has it
            return
        written, exc = outcome
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
            self._begin_spell(f"the queue was full ({FULL}) during a write")
            return
        if self._is_failing:
            self._is_failing = False
            self._report(f"access log {self.path}: writing again; "
                         f"{self._dropped} records were dropped")
            self._dropped = 0

    def _write_in_thread(self, data: bytes, start: int) -> tuple[int, OSError | None] | None:
        """`write_all` in the thread pool; while it blocks, every `STALL_CHECK`
        seconds the records `log` refused are counted (and the spell told), and a
        reopen asked for is tried (`_reopen_beside`): None if the log moved to
        another file, this write left to the old one. `start`: where its records start."""
        result = gevent.get_hub().threadpool.spawn(write_all, self._fd, data)
        self._write_out = True  # until it returns (a kill while it blocks leaves it out)
        blocked = 0.0
        while not result.ready():
            result.wait(STALL_CHECK)
            blocked += STALL_CHECK
            if result.ready():
                break
            if self._take_refused():
                self._begin_spell(f"a write has been blocked for {blocked:.0f} s with "
                                  f"{len(self._pending)} records waiting (at most {FULL})")
            if self._reopen_requested and self._reopen_beside(result, data, start):
                return None
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

