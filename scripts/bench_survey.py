"""What gathering a big snapshot costs the management process, in-process.

``python scripts/bench_survey.py [--hosts 20000] [--surveys 12] [--collector cpython|quiet]``

A worker's answer to a survey of `--hosts` active hosts (one request each),
encoded in lines as a worker sends it (`balancer.control.encode`), is
decoded `--surveys` times as the management process does
(`balancer.control.decoded`, a pause between two lines), the last two
snapshots kept alive (a scrape's body being sent, and the next survey).
Prints the wall time, the longest stretch between two pauses (what a
`/healthz` would wait for) and the garbage collector's collections by
generation (`gc.callbacks`), with CPython's thresholds (``cpython``) or the
management process's (``quiet``: no automatic full collection,
`management.collector`). Run it under ``flock /tmp/bench.lock``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from balancer.control import decoded, encode  # noqa: E402
from balancer.stats import Stats  # noqa: E402
from management.collector import THRESHOLDS  # noqa: E402


def answer(hosts: int) -> bytes:
    stats = Stats()
    keys = [f"a{n}.example" for n in range(hosts)]
    for key in keys:
        stats.host(key).finish(200, 100, 200, 0.001)
    return encode({"pid": 1, "lines": 0, "stats": stats.snapshot(keys)}, lambda: None)


class Stretches:
    """The longest time between two calls (the pauses)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.longest = 0.0

    def __call__(self) -> None:
        now = time.perf_counter()
        self.longest = max(self.longest, now - self.last)
        self.last = now


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=20000)
    parser.add_argument("--surveys", type=int, default=12)
    parser.add_argument("--collector", choices=("cpython", "quiet"), default="cpython")
    args = parser.parse_args()
    raw = answer(args.hosts)
    gc.collect()
    gc.freeze()  # as the management process does once set up
    if args.collector == "quiet":
        gc.set_threshold(*THRESHOLDS)
    collections: dict[int, list[float]] = {}
    started = [0.0]

    def note(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collections.setdefault(info["generation"], []).append(
                time.perf_counter() - started[0])
    gc.callbacks.append(note)
    stretches = Stretches()
    alive: list[Any] = []
    began = time.perf_counter()
    for _ in range(args.surveys):
        alive = [*alive[-1:], decoded(raw, "", stretches)[0]]
        stretches()
    took = time.perf_counter() - began
    gc.callbacks.remove(note)
    print(f"{args.hosts} hosts ({len(raw) / 1e6:.1f} MB an answer), collector {args.collector}: "
          f"{args.surveys} surveys {took:.2f} s, longest stretch "
          f"{stretches.longest * 1000:.0f} ms")
    for generation, times in sorted(collections.items()):
        print(f"  generation {generation}: {len(times)} collections, {sum(times):.2f} s, "
              f"longest {max(times) * 1000:.0f} ms")


if __name__ == "__main__":
    main()
