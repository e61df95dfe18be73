"""The operator log's 502/504 summary: one line per failing host per second.

Invariants:
* The hot path only counts (`Stats.note_failure`: a dict increment and two
  stores where the error becomes a page); this report formats, once a
  second, in its own greenlet (`report_loop`), so a dead backend under load
  logs one line per host per second per worker, never one per request.
* A host with no 502/504 in the second costs nothing: only hosts that failed
  are visited, and their counts start again from zero after each report.
* At most `MAX_LINES` hosts get a line per report (the most failing ones);
  the rest are summed up in one more line, so a dead shared backend behind
  thousands of hosts still logs a few lines a second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from balancer.restarts import Restarts, every

log = logging.getLogger("balancer.failures")
INTERVAL = 1.0  # seconds between reports
MAX_LINES = 20  # hosts named per report; the others are counted in one line


class FailureReport:
    """Turns one worker's 502/504 counters into summary lines."""

    def __init__(self, stats: Any) -> None:
        self.stats = stats
        self.since = time.monotonic()

    def report_loop(self, stopped: Callable[[], bool]) -> None:
        """Report every `INTERVAL` seconds until `stopped()` (`balancer.restarts.every`)."""
        every(INTERVAL, self.report, stopped,
              Restarts("failures", log, quiet=False, loop="the 502/504 summary",
                       then="trying again at the next one"))

    def report(self) -> list[str]:
        """Log (and return) the lines for the hosts that answered 502/504 since
        the last call."""
        now = time.monotonic()
        failing, self.stats.failing = self.stats.failing, {}
        worst = sorted(failing.items(), key=lambda item: -sum(item[1].causes.values()))
        seconds = now - self.since
        lines = [summary(key, host, seconds) for key, host in worst[:MAX_LINES]]
        rest = worst[MAX_LINES:]
        if rest:
            total = sum(sum(host.causes.values()) for _, host in rest)
            for _, host in rest:
                host.causes = {}
            lines.append(f"{len(rest)} more hosts: {total} requests answered 502/504 in "
                         f"{seconds:.1f} s")
        for line in lines:
            log.warning("%s", line)
        self.since = now
        return lines


def summary(key: str, host: Any, seconds: float) -> str:
    """``app.test: 1532 requests answered 502/504 in 1.0 s: 1532 connect failed
    (last: 127.0.0.1:9001: Connection refused)``; resets the host's counts."""
    causes, host.causes = host.causes, {}
    total = sum(causes.values())
    parts = ", ".join(f"{n} {cause}" for cause, n in sorted(causes.items(),
                                                             key=lambda item: -item[1]))
    return (f"{key}: {total} request{'s' if total != 1 else ''} answered 502/504 in "
            f"{seconds:.1f} s: {parts} (last: {host.last_failure})")
