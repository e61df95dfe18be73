"""Propagation of a management write to another balancer process: issue 4's figure.

``python scripts/bench_propagation.py [--writes 200] [--hosts 200]``

A real redis-server and two ``balancer serve`` processes sharing it (A and
B). Each write is ``PUT /api/v1/hosts/HOST`` on A's management API with a
``static`` rule whose body names the write; the time counted runs from just
before the PUT is sent to the first response from B's proxy port that
carries that body (B is polled over one keep-alive connection). The table
starts with `--hosts` other hosts, so that every change moves a table of
realistic size. Prints p50/p90/p99/max in milliseconds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest.procs import Processes, free_port, wait_for_port  # noqa: E402

HOST = "127.0.0.1"
POLL_LIMIT = 5.0  # seconds a write may take to show before the run fails


def start_redis(procs: Processes, dir: Path) -> int:
    port = free_port()
    proc = procs.start("redis", ["redis-server", "--port", str(port), "--bind", HOST,
                                 "--save", "", "--appendonly", "no", "--dir", str(dir)])
    wait_for_port(proc, port)
    return port


def start_balancer(procs: Processes, name: str, redis_port: int) -> tuple[int, int]:
    port, mgmt = free_port(), free_port()
    proc = procs.start(name, [sys.executable, "-m", "balancer", "serve",
                              "--listen", f"{HOST}:{port}", "--management", f"{HOST}:{mgmt}",
                              "--store", f"redis://{HOST}:{redis_port}/0"],
                       env={"BALANCER_STORE_SNAPSHOT": str(procs.log_dir / f"{name}.last-good")})
    wait_for_port(proc, port)
    wait_for_port(proc, mgmt)
    return port, mgmt


def api(conn: http.client.HTTPConnection, method: str, path: str, body: object) -> int:
    conn.request(method, path, body=json.dumps(body),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    return response.status


def served(conn: http.client.HTTPConnection, host: str) -> bytes:
    conn.request("GET", "/", headers={"Host": host})
    return conn.getresponse().read()


def measure(writes: int, hosts: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="bench-propagation-") as tmp:
        procs = Processes(Path(tmp) / "logs")
        try:
            redis_port = start_redis(procs, Path(tmp))
            _, mgmt_a = start_balancer(procs, "balancer-a", redis_port)
            port_b, _ = start_balancer(procs, "balancer-b", redis_port)
            manage = http.client.HTTPConnection(HOST, mgmt_a, timeout=10)
            table = {f"h{i}.example": {"action": "empty", "status": 204} for i in range(hosts)}
            if api(manage, "PUT", "/api/v1/hosts", {"hosts": table}) != 200:
                raise SystemExit("could not load the starting table")
            probe = http.client.HTTPConnection(HOST, port_b, timeout=10)
            return [one_write(manage, probe, n) for n in range(writes)]
        finally:
            procs.stop_all()


def one_write(manage: http.client.HTTPConnection, probe: http.client.HTTPConnection,
              n: int) -> float:
    marker = f"write {n}".encode()
    rule = {"action": "static", "status": 200, "body": marker.decode()}
    started = time.perf_counter()
    if api(manage, "PUT", "/api/v1/hosts/probe.example", rule) != 200:
        raise SystemExit(f"write {n} was refused")
    while served(probe, "probe.example") != marker:
        if time.perf_counter() - started > POLL_LIMIT:
            raise SystemExit(f"write {n} not served by the other balancer in {POLL_LIMIT}s")
    return (time.perf_counter() - started) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--hosts", type=int, default=200, help="other hosts in the table")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed")
    times = sorted(measure(args.writes, args.hosts))
    n = len(times)
    print(f"{n} writes, table of {args.hosts + 1} hosts: PUT on A → served by B, ms: "
          f"p50 {statistics.median(times):.1f}  p90 {times[int(n * 0.9)]:.1f}  "
          f"p99 {times[min(n - 1, int(n * 0.99))]:.1f}  max {times[-1]:.1f}")


if __name__ == "__main__":
    main()
