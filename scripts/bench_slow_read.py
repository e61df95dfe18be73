"""A live request's latency while slow readers hold the proxy (issue 15.8).

``python scripts/bench_slow_read.py [--slow 1000] [--rate 200] [--duration 10]
[--targets balancer,haproxy]``

Two nginx instances serve the same 1 MiB file and 4.5 KB page, one for the
slow clients (host ``slow.test``), one for the live requests (``live.test``),
so that what is measured is the proxy, not a backend busy pushing 1 GiB.
For each target, `--slow`
clients connect, `--rate` a second (as ``slowhttptest -X``: a 4 KB receive
buffer, ``GET`` of the big file, 32 bytes read per client every second),
from a process of their own; meanwhile a probe opens a fresh connection every
50 ms and requests the page. Printed per target: the probe's latency (p50,
p99, max) over the first 5 s and over the rest, and the probes that failed.
Loopback only; it stops by itself.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest import configs  # noqa: E402
from loadtest.page import PAGE  # noqa: E402
from loadtest.procs import Processes, free_port, wait_for_port  # noqa: E402
from loadtest.routes import RouteFile, proxy_rule  # noqa: E402

HOST = "127.0.0.1"
BIG = 1024 * 1024
NOFILE = 8192
PROBE_EVERY = 0.05
FIRST = 5.0  # seconds: the window the issue measured


def nginx_conf(dir: Path, port: int) -> str:
    www = dir / "www"
    www.mkdir(parents=True)
    (www / "index.html").write_bytes(PAGE)
    (www / "big.bin").write_bytes(b"x" * BIG)
    return (f"{configs._user_line()}worker_processes 1;\nworker_rlimit_nofile {NOFILE};\n"
            f"pid {dir}/nginx.pid;\nerror_log {dir}/error.log warn;\n"
            "events { worker_connections 4096; multi_accept on; }\n"
            f"http {{\n  access_log off;\n  client_body_temp_path {dir}/tmp;\n"
            f"  proxy_temp_path {dir}/tmp;\n  keepalive_timeout 75s;\n"
            f"  server {{\n    listen {HOST}:{port} backlog=4096;\n    root {www};\n"
            "    send_timeout 120s;\n  }\n}\n")


def haproxy_conf(port: int, slow: str, live: str) -> str:
    return (f"global\n    maxconn 4000\n    ulimit-n {NOFILE}\n    nbthread 1\n"
            "defaults\n    mode http\n    option http-keep-alive\n    timeout connect 5s\n"
            "    timeout client 75s\n    timeout server 60s\n    timeout http-request 10s\n"
            f"frontend fe\n    bind {HOST}:{port}\n    maxconn 4000\n    backlog 4096\n"
            "    use_backend live if { hdr(host) -i live.test }\n    default_backend slow\n"
            f"backend slow\n    http-reuse always\n    server s {slow}\n"
            f"backend live\n    http-reuse always\n    server l {live}\n")


def start_nginx(procs: Processes, root: Path, name: str) -> str:
    port, dir = free_port(), root / name
    dir.mkdir()
    (dir / "nginx.conf").write_text(nginx_conf(dir, port))
    proc = procs.start(name, ["nginx", "-p", str(dir), "-c", str(dir / "nginx.conf"),
                              "-e", str(dir / "error.log"), "-g", "daemon off;"])
    wait_for_port(proc, port)
    return f"{HOST}:{port}"


def start_target(name: str, procs: Processes, root: Path, slow: str, live: str) -> int:
    port, dir = free_port(), root / name
    dir.mkdir()
    if name == "haproxy":
        conf = dir / "haproxy.cfg"
        conf.write_text(haproxy_conf(port, slow, live))
        argv = ["haproxy", "-db", "-f", str(conf)]
    else:
        routes = RouteFile(dir / "routes.json", {"slow.test": proxy_rule([slow]),
                                                 "live.test": proxy_rule([live])})
        argv = [sys.executable, "-m", "balancer", "serve", "--workers", "1",
                "--listen", f"{HOST}:{port}", "--management", f"{HOST}:{free_port()}",
                "--store", f"file:{routes.path}"]
    wait_for_port(procs.start(name, argv), port)
    return port


def slow_readers(port: int, count: int, rate: float, duration: float) -> None:
    """The slowhttptest -X clients: connect `rate` a second (0: all at once), ask
    for the big file, then sip it."""
    socks = []
    started = time.monotonic()
    for index in range(count):
        if rate:
            time.sleep(max(0.0, started + index / rate - time.monotonic()))
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((HOST, port))
        sock.sendall(b"GET /big.bin HTTP/1.1\r\nHost: slow.test\r\n\r\n")
        sock.setblocking(False)
        socks.append(sock)
    end = started + duration
    while time.monotonic() < end:
        for sock in socks:
            with contextlib.suppress(OSError):  # BlockingIOError: nothing yet
                sock.recv(32)
        time.sleep(1.0)
    for sock in socks:
        sock.close()


def probe(port: int) -> float | None:
    """Seconds for one request on a fresh connection; None when it failed."""
    started = time.monotonic()
    try:
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(b"GET /index.html HTTP/1.1\r\nHost: live.test\r\n"
                         b"Connection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return None
    return time.monotonic() - started if data.startswith(b"HTTP/1.1 200") else None


def measure(port: int, args: argparse.Namespace) -> list[tuple[float, float | None]]:
    deadline = time.monotonic() + 15  # the port is bound before the workers serve it
    while probe(port) is None:
        if time.monotonic() > deadline:
            raise SystemExit(f"port {port}: no answer within 15 s")
        time.sleep(0.1)
    readers = multiprocessing.Process(target=slow_readers,
                                      args=(port, args.slow, args.rate, args.duration + 2))
    started = time.monotonic()
    readers.start()
    samples = []
    while time.monotonic() - started < args.duration:
        at = time.monotonic() - started
        samples.append((at, probe(port)))
        time.sleep(max(0.0, PROBE_EVERY - (time.monotonic() - started - at)))
    readers.join(timeout=args.duration + 30)
    if readers.is_alive():
        readers.kill()
    return samples


def report(name: str, samples: list[tuple[float, float | None]]) -> None:
    for label, rows in (("first 5 s", [s for s in samples if s[0] < FIRST]),
                        ("after 5 s", [s for s in samples if s[0] >= FIRST])):
        ok = sorted(latency for _, latency in rows if latency is not None)
        failed = len(rows) - len(ok)
        if not ok:
            print(f"{name:9} {label}: no successful probe ({failed} failed)")
            continue
        p99 = ok[min(len(ok) - 1, int(len(ok) * 0.99))]
        print(f"{name:9} {label}: {len(ok):4} probes  p50 {statistics.median(ok) * 1000:7.1f} ms"
              f"  p99 {p99 * 1000:7.1f} ms  max {ok[-1] * 1000:7.1f} ms  failed {failed}",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slow", type=int, default=1000, help="slow-reading clients")
    parser.add_argument("--rate", type=float, default=200.0,
                        help="slow clients connecting per second (0: all at once)")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--targets", default="balancer,haproxy")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-slow-read-") as tmp:
        root = Path(tmp)
        procs = Processes(root / "logs")
        try:
            slow = start_nginx(procs, root, "nginx-slow")
            live = start_nginx(procs, root, "nginx-live")
            for name in args.targets.split(","):
                target = start_target(name, procs, root, slow, live)
                report(name, measure(target, args))
        finally:
            procs.stop_all()


if __name__ == "__main__":
    main()
