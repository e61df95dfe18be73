"""What waiting for a replica costs a one-host write (``?replicas=1``, docs/stores.md).

``python scripts/bench_replica_writes.py [--writes 300] [--rounds 3] [--wait 1000]``

A real redis-server master and a replica of it, and two real ``balancer
serve`` (one worker each) over that master in two namespaces: one with the
plain ``redis://`` URL, one with ``?replicas=1&wait=MS``. Each round makes
`--writes` one-host PUTs back to back through each balancer's management API
(a connection each, as `balancerctl` makes them),
the two alternated (and which goes first alternated too), then the same
number of `RedisStore.put_host` calls made in this process (the store alone,
without HTTP and the workers' confirmation). Printed per round: the p50, p99
and mean latency of each, and the ratio with the option to without.

Run it under ``flock /tmp/bench.lock``, from /tmp with ``PYTHONPATH`` naming the
checkout to measure (``python -m`` would otherwise import the balancer of the
working directory first).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from balancer.stores.redis import RedisStore  # noqa: E402
from loadtest.procs import Processes, free_port, wait_for_port  # noqa: E402
from loadtest.routes import RouteApi  # noqa: E402

HOST = "127.0.0.1"
RULE = {"action": "static", "body": "bench"}


def start_redis(procs: Processes, tmp: Path, name: str, *options: str) -> int:
    port = free_port()
    directory = tmp / name
    directory.mkdir()
    proc = procs.start(name, ["redis-server", "--port", str(port), "--bind", HOST, "--save", "",
                              "--appendonly", "no", "--dir", str(directory),
                              "--repl-diskless-sync-delay", "0", *options])
    wait_for_port(proc, port)
    return port


def wait_for_replica(port: int, timeout: float = 30.0) -> None:
    import redis

    client = redis.Redis(host=HOST, port=port, decode_responses=True)
    deadline = time.monotonic() + timeout
    while client.info("replication").get("master_link_status") != "up":
        if time.monotonic() > deadline:
            raise SystemExit("the replica did not sync")
        time.sleep(0.1)


def start_balancer(procs: Processes, name: str, url: str, namespace: str) -> int:
    """A balancer with one worker over `url`; its management port."""
    port, mgmt = free_port(), free_port()
    proc = procs.start(name, [sys.executable, "-m", "balancer", "serve", "--workers", "1",
                              "--listen", f"{HOST}:{port}", "--management", f"{HOST}:{mgmt}",
                              "--store", url],
                       env={"BALANCER_STORE_NAMESPACE": namespace,
                            "BALANCER_STORE_SNAPSHOT": "off"})
    wait_for_port(proc, mgmt, timeout=60)
    return mgmt


def timed(write: Callable[[int], object], count: int) -> list[float]:
    """`write(n)` for n in 0..`count` - 1, back to back; each one's latency in ms."""
    times = []
    for n in range(count):
        started = time.perf_counter()
        write(n)
        times.append((time.perf_counter() - started) * 1000)
    return times


def api_writes(mgmt: int, count: int) -> list[float]:
    """One-host PUTs, a connection each (as `balancerctl` makes them)."""
    api = RouteApi(HOST, mgmt)
    return timed(lambda n: api.set_rule(f"w{n % 50}.example", RULE), count)


def store_writes(store: RedisStore, count: int) -> list[float]:
    return timed(lambda n: store.put_host(f"s{n % 50}.example", RULE), count)


def summary(times: list[float]) -> tuple[float, float, float]:
    ordered = sorted(times)
    return (statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1],
            statistics.fmean(ordered))


def compare(label: str, plain: Callable[[], list[float]],
            waiting: Callable[[], list[float]], first_plain: bool) -> None:
    runs = [("plain", plain), ("replicas=1", waiting)]
    results = {name: summary(run()) for name, run in (runs if first_plain else runs[::-1])}
    (p50, p99, mean), (w50, w99, wmean) = results["plain"], results["replicas=1"]
    print(f"  {label:6} plain p50 {p50:.2f} p99 {p99:.2f} mean {mean:.2f} ms | replicas=1 "
          f"p50 {w50:.2f} p99 {w99:.2f} mean {wmean:.2f} ms | ratio p50 {w50 / p50:.2f}x "
          f"mean {wmean / mean:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--wait", type=int, default=1000, help="the wait= option, ms")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp:
        os.chdir(tmp)  # `python -m` imports from its working directory first
        procs = Processes(Path(tmp) / "logs")
        try:
            master = start_redis(procs, Path(tmp), "master")
            replica = start_redis(procs, Path(tmp), "replica", "--replicaof", HOST, str(master))
            wait_for_replica(replica)
            base = f"redis://{HOST}:{master}/0"
            option = f"?replicas=1&wait={args.wait}"
            plain_api = start_balancer(procs, "plain", base, "plain")
            waiting_api = start_balancer(procs, "waiting", base + option, "waiting")
            plain_store = RedisStore(base, "plain-store")
            waiting_store = RedisStore(base + option, "waiting-store")
            api_writes(plain_api, 20)  # warm both up
            api_writes(waiting_api, 20)
            print(f"one-host writes, {args.writes} per round and kind, master and replica on "
                  f"this machine, PYTHONPATH={os.environ.get('PYTHONPATH', '')}")
            for round_ in range(args.rounds):
                print(f"round {round_ + 1}:")
                first = round_ % 2 == 0
                compare("API", lambda: api_writes(plain_api, args.writes),
                        lambda: api_writes(waiting_api, args.writes), first)
                compare("store", lambda: store_writes(plain_store, args.writes),
                        lambda: store_writes(waiting_store, args.writes), first)
        finally:
            procs.stop_all()
            os.chdir(ROOT)


if __name__ == "__main__":
    main()
