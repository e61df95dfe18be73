"""The client connection's deadline armed for a new backend connection
(`balancer.relay.arm_connect`: the connect timeout and a margin) against the
connect's own timeout, on a loaded machine: a stale watchdog clock, a loop
stalled past both. The connect's own timeout is what a request reports once
it passed (a 502, the backend's failure, counted), whichever of the two the
loop runs first; the deadline (a 504, `ConnectOverdue`) only while the
connect still had time.

The same in-process worker, scripted backends and two paths (the hub
connects, or a greenlet: the head sent in two pieces) as
tests/test_hub_connect.py (tests/hubconnect.py). The load is made exact:
this process's loop is stalled with a blocking sleep (the test runs in the worker's own loop), and
the watchdog's steps are run at the moment the loop would run them."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from balancer.server import Worker
from tests import test_inline
from tests.hubconnect import (
    CONNECT_TIMEOUT,
    ON,
    accepted,
    connecting,
    make_to,
    never_accepting,
    outcome,
    sockets_to,
)
from tests.test_inline import get, response, until

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)
__all__ = ["make_to"]  # the fixture

MARGIN = 0.5  # balancer.pool.CONNECT_MARGIN


def assert_counted_502(seen: dict[str, Any], address: str) -> None:
    """The connect's timeout ended the request: a 502, the backend's failure."""
    assert seen["status"] == 502, seen
    assert seen["failures"] == 1 and seen["outcomes"]["connect_error"] == 1
    assert seen["fails"] == 1 and seen["in_flight"] == (0, 0) and seen["completed"] == 1
    assert seen["log"] == [{"status": 502, "backend": address, "target": "/try",
                            "method": "GET"}]


@pytest.mark.parametrize("on", ON)
def test_a_stale_watchdog_clock_does_not_arm_the_connect_s_deadline_short(
        make_to: Callable[..., Worker], tmp_path: Path, on: str) -> None:
    """The watchdog's clock (`GeventIO.now`, what deadlines are armed against)
    is a second old when the request comes, as after a tick that ran just
    before this process stalled for a second (a loaded machine). The deadline
    armed for the connect is the connect timeout and its margin from the
    clock as it is (`arm_connect`): the connect's own timeout (0.3 s) ends the
    request, a 502 counted against the backend. Bug: armed from the stale
    clock, the deadline had passed already (0.8 s from a second ago) and cut
    the connect at the watchdog's next tick: a 504, not the backend's."""
    with never_accepting() as port:
        address = f"127.0.0.1:{port}"
        w = make_to(address, on, connect_timeout=CONNECT_TIMEOUT)
        sock, conn = accepted(w)
        request = get("/try")
        if on == "greenlet":
            sock.sendall(request[:20])
            request = request[20:]
            assert until(lambda: conn.task is not None)
        # just after a tick (the next is 0.075 s away: the request is served
        # before it), the clock set back a second
        ticked = w.io.now
        assert until(lambda: w.io.now != ticked, 2)
        w.io.now -= 1.0
        sock.sendall(request)
        status = response(sock)[0]
        sock.close()
        seen = outcome(w, [status], tmp_path, on)
    assert_counted_502(seen, address)


@pytest.mark.parametrize("on", ON)
def test_a_connect_timed_out_is_the_backend_s_even_when_the_deadline_comes_first(
        make_to: Callable[..., Worker], tmp_path: Path, on: str) -> None:
    """This process stalls (a blocking sleep in its loop) while a connect is in
    progress, past the connect's timeout (0.3 s) and the deadline armed for it
    (0.5 s later); when it runs again the watchdog sees the deadline first (its
    tick in an iteration before the one that runs the connect's timer; the
    hub's connect: the greenlet taking it over gets the watchdog's `Overdue`
    at once). Both had passed: the connect's own timeout is what the request
    reports, a 502 counted against the backend, as when its timer runs
    first. Bug: the watchdog's came first, a 504 (`ConnectOverdue`), not the
    backend's failure, for a connect that had timed out."""
    with never_accepting() as port:
        address = f"127.0.0.1:{port}"
        w = make_to(address, on, connect_timeout=CONNECT_TIMEOUT)
        sock, conn = connecting(w, port, on)
        # the loop runs nothing from here to the watchdog's tick: the connect is
        # in progress (its socket open, which its timeout closes)
        time.sleep(CONNECT_TIMEOUT + MARGIN + 0.2)
        assert sockets_to(port, "02") == 1
        w.io.expire(w.io.tick())  # the watchdog's steps, as its loop runs them
        status = response(sock)[0]
        assert until(lambda: sockets_to(port, "02") == 0)  # the connect's socket closed
        sock.close()
        seen = outcome(w, [status], tmp_path, on)
    assert_counted_502(seen, address)


@pytest.mark.parametrize("on", ON)
def test_a_retry_after_a_stall_is_not_cut_by_the_deadline_the_stall_passed(
        make_to: Callable[..., Worker], tmp_path: Path, on: str) -> None:
    """The same stall, but the loop runs the watchdog's tick (due first) and then
    the connect's timer in one iteration, as a stalled loop does with the
    timers that expired meanwhile: the connect's timeout ends the try (the
    backend's failure) and the request is retried on the rule's other
    backend, which answers. Bug: the watchdog's `Overdue` for the deadline
    that passed during the stall, thrown after it, cut the retry's connect
    (armed again): a 504."""
    live = test_inline.ScriptedBackend()
    try:
        with never_accepting() as port:
            address = f"127.0.0.1:{port}"
            w = make_to([address, live.address], on, connect_timeout=CONNECT_TIMEOUT)
            sock, conn = connecting(w, port, on)
            time.sleep(CONNECT_TIMEOUT + MARGIN + 0.2)
            status, _, body = response(sock)
            sock.close()
            seen = outcome(w, [status], tmp_path, on, address)
    finally:
        live.close()
    assert (status, body) == (200, b"conn 1 /try")
    assert seen["failures"] == 1 and seen["outcomes"]["connect_error"] == 1
    assert live.connections == 1
