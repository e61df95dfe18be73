"""Benchmark: how fast held (`spin`) requests are released by a rule change, and
what a held request costs in memory.

    python scripts/bench_spin_release.py [--held 1000] [--rounds 3] [--workers 1]
                                         [--store file|redis] [--backend nginx|python]
                                         [--no-wake]

1. Wake (in this process, the real `SpinAction.hold` code): N greenlets hold
   requests on N real client sockets; the table is swapped; reported is the
   time from the swap to each request leaving its hold with the new route.
2. End to end (a real `balancer serve`, one worker, file store, an nginx
   backend): N keep-alive requests are held from a gevent client, then the
   rule is flipped through the file store and through the management API
   (`PUT /api/v1/hosts/HOST`), to `proxy` (each released request opens a
   backend connection) and to `static`. Reported per request: the arrival of
   its response on this host (kernel receive timestamp, SO_TIMESTAMPNS, so
   the client's own scheduling is not counted) minus the moment the worker
   swapped its table (`last_reload` of `/api/v1/info`, set right after the
   swap, before any held request runs); for the API, also minus the moment
   the write's answer arrived (read-your-writes: with several workers every
   one swapped before that answer; an answer that comes late flatters this
   figure, so the time from the moment the write was sent is given too); the
   store's own delay (swap minus flip); the worker's RSS growth per held
   request; and the CPU time the workers used from the flip to the last
   answer (/proc/PID/schedstat, in ns; it moves far less than the times when
   the machine is shared): in all, per released request, and the busiest
   worker's, with the share of the held requests the busiest worker holds
   (with one listening socket per worker the kernel splits a burst of
   connections evenly; on one shared socket it was split up to 79 / 21 %, and
   the busiest worker's share of the release set the tail).
   `--workers 2` and `--store redis` (a redis-server on a free port) change
   the balancer; with Redis only the API flips the rule. `--backend python`
   uses the single-process `loadtest.backend` instead of nginx: it answers
   1,000 new connections slower than the balancer releases them, so the
   proxy figures then measure it.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import gevent  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from balancer.actions import ActionCompiler, fallback_routes  # noqa: E402
from balancer.netio import GeventIO  # noqa: E402
from balancer.pages import Pages  # noqa: E402
from balancer.pool import BackendRegistry  # noqa: E402
from balancer.stats import Stats  # noqa: E402
from balancer.table import RoutingTable, TableHolder  # noqa: E402
from loadtest import configs  # noqa: E402
from loadtest.procs import free_port  # noqa: E402
from loadtest.reaper import guarded_popen, release  # noqa: E402
from tests.support import Balancer, wait_for  # noqa: E402

HOST = "app.test"
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)  # Linux; SCM_TIMESTAMPNS is the same
NOFILE = 4096  # the nginx backend's descriptors (bench_proxy's)
REQUEST = b"GET /held HTTP/1.1\r\nHost: app.test\r\n\r\n"
SPIN = {"action": "spin", "timeout": 300}


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def at(p: float) -> float:
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]

    return {"first_ms": ordered[0], "p50_ms": at(50), "p99_ms": at(99), "max_ms": ordered[-1]}


# 1. wake latency in process ------------------------------------------------------
def socket_pairs(count: int) -> list[tuple[socket.socket, socket.socket]]:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    pairs = []
    for _ in range(count):
        client = socket.create_connection(("127.0.0.1", port))
        pairs.append((client, listener.accept()[0]))
    listener.close()
    return pairs


def measure_wake(held: int) -> dict[str, float]:
    pages, stats = Pages.load(), Stats()
    holder = TableHolder(RoutingTable(0, {}, fallback_routes(pages, stats)[1]))
    compiler = ActionCompiler(registry=BackendRegistry(connect_timeout=1, fail_timeout=1),
                              pages=pages, stats=stats, holder=holder)

    def build(version: int, rule: dict) -> RoutingTable:
        return RoutingTable.build(version, {HOST: rule}, compiler.compile,
                                  compiler.fallbacks, previous=holder.table)

    holder.swap(build(1, SPIN))
    route = holder.table.lookup(HOST.encode())
    pairs = socket_pairs(held)
    left: list[float] = []
    io = GeventIO()

    def hold(sock: socket.socket) -> None:
        ctx = SimpleNamespace(spin_max_waiting=held)
        conn = SimpleNamespace(sock=sock, ctx=ctx, io=io, disarm=lambda: None)
        ex = SimpleNamespace(conn=conn, route=route, head=SimpleNamespace(host=HOST.encode()))
        with compiler.holds.held(ex):
            route.action.hold(ex)
        left.append(time.perf_counter())

    greenlets = [gevent.spawn(hold, server) for _, server in pairs]
    wait_for(lambda: compiler.holds.count == held, what="held in process")
    static = build(2, {"action": "static", "body": "released"})
    swapped = time.perf_counter()
    holder.swap(static)
    gevent.joinall(greenlets, timeout=30)
    for client, server in pairs:
        client.close()
        server.close()
    return percentiles([(t - swapped) * 1000 for t in left])


# 2. end to end through a real balancer ----------------------------------------------
def held_request(port: int, released: list[float], failed: list[str],
                 done: gevent.event.Event) -> None:
    """One keep-alive request on its own connection; records when its response
    reached this host (kernel timestamp of the first response bytes)."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.sendall(REQUEST)
        chunk, ancillary, _, _ = sock.recvmsg(65536, 64)
        arrived = time.time()
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                seconds, nanos = struct.unpack("qq", value[:16])
                arrived = seconds + nanos / 1e9
        released.append(arrived)
        if not chunk.startswith(b"HTTP/1.1 200 "):
            failed.append(chunk[:40].decode("latin-1"))
        done.wait(60)  # keep the connection open (keep-alive) until every answer is in
        sock.close()
    except OSError as exc:
        failed.append(repr(exc))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_ms(pids: list[int]) -> float:
    """CPU time the processes `pids` used so far, in ms: the scheduler's own
    count in ns (/proc/PID/schedstat), or user + system time in 10 ms ticks."""
    total = 0.0
    for pid in pids:
        sched = Path(f"/proc/{pid}/schedstat")
        if sched.exists():
            total += int(sched.read_text().split()[0]) / 1e6
            continue
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")
    return total


def info(bal: Balancer) -> dict:
    return bal.api("GET", "/api/v1/info")[1]


def one_round(bal: Balancer, backend: str, held: int, via: str, target: str) -> dict:
    if target == "proxy":
        new_rule = {"action": "proxy", "backends": [backend]}
    else:
        new_rule = {"action": "static", "body": "released", "content_type": "text/plain"}
    bal.write_routes({HOST: SPIN})
    wait_for(lambda: {p["version"] for p in info(bal)["processes"]}
             == {bal.api("GET", "/api/v1/hosts")[1]["version"]},
             what="the spin rule served by every worker")
    pids = [p["pid"] for p in info(bal)["processes"]]
    pid = pids[0]
    idle_rss = rss_kib(pid)
    released: list[float] = []
    failed: list[str] = []
    done = gevent.event.Event()
    greenlets = [gevent.spawn(held_request, bal.port, released, failed, done)
                 for _ in range(held)]
    wait_for(lambda: bal.spinning(HOST) == held, timeout=60, what=f"{held} held")
    held_rss = rss_kib(pid)
    shares = [p["open_connections"] for p in info(bal)["processes"]]
    before = info(bal)["store"]["last_reload"]
    cpu_before = [cpu_ms([p]) for p in pids]
    written = answered = time.time()
    if via == "file":
        bal.write_routes({HOST: new_rule})
    else:
        status, _ = bal.api("PUT", f"/api/v1/hosts/{HOST}", new_rule)
        answered = time.time()
        assert status == 200, status
    wait_for(lambda: len(released) + len(failed) >= held, timeout=60, what="every answer")
    cpu = [cpu_ms([p]) - was for p, was in zip(pids, cpu_before, strict=True)]
    done.set()
    gevent.joinall(greenlets, timeout=60)
    swapped = info(bal)["store"]["last_reload"]
    assert swapped > before, "no swap seen"
    after_answer = percentiles([(t - answered) * 1000 for t in released])
    after_sent = percentiles([(t - written) * 1000 for t in released])
    return {"via": via, "target": target, "held": held, "failed": len(failed),
            "store_delay_ms": (swapped - written) * 1000,
            **percentiles([(t - swapped) * 1000 for t in released]),
            **{f"answer_{k}": v for k, v in after_answer.items()},
            **{f"sent_{k}": v for k, v in after_sent.items()},
            "rss_per_held_kib": (held_rss - idle_rss) / held,
            "worker_cpu_ms": sum(cpu), "busiest_worker_cpu_ms": max(cpu),
            "cpu_us_per_request": sum(cpu) * 1000 / held,
            "busiest_worker_share": max(shares) / max(1, sum(shares))}


def vias(store: str) -> tuple[str, ...]:
    return ("file", "api") if store == "file" else ("api",)


def start_backend(kind: str, tmp: Path) -> tuple[int, subprocess.Popen]:
    """The backend released requests go to: nginx (fast enough that the release is
    what is measured) or the single-process Python one (`loadtest.backend`)."""
    number = free_port()
    if kind == "python":
        proc = guarded_popen([sys.executable, "-m", "loadtest.backend", "--listen",
                              f"127.0.0.1:{number}"], cwd=ROOT)
    else:
        directory = tmp / "nginx"
        directory.mkdir()
        conf = directory / "nginx.conf"
        conf.write_text(configs.nginx_backend(directory, number, b"released", NOFILE))
        # a group of its own: the watcher stops the worker too (it outlives a killed master)
        proc = guarded_popen(["nginx", "-p", str(directory), "-c", str(conf), "-e",
                              str(directory / "error.log"), "-g", "daemon off;"],
                             start_new_session=True)
    wait_for(lambda: _accepts(number), what=f"the {kind} backend")
    return number, proc


def end_to_end(held: int, rounds: int, workers: int, store: str,
               backend_kind: str = "nginx") -> list[dict]:
    tmp = Path(tempfile.mkdtemp())
    number, backend = start_backend(backend_kind, tmp)
    redis = None
    args = ["--workers", str(workers)]
    if store == "redis":
        redis_port = free_port()
        redis = guarded_popen(["redis-server", "--port", str(redis_port), "--bind",
                               "127.0.0.1", "--save", "", "--appendonly", "no", "--dir",
                               str(tmp)], stdout=subprocess.DEVNULL)
        wait_for(lambda: _accepts(redis_port), what="redis-server")
        args += ["--store", f"redis://127.0.0.1:{redis_port}/0"]
    bal = Balancer(tmp, {HOST: SPIN} if store == "file" else None, args=args)
    try:
        if store == "redis":
            bal.write_routes = lambda hosts: bal.api("PUT", "/api/v1/hosts", {"hosts": hosts})
        return [one_round(bal, f"127.0.0.1:{number}", held, via, target)
                for _ in range(rounds) for via in vias(store)
                for target in ("proxy", "static")]
    finally:
        bal.stop()
        backend.terminate()
        backend.wait(5)
        release(backend)  # nginx leads a group: its number must not stay listed
        if redis is not None:
            redis.terminate()
            redis.wait(5)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--held", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--store", choices=("file", "redis"), default="file")
    parser.add_argument("--backend", choices=("nginx", "python"), default="nginx",
                        help="what released proxy requests reach (default nginx: the "
                             "single-process Python backend is slower than the release)")
    parser.add_argument("--no-wake", action="store_true",
                        help="skip the in-process wake measurement")
    args = parser.parse_args()
    wakes = [] if args.no_wake else [measure_wake(args.held) for _ in range(args.rounds)]
    for wake in wakes:
        print(json.dumps({"wake": {k: round(v, 2) for k, v in wake.items()}}))
    results = end_to_end(args.held, args.rounds, args.workers, args.store, args.backend)
    for result in results:
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v
                          for k, v in result.items()}))
    if wakes:
        print(f"wake ({args.held} held): p50 "
              f"{statistics.median(w['p50_ms'] for w in wakes):.1f} ms, p99 "
              f"{statistics.median(w['p99_ms'] for w in wakes):.1f} ms after the swap")
    print(f"{args.workers} worker(s), {args.store} store, {args.backend} backend")
    for via, target in [(v, t) for v in vias(args.store) for t in ("proxy", "static")]:
        mine = [r for r in results if r["via"] == via and r["target"] == target]
        answer = (f" (after the write's answer: p50 "
                  f"{statistics.median(r['answer_p50_ms'] for r in mine):.1f} ms, p99 "
                  f"{statistics.median(r['answer_p99_ms'] for r in mine):.1f} ms, worst round "
                  f"{max(r['answer_p99_ms'] for r in mine):.1f} ms; after the write was sent: "
                  f"p50 {statistics.median(r['sent_p50_ms'] for r in mine):.1f} ms, p99 "
                  f"{statistics.median(r['sent_p99_ms'] for r in mine):.1f} ms)"
                  if via == "api" else "")
        print(f"{via} -> {target}: response p50 "
              f"{statistics.median(r['p50_ms'] for r in mine):.1f} ms, p99 "
              f"{statistics.median(r['p99_ms'] for r in mine):.1f} ms after the swap{answer}; "
              f"store delay {statistics.median(r['store_delay_ms'] for r in mine):.0f} ms; "
              f"{statistics.median(r['rss_per_held_kib'] for r in mine):.1f} KiB RSS per held "
              f"request; the workers' CPU from the flip to the last answer "
              f"{statistics.median(r['worker_cpu_ms'] for r in mine):.0f} ms "
              f"({statistics.median(r['cpu_us_per_request'] for r in mine):.0f} us per "
              f"request; the busiest worker's "
              f"{statistics.median(r['busiest_worker_cpu_ms'] for r in mine):.0f} ms), the busiest "
              f"worker holding {min(r['busiest_worker_share'] for r in mine):.0%}–"
              f"{max(r['busiest_worker_share'] for r in mine):.0%} of the requests; "
              f"failures {sum(r['failed'] for r in mine)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
