"""Hostile probes of the operator and process side, through real processes.

Signals (a SIGHUP storm under load, a reload with broken settings, SIGTERM in
the middle of a reload, a worker killed again and again), the per-worker
control sockets (who may connect; garbage, a huge frame, silence, a trickle,
a command whose value no check foresaw), hostile bytes on their way to the
access log in each format and to the operator log, /metrics under many
distinct Host headers and paths, and the management token. Each case ends
with the balancer still serving and nothing lost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.control import CONTROL_TIMEOUT
from tests.support import Backend, Balancer, control_socket, raw_exchange, request, wait_for
from tests.test_diagnosis import pipelined
from tests.test_process import Load, children_of, info, is_gone, wait_workers

HOST = "app.test"
TOKEN = "probe-ops-token-0123456789"


def routes(backend: Any) -> dict[str, Any]:
    return {HOST: {"action": "proxy", "backends": [backend.address]}}


def no_traceback(bal: Balancer) -> None:
    out = bal.output()
    assert "Traceback" not in out, out[-3000:]


@pytest.fixture(scope="module")
def module_backend() -> Iterator[Backend]:
    b = Backend("a")
    yield b
    b.stop()


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory, module_backend):
    """One 1-worker balancer for the probes that leave it as they found it (each
    refused, or reading only): ~0.6 CPU-s a start saved, eight times."""
    bal = Balancer(tmp_path_factory.mktemp("probe-ops"), routes(module_backend),
                   args=["--workers", "1"])
    yield bal
    bal.stop()


@pytest.fixture(scope="module")
def with_token(tmp_path_factory, module_backend):
    """The same with `TOKEN` as its management token."""
    bal = Balancer(tmp_path_factory.mktemp("probe-ops-token"), routes(module_backend),
                   args=["--workers", "1"], env={"BALANCER_MANAGEMENT_TOKEN": TOKEN})
    yield bal
    bal.stop()


# signals ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_sighup_storm_under_load_loses_nothing_and_converges(tmp_path, backend):
    bal = Balancer(tmp_path, routes(backend), config="[server]\nworkers = 2\n")
    load = None
    try:
        old = set(wait_workers(bal, 2))
        load = Load(bal.port)
        load.wait_ok(100, "traffic before the storm")
        for _ in range(50):
            bal.proc.send_signal(signal.SIGHUP)
            time.sleep(0.005)
        wait_workers(bal, 2, replacing=old, timeout=40)
        # the tree converges: 2 workers and the management process, nothing draining
        wait_for(lambda: len(children_of(bal.proc.pid)) == 3 and all(map(is_gone, old)),
                 timeout=30, what="the process tree back to 3 children")
        served = load.ok
        load.wait_ok(served + 100, "traffic after the storm")
        load.stop()
        assert load.failures == []
        reloads = bal.output().count("SIGHUP: settings re-read")
        # signals that came while the arbiter was busy act once per turn of its loop
        assert 1 <= reloads < 50
        assert info(bal)["arbiter"]["generation"] == 1 + reloads
        no_traceback(bal)
        assert bal.stop() == 0
    finally:
        if load is not None:
            load.stop()
        bal.stop()


@pytest.mark.parametrize("broken, why", [
    ("[server\nworkers = 2\n", "keeping the running settings"),
    ("[server]\nworkers = -3\n", "workers"),
    ("[server]\nworkers = 2\n[log]\naccess_log = \"/nonexistent-dir/x/access.log\"\n",
     "access.log"),
])
def test_a_reload_with_broken_settings_keeps_serving_and_says_why(tmp_path, backend,
                                                                  broken, why):
    bal = Balancer(tmp_path, routes(backend), config="[server]\nworkers = 2\n")
    try:
        pids = set(wait_workers(bal, 2))
        (tmp_path / "balancer.toml").write_text(broken)
        bal.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: keeping the running settings" in bal.output(),
                 what="the refused reload to be logged")
        line = next(x for x in bal.output().splitlines() if "keeping the running" in x)
        assert why in line
        assert info(bal)["arbiter"]["generation"] == 1
        assert set(wait_workers(bal, 2)) == pids
        assert request(bal.port, host=HOST)[0] == 200
        # fixed, the next SIGHUP applies
        (tmp_path / "balancer.toml").write_text("[server]\nworkers = 1\n")
        bal.proc.send_signal(signal.SIGHUP)
        wait_workers(bal, 1, replacing=pids, timeout=20)
        assert request(bal.port, host=HOST)[0] == 200
        no_traceback(bal)
    finally:
        bal.stop()


def test_sigterm_in_the_middle_of_a_reload_finishes_requests_and_exits(tmp_path, backend):
    bal = Balancer(tmp_path, routes(backend), args=["--workers", "2"],
                   env={"BALANCER_TIMEOUTS_GRACEFUL": "6"})
    results: list[Any] = []
    try:
        pids = wait_workers(bal, 2)

        def slow() -> None:
            try:
                results.append(request(bal.port, path="/slow?s=1", host=HOST, timeout=15)[0])
            except OSError as exc:
                results.append(repr(exc))

        threads = [threading.Thread(target=slow) for _ in range(4)]
        for thread in threads:
            thread.start()
        wait_for(lambda: bal.host_stats(HOST).get("open_requests") == 4,
                 what="4 requests in flight")
        children = set(children_of(bal.proc.pid))
        bal.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: set(children_of(bal.proc.pid)) - children, timeout=10,
                 what="the reload to fork a replacement")
        bal.proc.send_signal(signal.SIGTERM)
        assert bal.proc.wait(12) == 0
        for thread in threads:
            thread.join(10)
        assert results == [200] * 4
        forked = set(children_of(bal.proc.pid)) | children
        wait_for(lambda: all(map(is_gone, forked | set(pids))), timeout=5,
                 what="every child gone")
        no_traceback(bal)
    finally:
        bal.stop()


def test_a_worker_killed_again_and_again_restarts_with_a_bounded_logged_backoff(
        tmp_path, backend):
    bal = Balancer(tmp_path, routes(backend), args=["--workers", "2"])
    try:
        killed: set[int] = set()
        for _ in range(4):
            pids = wait_workers(bal, 2, replacing=killed, timeout=20)
            victim = max(pids)
            os.kill(victim, signal.SIGKILL)
            killed.add(victim)
        wait_workers(bal, 2, replacing=killed, timeout=20)
        delays = [float(line.rsplit(" in ", 1)[1].split()[0])
                  for line in bal.output().splitlines()
                  if "killed by SIGKILL unexpectedly; restarting it in" in line]
        assert delays == [0.0, 0.5, 1.0, 2.0]  # doubling, capped at 30 s (backoff.py)
        assert info(bal)["arbiter"]["recent_crashes"] == 4
        assert request(bal.port, host=HOST)[0] == 200
    finally:
        bal.stop()


def test_a_killed_arbiter_takes_its_children_along(tmp_path, backend):
    """SIGKILL of the arbiter (an OOM kill, `kill -9` of the wrong pid): its
    workers and management process notice and stop, none is left serving."""
    bal = Balancer(tmp_path, routes(backend), args=["--workers", "2"])
    try:
        wait_workers(bal, 2)
        children = children_of(bal.proc.pid)
        assert len(children) == 3
        os.kill(bal.proc.pid, signal.SIGKILL)
        bal.proc.wait(5)
        wait_for(lambda: all(map(is_gone, children)), timeout=10,
                 what="every child of the killed arbiter to exit")
        assert bal.output().count("is gone; stopping") == 3
    finally:
        bal.stop()


def test_sigusr2_to_the_arbiter_is_ignored_and_said_so(tmp_path, backend):
    """SIGUSR2 is HAProxy's reload (master-worker) and nginx's binary upgrade, so an
    operator may send it to the arbiter. Bug: its default action killed the arbiter,
    and with it the whole balancer, in-flight requests and all."""
    bal = Balancer(tmp_path, routes(backend), args=["--workers", "2"])
    try:
        wait_workers(bal, 2)
        children = set(children_of(bal.proc.pid))
        results: list[Any] = []
        slow = threading.Thread(target=lambda: results.append(
            request(bal.port, path="/slow?s=1", host=HOST, timeout=10)[0]))
        slow.start()
        bal.proc.send_signal(signal.SIGUSR2)
        wait_for(lambda: "SIGUSR2: ignored" in bal.output(), what="the SIGUSR2 line")
        slow.join(10)
        assert results == [200]
        assert bal.proc.poll() is None
        assert request(bal.port, host=HOST)[0] == 200
        assert set(children_of(bal.proc.pid)) == children
        assert info(bal)["arbiter"]["generation"] == 1
        no_traceback(bal)
        assert bal.stop() == 0
    finally:
        bal.stop()


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def kill_arbiter_mid_request(bal: Balancer) -> tuple[threading.Thread, list[Any]]:
    """A request held in flight on `bal`'s worker (its backend's `/hold`: answered
    once the test sets the backend's `released`), then its arbiter killed (SIGKILL,
    as the OOM killer): the thread waiting for the answer, and the list its status
    lands in."""
    results: list[Any] = []
    slow = threading.Thread(target=lambda: results.append(
        request(bal.port, path="/hold", host=HOST, timeout=40)[0]))
    slow.start()
    wait_for(lambda: bal.host_stats(HOST).get("open_requests") == 1,
             what="a request in flight")
    os.kill(bal.proc.pid, signal.SIGKILL)
    bal.proc.wait(5)
    return slow, results


def test_after_the_arbiter_is_killed_a_draining_worker_leaves_the_management_port_free(
        tmp_path, backend):
    """A restart after the arbiter was killed (the OOM killer; systemd restarts it 2 s
    later) must find the management port free while the old workers finish their
    requests. Bug: every worker kept the management listener it inherited, so the
    restart exited 1 'Address already in use' until the last request ended, and
    connections to the port hung unanswered meanwhile."""
    bal = Balancer(tmp_path, routes(backend), args=["--workers", "1"])
    try:
        [worker] = wait_workers(bal, 1)
        slow, results = kill_arbiter_mid_request(bal)
        wait_for(lambda: refused(bal.mport), timeout=5, what="the management port free")
        assert slow.is_alive() and not is_gone(worker), "the worker still drains"
        backend.released.set()
        slow.join(20)
        assert results == [200]
        wait_for(lambda: is_gone(worker), timeout=10, what="the worker to exit")
    finally:
        bal.stop()


def run_dirs(tmpdir: Path) -> set[str]:
    return {p.name for p in tmpdir.glob("balancer-*")}


@pytest.mark.slow
def test_run_directories_left_by_killed_balancers_are_removed_at_the_next_start(
        tmp_path, backend):
    """Each killed arbiter (SIGKILL, the OOM killer) left its run directory, 2.3 MiB of
    a tmpfs (the limits' shared table and journals), for good. The next start removes
    it once none of its processes is left; a running balancer's, one whose worker
    still drains, and a directory another version made (no lock file) stay."""
    tmpdir = Path(tempfile.mkdtemp(prefix="po-", dir="/tmp"))  # short: socket paths
    env = {"TMPDIR": str(tmpdir)}
    foreign = tmpdir / "balancer-foreign1"
    foreign.mkdir(mode=0o700)
    running = killed = again = None
    for name in ("running", "killed", "again1", "again2"):
        (tmp_path / name).mkdir()
    try:
        running = Balancer(tmp_path / "running", routes(backend), env=env)
        mine = run_dirs(tmpdir) - {foreign.name}
        killed = Balancer(tmp_path / "killed", routes(backend), env=env)
        [left] = run_dirs(tmpdir) - mine - {foreign.name}
        [worker] = wait_workers(killed, 1)
        slow, _ = kill_arbiter_mid_request(killed)
        again = Balancer(tmp_path / "again1", routes(backend), env=env)
        assert left in run_dirs(tmpdir), "its worker still drains"
        assert again.stop() == 0
        backend.released.set()
        slow.join(30)
        wait_for(lambda: is_gone(worker), timeout=10, what="the killed balancer's worker gone")
        again = Balancer(tmp_path / "again2", routes(backend), env=env)
        assert left not in run_dirs(tmpdir)
        assert mine <= run_dirs(tmpdir) and foreign.is_dir()
        assert f"removed 1 run directory left by balancers that were killed: " \
               f"{tmpdir / left}" in again.output()
        assert request(running.port, host=HOST)[0] == 200
    finally:
        for bal in (running, killed, again):
            if bal is not None:
                bal.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.mark.parametrize("server_token", ["", TOKEN])
def test_balancerctls_token_variable_alone_is_a_warning_at_start(tmp_path, backend,
                                                                  server_token):
    """BALANCER_TOKEN is balancerctl's; `balancer serve` reads BALANCER_MANAGEMENT_TOKEN.
    Exported for both commands, it left the API open without a word."""
    env = {"BALANCER_TOKEN": TOKEN, "BALANCER_MANAGEMENT_TOKEN": server_token}
    bal = Balancer(tmp_path, routes(backend), env=env)
    try:
        warned = "BALANCER_TOKEN is set, but it is balancerctl's" in bal.output()
        assert warned == (not server_token)
        assert bal.api("GET", "/api/v1/hosts")[0] == (200 if not server_token else 401)
    finally:
        bal.stop()


# control sockets ----------------------------------------------------------------
def control_exchange(path: str, payload: bytes, timeout: float = 10.0) -> bytes:
    """What a worker's control socket answers `payload` (b"" if it closes)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # it stopped reading a frame past MAX_COMMAND: that is an answer
            pass
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        return data


def test_the_run_directory_is_private_to_the_run_user(one_worker):
    pid = wait_workers(one_worker, 1)[0]
    run_dir = Path(control_socket(pid)).parent
    mode = run_dir.stat()
    assert stat.S_IMODE(mode.st_mode) == 0o700 and mode.st_uid == os.getuid()
    for entry in run_dir.iterdir():
        # nothing in it is writable by anyone else (the directory bars them anyway)
        assert not entry.stat().st_mode & 0o022, entry


COMMANDS_NOBODY_SENDS = [  # (payload, what the error reply says)
    (b"\x00\xff\xfe garbage\n", "unknown command"),
    (b"apply {\n", "apply: bad message"),
    (b'apply {"version": 1e400}\n', "version must be a whole number"),
    (b'apply {"version": "12"}\n', "version must be a whole number"),
    (b'apply {"version": -1}\n', "version must be a whole number"),
    (b'stats {"limit": 1e309}\n', "stats: bad query"),
    (b"top 5\n", "top: the query must be a JSON object"),
    (b"certs-fill []\n", "certs-fill: bad query"),
    (b"stats " + b"[" * 100000 + b"\n", "stats: failed: RecursionError"),
    (b'inflight {"limit": ' + b"[" * 100000 + b"\n", "inflight: failed: RecursionError"),
]


def test_a_control_command_nobody_sends_is_one_error_reply(one_worker):
    """Each an error reply, and the same worker goes on answering (one balancer
    for all: a balancer started per payload cost ~8 s)."""
    bal = one_worker
    path = control_socket(wait_workers(bal, 1)[0])
    for payload, expect in COMMANDS_NOBODY_SENDS:
        reply = json.loads(control_exchange(path, payload))
        assert expect in reply["error"], (payload[:40], reply)
        assert json.loads(control_exchange(path, b"version\n"))["version"] == 1, payload[:40]
    assert request(bal.port, host=HOST)[0] == 200
    no_traceback(bal)


def test_a_huge_silent_or_trickling_control_client_is_cut_and_the_worker_answers(
        tmp_path, backend):
    bal = Balancer(tmp_path, routes(backend), args=["--workers", "1"])
    clients: list[socket.socket] = []
    try:
        path = control_socket(wait_workers(bal, 1)[0])
        # a frame past MAX_COMMAND (4 MiB) without a newline: read up to the cap, refused
        reply = control_exchange(path, b"x" * (5 * 1024 * 1024))
        assert reply == b"" or "unknown command" in json.loads(reply)["error"]
        # 20 clients (more than the 16 answered at once) that send a byte now and then
        started = time.monotonic()
        for _ in range(20):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(path)
            client.sendall(b"s")
            clients.append(client)

        def all_cut() -> bool:  # a byte more from each client still open
            alive = 0
            for client in clients:
                try:
                    client.sendall(b"t")
                    alive += 1
                except OSError:
                    pass
            return alive == 0

        # each is cut CONTROL_TIMEOUT after it connected, whatever it trickles
        wait_for(all_cut, timeout=CONTROL_TIMEOUT + 3, interval=0.5, what="trickles cut")
        assert time.monotonic() - started < CONTROL_TIMEOUT + 3
        assert json.loads(control_exchange(path, b"version\n"))["version"] == 1
        status, _ = bal.api("GET", "/api/v1/stats")
        assert status == 200
        assert request(bal.port, host=HOST)[0] == 200
        no_traceback(bal)
    finally:
        for client in clients:
            client.close()
        bal.stop()


# log injection ------------------------------------------------------------------
ACCEPTED = [  # requests the parser takes: their hostile bytes reach the log escaped
    b"GET /ok?a=%0d%0a%1b%00 HTTP/1.1\r\nHost: app.test\r\n"
    b"User-Agent: caf\xc3\xa9 \xe2\x80\xa8 \"q\" \\ \x80\xff\r\nReferer: \xfe\"x\r\n",
    b"GET /ok HTTP/1.1\r\nHost: app.test\r\nUser-Agent: \t\"}\r\n",
]
REFUSED = [  # control bytes in a head: a 400, logged without the head's fields
    b"GET /p\x1b[31mq HTTP/1.1\r\nHost: app.test\r\n",
    b"GET /ok HTTP/1.1\r\nHost: app.test\r\nUser-Agent: a\x1b]0;pwn\x07b\r\n",
    b"GET /ok HTTP/1.1\r\nHost: app.test\r\nUser-Agent: a\x00b\r\n",
    b"GET /ok HTTP/1.1\r\nHost: app.test\r\nReferer: a\x7fb\r\n",
    b"GET /ok HTTP/1.1\r\nHost: app.test\r\nReferer: a\rb\r\n",
    b"GET /ok HTTP/1.1\r\nHost: app.test\x1b[2J\r\n",
    b"GET /ok HTTP/1.1\r\nHost: \xff\xfe\r\n",
]


@pytest.mark.parametrize("fmt", ["combined", "json"])
def test_hostile_bytes_reach_the_access_log_as_one_escaped_line(tmp_path, backend, fmt):
    log_path = tmp_path / "access.log"
    bal = Balancer(tmp_path, routes(backend),
                   args=["--workers", "1", "--access-log", str(log_path)],
                   env={"BALANCER_LOG_ACCESS_FORMAT": fmt})
    try:
        for head in REFUSED:
            reply = raw_exchange(bal.port, head + b"Connection: close\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 400 "), (head, reply[:80])
        for head in ACCEPTED:
            reply = raw_exchange(bal.port, head + b"Connection: close\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 200 "), (head, reply[:80])
        count = len(REFUSED) + len(ACCEPTED)
        wait_for(lambda: log_path.exists() and log_path.read_bytes().count(b"\n") == count,
                 what="one line per request")
        data = log_path.read_bytes()
        # nothing outside printable ASCII reaches the file: no terminal escape, no NUL
        assert all(0x20 <= b < 0x7F for b in data.replace(b"\n", b"")), data
        refused, lines = data.splitlines()[:len(REFUSED)], data.splitlines()[len(REFUSED):]
        for line in refused:  # the malformed head's fields are not logged: missing
            if fmt == "json":
                record = json.loads(line)
                assert record["status"] == 400 and record["client"] == "127.0.0.1"
                assert record["host"] is record["target"] is record["user_agent"] is None
                assert record["request_id"]
            else:
                assert line.startswith(b'- 127.0.0.1 - - [') and b'] "- - -" 400 ' in line
        if fmt == "json":
            first = json.loads(lines[0])
            assert first["user_agent"] == 'caf\u00e9 \u2028 "q" \\ \\x80\\xff'
            assert first["target"] == "/ok?a=%0d%0a%1b%00"
            assert json.loads(lines[1])["user_agent"] == '"}'
        else:
            assert b'"caf\\xC3\\xA9 \\xE2\\x80\\xA8 \\x22q\\x22 \\x5C \\x80\\xFF"' in lines[0]
            assert b'"\\xFE\\x22x"' in lines[0]
            assert b'"\\x22}"' in lines[1]
        no_traceback(bal)
    finally:
        bal.stop()


def test_hostile_names_through_the_api_never_reach_the_operator_log_raw(one_worker,
                                                                      module_backend):
    bal, backend = one_worker, module_backend
    for name in ("a%1B[31m.test", "b%0D%0AINFO%20fake.test", "c%00.test", "d%FF.test"):
        status, body = bal.api("PUT", f"/api/v1/hosts/{name}",
                               {"action": "proxy", "backends": [backend.address]})
        assert status == 400 and body["error"] == "invalid_rule", (name, body)
    for address in ("127.0.0.1:1\x1b[31m", "127.0.0.1:1\nINFO x", "ev\x1bil:80",
                    "127.0.0.1:1\x00"):
        status, body = bal.api("PUT", "/api/v1/hosts/e.test",
                               {"action": "proxy", "backends": [address]})
        assert status == 400 and body["error"] == "invalid_rule", (address, body)
        assert all(0x20 <= ord(c) < 0x7F for c in json.dumps(body))
    out = bal.log_path.read_bytes()
    assert all(b == 0x0A or 0x20 <= b < 0x7F for b in out), out[-2000:]
    assert request(bal.port, host=HOST)[0] == 200


@pytest.mark.parametrize("raw, status", [
    (b"GET /\x1b[31m\x00\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404),
    (b"GET /api/v1/hosts/a\x1b[31m HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 404),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\x1b[2J\r\n\r\n", 403),
    (b"GET /api/v1/stats?host=\x1b\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"GET /api/v1/top?by=\xc3 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 400),
    (b"GET /api/v1/info HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer \x1b\xff\r\n\r\n",
     401),
], ids=["path", "host-name", "Host", "query", "query-cut-utf8", "token"])
def test_hostile_bytes_to_the_management_api_are_answered_and_logged_escaped(
        one_worker, with_token, raw, status):
    bal = with_token if status == 401 else one_worker
    reply = raw_exchange(bal.mport, raw.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
    assert reply.startswith(b"HTTP/1.1 %d " % status), reply[:200]
    body = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert all(0x20 <= ord(c) < 0x7F for c in json.dumps(body))
    assert status != 400 or "not UTF-8" in body["details"][0]
    out = bal.log_path.read_bytes()
    assert all(b == 0x0A or 0x20 <= b < 0x7F for b in out), out[-2000:]
    no_traceback(bal)


# metrics cardinality ---------------------------------------------------------------
def test_thousands_of_hosts_and_paths_do_not_grow_metrics_or_stats(one_worker):
    bal = one_worker
    assert pipelined(bal.port, [b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n",
                                b"GET / HTTP/1.1\r\nHost: nobody.test\r\n\r\n"]) \
        == [200, 404]
    wait_for(lambda: "(unknown)" in bal.api("GET", "/api/v1/stats")[1]["hosts"],
             what="both series to exist")
    before = bal.api("GET", "/metrics")[1]
    assert pipelined(bal.port, [b"GET /p%d?q=%d HTTP/1.1\r\nHost: h%d.evil.test\r\n\r\n"
                                % (i, i, i) for i in range(1500)]) == [404] * 1500
    assert pipelined(bal.port, [b"GET /p%d?q=%d HTTP/1.1\r\nHost: app.test\r\n\r\n"
                                % (i, i) for i in range(100)]) == [200] * 100  # (slow backend)
    assert set(bal.api("GET", "/api/v1/stats")[1]["hosts"]) == {HOST, "(unknown)"}
    after = bal.api("GET", "/metrics")[1]
    assert b"evil" not in after and b"/p1" not in after
    # the same series, only the values moved
    series = {line.split(b"{")[0] + line.split(b"}")[0] for line in after.splitlines()
              if not line.startswith(b"#")}
    old = {line.split(b"{")[0] + line.split(b"}")[0] for line in before.splitlines()
           if not line.startswith(b"#")}
    assert series == old


# the management token -------------------------------------------------------------
def test_the_token_goes_only_in_the_authorization_header(with_token):
    bal = with_token
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert bal.api("GET", "/api/v1/info", headers=good)[0] == 200
    for path in (f"/api/v1/info?token={TOKEN}", f"/api/v1/info?access_token={TOKEN}",
                 f"/metrics?token={TOKEN}"):
        assert bal.api("GET", path)[0] == 401, path
    for given in (f"Basic {TOKEN}", f"Bearer {TOKEN[:-1]}X", f"Bearer {TOKEN}x",
                  "Bearer", "Bearer \xff\xfe", f"bearer  {TOKEN[:-1]}"):
        status, body = bal.api("GET", "/api/v1/info", headers={"Authorization": given})
        assert status == 401 and body["error"] == "unauthorized", (given, body)
        assert TOKEN not in json.dumps(body)
    assert TOKEN not in bal.output()
    no_traceback(bal)


def test_a_lock_file_that_is_a_fifo_does_not_hold_the_start(tmp_path, backend):
    """A directory of this user named ``balancer-*`` whose ``alive.lock`` is a FIFO
    (not a balancer's: it never makes one). Bug: the sweep opened it to try its lock
    and waited there for a writer: the balancer never started."""
    tmpdir = Path(tempfile.mkdtemp(prefix="po-", dir="/tmp"))
    planted = tmpdir / "balancer-fifo1"
    planted.mkdir(mode=0o700)
    os.mkfifo(planted / "alive.lock")
    bal = None
    try:
        bal = Balancer(tmp_path, routes(backend), env={"TMPDIR": str(tmpdir)})
        assert request(bal.port, host=HOST)[0] == 200
    finally:
        if bal is not None:
            bal.stop()
        shutil.rmtree(tmpdir, ignore_errors=True)
