"""Read-your-writes with a worker that is starting: a write the management process
answers 200 is served by every worker, also by one that read the store just before
the write and had no control socket yet when the write was published (so it was
not asked). A real balancer on a real Redis, through a relay that stops the new
worker (SIGSTOP) right as its first read of the table is answered."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import RedisServer
from tests.rawpeer import Link, Relay
from tests.support import Balancer, holders, wait_for

HOST = "app.test"
OLD = {"action": "static", "status": 200, "body": "old"}
NEW = {"action": "static", "status": 200, "body": "new"}


class StopAtLoad(Relay):
    """Relays to Redis; once `arm`ed, stops (`stop_new`) the process that sends the
    next ``HGETALL`` just before its answer goes back, and between `freeze` and
    `thaw` keeps what Redis answers on connections that sent nothing before (the new
    worker's watcher, which would otherwise race the request to catch up)."""

    def __init__(self, redis_port: int, stop_new: Callable[[Link], bool]) -> None:
        self.stop_new = stop_new
        self.lock = threading.Lock()
        self.armed = False
        self.loading: Link | None = None
        self.stopped = threading.Event()
        self.frozen = False
        self.kept: list[tuple[socket.socket, bytes]] = []
        self.known: set[int] = set()  # ids of the clients seen before `freeze`
        super().__init__(("127.0.0.1", redis_port))

    def arm(self) -> None:
        with self.lock:
            self.armed = True

    def freeze(self) -> None:
        with self.lock:
            self.frozen = True

    def thaw(self) -> None:
        with self.lock:
            self.frozen = False
            kept, self.kept = self.kept, []
            for client, data in kept:
                with contextlib.suppress(OSError):
                    client.sendall(data)

    def to_upstream(self, link: Link, data: bytes) -> None:
        with self.lock:
            if not self.frozen:
                self.known.add(id(link.client))
            if self.armed and b"HGETALL" in data.upper():
                self.armed, self.loading = False, link
        link.upstream.sendall(data)

    def to_client(self, link: Link, data: bytes) -> None:
        with self.lock:
            if self.loading is not None and link.client is self.loading.client:
                self.loading = None
                if self.stop_new(link):  # its read made at Redis: the old table
                    self.stopped.set()
                else:
                    self.armed = True  # another process's read: the next one
            if self.frozen and id(link.client) not in self.known:
                self.kept.append((link.client, data))
                return
        link.client.sendall(data)



def children(pid: int) -> set[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(p) for p in text.split()}


def inode_of(port: int, peer: int) -> int | None:
    """The inode of the TCP socket from local `port` to `peer` (loopback)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port \
                and int(fields[2].rsplit(":", 1)[1], 16) == peer:
            return int(fields[9])
    return None


def worker_pids(bal: Balancer) -> set[int]:
    return {p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]}


def body_of(sock: socket.socket) -> bytes:
    """The body of the one answer `sock` gets (the request asked to close)."""
    sock.settimeout(10)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data.partition(b"\r\n\r\n")[2]


@pytest.fixture
def namespace(redis_server: RedisServer) -> Iterator[str]:
    name = f"ryw{uuid.uuid4().hex[:8]}"
    client = redis.Redis.from_url(redis_server.url)
    client.hset(f"{name}:hosts", HOST, json.dumps(OLD))
    client.set(f"{name}:version", 1)
    client.close()
    yield name


def test_a_write_answered_200_is_served_by_a_worker_that_was_starting(
        redis_server: RedisServer, namespace: str, tmp_path: Path) -> None:
    """A worker replacing a dead one reads the table (version 1); a write (version
    2) is published before its control socket exists and answered 200; a request
    sent after the answer, accepted once the worker goes on, gets the new rule.
    Bug: the old one, until the worker's watcher caught up."""
    new_pid: list[int] = []
    bal: Balancer | None = None

    def stop_new(link: Link) -> bool:
        """Stop the process `link` comes from if it is the new worker."""
        assert bal is not None
        inode = inode_of(link.client.getpeername()[1], relay.port)
        new = holders(inode, sorted(children(bal.proc.pid) - before)) if inode else set()
        for pid in new:
            new_pid.append(pid)
            os.kill(pid, signal.SIGSTOP)
        return bool(new)

    relay = StopAtLoad(redis_server.port, stop_new)
    bal = Balancer(tmp_path, None, store=f"redis://127.0.0.1:{relay.port}/0",
                   args=["--workers", "1"], env={"BALANCER_STORE_NAMESPACE": namespace})
    try:
        wait_for(lambda: len(worker_pids(bal)) == 1, 10, what="the worker")
        wait_for(lambda: "version none -> 1:" in bal.output(), 10,
                 what="the management process's table")  # its own HGETALL done
        before = children(bal.proc.pid)
        (old,) = worker_pids(bal)
        relay.arm()
        os.kill(old, signal.SIGKILL)
        assert relay.stopped.wait(10), "the new worker's first read"
        status, answer = bal.api("PUT", f"/api/v1/hosts/{HOST}", NEW)
        assert (status, answer) == (200, {"version": 2})
        relay.freeze()
        # sent after the answer, while the worker is stopped: in its listener's queue
        with socket.create_connection(("127.0.0.1", bal.port), timeout=10) as sock:
            sock.sendall(f"GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
                         .encode())
            os.kill(new_pid[0], signal.SIGCONT)
            assert body_of(sock) == b"new"
    finally:
        relay.thaw()
        for pid in new_pid:
            os.kill(pid, signal.SIGCONT)
        bal.stop()
        relay.close()
