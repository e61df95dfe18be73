"""Whole reads of a big Redis table when a balancer writes one host right after
another balancer's whole-table write.

``python scripts/bench_follow_reads.py [--hosts 100000] [--rounds 5]``

A redis-server on a free loopback port holding `--hosts` static hosts, and a
real ``balancer serve`` with one worker following it. Each round, a store
opened here (another balancer) replaces the whole table (every rule changed),
and at once a one-host ``PUT`` goes to the balancer's API: its worker is told
of that write while its watcher reads the other's table whole.

Counted per round, through ``MONITOR``: the whole reads of the table (an
``HGETALL`` of ``balancer:hosts``, or the first ``HSCAN`` of one read in
slices) that any process of the balancer started (the worker's watcher, the
management process's, and any the worker made itself); and the ``PUT``'s wall
time, its answer, and the worker's CPU for the round (until it serves the
``PUT``'s version and goes quiet).

Run it under ``flock /tmp/bench.lock``, with ``PYTHONPATH`` pointing at the
tree to measure (the balancer runs from a temporary directory).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest.procs import Processes, free_port, wait_for_port  # noqa: E402

HOST = "127.0.0.1"
SERVING = re.compile(r"worker (\d+) serving routing version")
LIMIT = 300.0  # seconds a wait may take before the run gives up
QUIET_CPU = 0.05  # CPU seconds per half second under which the worker is quiet
WHOLE = (b'"hgetall" "balancer:hosts"', b'"hscan" "balancer:hosts" "0"')


def table(hosts: int, mark: str) -> dict[str, Any]:
    return {f"h{n}.example": {"action": "static", "body": f"{mark} {n}"} for n in range(hosts)}


def wait_until(done: Any, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + LIMIT
    while not done():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what}")
        time.sleep(every)


class WholeReads:
    """The whole reads of the table Redis ran, seen through ``MONITOR``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock = socket.create_connection((HOST, port))
        self.sock.sendall(b"MONITOR\r\n")
        self.seen = b""
        self.marks = 0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while data := self.sock.recv(65536):
            self.seen += data

    def count(self) -> int:
        """Those run before this call."""
        self.marks += 1
        mark = f"bench-mark-{self.marks}".encode()
        with socket.create_connection((HOST, self.port)) as sock:
            sock.sendall(b"ECHO " + mark + b"\r\n")
            sock.recv(100)
        wait_until(lambda: mark in self.seen, "the monitor's mark", 0.01)
        return sum(1 for line in self.seen.lower().split(b"\n") if any(w in line for w in WHOLE))


def api(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(HOST, port, timeout=LIMIT)
    try:
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def served(mgmt: int) -> list[int]:
    return [p.get("version", -1) for p in api(mgmt, "GET", "/api/v1/info")[1]["processes"]]


def quiet(pid: int) -> None:
    """Until the worker spends less than `QUIET_CPU` in half a second."""
    def still() -> bool:
        before = cpu_seconds(pid)
        time.sleep(0.5)
        return cpu_seconds(pid) - before < QUIET_CPU
    wait_until(still, "the worker to go quiet", 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from balancer.stores.redis import RedisStore

    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-follow-") as tmp:
        os.chdir(tmp)  # `python -m` imports from its working directory first
        procs = Processes(Path(tmp) / "logs")
        try:
            port = free_port()
            redis = procs.start("redis", ["redis-server", "--port", str(port), "--bind", HOST,
                                          "--save", "", "--appendonly", "no", "--dir", tmp])
            wait_for_port(redis, port)
            other = RedisStore(f"redis://{HOST}:{port}/0")
            other.replace(table(args.hosts, "r0"))
            listen, mgmt = free_port(), free_port()
            proc = procs.start("balancer", [
                sys.executable, "-m", "balancer", "serve", "--workers", "1",
                "--listen", f"{HOST}:{listen}", "--management", f"{HOST}:{mgmt}",
                "--store", f"redis://{HOST}:{port}/0"],
                env={"BALANCER_STORE_SNAPSHOT": str(Path(tmp) / "last-good.json")})
            wait_for_port(proc, mgmt, timeout=LIMIT)
            log = procs.log_dir / "balancer.log"
            wait_until(lambda: SERVING.search(log.read_text(errors="replace")), "the worker")
            worker = int(SERVING.findall(log.read_text(errors="replace"))[-1])
            wait_until(lambda: served(mgmt) == [1], "the worker's first table")
            quiet(worker)
            reads = WholeReads(port)
            for n in range(1, args.rounds + 1):
                before, cpu = reads.count(), cpu_seconds(worker)
                other.replace(table(args.hosts, f"r{n}"))
                started = time.perf_counter()
                status, answer = api(mgmt, "PUT", "/api/v1/hosts/h0.example",
                                     {"action": "static", "body": f"mine {n}"})
                wall = time.perf_counter() - started
                wait_until(lambda v=answer["version"]: served(mgmt) == [v], "the PUT's version")
                quiet(worker)
                rounds.append((reads.count() - before, wall, status,
                               cpu_seconds(worker) - cpu))
                print(f"  round {n}: {rounds[-1][0]} whole reads, PUT {status} in "
                      f"{wall * 1000:.0f} ms, the worker's CPU {rounds[-1][3]:.2f} s",
                      flush=True)
        finally:
            procs.stop_all()
            os.chdir(ROOT)
    whole = [r[0] for r in rounds]
    walls = sorted(r[1] * 1000 for r in rounds)
    cpus = [r[3] for r in rounds]
    print(f"{args.hosts} hosts, {len(rounds)} rounds, PYTHONPATH="
          f"{os.environ.get('PYTHONPATH', '')}: whole reads per round {whole} "
          f"(total {sum(whole)}); PUT answers {[r[2] for r in rounds]}, wall p50 "
          f"{statistics.median(walls):.0f} ms, max {walls[-1]:.0f} ms; the worker's CPU "
          f"per round median {statistics.median(cpus):.2f} s "
          f"({', '.join(f'{c:.2f}' for c in cpus)})")


if __name__ == "__main__":
    main()
