"""The balancer's memory per process, idle and with requests in flight.

``python scripts/bench_memory.py [--workers 1] [--no-scrape] [--in-flight 1000 [--after 12]]
[--user nobody]``

Starts ``balancer serve`` (file store, the tree on PYTHONPATH: run it from a
compiled copy for compiled figures), reads ``/metrics`` and ``/api/v1/stats``
once (not with ``--no-scrape``), then prints each process's Rss, Pss and
Private_Dirty (``/proc/PID/smaps_rollup``) and the whole tree's Pss: the
memory the balancer costs the machine, pages shared between processes
counted once. Its part in anonymous memory (Pss_Anon: the processes' own
objects and copies) moves less from run to run than the whole, whose
shared libraries' pages are split with every other process mapping them.
With ``--in-flight N`` it then holds N requests in flight (a backend that
reads them and answers only at the end) and prints the worker's growth per
request, and with ``--after S`` its Rss S seconds after they ended (a worker
gives a burst's memory back once it is quiet: `Worker.quiet_loop`, every 10
s). ``--user`` runs it as `server.user` (needs root). Run it from a directory
without a ``balancer`` package (e.g. /tmp): ``python -m balancer`` puts the
working directory on the path before PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this tree's loadtest (the balancer comes from PYTHONPATH)

from loadtest.measure import rollup_kb as rollup  # noqa: E402
from loadtest.procs import free_port  # noqa: E402
from loadtest.reaper import guarded_popen  # noqa: E402

HOST = "127.0.0.1"


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


class Backend:
    """Accepts connections and never answers until `answer`."""

    def __init__(self) -> None:
        self.sock = socket.create_server((HOST, 0), backlog=4096)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        threading.Thread(target=self.accept_loop, daemon=True).start()

    def accept_loop(self) -> None:
        while True:
            try:
                self.held.append(self.sock.accept()[0])
            except OSError:
                return

    def answer(self) -> None:
        for conn in self.held:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.sock.close()


def start(args: argparse.Namespace, tmp: Path, backend: Backend) -> tuple[subprocess.Popen, int,
                                                                       int]:
    routes = tmp / "routes.json"
    routes.write_text(json.dumps({"version": 1, "hosts": {"*": {
        "action": "proxy", "backends": [f"{HOST}:{backend.port}"]}}}))
    port, mgmt = free_port(), free_port()
    argv = [sys.executable, "-m", "balancer", "serve", "--workers", str(args.workers),
            "--listen", f"{HOST}:{port}", "--management", f"{HOST}:{mgmt}",
            "--store", f"file:{routes}"]
    if args.user:
        tmp.chmod(0o777)  # the run user writes beside the routes file
        config = tmp / "balancer.toml"
        config.write_text(f'[server]\nuser = "{args.user}"\n')
        argv += ["--config", str(config)]
    proc = guarded_popen(argv, stderr=subprocess.PIPE, text=True)  # gone if this one is
    assert proc.stderr is not None
    while "for management" not in (line := proc.stderr.readline()):
        if not line:
            raise SystemExit(f"balancer serve exited {proc.wait()}")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # never blocks on a full pipe
    return proc, port, mgmt


def report(arbiter: int, workers: set[int]) -> None:
    pids = [arbiter, *children(arbiter)]
    for pid in pids:
        role = "arbiter" if pid == arbiter else "worker" if pid in workers else "management"
        f = rollup(pid)
        print(f"{role:10} {pid:>7}: Rss {f['Rss'] / 1024:5.1f} MiB, Pss {f['Pss'] / 1024:5.1f} "
              f"(Pss_Anon {f['Pss_Anon'] / 1024:5.1f}), Private {f['Private'] / 1024:5.1f} "
              f"(Private_Dirty {f['Private_Dirty'] / 1024:5.1f}), Shared {f['Shared'] / 1024:5.1f}")
    tree = [rollup(p) for p in pids]
    print(f"tree Pss {sum(f['Pss'] for f in tree) / 1024:.1f} MiB, Pss_Anon "
          f"{sum(f['Pss_Anon'] for f in tree) / 1024:.1f}, Private_Dirty "
          f"{sum(f['Private_Dirty'] for f in tree) / 1024:.1f}")


def hold(port: int, worker: int, backend: Backend, count: int, after: float) -> None:
    before = rollup(worker)["Rss"]
    clients = []
    for _ in range(count):
        client = socket.create_connection((HOST, port))
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        clients.append(client)
    deadline = time.monotonic() + 30
    while len(backend.held) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    during = rollup(worker)["Rss"]
    print(f"worker Rss {before / 1024:.1f} MiB idle, {during / 1024:.1f} MiB with "
          f"{len(backend.held)} requests in flight: "
          f"{(during - before) / max(1, len(backend.held)):.1f} KiB each")
    backend.answer()
    for client in clients:
        client.recv(4096)  # the answer: the request is over
        client.close()
    if after:
        time.sleep(after)
        print(f"worker Rss {rollup(worker)['Rss'] / 1024:.1f} MiB {after:g} s after they ended")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--no-scrape", action="store_true",
                        help="read neither /metrics nor /api/v1/stats first")
    parser.add_argument("--in-flight", type=int, default=0, metavar="N")
    parser.add_argument("--after", type=float, default=0.0, metavar="S")
    parser.add_argument("--user", default="", help="server.user (as root)")
    args = parser.parse_args()
    backend = Backend()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        proc, port, mgmt = start(args, Path(tmp), backend)
        try:
            for path in () if args.no_scrape else ("/metrics", "/api/v1/stats"):
                urllib.request.urlopen(f"http://{HOST}:{mgmt}{path}", timeout=10).read()
            info = json.loads(urllib.request.urlopen(f"http://{HOST}:{mgmt}/api/v1/info",
                                                     timeout=10).read())
            workers = {p["pid"] for p in info["processes"]}
            time.sleep(1.0)
            report(proc.pid, workers)
            if args.in_flight:
                hold(port, min(workers), backend, args.in_flight, args.after)
        finally:
            proc.terminate()
            proc.wait(15)
    os._exit(0)  # the backend's accept thread


if __name__ == "__main__":
    main()
