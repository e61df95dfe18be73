"""A worker killed while the management process is replaced (a reload) is
retired once (`management.kept`, `ClusterRuntime.take_over` and `hand_over`).

The old management process holds every worker's counters from its last
survey and stops surveying when its successor is ready; the successor held
none until its first survey (the history's sample, up to 5 s on). A worker
killed in between was retired by neither, and its counters left the totals.

A real balancer with 2 workers proxying to a real backend, reloaded with
SIGHUP; a worker killed with SIGKILL just before the reload, or just after the
new management process reported ready. No history sample and no API request
surveys the workers in that window: the balancer samples its history once a
day (`management.history.INTERVAL`, on its boundaries, wall clock; the
reload is never sent in a boundary's last minute), and no request is made
until the old management process exited. (Before: the reload was sent just
after a 5 s sample, and a reload slower than 5 s on a loaded machine
stopped the test, nothing tested.)
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator

import pytest

from tests.support import Balancer, constants_prefix, wait_for
from tests.test_kept_counters import (
    HOST,
    NeverDown,
    requests_total,
    send_until_both_counted,
    stats_total,
    worker_pids,
)

CONFIG = "[server]\nworkers = 2\n"
INTERVAL = 86400.0  # the history's samples: one a day (5 s in production)
RELOADED = 30.0  # seconds a reload has to replace the management process


@pytest.fixture
def reloadable(tmp_path, backend) -> Iterator[tuple[Balancer, int]]:
    """A balancer (its settings in a file: SIGHUP reloads) whose 2 workers both
    answered requests to HOST, and the number of requests (all counted)."""
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [backend.address]}},
                   config=CONFIG,
                   prefix=constants_prefix({"management.history.INTERVAL": INTERVAL}))
    try:
        wait_for(lambda: len(worker_pids(bal)) == 2, 20, what="two workers")
        yield bal, send_until_both_counted(bal)
    finally:
        bal.stop()


def slot_pid(bal: Balancer, kind: str, slot: int, generation: int) -> int | None:
    """The pid of the child the arbiter logged ready in `slot` of `generation`."""
    found = re.search(rf"{kind} (\d+) ready \(slot {slot}, generation {generation}\)",
                      bal.output())
    return int(found.group(1)) if found else None


def far_from_a_sample() -> float:
    """When (wall clock) a history sample is at least `RELOADED` + 30 s away,
    waiting past the next one if it is nearer (the last minute of a day)."""
    return wait_for(lambda: 1 < (now := time.time()) % INTERVAL < INTERVAL - RELOADED - 30
                    and now, RELOADED + 35, what="a history sample to pass")


def settled(bal: Balancer, watch: NeverDown, old: list[int], sent: int) -> None:
    """Wait until the reload replaced every worker and `/metrics` counts every
    request once (never less on the way); then it stays so, and new requests
    add to it."""
    watch.until(lambda s: len(worker_pids(bal)) == 2 and not set(worker_pids(bal)) & set(old)
                and requests_total(s) == sent, 30, what="every request counted once")
    for _ in range(5):
        assert requests_total(watch.scrape()) == sent == stats_total(bal)[0]
    more = send_until_both_counted(bal, sent)
    assert requests_total(watch.scrape()) == sent + more == stats_total(bal)[0]


@pytest.mark.parametrize("ready", [False, True], ids=["before", "after"])
def test_a_worker_killed_as_the_management_process_is_replaced_counts_once(
        reloadable, ready: bool):
    """Killed before the new management process is ready, it is retired by the
    old one (its last survey, at the handover); killed just after, by the new
    one (it took every worker's counters before it was ready)."""
    bal, sent = reloadable
    old, victim = worker_pids(bal), slot_pid(bal, "worker", 1, 1)
    assert victim in old
    watch = NeverDown(bal)
    started = far_from_a_sample()
    if not ready:
        os.kill(victim, signal.SIGKILL)
    bal.proc.send_signal(signal.SIGHUP)
    successor = wait_for(lambda: slot_pid(bal, "management", 0, 2), RELOADED,
                         interval=0.005, what="the new management process")
    if ready:
        os.kill(victim, signal.SIGKILL)
    wait_for(lambda: re.search(r"management \d+ exited with code 0", bal.output()), RELOADED,
             interval=0.005, what="the old management process to exit")
    assert time.time() // INTERVAL == started // INTERVAL, "a sample came between: untested"
    assert successor not in old
    settled(bal, watch, old, sent)
