"""The process model through real processes: arbiter, workers, signals, privileges.

Every balancer here runs with several workers; the load generator is a few
threads of keep-alive `http.client` connections that retry nothing: any
exception or unexpected status is a failed request.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import pwd
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from balancer.backoff import Backoff
from tests.support import Balancer, metric, request, wait_for

HOST = "app.test"


# helpers ------------------------------------------------------------------------
class Load:
    """`threads` clients sending GETs back to back until `stop`; nothing is retried.

    Each client keeps its connection alive for `per_connection` requests, then
    opens a new one (so new connections keep reaching every worker)."""

    def __init__(self, port: int, threads: int = 4, path: str = "/",
                 per_connection: int = 20) -> None:
        self.port, self.path, self.per_connection = port, path, per_connection
        self.ok = 0
        self.failures: list[str] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self.client_loop, daemon=True)
                        for _ in range(threads)]
        for thread in self.threads:
            thread.start()

    def client_loop(self) -> None:
        conn, sent = None, 0
        while not self.done.is_set():
            if conn is None:
                conn, sent = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10), 0
            try:
                conn.request("GET", self.path, headers={"Host": HOST})
                resp = conn.getresponse()
                body = resp.read()
                outcome = None if resp.status == 200 and b'"backend"' in body else \
                    f"status {resp.status}: {body[:80]!r}"
            except (OSError, http.client.HTTPException) as exc:
                outcome = repr(exc)
                resp = None
            with self.lock:
                if outcome is None:
                    self.ok += 1
                else:
                    self.failures.append(outcome)
            sent += 1
            if resp is None or resp.will_close or sent >= self.per_connection:
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def wait_ok(self, count: int, what: str) -> None:
        wait_for(lambda: self.ok >= count, timeout=20, what=what)

    def stop(self) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(15)
        assert not any(t.is_alive() for t in self.threads), "load threads did not stop"


def info(bal: Balancer) -> dict[str, Any]:
    status, body = bal.api("GET", "/api/v1/info")
    assert status == 200, body
    return body


def wait_workers(bal: Balancer, count: int, replacing: set[int] = frozenset(),
                 timeout: float = 30.0) -> list[int]:
    """Pids of `count` loaded, non-draining workers, none of them in `replacing`."""
    def serving() -> list[int] | None:
        procs = [p for p in info(bal)["processes"] if not p["draining"]]
        pids = [p["pid"] for p in procs if p["loaded"]]
        if len(procs) == count and len(pids) == count and not set(pids) & replacing:
            return pids
        return None
    return wait_for(serving, timeout=timeout, what=f"{count} workers serving")


def per_worker(bal: Balancer, key: str) -> dict[int, int]:
    return {p["pid"]: p[key] for p in info(bal)["processes"]}


def is_gone(pid: int) -> bool:
    return not os.path.exists(f"/proc/{pid}")


def host_stats(bal: Balancer) -> dict[str, Any]:
    return bal.api("GET", "/api/v1/stats")[1]["hosts"].get(HOST, {})


def status_ids(pid: int) -> dict[str, list[int]]:
    """Uid, Gid (real, effective, saved, fs) and Groups of a process."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Uid", "Gid", "Groups"):
            fields[key] = [int(v) for v in value.split()]
    return fields


def open_paths(pid: int) -> set[str]:
    """The paths a process has open now."""
    paths = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            paths.add(os.readlink(fd))
    return paths


def children_of(pid: int) -> list[int]:
    """Pids whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@pytest.fixture
def cluster(tmp_path, backend):
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [backend.address]}},
                   args=["--workers", "2"])
    yield bal
    bal.stop()


# reload, crash, stop ------------------------------------------------------------
@pytest.mark.slow
def test_sighup_rereads_settings_and_replaces_workers_without_a_failed_request(
        tmp_path, backend):
    config = "[server]\nworkers = 2\n"
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [backend.address]}},
                   config=config)
    try:
        old = set(wait_workers(bal, 2))
        load = Load(bal.port)
        load.wait_ok(200, "traffic before the reload")
        (tmp_path / "balancer.toml").write_text("[server]\nworkers = 3\n")
        bal.proc.send_signal(signal.SIGHUP)
        new = wait_workers(bal, 3, replacing=old)
        wait_for(lambda: all(map(is_gone, old)), timeout=15, what="old workers to exit")
        served = load.ok
        load.wait_ok(served + 200, "traffic after the reload")
        # ~10 new connections per 200 requests: which worker accepts each is the
        # kernel's choice, so give every new worker time to get one
        wait_for(lambda: all(n > 0 for n in per_worker(bal, "completed_requests").values()),
                 timeout=15, what="every new worker to take traffic")
        load.stop()
        assert load.failures == []
        assert info(bal)["arbiter"]["generation"] == 2
        # the retired workers' counters are kept: totals never go backwards
        assert host_stats(bal)["completed_requests"] == load.ok
        assert len(new) == 3 and bal.stop() == 0
    finally:
        bal.stop()


def test_sigkill_of_a_worker_under_load_fails_no_request(tmp_path, backend):
    """The victim holds no client connection when it dies (it is stopped before
    the load starts): a worker's death must cost nothing but what it held, the
    listener stays open, and the replacement takes new connections. With one
    shared socket (`reuseport = false`): with a socket per worker, the stopped
    victim's share of new connections waits for it (tests/test_reuseport.py)."""
    cluster = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [backend.address]}},
                       args=["--workers", "2"], config="[server]\nreuseport = false\n")
    victim, survivor = wait_workers(cluster, 2)
    os.kill(victim, signal.SIGSTOP)
    load = Load(cluster.port, per_connection=10)
    try:
        load.wait_ok(200, "traffic on the surviving worker")
        os.kill(victim, signal.SIGKILL)
        replacement = next(p for p in wait_workers(cluster, 2, replacing={victim})
                           if p != survivor)
        wait_for(lambda: per_worker(cluster, "completed_requests").get(replacement, 0) > 20,
                 timeout=20, what="the replacement to take new connections")
    finally:
        load.stop()
        cluster.stop()
    assert load.failures == []
    assert "unexpectedly" in cluster.output()


def test_sigterm_finishes_in_flight_requests_and_exits_within_graceful(tmp_path, backend):
    graceful = 6.0
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [backend.address]}},
                   args=["--workers", "2"], env={"BALANCER_TIMEOUTS_GRACEFUL": str(graceful)})
    wait_workers(bal, 2)
    idle = http.client.HTTPConnection("127.0.0.1", bal.port, timeout=10)
    idle.request("GET", "/", headers={"Host": HOST})
    assert idle.getresponse().read()
    results: list[Any] = []

    def slow_request() -> None:
        try:
            results.append(request(bal.port, path="/slow?s=1.5", host=HOST, timeout=20)[0])
        except OSError as exc:
            results.append(repr(exc))

    threads = [threading.Thread(target=slow_request) for _ in range(6)]
    for thread in threads:
        thread.start()
    wait_for(lambda: host_stats(bal).get("open_requests") == 6, what="6 requests in flight")
    started = time.monotonic()
    bal.proc.send_signal(signal.SIGTERM)
    code = bal.proc.wait(graceful + 5)
    elapsed = time.monotonic() - started
    for thread in threads:
        thread.join(10)
    assert results == [200] * 6
    assert code == 0 and elapsed < graceful
    assert idle.sock.recv(1) == b"", "an idle keep-alive connection is closed by the drain"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", bal.port), timeout=2)
    idle.close()
    bal.stop()


def test_sigquit_stops_at_once(cluster):
    pids = wait_workers(cluster, 2)
    results: list[Any] = []

    def slow_request() -> None:
        try:
            results.append(request(cluster.port, path="/slow?s=5", host=HOST, timeout=20)[0])
        except (OSError, http.client.HTTPException) as exc:
            results.append(type(exc).__name__)

    thread = threading.Thread(target=slow_request)
    thread.start()
    wait_for(lambda: host_stats(cluster).get("open_requests") == 1, what="a request in flight")
    started = time.monotonic()
    cluster.proc.send_signal(signal.SIGQUIT)
    assert cluster.proc.wait(10) == 0
    assert time.monotonic() - started < 3
    thread.join(10)
    assert results and results[0] != 200
    assert all(map(is_gone, pids))


def test_sigusr1_reopens_the_access_log_in_every_worker(tmp_path, backend):
    log_path = tmp_path / "access.log"
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [backend.address]}},
                   args=["--workers", "2", "--access-log", str(log_path)])
    try:
        pids = wait_workers(bal, 2)
        request(bal.port, host=HOST)
        wait_for(lambda: log_path.read_text().count("\n") == 1, what="the first log line")
        rotated = tmp_path / "access.log.1"
        os.rename(log_path, rotated)
        assert all(open_paths(p) & {str(rotated)} for p in pids)
        bal.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: not any(open_paths(p) & {str(rotated)} for p in pids),
                 what="every worker to reopen the access log")
        before = per_worker(bal, "completed_requests")
        load = Load(bal.port, per_connection=1)
        wait_for(lambda: all(per_worker(bal, "completed_requests")[p] > before[p] + 5
                             for p in pids), timeout=20, what="traffic on both workers")
        load.stop()
        assert load.failures == []
        rotated_lines = len(rotated.read_text().splitlines())
        wait_for(lambda: log_path.exists() and
                 len(log_path.read_text().splitlines()) == load.ok,
                 what="every request after SIGUSR1 in the new file")
        assert len(rotated.read_text().splitlines()) == rotated_lines
    finally:
        bal.stop()


def test_a_dead_management_process_is_replaced(cluster):
    wait_workers(cluster, 2)
    manager = info(cluster)["arbiter"]["pid"]
    mgmt = [p for p in children_of(manager) if p not in per_worker(cluster, "pid")]
    assert len(mgmt) == 1
    os.kill(mgmt[0], signal.SIGKILL)
    wait_for(lambda: info(cluster)["arbiter"]["recent_crashes"] == 1, timeout=20,
             what="the management API back")
    assert request(cluster.port, host=HOST)[0] == 200


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_an_idle_cluster_sleeps(cluster):
    """The arbiter's loop waits on signals and children; idle workers wait on sockets."""
    pids = [cluster.proc.pid, *children_of(cluster.proc.pid)]
    wait_workers(cluster, 2)
    before = {pid: cpu_seconds(pid) for pid in pids}
    time.sleep(2.0)
    used = {pid: cpu_seconds(pid) - before[pid] for pid in pids}
    assert all(seconds < 0.2 for seconds in used.values()), used


# one view over all workers ------------------------------------------------------
def test_stats_and_metrics_sum_every_worker(cluster):
    pids = wait_workers(cluster, 2)
    sent = received = 0
    lock = threading.Lock()

    def client(count: int) -> None:
        nonlocal sent, received
        for i in range(count):
            body = b"x" * i
            data = (b"POST /slow?s=0.01 HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            with socket.create_connection(("127.0.0.1", cluster.port), timeout=10) as sock:
                sock.sendall(data)
                got = b""
                while chunk := sock.recv(65536):
                    got += chunk
            assert got.startswith(b"HTTP/1.1 200")
            with lock:
                sent, received = sent + len(body), received + len(got)

    threads = [threading.Thread(target=client, args=(25,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    def counted() -> dict[int, int] | None:  # each worker's totals are a second old at most
        per = per_worker(cluster, "completed_requests")
        return per if sum(per.values()) == 200 else None
    per = wait_for(counted, what="200 requests in info's per-worker totals")
    assert set(per) == set(pids) and all(n > 0 for n in per.values()), per
    stats = host_stats(cluster)
    assert stats["completed_requests"] == 200 and stats["responses"]["2xx"] == 200
    assert stats["bytes_received"] == sent and stats["bytes_sent"] == received
    series = cluster.metrics()
    assert metric(series, "balancer_requests_total", code="200", host=HOST) == 200
    assert metric(series, "balancer_bytes_sent_total", host=HOST) == received
    assert metric(series, "balancer_request_duration_seconds_count", host=HOST) == 200


def test_reload_and_spin_reach_every_worker(cluster, backend):
    pids = wait_workers(cluster, 2)
    status, _ = cluster.api("PUT", f"/api/v1/hosts/{HOST}", {"action": "spin", "timeout": 30})
    assert status == 200
    version = cluster.api("POST", "/api/v1/reload")[1]["version"]
    assert all(p["version"] == version for p in info(cluster)["processes"])
    results: list[int] = []

    def held() -> None:
        results.append(request(cluster.port, host=HOST, timeout=30)[0])

    threads: list[threading.Thread] = []

    def held_on_both() -> bool:
        if all(per_worker(cluster, "open_requests")[p] for p in pids):
            return True
        threads.append(threading.Thread(target=held))
        threads[-1].start()
        return False

    wait_for(held_on_both, timeout=20, interval=0.2, what="requests held in both workers")
    cluster.api("PUT", f"/api/v1/hosts/{HOST}", {"action": "proxy",
                                                 "backends": [backend.address]})
    for thread in threads:
        thread.join(10)
    assert results == [200] * len(threads)


# privileges and bad input -------------------------------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")
def test_privilege_drop_in_arbiter_and_workers(backend):
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="balancer-priv-"))
    base.chmod(0o777)  # the run user writes the routes file here
    bal = Balancer(base, {HOST: {"action": "proxy", "backends": [backend.address]}},
                   args=["--workers", "2"], config='[server]\nuser = "nobody"\n')
    try:
        workers = wait_workers(bal, 2)
        everyone = [bal.proc.pid, *children_of(bal.proc.pid)]
        assert set(workers) < set(everyone) and len(everyone) == 4
        for pid in everyone:
            ids = status_ids(pid)
            assert ids["Uid"] == [nobody.pw_uid] * 4, (pid, ids)
            assert ids["Gid"] == [nobody.pw_gid] * 4, (pid, ids)
            assert ids["Groups"] in ([], [nobody.pw_gid]), (pid, ids)
        assert request(bal.port, host=HOST)[0] == 200
        assert bal.api("PUT", "/api/v1/hosts/x.test", {"action": "empty", "status": 204})[0] \
            == 200
        wait_for(lambda: request(bal.port, host="x.test")[0] == 204, what="a rule written")
        # the exporter's modules, unreadable after the drop, were imported whole before it
        # (`balancer.preload`; a process that has them skips `management.process.parts_only`)
        assert "balancer_requests_total{" in bal.metrics_text()
        assert bal.stop() == 0
    finally:
        bal.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.parametrize("config,named", [
    ('[server]\nuser = "no-such-user-zz"\n', "server.user"),
    ('[server]\ngroup = "no-such-group-zz"\n', "server.group"),
    ("[server]\nworkers = -2\n", "server.workers"),
])
def test_bad_process_settings_exit_before_forking(tmp_path, config, named):
    path = tmp_path / "b.toml"
    path.write_text(config)
    result = run_serve(["--config", str(path), "--listen", "127.0.0.1:0",
                        "--management", "127.0.0.1:0"], tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("balancer: ") and named in lines[0]


def test_unbindable_listener_exits_before_forking(tmp_path):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = run_serve(["--workers", "2", "--listen", f"127.0.0.1:{port}",
                            "--management", "127.0.0.1:0"], tmp_path)
    finally:
        taken.close()
    assert result.returncode == 1
    problems = [line for line in result.stderr.splitlines() if line.startswith("balancer:")]
    assert problems == [f"balancer: server.listen: cannot listen on 127.0.0.1:{port}: Address "
                        f"already in use (another process listens there: stop it, or give "
                        f"another address: --listen, BALANCER_SERVER_LISTEN, [server] listen)"]
    assert "Traceback" not in result.stderr


def test_unwritable_access_log_exits_naming_it(tmp_path):
    result = run_serve(["--workers", "2", "--listen", "127.0.0.1:0", "--management",
                        "127.0.0.1:0", "--access-log", str(tmp_path / "no" / "dir.log")],
                       tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("balancer: log.access_log: ")


def run_serve(args: list[str], cwd: Path):
    import subprocess
    import sys

    from tests.support import ROOT

    env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "balancer", "serve", "--store",
                           f"file:{cwd}/r.json", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=30)


# units --------------------------------------------------------------------------
def test_backoff_doubles_and_reports_a_crash_loop():
    backoff = Backoff(window=60, loop_after=5, first=0.5, longest=4)
    delays = [backoff.record(100.0 + i) for i in range(7)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert backoff.is_looping() and backoff.not_before == 106.0 + 4.0
    calm = Backoff(window=60)
    calm.record(0.0)
    assert calm.record(61.0) == 0.0 and not calm.is_looping()


def test_retired_counters_are_neutral_gauges():
    from balancer.control import counters_only
    from balancer.stats import Stats, merge_snapshots

    stats = Stats()
    host = stats.host(HOST)
    host.open_requests = 1
    host.finish(200, 10, 20, 0.001)
    host.backend("127.0.0.1:1").in_flight = 2
    host.backend("127.0.0.1:1").tunnels = 1  # of in_flight: a gauge too
    stats.open_connections, stats.routing_version, stats.store_up = 3, 7, 0
    live = Stats().snapshot() | {"routing_version": 9, "store_up": 1}
    merged = merge_snapshots([live, counters_only(json.loads(json.dumps(stats.snapshot())))])
    assert merged["routing_version"] == 9 and merged["store_up"] == 1
    assert merged["open_connections"] == 0
    assert merged["hosts"][HOST]["completed_requests"] == 1
    assert merged["hosts"][HOST]["open_requests"] == 0
    assert merged["hosts"][HOST]["backends"]["127.0.0.1:1"]["in_flight"] == 0
    assert merged["hosts"][HOST]["backends"]["127.0.0.1:1"]["tunnels"] == 0


def test_identity_resolution():
    from balancer.privileges import PrivilegeError, resolve

    nobody = pwd.getpwnam("nobody")
    assert resolve("", "") is None
    named = resolve("nobody", "")
    assert (named.uid, named.gid) == (nobody.pw_uid, nobody.pw_gid)
    assert resolve(str(nobody.pw_uid), "0").gid == 0
    with pytest.raises(PrivilegeError, match="server.group"):
        resolve("54321", "")  # a bare uid has no primary group to take
    with pytest.raises(PrivilegeError, match="server.user"):
        resolve("no-such-user-zz", "")
