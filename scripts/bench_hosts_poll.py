"""What polling ``GET /api/v1/hosts`` costs the management process on a big table.

``python scripts/bench_hosts_poll.py [--hosts 100000] [--polls 20] [--store file|redis]
[--clients 8]``

A real ``balancer serve`` (one worker) over a store of `--hosts` proxy hosts
(a file store, or a Redis on a free loopback port started here). Then, each
measured as the management process's CPU seconds (arbiter and management
process, from /proc) per request:

1. plain polls: `--polls` GETs of the unchanged table, as a dashboard polled
   before it sent ``If-None-Match``;
2. conditional polls: `--polls` GETs with ``If-None-Match`` naming the
   version answered (304 once the API answers conditional GETs);
3. changed polls: `--polls` times one host written, then the table fetched
   (the whole body encoded anew);
4. the same after a write another balancer made (a store opened here, from the
   tree on ``PYTHONPATH``, writes one host);
5. `--clients` GETs sent at once right after a one-host write through the API,
   and after another balancer's: the CPU of all of them together, and the wall
   time until the last answer.

6. backend edits: `--polls` times a backend added to one host and removed
   again through the API (``POST``/``DELETE /api/v1/hosts/HOST/backends``),
   CPU per edit; then the same, each edit right after another's write (this
   balancer's table behind the store when it writes);
7. deploys: `max(1, --polls / 4)` deploys of one host each to a backend
   started here (no warmup, a drain of at most 1 s), CPU per deploy from the
   ``POST`` to its end.

Then the management process's memory (``/proc/PID/smaps_rollup``: Rss, Pss,
Pss_Anon): at the end of the polls (a table read, its answer encoded), and
after one more write that no read followed.

Run it under ``flock /tmp/bench.lock``; the balancer runs from a temporary
directory, so ``PYTHONPATH`` decides which tree runs.
"""

from __future__ import annotations

import argparse
import http.client
import http.server
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadtest.measure import rollup_kb  # noqa: E402
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
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
        conn.close()  # closed idle (the management server's keep-alive timeout): again
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


class Ready(http.server.BaseHTTPRequestHandler):
    """A new backend for the deploys: ready at once."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def measure(pids: list[int], polls: int, step: object) -> tuple[float, float, int]:
    """(management CPU ms per poll, wall ms per poll, last body size)."""
    cpu, wall, size = cpu_seconds(pids), time.perf_counter(), 0
    for _ in range(polls):
        size = step()  # type: ignore[operator]
    return ((cpu_seconds(pids) - cpu) * 1000 / polls, (time.perf_counter() - wall) * 1000 / polls,
            size)


class Poller:
    """The measured polls of one running balancer (`mgmt`: its management port)."""

    def __init__(self, mgmt: int, pids: list[int], url: str, clients: int) -> None:
        self.mgmt, self.pids, self.clients = mgmt, pids, clients
        self.conn = http.client.HTTPConnection(HOST, mgmt, timeout=300)
        from balancer.stores import open_store  # the tree on PYTHONPATH: another balancer

        self.other = open_store(url)
        self.etag = ""
        self.answered: set[int] = set()
        self.after: list[float] = []  # CPU seconds of each GET after a write

    def get(self, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
        status, _, data = request(self.conn, "GET", "/api/v1/hosts", headers)
        return status, data

    def plain(self) -> int:
        return len(self.get()[1])

    def conditional(self) -> int:
        status, data = self.get({"If-None-Match": self.etag})
        self.answered.add(status)
        return len(data)

    def write(self, by_api: bool) -> None:
        rule = {"action": "static", "body": str(time.monotonic())}
        if by_api:
            request(self.conn, "PUT", "/api/v1/hosts/h0.example",
                    {"Content-Type": "application/json"}, json.dumps(rule).encode())
        else:
            self.other.put_host("h0.example", rule)

    def changed(self, by_api: bool) -> int:
        self.write(by_api)
        cpu0 = cpu_seconds(self.pids)
        size = len(self.get()[1])
        self.after.append(cpu_seconds(self.pids) - cpu0)
        return size

    def at_once(self, by_api: bool) -> tuple[float, float]:
        """(CPU ms, wall ms) of `clients` GETs sent together right after a write."""
        self.write(by_api)
        conns = [http.client.HTTPConnection(HOST, self.mgmt, timeout=300)
                 for _ in range(self.clients)]
        for conn in conns:
            conn.connect()
        go = threading.Barrier(self.clients + 1)

        def one(conn: http.client.HTTPConnection) -> None:
            go.wait()
            request(conn, "GET", "/api/v1/hosts")
            conn.close()
        threads = [threading.Thread(target=one, args=(c,)) for c in conns]
        for thread in threads:
            thread.start()
        cpu0 = cpu_seconds(self.pids)
        go.wait()
        wall = time.perf_counter()
        for thread in threads:
            thread.join()
        return (cpu_seconds(self.pids) - cpu0) * 1000, (time.perf_counter() - wall) * 1000

    def api(self, method: str, path: str, body: object = None) -> Any:
        """A management call that must succeed; its answer."""
        data = json.dumps(body).encode() if body is not None else None
        status, _, answer = request(self.conn, method, path,
                                    {"Content-Type": "application/json"}, data)
        if status not in (200, 202):
            raise SystemExit(f"{method} {path}: {status} {answer[:200]!r}")
        return json.loads(answer)

    def edit(self, after_other: bool = False) -> int:
        """A backend added to a host and removed again: two backend edits (each right
        after another balancer's write, `after_other`: this one's table behind)."""
        extra = f"{HOST}:1"
        if after_other:
            self.write(False)
        self.api("POST", "/api/v1/hosts/h1.example/backends", {"address": extra})
        if after_other:
            self.write(False)
        self.api("DELETE", f"/api/v1/hosts/h1.example/backends/{extra}")
        return 0

    def deploy(self, n: int, backend: str) -> float:
        """The CPU seconds of a deploy of host `n` to `backend`, from its start to its
        end."""
        cpu0 = cpu_seconds(self.pids)
        started = self.api("POST", f"/api/v1/hosts/h{n}.example/deploy",
                           {"backends": [backend], "ready_timeout": 10, "warmup": 0,
                            "drain_timeout": 1})
        path = f"/api/v1/deploys/{started['deploy']['id']}"
        deadline = time.monotonic() + 120
        while (record := self.api("GET", path)["deploy"])["state"] == "running":
            if time.monotonic() > deadline:
                raise SystemExit(f"deploy of h{n}.example did not end: {record}")
            time.sleep(0.05)
        if record["state"] != "done":
            raise SystemExit(f"deploy of h{n}.example: {record}")
        return cpu_seconds(self.pids) - cpu0

    def writes(self, polls: int) -> list[tuple[str, str]]:
        """The rows of backend edits and deploys."""
        rows = []
        for name, after_other in (("backend edit", False),
                                  ("backend edit after another's", True)):
            cpu_ms, wall_ms, _ = measure(self.pids, polls, lambda a=after_other: self.edit(a))
            rows.append((name, f"{cpu_ms / 2:7.1f} ms CPU/edit  {wall_ms / 2:7.1f} ms "
                               f"wall/edit"))
        server = http.server.ThreadingHTTPServer((HOST, 0), Ready)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            runs = [self.deploy(n, f"{HOST}:{server.server_address[1]}")
                    for n in range(2, 2 + max(1, polls // 4))]
        finally:
            server.shutdown()
        rows.append(("deploy, start to end", f"{sum(runs) * 1000 / len(runs):7.1f} ms "
                                             f"CPU/deploy"))
        return rows

    def rows(self, polls: int) -> list[tuple[str, str]]:
        """The measured rows: a name and what was measured."""
        rows = []
        for name, step in (("plain GET, unchanged", self.plain),
                           ("If-None-Match, unchanged", self.conditional)):
            cpu_ms, wall_ms, size = measure(self.pids, polls, step)
            rows.append((name, f"{cpu_ms:7.1f} ms CPU/poll  {wall_ms:7.1f} ms wall/poll  "
                               f"{size / 1e6:.2f} MB"))
        for name, by_api in (("GET after a one-host write", True),
                             ("GET after another's write", False)):
            self.after = []
            _, wall_ms, _ = measure(self.pids, polls, lambda b=by_api: self.changed(b))
            rows.append((name, f"{sum(self.after) * 1000 / len(self.after):7.1f} ms CPU/poll "
                               f"(the GET alone), {wall_ms:7.1f} ms wall with the write"))
        for name, by_api in ((f"{self.clients} GETs at once, API write", True),
                             (f"{self.clients} GETs at once, another's", False)):
            runs = [self.at_once(by_api) for _ in range(max(1, polls // 4))]
            cpu = sum(r[0] for r in runs) / len(runs)
            wall = sum(r[1] for r in runs) / len(runs)
            rows.append((name, f"{cpu:7.1f} ms CPU together, {wall:7.1f} ms until the last "
                               f"answer ({cpu / self.clients:.1f} ms CPU each)"))
        return rows


def memory(pid: int) -> str:
    kb = rollup_kb(pid)
    return (f"Rss {kb['Rss'] / 1024:.1f} MiB, Pss {kb['Pss'] / 1024:.1f} MiB, "
            f"Pss_Anon {kb['Pss_Anon'] / 1024:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=100000)
    parser.add_argument("--polls", type=int, default=20)
    parser.add_argument("--store", choices=("file", "redis"), default="file")
    parser.add_argument("--clients", type=int, default=8)
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
            pids = management_pids(proc.pid, mgmt)
            names = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                     .decode(errors="replace")[:60] for pid in pids}
            poller = Poller(mgmt, pids, url, args.clients)
            status, headers, body = request(poller.conn, "GET", "/api/v1/hosts")
            poller.etag = headers.get("ETag", "")
            rows = poller.rows(args.polls) + poller.writes(args.polls)
            last = poller.get({"If-None-Match": poller.etag})[0]
            management = pids[-1]  # the arbiter's child that is no worker
            read = memory(management)
            poller.write(True)
            written = memory(management)
        finally:
            procs.stop_all()
            os.chdir(ROOT)
    print(f"{args.hosts} hosts, {args.store} store, {args.polls} polls each, "
          f"PYTHONPATH={os.environ.get('PYTHONPATH', '')}; first answer {status}, "
          f"{len(body) / 1e6:.1f} MB, ETag {poller.etag or '(none)'}; If-None-Match answered "
          f"{sorted(poller.answered)}, a stale one {last}")
    print("  measured: " + "; ".join(f"{pid} {name}" for pid, name in names.items()))
    for name, figures in rows:
        print(f"  {name:28} {figures}")
    print(f"  management process {management}: after the polls {read}; after one more "
          f"write, not read: {written}")


if __name__ == "__main__":
    main()
