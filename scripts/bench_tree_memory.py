"""Each process's memory under load against HAProxy's, and the floor.

``python scripts/bench_tree_memory.py [--connections 100,1000] [--duration 8]
[--targets haproxy,balancer[,haproxy-master][,baseline]] [--baseline TREE] [--settle 2]
[--mappings] [--scrape] [--floor]``

For each connection count, every target is started afresh in front of
nginx (as `scripts/bench_proxy.py` starts them: HAProxy ``nbthread 1``,
``balancer serve --workers 1`` on a file store; ``haproxy-master``: HAProxy
in master-worker mode, ``haproxy -W``, as Debian's systemd unit runs it),
read idle ``--settle`` seconds after they listen (with
``server.merge_pages``, time for the host's ksmd to merge: about 8 s at its
default pace), then loaded with
``wrk -t1 -cN`` keep-alive for the duration while each of its processes'
``/proc/PID/smaps_rollup`` is sampled every 0.2 s. It prints, per process,
Pss (its anonymous part) / Private / Shared idle and at the sample where the
tree's Pss peaked, and the tree's Pss against HAProxy's. A fresh start per
count: a tree that served 1,000 connections first would carry their memory
into the figure for 100. ``--mappings`` also prints, idle and at that
peak, each process's Pss and Private_Dirty by kind of mapping
(`loadtest.measure.MAPPING_KINDS`: pymalloc's arenas and the other anonymous
mappings, malloc's heap, the interpreter's and libraries' writable data, the
stack, files' code): what a child holds alone is mostly the pages it copied
of its parent's. ``--scrape`` GETs each balancer's ``/metrics`` once right
after its start, as a Prometheus server would (the management process imports
its exporter's modules at the first scrape), so the figures are those of a
monitored balancer.

``--floor`` also reads what no balancer can go below with its three
processes: a bare interpreter (``python3 -c``, and with ``-S``: no site
packages' ``.pth`` files), one that imports gevent and patches (what any
gevent server holds), and one that imports the worker's modules, patches and
runs a hub (what a worker holds before its first connection).

Run it from a directory without a ``balancer`` package (e.g. /tmp), with the
compiled copy on PYTHONPATH (see `scripts/bench_proxy.py`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_proxy import Started, start_nginx, start_target  # noqa: E402

from loadtest.measure import MAPPING_KINDS, mappings_kb, process_tree, rollup_kb  # noqa: E402
from loadtest.procs import Processes  # noqa: E402

HOST = "127.0.0.1"
SAMPLE_EVERY = 0.2
FIELDS = ("Pss", "Pss_Anon", "Private", "Shared")
Rollups = list[tuple[str, dict[str, int]]]
Mappings = list[tuple[str, dict[str, tuple[int, int]]]]

FLOOR = {
    "python3 -c (bare)": [sys.executable, "-c", "import time; time.sleep(60)"],
    "python3 -S -c (no site)": [sys.executable, "-S", "-c", "import time; time.sleep(60)"],
    "gevent, patched, hub running": [sys.executable, "-c", (
        "from gevent import monkey; monkey.patch_all(subprocess=False)\n"
        "import gevent; gevent.sleep(60)")],
    "the worker's modules, patched, hub": [sys.executable, "-c", (
        "import balancer.preload as p; p.preload(p.DATA_PLANE + p.STORES['file'])\n"
        "p.patch()\nimport gevent; gevent.sleep(60)")],
}


def roles(target: Started) -> list[tuple[str, int]]:
    """The target's processes by role: the parent, then its children by pid
    (the balancer's arbiter forks the management process before its worker)."""
    root = target.proc.pid
    children = sorted(pid for pid in process_tree(root) if pid != root)
    if len(children) == 2:
        return [("arbiter", root), ("management", children[0]), ("worker", children[1])]
    return [("process", root), *((f"child {i}", pid) for i, pid in enumerate(children))]


def read(named: list[tuple[str, int]]) -> Rollups:
    return [(role, rollup_kb(pid)) for role, pid in named]


def tree(rollups: Rollups) -> int:
    return sum(f["Pss"] for _, f in rollups)


def read_mappings(named: list[tuple[str, int]]) -> Mappings:
    return [(role, mappings_kb(pid)) for role, pid in named]


def loaded_peak(target: Started, connections: int, duration: int,
                mappings: bool = False) -> tuple[Rollups, Mappings]:
    """The rollups at the sample where the tree's Pss was highest while
    ``wrk -t1 -c<connections>`` loaded it, and with `mappings` each process's
    mappings read right after that sample (else none)."""
    named = roles(target)
    peak: list[Rollups] = [read(named)]
    peak_mappings: list[Mappings] = [read_mappings(named) if mappings else []]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(SAMPLE_EVERY):
            now = read(named)
            if tree(now) > tree(peak[0]):
                peak[0] = now
                if mappings:
                    peak_mappings[0] = read_mappings(named)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{duration}s",
                        f"http://{HOST}:{target.port}/index.html"],
                       capture_output=True, timeout=duration + 30, check=True)
    finally:
        stop.set()
        sampler.join()
    return peak[0], peak_mappings[0]


def line(rollups: Rollups) -> str:
    return ", ".join(f"{role} {f['Pss'] / 1024:.1f} ({f['Pss_Anon'] / 1024:.1f}) / "
                     f"{f['Private'] / 1024:.1f} / {f['Shared'] / 1024:.1f}"
                     for role, f in rollups)


def mappings_line(mappings: Mappings) -> str:
    return "; ".join(f"{role} " + ", ".join(
        f"{kind} {pss / 1024:.1f}/{dirty / 1024:.1f}"
        for kind, (pss, dirty) in ((k, found[k]) for k in MAPPING_KINDS))
        for role, found in mappings)


def scrape(target: Started) -> None:
    """GET the balancer's /metrics once (HAProxy: nothing)."""
    if target.management is not None:
        url = f"http://{HOST}:{target.management}/metrics"
        with urllib.request.urlopen(url, timeout=10) as answer:
            answer.read()


def run_count(names: list[str], connections: int, duration: int, baseline: str | None,
              settle: float, mappings: bool = False, scraped: bool = False) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-tree-memory-") as tmp:
        root = Path(tmp)
        procs = Processes(root / "logs")
        try:
            nginx = start_nginx(procs, root)
            started = {name: start_target(name, procs, root, nginx.port, 1, baseline)
                       for name in names}
            for target in started.values() if scraped else ():
                scrape(target)
            time.sleep(settle)  # the children's start-up done
            idle = {name: read(roles(started[name])) for name in names}
            idle_mappings = {name: read_mappings(roles(started[name])) if mappings else []
                             for name in names}
            loaded = {name: loaded_peak(started[name], connections, duration, mappings)
                      for name in names}
        finally:
            procs.stop_all()
    peaks = {name: rollups for name, (rollups, _) in loaded.items()}
    print(f"\n{connections} connections{', scraped once' if scraped else ''}, MiB: "
          "per process Pss (Pss_Anon) / Private / Shared")
    reference = tree(peaks["haproxy"]) if "haproxy" in peaks else 0
    for name in names:
        ratio = f" = {tree(peaks[name]) / reference:.2f}x HAProxy's" if reference else ""
        print(f"  {name:14} idle: {line(idle[name])}; tree {tree(idle[name]) / 1024:.1f}")
        print(f"  {name:14} peak: {line(peaks[name])}; tree {tree(peaks[name]) / 1024:.1f}{ratio}")
        if mappings:
            print(f"  {name:14} idle, by mapping (Pss/Private_Dirty): "
                  f"{mappings_line(idle_mappings[name])}")
            print(f"  {name:14} peak, by mapping: {mappings_line(loaded[name][1])}")


def floor() -> None:
    print("\nthe floor, idle, MiB: Rss, Pss (Pss_Anon) / Private / Shared")
    for label, argv in FLOOR.items():
        proc = subprocess.Popen(argv)
        try:
            time.sleep(3)
            f = rollup_kb(proc.pid)
            print(f"  {label:36} Rss {f['Rss'] / 1024:5.1f}, Pss {f['Pss'] / 1024:5.1f} "
                  f"({f['Pss_Anon'] / 1024:.1f}) / {f['Private'] / 1024:.1f} / "
                  f"{f['Shared'] / 1024:.1f}")
        finally:
            proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", default="100,1000")
    parser.add_argument("--duration", type=int, default=8, help="seconds of wrk per target")
    parser.add_argument("--targets", default="haproxy,balancer")
    parser.add_argument("--baseline", metavar="TREE",
                        help="the tree the baseline target runs from (PYTHONPATH)")
    parser.add_argument("--settle", type=float, default=2.0, metavar="S",
                        help="seconds from the start to the idle reading")
    parser.add_argument("--mappings", action="store_true",
                        help="also each process's memory by kind of mapping, idle and at the peak")
    parser.add_argument("--scrape", action="store_true",
                        help="GET each balancer's /metrics once after its start")
    parser.add_argument("--floor", action="store_true",
                        help="also read bare interpreters (the floor)")
    args = parser.parse_args()
    names = [n for n in args.targets.split(",") if n]
    if set(names) - {"haproxy", "haproxy-master", "balancer", "baseline"}:
        parser.error("--targets: some of haproxy, haproxy-master, balancer, baseline")
    if ("baseline" in names) != bool(args.baseline):
        parser.error("the baseline target and --baseline TREE go together")
    for connections in (int(c) for c in args.connections.split(",") if c):
        run_count(names, connections, args.duration, args.baseline, args.settle, args.mappings,
                  args.scrape)
    if args.floor:
        floor()


if __name__ == "__main__":
    main()
