"""One process of the built-in generator: gevent greenlets, one per connection.

Invariants:
* A worker writes only its own slice of the shared counters (no locks needed);
  the parent only reads them, and only writes the control array.
* Every wait is bounded: connects and responses by the spec's timeouts, the
  whole worker by the parent's stop flag, and by the parent's death.
* SIGINT is ignored here: the parent owns interruption and stops the workers.
"""

from __future__ import annotations

import os
import signal
import time

# Counter slots of one worker's slice.
OK, NON2XX, CONNECT, READ, TIMEOUT, BYTES, OPEN, READY, FIRST_DONE, LAST_DONE, ALIVE = range(11)
HIST_BASE = 11
# Control array slots (written by the parent).
GO, STOP = 0, 1
POLL = 0.02


class ReadError(Exception):
    """The server closed or sent something that is not an HTTP response."""


def read_response(sock, buffer: bytearray) -> tuple[int, int, bool]:
    """Read one response; returns (status, bytes, server_keeps_alive)."""
    while (end := buffer.find(b"\r\n\r\n")) < 0:
        if not _fill(sock, buffer):
            raise ReadError("closed before the response head")
    head = bytes(buffer[:end]).split(b"\r\n")
    del buffer[:end + 4]
    try:
        status = int(head[0].split(b" ", 2)[1])
    except (IndexError, ValueError) as exc:
        raise ReadError(f"bad status line {head[0][:40]!r}") from exc
    length, chunked, keep = None, False, not head[0].startswith(b"HTTP/1.0")
    for line in head[1:]:
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value
        elif name == b"connection":
            keep = value != b"close" and (keep or value == b"keep-alive")
    if chunked:
        return status, _read_chunked(sock, buffer) + end, keep
    if length is None:
        while _fill(sock, buffer):
            pass
        length, keep = len(buffer), False
    while len(buffer) < length:
        if not _fill(sock, buffer):
            raise ReadError("closed inside the response body")
    del buffer[:length]
    return status, length + end, keep


def _fill(sock, buffer: bytearray) -> bool:
    data = sock.recv(65536)
    buffer += data
    return bool(data)


def _read_chunked(sock, buffer: bytearray) -> int:
    total = 0
    while True:
        while (end := buffer.find(b"\r\n")) < 0:
            if not _fill(sock, buffer):
                raise ReadError("closed inside a chunk size")
        size = int(bytes(buffer[:end]).split(b";")[0], 16)
        need = end + 2 + size + 2
        while len(buffer) < need:
            if not _fill(sock, buffer):
                raise ReadError("closed inside a chunk")
        del buffer[:need]
        total += size
        if size == 0:
            return total


class Worker:
    """The greenlets of one generator process and the slice they count into."""

    def __init__(self, spec, index: int, count: int, counters, control) -> None:
        from loadtest.results import bucket_of

        self.spec, self.counters, self.control = spec, counters, control
        self.base = index * spec.slots
        self.connections = spec.connections // count + (index < spec.connections % count)
        self.bucket_of = bucket_of
        keep = b"" if spec.keepalive else b"Connection: close\r\n"
        self.request = (f"GET {spec.path} HTTP/1.1\r\nHost: {spec.host_header}\r\n"
                        f"User-Agent: loadtest\r\n").encode() + keep + b"\r\n"

    def add(self, slot: int, amount: int = 1) -> None:
        self.counters[self.base + slot] += amount

    def connect(self):
        from gevent import socket

        try:
            sock = socket.create_connection((self.spec.host, self.spec.port),
                                            timeout=self.spec.connect_timeout)
        except OSError:
            self.add(CONNECT)
            return None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.spec.timeout)
        return sock

    def exchange(self, sock, buffer: bytearray) -> bool:
        """One request and its response, counted; False when the connection is done."""
        started = time.perf_counter()
        try:
            sock.sendall(self.request)
            status, size, keep = read_response(sock, buffer)
        except TimeoutError:
            self.add(TIMEOUT)
            return False
        except (OSError, ReadError, ValueError):
            self.add(READ)
            return False
        if self.control[STOP]:
            return False
        done = time.perf_counter()
        self.add(OK if 200 <= status < 300 else NON2XX)
        self.add(BYTES, size)
        self.add(HIST_BASE + self.bucket_of((done - started) * 1e6))
        self.note_done()
        return keep and self.spec.keepalive

    def note_done(self) -> None:
        now_us = int(time.time() * 1e6)
        first = self.base + FIRST_DONE
        if not self.counters[first] or now_us < self.counters[first]:
            self.counters[first] = now_us
        self.counters[self.base + LAST_DONE] = max(self.counters[self.base + LAST_DONE], now_us)

    def load_loop(self) -> None:
        """Closed loop: request after request until stopped, reconnecting as needed."""
        from gevent import sleep

        while not self.control[STOP]:
            sock = self.connect()
            if sock is None:
                sleep(0.01)  # refused: retry soon, without spinning the CPU
                continue
            buffer = bytearray()
            try:
                while not self.control[STOP] and self.exchange(sock, buffer):
                    pass
            finally:
                sock.close()

    def once_loop(self) -> None:
        """One request on its own connection (a held request, for spin)."""
        sock = self.connect()
        if sock is not None:
            try:
                self.exchange(sock, bytearray())
            finally:
                sock.close()

    def hold(self, held: list) -> None:
        """Open a connection, make one request, then keep it idle."""
        sock = self.connect()
        if sock is None:
            return
        if self.exchange(sock, bytearray()):
            held.append(sock)
            self.add(OPEN)
        else:
            sock.close()

    def verify(self, sock) -> None:
        """One more request on a held connection: counts ALIVE if it is answered."""
        try:
            sock.sendall(self.request)
            status, _, _ = read_response(sock, bytearray())
        except (OSError, ReadError, ValueError):
            return
        if 200 <= status < 300:
            self.add(ALIVE)


def _parent_gone(parent: int) -> bool:
    return os.getppid() != parent


def _wait_flag(control, slot: int, parent: int) -> bool:
    from gevent import sleep

    while not control[slot]:
        if _parent_gone(parent) or control[STOP]:
            return False
        sleep(POLL)
    return True


def worker_main(spec, index: int, count: int, counters, control, parent: int) -> None:
    """The body of generator process `index` of `count`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from loadtest.limits import raise_nofile

    raise_nofile()
    import gevent
    from gevent.pool import Pool

    worker = Worker(spec, index, count, counters, control)
    held: list = []
    if spec.mode == "idle":
        pool = Pool(spec.connect_batch)
        for _ in range(worker.connections):
            pool.spawn(worker.hold, held)
        pool.join(timeout=spec.connect_timeout + spec.timeout + spec.connections / 500)
        pool.kill(timeout=1)
    counters[worker.base + READY] = 1
    if not _wait_flag(control, GO, parent):
        return
    body = {"load": worker.load_loop, "once": worker.once_loop}.get(spec.mode)
    tasks = [gevent.spawn(body) for _ in range(worker.connections)] if body else []
    _wait_flag(control, STOP, parent)
    gevent.joinall(tasks, timeout=min(spec.timeout, 2.0))
    gevent.killall(tasks, timeout=1)
    if held and spec.verify_held:
        pool = Pool(spec.connect_batch)
        for sock in held:
            pool.spawn(worker.verify, sock)
        pool.join(timeout=spec.timeout + len(held) / 500)
        pool.kill(timeout=1)
    for sock in held:
        sock.close()
