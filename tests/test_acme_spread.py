"""How a published ACME challenge reaches every balancer before the CA is asked
(management/acme_spread.py): balancers on one store (a real file store, shared
as balancers on one machine share it) acknowledge what their workers serve; the
issuer waits for the live ones only, and not past its bound."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import gevent
import pytest

from balancer.stores.file import FileStore
from management.acme_spread import FORGET_AFTER, LIVE_FOR, ChallengeRelay

RECORD = {"type": "http-01", "host": "a.test", "token": "tok", "key_authorization": "tok.x",
          "expires": 1900000000.0}


class Workers:
    """The control sockets' edge: what each worker answers to ``challenges``."""

    def __init__(self, error: str | None = None) -> None:
        self.asked = 0
        self.error = error

    def ask_all(self, command: str) -> list[dict[str, Any]]:
        assert command == "challenges"
        self.asked += 1
        return [{"pid": 1, "error": self.error} if self.error else {"pid": 1, "challenges": 1}]


def relay(tmp: Path, name: str, workers: Workers | None = None) -> ChallengeRelay:
    acme = FileStore(str(tmp / "routes.json")).acme()
    return ChallengeRelay(acme, workers or Workers(), name, lambda: True)


def timed(obj: Any, method: str) -> list[float]:
    """When each call of `obj`'s `method` returned (monotonic), from now on: the
    tests below state what the issuer waits for in its own steps (its looks at
    the acknowledgements), not in seconds a loaded machine may stretch (bug:
    `took < 1.0` could trip under load)."""
    times: list[float] = []
    call = getattr(obj, method)

    def timing(*args: Any) -> Any:
        try:
            return call(*args)
        finally:
            times.append(time.monotonic())

    setattr(obj, method, timing)
    return times


def test_one_balancer_asks_the_ca_at_once(tmp_path: Path, caplog: Any) -> None:
    workers = Workers()
    issuer = relay(tmp_path, "lb-a", workers)
    issuer.acme.put_challenge("http-01:tok", RECORD)
    with caplog.at_level(logging.INFO, "balancer.acme"):
        issuer.spread("a.test")
    assert workers.asked == 1
    assert "served by 1 balancer (" in caplog.text
    assert "s, 1 look at the acknowledgements)" in caplog.text  # no wait, whatever the load


def test_the_issuer_waits_for_another_live_balancer(tmp_path: Path, caplog: Any) -> None:
    """The issuer looks at the acknowledgements until lb-b's (made at lb-b's next
    look, every 0.25 s) says it serves the challenge, and stops at the first look
    after it: not a fixed wait, nor the bound."""
    issuer, other_workers = relay(tmp_path, "lb-a"), Workers()
    issuer.spread_max = 60.0  # (reached only if lb-b's acknowledgement went unseen)
    other = relay(tmp_path, "lb-b", other_workers)
    other.look()  # lb-b is alive: it acknowledged the challenges as they were
    issuer.acme.put_challenge("http-01:tok", RECORD)
    looks, acknowledged = timed(issuer.acme, "acknowledgements"), timed(other.acme, "acknowledge")
    stop = False
    follower = gevent.spawn(other.relay_loop, lambda: stop)
    try:
        with caplog.at_level(logging.INFO, "balancer.acme"):
            issuer.spread("a.test")
    finally:
        stop = True
        follower.join(2)
    assert other_workers.asked == 2  # told at its first look, and after the publish
    assert looks[0] < acknowledged[0] < looks[-1]  # it waited, for that acknowledgement
    assert [t for t in looks if t > acknowledged[0]] == [looks[-1]]  # then stopped at once
    assert "served by 2 balancers" in caplog.text and "did not acknowledge" not in caplog.text
    acks = issuer.acme.acknowledgements()
    assert acks["lb-a"]["signature"] == acks["lb-b"]["signature"]


def test_a_balancer_that_stays_silent_is_waited_for_at_most_the_bound(
        tmp_path: Path, caplog: Any) -> None:
    """It looks until the bound and stops at its first look past it."""
    issuer = relay(tmp_path, "lb-a")
    issuer.spread_max = 0.3
    relay(tmp_path, "lb-b", Workers(error="store down")).look()  # alive, cannot serve
    relay(tmp_path, "lb-c").look()  # alive, then stops looking
    issuer.acme.put_challenge("http-01:tok", RECORD)
    # `spread` starts its clock just before it reads the challenges' signature
    started, looks = timed(issuer.acme, "challenges_signature"), timed(issuer.acme,
                                                                       "acknowledgements")
    before = time.monotonic()
    with caplog.at_level(logging.INFO, "balancer.acme"):
        issuer.spread("a.test")
    assert len(looks) >= 2 and time.monotonic() - before >= 0.3
    assert looks[-2] - started[0] < 0.3  # only its last look came past the bound
    assert "lb-c did not acknowledge the challenge for a.test" in caplog.text
    assert "lb-b" not in caplog.text  # never acknowledged anything: not known to be alive
    assert "served by 1 balancer" in caplog.text


@pytest.mark.parametrize("age", [LIVE_FOR + 1, FORGET_AFTER + 1])
def test_stopped_and_dead_balancers_are_not_waited_for(tmp_path: Path, age: float) -> None:
    issuer = relay(tmp_path, "lb-a")
    issuer.acme.acknowledge("lb-old", {"signature": "'gone'", "at": time.time() - age})
    stopping = relay(tmp_path, "lb-b")
    stopping.look()
    stopping.forget()
    issuer.acme.put_challenge("http-01:tok", RECORD)
    looks = timed(issuer.acme, "acknowledgements")
    issuer.spread("a.test")
    assert len(looks) == 1  # nobody waited for
    acks = issuer.acme.acknowledgements()
    assert "lb-b" not in acks
    assert ("lb-old" in acks) == (age < FORGET_AFTER)
