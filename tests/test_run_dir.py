"""The run directory (`$TMPDIR/balancer-XXXXXXXX`) in hostile places: deleted under
a running balancer (``rm -rf /tmp/balancer-*``), the management API says so instead
of a 500, a write is not answered as served by workers nobody could ask, and a
reload makes the directory again; under a `$TMPDIR` too long for a socket's path,
it is made in /tmp."""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from balancer.limits import journal_path, reclaim
from balancer.stores import open_store
from tests.support import Balancer, constants_prefix, metric, request, wait_for

WAIT = 20.0


@pytest.fixture
def runs() -> Iterator[Path]:
    """A `$TMPDIR` short enough for the control sockets' paths (pytest's are not)."""
    path = Path(tempfile.mkdtemp(prefix="rd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def delete(run_dir: Path) -> None:
    """Delete a running balancer's run directory (the operator's `rm -r`): again
    while it stands, 10 s at most, when a process wrote into it as it was walked
    (a file made or renamed meanwhile: "Directory not empty", or no such file,
    on a loaded machine)."""
    wait_for(lambda: shutil.rmtree(run_dir) or True, 10, interval=0.01,
             what=f"{run_dir} deleted")


def completed(bal: Balancer) -> int | None:
    """a.test's completed requests in /api/v1/stats (None: not answered)."""
    status, answer = bal.api("GET", "/api/v1/stats?host=a.test")
    return answer["hosts"]["a.test"]["completed_requests"] if status == 200 else None


def retired_total(run_dir: Path) -> int | None:
    """a.test's completed requests in the retired total's file (None: none yet)."""
    try:
        total = json.loads((run_dir / "retired-total.json").read_text())
    except (OSError, ValueError):
        return None
    return total["hosts"]["a.test"]["completed_requests"]


def accepting(bal: Balancer) -> list[int]:
    """The workers accepting connections: listed in /api/v1/info, not draining (a
    worker says so as it closes its listeners, `balancer.server.Worker.stop`)."""
    return [p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]
            if not p["draining"]]


def reload_and_wait(bal: Balancer) -> list[int]:
    """SIGHUP, and wait until the new generation's worker alone accepts: the old
    one gone or draining. (A test race: the wait ended once the new worker was
    listed, while the old one, told to drain only after it, still took requests
    off the listening socket they share: meant for the new one, counted by the
    old, 2 of 3 in a run.)"""
    [old] = accepting(bal)
    bal.proc.send_signal(signal.SIGHUP)

    def alone() -> list[int]:
        pids = accepting(bal)
        return pids if old not in pids else []

    return wait_for(alone, WAIT, what="the new generation's worker alone")


def holds(pid: int, port: int, peer: int | None = None) -> bool:
    """Whether process `pid` holds the socket listening on 127.0.0.1:`port` (it
    may accept a connection made to it), or with a `peer` the connection it
    accepted from 127.0.0.1:`peer` (one still queued there is no process's)."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    remote = "00000000:0000" if peer is None else f"0100007F:{peer:04X}"
    wanted = {f"socket:[{row[9]}]" for row in rows
              if row[1] == f"0100007F:{port:04X}" and row[2] == remote}
    try:
        held = {os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()}
    except FileNotFoundError:  # gone (or a descriptor closed as it was read: ask again)
        return Path(f"/proc/{pid}").exists()
    return bool(held & wanted)


def served_across_a_reload(bal: Balancer, run_dir: Path) -> None:
    """a.test served 5 times, a reload (the first worker retires: its counters
    kept), 3 times more; until the totals and the files kept say so."""
    for _ in range(5):
        assert request(bal.port, host="a.test")[2] == b"a"
    reload_and_wait(bal)
    for _ in range(3):
        assert request(bal.port, host="a.test")[2] == b"a"
    wait_for(lambda: completed(bal) == 8 and (run_dir / "retired-total.json").exists()
             and (run_dir / "history.json").exists(), WAIT, what="the retired total")


def test_a_deleted_run_directory_is_made_again_at_once_and_no_total_goes_down(
        tmp_path: Path, runs: Path) -> None:
    """Bug: deleted under a running balancer (``rm -rf /tmp/balancer-*``), the run
    directory stayed gone until a reload: no worker could be asked (statistics 503,
    writes 202); and once made again the retired workers' counters kept there
    were gone, so totals went down. Now the arbiter makes it again within a
    second, the workers bind their control sockets there again, and what the
    management process kept there is written again from its memory."""
    bal = Balancer(tmp_path, {"a.test": {"action": "static", "body": "a"}},
                   env={"TMPDIR": str(runs)})
    try:
        [run_dir] = list(runs.glob("balancer-*"))
        served_across_a_reload(bal, run_dir)
        delete(run_dir)
        deleted = time.monotonic()
        seen: list[int | None] = []
        wait_for(lambda: seen.append(completed(bal)) or seen[-1] is not None, WAIT,
                 what="the workers reached again")
        assert time.monotonic() - deleted < 5.0
        assert [n for n in seen if n is not None] == [8]  # never fewer (nor more)
        assert run_dir.is_dir() and run_dir.stat().st_mode & 0o777 == 0o700
        wait_for(lambda: (run_dir / "retired-total.json").exists()
                 and (run_dir / "history.json").exists(), WAIT, what="what was kept there")
        assert bal.api("PUT", "/api/v1/hosts/c.test", {"action": "static", "body": "c"}
                       )[0] == 200  # every worker confirmed it: read-your-writes
        assert request(bal.port, host="c.test")[2] == b"c"
        assert bal.api("GET", "/readyz")[0] == 200
        for _ in range(2):
            assert request(bal.port, host="a.test")[2] == b"a"
        assert completed(bal) == 10
        assert "was deleted: made again" in bal.output()
        assert "Traceback" not in bal.output()
    finally:
        bal.stop()


def test_a_reload_right_after_the_run_directory_is_made_again_keeps_the_totals(
        tmp_path: Path, runs: Path) -> None:
    """Bug: the management process wrote the retired workers' total again only at
    its next survey (the history's samples, every 5 s, or an API call); a reload
    before that started a management process that found no total, and the
    totals went down (here by the 5 requests of the first generation)."""
    bal = Balancer(tmp_path, {"a.test": {"action": "static", "body": "a"}},
                   env={"TMPDIR": str(runs)},
                   prefix=constants_prefix({"management.history.INTERVAL": 3600}))
    try:
        [run_dir] = list(runs.glob("balancer-*"))
        served_across_a_reload(bal, run_dir)
        [management] = re.findall(r"management (\d+) ready", bal.output())[-1:]
        delete(run_dir)
        # no API call from here until that management process is gone: one would
        # make it survey, and write the total again
        wait_for(lambda: (run_dir / "history.json").exists(), WAIT,
                 what="the management process told the run directory is there again")
        bal.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: not Path(f"/proc/{management}").exists(), WAIT,
                 what="the old management process gone")
        wait_for(lambda: completed(bal) is not None, WAIT, what="the workers reached")
        assert completed(bal) == 8
    finally:
        bal.stop()


def test_a_management_process_draining_leaves_the_total_to_its_successor(
        tmp_path: Path, runs: Path) -> None:
    """Bug: the run directory made again while a reload's old management process
    drained, both it and its successor wrote the retired total again from memory;
    the old one's, written first, had not counted the workers the reload
    retired (the successor had), and the totals went down by theirs (3 here)."""
    bal = Balancer(tmp_path, {"a.test": {"action": "static", "body": "a"}},
                   env={"TMPDIR": str(runs)},
                   prefix=constants_prefix({"management.history.INTERVAL": 3600,
                                            "management.process.MANAGEMENT_DRAIN": 20}))
    held = socket.socket()
    try:
        [run_dir] = list(runs.glob("balancer-*"))
        served_across_a_reload(bal, run_dir)
        [old] = re.findall(r"management (\d+) ready", bal.output())[-1:]
        held.connect(("127.0.0.1", bal.mport))  # keeps it draining: a head never ended
        held.sendall(b"GET /api/v1/info HTTP/1.1\r\n")
        reload_and_wait(bal)
        wait_for(lambda: completed(bal) == 8 and retired_total(run_dir) == 8, WAIT,
                 what="the reload's retired worker folded")
        assert Path(f"/proc/{old}").exists()  # draining still
        delete(run_dir)
        wait_for(lambda: (run_dir / "retired-total.json").exists(), WAIT,
                 what="the total written again")
        assert completed(bal) == 8
    finally:
        held.close()
        bal.stop()


def handovers(run_dir: Path) -> set[int]:
    """The pids of the management processes whose handover socket is there."""
    return {int(p.stem.rpartition("-")[2]) for p in run_dir.glob("certs-management-*.sock")}


def test_a_management_process_starting_as_the_run_directory_is_made_again_binds_its_socket(
        tmp_path: Path, runs: Path) -> None:
    """Bug: a management process ignores SIGHUP until it installs its handler, after
    binding its certificate handover socket; the run directory deleted and made
    again in between, the arbiter's SIGHUP was lost and the socket stayed missing
    until a reload. The window is made wide here (it reports ready 1 s late)."""
    bal = Balancer(tmp_path, {"a.test": {"action": "static", "body": "a"}},
                   env={"TMPDIR": str(runs)},
                   prefix=constants_prefix({"balancer.arbiter.TICK": 0.1},
                                           slow={"management.process.report_ready": 1.0}))
    try:
        [run_dir] = list(runs.glob("balancer-*"))
        [old] = handovers(run_dir)
        bal.proc.send_signal(signal.SIGHUP)
        [new] = wait_for(lambda: handovers(run_dir) - {old}, WAIT,
                         what="the new management process's handover socket")
        delete(run_dir)  # while it is starting (1 s to go)
        wait_for(lambda: run_dir.is_dir(), WAIT, what="the run directory made again")
        assert new not in handovers(run_dir)
        # (after the rest of its start: a survey of every worker, whose sockets went
        # with the directory, and the 1 s; 5 s fell short on a loaded machine)
        wait_for(lambda: new in handovers(run_dir), WAIT,
                 what="the handover socket bound again")
        assert "Traceback" not in bal.output()
    finally:
        bal.stop()


def test_a_management_process_draining_writes_no_total_in_an_api_answer(
        tmp_path: Path, runs: Path) -> None:
    """Bug: a management process draining after a reload still answered its API
    requests in progress; the run directory made again, such an answer wrote the
    retired total it last read (without the worker the reload retired, 3 requests
    here) before its successor wrote its own, which then read the older one:
    totals went down. Its successor is stopped here until the old one answered."""
    bal = Balancer(tmp_path, {"a.test": {"action": "static", "body": "a"}},
                   env={"TMPDIR": str(runs)},
                   prefix=constants_prefix({"management.history.INTERVAL": 3600,
                                            "management.process.MANAGEMENT_DRAIN": 20,
                                            "balancer.arbiter.TICK": 0.1}))
    held = socket.socket()
    successor = "0"
    try:
        [run_dir] = list(runs.glob("balancer-*"))
        served_across_a_reload(bal, run_dir)
        [old] = re.findall(r"management (\d+) ready", bal.output())[-1:]
        held.connect(("127.0.0.1", bal.mport))
        held.sendall(b"GET /api/v1/info HTTP/1.1\r\n")  # keeps it draining: a head never ended
        reload_and_wait(bal)
        wait_for(lambda: completed(bal) == 8 and retired_total(run_dir) == 8, WAIT,
                 what="the reload's retired worker folded")
        [successor] = re.findall(r"management (\d+) ready", bal.output())[-1:]
        assert Path(f"/proc/{old}").exists()  # draining still
        os.kill(int(successor), signal.SIGSTOP)
        delete(run_dir)
        wait_for(lambda: run_dir.is_dir(), WAIT, what="the run directory made again")
        held.sendall(f"Host: 127.0.0.1:{bal.mport}\r\nConnection: close\r\n\r\n".encode())
        held.settimeout(WAIT)
        assert b"200 OK" in held.recv(65536)  # the old process answered
        assert retired_total(run_dir) is None  # and wrote no total
        os.kill(int(successor), signal.SIGCONT)
        wait_for(lambda: retired_total(run_dir) == 8, WAIT, what="the successor's total")
        assert completed(bal) == 8
    finally:
        if successor != "0":
            os.kill(int(successor), signal.SIGCONT)
        held.close()
        bal.stop()


def scraped(bal: Balancer) -> float:
    """a.test's requests in /metrics: a survey of every host counted, whose answers
    the management process holds, worker by worker (`HeldCounters`)."""
    return metric(bal.metrics(), "balancer_requests_total", host="a.test", code="200")


def finish(held: socket.socket, port: int) -> bytes:
    """The answer to the request whose head `held` began."""
    held.sendall(f"Host: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n".encode())
    held.settimeout(WAIT)
    return held.recv(65536)


@pytest.mark.parametrize("successor_asked", [True, False])
def test_a_worker_killed_while_a_management_process_drains_keeps_its_latest_counters(
        tmp_path: Path, runs: Path, successor_asked: bool) -> None:
    """A reload's worker killed while the old management process drains, answering
    API requests in progress: the old one asked it for its counters first (3
    requests), its successor later (7), or never (no scrape, no history sample
    yet). It is retired from the latest either holds. Bugs: the draining process
    retired it from its older counters first, and the successor kept those: totals
    went down (12 to 8); and, once that process wrote none, kept them in memory, a
    worker only it had asked was lost when it exited (8 to 5)."""
    bal = Balancer(tmp_path, {"a.test": {"action": "static", "body": "a"}},
                   env={"TMPDIR": str(runs)},
                   config=f"[timeouts]\nclient_header = {3 * WAIT}\n",  # (heads held long)
                   prefix=constants_prefix({"management.history.INTERVAL": 3600,
                                            "management.process.MANAGEMENT_DRAIN": 20}))
    first, second = socket.socket(), socket.socket()
    try:
        [run_dir] = list(runs.glob("balancer-*"))
        for _ in range(5):
            assert request(bal.port, host="a.test")[2] == b"a"
        [old] = re.findall(r"management (\d+) ready", bal.output())[-1:]
        for held in (first, second):  # keep it draining: heads never ended, yet
            held.connect(("127.0.0.1", bal.mport))
            held.sendall(b"GET /metrics HTTP/1.1\r\n")
            wait_for(partial(holds, int(old), bal.mport, held.getsockname()[1]), WAIT,
                     what="the connection accepted by the first management process")
        [worker] = reload_and_wait(bal)  # (none of the next requests the old worker's)
        wait_for(lambda: not holds(int(old), bal.mport), WAIT,  # (no scrape the old one's)
                 what="the old management process accepting no more")
        for _ in range(3):
            assert request(bal.port, host="a.test")[2] == b"a"
        total = 8  # (a survey of one host: no counters held)
        wait_for(lambda: completed(bal) == total, WAIT, what="the worker's 3 counted")
        assert b"200 OK" in finish(first, bal.mport)  # the old one holds the worker's 3
        if successor_asked:
            for _ in range(4):
                assert request(bal.port, host="a.test")[2] == b"a"
            total += 4
            wait_for(lambda: completed(bal) == total, WAIT, what="the worker's 7 counted")
            assert scraped(bal) == total  # the successor holds the worker's 7
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: not list(run_dir.glob(f"worker-{worker}.sock")), WAIT,
                 what="the killed worker's socket gone")
        assert Path(f"/proc/{old}").exists()  # draining still
        assert b"200 OK" in finish(second, bal.mport)  # its survey sees the worker gone
        [retired] = run_dir.glob(f"retired-{worker}-*.json")  # and retires it from its 3
        assert json.loads(retired.read_text())["hosts"]["a.test"]["completed_requests"] == 3
        wait_for(lambda: not Path(f"/proc/{old}").exists(), WAIT,
                 what="the old management process gone, with what it held")
        series = ("balancer_requests_total", (("code", "200"), ("host", "a.test")))
        assert wait_for(lambda: bal.metrics().get(series), WAIT,  # (once a worker shows it)
                        what="a.test in /metrics again") == total
    finally:
        first.close()
        second.close()
        bal.stop()


def test_a_worker_restarted_as_the_run_directory_is_made_again_reloads_nothing(
        tmp_path: Path, runs: Path) -> None:
    """Bug: the arbiter sends every child SIGHUP once it made the run directory
    again; a worker it had forked in the same turn (one restarted) had not reset
    the arbiter's signal handlers yet, and the one it inherited wrote the SIGHUP
    into the arbiter's wake-up pipe (the same pipe): the arbiter reloaded,
    replacing every child. Children here are slow to start (as on a loaded
    machine), so the SIGHUP comes before that reset."""
    bal = Balancer(tmp_path, {"a.test": {"action": "static", "body": "a"}},
                   env={"TMPDIR": str(runs), "SLOW_FORKED_CHILD": "0.2"},
                   prefix=constants_prefix({}))
    try:
        [run_dir] = list(runs.glob("balancer-*"))
        [worker] = [p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]]
        delete(run_dir)
        os.kill(worker, signal.SIGKILL)  # restarted at once (its first crash), same turn
        wait_for(lambda: bal.output().count("ready (slot 0") >= 3, WAIT,
                 what="the worker restarted")
        wait_for(lambda: bal.api("GET", "/api/v1/stats")[0] == 200, WAIT,
                 what="the workers reached again")
        assert "was deleted: made again" in bal.output()
        assert "settings re-read" not in bal.output()
        assert bal.api("GET", "/api/v1/info")[1]["arbiter"]["generation"] == 1
        assert request(bal.port, host="a.test")[2] == b"a"
    finally:
        bal.stop()


def exchange(one: Path, other: Path) -> None:
    """Swap two paths in one step (renameat2's RENAME_EXCHANGE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_cwd, rename_exchange = -100, 2
    if libc.renameat2(at_cwd, bytes(one), at_cwd, bytes(other), rename_exchange) != 0:
        raise OSError(ctypes.get_errno(), "renameat2")


def processes(bal: Balancer) -> list[dict[str, Any]]:
    """`/api/v1/info`'s processes (none while it does not answer 200)."""
    status, answer = bal.api("GET", "/api/v1/info")
    return answer["processes"] if status == 200 else []


def test_sockets_that_cannot_be_bound_again_are_one_line_and_a_worker_tries_again(
        tmp_path: Path, runs: Path) -> None:
    """Bug: a worker that could not bind its control socket in the run directory
    made again (no room, a read-only directory, here a directory in its way)
    printed a traceback at each of the arbiter's SIGHUPs and never tried again:
    the management process could not ask it until a reload. Now one line says
    so, it tries again less and less often, and `/api/v1/info` counts it. The
    management process's handover socket, in the same case, is one line too."""
    bal = Balancer(tmp_path, {"a.test": {"action": "static", "body": "a"}},
                   env={"TMPDIR": str(runs)},
                   prefix=constants_prefix({"balancer.control.REBIND_FIRST": 0.2}))
    try:
        [run_dir] = list(runs.glob("balancer-*"))
        [pid] = [p["pid"] for p in processes(bal)]
        [management] = handovers(run_dir)
        fresh = runs / "fresh"  # the run directory made again, as the arbiter makes it,
        fresh.mkdir(mode=0o700)
        (fresh / f"worker-{pid}.sock").mkdir()  # with directories where the sockets go
        (fresh / f"certs-management-{management}.sock").mkdir()
        exchange(run_dir, fresh)  # (in one step: the arbiter never sees it gone)
        shutil.rmtree(fresh)
        os.kill(management, signal.SIGHUP)
        for _ in range(3):
            os.kill(pid, signal.SIGHUP)  # the arbiter's REBIND, sent again as it does
        wait_for(lambda: "cannot bind the control socket" in bal.output()
                 and "cannot bind the handover socket" in bal.output(), WAIT,
                 what="the failures said")
        (run_dir / f"worker-{pid}.sock").rmdir()
        [answer] = wait_for(lambda: processes(bal), WAIT, what="the worker asked again")
        assert answer["pid"] == pid and answer["control_rebind_failures"] >= 1
        assert bal.output().count("cannot bind the control socket") == 1
        assert f"worker-{pid}.sock again: Is a directory" in bal.output()
        assert "Traceback" not in bal.output()
        assert request(bal.port, host="a.test")[2] == b"a"
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
        taken = runs / "taken"  # made again by another user, open to all
        taken.mkdir()
        os.chown(taken, 65534, 65534)
        taken.chmod(0o777)
        victim = tmp_path / "victim"
        victim.write_text("untouched")
        (taken / "arbiter.json.tmp").symlink_to(victim)
        impostor.bind(str(taken / "worker-1.sock"))
        impostor.listen(8)
        impostor.setblocking(False)
        exchange(run_dir, taken)  # deleted and taken at once: the arbiter never sees a gap
        shutil.rmtree(taken)

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
        assert bal.output().count("cannot be asked until it is removed") == 1  # told once
        delete(run_dir)  # removed: the arbiter makes its own again
        wait_for(lambda: bal.api("GET", "/api/v1/stats")[0] == 200, WAIT,
                 what="the workers reached again")
        assert run_dir.stat().st_uid == os.getuid() and victim.read_text() == "untouched"
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


def test_a_journal_gone_while_it_is_given_back_is_no_error(tmp_path: Path) -> None:
    """Bug: the run directory deleted while the arbiter gave an exited worker's
    requests back (`limits.reclaim`, between claiming the journal and reading it):
    the arbiter died of the FileNotFoundError, and every child stopped with it."""
    shared = str(tmp_path / "limits.shm")
    Path(journal_path(shared, 4242)).mkdir()  # claimed, then unreadable: as if deleted
    assert reclaim(shared, 4242) == 0


def test_a_stopped_certificate_handover_is_not_bound_again(tmp_path: Path) -> None:
    """Bug: the SIGHUP the arbiter sends every child once it made the run directory
    again reached a management process draining after a reload, whose `stop` had
    removed its handover socket: it bound it again, and left it when it exited."""
    from management.certs_watch import CertsWatch, handover_path

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    store = open_store(f"file:{tmp_path / 'routes.json'}", "balancer", 0.0, False)
    watch = CertsWatch(store, str(run_dir))
    watch.serve()
    path = Path(handover_path(str(run_dir), os.getpid()))
    assert path.exists()
    watch.stop()
    assert not path.exists()
    watch.rebind()
    assert not path.exists()
    store.close()


def test_a_control_socket_that_cannot_be_bound_for_hours_is_still_tried_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bug: the delay before a worker tried to bind its control socket again was
    `REBIND_FIRST` doubled once per failure in a row, a float: past 1024 failures
    (8.5 h of a directory in its way, one try each `REBIND_LONGEST`) an
    OverflowError came out of `rebind`, and it was never tried again."""
    import gevent

    from balancer import control
    from balancer.stats import Stats
    from tests.test_stats_pages import scripted_worker

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    server = control.ControlServer(str(run_dir), scripted_worker(Stats()))
    server.start()
    try:
        os.unlink(server.path)
        os.mkdir(server.path)  # in its way
        server.failing = 1100  # failures in a row so far (9 h)
        server.rebind()
        retry = server.retry
        assert retry is not None and server.failing == 1101
        monkeypatch.setattr(control, "REBIND_LONGEST", 0.01)  # (not 30 s to the next try)
        retry.kill()  # the one spawned 30 s from now: a sooner one
        server.retry = None
        server.rebind()
        os.rmdir(server.path)
        gevent.joinall([server.retry], timeout=WAIT, raise_error=True)
        assert server.failing == 0 and server.rebind_failures == 2
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(server.path)  # bound again
    finally:
        server.close()


def stuck_holder(lock: Path) -> Any:
    """A process that takes the `flock` on `lock` and then hangs (a management
    process stopped by a debugger, say); started once it holds it."""
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time; "
                               "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600); "
                               "fcntl.flock(fd, fcntl.LOCK_EX); print(flush=True); "
                               "time.sleep(60)", str(lock)], stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"\n"
    return holder


def test_a_run_directory_lock_held_by_a_stuck_process_is_waited_for_a_bounded_time(
        tmp_path: Path) -> None:
    """`run_dir_lock` with the lock held by a process that never lets go: it gives up
    after its wait, naming the holder. Bug: it polled for ever."""
    from balancer.control import RunDirBusy, run_dir_lock

    holder = stuck_holder(tmp_path / "run.lock")
    try:
        began = time.monotonic()
        with pytest.raises(RunDirBusy) as caught, run_dir_lock(str(tmp_path), wait=0.2):
            raise AssertionError("the lock was taken")
        assert 0.2 <= time.monotonic() - began < 1.5
        assert f"is still held by process {holder.pid} after 0.2 s" in str(caught.value)
    finally:
        holder.kill()
        holder.wait(10)
    with run_dir_lock(str(tmp_path), wait=0.2):  # free once its holder is gone
        pass


def test_a_draining_worker_finding_the_lock_held_leaves_its_counters_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """`control.retire` (a worker's drain ends) with the run directory's lock held by
    a stuck process: after `LOCK_WAIT` one line, its socket closed, no retired file
    (the management process counts the worker as it last asked it). Bug: RunDirBusy
    came out of the worker, a traceback and exit code 1."""
    import logging

    from balancer import control
    from balancer.stats import Stats
    from tests.test_stats_pages import scripted_worker

    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    server = control.ControlServer(str(run_dir), scripted_worker(Stats()))
    server.start()
    holder = stuck_holder(run_dir / "run.lock")
    monkeypatch.setattr(control, "LOCK_WAIT", 0.2)
    try:
        with caplog.at_level(logging.ERROR, logger="balancer"):
            control.retire(str(run_dir), scripted_worker(Stats()), server)
        assert server.closed and not os.path.exists(server.path)
        assert not list(run_dir.glob("retired-*"))
        assert [r.getMessage() for r in caplog.records] == [
            f"cannot leave this worker's counters: the run directory's lock {run_dir}/run.lock "
            f"is still held by process {holder.pid} after 0.2 s; the management process "
            "counts them as it last asked this worker"]
    finally:
        holder.kill()
        holder.wait(10)
        server.close()


def test_the_lock_holder_is_read_from_any_lines_of_proc_locks(tmp_path: Path,
                                                               monkeypatch: Any) -> None:
    """`lock_holder` reads the holder of the run directory's `flock` from ``/proc/locks``
    (here a file of the kernel's format), passing over a waiter's line, a POSIX lock,
    another file's, pid 0 (a holder in another pid namespace) and garbage. Bug: a
    pid field of other digits than ASCII (``²``) raised ValueError out of the survey
    (500) or a worker's retire (a traceback) instead of `RunDirBusy`."""
    from balancer import control

    lock = tmp_path / "run.lock"
    lock.touch()
    info = os.stat(lock)
    file = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    table = tmp_path / "locks"
    noise = [b"\xff\xfe\x00 garbage", b"", b"1: FLOCK", "2: FLOCK ADVISORY WRITE \u00b2 "
             f"{file} 0 EOF".encode(), f"3: -> FLOCK ADVISORY WRITE 77 {file} 0 EOF".encode(),
             f"4: POSIX ADVISORY WRITE 88 {file} 0 EOF".encode(),
             f"5: FLOCK ADVISORY WRITE 0 {file} 0 EOF".encode(),
             b"6: FLOCK ADVISORY WRITE 99 00:00:1 0 EOF", b"7: " + b"9" * 100_000]
    monkeypatch.setattr(control, "PROC_LOCKS", str(table))
    table.write_bytes(b"\n".join(noise) + b"\n")
    assert control.lock_holder(str(lock)) is None
    table.write_bytes(b"\n".join([*noise, f"8: FLOCK  ADVISORY  WRITE 4242 {file} 0 "
                                             "EOF".encode()]) + b"\n")
    assert control.lock_holder(str(lock)) == "process 4242"
    assert control.lock_holder(str(tmp_path / "gone.lock")) is None


def asked_at_once(bal: Balancer, path: str, count: int) -> list[tuple[float, int, Any]]:
    """`count` requests for `path` sent together: when each was answered (monotonic),
    its status and body."""
    import threading

    answers: list[tuple[float, int, Any]] = []

    def ask() -> None:
        status, body = bal.api("GET", path)
        answers.append((time.monotonic(), status, body))

    threads = [threading.Thread(target=ask) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return sorted(answers, key=lambda a: a[0])


def test_statistics_answer_503_naming_a_stuck_holder_of_the_run_directory_lock(runs: Path,
                                                                                tmp_path: Path):
    """The run directory's lock held by a stuck process (the other management process
    of a reload, stopped): statistics answer 503 `workers_unreachable` naming it
    after `LOCK_WAIT`, and 200 again once it is gone. Bug: the request waited for
    ever (and so did a reload's new management process before it served); then 5
    requests at once were answered `LOCK_WAIT` apart, each waiting its turn of the
    process's mutex without end first (the 5th after 5 × `LOCK_WAIT`)."""
    wait = 0.5
    bal = Balancer(tmp_path, {"a.test": {"action": "static", "body": "a"}},
                   env={"TMPDIR": str(runs)},
                   prefix=constants_prefix({"balancer.control.LOCK_WAIT": wait}))
    holder = None
    try:
        [run_dir] = runs.glob("balancer-*")
        holder = stuck_holder(run_dir / "run.lock")
        answers = asked_at_once(bal, "/api/v1/stats", 5)
        assert {(status, body["error"]) for _, status, body in answers} == \
            {(503, "workers_unreachable")}, answers
        assert f"held by process {holder.pid} after {wait:g} s" in answers[0][2]["message"]
        spread = answers[-1][0] - answers[0][0]
        assert spread < 2 * wait, f"answered over {spread:.2f} s: {answers}"
        holder.kill()
        holder.wait(10)
        assert bal.api("GET", "/api/v1/stats")[0] == 200
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
            holder.wait(10)
        bal.stop()
