"""Memory per idle client connection, plain HTTP against TLS (docs/tls.md).

``python scripts/bench_tls_memory.py [--connections 1000]``

Starts ``balancer serve --workers 1`` with a plain and a TLS listener (an
ECDSA P-256 certificate made here), opens N keep-alive connections to one
listener, each having done one request (so every TLS connection finished its
handshake and holds its session state), and reports the growth of the
worker's resident memory divided by N; then the same on the other listener.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from balancer.certificates import make_record  # noqa: E402
from balancer.stores.file import FileStore  # noqa: E402
from loadtest.measure import process_tree  # noqa: E402
from loadtest.procs import free_port  # noqa: E402
from loadtest.reaper import guarded_popen  # noqa: E402
from tests.tlsca import TestCA  # noqa: E402

NAME = "bench.test"


def rss_kib(root: int) -> int:
    """Resident memory of the balancer's process tree (only the worker's moves)."""
    total = 0
    for pid in process_tree(root):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def wait_port(port: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} not listening")


def open_idle(port: int, count: int, context: ssl.SSLContext | None) -> list[socket.socket]:
    """`count` connections that each did one request and now sit idle."""
    kept = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if context is not None:
            sock = context.wrap_socket(sock, server_hostname=NAME)
        sock.sendall(b"GET / HTTP/1.1\r\nHost: " + NAME.encode() + b"\r\n\r\n")
        response = http.client.HTTPResponse(sock)  # type: ignore[arg-type]
        response.begin()
        response.read()
        kept.append(sock)
    return kept


def measure(pid: int, port: int, count: int, context: ssl.SSLContext | None) -> float:
    open_idle(port, 20, context)  # warm up (first-use allocations)
    time.sleep(1)
    before = rss_kib(pid)
    kept = open_idle(port, count, context)
    time.sleep(1)
    after = rss_kib(pid)
    for sock in kept:
        sock.close()
    return (after - before) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    ca = TestCA("bench CA")
    with tempfile.TemporaryDirectory(prefix="bench-tls-memory-") as tmp:
        routes = Path(tmp) / "routes.json"
        routes.write_text(json.dumps({"version": 1, "hosts": {
            NAME: {"action": "static", "body": "ok"}}}))
        FileStore(str(routes)).certs().put(NAME, make_record(NAME, *ca.issue(NAME)))
        plain, tls = free_port(), free_port()
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = guarded_popen(
            [sys.executable, "-m", "balancer", "serve", "--workers", "1",
             "--listen", f"127.0.0.1:{plain}", "--tls-listen", f"127.0.0.1:{tls}",
             "--management", f"127.0.0.1:{free_port()}", "--store", f"file:{routes}"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp)
        try:
            deadline = time.monotonic() + 30
            wait_port(plain, deadline)
            wait_port(tls, deadline)
            open_idle(plain, 1, None)  # the worker serves
            pid = proc.pid
            context = ssl.create_default_context(cadata=ca.pem)
            plain_kib = measure(pid, plain, args.connections, None)
            tls_kib = measure(pid, tls, args.connections, context)
        finally:
            proc.terminate()
            proc.wait(30)
    print(f"{args.connections} idle connections: plain HTTP {plain_kib:.1f} KiB each, "
          f"TLS {tls_kib:.1f} KiB each (worker RSS growth / connections)")


if __name__ == "__main__":
    main()
