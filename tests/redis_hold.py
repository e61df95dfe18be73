"""A scripted peer in front of a real redis-server: a TCP relay that holds back, on
demand, what Redis sends to its subscribers (connections that sent ``SUBSCRIBE``),
so a balancer's store watchers hear of other balancers' writes late, on purpose,
while its other connections (reads, writes) pass at once; and that calls a hook
with what a client sends before Redis gets it (to act at a given command)."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

from tests.rawpeer import Link, Relay


class SubscriberHold(Relay):
    """Listens on a loopback port of its own (`port`) and relays each connection to
    the Redis on `redis_port`; between `hold()` and `release()` the bytes Redis sends
    to subscriber connections are kept, in order, and sent on release. `before` is
    called with each read from a client before it goes on to Redis."""

    def __init__(self, redis_port: int, before: Callable[[bytes], None] = lambda data: None
                 ) -> None:
        self.before = before
        self.lock = threading.Lock()  # one relay decides (hold or send) at a time
        self.held = False
        self.kept: list[tuple[socket.socket, bytes]] = []
        self.subscribers: set[socket.socket] = set()  # the clients that sent SUBSCRIBE
        super().__init__(("127.0.0.1", redis_port))

    def hold(self) -> None:
        with self.lock:
            self.held = True

    def release(self) -> None:
        """Send what was kept, each subscriber's in one write, then relay at once
        again. (Piece by piece, this process stalled between two of them, a
        watcher got a write's message and read the store past it, then waited
        for the next message `AHEAD_READS` times `MESSAGE_LAG`, and read the
        whole table: a read a test counts, for a delay of this relay's.)"""
        with self.lock:
            self.held = False
            kept, self.kept = self.kept, []
            joined: dict[socket.socket, list[bytes]] = {}
            for client, data in kept:
                joined.setdefault(client, []).append(data)
            for client, pieces in joined.items():
                with contextlib.suppress(OSError):
                    client.sendall(b"".join(pieces))

    def to_upstream(self, link: Link, data: bytes) -> None:
        if b"SUBSCRIBE" in data.upper():
            with self.lock:
                self.subscribers.add(link.client)
        self.before(data)
        link.upstream.sendall(data)

    def to_client(self, link: Link, data: bytes) -> None:
        with self.lock:
            if self.held and link.client in self.subscribers:
                self.kept.append((link.client, data))
            else:
                link.client.sendall(data)
