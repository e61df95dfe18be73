"""The balancer's per-request Python cost, without sockets, gevent or the kernel.

``python scripts/bench_hotpath.py [--requests 20000] [--instructions]``

One `ClientConnection` from a real `Worker` (file-store-shaped table: ``*`` →
one backend) serves scripted sockets: the client socket hands out a wrk-like
``GET /index.html`` per read, the pooled backend connection answers every
request with nginx's head and the suite's 4.5 KB page in one read. So the
whole proxy path runs (parsing both ways, routing, header rewriting, request
id, retries and health bookkeeping, counters, response framing) and nothing
else: no syscalls, no event loop.

* default: µs per request, best of 5 passes (wall clock; noisy machines vary
  by 20 %);
* ``--instructions``: instructions per request under callgrind (valgrind
  must be installed): two runs of different lengths, the difference divided
  by the extra requests, so start-up cancels out. Deterministic to ~0.1 %:
  the figure to compare two versions of the code by.

Used for issue 2's speed work; `scripts/bench_proxy.py` is the end-to-end
benchmark (wrk, nginx, HAProxy).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from balancer.connection import ClientConnection  # noqa: E402
from balancer.netio import IO  # noqa: E402
from balancer.pool import Upstream  # noqa: E402
from balancer.server import Worker  # noqa: E402
from balancer.settings import load_settings  # noqa: E402
from loadtest.page import PAGE  # noqa: E402

REQUEST = b"GET /index.html HTTP/1.1\r\nHost: 127.0.0.1:19000\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n"
            b"Date: Tue, 01 Dec 2026 09:00:00 GMT\r\nContent-Type: text/html\r\n"
            b"Content-Length: %d\r\nLast-Modified: Tue, 01 Dec 2026 08:00:00 GMT\r\n"
            b"Connection: keep-alive\r\nETag: \"692d5a40-1194\"\r\nAccept-Ranges: bytes\r\n\r\n"
            % len(PAGE)) + PAGE
PASSES = 5
_IDLE = socket.socketpair()  # one end stands for the pooled backend connection's fd
IDLE_FD = _IDLE[0].fileno()


class Client:
    """A client socket that sends `count` requests, one per read, then closes."""

    family = 2  # AF_INET: the handler sets TCP_NODELAY

    def __init__(self, count: int) -> None:
        self.count = count
        self.received = 0

    def recv(self, size: int) -> bytes:
        if not self.count:
            return b""
        self.count -= 1
        return REQUEST

    def send(self, data: bytes) -> int:
        self.received += len(data)
        return len(data)

    def sendall(self, data: bytes) -> None:
        self.received += len(data)

    def settimeout(self, seconds: float | None) -> None:
        pass

    def setsockopt(self, *args: object) -> None:
        pass

    def fileno(self) -> int:
        return IDLE_FD  # polled while pooled: nothing to read


class Backend(Client):
    """A pooled backend connection that answers every request at once."""

    def recv(self, size: int) -> bytes:
        return RESPONSE


class Store:
    display_url = "bench:"
    quiet = True

    def load(self) -> SimpleNamespace:
        return SimpleNamespace(version=1, hosts={
            "*": {"action": "proxy", "backends": ["127.0.0.1:9"]}})

    def identity(self) -> str:
        return "bench"

    def raise_floor(self, version: int) -> None:
        pass

    def close(self) -> None:
        pass


def setup() -> object:
    """A worker's listener context with the blocking `IO` (arm() sets scripted
    socket timeouts), its one backend pooled."""
    io = IO()
    worker = Worker(load_settings(flags={}, env={"BALANCER_STORE_SNAPSHOT": "off"}), Store(),
                    io=io)
    if not worker.apply(worker.store.load()):
        raise SystemExit("the table did not compile")
    ctx = worker.context(False)
    backend = next(iter(worker.registry.backends.values()))
    upstream = Upstream(io.stream(Backend(0)))
    backend.release(upstream)
    upstream.since = float("inf")  # never expires
    return ctx


def run(requests: int) -> float:
    """Best µs per request over PASSES passes of `requests` each."""
    ctx = setup()
    gc.freeze()
    best = float("inf")
    for _ in range(PASSES):
        client = Client(requests)
        conn = ClientConnection(client, ("127.0.0.1", 40000), ctx)
        start = time.perf_counter()
        conn.serve()
        best = min(best, time.perf_counter() - start)
        if client.received < requests * len(PAGE):
            raise SystemExit(f"only {client.received} bytes answered: the proxy path failed")
    return best / requests * 1e6


def instructions() -> float:
    """Instructions per request under callgrind (difference of two run lengths)."""
    counts = []
    for requests in (100, 1100):
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
             os.path.realpath(sys.executable), __file__, "--requests", str(requests)],
            capture_output=True, text=True, check=True).stderr
        counts.append(int(re.search(r"Collected : (\d+)", out).group(1)))
    return (counts[1] - counts[0]) / (1000 * PASSES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000, help="requests per pass")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per request under callgrind")
    args = parser.parse_args()
    if args.instructions:
        print(f"{instructions():,.0f} instructions per request")
    else:
        print(f"{run(args.requests):.2f} µs per request (best of {PASSES} passes)")


if __name__ == "__main__":
    main()
