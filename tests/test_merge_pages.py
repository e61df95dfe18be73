"""`server.merge_pages`: the processes of `balancer serve` marked for the
kernel's same-page merging (KSM, `balancer.heap.merge_pages`) when asked and
never by default; a reload that turns it on marks the children it forks from
then on; a marked tree proxies, answers its API and serves /metrics (whose
exporter the management process imports at the first scrape). The mark is
read from /proc/PID/ksm_stat (Linux 6.4 and later, as on every machine this
suite runs on). Whether the host's ksmd then merges anything is the host's
setting, measured by scripts/bench_tree_memory.py, not here."""

from __future__ import annotations

import ctypes
import errno
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancer import heap
from balancer.arbiter import Arbiter
from balancer.settings import load_settings
from tests.support import Backend, Balancer, request, wait_for

HOST = "app.test"
ON = "ksmd is not running", "merged by the host's ksmd"  # one of them is logged


@pytest.fixture
def backend() -> Iterator[Backend]:
    b = Backend("merge")
    yield b
    b.stop()


def marked(pid: int) -> bool:
    """Whether process `pid` asked for its pages to be merged (PR_SET_MEMORY_MERGE)."""
    text = Path(f"/proc/{pid}/ksm_stat").read_text()
    return "ksm_merge_any: yes" in text


def children(bal: Balancer) -> list[int]:
    arbiter = bal.proc.pid
    return [int(p) for p in Path(f"/proc/{arbiter}/task/{arbiter}/children").read_text().split()]


def tree(bal: Balancer) -> list[int]:
    """The arbiter, then its children once just the two are up (the management
    process, the worker)."""
    both = wait_for(lambda: len(pids := children(bal)) == 2 and pids,
                    what="the management process and the worker")
    return [bal.proc.pid, *both]


def serves(bal: Balancer) -> None:
    assert request(bal.port, host=HOST)[0] == 200
    assert bal.api("GET", "/api/v1/stats")[0] == 200
    assert "balancer_requests_total" in bal.metrics_text()


def test_no_process_is_marked_by_default(tmp_path: Path, backend: Backend) -> None:
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [backend.address]}})
    try:
        serves(bal)
        assert not any(marked(pid) for pid in tree(bal))
        assert not any(line in bal.output() for line in ON)
    finally:
        bal.stop()


def test_every_process_is_marked_when_asked_and_still_serves(tmp_path: Path,
                                                            backend: Backend) -> None:
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [backend.address]}},
                   env={"BALANCER_SERVER_MERGE_PAGES": "true"})
    try:
        serves(bal)
        assert all(marked(pid) for pid in tree(bal))
        assert any(line in bal.output() for line in ON), bal.output()
        assert "Traceback" not in bal.output()
    finally:
        bal.stop()


def test_a_reload_that_turns_it_on_marks_the_children_it_forks(tmp_path: Path,
                                                              backend: Backend) -> None:
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [backend.address]}},
                   config="[server]\nmerge_pages = false\n")
    try:
        before = tree(bal)
        assert not any(marked(pid) for pid in before)
        (tmp_path / "balancer.toml").write_text("[server]\nmerge_pages = true\n")
        bal.proc.send_signal(signal.SIGHUP)

        def replaced() -> list[int] | None:
            now = children(bal)
            return now if len(now) == 2 and not set(now) & set(before) else None

        after = wait_for(replaced, timeout=20, what="a new management process and worker")
        assert all(marked(pid) for pid in after) and marked(bal.proc.pid)
        serves(bal)
    finally:
        bal.stop()


def test_a_kernel_that_refuses_the_mark_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """An older kernel (EINVAL) or one without KSM: the reason, not an exception."""
    def refused(*_: int) -> int:
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(heap, "_PRCTL", refused)
    assert "Invalid argument" in heap.merge_pages(True)
    monkeypatch.setattr(heap, "_PRCTL", None)
    assert heap.merge_pages(True) == "prctl is not available"


def test_ksmd_running_reads_the_hosts_switch(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    switch = tmp_path / "run"
    monkeypatch.setattr(heap, "KSM_RUN", str(switch))
    assert not heap.ksm_running()  # no KSM in the kernel: no file
    for value, running in (("0\n", False), ("1\n", True), ("2\n", False)):
        switch.write_text(value)
        assert heap.ksm_running() is running


@pytest.mark.parametrize("start", [True, False], ids=["on-at-start", "off-at-start"])
def test_a_refusing_kernel_warns_only_while_the_setting_asks(
        start: bool, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The arbiter's forks on a kernel that refuses the mark (before Linux 6.4):
    one warning while `server.merge_pages` is on, none once a reload turns it
    off (bug: turning it off there warned that "pages are not merged")."""
    def refused(*_: int) -> int:
        ctypes.set_errno(errno.EINVAL)
        return -1

    monkeypatch.setattr(heap, "_PRCTL", refused)
    arbiter = object.__new__(Arbiter)  # only what `mark_pages` reads: settings, merging
    arbiter.merging = False
    caplog.set_level(logging.INFO, logger="balancer")
    for on in (start, not start, start, start):  # start, a reload, another, a fork
        arbiter.settings = load_settings(env={"BALANCER_SERVER_MERGE_PAGES": str(on).lower()})
        arbiter.mark_pages()
    warned = [r.getMessage() for r in caplog.records if "merge_pages" in r.getMessage()]
    assert len(warned) == (2 if start else 1) and all("refused" in w for w in warned), warned
