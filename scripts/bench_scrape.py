"""What a big table costs when nothing happens, and what a scrape costs a live request.

``python scripts/bench_scrape.py [--hosts 100000] [--active 1000] [--workers 1]
[--idle 30] [--duration 10] [--scrapers 1] [--churn 0] [--churn-hosts 1000]``

A real ``balancer serve`` over a file store of `--hosts` proxy hosts (their
backend is never asked) plus a static host for the probe. `--active` of the
hosts get one request each first (static hosts of their own), as a
production table has some hosts with traffic and many without. With
`--churn` N, a deploy tool's day comes next: N rounds of `--churn-hosts` new
hosts written to the store, each sent one request, every worker reloaded
(SIGHUP: each retires its counters) and the hosts deleted again; the run
directory's retired total is reported at the end. Then:

1. idle: no request, no scrape, for `--idle` seconds: the CPU seconds the
   worker(s) and the management process used (timers walking the table);
2. probe: one client sends requests back to back over a keep-alive
   connection to the static host, for `--duration` seconds: its latency;
3. probe + scrape: the same while `--scrapers` other clients each fetch
   ``/metrics`` in a loop (and the history samples every 5 s): the probe's
   latency again (a stalled worker shows in p99 and max), the scrapes' time
   and size, ``/healthz``'s latency meanwhile (a stalled
   management process shows there), and the Pss of the arbiter and the
   management process after them (and each one's peak, VmHWM, over the run).

Run it under ``flock /tmp/bench.lock``; with ``PYTHONPATH`` pointing at a
compiled copy to measure the compiled data plane (the balancer runs from a
temporary directory: ``python -m`` would otherwise import the balancer of the
working directory first). Prints the data plane it ran (interpreted or compiled).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import signal
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
PROBE = "probe.example"
SERVING = re.compile(r"worker (\d+) serving routing version")
PLANE = re.compile(r"data plane (compiled|interpreted)")
TICKS = 100  # clock ticks a second (/proc/PID/stat's utime and stime)


def fill(path: Path, hosts: int, active: int) -> None:
    dead = f"{HOST}:{free_port()}"  # never connected to: no request goes there
    table: dict[str, object] = {f"h{n}.example": {"action": "proxy", "backends": [dead]}
                                for n in range(hosts)}
    for n in range(active):
        table[f"a{n}.example"] = {"action": "static", "body": f"site {n}"}
    table[PROBE] = {"action": "static", "body": "probe"}
    path.write_text(json.dumps({"version": 1, "hosts": table}))


def start(procs: Processes, tmp: Path, args: argparse.Namespace) -> tuple[int, int, int]:
    """The balancer: (proxy port, management port, arbiter pid)."""
    fill(tmp / "routes.json", args.hosts, args.active)
    port, mgmt = free_port(), free_port()
    proc = procs.start("big", [sys.executable, "-m", "balancer", "serve",
                               "--workers", str(args.workers), "--listen", f"{HOST}:{port}",
                               "--management", f"{HOST}:{mgmt}",
                               "--store", f"file:{tmp / 'routes.json'}"])
    wait_for_port(proc, port, timeout=300)
    wait_for_port(proc, mgmt, timeout=300)
    return port, mgmt, proc.pid


def workers_serving(log: Path, count: int, timeout: float = 300.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted({int(pid) for pid in SERVING.findall(log.read_text(errors="replace"))})
        if len(found) >= count:
            return found
        time.sleep(0.2)
    raise SystemExit("the workers did not load their table")


def descendants(pid: int) -> list[int]:
    out = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out += [int(child), *descendants(int(child))]
    return out


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def check_workers(mgmt: int, count: int, log: Path) -> None:
    """The management process sees `count` workers (else their counters are not measured)."""
    conn = http.client.HTTPConnection(HOST, mgmt, timeout=60)
    conn.request("GET", "/api/v1/info")
    info = json.loads(conn.getresponse().read())
    if len(info.get("processes", [])) != count:
        raise SystemExit(f"the management process sees {info.get('processes')}, not {count} "
                         f"workers:\n{log.read_text(errors='replace')[-3000:]}")


def pss_mib(pid: int) -> float:
    """The process's proportional set size (``/proc/PID/smaps_rollup``), MiB."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def peak_mib(pid: int) -> float:
    """The process's peak resident set (``VmHWM`` of ``/proc/PID/status``), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def warm(port: int, active: int, names: list[str] | None = None) -> None:
    """One request to each of `names` (the first `active` static hosts by default)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    for name in names if names is not None else [f"a{n}.example" for n in range(active)]:
        conn.request("GET", "/", headers={"Host": name})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"{name}: {response.status}")


def processes(mgmt: int) -> list[dict]:
    """`/api/v1/info`'s workers ([] while the management process is replaced)."""
    try:
        conn = http.client.HTTPConnection(HOST, mgmt, timeout=60)
        conn.request("GET", "/api/v1/info")
        return json.loads(conn.getresponse().read()).get("processes", [])
    except (OSError, ValueError, http.client.HTTPException):
        return []


def wait_serving(mgmt: int, version: int, count: int, old: set[int]) -> list[int]:
    """The pids of `count` workers, none of `old`, all serving `version` or later."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        found = processes(mgmt)
        if len(found) == count and all(p["version"] >= version and p["pid"] not in old
                                       for p in found):
            return sorted(p["pid"] for p in found)
        time.sleep(0.1)
    raise SystemExit(f"the workers did not serve version {version}")


def churn(tmp: Path, port: int, mgmt: int, arbiter: int, args: argparse.Namespace) -> None:
    """`--churn` rounds of hosts created, served, retired by a reload and deleted."""
    routes = tmp / "routes.json"
    table = json.loads(routes.read_text())
    base, version = table["hosts"], table["version"]
    for round_ in range(args.churn):
        names = [f"c{round_}-{n}.example" for n in range(args.churn_hosts)]
        site = {"action": "static", "body": "churn"}
        version += 1
        routes.write_text(json.dumps({"version": version,
                                      "hosts": {**base, **dict.fromkeys(names, site)}}))
        old = set(wait_serving(mgmt, version, args.workers, set()))
        warm(port, 0, names)
        os.kill(arbiter, signal.SIGHUP)  # every worker retires, its counters left
        wait_serving(mgmt, version, args.workers, old)
        version += 1
        routes.write_text(json.dumps({"version": version, "hosts": base}))
        wait_serving(mgmt, version, args.workers, set())


def retired_total(workers: list[int]) -> str:
    """The size of the run directory's retired total, and the hosts it holds."""
    for path in Path(tempfile.gettempdir()).glob(f"balancer-*/worker-{workers[0]}.sock"):
        total = path.parent / "retired-total.json"
        if total.exists():
            hosts = len(json.loads(total.read_text()).get("hosts", {}))
            return f"{total.stat().st_size / 1024:.0f} KiB, {hosts} hosts"
    return "none"


def management_of(arbiter: int, workers: list[int]) -> list[int]:
    """The arbiter and its management process, once a replaced one has gone."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        others = [p for p in descendants(arbiter) if p not in workers]
        if len(others) == 1:
            return [arbiter, *others]
        time.sleep(0.1)
    raise SystemExit("the management process replaced by the reload did not exit")


def probe(port: int, stop: threading.Event, times: list[float], path: str = "/") -> None:
    conn = http.client.HTTPConnection(HOST, port, timeout=60)
    while not stop.is_set():
        started = time.perf_counter()
        conn.request("GET", path, headers={"Host": PROBE if path == "/" else HOST})
        conn.getresponse().read()
        times.append((time.perf_counter() - started) * 1000)


def scraper(mgmt: int, stop: threading.Event, times: list[float], sizes: list[int]) -> None:
    conn = http.client.HTTPConnection(HOST, mgmt, timeout=300)
    while not stop.is_set():
        started = time.perf_counter()
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise SystemExit(f"/metrics: {response.status}")
        times.append((time.perf_counter() - started) * 1000)
        sizes.append(len(body))


def run(port: int, mgmt: int | None, duration: float, scrapers: int = 1
        ) -> tuple[list[float], list[float], list[int], list[float]]:
    """The live requests', the scrapes' (with `mgmt`) and ``/healthz``'s times, the sizes."""
    stop = threading.Event()
    probes: list[float] = []
    scrapes: list[float] = []
    sizes: list[int] = []
    healthz: list[float] = []
    threads = [threading.Thread(target=probe, args=(port, stop, probes))]
    if mgmt is not None:
        threads += [threading.Thread(target=scraper, args=(mgmt, stop, scrapes, sizes))
                    for _ in range(scrapers)]
        threads.append(threading.Thread(target=probe, args=(mgmt, stop, healthz, "/healthz")))
    for thread in threads:
        thread.start()
    time.sleep(duration)
    stop.set()
    for thread in threads:
        thread.join(300)
    return probes, scrapes, sizes, healthz


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100000)
    parser.add_argument("--active", type=int, default=1000, help="hosts given one request")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds measured idle")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each probe")
    parser.add_argument("--scrapers", type=int, default=1,
                        help="clients scraping /metrics in a loop at once")
    parser.add_argument("--churn", type=int, default=0,
                        help="rounds of hosts created, served, reloaded and deleted first")
    parser.add_argument("--churn-hosts", type=int, default=1000, help="new hosts a round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scrape-") as tmp:
        # `python -m` puts its working directory first on sys.path: run from the
        # temporary one, so that PYTHONPATH (or the installed package) decides what runs
        os.chdir(tmp)
        procs = Processes(Path(tmp) / "logs")
        try:
            port, mgmt, arbiter = start(procs, Path(tmp), args)
            workers = workers_serving(procs.log_dir / "big.log", args.workers)
            warm(port, args.active)
            check_workers(mgmt, args.workers, procs.log_dir / "big.log")
            if args.churn:
                churn(Path(tmp), port, mgmt, arbiter, args)
                workers = wait_serving(mgmt, 0, args.workers, set())
            management = management_of(arbiter, workers)
            plane = PLANE.search((procs.log_dir / "big.log").read_text(errors="replace"))
            watched = workers + management
            before = {pid: cpu_seconds(pid) for pid in watched}
            time.sleep(args.idle)
            idle = {pid: cpu_seconds(pid) - before[pid] for pid in watched}
            alone = run(port, None, args.duration)[0]
            probes, scrapes, sizes, healthz = run(port, mgmt, args.duration, args.scrapers)
            pss = {pid: (pss_mib(pid), peak_mib(pid)) for pid in management}
            retired = retired_total(workers)
        finally:
            procs.stop_all()
            os.chdir(ROOT)
    print(f"{args.hosts} hosts ({args.active} with traffic), {args.workers} worker(s), "
          f"data plane {plane.group(1) if plane else '?'}, "
          f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}")
    for pid in workers:
        print(f"  idle {args.idle:g} s: worker {pid} used {idle[pid]:.2f} s CPU")
    for pid in management:
        print(f"  idle {args.idle:g} s: process {pid} (arbiter or management) used "
              f"{idle[pid]:.2f} s CPU; Pss after the scrapes {pss[pid][0]:.1f} MiB, "
              f"peak (VmHWM) {pss[pid][1]:.1f} MiB")
    print(f"  live request, no scrape:     {latency_line(alone)}")
    print(f"  live request, scraping:      {latency_line(probes)}")
    print(f"  /metrics scrape:             {latency_line(scrapes)}; "
          f"{(sizes[-1] if sizes else 0) / 1024:.0f} KiB")
    print(f"  /healthz, scraping:          {latency_line(healthz)}")
    if args.churn:
        print(f"  after {args.churn} rounds of {args.churn_hosts} hosts created and deleted: "
              f"retired total {retired}")


if __name__ == "__main__":
    main()
