"""Run directories made without the lock (`balancer.leftovers`: balancers before
2026-12-07 made none) are removed by the next start once provably unused, and
nothing else is: a directory whose arbiter lives, that a process still holds,
or that holds anything a balancer does not make stays."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ROOT, Balancer, constants_prefix, request, wait_for
from tests.test_probe_ops import kill_arbiter_mid_request
from tests.test_process import is_gone, wait_workers

HOST = "app.test"


def routes(backend: Any) -> dict[str, Any]:
    return {HOST: {"action": "proxy", "backends": [backend.address]}}


@pytest.fixture
def tmpdir_short() -> Iterator[Path]:
    """A TMPDIR of its own, short (the control sockets' paths)."""
    path = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_dirs(tmpdir: Path) -> set[str]:
    return {p.name for p in tmpdir.glob("balancer-*")}


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait(10)
    return child.pid


def planted(tmpdir: Path, name: str, pid: int, mode: int = 0o700) -> Path:
    """A directory laid out as an older balancer left it: no lock, its status, a
    journal and a worker's control socket file (not bound any more)."""
    path = tmpdir / f"balancer-{name}"
    path.mkdir(mode=mode)
    path.chmod(mode)
    (path / "arbiter.json").write_text(json.dumps({"pid": pid, "generation": 1}))
    (path / "limits.shm").write_bytes(b"\0" * 4096)
    (path / "retired-1234-1796629091429784.json").write_text("{}")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path / "worker-1234.sock"))
    return path


def test_unlocked_run_directories_are_removed_only_when_provably_unused(
        tmp_path, backend, tmpdir_short):
    """A balancer started without the lock (as every version before it) and
    killed (SIGKILL, the OOM killer) while its worker drains: the next start keeps
    its directory while the worker runs, the one after removes it. Planted beside
    it, directories of the same layout that something still owns stay. Bug: a
    directory without the lock was never removed: 2.3 MiB of tmpfs each, for good."""
    env = {"TMPDIR": str(tmpdir_short)}
    dead = dead_pid()
    keep = {
        "alive": planted(tmpdir_short, "alive1", os.getpid()),
        "loose": planted(tmpdir_short, "loose1", dead, mode=0o755),
        "unknown": planted(tmpdir_short, "unknown1", dead),
        "fifo": planted(tmpdir_short, "fifo1", dead),
        "subdir": planted(tmpdir_short, "subdir1", dead),
        "link": planted(tmpdir_short, "link1", dead),
        "nostatus": planted(tmpdir_short, "nostatus1", dead),
        "open": planted(tmpdir_short, "open1", dead),
        "bound": planted(tmpdir_short, "bound1", dead),
    }
    (keep["unknown"] / "notes.txt").write_text("mine")
    os.mkfifo(keep["fifo"] / "history.json")
    (keep["subdir"] / "retired-total.json").mkdir()
    os.symlink("/etc/passwd", keep["link"] / "history.json")
    (keep["nostatus"] / "arbiter.json").unlink()
    symlinked = tmpdir_short / "balancer-symlink1"
    symlinked.symlink_to(planted(tmp_path, "target1", dead))
    held = open(keep["open"] / "limits.shm", "rb")  # noqa: SIM115 - closed below
    bound = socket.socket(socket.AF_UNIX)
    bound.bind(str(keep["bound"] / "certs-management-99.sock"))
    gone = planted(tmpdir_short, "gone1", dead)
    flag = tmp_path / "no-lock"
    flag.touch()
    prefix = [*constants_prefix({}, fail=(["balancer.leftovers:hold"], flag)),
              "FAIL_RAISES=builtins:OSError"]
    for name in ("old", "again1", "again2"):
        (tmp_path / name).mkdir()
    old = again = None
    try:
        old = Balancer(tmp_path / "old", routes(backend), env=env, prefix=prefix)
        [left] = run_dirs(tmpdir_short) - {p.name for p in [*keep.values(), gone, symlinked]}
        assert not (tmpdir_short / left / "alive.lock").exists()  # (as older versions)
        assert gone.name not in run_dirs(tmpdir_short)  # (swept by that start)
        [worker] = wait_workers(old, 1)
        slow, results = kill_arbiter_mid_request(old)
        again = Balancer(tmp_path / "again1", routes(backend), env=env)
        assert left in run_dirs(tmpdir_short), "its worker still drains there"
        assert again.stop() == 0
        backend.released.set()
        slow.join(30)
        assert results == [200]
        wait_for(lambda: is_gone(worker), timeout=10, what="the killed balancer's worker gone")
        again = Balancer(tmp_path / "again2", routes(backend), env=env)
        assert left not in run_dirs(tmpdir_short)
        assert f"removed 1 run directory left by balancers that were killed: " \
               f"{tmpdir_short / left}" in again.output()
        assert all(path.is_dir() for path in keep.values()), run_dirs(tmpdir_short)
        assert symlinked.is_symlink() and (tmp_path / "balancer-target1").is_dir()
        assert request(again.port, host=HOST)[0] == 200
    finally:
        held.close()
        bound.close()
        for bal in (old, again):
            if bal is not None:
                bal.stop()


HIDEPID = ["unshare", "--mount", "sh", "-c", 'mount -t proc -o hidepid=2 proc /proc && exec "$@"',
           "sh"]  # (a /proc of its own, in a mount namespace of its own)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting /proc and dropping to nobody need root")
def test_unlocked_directories_are_left_alone_when_proc_hides_processes(backend, tmpdir_short):
    """`/proc` mounted ``hidepid=2`` and a run user the arbiter drops to: the processes
    of other users are hidden, so a live balancer's arbiter looks gone. Both planted
    directories stay (one whose arbiter lives, one whose arbiter is gone: a doubt
    too), said in one line. Bug: the one whose arbiter lives was removed."""
    if subprocess.run([*HIDEPID, "true"], capture_output=True, timeout=10).returncode:
        pytest.skip("cannot mount /proc in a mount namespace here")
    nobody = pwd.getpwnam("nobody")
    tmpdir_short.chmod(0o1777)  # (as /tmp: the run user makes its own there)
    alive = planted(tmpdir_short, "alive1", os.getpid())  # (root's: hidden from nobody)
    gone = planted(tmpdir_short, "gone1", dead_pid())
    for path in (alive, gone):
        for item in (path, *path.iterdir()):
            os.chown(item, nobody.pw_uid, nobody.pw_gid)
    base = Path(tempfile.mkdtemp(prefix="rs-hidepid-"))
    base.chmod(0o777)  # (the run user writes the routes file here)
    bal = None
    try:
        bal = Balancer(base, routes(backend), env={"TMPDIR": str(tmpdir_short)},
                       config='[server]\nuser = "nobody"\n', prefix=HIDEPID)
        assert (alive / "arbiter.json").is_file() and (gone / "arbiter.json").is_file()
        [line] = [x for x in bal.output().splitlines() if "without a lock" in x]
        assert "left 2 run directories without a lock" in line, line
        assert "/proc is mounted hidepid=" in line, line
        assert request(bal.port, host=HOST)[0] == 200
    finally:
        if bal is not None:
            bal.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="running as nobody needs root")
def test_only_a_balancer_of_the_run_user_that_cannot_be_looked_into_is_a_doubt():
    """Two processes of the run user that are not dumpable: a balancer (one that
    dropped privileges from root, as every balancer with `server.user`), whose
    descriptors cannot be read, so what it holds is unknown; and another program
    (an ``ssh-agent``), which holds no balancer's directory. Bugs: the first was
    taken to hold nothing; then the second made every sweep blind (a warning at
    each start, the directories never removed)."""
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                 sys.executable, "-c"]
    hidden = ("import ctypes, time; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0); "
              "print(flush=True); time.sleep(30)")  # (PR_SET_DUMPABLE, 0)
    agent = subprocess.Popen([*as_nobody, hidden], stdout=subprocess.PIPE)
    balancer = subprocess.Popen([*as_nobody, hidden, "balancer", "serve"],
                                stdout=subprocess.PIPE)
    try:
        for holder in (agent, balancer):
            assert holder.stdout is not None and holder.stdout.readline() == b"\n"
        seen = subprocess.run([*as_nobody, "import sys; from balancer.leftovers import "
                               "_held_paths, _unseen; print(_held_paths()[1]); "
                               "print(*map(_unseen, sys.argv[1:]), sep='\\n')",
                               str(agent.pid), str(balancer.pid)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              timeout=30)
        blind, of_agent, of_balancer = seen.stdout.splitlines()
        # (another balancer dropped to nobody, of another test, may be named instead:
        # the first found)
        assert "of this user (" in blind and "cannot be looked into" in blind, seen
        assert str(agent.pid) not in blind, seen
        assert of_agent == "None", seen
        assert of_balancer.startswith(f"process {balancer.pid} of this user ("), seen
        assert of_balancer.endswith("cannot be looked into (a balancer that dropped "
                                    "privileges from root is not dumpable)"), seen
    finally:
        for holder in (agent, balancer):
            holder.kill()
            holder.wait(10)
