"""The CPU a balancer's start and stop cost: what the test suite and every restart pay.

``python scripts/bench_start_stop.py [--cycles 10] [--workers 1] [--trees A,B]``

Starts ``balancer serve`` (a file store with one host, `--workers`, loopback
port 0) and stops it with SIGTERM, `--cycles` times per tree (each of
`--trees`, a source tree put first on ``PYTHONPATH``: a compiled copy for
compiled figures; the trees alternate, cycle by cycle). For each cycle:

* ``ready``: wall seconds from the command's start until it logs
  ``listening on ... for management`` (once every child is ready);
* CPU seconds at ready (from /proc: each process's threads' run time, and
  the throwaway children the arbiter reaped by then, in whole clock ticks:
  the start-up check, and on trees before 2026-12-07 the entry-point look-up
  child): the arbiter's own, the reaped children's, the management
  process's and the workers';
* ``stop``: the rest, until the command exited (its whole tree's CPU from
  `getrusage` of this script's reaped children, less the figures at ready);
* ``total``: the whole tree's CPU, start to exit (``system``: the kernel's
  part of it).

Prints each tree's means (and each figure's spread) and the totals' ratio to
the first tree's. CPU seconds, not wall time: they hold better on a busy
machine. Run it under ``flock /tmp/bench.lock``, on trees with their bytecode
written (``python -m compileall balancer management``): under
``PYTHONDONTWRITEBYTECODE`` a tree without it compiles its modules at every
start (0.1-0.2 CPU-s more).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READY_LINE = "for management"
START_LIMIT = 60.0  # seconds a start may take
STOP_LIMIT = 30.0
TICKS = os.sysconf("SC_CLK_TCK")
FIGURES = ("ready", "arbiter", "reaped", "management", "workers", "stop", "total", "system")


def cpu_of(pid: int) -> float:
    """The seconds its threads ran on a CPU (/proc's schedstat: nanoseconds, where
    its stat counts whole clock ticks)."""
    return sum(int((task / "schedstat").read_text().split()[0])
               for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9


def reaped_of(pid: int) -> float:
    """The user+system seconds of the children it reaped (/proc's stat: clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / TICKS


def children_of(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()]


def kinds(log: str) -> dict[int, str]:
    """Each child's kind, "management" or "workers", from the arbiter's `ready` lines."""
    found = re.findall(r"(worker|management) (\d+) ready", log)
    return {int(pid): "management" if kind == "management" else "workers"
            for kind, pid in found}


def children_cpu() -> tuple[float, float]:
    """(user + system, system) seconds of this script's reaped children."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime, usage.ru_stime


def cycle(tree: str, workdir: Path, workers: int) -> dict[str, float]:
    """One start and stop of `tree`'s balancer: its figures."""
    log_path = workdir / "balancer.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")}
    env["PYTHONPATH"] = tree
    argv = [sys.executable, "-m", "balancer", "serve", "--listen", "127.0.0.1:0",
            "--management", "127.0.0.1:0", "--store", f"file:{workdir / 'routes.json'}",
            "--workers", str(workers)]
    before = children_cpu()
    with open(log_path, "w") as log:
        began = time.monotonic()
        proc = subprocess.Popen(argv, cwd=workdir, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        ready = wait_ready(proc, log_path, began)
        figures = at_ready(proc.pid, kinds(log_path.read_text(errors="replace")))
        proc.send_signal(signal.SIGTERM)
        proc.wait(STOP_LIMIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    after = children_cpu()
    total, system = after[0] - before[0], after[1] - before[1]
    at = figures["arbiter"] + figures["reaped"] + figures["management"] + figures["workers"]
    return {**figures, "ready": ready, "stop": total - at, "total": total, "system": system}


def wait_ready(proc: subprocess.Popen[bytes], log_path: Path, began: float) -> float:
    """Seconds until the balancer says it serves (polled every 5 ms)."""
    while READY_LINE not in log_path.read_text(errors="replace"):
        if proc.poll() is not None:
            raise SystemExit(f"balancer exited {proc.returncode}:\n{log_path.read_text()}")
        if time.monotonic() - began > START_LIMIT:
            raise SystemExit("balancer did not start in time")
        time.sleep(0.005)
    return time.monotonic() - began


def at_ready(arbiter: int, kind: dict[int, str]) -> dict[str, float]:
    figures = {"arbiter": cpu_of(arbiter), "reaped": reaped_of(arbiter),
               "management": 0.0, "workers": 0.0}
    for child in children_of(arbiter):
        figures[kind[child]] += cpu_of(child)
    return figures


def report(results: dict[str, list[dict[str, float]]]) -> None:
    first = None
    for tree, runs in results.items():
        means = {name: statistics.mean(r[name] for r in runs) for name in FIGURES}
        spread = {name: statistics.pstdev(r[name] for r in runs) for name in FIGURES}
        first = first or means["total"]
        print(f"{tree} ({len(runs)} cycles)")
        for name in FIGURES:
            unit = "s wall" if name == "ready" else "CPU-s"
            print(f"  {name:<11} {means[name]:7.3f} ± {spread[name]:.3f} {unit}")
        print(f"  total / first tree's: {means['total'] / first:.3f}")
    print(json.dumps({tree: [{k: round(v, 4) for k, v in r.items()} for r in runs]
                      for tree, runs in results.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--trees", default=str(Path(__file__).resolve().parent.parent),
                        help="comma-separated source trees (default: this one)")
    args = parser.parse_args()
    trees = args.trees.split(",")
    results: dict[str, list[dict[str, float]]] = {tree: [] for tree in trees}
    with tempfile.TemporaryDirectory(prefix="bench-start-") as tmp:
        workdir = Path(tmp)
        (workdir / "routes.json").write_text(json.dumps({"version": 1, "hosts": {
            "example.test": {"action": "proxy", "backends": ["127.0.0.1:9"]}}}))
        for number in range(args.cycles):
            for tree in trees if number % 2 == 0 else reversed(trees):
                results[tree].append(cycle(tree, workdir, args.workers))
    report(results)


if __name__ == "__main__":
    main()
