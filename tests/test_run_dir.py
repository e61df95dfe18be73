"""The run directory (`$TMPDIR/balancer-XXXXXXXX`) in hostile places: deleted under
a running balancer (``rm -rf /tmp/balancer-*``), the management API says so instead
of a 500, a write is not answered as served by workers nobody could ask, and a
reload makes the directory again; under a `$TMPDIR` too long for a socket's path,
it is made in /tmp."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import Balancer, request, wait_for

WAIT = 20.0


@pytest.fixture
def runs() -> Iterator[Path]:
    """A `$TMPDIR` short enough for the control sockets' paths (pytest's are not)."""
    path = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_deleted_run_directory_is_named_and_a_reload_makes_it_again(
        tmp_path: Path, runs: Path) -> None:
    bal = Balancer(tmp_path, {"a.test": {"action": "static", "body": "a"}},
                   env={"TMPDIR": str(runs)})
    try:
        [run_dir] = list(runs.glob("balancer-*"))
        [old] = [p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]]
        shutil.rmtree(run_dir)
        status, answer = bal.api("GET", "/api/v1/stats")
        assert (status, answer["error"]) == (503, "workers_unreachable"), answer
        assert str(run_dir) in answer["message"] and "SIGHUP" in answer["message"]
        status, answer = bal.api("PUT", "/api/v1/hosts/b.test",
                                 {"action": "static", "body": "b"})
        assert status == 202 and answer["applied"] is False, answer
        assert "run directory" in answer["lagging"][0]["reason"]
        status, answer = bal.api("GET", "/readyz")
        assert status == 503 and "run directory" in answer["reasons"][0], answer
        assert request(bal.port, host="a.test")[2] == b"a"  # the data plane serves on

        bal.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: run_dir.is_dir() and bal.api("GET", "/api/v1/stats")[0] == 200,
                 WAIT, what="the run directory made again and the workers reached")
        assert run_dir.stat().st_mode & 0o777 == 0o700
        wait_for(lambda: [p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]]
                 not in ([], [old]), WAIT, what="the new generation's worker alone")
        wait_for(lambda: bal.api("PUT", "/api/v1/hosts/c.test",
                                 {"action": "static", "body": "c"})[0] == 200,
                 WAIT, what="a write every worker confirms")
        assert request(bal.port, host="c.test")[2] == b"c"  # read-your-writes again
        assert "the run directory" in bal.output() and "made again" in bal.output()
    finally:
        bal.stop()


def test_a_run_directory_another_user_made_again_is_not_used(
        tmp_path: Path, runs: Path) -> None:
    """Bug: deleted, the run directory's name in the shared /tmp was anyone's to take;
    the processes used it by name: the management process asked (and handed
    certificates to) a socket listening there as a worker, and the arbiter wrote
    its status through a symlink planted there (as root when not dropping)."""
    bal = Balancer(tmp_path, {"a.test": {"action": "static", "body": "a"}},
                   env={"TMPDIR": str(runs)})
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        [run_dir] = list(runs.glob("balancer-*"))
        [pid] = [p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]]
        shutil.rmtree(run_dir)
        run_dir.mkdir()  # made again by another user, open to all
        os.chown(run_dir, 65534, 65534)
        run_dir.chmod(0o777)
        victim = tmp_path / "victim"
        victim.write_text("untouched")
        (run_dir / "arbiter.json.tmp").symlink_to(victim)
        impostor.bind(str(run_dir / "worker-1.sock"))
        impostor.listen(8)
        impostor.setblocking(False)

        status, answer = bal.api("GET", "/api/v1/stats")
        assert (status, answer["error"]) == (503, "workers_unreachable"), answer
        assert "not this balancer's" in answer["message"]
        status, answer = bal.api("PUT", "/api/v1/hosts/b.test",
                                 {"action": "static", "body": "b"})
        assert status == 202 and "not this balancer's" in answer["lagging"][0]["reason"]
        os.kill(pid, signal.SIGKILL)  # the arbiter writes its status as it restarts it
        wait_for(lambda: bal.output().count("ready (slot") >= 2, WAIT,
                 what="the worker restarted")
        bal.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "keeping the running settings: the run directory" in bal.output(),
                 WAIT, what="the reload refused")
        assert victim.read_text() == "untouched"
        with pytest.raises(BlockingIOError):
            impostor.accept()  # nobody connected
        assert request(bal.port, host="a.test")[2] == b"a"
    finally:
        impostor.close()
        bal.stop()


def test_a_tmpdir_too_long_for_a_socket_path_puts_the_run_directory_in_tmp(
        tmp_path: Path) -> None:
    """Bug: the management process died binding its socket ("AF_UNIX path too
    long") in a loop, and the balancer never answered on its management address."""
    long_dir = tmp_path / ("d" * 90)
    long_dir.mkdir()
    bal = Balancer(tmp_path, {"a.test": {"action": "static", "body": "a"}},
                   env={"TMPDIR": str(long_dir)})
    try:
        assert bal.api("GET", "/api/v1/stats")[0] == 200
        assert list(long_dir.iterdir()) == []
        assert "too long a path for the control sockets" in bal.output()
        assert request(bal.port, host="a.test")[2] == b"a"
    finally:
        bal.stop()
