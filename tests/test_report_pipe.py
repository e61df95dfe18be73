"""The arbiter's side of a child's report pipe (`balancer.arbiter.Arbiter.take_reports`)
against a child that misbehaves on it: garbage, a line that never ends, a child
that dies mid-line. A real pipe; the arbiter's reactions to a line are recorded."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from balancer.arbiter import Arbiter, Child


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    yield read_fd, write_fd
    for fd in (read_fd, write_fd):
        with contextlib.suppress(OSError):
            os.close(fd)


def arbiter(seen: list[str]) -> Arbiter:
    """An arbiter that only records what the reports made it do."""
    arb = Arbiter.__new__(Arbiter)
    arb.cut = None
    arb.on_ready = lambda child: seen.append("ready")  # type: ignore[method-assign]
    arb.on_draining = lambda child: seen.append("draining")  # type: ignore[method-assign]
    return arb


def test_a_line_that_never_ends_is_not_kept_whole(pipe):
    """A child writing without a newline (a plugin writing to the wrong descriptor):
    what the arbiter keeps stays bounded, and the next real line still counts.
    Bug: the unfinished line grew by up to 4 KiB per turn of the loop, for good."""
    read_fd, write_fd = pipe
    seen: list[str] = []
    arb, child = arbiter(seen), Child("worker", 0, 1, 1, read_fd, 30.0)
    for _ in range(256):  # 1 MiB, read as it comes
        os.write(write_fd, b"x" * 4096)
        arb.take_reports(child)
        assert len(child.unread) <= 4096
    os.write(write_fd, b"\nready\ngarbage \xff\n\n")
    arb.take_reports(child)
    assert seen == ["ready"]
    os.write(write_fd, b"draining\ncut 1")  # dies mid-line: the rest is dropped at its end
    os.close(write_fd)
    arb.take_reports(child, exited=True)
    assert seen == ["ready", "draining"] and child.report_fd is None
