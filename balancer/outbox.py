"""Writes held to the end of the event loop's iteration, then made together.

A send to a peer asleep in ``epoll_wait`` wakes it, and waking a task on an
idle CPU is dear (an inter-processor interrupt, a VM exit under a
hypervisor): it was the worker's single largest cost under wrk. So the last
write a greenlet makes before it waits (a response's end, a request sent
whole) is held, and the loop's callback phase (libev's prepare watcher, after
every greenlet that was ready has run and before the next poll) makes all
held writes back to back: a peer woken by the first finds the next ones there
before it sleeps again.

A batch is at most BATCH_LIMIT writers: the one that fills it sends them all
at once. Unbounded, a thousand held requests released together (spin) reached
the backend only after the last greenlet had run, and the backend idled
meanwhile. What both cost and saved is measured in docs/performance.md.

Invariants:
* Bytes leave a socket in the order they were written: a direct `write`, and
  `finish`, first send what is held.
* A response's head and its body as it was read (a `balancer.spans.Span`,
  `write_last_span`) are held side by side and sent by one sendmsg: the body
  is neither sliced out of its read nor joined to the head. Behind other
  held bytes, or on a TLS socket, they are joined instead (a copy, as any
  write).
* A held write that fails (the peer is gone) is dropped; its owner learns of
  it from its next read of that socket (EOF or an error), its next step.
* A held write the socket takes only in part is finished by a greenlet of
  its own (`rest`); the owner's next write waits for it, `close` stops it.
  A TLS write is never taken in part: CPython sets no partial-write mode, so
  `SSL_write` sends every record or raises SSLWantWrite, having sent some
  (OpenSSL keeps count), or SSLWantRead, OpenSSL having to read before it
  can write (a handshake in progress, as in a TLS 1.2 renegotiation);
  it is then given again the very same bytes, whole, once the socket is
  writable or readable as it asked (`TLSWriter.flush` → `_send_rest`,
  `tls_send_all` → gevent's `sendall`, which waits for either), never a
  slice of them, and never dropped.
* A writer writes the OS socket only (an accepted client socket has no
  gevent wrapper, `balancer.accepting.Listener`): when its buffer is full it
  waits on a write watcher of its own, made at the first such wait and closed
  with the writer, and a wait is ended only by the watchdog's throw.
* At most BATCH_LIMIT writers wait in a batch; at most HOLD_LIMIT bytes per
  socket are held (a larger write is made at once).
* Only gevent's sockets have writers (`balancer.netio.EventedStream`, and
  `balancer.netio.TLSStream` with a `TLSWriter`: plaintext held, encrypted
  when sent); a blocking socket's writes are made at once.
"""

from __future__ import annotations

import contextlib
from ssl import SSLWantReadError, SSLWantWriteError
from typing import Any, Final

from gevent import get_hub, spawn

from balancer.sockcalls import send_now, send_span_now
from balancer.spans import Span, span_joined, span_size, unsent

WRITE: Final = 2  # libev's EV_WRITE
HOLD_LIMIT: Final = 65536  # bytes held per socket; a larger write is made at once
# Writers held at most per batch: a burst of greenlets (a thousand held requests
# released at once) must not keep the first of them from their peers until the
# last has run, or the peers sit idle meanwhile.
BATCH_LIMIT: Final = 32


class Outbox:
    """The writers holding bytes until the current loop iteration's callbacks."""

    __slots__ = ("loop", "queue", "held", "spare", "schedule", "flusher")

    def __init__(self, loop: Any) -> None:
        self.loop = loop
        # the writers holding bytes: the first `held` places of `queue`, the others
        # None. Arrays of BATCH_LIMIT places, kept: a list emptied reallocates its
        # array when filled again (a new list per flush cost ~150 instructions)
        self.queue: list[Writer | None] = [None] * BATCH_LIMIT
        self.held = 0
        # the other array, which `flush` makes `queue` while it writes out this one
        # (None meanwhile: a flush within it, which no writer's flush causes, gets one)
        self.spare: list[Writer | None] | None = [None] * BATCH_LIMIT
        # `loop.run_callback` and `self.flush`, bound once: looked up by name and made
        # anew on every first add of an iteration, they cost ~500 instructions
        self.schedule: Any = loop.run_callback
        self.flusher: Any = self.flush

    def add(self, writer: Writer) -> None:
        held = self.held
        if not held:
            self.schedule(self.flusher)
        self.queue[held] = writer
        held += 1
        self.held = held
        if held >= BATCH_LIMIT:
            self.flush()

    def flush(self) -> None:
        """The loop's callback: make every held write."""
        held = self.held
        if not held:
            return
        queue, spare = self.queue, self.spare
        self.queue = spare if spare is not None else [None] * BATCH_LIMIT
        self.spare = None
        self.held = 0
        for at in range(held):
            writer = queue[at]
            queue[at] = None
            if writer is not None:  # (always)
                writer.flush()
        self.spare = queue


class Writer:
    """The writes to one socket: direct, or held for the outbox."""

    __slots__ = ("raw", "outbox", "held", "tail", "rest", "watcher")

    def __init__(self, raw: Any, outbox: Outbox) -> None:
        self.raw = raw  # the OS socket, non-blocking
        self.outbox = outbox
        self.held = b""  # bytes waiting for the outbox
        # and after them (`write_last_span`; only ever after some), bytes waiting
        # where they were read
        self.tail: Span | None = None
        self.rest: Any = None  # the greenlet sending what a flush could not
        self.watcher: Any = None  # the write watcher, made by the first full buffer

    def held_size(self) -> int:
        """How many bytes are held (a held span's included)."""
        tail = self.tail
        return len(self.held) if tail is None else len(self.held) + span_size(tail)

    def writable(self) -> Any:
        """The socket's write watcher (made now if this is the first full buffer)."""
        watcher = self.watcher
        if watcher is None:
            watcher = self.watcher = self.outbox.loop.io(self.raw.fileno(), WRITE)
        return watcher

    def send(self, data: bytes) -> None:
        """All of `data`, now: one ``send``, and only when the buffer could not take
        it all, waits for the socket to be writable and sends the rest. (gevent's
        ``sendall`` queried SO_SNDBUF on every call, a syscall a write that fits
        the buffer does not need.) Raises OSError."""
        sent = send_now(self.raw, data)
        if sent < len(data):
            self._send_after(memoryview(data)[sent:])

    def send_span(self, head: bytes, span: Span) -> None:
        """`send` of `head` then `span`'s bytes, the first try one sendmsg of both
        (`balancer.sockcalls.send_span_now`: neither copied). Raises OSError."""
        sent = send_span_now(self.raw, head, span)
        if sent < len(head) + span_size(span):
            self._send_after(memoryview(unsent(head, span, sent)))

    def _send_after(self, view: memoryview) -> None:
        """The rest of a send the socket's buffer could not take: waits until it
        is writable and sends, until all went."""
        raw = self.raw
        writable, hub = self.writable(), get_hub()
        while len(view):
            hub.wait(writable)
            # two statements: mypyc 2.4.1 compiles ``view[send_now(raw, view):]``
            # into two calls of send_now, slicing by the second's result (bytes
            # that went out were sent again)
            sent = send_now(raw, view)
            view = view[sent:]

    def write(self, data: bytes) -> None:
        """Send `data` now, after what is held. Raises OSError."""
        if self.held or self.rest is not None:
            self.finish()
        self.send(data)

    def write_span(self, head: bytes, span: Span) -> None:
        """`write` of `head` then `span`'s bytes, in one syscall. Raises OSError."""
        if self.held or self.rest is not None:
            self.finish()
        self.send_span(head, span)

    def write_last(self, data: bytes) -> None:
        """Send `data` by the end of this loop iteration: the caller's next step
        is to wait for its peer (or to close, which calls `finish`)."""
        held = self.held
        tail = self.tail
        if tail is not None:  # bytes behind a span: all joined (pipelined responses)
            self.tail = None
            held = self.held = span_joined(held, tail)
        if self.rest is not None or len(data) + len(held) > HOLD_LIMIT:
            self.write(data)
        elif held:
            self.held = held + data
        else:
            self.held = data
            self.outbox.add(self)

    def write_last_span(self, head: bytes, span: Span) -> None:
        """`write_last` of `head` then `span`'s bytes: held as they are, and sent
        by one sendmsg of both (`flush`)."""
        if self.held or not head:  # behind other held bytes: joined to them
            self.write_last(span_joined(head, span))
        elif self.rest is not None or len(head) + span_size(span) > HOLD_LIMIT:
            self.write_span(head, span)
        else:
            self.held = head
            self.tail = span
            self.outbox.add(self)

    def finish(self) -> None:
        """Send what is held, now, from the calling greenlet. Raises OSError."""
        rest = self.rest
        if rest is not None:
            rest.join()
            self.rest = None
        data = self.held
        if data:
            self.held = b""
            tail = self.tail
            if tail is None:
                self.send(data)
            else:
                self.tail = None
                self.send_span(data, tail)

    def flush(self) -> None:
        """The outbox's part (in the hub): one non-blocking send."""
        data = self.held
        if not data:  # finished by its owner meanwhile
            return
        self.held = b""
        tail = self.tail
        sent: int
        if tail is None:
            try:
                sent = send_now(self.raw, data)
            except OSError:
                return
            if sent < len(data):
                self.rest = spawn(self._send_rest, data[sent:])
            return
        self.tail = None
        try:
            sent = send_span_now(self.raw, data, tail)
        except OSError:
            return
        if sent < len(data) + span_size(tail):
            self.rest = spawn(self._send_rest, unsent(data, tail, sent))

    def _send_rest(self, data: bytes) -> None:
        with contextlib.suppress(OSError):  # the owner's next read or write finds it broken
            self.send(data)

    def close(self) -> None:
        """Drop what is held, stop a send in progress and the write watcher (the
        socket closes next)."""
        self.held = b""
        self.tail = None
        rest = self.rest
        if rest is not None:
            self.rest = None
            rest.kill(block=False)
        watcher = self.watcher
        if watcher is not None:
            self.watcher = None
            watcher.close()


def tls_send_all(sock: Any, obj: Any, data: bytes) -> None:
    """`sock.sendall(data)` for a TLS socket: one SSL_write on its SSL object `obj`
    first; a socket buffer that cannot take it all (SSLWantWrite), or OpenSSL
    having to read first (SSLWantRead), leaves gevent's ``sendall`` to write the
    same bytes again once the socket is writable, or readable (OpenSSL wants the
    retry to pass them whole). Raises OSError."""
    try:
        sent = obj.write(data)
    except (SSLWantWriteError, SSLWantReadError):
        sent = 0
    if sent < len(data):
        sock.sendall(data[sent:])


class TLSWriter(Writer):
    """The writes to one TLS socket (gevent's SSLSocket `sock`): plaintext is held,
    and encrypted by its SSL object (`raw`) when sent, so that a held response
    costs the same one SSL_write, made with the loop's other held writes. A full
    buffer, or OpenSSL wanting to read first, waits in gevent's ``sendall``, not
    on the writer's own watcher."""

    __slots__ = ("sock",)

    def __init__(self, sock: Any, raw: Any, outbox: Outbox) -> None:
        super().__init__(raw, outbox)
        self.sock = sock

    def send(self, data: bytes) -> None:
        """All of `data`, now (`write` and `finish` send through it)."""
        tls_send_all(self.sock, self.raw, data)

    def writable(self) -> Any:
        """The socket's write watcher, made now if this is the first wait: only a
        read that OpenSSL cannot make before a write waits on it
        (`balancer.netio.TLSStream.recv`); the writer's own waits are gevent's."""
        watcher = self.watcher
        if watcher is None:
            watcher = self.watcher = self.outbox.loop.io(self.sock.fileno(), WRITE)
        return watcher

    def write_span(self, head: bytes, span: Span) -> None:
        """`write` of the two joined: one SSL_write (its record is made of a copy anyway)."""
        self.write(span_joined(head, span))

    def write_last_span(self, head: bytes, span: Span) -> None:
        """`write_last` of the two joined (a `TLSWriter` never holds a span)."""
        self.write_last(span_joined(head, span))

    def flush(self) -> None:
        data = self.held
        if not data:  # finished by its owner meanwhile
            return
        self.held = b""
        try:
            self.raw.write(data)
        except (SSLWantWriteError, SSLWantReadError):  # not taken whole (the socket is
            # full, or OpenSSL must read first): `send` retries the same bytes, whole,
            # once the socket is writable, or readable
            self.rest = spawn(self._send_rest, data)
        except OSError:  # SSLError included: the connection is broken
            return

