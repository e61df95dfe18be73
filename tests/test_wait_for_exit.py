"""`balancer.startup.wait_for_exit`: a throwaway child's exit code (the start-up
check's, a reload's), awaited on its pidfd or polled without one, whatever the
descriptors' numbers; killed past its time; no descriptor left behind."""

from __future__ import annotations

import errno
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancer.startup import wait_for_exit


def child(seconds: float, code: int) -> int:
    """A forked child that exits with `code` after `seconds` (a check that takes them)."""
    pid = os.fork()
    if pid == 0:
        time.sleep(seconds)
        os._exit(code)
    return pid


def pidfds() -> set[str]:
    """This process's pidfds (other descriptors come and go with the test process's
    own threads under pytest-xdist)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]":
                found.add(fd)
        except OSError:  # closed meanwhile (the listing's own descriptor)
            pass
    return found


@pytest.fixture
def crowded() -> Iterator[None]:
    """Every descriptor below 1024 taken (an arbiter with many listeners and children)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1100:
        pytest.skip("the descriptor limit is below 1100")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1100), hard))
    taken: list[int] = []
    try:
        while not taken or taken[-1] < 1024:
            taken.append(os.dup(0))
        yield
    finally:
        for fd in taken:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_child_is_awaited_on_a_descriptor_past_1023(crowded: None) -> None:
    """Bug: `select` refused the pidfd (ValueError: filedescriptor out of range),
    which ended a reload's check, and the arbiter, with the child left running."""
    before = pidfds()
    assert wait_for_exit(child(0.05, 4), 10) == 4
    assert pidfds() == before  # (the pidfd closed)


def test_without_pidfds_the_exit_is_polled(monkeypatch: pytest.MonkeyPatch) -> None:
    def enosys(pid: int) -> int:
        raise OSError(errno.ENOSYS, "pidfd_open")  # Linux before 5.3

    monkeypatch.setattr(os, "pidfd_open", enosys)
    assert wait_for_exit(child(0.05, 5), 10) == 5


def test_a_child_gone_before_the_wait_is_reaped() -> None:
    pid = child(0, 6)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert wait_for_exit(pid, 10) == 6  # (a zombie's pidfd is readable at once)


def test_a_child_past_its_time_is_killed_and_reaped() -> None:
    before = pidfds()
    pid = child(60, 0)
    begun = time.monotonic()
    assert wait_for_exit(pid, 0.2) == 1
    assert time.monotonic() - begun < 5
    with pytest.raises(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    assert pidfds() == before
