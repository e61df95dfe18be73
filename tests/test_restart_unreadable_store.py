"""A process the arbiter starts again while the store cannot be read (real processes).

Bug: a worker killed (or replaced) while the file store's directory was gone
came back with no table and served the no-hosts page (503) until a restore,
while its siblings served the last good table: the snapshot lived beside the
routes file, gone with it. On Redis the same happened with `store.snapshot`
off (or unwritable: systemd's working directory is /), and a worker that did
start from the snapshot did not say its table might be stale. A management
process started again had no table either, so there was nothing to restore.
Now the management process keeps a copy of the snapshot in the run directory.
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from balancer.stores.base import TableData
from balancer.stores.snapshot import Snapshot, run_copy_path
from tests.conftest import RedisServer
from tests.support import Balancer, control_socket, request, wait_for
from tests.test_process import wait_workers
from tests.test_reuseport import management_pid

HOSTS = {f"h{n}.test": {"action": "static", "body": f"site {n}"} for n in range(3)}
WAIT = 15.0
STALE = "serving the last good table, which may be stale (version"


def serves_all(bal: Balancer) -> bool:
    return all(request(bal.port, host=h, timeout=5)[2] == r["body"].encode()
               for h, r in HOSTS.items())


def run_copy(pid: int) -> list[Path]:
    """The snapshot copies in the run directory of the balancer of worker `pid`."""
    return list(Path(control_socket(pid)).parent.glob("last-good-*.json"))


def saved_version(pid: int) -> int:
    copies = run_copy(pid)
    return json.loads(copies[0].read_text())["version"] if copies else -1


def processes(bal: Balancer) -> dict[int, dict]:
    return {p["pid"]: p for p in bal.api("GET", "/api/v1/info")[1]["processes"]}


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_a_process_started_again_while_the_store_cannot_be_read_serves_the_last_table(
        tmp_path: Path, redis_factory: Callable[[], RedisServer], kind: str) -> None:
    directory = tmp_path / "store"
    directory.mkdir()
    redis = redis_factory() if kind == "redis" else None
    url = redis.url if redis else f"file:{directory / 'routes.json'}"
    # Redis: no snapshot file at all; the file store's is beside the routes file
    env = {"BALANCER_STORE_RESYNC_INTERVAL": "0.5",
           **({"BALANCER_STORE_SNAPSHOT": "off"} if redis else {})}
    bal = Balancer(tmp_path, store=url, args=["--workers", "2"], env=env)
    try:
        version = bal.api("PUT", "/api/v1/hosts", {"hosts": HOSTS})[1]["version"]
        first, second = wait_workers(bal, 2)
        wait_for(lambda: saved_version(first) == version, WAIT, what="the run directory's copy")
        if redis:
            redis.stop()
        else:
            directory.rename(tmp_path / "gone")
        wait_for(bal.store_problem, WAIT, what="the store problem reported")
        os.kill(first, signal.SIGKILL)
        (new,) = set(wait_workers(bal, 2, replacing={first})) - {second}
        assert processes(bal)[new]["version"] == version
        assert STALE in (processes(bal)[new]["store_problem"] or "")
        assert all(serves_all(bal) for _ in range(10))  # new connections: both workers
        os.kill(management_pid(bal), signal.SIGKILL)  # and the API's process
        wait_for(lambda: bal.api("GET", "/api/v1/hosts")[1].get("hosts") == HOSTS, WAIT,
                 what="the new management process's table")
        if redis:
            redis.start()  # back with its data (AOF)
        else:
            directory.mkdir()  # back, empty: the served table is written back
            status, answer = bal.api("POST", "/api/v1/restore")
            assert status == 200 and answer["restored_from"] == version, answer
        wait_for(lambda: not any(p["store_problem"] for p in processes(bal).values()), WAIT,
                 what="the store read again by every worker")
        assert serves_all(bal)
    finally:
        bal.stop()


def test_the_newest_snapshot_of_the_two_is_served(tmp_path: Path) -> None:
    setting, run_dir = tmp_path / "last-good.json", tmp_path / "run"
    run_dir.mkdir()
    copy = run_copy_path(str(run_dir), "file:x")
    older, newer = TableData(3, {"a.test": HOSTS["h0.test"]}), TableData(4, {})
    Snapshot(str(setting), "file:x").save(older)
    Snapshot(None, "file:x", copy).save(newer)
    both = Snapshot(str(setting), "file:x", copy)
    assert both.load() == newer and both.loaded_from == copy
    assert both.partial  # the setting's file holds an older table
    both.save(older)  # written to both
    assert Snapshot(None, "file:x", copy).load() == older
    assert both.load() == older and not both.partial  # alike: nothing to write at start
    Path(copy).write_text('{"store": "file:x", "version": 9, "hosts": {"a": 1}}')  # hostile
    assert both.load() == older and both.loaded_from == str(setting)
    assert both.partial
    os.unlink(copy)
    os.mkfifo(copy)  # never blocks the reader
    assert both.load() == older
    assert run_copy_path(str(run_dir), "file:y") != copy  # a reload to another store


def test_a_run_directory_gone_costs_only_its_copy(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    setting = tmp_path / "last-good.json"
    copy = run_copy_path(str(tmp_path / "gone"), "file:x")
    snapshot = Snapshot(str(setting), "file:x", copy)
    for version in (1, 2):
        snapshot.save(TableData(version, {}))
    assert json.loads(setting.read_text())["version"] == 2
    assert caplog.text.count("cannot write it") == 1  # logged once
    assert "only store.snapshot to start from" in caplog.text


def test_a_balancer_started_on_its_snapshot_copies_it_at_once(tmp_path: Path) -> None:
    """Bug: the copy was written only after a change, so a balancer restarted onto a
    store at its snapshot's table had none: a worker killed after the routes file's
    directory went (with the snapshot beside it) served no table."""
    directory = tmp_path / "store"
    directory.mkdir()
    url = f"file:{directory / 'routes.json'}"
    first = Balancer(tmp_path, store=url)
    try:
        version = first.api("PUT", "/api/v1/hosts", {"hosts": HOSTS})[1]["version"]
        snapshot = directory / "routes.json.last-good"
        wait_for(lambda: snapshot.exists() and json.loads(snapshot.read_text())["version"]
                 == version, WAIT, what="the snapshot")
    finally:
        first.stop()
    again = Balancer(tmp_path, store=url)
    try:
        (pid,) = wait_workers(again, 1)
        wait_for(lambda: saved_version(pid) == version, WAIT, what="the run directory's copy")
        directory.rename(tmp_path / "gone")
        wait_for(again.store_problem, WAIT, what="the store problem reported")
        os.kill(pid, signal.SIGKILL)
        wait_workers(again, 1, replacing={pid})
        assert serves_all(again)
    finally:
        again.stop()
