"""Proxy speed against HAProxy: the benchmark of issues 2 and 4.

``python scripts/bench_proxy.py [--rounds 3] [--duration 8] [--connections 100[,1000]]
[--modes keep-alive[,close][,varied]] [--targets direct,haproxy,haproxy-master,bare,balancer,
balancer-log,haproxy-tls,balancer-tls,baseline,baseline-tls] [--workers 1] [--baseline TREE]
[--settle S]``

nginx (one worker) serves the suite's 4.5 KB page; every target proxies to
it over keep-alive connections and is measured with
``wrk -t1 -cN -dS --latency``, the targets taking turns within each round so
that a noisy machine shifts them all alike. Each round runs every listed
connection count in every client mode: ``keep-alive`` (wrk's default) and
``close`` (``Connection: close``: a new client connection per request, the
cost of accepting and closing), and on request ``varied`` (keep-alive, each
request a different target through a wrk Lua script: no request head repeats
the one before it on its connection). Targets:

* ``direct``: nginx alone (the ceiling);
* ``haproxy``: HAProxy ``nbthread 1`` (``nbthread N`` with ``--workers N``),
  ``http-reuse always``, one process (``haproxy -db``): the reference every
  ratio is taken against;
* ``haproxy-master``: the same in master-worker mode (``haproxy -W -db``: a
  master process and its worker, as Debian's systemd unit runs it with
  ``-Ws``), for the memory of a whole HAProxy process tree; not run unless
  named;
* ``bare``: scripts/bare_relay.py, gevent + httptools with no features;
* ``balancer``: ``balancer serve --workers 1`` (``--workers N``), file store,
  access log off;
* ``balancer-log``: the same with ``--access-log FILE`` and /metrics scraped
  every second (the "everything on" configuration of issue 4);
* ``haproxy-tls`` and ``balancer-tls``: HTTPS in front (TLS 1.3, the same
  ECDSA P-256 certificate, made here with `cryptography`, and Mozilla's
  intermediate ciphers), HAProxy ``nbthread 1`` against ``balancer --workers 1``
  (N with ``--workers N``).
  With ``close`` every request is a new TLS connection: wrk does a full
  handshake each time (no session resumption), so req/s is handshakes/s.
* ``baseline``: ``balancer`` run from another tree (``--baseline TREE``, e.g.
  a built copy of main), to compare two versions in the same run;
  ``baseline-tls``: ``balancer-tls`` run from that tree.

Besides requests/s it reports the CPU time each target used per request
(µs, from /proc over the target's process tree, split into user space and
kernel), which moves much less than requests/s when other work shares the
machine, and at the end each target's peak memory: the peak resident set
(VmHWM) of each of its processes over the whole run (a balancer's workers are
its children that used the most CPU, the management process the other one,
the arbiter the parent; forked processes share pages, so their peaks overlap)
and the proportional set size (Pss, shared pages split) of the whole tree at
the end, with each process's Pss, its anonymous part (Pss_Anon), Private and
Shared (``/proc/PID/smaps_rollup``); with ``--settle S`` read again S seconds
later (a quiet worker gives a burst's memory back every 10 s).

Run it from a directory without a ``balancer`` package (e.g. /tmp): ``python
-m balancer`` puts the working directory first on the path, before
PYTHONPATH, so a source tree there would be served instead of a compiled copy.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from balancer.certificates import make_record  # noqa: E402
from balancer.settings_kinds import MOZILLA_INTERMEDIATE  # noqa: E402
from balancer.stores.file import FileStore  # noqa: E402
from loadtest import configs  # noqa: E402
from loadtest.measure import _status_kb, cpu_split, process_tree, pss_kb, rollup_kb  # noqa: E402
from loadtest.page import PAGE  # noqa: E402
from loadtest.procs import Proc, Processes, free_port, wait_for_port  # noqa: E402
from loadtest.reaper import stat_fields  # noqa: E402
from loadtest.routes import RouteFile, proxy_rule  # noqa: E402

HOST = "127.0.0.1"
TARGETS = ("direct", "haproxy", "haproxy-master", "bare", "balancer", "balancer-log",
           "haproxy-tls", "balancer-tls", "baseline", "baseline-tls")
NAMED_ONLY = ("haproxy-master",)  # not among the default targets
TLS_NAME = "bench.test"  # the certificate's name, served to wrk (no SNI) as the default
NOFILE = 4096


@dataclass
class Started:
    """A running target: its port, its process, and the management port to
    scrape /metrics on while it is measured (None: no scraping); a balancer's
    management port, `management`."""

    port: int
    proc: Proc
    scrape_port: int | None = None
    scheme: str = "http"
    management: int | None = None


def start_nginx(procs: Processes, root: Path) -> Started:
    port, dir = free_port(), root / "nginx"
    dir.mkdir()
    conf = dir / "nginx.conf"
    conf.write_text(configs.nginx_backend(dir, port, PAGE, NOFILE))
    proc = procs.start("nginx", ["nginx", "-p", str(dir), "-c", str(conf),
                                 "-e", str(dir / "error.log"), "-g", "daemon off;"])
    wait_for_port(proc, port)
    return Started(port, proc)


def start_target(name: str, procs: Processes, root: Path, backend: int,
                 workers: int = 1, baseline: str | None = None) -> Started:
    """Start target `name` in front of nginx on `backend` (`workers` worker
    processes, or HAProxy threads; `baseline`: the tree the baseline runs from)."""
    port, dir = free_port(), root / name
    dir.mkdir()
    addr = f"{HOST}:{backend}"
    scrape_port = mgmt = None
    scheme = "https" if name.endswith("-tls") else "http"
    if name in ("haproxy", "haproxy-master", "haproxy-tls"):
        conf = dir / "haproxy.cfg"
        text = configs.haproxy(port, [addr], NOFILE, 2000, threads=workers)
        if scheme == "https":
            pem = dir / "cert.pem"
            chain, key = tls_certificate()
            pem.write_text(chain + key)
            text = text.replace(f"bind 127.0.0.1:{port}\n",
                                f"bind 127.0.0.1:{port} ssl crt {pem} alpn http/1.1 "
                                f"ssl-min-ver TLSv1.2 ciphers {MOZILLA_INTERMEDIATE}\n")
        conf.write_text(text)
        argv = ["haproxy", *(["-W"] if name == "haproxy-master" else []), "-db", "-f", str(conf)]
    elif name == "bare":
        argv = [sys.executable, str(ROOT / "scripts" / "bare_relay.py"),
                "--listen", f"{HOST}:{port}", "--backend", addr]
    else:
        routes = RouteFile(dir / "routes.json", {"*": proxy_rule([addr])})
        mgmt = free_port()
        argv = [sys.executable, "-m", "balancer", "serve", "--workers", str(workers),
                "--listen", f"{HOST}:{port}", "--management", f"{HOST}:{mgmt}",
                "--store", f"file:{routes.path}"]
        if scheme == "https":
            chain, key = tls_certificate()
            FileStore(str(routes.path)).certs().put(TLS_NAME, make_record(TLS_NAME, chain, key))
            plain, port = port, free_port()
            argv[argv.index(f"{HOST}:{plain}")] = f"{HOST}:{free_port()}"
            argv += ["--tls-listen", f"{HOST}:{port}"]
            env_config = dir / "balancer.toml"
            env_config.write_text(f'[tls]\ndefault_host = "{TLS_NAME}"\n')
            argv += ["--config", str(env_config)]
        if name == "balancer-log":
            argv += ["--access-log", str(dir / "access.log")]
            scrape_port = mgmt
    env = None
    if name.startswith("baseline") and baseline:  # -P: not the current directory's tree first
        argv.insert(1, "-P")
        env = {"PYTHONPATH": baseline}
    proc = procs.start(name, argv, env)
    wait_for_port(proc, port)
    return Started(port, proc, scrape_port, scheme, mgmt)


_CERTIFICATE: list[tuple[str, str]] = []


def tls_certificate() -> tuple[str, str]:
    """One self-signed ECDSA P-256 certificate for TLS_NAME (chain PEM, key PEM),
    the same for every TLS target of the run."""
    if not _CERTIFICATE:
        from tests.tlsca import TestCA

        chain, key = TestCA("bench CA").issue(TLS_NAME)
        _CERTIFICATE.append((chain, key))
    return _CERTIFICATE[0]


def scrape_loop(port: int, stop: threading.Event) -> None:
    """GET /metrics once a second until `stop` (what a busy Prometheus does)."""
    while not stop.wait(1.0):
        try:
            urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5).read()
        except OSError as exc:
            print(f"  scrape failed: {exc}", file=sys.stderr)


MODES = ("keep-alive", "close", "varied")
# `varied`: keep-alive, every request a different target (a counter in the query), so
# that no request head repeats the one before on its connection and every head is
# parsed and rewritten whole (the balancer remembers a connection's repeated head).
VARIED_SCRIPT = """counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, "/index.html?n=" .. counter)
end
"""


def run_wrk(port: int, connections: int, duration: int, mode: str,
            scheme: str = "http") -> tuple[float, str]:
    header = ["-H", "Connection: close"] if mode == "close" else []
    if mode == "varied":
        script = Path(tempfile.gettempdir()) / "bench_proxy_varied.lua"
        script.write_text(VARIED_SCRIPT)
        header = ["-s", str(script)]
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", *header,
         f"{scheme}://{HOST}:{port}/index.html"],
        capture_output=True, text=True, timeout=duration + 30, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", out)
    return rps, errors.group(0) if errors else ""


def measure(target: Started, connections: int, mode: str, duration: int) -> dict:
    pids = process_tree(target.proc.pid)
    stop = threading.Event()
    scraper = None
    if target.scrape_port is not None:
        scraper = threading.Thread(target=scrape_loop, args=(target.scrape_port, stop),
                                   daemon=True)
        scraper.start()
    (user0, sys0), t0 = cpu_split(pids), time.monotonic()
    rps, errors = run_wrk(target.port, connections, duration, mode, target.scheme)
    user1, sys1 = cpu_split(pids)
    user, system = user1 - user0, sys1 - sys0
    cpu = user + system
    wall = time.monotonic() - t0
    stop.set()
    if scraper is not None:
        scraper.join()
    requests = rps * duration
    per_request = 1e6 / requests if requests else 0.0
    return {"rps": rps, "cpu_us": cpu * per_request, "user_us": user * per_request,
            "sys_us": system * per_request, "core": cpu / wall, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    parser.add_argument("--connections", default="100",
                        help="comma-separated connection counts (e.g. 100,1000)")
    parser.add_argument("--modes", default="keep-alive",
                        help=f"comma-separated client modes, of {', '.join(MODES)}")
    parser.add_argument("--targets",
                        default=",".join(t for t in TARGETS if t not in NAMED_ONLY))
    parser.add_argument("--workers", type=int, default=1,
                        help="balancer worker processes and HAProxy threads (nbthread)")
    parser.add_argument("--baseline", metavar="TREE",
                        help="the source tree the baseline target runs from (PYTHONPATH)")
    parser.add_argument("--settle", type=float, default=0.0, metavar="S",
                        help="also read each process's memory S seconds after the last round")
    args = parser.parse_args()
    if args.workers < 1:
        parser.error("--workers: at least 1")
    names = [n for n in args.targets.split(",") if n]
    unknown = set(names) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}; expected some of {TARGETS}")
    if any(n.startswith("baseline") for n in names) != bool(args.baseline):
        parser.error("the baseline targets and --baseline TREE go together")
    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - set(MODES):
        parser.error(f"--modes: expected some of {MODES}, got {args.modes!r}")
    try:
        counts = [int(c) for c in args.connections.split(",") if c]
    except ValueError:
        parser.error(f"--connections: expected numbers like 100,1000, got {args.connections!r}")
    if not counts or min(counts) < 1 or max(counts) > NOFILE // 2:
        parser.error(f"--connections: each count must be 1..{NOFILE // 2}")
    cases = [(c, m) for c in counts for m in modes]
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        root = Path(tmp)
        procs = Processes(root / "logs")
        try:
            nginx = start_nginx(procs, root)
            started = {"direct": nginx}
            for name in names:
                if name != "direct":
                    started[name] = start_target(name, procs, root, nginx.port, args.workers,
                                                 args.baseline)
            results = {(case, name): [] for case in cases for name in names}
            for round_ in range(1, args.rounds + 1):
                for case, name in results:
                    figures = measure(started[name], *case, args.duration)
                    results[case, name].append(figures)
                    print(f"round {round_} {case[0]:5} {case[1]:10} {name:13} "
                          f"{figures['rps']:9,.0f} req/s "
                          f"{figures['cpu_us']:6.1f} µs CPU/req (user {figures['user_us']:5.1f}, "
                          f"kernel {figures['sys_us']:5.1f})  {figures['core']:4.2f} cores "
                          f"{figures['errors']}", flush=True)
            memory = {name: peak_memory(started[name], args.workers) for name in names}
            if args.settle:
                time.sleep(args.settle)
                settled = {name: peak_memory(started[name], args.workers) for name in names}
        finally:
            procs.stop_all()
    summarize(results)
    print("\npeak memory (MiB): VmHWM per process over the run; Pss of the whole tree at the end")
    for name, (peaks, pss, _) in memory.items():
        print(f"{name:13} " + ", ".join(f"{role} {kb / 1024:.1f}" for role, kb in peaks)
              + f"; tree Pss {pss / 1024:.1f}")
    print_ends("at the end", memory)
    if args.settle:
        print_ends(f"{args.settle:g} s after the end", settled)


def print_ends(when: str, memory: dict[str, Memory]) -> None:
    print(f"\nmemory {when} (MiB): per process Pss (its anonymous part) / Private / Shared; "
          f"the tree's Pss")
    for name, (_, pss, ends) in memory.items():
        print(f"{name:13} " + ", ".join(
            f"{role} {f['Pss'] / 1024:.1f} ({f['Pss_Anon'] / 1024:.1f}) / "
            f"{f['Private'] / 1024:.1f} / {f['Shared'] / 1024:.1f}" for role, f in ends)
              + f"; tree Pss {pss / 1024:.1f}")


Memory = tuple[list[tuple[str, int]], int, list[tuple[str, dict[str, int]]]]


def peak_memory(target: Started, workers: int) -> Memory:
    """[(role, VmHWM KiB)] of the target's processes, the Pss (KiB) of the
    whole tree now, and [(role, smaps_rollup KiB now)]. Roles: the parent, then
    its children by CPU used (a balancer's `workers` busiest children are its
    workers)."""
    root, pids = target.proc.pid, process_tree(target.proc.pid)
    children = sorted((pid for pid in pids if pid != root), key=_cpu_ticks, reverse=True)
    roles = [("parent" if children else "process", root)]
    roles += [("worker" if i < workers else "other child", pid)
              for i, pid in enumerate(children)]
    if len(children) == workers + 1:
        roles = [("arbiter", root), *roles[1:-1], ("management", children[-1])]
    ends = [(role, rollup_kb(pid)) for role, pid in roles]
    return ([(role, _status_kb(pid, "VmHWM")) for role, pid in roles],
            pss_kb(pids), ends)


def _cpu_ticks(pid: int) -> int:
    fields = stat_fields(pid)
    return int(fields[11]) + int(fields[12]) if fields else 0


def summarize(results: dict[tuple[tuple[int, str], str], list[dict]]) -> None:
    print("\nconns mode       target         median req/s   median µs CPU/req   "
          "per-round ratio to haproxy (TLS targets: to haproxy-tls)")
    for (case, name), rows in results.items():
        rps = statistics.median(r["rps"] for r in rows)
        cpu = statistics.median(r["cpu_us"] for r in rows)
        ratios = ""
        reference = results.get((case, "haproxy-tls" if name.endswith("-tls") else "haproxy"))
        if reference:
            pairs = zip(rows, reference, strict=True)
            ratios = " ".join(f"{r['rps'] / h['rps']:.2f}" for r, h in pairs)
        print(f"{case[0]:5} {case[1]:10} {name:13} {rps:13,.0f} {cpu:19.1f}   {ratios}")


if __name__ == "__main__":
    main()
