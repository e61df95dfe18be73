"""A live request's latency while a worker loads a big table or many certificates.

``python scripts/bench_big_load.py [--load file|redis|certs] [--hosts 100000]
[--certs 2000] [--rounds 4]``

A real ``balancer serve`` with one worker over a file store or a redis-server
on a free loopback port (``certs``: a file store and a TLS listener). One
client sends requests to a static host (the probe), 100 a second over 32
keep-alive connections, each one's latency counted from the time it was due
(so a stall of the worker counts once per request it delays). Then,
`--rounds` times:

* ``file``, ``redis``: the whole table of `--hosts` hosts is replaced (every
  rule changed, so the worker reads, checks and compiles all of it); the
  round ends when the probe's answer is the new table's;
* ``certs``: `--certs` new certificates are written to the store, and taken
  away again the next round; the round ends when a TLS handshake for the last
  one succeeds (or fails, once they are gone). Only loading rounds count.

Printed: the probe's latency (p50/p99/max) while the worker loads, the
rounds' times (the write's end to the new table or certificates served: the
total load time, a file store's 0.25 s poll or the certificates' 1 s one
included) and the worker's CPU seconds in each (the load's own cost, whatever
else the machine runs; the probes it served meanwhile included).

Run it under ``flock /tmp/bench.lock``; with ``PYTHONPATH`` pointing at the
tree to measure (the balancer runs from a temporary directory: ``python -m``
would otherwise import the balancer of the working directory first).
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest.procs import Processes, free_port, wait_for_port  # noqa: E402
from loadtest.results import latency_line  # noqa: E402

HOST = "127.0.0.1"
PROBE = "probe.test"
PLANE = re.compile(r"data plane (\w+)")
SERVING = re.compile(r"worker (\d+) serving routing version")
ROUND_LIMIT = 300.0  # seconds a round may take before the run gives up
PROBE_EVERY = 0.01  # seconds between two probes' due times (100 a second)
PROBE_CONNECTIONS = 32  # the probes' keep-alive connections (a request waits for a free one)


def table(hosts: int, mark: str) -> dict[str, Any]:
    """`hosts` static hosts and the probe's, every body saying `mark`."""
    rules: dict[str, Any] = {f"h{n}.example": {"action": "static", "body": f"{mark} {n}"}
                             for n in range(hosts)}
    rules[PROBE] = {"action": "static", "body": mark}
    return rules


class Probe:
    """A request to the probe host every `PROBE_EVERY` seconds, each sent over one
    of `PROBE_CONNECTIONS` keep-alive connections (its own thread), so requests
    arrive as a live client's do, whatever the worker's stalls: (time due,
    latency ms, body). The latency counts from the time the request was due,
    not sent (as wrk2): a stall of 1 s makes each request due meanwhile late."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.seen: list[tuple[float, float, bytes]] = []
        self.stop = threading.Event()
        self.local = threading.local()
        self.pool = ThreadPoolExecutor(PROBE_CONNECTIONS)
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        due = time.perf_counter()
        while not self.stop.is_set():
            time.sleep(max(0.0, due - time.perf_counter()))
            if self.stop.is_set():
                break
            self.pool.submit(self.send, due)
            due += PROBE_EVERY
        self.pool.shutdown(cancel_futures=True)

    def send(self, due: float) -> None:
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = self.local.conn = http.client.HTTPConnection(HOST, self.port, timeout=300)
        conn.request("GET", "/", headers={"Host": PROBE})
        body = conn.getresponse().read()
        self.seen.append((due, (time.perf_counter() - due) * 1000, body))

    def answered(self, body: bytes) -> bool:
        """Whether one of the last answers was `body`."""
        return any(seen == body for _, _, seen in self.seen[-PROBE_CONNECTIONS:])

    def during(self, start: float, end: float) -> list[float]:
        """Latencies of the requests due in [start, end]."""
        return [ms for due, ms, _ in self.seen if start <= due <= end]


def wait_until(done: Callable[[], bool], what: str, every: float = 0.005) -> float:
    """Poll `done` every `every` seconds; the time it first held."""
    deadline = time.perf_counter() + ROUND_LIMIT
    while time.perf_counter() < deadline:
        if done():
            return time.perf_counter()
        time.sleep(every)
    raise SystemExit(f"timed out waiting for {what}")


def handshake(port: int, name: str) -> bool:
    """Whether a TLS handshake with SNI `name` succeeds (the worker serves its certificate)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with socket.create_connection((HOST, port), timeout=10) as raw, \
                context.wrap_socket(raw, server_hostname=name):
            return True
    except (ssl.SSLError, OSError):
        return False


def cpu_seconds(pid: int) -> float:
    """User and system CPU of process `pid` so far (/proc, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def table_round(store: Any, probe: Probe, hosts: int, mark: str) -> tuple[float, float]:
    store.replace(table(hosts, mark))
    start = time.perf_counter()
    return start, wait_until(lambda: probe.answered(mark.encode()),
                             f"the probe to see table {mark}")


def cert_records(count: int) -> dict[str, dict[str, Any]]:
    from balancer.certificates import make_record
    from tests.tlsca import TestCA

    ca = TestCA()
    return {f"c{n}.test": make_record(f"c{n}.test", *ca.issue(f"c{n}.test")) for n in range(count)}


def certs_round(store: Any, records: dict[str, Any], tls: int,
                loading: bool) -> tuple[float, float]:
    store.certs().restore(records if loading else {})
    start = time.perf_counter()
    last = list(records)[-1]
    return start, wait_until(lambda: handshake(tls, last) == loading,  # 20 handshakes a second
                             f"the certificates to be {'served' if loading else 'gone'}", 0.05)


def open_store(procs: Processes, tmp: Path, kind: str) -> tuple[Any, str]:
    """The store the balancer follows, as this process writes it, and its URL."""
    from balancer.stores import open_store as open_url

    if kind == "redis":
        port = free_port()
        redis = procs.start("redis", ["redis-server", "--port", str(port), "--bind", HOST,
                                      "--save", "", "--appendonly", "no", "--dir", str(tmp)])
        wait_for_port(redis, port)
        url = f"redis://{HOST}:{port}/0"
    else:
        url = f"file:{tmp / 'routes.json'}"
    return open_url(url), url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--load", choices=("file", "redis", "certs"), default="file")
    parser.add_argument("--hosts", type=int, default=100000)
    parser.add_argument("--certs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-big-load-") as tmp:
        os.chdir(tmp)  # `python -m` imports from its working directory first
        procs = Processes(Path(tmp) / "logs")
        try:
            store, url = open_store(procs, Path(tmp), args.load)
            records = cert_records(args.certs) if args.load == "certs" else {}
            store.replace(table(0 if records else args.hosts, "r0"))
            port, mgmt, tls = free_port(), free_port(), free_port()
            proc = procs.start("balancer", [
                sys.executable, "-m", "balancer", "serve", "--workers", "1",
                "--listen", f"{HOST}:{port}", "--management", f"{HOST}:{mgmt}",
                "--store", url, "--tls-listen", f"{HOST}:{tls}"],
                env={"BALANCER_STORE_SNAPSHOT": str(Path(tmp) / "last-good.json")})
            wait_for_port(proc, port, timeout=300)
            wait_for_port(proc, tls, timeout=300)
            probe = Probe(port)
            probe.thread.start()
            wait_until(lambda: bool(probe.seen), "the first probe")
            log = procs.log_dir / "balancer.log"
            wait_until(lambda: bool(SERVING.search(log.read_text(errors="replace"))),
                       "the worker's first table", 0.1)
            worker = int(SERVING.findall(log.read_text(errors="replace"))[-1])
            windows, cpu = [], []
            for n in range(1, args.rounds + 1):
                before = cpu_seconds(worker)
                if records:
                    window = certs_round(store, records, tls, loading=n % 2 == 1)
                else:
                    window = table_round(store, probe, args.hosts, f"r{n}")
                if not records or n % 2 == 1:
                    windows.append(window)
                    cpu.append(cpu_seconds(worker) - before)
                time.sleep(0.5)  # the probe alone between rounds
            probe.stop.set()
            probe.thread.join(60)
            plane = PLANE.search(log.read_text(errors="replace"))
        finally:
            procs.stop_all()
            os.chdir(ROOT)
    during = [ms for start, end in windows for ms in probe.during(start, end)]
    times = [end - start for start, end in windows]
    what = f"{args.certs} certificates" if records else f"{args.hosts} hosts"
    print(f"{args.load}: {what}, {len(windows)} loads, one worker, data plane "
          f"{plane.group(1) if plane else '?'}, PYTHONPATH={os.environ.get('PYTHONPATH', '')}")
    print(f"  live request while loading: {latency_line(during)}")
    print(f"  load time: median {statistics.median(times):.3f} s "
          f"({', '.join(f'{t:.3f}' for t in times)}); the worker's CPU: median "
          f"{statistics.median(cpu):.2f} s ({', '.join(f'{c:.2f}' for c in cpu)})")


if __name__ == "__main__":
    main()
