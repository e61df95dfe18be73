"""A two-way byte tunnel (after a backend accepted an Upgrade with 101).

Invariants:
* Each direction is pumped by its own thread of control (a greenlet under
  gevent, an OS thread in the threaded baseline).
* End of stream in one direction half-closes the other side's write end;
  the tunnel ends when both directions ended, or either stayed silent for
  `idle` seconds, or a socket failed. Both sockets are the caller's to close.
"""

from __future__ import annotations

import socket
import threading

RECV_SIZE = 65536


def _pump(src: socket.socket, dst: socket.socket, idle: float, counts: list[int],
          index: int, done: threading.Event) -> None:
    try:
        src.settimeout(idle)
        while True:
            data = src.recv(RECV_SIZE)
            if not data:
                dst.shutdown(socket.SHUT_WR)
                return
            dst.sendall(data)
            counts[index] += len(data)
    except OSError:
        # timeout or reset: tear down both directions
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    finally:
        done.set()


def tunnel(client: socket.socket, backend: socket.socket, client_leftover: bytes,
           idle: float) -> tuple[int, int]:
    """Relay bytes both ways until done; returns (bytes to client, bytes from client)."""
    counts = [0, 0]
    if client_leftover:
        backend.sendall(client_leftover)
        counts[1] += len(client_leftover)
    upstream_done = threading.Event()
    thread = threading.Thread(target=_pump, daemon=True,
                              args=(client, backend, idle, counts, 1, upstream_done))
    thread.start()
    _pump(backend, client, idle, counts, 0, threading.Event())
    upstream_done.wait(idle)
    return counts[0], counts[1]
