"""What one-host writes cost a worker serving a big table (issue 14, point 9).

``python scripts/bench_table_changes.py [--hosts 10000] [--store redis|file]
[--rate 10] [--duration 10]``

A real ``balancer serve`` with one worker over a real redis-server (or a file
store) holding `--hosts` hosts, loaded into the store before the balancer
starts. While one client sends requests back to back over a keep-alive
connection to one host (the probe), another makes `--rate` single-host writes
a second through the management API. Printed: the probe's latency
(p50/p99/max, and requests answered), the writes' latency at the API, the
worker's RSS with the big table against an empty one (memory per host), and
for the file store the size of the routes file, and the data plane that ran
(interpreted or compiled).

Run it under ``flock /tmp/bench.lock``; with ``PYTHONPATH`` pointing at a
compiled copy to measure the compiled data plane (the balancers run from a
temporary directory: ``python -m`` would otherwise import the balancer of the
working directory first, whatever ``PYTHONPATH`` says).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest.procs import Processes, free_port, wait_for_port  # noqa: E402
from loadtest.results import latency_line  # noqa: E402

HOST = "127.0.0.1"
SERVING = re.compile(r"worker (\d+) serving routing version")
PLANE = re.compile(r"data plane (compiled|interpreted)")


def rule(n: int) -> dict:
    return {"action": "static", "body": f"site {n}"}


def fill_redis(port: int, hosts: int) -> None:
    import redis

    client = redis.Redis(host=HOST, port=port)
    with client.pipeline(transaction=True) as pipe:
        if hosts:
            pipe.hset("balancer:hosts", mapping={f"h{n}.example": json.dumps(rule(n))
                                                 for n in range(hosts)})
        pipe.set("balancer:version", 1)
        pipe.execute()


def fill_file(path: Path, hosts: int) -> None:
    table = {f"h{n}.example": rule(n) for n in range(hosts)}
    path.write_text(json.dumps({"version": 1, "hosts": table}))


def start(procs: Processes, tmp: Path, store: str, hosts: int, name: str) -> tuple[int, int]:
    """A balancer over a fresh store of `hosts` hosts; (proxy port, management port)."""
    directory = tmp / name
    directory.mkdir()
    if store == "redis":
        redis_port = free_port()
        redis = procs.start(f"redis-{name}", ["redis-server", "--port", str(redis_port),
                                              "--bind", HOST, "--save", "", "--appendonly",
                                              "no", "--dir", str(directory)])
        wait_for_port(redis, redis_port)
        fill_redis(redis_port, hosts)
        url = f"redis://{HOST}:{redis_port}/0"
    else:
        fill_file(directory / "routes.json", hosts)
        url = f"file:{directory / 'routes.json'}"
    port, mgmt = free_port(), free_port()
    proc = procs.start(name, [sys.executable, "-m", "balancer", "serve", "--workers", "1",
                              "--listen", f"{HOST}:{port}", "--management", f"{HOST}:{mgmt}",
                              "--store", url],
                       env={"BALANCER_STORE_SNAPSHOT": str(directory / "last-good.json")})
    wait_for_port(proc, port, timeout=300)
    wait_for_port(proc, mgmt, timeout=300)
    return port, mgmt


def worker_pid(log: Path, timeout: float = 300.0) -> int:
    """The worker's pid once it serves its first table (from the balancer's log: with
    100,000 hosts `/api/v1/info`, which carries every host's counters, is slow)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = SERVING.search(log.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        time.sleep(0.2)
    raise SystemExit("the worker did not load its table")


def worker_rss(log: Path) -> int:
    pid = worker_pid(log)
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmRSS")


def probe(port: int, stop: threading.Event, times: list[float]) -> None:
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    while not stop.is_set():
        started = time.perf_counter()
        conn.request("GET", "/", headers={"Host": "h1.example"})
        conn.getresponse().read()
        times.append((time.perf_counter() - started) * 1000)


def writer(mgmt: int, rate: float, stop: threading.Event, times: list[float]) -> None:
    conn = http.client.HTTPConnection(HOST, mgmt, timeout=30)
    n = 0
    next_at = time.perf_counter()
    while not stop.is_set():
        n += 1
        body = json.dumps({"action": "static", "body": f"write {n}"})
        started = time.perf_counter()
        conn.request("PUT", f"/api/v1/hosts/w{n % 50}.example", body=body,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"write {n}: {response.status}")
        times.append((time.perf_counter() - started) * 1000)
        next_at += 1 / rate
        time.sleep(max(0.0, next_at - time.perf_counter()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=10000)
    parser.add_argument("--store", choices=("redis", "file"), default="redis")
    parser.add_argument("--rate", type=float, default=10.0, help="single-host writes a second")
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-changes-") as tmp:
        # `python -m` puts its working directory first on sys.path: run from the
        # temporary one, so that PYTHONPATH (or the installed package) decides what runs
        os.chdir(tmp)
        procs = Processes(Path(tmp) / "logs")
        try:
            start(procs, Path(tmp), args.store, 0, "empty")
            empty_rss = worker_rss(procs.log_dir / "empty.log")
            port, mgmt = start(procs, Path(tmp), args.store, args.hosts, "big")
            big_rss = worker_rss(procs.log_dir / "big.log")
            plane = PLANE.search((procs.log_dir / "big.log").read_text(errors="replace"))
            stop = threading.Event()
            probes: list[float] = []
            writes: list[float] = []
            threads = [threading.Thread(target=probe, args=(port, stop, probes)),
                       threading.Thread(target=writer, args=(mgmt, args.rate, stop, writes))]
            for thread in threads:
                thread.start()
            time.sleep(args.duration)
            stop.set()
            for thread in threads:
                thread.join(30)
        finally:
            procs.stop_all()
            os.chdir(ROOT)
        size = os.path.getsize(Path(tmp) / "big" / "routes.json") if args.store == "file" else 0
    print(f"{args.store} store, {args.hosts} hosts, {args.rate:g} one-host writes/s, "
          f"{args.duration:g} s, one worker, data plane {plane.group(1) if plane else '?'}, "
          f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}")
    print(f"  live request (probe): {latency_line(probes)}")
    print(f"  write at the API:     {latency_line(writes)}")
    per_host = (big_rss - empty_rss) / max(1, args.hosts)
    print(f"  worker RSS: {big_rss / 2**20:.1f} MiB with the table, {empty_rss / 2**20:.1f} MiB "
          f"empty: {per_host:.0f} bytes per host")
    if size:
        print(f"  routes file: {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
