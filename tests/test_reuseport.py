"""One listening socket per worker (`[server] reuseport`, `balancer.listening`):
the sockets each worker holds, how connections spread, and that a worker's
crash, a reload and a hostile port owner lose nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

import pytest

from balancer.listening import Group, Listeners, reuseport_supported
from balancer.settings import SettingsError, load_settings
from tests.support import Backend, Balancer, holders, listening_inodes, wait_for
from tests.test_process import Load, children_of, info, per_worker, run_serve, wait_workers
from tests.test_tls import client_context, https_get, put_cert

HOST = "app.test"
SPIN = {"action": "spin", "timeout": 60}
REQUEST = b"GET /held HTTP/1.1\r\nHost: app.test\r\n\r\n"

linux_only = pytest.mark.skipif(not reuseport_supported(),
                                reason="SO_REUSEPORT spreads connections only on Linux")


# helpers ------------------------------------------------------------------------
def socket_owners(bal: Balancer, port: int) -> list[set[int]]:
    """For each socket listening on `port`: the balancer's processes holding it."""
    arbiter = bal.proc.pid
    pids = [arbiter, *children_of(arbiter)]
    return [holders(inode, pids) for inode in sorted(listening_inodes(port))]


def management_pid(bal: Balancer) -> int:
    workers = {p["pid"] for p in info(bal)["processes"]}
    return next(p for p in children_of(bal.proc.pid) if p not in workers)


def is_stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def hold(port: int, count: int) -> list[socket.socket]:
    """`count` connections, each with one request sent (held by a spin rule)."""
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(REQUEST)
        sockets.append(sock)
    return sockets


def outcome(sock: socket.socket) -> str:
    """The status line's code of the answer, or what went wrong."""
    try:
        data = sock.recv(65536)
    except OSError as exc:
        return type(exc).__name__
    finally:
        sock.close()
    return data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed"


@pytest.fixture
def backend():
    started = Backend("a")
    yield started
    started.stop()


# what each process holds, how connections spread ----------------------------------
@linux_only
def test_each_worker_accepts_from_its_own_socket_and_connections_spread(tmp_path, backend):
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({"version": 1, "hosts": {HOST: SPIN}}))
    put_cert(routes, HOST)
    bal = Balancer(tmp_path, args=["--workers", "2", "--tls-listen", "127.0.0.1:0"])
    try:
        workers = wait_workers(bal, 2)
        manager, arbiter = management_pid(bal), bal.proc.pid
        for port in (bal.port, bal.ports["tls"]):
            owners = socket_owners(bal, port)
            # one socket per worker, each held by the arbiter and that worker only
            assert sorted(sorted(o - {arbiter}) for o in owners) == sorted([w] for w in workers)
            assert all(arbiter in o and manager not in o for o in owners)
        assert "one listening socket per worker (SO_REUSEPORT)" in bal.output()
        held = hold(bal.port, 200)
        wait_for(lambda: bal.spinning(HOST) == 200, timeout=20, what="200 held")
        shares = per_worker(bal, "open_connections")
        assert min(shares.values()) >= 50, shares  # an even split is 100 / 100
        bal.write_routes({HOST: {"action": "proxy", "backends": [backend.address]}})
        assert [outcome(s) for s in held] == ["200"] * 200
        # TLS: handshakes are served by both workers' sockets
        for _ in range(10):
            assert https_get(bal.ports["tls"], HOST, client_context(tmp_path))[0] == 200
    finally:
        bal.stop()


def test_reuseport_false_shares_one_socket(tmp_path):
    bal = Balancer(tmp_path, {HOST: SPIN}, args=["--workers", "2"],
                   config="[server]\nreuseport = false\n")
    try:
        workers = wait_workers(bal, 2)
        (owners,) = socket_owners(bal, bal.port)
        assert owners == {bal.proc.pid, *workers}
        assert "sharing one listening socket (server.reuseport is false)" in bal.output()
    finally:
        bal.stop()


# a crash, a reload ----------------------------------------------------------------
@linux_only
def test_a_killed_worker_loses_only_its_own_connections_and_its_queue_waits(
        tmp_path, backend):
    """Connections the victim had accepted are lost with it; those the other
    worker holds are answered, and those that reached the victim's socket
    while it was stopped and dead wait there for its replacement."""
    bal = Balancer(tmp_path, {HOST: SPIN}, args=["--workers", "2"])
    try:
        victim, survivor = wait_workers(bal, 2)
        held = hold(bal.port, 60)
        wait_for(lambda: bal.spinning(HOST) == 60, timeout=20, what="60 held")
        lost = per_worker(bal, "open_connections")[victim]
        assert 0 < lost < 60
        os.kill(victim, signal.SIGSTOP)
        wait_for(lambda: is_stopped(victim), what="the victim to stop")
        queued = hold(bal.port, 40)  # about half of them wait in the victim's socket
        os.kill(victim, signal.SIGKILL)
        replacement = next(p for p in wait_workers(bal, 2, replacing={victim})
                           if p != survivor)
        wait_for(lambda: bal.spinning(HOST) == 100 - lost, timeout=20,
                 what="the queued connections taken by the replacement")
        assert per_worker(bal, "open_connections")[replacement] > 0
        bal.write_routes({HOST: {"action": "proxy", "backends": [backend.address]}})
        outcomes = [outcome(s) for s in held + queued]
        assert outcomes.count("200") == 100 - lost, outcomes
        assert "unexpectedly" in bal.output()
    finally:
        bal.stop()


@linux_only
@pytest.mark.parametrize("before, after", [(2, 1), (2, 2)])
def test_reload_under_load_fails_no_request(tmp_path, backend, before, after):
    """SIGHUP: each slot's new worker accepts from the slot's socket before the
    old one stops; with fewer workers, one serves both sockets (and the excess
    worker is retired only once it does)."""
    config = f"[server]\nworkers = {before}\n"
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [backend.address]}},
                   config=config)
    try:
        old = set(wait_workers(bal, before))
        load = Load(bal.port, threads=6, per_connection=5)
        load.wait_ok(200, "traffic before the reload")
        (tmp_path / "balancer.toml").write_text(f"[server]\nworkers = {after}\n")
        bal.proc.send_signal(signal.SIGHUP)
        new = wait_workers(bal, after, replacing=old)
        wait_for(lambda: not set(children_of(bal.proc.pid)) & old, timeout=15,
                 what="the old workers to exit")
        served = load.ok
        load.wait_ok(served + 300, "traffic after the reload")
        load.stop()
        assert load.failures == []
        owners = socket_owners(bal, bal.port)
        assert len(owners) == before  # the sockets bound at start, none closed
        assert all(o - {bal.proc.pid} for o in owners)  # each is served
        if after == 1:
            assert owners == [{bal.proc.pid, new[0]}] * 2
    finally:
        bal.stop()


# hostile port owners, settings ----------------------------------------------------
@linux_only
def test_a_port_held_with_so_reuseport_by_another_process_still_refuses(tmp_path):
    """Another listener with SO_REUSEPORT (same user) must not let a balancer
    join its group and take a share of its connections."""
    taken = socket.socket()
    taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        result = run_serve(["--workers", "2", "--listen", f"127.0.0.1:{port}",
                            "--management", "127.0.0.1:0"], tmp_path)
    finally:
        taken.close()
    assert result.returncode == 1
    assert (f"balancer: server.listen: cannot listen on 127.0.0.1:{port}: Address already in "
            f"use") in result.stderr


def test_slots_of_gives_every_socket_a_worker():
    def listeners(slots: int) -> Listeners:
        return Listeners([Group("proxy", tuple(object() for _ in range(slots)))])

    four = listeners(4)
    assert [four.slots_of(w, 4) for w in range(4)] == [[0], [1], [2], [3]]
    assert [four.slots_of(w, 2) for w in range(2)] == [[0, 2], [1, 3]]
    assert [four.slots_of(w, 6) for w in range(6)] == [[0], [1], [2], [3], [0], [1]]
    assert [listeners(1).slots_of(w, 3) for w in range(3)] == [[0], [0], [0]]


def test_reuseport_setting_reads_booleans_from_file_and_env(tmp_path):
    assert load_settings(env={}).server.reuseport is True
    for text, value in (("false", False), ("0", False), ("yes", True), ("On", True)):
        assert load_settings(env={"BALANCER_SERVER_REUSEPORT": text}).server.reuseport is value
    config = tmp_path / "b.toml"
    config.write_text('[server]\nreuseport = "false"\n')
    with pytest.raises(SettingsError, match=r"server.reuseport .*must be true or false"):
        load_settings(env={}, config_path=str(config))
    with pytest.raises(SettingsError, match="must be true or false, got 'maybe'"):
        load_settings(env={"BALANCER_SERVER_REUSEPORT": "maybe"})


@pytest.mark.skipif(sys.platform.startswith("linux"), reason="Linux spreads with SO_REUSEPORT")
def test_elsewhere_workers_share_one_socket(tmp_path):  # pragma: no cover - not Linux
    bal = Balancer(tmp_path, {HOST: SPIN}, args=["--workers", "2"])
    try:
        wait_for(lambda: "SO_REUSEPORT spreads connections only on Linux" in bal.output(),
                 what="the start-up line")
    finally:
        bal.stop()

