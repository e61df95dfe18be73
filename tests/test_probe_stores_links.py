"""Outside probe of a Redis store behind a network that drops idle connections
without a word (2026-12-07): a NAT, a firewall's conntrack or a cloud load
balancer forgets a connection idle for minutes and drops its packets, no RST.
The connection that idles is the watcher's subscription (a write's message is
its only traffic); the connection of the version checks (every
`resync_interval`) stays alive. A scripted TCP proxy in front of a real
redis-server plays that network: it stops forwarding on the connections that
subscribed, leaving them open.

* The watcher never saw its subscription die: every later write was found by
  the resync's version check ("version moved ... without a message"), up to
  `resync_interval` late (5 s by default) and read as a whole table, at every
  write for good (at 100,000 hosts, 3-15 s of CPU in each worker, each time).
  Now a version check that finds a write whose message never came subscribes
  again, on a new connection: the next writes are applied from their messages.
* A Redis that refuses ``SUBSCRIBE`` (disabled with ``rename-command``; an ACL
  user without channel permissions answers ``NOPERM`` the same way; a proxy
  without pub/sub) had every watcher report the store unreachable and
  reconnect with backoff for good: another balancer's write was never served.
  Now the refusal is logged once and the table followed by the version checks.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.stores.redis import RedisStore
from tests.conftest import RedisServer
from tests.support import Balancer, request, wait_for

RESYNC = 1.0


class SilentDrop:
    """A TCP proxy to `port` that forwards both ways; `forget` makes it read and
    discard, from then on, what the connections that sent SUBSCRIBE so far carry
    (nothing reaches either end, nothing is closed). New connections and those
    that never subscribed keep working."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.subscribers: list[threading.Event] = []  # set: forgotten
        self.stopped = False
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self.sockets += [client, server]
            forgotten = threading.Event()
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b, forgotten),
                                 daemon=True).start()

    def forget(self) -> None:
        for forgotten in self.subscribers:
            forgotten.set()

    def _pump(self, source: socket.socket, sink: socket.socket,
              forgotten: threading.Event) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                with contextlib.suppress(OSError):
                    sink.shutdown(socket.SHUT_WR)
                return
            if b"SUBSCRIBE" in data.upper():
                self.subscribers.append(forgotten)
            if forgotten.is_set():
                continue  # the network forgot this connection
            try:
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        self.stopped = True
        self.listener.close()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def dropping(redis_factory: Callable[[], RedisServer]) -> Iterator[tuple[RedisServer,
                                                                          SilentDrop]]:
    redis = redis_factory()
    proxy = SilentDrop(redis.port)
    yield redis, proxy
    proxy.close()


def test_a_redis_that_refuses_subscribe_is_followed_by_its_version(
        tmp_path: Path, redis_factory: Callable[[], RedisServer]) -> None:
    redis = redis_factory()
    redis.stop()
    redis.start("--rename-command", "SUBSCRIBE", "")
    balancer = Balancer(tmp_path, args=["--workers", "2"], store=redis.url,
                        env={"BALANCER_STORE_RESYNC_INTERVAL": str(RESYNC)})
    writer = RedisStore(redis.url)  # another balancer's management process
    try:
        for n in range(2):
            writer.put_host("a.test", static(f"a{n}"))
            body = f"a{n}".encode()
            wait_for(lambda body=body: all(request(balancer.port, host="a.test")[2] == body
                                           for _ in range(4)), what=f"write {n} served")
        assert balancer.store_problem() == ""
        # told once, by the management process (workers log their store's news quietly)
        assert balancer.output().count("Redis refused to subscribe") == 1
    finally:
        writer.close()
        balancer.stop()


def static(body: str) -> dict[str, Any]:
    return {"action": "static", "body": body}


def test_a_subscription_the_network_dropped_silently_is_made_again(
        tmp_path: Path, dropping: tuple[RedisServer, SilentDrop]) -> None:
    redis, proxy = dropping
    balancer = Balancer(tmp_path, args=["--workers", "2"],
                        store=f"redis://127.0.0.1:{proxy.port}/0",
                        env={"BALANCER_STORE_RESYNC_INTERVAL": str(RESYNC)})
    writer = RedisStore(redis.url)  # another balancer's management process
    try:
        version = writer.put_host("a.test", static("a0"))
        balancer.wait_version(version)
        proxy.forget()
        for n in range(1, 6):
            version = writer.put_host("a.test", static(f"a{n}"))
            body = f"a{n}".encode()
            wait_for(lambda body=body: all(request(balancer.port, host="a.test")[2] == body
                                           for _ in range(4)), what=f"write {n} served")
            balancer.wait_version(version)
        lost = balancer.output().count("without a message; resyncing")
        # each process (2 workers, the management process) finds one lost message,
        # then follows the messages on its new subscription
        assert lost <= 3, f"{lost} writes found only by the version check"
    finally:
        writer.close()
        balancer.stop()
