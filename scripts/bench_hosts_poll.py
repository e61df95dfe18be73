"""What polling ``GET /api/v1/hosts`` costs the management process on a big table.

``python scripts/bench_hosts_poll.py [--hosts 100000] [--polls 20] [--store file|redis]``

A real ``balancer serve`` (one worker) over a store of `--hosts` proxy hosts
(a file store, or a Redis on a free loopback port started here). Then, each
measured as the management process's CPU seconds (arbiter and management
process, from /proc) per request:

1. plain polls: `--polls` GETs of the unchanged table, as a dashboard polled
   before it sent ``If-None-Match``;
2. conditional polls: `--polls` GETs with ``If-None-Match`` naming the
   version answered (304 once the API answers conditional GETs);
3. changed polls: `--polls` times one host written, then the table fetched
   (the whole body encoded anew).

Run it under ``flock /tmp/bench.lock``; the balancer runs from a temporary
directory, so ``PYTHONPATH`` decides which tree runs.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest.procs import Processes, free_port, wait_for_port  # noqa: E402

HOST = "127.0.0.1"
TICKS = 100  # clock ticks a second (/proc/PID/stat's utime and stime)


def table(hosts: int) -> dict[str, object]:
    dead = f"{HOST}:{free_port()}"  # never connected to
    return {f"h{n}.example": {"action": "proxy", "backends": [dead]} for n in range(hosts)}


def store_url(procs: Processes, tmp: Path, kind: str, hosts: int) -> str:
    if kind == "file":
        (tmp / "routes.json").write_text(json.dumps({"version": 1, "hosts": table(hosts)}))
        return f"file:{tmp / 'routes.json'}"
    port = free_port()
    redis = procs.start("redis", [shutil.which("redis-server") or "redis-server", "--port",
                                  str(port), "--bind", HOST, "--save", "", "--appendonly",
                                  "no"])
    wait_for_port(redis, port, timeout=30)
    import redis as redis_py  # the store's layout (docs/stores.md): a whole-table PUT
    client = redis_py.Redis(HOST, port)  # of 100,000 hosts is over the API's 1 MiB body limit
    client.hset("balancer:hosts", mapping={h: json.dumps(r) for h, r in table(hosts).items()})
    client.set("balancer:version", 1)
    client.close()
    return f"redis://{HOST}:{port}/0"


def descendants(pid: int) -> list[int]:
    out = []
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        out += [int(child), *descendants(int(child))]
    return out


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])
    return total / TICKS


def request(conn: http.client.HTTPConnection, method: str, path: str,
            headers: dict[str, str] | None = None, body: bytes | None = None
            ) -> tuple[int, dict[str, str], bytes]:
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    data = response.read()
    return response.status, dict(response.getheaders()), data


def management_pids(arbiter: int, mgmt: int) -> list[int]:
    """The arbiter and the management process (the workers serve no management
    request), once the worker answers with its table loaded."""
    conn = http.client.HTTPConnection(HOST, mgmt, timeout=60)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        info = json.loads(request(conn, "GET", "/api/v1/info")[2])
        workers = {p["pid"] for p in info.get("processes", []) if p.get("loaded")}
        if workers:
            return [arbiter] + [p for p in descendants(arbiter) if p not in workers]
        time.sleep(0.5)
    raise SystemExit("the worker did not load its table")


def measure(pids: list[int], polls: int, step: object) -> tuple[float, float, int]:
    """(management CPU ms per poll, wall ms per poll, last body size)."""
    cpu, wall, size = cpu_seconds(pids), time.perf_counter(), 0
    for _ in range(polls):
        size = step()  # type: ignore[operator]
    return ((cpu_seconds(pids) - cpu) * 1000 / polls, (time.perf_counter() - wall) * 1000 / polls,
            size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100000)
    parser.add_argument("--polls", type=int, default=20)
    parser.add_argument("--store", choices=("file", "redis"), default="file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-hosts-") as tmp:
        os.chdir(tmp)  # `python -m` would import the balancer of the working directory
        procs = Processes(Path(tmp) / "logs")
        try:
            url = store_url(procs, Path(tmp), args.store, args.hosts)
            port, mgmt = free_port(), free_port()
            proc = procs.start("big", [sys.executable, "-m", "balancer", "serve", "--workers",
                                       "1", "--listen", f"{HOST}:{port}", "--management",
                                       f"{HOST}:{mgmt}", "--store", url])
            wait_for_port(proc, mgmt, timeout=300)
            conn = http.client.HTTPConnection(HOST, mgmt, timeout=300)
            pids = management_pids(proc.pid, mgmt)
            names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                     .decode(errors="replace")[:60] for pid in pids}
            status, headers, body = request(conn, "GET", "/api/v1/hosts")
            etag = headers.get("ETag", "")

            def plain() -> int:
                return len(request(conn, "GET", "/api/v1/hosts")[2])

            def conditional() -> int:
                status, _, data = request(conn, "GET", "/api/v1/hosts",
                                          {"If-None-Match": etag})
                answered.add(status)
                return len(data)

            def changed() -> int:
                rule = {"action": "static", "body": str(time.monotonic())}
                request(conn, "PUT", "/api/v1/hosts/h0.example",
                        {"Content-Type": "application/json"}, json.dumps(rule).encode())
                cpu0 = cpu_seconds(pids)
                size = len(request(conn, "GET", "/api/v1/hosts")[2])
                changed_cpu.append(cpu_seconds(pids) - cpu0)
                return size

            changed_cpu: list[float] = []
            answered: set[int] = set()
            rows = [("plain GET, unchanged", measure(pids, args.polls, plain)),
                    ("If-None-Match, unchanged", measure(pids, args.polls, conditional))]
            measure(pids, args.polls, changed)
            last = request(conn, "GET", "/api/v1/hosts", {"If-None-Match": etag})[0]
        finally:
            procs.stop_all()
            os.chdir(ROOT)
    print(f"{args.hosts} hosts, {args.store} store, {args.polls} polls each, "
          f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}; first answer {status}, "
          f"{len(body) / 1e6:.1f} MB, ETag {etag or '(none)'}; If-None-Match answered "
          f"{sorted(answered)}, a stale one {last}")
    print("  measured: " + "; ".join(f"{pid} {name}" for pid, name in names.items()))
    for name, (cpu_ms, wall_ms, size) in rows:
        print(f"  {name:28} {cpu_ms:7.1f} ms CPU/poll  {wall_ms:7.1f} ms wall/poll  "
              f"{size / 1e6:.2f} MB")
    print(f"  {'GET after a one-host write':28} {sum(changed_cpu) * 1000 / len(changed_cpu):7.1f}"
          f" ms CPU/poll (the GET alone)")


if __name__ == "__main__":
    main()
