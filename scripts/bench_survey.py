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
`management.collector`). Then, from one snapshot: the longest stretch of a
``/metrics`` body written whole (`management.metrics.Metrics`, its rows
sorted at the start) and of two history samples (`management.history.History`,
its hosts ranked past `MAX_HOSTS`); the objects a host costs the garbage
collector; and a full collection (``gc.collect()``, as
`management.collector` forces every 300 s) with `--held` snapshots alive.
Run it under ``flock /tmp/bench.lock``.
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
    parser.add_argument("--held", type=int, default=4, help="snapshots alive at the full "
                        "collection (`management.metrics.MOST_HELD` bodies being sent)")
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
    del alive
    one_snapshot(raw, args.hosts, args.held)


def one_snapshot(raw: bytes, hosts: int, held: int) -> None:
    """What one snapshot's scrape, history samples and full collections cost."""
    from management.history import History
    from management.metrics import Metrics

    gc.collect()
    before = len(gc.get_objects())
    kept = [decoded(raw, "", None)[0]["stats"] for _ in range(held)]  # type: ignore[index]
    tracked = (len(gc.get_objects()) - before) / (held * hosts)
    stretches = Stretches()
    sent = sum(map(len, Metrics(lambda: kept[0], pause=stretches).render()))
    scrape = stretches.longest
    history, stretches = History(None, Stretches()), Stretches()
    history.pause = stretches
    for n in range(2):
        history.sample(kept[n % held], 1000.0 + 5 * n)
        stretches()
    began = time.perf_counter()
    gc.collect()
    full = time.perf_counter() - began
    print(f"  one snapshot: /metrics body {sent / 1e6:.1f} MB, longest stretch "
          f"{scrape * 1000:.1f} ms; history sample, longest stretch "
          f"{stretches.longest * 1000:.1f} ms; {tracked:.1f} objects tracked a host; "
          f"full collection with {held} snapshots alive {full * 1000:.0f} ms")


if __name__ == "__main__":
    main()
