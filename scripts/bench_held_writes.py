"""What the workers' held answers cost the run directory: at each scrape and at a stop.

``python scripts/bench_held_writes.py [--hosts 100000] [--active 20000] [--workers 2]
[--scrapes 5]``

A real ``balancer serve`` over bench_scrape.py's table: `--hosts` proxy hosts
(never asked) and `--active` static hosts, each sent one request over one
connection (so one worker counted them: its answer to a survey of the active
hosts is the big one). Then:

1. `--scrapes` scrapes of ``/metrics`` one after the other: the management
   process's CPU seconds a scrape (each a complete survey: every answer held,
   and since 2026-12-07 written into the run directory when it changed,
   `management.kept.HeldCounters.mirror`), and the held answers' files
   (``held-*.answer``) in the run directory after them;
2. a graceful stop (SIGTERM to the arbiter), a worker stopped (SIGSTOP) so
   that the arbiter waits: once the management process has exited, the bytes
   of the held answers written since the SIGTERM, and of those left. The
   worker is then continued and the balancer exits.

Run it under ``flock /tmp/bench.lock``; ``PYTHONPATH`` picks the tree measured.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_scrape import HOST, cpu_seconds, start, warm, workers_serving  # noqa: E402

from loadtest.procs import Processes  # noqa: E402


def run_dir_of(workers: list[int]) -> Path:
    for path in Path(tempfile.gettempdir()).glob(f"balancer-*/worker-{workers[0]}.sock"):
        return path.parent
    raise SystemExit("no run directory")


def answers(run_dir: Path, since: float = 0.0) -> tuple[int, int]:
    """The held answers' files in `run_dir` modified since `since`: (count, bytes)."""
    found = [p.stat() for p in run_dir.glob("held-*.answer")]
    fresh = [st.st_size for st in found if st.st_mtime >= since]
    return len(fresh), sum(fresh)


def scrape(mgmt: int) -> int:
    conn = http.client.HTTPConnection(HOST, mgmt, timeout=300)
    conn.request("GET", "/metrics")
    return len(conn.getresponse().read())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100_000)
    parser.add_argument("--active", type=int, default=20_000, help="hosts given one request")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--scrapes", type=int, default=5, help="scrapes measured")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-held-"))
    procs = Processes(tmp / "logs")
    port, mgmt, arbiter = start(procs, tmp, argparse.Namespace(
        hosts=args.hosts, active=args.active, workers=args.workers))
    workers = workers_serving(tmp / "logs" / "big.log", args.workers)
    warm(port, args.active)
    scrape(mgmt)  # (the requests counted, every answer held)
    [management] = [int(pid) for pid in re.findall(
        r"management (\d+) ready", (tmp / "logs" / "big.log").read_text(errors="replace"))]
    run_dir = run_dir_of(workers)
    before = cpu_seconds(management)
    size = sum(scrape(mgmt) for _ in range(args.scrapes))
    spent = cpu_seconds(management) - before
    count, held = answers(run_dir)
    print(f"{args.hosts} hosts, {args.active} active, {args.workers} workers: "
          f"{args.scrapes} scrapes ({size / args.scrapes / 1e6:.1f} MB each): management "
          f"process {spent / args.scrapes:.3f} CPU-s a scrape; held answers in the run "
          f"directory: {count} files, {held / 1e6:.1f} MB")
    os.kill(workers[0], signal.SIGSTOP)
    stopped = time.time()
    os.kill(arbiter, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while Path(f"/proc/{management}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    count, written = answers(run_dir, stopped)
    left = answers(run_dir)
    print(f"stop: held answers written since the SIGTERM: {count} files, "
          f"{written / 1e6:.1f} MB; left in the run directory: {left[0]} files, "
          f"{left[1] / 1e6:.1f} MB")
    os.kill(workers[0], signal.SIGCONT)
    procs.stop_all()


if __name__ == "__main__":
    main()
