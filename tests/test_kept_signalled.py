"""A worker killed while a management process signalled directly (`kill PID`,
not a reload) is replaced keeps its counters (`ClusterRuntime.hand_over`,
`take_over`: the old one leaves what it held in the run directory, the new
one holds it as its own).

The signalled process hands over (its last survey) before it tells the
arbiter it drains; its replacement starts only then, and surveys the workers
before it reports ready. A worker killed in between was held by the old one
only, which surveys no more: retired by neither, its requests left the totals
(5 completed requests, then 0).

A real balancer with 2 workers proxying to a real backend. The arbiter is
stopped (SIGSTOP) while the management process drains and exits and one
worker is killed (SIGKILL), the other left alive: no replacement starts
before both are gone, so the window is there whatever the machine's speed;
the arbiter is always continued in a `finally`.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gevent
import pytest

from tests.support import Backend, Balancer, control_socket, request, wait_for
from tests.test_kept_counters import HOST, send_until_both_counted


def completed(bal: Balancer) -> int:
    """`/api/v1/stats`' completed requests of HOST."""
    return bal.api("GET", "/api/v1/stats")[1]["hosts"].get(HOST, {}).get("completed_requests", 0)


def exited(pid: int) -> bool:
    """Whether child `pid` of a stopped arbiter exited (a zombie: not reaped yet)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rpartition(")")[2].split()[0] == "Z"


def ready_pids(bal: Balancer, kind: str) -> list[int]:
    """The pids of the `kind` children the arbiter logged ready, in order."""
    return [int(pid) for pid in re.findall(rf"{kind} (\d+) ready \(slot", bal.output())]


def test_a_left_answer_of_a_worker_that_retired_itself_is_not_counted_again(tmp_path):
    """A worker that drained and left its own retired file after the old process
    left its held answer: the successor adopts the answer but never retires from
    it (`RetiredCounters.is_final`): its own file is its last counters."""
    from balancer.control import retired_path
    from management.kept import HeldCounters, RetiredCounters, write_json

    identity = "4242-1"
    answer = {"pid": 4242, "started": 0.000001, "stats": {"hosts": {
        HOST: {"completed_requests": 5}}}}
    (tmp_path / f"held-{identity}.answer").write_bytes(json.dumps(answer).encode())
    write_json(retired_path(str(tmp_path), identity),
               {"hosts": {HOST: {"completed_requests": 6}}})
    retired = RetiredCounters(str(tmp_path))
    held = HeldCounters(retired)
    held.adopt()
    assert list(held.raw) == [str(tmp_path / "worker-4242.sock")]
    held.retire_gone([])  # its socket is gone
    total = retired.snapshot()
    assert total is not None and total["hosts"][HOST]["completed_requests"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retired-total.json"]


def _answer(pid: int, started: float, completed: int) -> bytes:
    return json.dumps({"pid": pid, "started": started, "stats": {"hosts": {
        HOST: {"completed_requests": completed}}}}).encode()


def _retired_completed(retired) -> int:
    total = retired.snapshot()
    return total["hosts"][HOST]["completed_requests"] if total else 0


@pytest.mark.parametrize("held_count, retired_from", [(5, 8), (9, 9)])
def test_a_dead_worker_is_retired_from_the_newer_of_its_held_and_left_answers(
        tmp_path, held_count: int, retired_from: int) -> None:
    """A reload: the successor took over (`held_count` counted), the draining process
    surveyed later (8) and left that; the worker then dies before the successor's
    next survey: it is retired from the newer answer. Bug: the left answer was
    deleted unread, the worker retired from the successor's older one (8 -> 5)."""
    from management.kept import HeldCounters, RetiredCounters

    socket = str(tmp_path / "worker-4242.sock")
    retired = RetiredCounters(str(tmp_path))
    held = HeldCounters(retired)
    held.keep(socket, _answer(4242, 0.000001, held_count), {"pid": 4242, "started": 0.000001})
    (tmp_path / "held-4242-1.answer").write_bytes(_answer(4242, 0.000001, 8))
    held.adopt()
    held.retire_gone([])
    assert _retired_completed(retired) == retired_from
    assert not list(tmp_path.glob("held-*"))


def test_a_left_answer_of_a_dead_worker_whose_pid_a_new_worker_took_is_retired(tmp_path):
    """Worker 4242 (started 1 µs) killed in the window; its replacement got pid
    4242 (started 2 µs) and answers: the dead one is retired from what was left
    (5), the live one counted live. Bug: its answer replaced the adopted one,
    and the dead worker's 5 requests were lost."""
    from management.kept import HeldCounters, RetiredCounters

    socket = str(tmp_path / "worker-4242.sock")
    retired = RetiredCounters(str(tmp_path))
    held = HeldCounters(retired)
    (tmp_path / "held-4242-1.answer").write_bytes(_answer(4242, 0.000001, 5))
    held.adopt()
    held.retire_gone([socket])  # listed: the new worker's socket
    held.keep(socket, _answer(4242, 0.000002, 1), {"pid": 4242, "started": 0.000002})
    assert _retired_completed(retired) == 5
    held.retire_gone([socket])
    assert _retired_completed(retired) == 5  # once


def test_damaged_left_answers_break_no_survey(tmp_path, caplog):
    """Truncated, garbage, a wrong shape, a name without a pid: ignored (one line
    each read), deleted."""
    from management.kept import HeldCounters, RetiredCounters

    (tmp_path / "held-4242-1.answer").write_bytes(_answer(4242, 0.000001, 5)[:20])
    (tmp_path / "held-4243-1.answer").write_bytes(b"\xff\x00garbage")
    (tmp_path / "held-4244-1.answer").write_bytes(b"[1, 2]")
    (tmp_path / "held-x-1.answer").write_bytes(b"{}")
    retired = RetiredCounters(str(tmp_path))
    held = HeldCounters(retired)
    held.adopt()
    held.retire_gone([])
    assert retired.snapshot() is None
    assert not list(tmp_path.iterdir())
    lines = [r.getMessage() for r in caplog.records if r.name == "balancer.kept"]
    assert len(lines) == 3 and all(line.startswith("held counters ignored") for line in lines)


def test_a_fifo_named_as_a_left_answer_does_not_hang_a_survey(tmp_path):
    """Not a regular file (a FIFO nobody writes to): deleted unread. Bug: reading it
    blocked the management process for good, the run directory's lock held."""
    import threading

    from management.kept import HeldCounters, RetiredCounters

    fifo = tmp_path / "held-4242-1.answer"
    os.mkfifo(fifo)
    held = HeldCounters(RetiredCounters(str(tmp_path)))
    adopting = threading.Thread(target=held.adopt, daemon=True)
    adopting.start()
    adopting.join(5)
    if adopting.is_alive():  # (free the thread)
        with open(fifo, "wb"):
            pass
    assert not adopting.is_alive(), "adopt blocked on a FIFO"
    assert not held.raw and not fifo.exists()


def test_a_left_answer_of_a_worker_folded_already_is_not_counted_again(tmp_path):
    """The worker retired itself and its file was folded before the answer was
    adopted: the total stays its own counters (6), not 6 + 5."""
    from balancer.control import retired_path
    from management.kept import HeldCounters, RetiredCounters, write_json

    write_json(retired_path(str(tmp_path), "4242-1"), {"hosts": {HOST: {"completed_requests": 6}}})
    retired = RetiredCounters(str(tmp_path))
    assert _retired_completed(retired) == 6  # folded
    (tmp_path / "held-4242-1.answer").write_bytes(_answer(4242, 0.000001, 5))
    held = HeldCounters(retired)
    held.adopt()
    held.retire_gone([])
    assert _retired_completed(retired) == 6


def _signalled(management: int, run_dir: Path) -> None:
    """It hands over (its last survey), then drains and exits."""
    os.kill(management, signal.SIGTERM)


def _killed_outright(management: int, run_dir: Path) -> None:
    os.kill(management, signal.SIGKILL)


def _hand_over_fails(management: int, run_dir: Path) -> None:
    """Its hand-over survey finds no run directory (moved away meanwhile, then back)."""
    away = run_dir.with_name(run_dir.name + "-away")
    run_dir.rename(away)
    try:
        os.kill(management, signal.SIGTERM)
        wait_for(lambda: exited(management), 10, interval=0.005,
                 what="the signalled management process to exit")
    finally:
        away.rename(run_dir)


@pytest.fixture(scope="module")
def kept_backend() -> Iterator[Backend]:
    backend = Backend("kept")
    yield backend
    backend.stop()


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory, kept_backend: Backend
                ) -> Iterator[Balancer]:
    """One balancer with 2 workers for every case (each leaves it whole again; the
    last stops it)."""
    bal = Balancer(tmp_path_factory.mktemp("kept"),
                   {HOST: {"action": "proxy", "backends": [kept_backend.address]}},
                   args=["--workers", "2"])
    try:
        yield bal
    finally:
        bal.stop()


# (in this order: the arbiter's crash backoff grows with each unexpected exit)
@pytest.mark.parametrize("end", [_signalled, _hand_over_fails, _killed_outright],
                         ids=["signalled", "hand-over-survey-fails", "sigkill"])
def test_a_worker_killed_before_the_next_management_process_looks_keeps_its_counters(
        two_workers: Balancer, end: Callable[[int, Path], None]) -> None:
    """The management process signalled (it hands over), signalled while its
    hand-over survey cannot run, or SIGKILLed (nothing runs in it); a worker
    SIGKILLed before the replacement's first look (the arbiter stopped: no
    replacement starts before both are gone). The answers it held are in the run
    directory (`HeldCounters.mirror`): the dead worker is retired from them, the
    one alive answers and is counted once (what was left is not added). Bugs: held
    by neither (signalled: 5 -> 0); its hand-over survey failing, or killed, it
    left nothing (10 -> 3)."""
    bal = two_workers
    wait_for(lambda: len(workers(bal)) == 2, 20, what="two workers")
    before = completed(bal)
    sent = before + send_until_both_counted(bal, before)  # (a scrape: every answer held)
    managements, started = len(ready_pids(bal, "management")), len(ready_pids(bal, "worker"))
    management, [killed, alive] = ready_pids(bal, "management")[-1], workers(bal)
    run_dir = Path(control_socket(alive)).parent
    os.kill(bal.proc.pid, signal.SIGSTOP)
    try:
        end(management, run_dir)
        wait_for(lambda: exited(management), 10, interval=0.005,
                 what="the management process to end")
        os.kill(killed, signal.SIGKILL)
        wait_for(lambda: exited(killed), 10, interval=0.005, what="the worker to die")
    finally:
        os.kill(bal.proc.pid, signal.SIGCONT)
    wait_for(lambda: len(ready_pids(bal, "management")) == managements + 1
             and len(ready_pids(bal, "worker")) == started + 1, 20,
             what="a new management process and worker")
    assert completed(bal) == sent
    assert request(bal.port, host=HOST)[0] == 200
    wait_for(lambda: completed(bal) == sent + 1, 10, what="the next request counted")
    assert not list(run_dir.glob(f"held-{killed}-*.answer")), "the dead one's is deleted"
    assert list(run_dir.glob(f"held-{alive}-*.answer")), "the live one's is held"


def workers(bal: Balancer) -> list[int]:
    """The pids of the workers that answer now."""
    return [p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]]


def test_a_huge_left_answer_is_deleted_unread(two_workers: Balancer) -> None:
    """A file under a left answer's name larger than `MAX_LEFT` (sparse: it costs the
    file system nothing) is deleted unread at the next survey, one line said; the
    management process's memory does not grow by it. Bug: read whole (its peak
    grew by the file's size)."""
    from management.kept import MAX_LEFT

    bal = two_workers
    run_dir = Path(control_socket(workers(bal)[0])).parent
    management = ready_pids(bal, "management")[-1]
    huge = run_dir / "held-4242-1.answer"
    with open(huge, "wb") as planted:
        planted.truncate(MAX_LEFT + 1)
    peak = _peak(management)
    assert bal.metrics_text()
    assert not huge.exists()
    assert _peak(management) - peak < MAX_LEFT // 4
    wait_for(lambda: f"held counters ignored, {huge}: {MAX_LEFT + 1} bytes" in bal.output(),
             5, what="the line")


def _peak(pid: int) -> int:
    """Process `pid`'s peak resident memory (bytes)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_full_stop_leaves_no_held_answers(two_workers: Balancer, kept_backend: Backend
                                            ) -> None:
    """The whole balancer stops (SIGTERM to the arbiter): no management process comes
    next, so the one stopping surveys no more and deletes every answer held in the
    run directory (the arbiter's status says `stopping`), while a worker still
    drains a request. Bug: each stop wrote every worker's answer there (megabytes
    each on a big table), kept until the arbiter exited."""
    bal = two_workers
    wait_for(lambda: len(workers(bal)) == 2, 20, what="two workers")
    send_until_both_counted(bal, completed(bal))
    run_dir = Path(control_socket(workers(bal)[0])).parent
    assert len(list(run_dir.glob("held-*.answer"))) == 2
    management, reached = ready_pids(bal, "management")[-1], kept_backend.count
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(request, bal.port, path="/hold", host=HOST)
        try:
            wait_for(lambda: kept_backend.count > reached, 10, what="the request held")
            bal.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: gone(management), 10, what="the management process to exit")
            assert bal.proc.poll() is None, "the arbiter waits for the draining worker"
            assert not list(run_dir.glob("held-*")), "no answer left"
        finally:
            kept_backend.released.set()
        assert held.result(10)[0] == 200
    assert bal.proc.wait(10) == 0


def gone(pid: int) -> bool:
    """Whether process `pid` exited (reaped, or a zombie)."""
    try:
        return exited(pid)
    except FileNotFoundError:
        return True


def test_no_held_answer_is_written_again_once_dropped_at_a_full_stop(tmp_path):
    """The whole balancer stops: `drop_all` (the hand-over) deletes every held
    answer, and a survey the draining process still runs (a scrape it finishes,
    the history's sample before it is killed: `mirror`) writes none again. Bug:
    each such survey found every file gone and wrote every answer back
    (megabytes each on a big table), kept until the arbiter exited."""
    from management.kept import HeldCounters, RetiredCounters

    held = HeldCounters(RetiredCounters(str(tmp_path)))
    held.keep(str(tmp_path / "worker-4242.sock"), _answer(4242, 0.000001, 5),
              json.loads(_answer(4242, 0.000001, 5)))
    held.mirror()
    assert len(list(tmp_path.glob("held-*.answer"))) == 1
    held.drop_all()
    assert not list(tmp_path.glob("held-*"))
    held.keep(str(tmp_path / "worker-4242.sock"), _answer(4242, 0.000001, 6),
              json.loads(_answer(4242, 0.000001, 6)))  # (a newer answer, held still)
    held.mirror()
    assert not list(tmp_path.glob("held-*")), "nothing written after the drop"


def test_a_full_stops_drop_waits_for_the_held_answer_being_written(tmp_path):
    """The whole balancer stops while a held answer bigger than `WRITE_SLICE` is
    being written (the loop turning between two slices): the hand-over deletes
    every answer after that write, under the run directory's lock. Bug: it
    deleted them at once, and the write under way put its file back after."""
    from gevent.event import Event

    from management.cluster import ClusterRuntime
    from management.kept import WRITE_SLICE, write_json

    tmp_path.chmod(0o700)
    paused, go = Event(), Event()

    def pause() -> None:
        paused.set()
        go.wait(10)
    runtime = ClusterRuntime(str(tmp_path), None, 1, pause=pause)
    path = str(tmp_path / "worker-4242.sock")
    runtime.held.raw[path] = (b" " * (2 * WRITE_SLICE), "4242-1")
    runtime.held.fresh.add(path)
    writing = gevent.spawn(runtime.restore_kept)  # (its `mirror`, as a survey's)
    assert paused.wait(10)
    write_json(str(tmp_path / "arbiter.json"), {"stopping": True})
    stopping = gevent.spawn(runtime.hand_over)
    gevent.sleep(0)  # (it waits for the lock)
    go.set()
    gevent.joinall([writing, stopping], timeout=10, raise_error=True)
    assert not list(tmp_path.glob("held-*")), "no answer left"
