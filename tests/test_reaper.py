"""A run killed with SIGKILL leaves nothing running: `loadtest.reaper`'s watcher
stops what it started, whole process groups, whichever thread started them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from loadtest.procs import RUN_ID_ENV
from loadtest.reaper import GRACE, Listed, group_members, stat_fields
from tests.support import wait_for

ROOT = Path(__file__).resolve().parent.parent

# a group leader whose child ignores SIGTERM: only the SIGKILL after GRACE stops it
STUBBORN = """
import signal, subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import signal, time; "
                  "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('deaf', flush=True); "
                  "time.sleep(60)"])
time.sleep(60)
"""

# the run: a loadtest backend (nginx, master and worker, when installed) started
# from a thread that has ended by the time the run is killed, then STUBBORN
RUN = """
import sys, threading, time
from pathlib import Path
from loadtest.procs import Processes
from loadtest.targets import Lab

procs = Processes(Path(sys.argv[1]) / "logs")
lab = Lab(Path(sys.argv[1]), procs, 1024)
box = []
thread = threading.Thread(target=lambda: box.append(lab.start_backend()))
thread.start()
thread.join()
procs.start("stubborn", [sys.executable, "-c", sys.argv[2]])
print(lab.backend_kind, *(p.pid for p in procs.procs), flush=True)
time.sleep(60)
"""


def live(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def environ_has(pid: int, needle: bytes) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def run_processes(run_id: str) -> list[int]:
    """Live processes other than this one with the run's id in their environment
    (the run's children and its watcher; nginx writes its titles over its copy)."""
    needle = f"{RUN_ID_ENV}={run_id}".encode()
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and int(e) != os.getpid()
            and live(int(e)) and environ_has(int(e), needle)]


def test_a_run_killed_with_sigkill_leaves_no_process(tmp_path: Path) -> None:
    run_id = uuid.uuid4().hex
    env = {**os.environ, RUN_ID_ENV: run_id,
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.Popen([sys.executable, "-c", RUN, str(tmp_path), STUBBORN], env=env,
                           stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    groups: list[int] = []
    try:
        kind, *pids = (run.stdout.readline() if run.stdout else "").split()
        groups = [int(p) for p in pids]
        assert len(groups) == 2, f"the run did not start its processes ({kind!r})"
        backend, stubborn = groups
        if kind == "nginx":  # the master forks its worker: both in the group
            wait_for(lambda: len(group_members(backend)) == 2, timeout=5, what="nginx's worker")
        wait_for(lambda: "deaf" in (tmp_path / "logs" / "stubborn.log").read_text(),
                 timeout=5, what="the stubborn child")
        assert len(group_members(stubborn)) == 2
        run.kill()
        run.wait(5)
        killed = time.monotonic()
        wait_for(lambda: not any(group_members(g) for g in groups) and not run_processes(run_id),
                 timeout=GRACE + 3, interval=0.05, what="every process of the killed run to end")
        # the stubborn child needed the SIGKILL: so none came early
        assert time.monotonic() - killed >= GRACE * 0.9
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(5)
        for group in groups:
            for pid in group_members(group):
                os.kill(pid, signal.SIGKILL)


def start_watcher() -> subprocess.Popen:
    """A watcher whose run is this test: the run's end of the pipe is its stdin."""
    return subprocess.Popen([sys.executable, "-I", str(ROOT / "loadtest" / "reaper.py")],
                            stdin=subprocess.PIPE, start_new_session=True)


def listing(pid: int) -> bytes:
    """The line child `pid` writes into the pipe before its exec."""
    entry = Listed.read(pid)
    assert entry is not None, f"{pid} is gone"
    return entry.line()


def test_the_watcher_signals_only_what_is_still_listed(tmp_path: Path) -> None:
    """A child stopped by the run is unlisted; one sharing the run's group (as
    `tests.support.Balancer`'s) gets the signal alone, not the group."""
    watcher = start_watcher()
    sleep = [sys.executable, "-c", "import time; time.sleep(30)"]
    unlisted = subprocess.Popen(sleep, start_new_session=True)
    beside = subprocess.Popen(sleep)  # in this test's own group
    try:
        assert watcher.stdin is not None
        watcher.stdin.write(listing(unlisted.pid) + listing(beside.pid)
                            + b"-%d\n" % unlisted.pid)
        watcher.stdin.close()  # as when the run dies
        assert beside.wait(GRACE + 3) == -signal.SIGTERM
        assert watcher.wait(GRACE + 3) == 0
        assert unlisted.poll() is None
    finally:
        for child in (watcher, unlisted, beside):
            if child.poll() is None:
                child.kill()
                child.wait(5)


# a group leader that forks a member and exits at once (as a daemonizing server)
FORK_AND_EXIT = """
import subprocess, sys
member = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
print(member.pid, flush=True)
"""


def test_a_group_is_stopped_though_its_leader_was_reaped_before_the_watcher_read_it() -> None:
    """The child lists itself with its start time and group: a watcher that reads
    the line late (busy, or still starting) still stops the group, after the
    leader exited and the run reaped it (its /proc entry gone, its PID free)."""
    watcher = start_watcher()
    leader = subprocess.Popen([sys.executable, "-c", FORK_AND_EXIT], stdout=subprocess.PIPE,
                              start_new_session=True)
    member = 0
    try:
        line = listing(leader.pid)  # as the leader wrote it before its exec
        member = int(leader.stdout.readline()) if leader.stdout else 0
        assert leader.wait(10) == 0 and stat_fields(leader.pid) is None
        assert watcher.stdin is not None
        watcher.stdin.write(line)
        watcher.stdin.close()  # the run is gone
        wait_for(lambda: not live(member), timeout=GRACE + 3, interval=0.05,
                 what="the reaped leader's group member to be stopped")
        assert watcher.wait(GRACE + 3) == 0
    finally:
        if member and live(member):
            os.kill(member, signal.SIGKILL)
        for child in (watcher, leader):
            if child.poll() is None:
                child.kill()
                child.wait(5)


# the run: a guarded child, then its watcher dies, then another guarded child
RESTARTED = """
import sys, time
from loadtest.reaper import REAPER, guarded_popen
sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
first = guarded_popen(sleep, start_new_session=True)
REAPER._watcher.kill()
REAPER._watcher.wait()
second = guarded_popen(sleep)
print(first.pid, second.pid, flush=True)
time.sleep(60)
"""


def test_a_watcher_that_died_is_replaced_with_every_child_still_listed() -> None:
    """The next guarded start after the watcher died starts another, which is
    told of the children started before (the first stops with the run too)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.Popen([sys.executable, "-c", RESTARTED], env=env, stdout=subprocess.PIPE,
                           text=True)
    pids: list[int] = []
    try:
        pids = [int(p) for p in (run.stdout.readline() if run.stdout else "").split()]
        assert len(pids) == 2 and all(live(p) for p in pids), pids
        run.kill()
        run.wait(5)
        wait_for(lambda: not any(live(p) for p in pids), timeout=GRACE + 3, interval=0.05,
                 what="both children of the killed run to end")
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(5)
        for pid in pids:
            if live(pid):
                os.kill(pid, signal.SIGKILL)


# a run whose subprocess is gevent's (monkey-patched, as scripts/bench_spin_release.py):
# its Popen makes the new session after the child has listed itself
GEVENT_RUN = """
from gevent import monkey
monkey.patch_all()
import sys, time
from loadtest.reaper import guarded_popen
leader = guarded_popen([sys.executable, "-c", "import subprocess, sys, time; "
                        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                        "time.sleep(60)"], start_new_session=True)
print(leader.pid, flush=True)
time.sleep(60)
"""


def test_a_group_started_by_gevents_popen_is_stopped_whole() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.Popen([sys.executable, "-c", GEVENT_RUN], env=env, stdout=subprocess.PIPE,
                           text=True)
    group = 0
    try:
        group = int(run.stdout.readline() if run.stdout else 0)
        wait_for(lambda: len(group_members(group)) == 2, timeout=5, what="the leader's child")
        run.kill()
        run.wait(5)
        wait_for(lambda: not group_members(group), timeout=GRACE + 3, interval=0.05,
                 what="the whole group of the killed run's child to end")
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(5)
        for pid in group_members(group) if group else []:
            os.kill(pid, signal.SIGKILL)
