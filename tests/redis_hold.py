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

CHUNK = 65536


class SubscriberHold:
    """Listens on a loopback port of its own (`port`) and relays each connection to
    the Redis on `redis_port`; between `hold()` and `release()` the bytes Redis sends
    to subscriber connections are kept, in order, and sent on release. `before` is
    called with each read from a client before it goes on to Redis."""

    def __init__(self, redis_port: int, before: Callable[[bytes], None] = lambda data: None
                 ) -> None:
        self.redis_port = redis_port
        self.before = before
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()  # one relay decides (hold or send) at a time
        self.held = False
        self.kept: list[tuple[socket.socket, bytes]] = []
        self.sockets: list[socket.socket] = []
        self.closed = False
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def hold(self) -> None:
        with self.lock:
            self.held = True

    def release(self) -> None:
        """Send what was kept, then relay at once again."""
        with self.lock:
            self.held = False
            kept, self.kept = self.kept, []
            for client, data in kept:
                with contextlib.suppress(OSError):
                    client.sendall(data)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        for sock in list(self.sockets):
            with contextlib.suppress(OSError):
                sock.close()

    def _accept_loop(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.redis_port), timeout=None)
            self.sockets += [client, server]
            subscriber = threading.Event()
            threading.Thread(target=self._to_redis, args=(client, server, subscriber),
                             daemon=True).start()
            threading.Thread(target=self._to_client, args=(server, client, subscriber),
                             daemon=True).start()

    def _to_redis(self, client: socket.socket, server: socket.socket,
                  subscriber: threading.Event) -> None:
        while data := _recv(client):
            if b"SUBSCRIBE" in data.upper():
                subscriber.set()
            self.before(data)
            try:
                server.sendall(data)
            except OSError:
                break
        _close(client, server)

    def _to_client(self, server: socket.socket, client: socket.socket,
                   subscriber: threading.Event) -> None:
        while data := _recv(server):
            with self.lock:
                if self.held and subscriber.is_set():
                    self.kept.append((client, data))
                    continue
                try:
                    client.sendall(data)
                except OSError:
                    break
        _close(client, server)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(CHUNK)
    except OSError:
        return b""


def _close(*sockets: socket.socket) -> None:
    for sock in sockets:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
