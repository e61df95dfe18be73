"""What each process of `balancer serve` imports, which is most of its memory
(`balancer.preload`, docs/performance.md): the arbiter and the workers never
import the management process's modules, nor `redis` on a file store; the
management process imports cryptography only once a certificate needs it,
the ACME client only once it issues, prometheus-client only once it is
scraped, werkzeug's development server and test client never; no child
scans the installed packages' metadata for gevent's plugins (the arbiter
found them); no module is imported by two children after fork (the arbiter
imports it once); once they are ready the arbiter holds less files' code than
any of them (`balancer.heap.release_file_pages`). The processes are real: an
audit hook (tests/import_audit) writes what each one imports, and which entry
points files it reads, to a file per pid, after fork included."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from balancer.preload import DATA_PLANE, needed
from balancer.settings import load_settings
from management.process import CHILD
from tests.support import ROOT, Backend, Balancer, request, wait_for
from tests.tlsca import TestCA

HOST = "app.test"
MANAGEMENT_ONLY = {"werkzeug", "prometheus_client", "management", "acme", "josepy",
                   "requests", "cryptography"}
REDIS = {"redis", "hiredis"}
ON_FIRST_USE = {"acme", "josepy", "requests", "cryptography",  # management, lazily
                "prometheus_client"}
ARBITER_NEVER = {"importlib.metadata", "csv", "tomllib", "difflib",
                 "gevent.pywsgi"}  # the management process's WSGI server
# no child starts a process: `subprocess` is not patched (`balancer.preload.patch`),
# so nobody imports gevent's (nor what it brings) on a file store
NOBODY = {"subprocess", "gevent.subprocess", "pickle"}
# what werkzeug's and prometheus-client's package `__init__`s import for what the
# API never uses (`management.process.parts_only`): their HTTP servers, werkzeug's
# test client, prometheus-client's push gateway client and metric classes
UNUSED_PARTS = {"werkzeug.serving", "werkzeug.test", "http.server", "socketserver",
                "wsgiref", "urllib.request", "prometheus_client.exposition",
                "prometheus_client.metrics"}


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend("memory")
    yield b
    b.stop()


def imported(audit: Path, pid: int, kind: str = "imports") -> set[str]:
    """The modules process `pid` imported itself (nothing: it found them all
    loaded); with `kind` "metadata", the entry points files it read."""
    path = audit / f"{kind}-{pid}.txt"
    return set(path.read_text().split()) if path.exists() else set()


def packages(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def children(pid: int) -> set[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return {int(p) for p in text.split()}


def read_only_file_kib(pid: int) -> int:
    """The resident KiB of process `pid`'s read-only file mappings."""
    total, read_only = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line.startswith("Rss:") and read_only:
                total += int(line.split()[1])
            elif not line[0].isupper():
                fields = line.split()
                read_only = "w" not in fields[1] and len(fields) > 5 and fields[5][0] == "/"
    return total


def audited_balancer(tmp_path: Path, backend: Backend, workers: int) -> tuple[Path, Balancer]:
    """A balancer proxying `HOST` to `backend` whose processes note their imports and
    collector state in the returned directory (tests/import_audit)."""
    audit = tmp_path / "imports"
    audit.mkdir()
    return audit, Balancer(
        tmp_path, {HOST: {"action": "proxy", "backends": [backend.address]}},
        args=["--workers", str(workers)],
        prefix=["env", f"PYTHONPATH={ROOT}:{ROOT / 'tests' / 'import_audit'}",
                f"IMPORT_AUDIT_DIR={audit}"])


def test_each_process_imports_only_what_it_serves(tmp_path: Path, backend: Backend) -> None:
    audit, bal = audited_balancer(tmp_path, backend, workers=2)
    try:
        assert request(bal.port, host=HOST)[0] == 200
        for path in ("/api/v1/stats", "/api/v1/certs", "/api/v1/acme"):
            assert bal.api("GET", path)[0] == 200, path
        workers = {p["pid"] for p in wait_for(lambda: bal.api("GET", "/api/v1/info")[1],
                                              what="info")["processes"]}
        arbiter = bal.proc.pid
        (management,) = children(arbiter) - workers
        assert len(workers) == 2
        assert "prometheus_client" not in packages(imported(audit, management))
        status, metrics = bal.api("GET", "/metrics")  # the first scrape imports it
        assert status == 200 and b"balancer_requests_total" in metrics, metrics
        assert "prometheus_client" in packages(imported(audit, management))
        assert not imported(audit, management) & UNUSED_PARTS
        for child in (*workers, management):  # gevent's plugins: found by the arbiter
            assert not imported(audit, child, "metadata"), child

        loaded = imported(audit, arbiter)
        # the data plane, shared with every child (what `balancer.server` imports:
        # importlib.import_module itself raises no "import" audit event)
        assert {"balancer.actions", "balancer.health", "balancer.tls"} <= loaded
        assert not packages(loaded) & (MANAGEMENT_ONLY | REDIS), sorted(loaded)
        # what only start-up needs: `importlib.metadata` (`balancer.entry_points`
        # reads the packages' metadata without it), the TOML parser without a config file
        assert not loaded & ARBITER_NEVER, sorted(loaded & ARBITER_NEVER)
        for worker in workers:
            assert not packages(imported(audit, worker)) & (MANAGEMENT_ONLY | REDIS)
            assert "gevent.pywsgi" not in imported(audit, worker)
        for worker in workers:  # what every child imports, the arbiter imported once
            assert not imported(audit, worker) & imported(audit, management), worker
        own = packages(imported(audit, management))
        assert {"werkzeug", "prometheus_client", "management"} <= own  # after fork
        assert "gevent.pywsgi" in imported(audit, management)
        assert not own & ((ON_FIRST_USE - {"prometheus_client"}) | REDIS), sorted(own)

        chain, key = TestCA().issue(HOST)  # a certificate: now cryptography is needed
        assert bal.api("PUT", f"/api/v1/certs/{HOST}", {"chain": chain, "key": key})[0] == 200
        own = packages(imported(audit, management))
        assert "cryptography" in own and not own & {"acme", "josepy", "requests"}
        for pid in (arbiter, *workers, management):
            assert not imported(audit, pid) & NOBODY, (pid, imported(audit, pid) & NOBODY)
        # it imported everything they run, and more to start: unreleased
        # (`balancer.heap.release_file_pages`) it held more files' code than any
        wait_for(lambda: read_only_file_kib(arbiter) < min(
            map(read_only_file_kib, (*workers, management))), what="files' pages released")
        assert "Traceback" not in bal.output()
    finally:
        bal.stop()


def collector_on(audit: Path, pid: int, since: float) -> list[tuple[str, int]]:
    """Process `pid`'s forks, connects and first imports since `since` (monotonic
    time), each with whether its garbage collector was on (tests/import_audit)."""
    path = audit / f"gc-{pid}.txt"
    lines = path.read_text().split("\n") if path.exists() else []
    return [(event, int(on)) for when, event, on in map(str.split, filter(None, lines))
            if float(when) > since]


def worker_pids(bal: Balancer) -> set[int]:
    return {p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]}


def test_every_process_runs_with_the_collector_on(tmp_path: Path, backend: Backend) -> None:
    """Start-up pauses the garbage collector (`balancer.cli.main`, the management
    process's set-up) and `balancer.preload.freeze` turns it on again: off in a
    process that runs for months, its cyclic garbage would never be freed. The
    last thing each process did (a worker connecting to a backend, the
    management process importing the exporter, the arbiter forking a worker
    again) it did with the collector on."""
    audit, bal = audited_balancer(tmp_path, backend, workers=1)
    try:
        (old,) = wait_for(lambda: worker_pids(bal), what="the worker")
        (management,) = children(bal.proc.pid) - {old}
        since = time.monotonic()
        assert request(bal.port, host=HOST)[0] == 200
        assert bal.api("GET", "/metrics")[0] == 200
        os.kill(old, signal.SIGKILL)
        (new,) = wait_for(lambda: worker_pids(bal) - {old}, what="another worker")
        assert request(bal.port, host=HOST)[0] == 200
        for pid in (bal.proc.pid, management, old, new):
            done = collector_on(audit, pid, since)
            assert done and done[-1][1] == 1, (pid, done)
    finally:
        bal.stop()


def test_the_arbiter_loads_the_configured_store_and_management_only_when_dropping() -> None:
    on_file = needed(load_settings({}, {}, None), CHILD.modules, dropping=False)
    assert set(DATA_PLANE) <= set(on_file) and "balancer.stores.file" in on_file
    assert "balancer.stores.redis" not in on_file and "management.app" not in on_file
    on_redis = needed(load_settings({"store.url": "redis://127.0.0.1:1/0"}, {}, None),
                      CHILD.modules, dropping=False)
    assert "balancer.stores.redis" in on_redis and "balancer.stores.file" not in on_redis
    dropping = needed(load_settings({}, {}, None), CHILD.modules, dropping=True)
    assert set(CHILD.modules) <= set(dropping)
    assert {"tomllib", "difflib"} <= set(dropping)  # a reload's, after the drop


def readable_by_others(path: Path) -> bool:
    """Whether any user can read `path` (its directories searchable by all)."""
    return bool(path.stat().st_mode & 0o004) and \
        all(d.stat().st_mode & 0o001 for d in path.parents)


def reload_to(bal: Balancer, config: str) -> None:
    (bal.tmp / "balancer.toml").write_text(config)
    bal.proc.send_signal(signal.SIGHUP)


def test_a_reload_with_a_mistake_names_the_closest_setting(tmp_path: Path,
                                                          backend: Backend) -> None:
    """The arbiter imports difflib only once a setting needs naming: a reload
    whose config file misspells one keeps the running settings and names the
    setting meant."""
    audit = tmp_path / "imports"
    audit.mkdir()
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [backend.address]}},
                   config="[server]\nworkers = 1\n",
                   prefix=["env", f"PYTHONPATH={ROOT}:{ROOT / 'tests' / 'import_audit'}",
                           f"IMPORT_AUDIT_DIR={audit}"])
    try:
        assert request(bal.port, host=HOST)[0] == 200
        assert "difflib" not in imported(audit, bal.proc.pid)
        reload_to(bal, "[server]\nworkerz = 2\n")
        wait_for(lambda: "SIGHUP: keeping the running settings: server.workerz" in bal.output(),
                 timeout=10, what="the reload refused")
        assert "(did you mean server.workers?)" in bal.output()
        assert "difflib" in imported(audit, bal.proc.pid)
        assert request(bal.port, host=HOST)[0] == 200
        assert bal.api("GET", "/api/v1/info")[1]["arbiter"]["generation"] == 1
        assert "Traceback" not in bal.output()
    finally:
        bal.stop()


def test_a_reload_to_the_redis_store_imports_it(tmp_path: Path, backend: Backend,
                                                 redis_server: Any) -> None:
    """Started on a file store (no `redis` anywhere), reloaded onto Redis: the
    arbiter imports it then, and the new workers and management process use it."""
    audit = tmp_path / "imports"
    audit.mkdir()
    config = f'[store]\nurl = "file:{tmp_path / "routes.json"}"\n'
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [backend.address]}},
                   config=config, store="",
                   prefix=["env", f"PYTHONPATH={ROOT}:{ROOT / 'tests' / 'import_audit'}",
                           f"IMPORT_AUDIT_DIR={audit}"])
    try:
        assert request(bal.port, host=HOST)[0] == 200
        assert not packages(imported(audit, bal.proc.pid)) & REDIS
        reload_to(bal, f'[store]\nurl = "{redis_server.url}"\nnamespace = "memory-reload"\n')
        wait_for(lambda: bal.api("GET", "/api/v1/info")[1]["store"]["kind"] == "redis",
                 timeout=20, what="the new management process")
        assert "redis" in packages(imported(audit, bal.proc.pid))
        rule = {"action": "empty", "status": 204}
        table = {"hosts": {"r.test": rule}}  # whole: the new store is behind the served table
        wait_for(lambda: bal.api("PUT", "/api/v1/hosts", table)[0] == 200, timeout=20,
                 what="a write through the new management process")
        wait_for(lambda: request(bal.port, host="r.test")[0] == 204, timeout=20,
                 what="the rule served from Redis")
        assert redis_server.client().keys("memory-reload:*")
        assert "Traceback" not in bal.output()
    finally:
        bal.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")
def test_a_reload_to_a_store_the_dropped_arbiter_cannot_import_is_refused(
        backend: Backend) -> None:
    """Dropped to `nobody`, the arbiter may no longer read the Python installation
    (here under /root, mode 0700): a reload onto Redis, whose module it did not
    import at start (a file store), keeps the running settings and says why."""
    if readable_by_others(Path(redis.__file__)):
        pytest.skip("the redis package is readable by any user here")
    base = Path(tempfile.mkdtemp(prefix="balancer-memory-"))
    try:
        base.chmod(0o777)  # the run user writes the routes file here
        config = f'[server]\nuser = "nobody"\n[store]\nurl = "file:{base / "routes.json"}"\n'
        bal = Balancer(base, {HOST: {"action": "proxy", "backends": [backend.address]}},
                       config=config, store="")
        try:
            reload_to(bal, config.replace(f"file:{base / 'routes.json'}",
                                          "redis://127.0.0.1:1/0"))
            wait_for(lambda: "SIGHUP: keeping the running settings: cannot import "
                             "balancer.stores.redis" in bal.output(), timeout=10,
                     what="the reload refused")
            assert request(bal.port, host=HOST)[0] == 200
            assert bal.api("GET", "/api/v1/info")[1]["arbiter"]["generation"] == 1
            assert "Traceback" not in bal.output()
        finally:
            bal.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


PATCH_ALL = """
import sys, warnings
from balancer.entry_points import look_up
from balancer.preload import gevent_plugin_groups, resolve_gevent_plugins
if sys.argv[1] == "resolved":
    resolve_gevent_plugins(look_up(gevent_plugin_groups()))
read = []
sys.addaudithook(lambda event, args: read.append(args[0]) if event == "open"
                 and str(args[0]).endswith("entry_points.txt") else None)
from gevent import monkey
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    monkey.patch_all(os=False)  # gevent's own plugin warns about signal without os
print(len(read), any("signal but not os" in str(w.message) for w in caught))
"""


@pytest.mark.parametrize("how", ["resolved", "scanned"])
def test_patching_calls_the_plugins_the_arbiter_resolved(how: str) -> None:
    """`monkey.patch_all` after `resolve_gevent_plugins` still calls gevent's
    plugins (its own warns when signal is patched without os) and reads no
    package's metadata; without it, each of its events scans every package."""
    done = subprocess.run([sys.executable, "-c", PATCH_ALL, how], capture_output=True,
                          text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    read, warned = done.stdout.split()
    assert warned == "True"
    assert (int(read) == 0) == (how == "resolved"), read


def test_a_scrape_without_an_importable_exporter_is_answered_503(tmp_path: Path,
                                                                  backend: Backend) -> None:
    """prometheus-client cannot be imported (here a broken package shadows it):
    the first scrape answers 503 metrics_unavailable, says why in the log, and
    the management process goes on answering, a second scrape too."""
    broken = tmp_path / "shadow" / "prometheus_client"
    broken.mkdir(parents=True)
    for module in ("__init__", "metrics_core", "utils"):  # (the first runs no `__init__`)
        (broken / f"{module}.py").write_text('raise ImportError("a broken installation")\n')
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [backend.address]}},
                   prefix=["env", f"PYTHONPATH={ROOT}:{broken.parent}"])
    try:
        for _ in range(2):
            status, body = bal.api("GET", "/metrics")
            assert status == 503 and body["error"] == "metrics_unavailable", body
            assert "a broken installation" in body["message"]
        assert bal.api("GET", "/api/v1/stats")[0] == 200
        assert request(bal.port, host=HOST)[0] == 200
        wait_for(lambda: "metrics: cannot import the Prometheus exporter: a broken "
                         "installation" in bal.output(), what="the log line")
        assert "Traceback" not in bal.output()
    finally:
        bal.stop()


# A request in flight: what a worker holds per request waiting for its backend
# (docs/performance.md, "requests in flight"). This test measured 15.4 KiB
# compiled and 13.4 interpreted before the backend connection became the OS
# socket (main 0c62f12): the bound fails that code on either build. Measured
# 2026-12-06 (main c25508e and 79949d8, 400 requests, 2 cores under other
# runs' load): compiled 4.4-4.9 KiB (a `setup.py build_ext --inplace` copy,
# and main's install), interpreted 5.8-6.0 (a worktree: alone, in the whole
# suite under -n 2, and in a fresh copy without __pycache__, as scripts/test.sh
# made then); ~0.1 MiB of it is paid once (10 requests: 9-13 KiB each). The build
# measured is the balancer's own (its start-up line), named in a failure.
IN_FLIGHT = 400
IN_FLIGHT_BOUND_KIB = 12.0
BUILD_RE = re.compile(r"data plane (compiled|interpreted)")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError(f"no Rss for {pid}")


class Holder:
    """A backend that accepts every connection and never answers."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.held.append(self.listener.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()


def test_a_request_in_flight_costs_the_worker_a_few_kib(tmp_path: Path) -> None:
    """Requests held by a backend that does not answer: the worker's Rss grows
    by less than IN_FLIGHT_BOUND_KIB per request (its greenlet's saved C stack,
    the client and backend connections' objects; no gevent socket, no frame
    stack chunk per greenlet)."""
    holder = Holder()
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [holder.address]}})
    clients: list[socket.socket] = []
    try:
        (worker,) = [p["pid"] for p in wait_for(lambda: bal.api("GET", "/api/v1/info")[1],
                                                  what="info")["processes"]]
        before = rss_kib(worker)
        for _ in range(IN_FLIGHT):
            client = socket.create_connection(("127.0.0.1", bal.port))
            client.sendall(b"GET / HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n\r\n")
            clients.append(client)
        wait_for(lambda: len(holder.held) == IN_FLIGHT, what="every request at the backend")
        # each request's greenlet waits for its answer once the request went out
        wait_for(lambda: bal.host_stats(HOST)["open_requests"] == IN_FLIGHT,
                 what="every request in flight")
        growth = (rss_kib(worker) - before) / IN_FLIGHT
        build = BUILD_RE.search(bal.output())
        assert build, f"no build in the balancer's start-up lines:\n{bal.output()}"
        assert growth < IN_FLIGHT_BOUND_KIB, (f"{growth:.1f} KiB per request in flight "
                                              f"({build[1]})")
    finally:
        for client in clients:
            client.close()
        holder.close()
        bal.stop()
