"""The arbiter's signals, queued from the first moment of `balancer serve`.

The handlers only queue: the C handler writes the signal number to a pipe
(`signal.set_wakeup_fd`) that `balancer.arbiter.Arbiter` reads at each turn of
its loop. They are installed before anything slow (the imports of the data
plane, the start-up check, binding), so a signal that comes while the balancer
starts waits there and is acted on before any child is forked; a stop asked for
also ends the start-up check's wait (`stop_asked`). Bug: until the arbiter ran,
each signal had its default action: `SIGTERM` killed the balancer without a
word, `SIGINT` printed a traceback, and `SIGHUP` (`systemctl reload` just after
`start`), `SIGUSR1` (logrotate) and `SIGUSR2` killed it too (for up to 3 s under
load).

Invariants:
* Installed once per process, by the process that becomes the arbiter; a
  child resets every one of them (`balancer.workers.enter_child`).
* Nothing is lost: the pipe holds far more numbers than a start-up can
  receive, and the arbiter reads them all at each turn.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any

# what a child takes as a stop (default action) until it installs its own handlers,
# and what it ignores meanwhile (`balancer.workers.enter_child`)
STOPPING_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
                    signal.SIGUSR2)
IGNORED_SIGNALS = (signal.SIGHUP, signal.SIGUSR1)
ARBITER_SIGNALS = (*STOPPING_SIGNALS, *IGNORED_SIGNALS)
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)

_stop: list[int] = []  # the stop signals taken so far (by `_queued`)


class SignalQueue:
    """The pipe the arbiter's signals are queued in (installed as it is made)."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        for fd in (self.read_fd, self.write_fd):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(self.write_fd, warn_on_full_buffer=False)
        for signum in ARBITER_SIGNALS:
            signal.signal(signum, _queued)

    @property
    def fds(self) -> tuple[int, int]:
        """Its descriptors (a forked child closes them)."""
        return self.read_fd, self.write_fd

    def take(self) -> list[int]:
        """The signal numbers queued since the last take, in order."""
        data = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.read_fd, 256):
                data += chunk
        return list(data)


@contextlib.contextmanager
def held() -> Iterator[None]:
    """The arbiter's signals blocked, around a fork: the child calls `forget` first.
    Bug: one that came in between ran the arbiter's handler in the child, which
    writes the signal number to the arbiter's queue (the same pipe, inherited)."""
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, ARBITER_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


def forget() -> None:
    """In a child forked under `held`: the arbiter's queue forgotten, the stopping
    signals' default action back and the others ignored (until the child installs
    its own); one that came meanwhile acts now, so."""
    signal.set_wakeup_fd(-1)
    for signum in STOPPING_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    for signum in IGNORED_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, ARBITER_SIGNALS)


def stop_asked() -> bool:
    """Whether SIGTERM, SIGINT or SIGQUIT came (queued: the arbiter acts on it)."""
    return bool(_stop)


def _queued(signum: int, frame: Any) -> None:
    """The Python-level handler: the wake-up pipe already holds `signum`; a stop is
    also noted for the waits of the start-up (`stop_asked`)."""
    if signum in STOPS:
        _stop.append(signum)
