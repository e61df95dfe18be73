"""How long a worker's loop goes without a round while it loads a big table, in CPU.

``python scripts/bench_load_gaps.py [--store redis|file] [--hosts 100000] [--loads 3]``

A `balancer.server.Worker` in this process (monkey-patched, its garbage
collector tuned as `balancer.workers.tune_gc` tunes a proxy worker's) over a
redis-server started here on a free loopback port, or a file store, holding
`--hosts` static hosts. Then `--loads` times the whole table is replaced (every
rule changed) and the worker reads, checks and compiles it, while a greenlet
notes the CPU time of this thread between two of its rounds of the loop: a
live request waits at least that long. CPU, not wall time, so that what the
rest of a loaded machine runs does not count.

Printed per load: the longest stretches without a round (ms of CPU), the
garbage collections run meanwhile (by generation, the longest), and the CPU
of the load. Run it under ``flock /tmp/bench.lock`` with ``PYTHONPATH``
naming the tree to measure (its compiled copy for compiled figures).
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402

from balancer.server import Worker  # noqa: E402
from balancer.settings import load_settings  # noqa: E402
from balancer.stores import open_store  # noqa: E402
from balancer.workers import tune_gc  # noqa: E402

STARTUP_LIMIT = 10.0  # seconds redis-server may take to listen


def table(hosts: int, mark: str) -> dict[str, Any]:
    return {f"h{n}.example": {"action": "static", "body": f"{mark} {n}"} for n in range(hosts)}


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    """A redis-server on a loopback port of its own, and its URL."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # (a benchmark run alone under the lock: nothing races for it)
    server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                               "--save", "", "--appendonly", "no", "--dir", directory],
                              stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + STARTUP_LIMIT
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise SystemExit("redis-server did not listen")


class Gaps:
    """The CPU this thread spends between two rounds of the loop, and the garbage
    collections, noted from `start()` on."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self.collections: list[tuple[int, float]] = []
        self._began = 0.0
        gc.callbacks.append(self._note)
        self._ticker = gevent.spawn(self._tick)

    def _note(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.thread_time()
        else:
            self.collections.append((info["generation"],
                                     (time.thread_time() - self._began) * 1000))

    def _tick(self) -> None:
        while True:
            before = time.thread_time()
            gevent.sleep(0.001)  # a timer: due at the loop's next round but one, at most
            self.gaps.append((time.thread_time() - before) * 1000)

    def start(self) -> None:
        self.gaps.clear()
        self.collections.clear()

    def line(self) -> str:
        top = sorted(self.gaps, reverse=True)[:4]
        longest = sorted(self.collections, key=lambda c: -c[1])[:3]
        by_gen = [sum(1 for g, _ in self.collections if g == gen) for gen in (0, 1, 2)]
        return (f"longest loop gaps (ms CPU) {', '.join(f'{g:.0f}' for g in top)}; "
                f"collections {by_gen[0]}/{by_gen[1]}/{by_gen[2]} (gen 0/1/2), longest "
                f"{', '.join(f'gen{g} {d:.0f} ms' for g, d in longest) or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=("redis", "file"), default="redis")
    parser.add_argument("--hosts", type=int, default=100000)
    parser.add_argument("--loads", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-load-gaps-") as tmp:
        server = None
        if args.store == "redis":
            server, url = start_redis(tmp)
        else:
            url = f"file:{Path(tmp) / 'routes.json'}"
        try:
            writer, store = open_store(url), open_store(url)
            writer.replace(table(args.hosts, "r0"))
            worker = Worker(load_settings(env={"BALANCER_STORE_SNAPSHOT": "off"}), store)
            worker.apply(store.load())
            tune_gc()
            gaps = Gaps()
            for n in range(1, args.loads + 1):
                writer.replace(table(args.hosts, f"r{n}"))
                gevent.sleep(0.05)
                gaps.start()
                cpu = time.process_time()
                if not worker.apply(store.load()):
                    raise SystemExit(f"load {n} was not applied")
                cpu = time.process_time() - cpu
                gevent.sleep(0.01)  # the gap that ends with the load
                print(f"{args.store} load {n} of {args.hosts} hosts: {gaps.line()}; "
                      f"load CPU {cpu:.2f} s", flush=True)
        finally:
            if server is not None:
                server.terminate()
                server.wait(10)


if __name__ == "__main__":
    main()
