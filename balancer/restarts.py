"""What a long-lived loop does with an exception none of its branches expects (a
bug, or an input nobody foresaw): every loop of every process that follows
something outside it (the store's table, certificates and challenges, the
workers' answers, a backend's health, deploy claims, the ACME issuer) goes on.

Invariants:
* The failure is a problem the loop reports where it reports its others (the
  store's `last_error`, ``store.certs_problem``, a backend's check problem,
  the ACME status), logged with its traceback once: not again while the same
  failure (its type, raised along the same lines of code, whatever its message
  says) repeats within twice the cap (`Restarts.failed`).
* The loop goes on after a pause that doubles from `RESTART_FIRST` to
  `RESTART_CAP` while failures follow one another (never a spin), or, run on
  a period (`every`: the watchdog, the certificates' and challenges' follows),
  at its next turn; the next iteration that succeeds clears the problem (the
  loop's own business).
* Bug: one of them ended for good, silently (the store's watcher: the table
  no longer followed, ``balancer_store_up`` 1); others logged a traceback at
  every turn (every second, every 0.25 s) or said nothing at all.
* Running out of descriptors or memory (EMFILE under a limit lowered by
  `prlimit`, ENFILE, ENOMEM, Python's `MemoryError`) is no bug: one line, no
  traceback, per episode (failures of that kind, `shortage`, within twice the
  cap, wherever raised), as
  `balancer.resting` tells it for accepts; the loop goes on the same way and
  recovers once they free up. Bug: the certificates' watch logged a traceback
  asking for a bug report.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from balancer.descriptors import exhaustion, shortage

# seconds a loop pauses after an unexpected exception (`Restarts`), doubling up to the cap
RESTART_FIRST = 0.5
RESTART_CAP = 10.0
EXHAUSTED = "out of descriptors or memory"  # the `site` of every such failure


class Restarts:
    """One loop's unexpected exceptions (module doc): the problem to report, logged
    with its traceback unless it repeats the failure before (within twice the cap;
    the same type raised along the same lines, `_site`: a message naming a count
    or an id differs at every turn),
    and a pause before the loop goes on (`pause`), doubling from `RESTART_FIRST` to
    `RESTART_CAP` while failures follow one another. `loop` names the loop in the
    problem, `then` says what it does meanwhile."""

    def __init__(self, where: str, logger: logging.Logger, quiet: bool, loop: str,
                 then: str) -> None:
        self.where = where
        self.logger = logger
        self.quiet = quiet  # log at debug level (a proxy worker: the management process tells)
        self.loop = loop
        self.then = then
        self.pause = RESTART_FIRST
        self.last = -float("inf")  # when (`time.monotonic`) the loop last failed
        self.problem = ""  # the last failure's
        self.site: tuple[object, ...] = ()  # where it was raised (`_site`)

    def failed(self, exc: Exception) -> str:
        """The problem `exc` is; sets `pause`."""
        now = time.monotonic()
        recent = now - self.last <= 2 * RESTART_CAP
        self.pause = min(self.pause * 2, RESTART_CAP) if recent else RESTART_FIRST
        self.last = now
        exhausted = exhaustion(exc)
        if exhausted is not None:
            problem = (f"{self.where}: {self.loop} failed: {str(exc) or shortage(exhausted)}; "
                       f"{self.then} until "
                       "descriptors (or memory) free up")
            site: tuple[object, ...] = (EXHAUSTED, shortage(exhausted))  # (wherever raised)
        else:
            problem = (f"{self.where}: {self.loop} failed unexpectedly "
                       f"({type(exc).__name__}: {exc}); {self.then} (a bug: please report "
                       "it with this log line)")
            site = _site(exc)
        if site != self.site or not recent:
            self.logger.log(logging.DEBUG if self.quiet else logging.ERROR, "%s", problem,
                            exc_info=None if exhausted is not None else exc)
        self.problem, self.site = problem, site
        return problem


def _site(exc: BaseException) -> tuple[object, ...]:
    """`exc`'s type and the lines it was raised along (file and line of each frame
    of its traceback): what makes two failures the same one."""
    site: list[object] = [type(exc)]
    tb = exc.__traceback__
    while tb is not None:
        site += (tb.tb_frame.f_code.co_filename, tb.tb_lineno)
        tb = tb.tb_next
    return tuple(site)


def nap(seconds: float, stop: Callable[[], bool]) -> None:
    """Sleep `seconds`, or less once `stop()` says so (looked at every 0.1 s)."""
    deadline = time.monotonic() + seconds
    while not stop() and time.monotonic() < deadline:
        time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))


def every(seconds: float, step: Callable[[], object], stop: Callable[[], bool],
          restarts: Restarts, at_once: bool = False) -> None:
    """A periodic greenlet's body: `step()` every `seconds` (the first at once with
    `at_once`) until `stop()`, looked at after each wait too: told to stop while
    it waits, it takes no further step (bug: one more, after the worker stopped,
    its store closed). An exception `step` raises is `restarts`' problem (logged
    once while it repeats) and the next tick comes as usual: the period already
    bounds the retries (a watchdog that paused for its backoff would leave
    deadlines unenforced meanwhile)."""
    import gevent  # (a greenlet's: gevent.sleep, whether `time` is patched or not)

    wait = 0.0 if at_once else seconds
    while not stop():
        gevent.sleep(wait)
        wait = seconds
        if stop():
            return
        try:
            step()
        except Exception as exc:
            restarts.failed(exc)
