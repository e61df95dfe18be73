"""A two-way byte tunnel (after a backend accepted an Upgrade with 101).

Invariants:
* Each direction is pumped by its own thread of control (a greenlet under
  gevent, an OS thread in the threaded baseline).
* End of stream in one direction half-closes the other side's write end
  (SHUT_WR) and the other direction keeps flowing; the tunnel ends when both
  directions ended, when the tunnel saw no byte in either direction for
  `idle` seconds, or when a socket failed (both are then shut down).
* Both sockets are the caller's to close. Either may be TLS (a TLS listener's
  client, an https:// backend): only ``recv``, ``sendall`` and ``settimeout``
  are called on them, and ends are TCP shutdowns under TLS (`shutdown`).
"""

from __future__ import annotations

import _socket
import contextlib
import socket
import threading
import time

RECV_SIZE = 65536


def shutdown(sock: socket.socket, how: int) -> None:
    """shutdown(2) on the TCP socket under `sock`, TLS or not (errors ignored).

    An SSL socket's own ``shutdown`` drops its SSL object, and every read after
    it would return ciphertext: a TLS peer whose other direction ended gets a
    TCP FIN with no close_notify (WebSocket has its own closing handshake).
    A socket closed already is left alone: a stopping worker closes the
    connections still open when its drain ends, a tunnel's under its pumps
    (bug: a pump then died with "negative file descriptor" and a traceback)."""
    fileno = sock.fileno()
    if fileno < 0:
        return
    raw = _socket.socket(fileno=fileno)  # the C socket: never gevent's
    try:
        with contextlib.suppress(OSError):
            raw.shutdown(how)
    finally:
        raw.detach()


class _Activity:
    """What both pumps share: byte counts and the time of the last byte."""

    __slots__ = ("counts", "last")

    def __init__(self) -> None:
        self.counts = [0, 0]  # [to the client, from the client]
        self.last = time.monotonic()


def _pump(src: socket.socket, dst: socket.socket, idle: float, activity: _Activity,
          index: int, done: threading.Event) -> None:
    try:
        src.settimeout(idle)
        while True:
            try:
                data = src.recv(RECV_SIZE)
            except TimeoutError:
                quiet = time.monotonic() - activity.last
                if quiet >= idle:
                    raise
                src.settimeout(idle - quiet)  # the other direction was busy meanwhile
                continue
            if not data:
                shutdown(dst, socket.SHUT_WR)
                return
            activity.last = time.monotonic()
            dst.sendall(data)
            activity.counts[index] += len(data)
    except OSError:
        # idle timeout, reset or a failed send: tear down both directions
        for sock in (src, dst):
            shutdown(sock, socket.SHUT_RDWR)
    finally:
        done.set()


def tunnel(client: socket.socket, backend: socket.socket, client_leftover: bytes,
           idle: float) -> tuple[int, int]:
    """Relay bytes both ways until done; returns (bytes to client, bytes from client)."""
    activity = _Activity()
    if client_leftover:
        backend.sendall(client_leftover)
        activity.counts[1] += len(client_leftover)
    upstream_done = threading.Event()
    thread = threading.Thread(target=_pump, daemon=True,
                              args=(client, backend, idle, activity, 1, upstream_done))
    thread.start()
    _pump(backend, client, idle, activity, 0, threading.Event())
    while not upstream_done.wait(idle):
        if time.monotonic() - activity.last >= idle:
            shutdown(client, socket.SHUT_RDWR)
            upstream_done.wait(idle)
            break
    return activity.counts[0], activity.counts[1]
