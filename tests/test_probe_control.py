"""Outside probe of the control plane (2026-12-07, probe-control): what broke, pinned.

* A Redis (or whatever the ``redis://`` URL names) that answers a byte at a time
  and never ends its answer: redis-py bounds each recv, not an answer, so a
  worker's first read hung for good (the balancer never listened) and an API
  write never answered. Each answer is now read whole within the store's
  timeout (five times it), in the processes gevent patched.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from tests.rawpeer import serve_each
from tests.support import ROOT

READ_IN_A_PATCHED_PROCESS = """
from gevent import monkey; monkey.patch_all()
import sys, time
from balancer.stores import StoreUnavailable
from balancer.stores.redis import RedisStore
store = RedisStore(sys.argv[1], timeout=0.1)
began = time.monotonic()
try:
    store.load()
except StoreUnavailable as exc:
    print(f"{time.monotonic() - began:.2f} {exc}")
"""


@pytest.fixture
def trickling_peer() -> Iterator[int]:
    """A port whose every connection is answered ``+`` (a status line begun) and then
    one more byte every 0.1 s, never a line's end (bounded: 20 s at most)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(1)
            try:
                conn.recv(65536)
                for _ in range(200):
                    if stop.wait(0.1):
                        return
                    conn.sendall(b"+")
            except OSError:
                return

    serve_each(server, trickle)
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()


def test_a_redis_that_trickles_its_answer_fails_the_read_in_the_timeout(
        trickling_peer: int) -> None:
    done = subprocess.run([sys.executable, "-c", READ_IN_A_PATCHED_PROCESS,
                           f"redis://127.0.0.1:{trickling_peer}/0"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    took, _, problem = done.stdout.partition(" ")
    # (five times the 0.1 s timeout, and a connect; before, the peer's 20 s, then its close)
    assert float(took) < 5, done.stdout
    assert "Timeout reading from 127.0.0.1" in problem, done.stdout
