"""Propagation of a management write to another balancer process: issue 4's figure.

``python scripts/bench_propagation.py [--writes 200] [--hosts 200]``

A real redis-server and two ``balancer serve`` processes sharing it (A and
B). Each write is ``PUT /api/v1/hosts/HOST`` on A's management API with a
``static`` rule whose body names the write; the time counted runs from just
before the PUT is sent to the first response from B's proxy port that
carries that body (B is polled over one keep-alive connection). The table
starts with `--hosts` other hosts, so that every change moves a table of
realistic size; B is first polled until it serves that table. Prints
p50/p90/p99/max in milliseconds: in all, until A answered (read-your-writes:
A's own workers serve the write) and from A's answer until B served it.
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


def measure(writes: int, hosts: int) -> list[tuple[float, float]]:
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
            wait_served(probe, "h0.example", 204)  # B has the table and its workers run
            return [one_write(manage, probe, n) for n in range(writes)]
        finally:
            procs.stop_all()


def wait_served(conn: http.client.HTTPConnection, host: str, status: int) -> None:
    """Poll until `host` answers `status` (the first request to a fresh balancer
    can take a few hundred ms: it is not what this measures)."""
    deadline = time.perf_counter() + POLL_LIMIT
    while True:
        conn.request("GET", "/", headers={"Host": host})
        response = conn.getresponse()
        response.read()
        if response.status == status:
            return
        if time.perf_counter() > deadline:
            raise SystemExit(f"{host} not served with {status} by balancer B in {POLL_LIMIT}s")
        time.sleep(0.01)


def one_write(manage: http.client.HTTPConnection, probe: http.client.HTTPConnection,
              n: int) -> tuple[float, float]:
    """(ms until B serves the write, ms until A answered it)."""
    marker = f"write {n}".encode()
    rule = {"action": "static", "status": 200, "body": marker.decode()}
    started = time.perf_counter()
    if api(manage, "PUT", "/api/v1/hosts/probe.example", rule) != 200:
        raise SystemExit(f"write {n} was refused")
    answered = time.perf_counter()
    while served(probe, "probe.example") != marker:
        if time.perf_counter() - started > POLL_LIMIT:
            raise SystemExit(f"write {n} not served by the other balancer in {POLL_LIMIT}s")
    return (time.perf_counter() - started) * 1000, (answered - started) * 1000


def summary(times: list[float]) -> str:
    times = sorted(times)
    n = len(times)
    return (f"p50 {statistics.median(times):.1f}  p90 {times[int(n * 0.9)]:.1f}  "
            f"p99 {times[min(n - 1, int(n * 0.99))]:.1f}  max {times[-1]:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--hosts", type=int, default=200, help="other hosts in the table")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        raise SystemExit("redis-server is not installed")
    results = measure(args.writes, args.hosts)
    print(f"{len(results)} writes, table of {args.hosts + 1} hosts: PUT on A → served by B, "
          f"ms: {summary([total for total, _ in results])}")
    print(f"  of which A's answer (its own workers serve it: read-your-writes), ms: "
          f"{summary([answer for _, answer in results])}")
    print(f"  B serving it after A's answer, ms: "
          f"{summary([total - answer for total, answer in results])}")


if __name__ == "__main__":
    main()
