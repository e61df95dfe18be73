"""How a published ACME challenge reaches every balancer before the CA is asked
(docs/tls.md, "The lock and the challenge store").

Every balancer's management process runs `ChallengeRelay.relay_loop`: it looks
at the store's challenges signature every `RELAY_INTERVAL` seconds (every
`IDLE_INTERVAL` while the table has no ``"tls": "acme"`` host); on a change
it makes each of its own workers serve the challenges now (the control
socket's ``challenges``), then acknowledges that signature in the store
(`Acme.acknowledge`). While the table has ``"tls": "acme"`` hosts it
acknowledges again every `HEARTBEAT` seconds, so the issuer knows which
balancers are alive.

The issuer (`spread`), once it published a challenge: tells its own workers,
acknowledges, and waits until every balancer that acknowledged within
`LIVE_FOR` seconds acknowledges the signature it published, at most
`SPREAD_MAX` seconds (then it asks the CA anyway and logs which balancers were
late: their workers still look once a second).

Invariants:
* A balancer acknowledges only what every one of its workers answered that it
  serves.
* One balancer alone (the file store on one machine, or the only balancer on a
  Redis store) never waits: its workers are told directly, and it looks at the
  acknowledgements once (its log line says so).
* A balancer whose last acknowledgement is older than `LIVE_FOR` is not waited
  for (stopped, dead, or running a version without acknowledgements); one
  silent for `FORGET_AFTER` is removed from the store by the issuer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import gevent

from balancer.restarts import Restarts, nap
from balancer.stores.base import StoreError

log = logging.getLogger("balancer.acme")

RELAY_INTERVAL = 0.25  # seconds between looks at the challenges signature
IDLE_INTERVAL = 1.0  # ... while no host asks for ACME (the workers look as often)
HEARTBEAT = 10.0  # seconds between acknowledgements while ACME hosts exist
LIVE_FOR = 3 * HEARTBEAT  # a balancer silent this long is not waited for
FORGET_AFTER = 3600.0  # ... and this long, its acknowledgement is removed
SPREAD_MAX = 5.0  # seconds the issuer waits for other balancers at most
WAIT_STEP = 0.05  # seconds between the issuer's looks at the acknowledgements


def mark(signature: object) -> str:
    """A store's challenges signature as text every balancer on it writes alike."""
    return repr(signature)


def late(acks: Mapping[str, Any], signature: str, now: float) -> list[str]:
    """The live balancers that have not acknowledged `signature`."""
    return sorted(name for name, ack in acks.items()
                  if _at(ack) >= now - LIVE_FOR and ack.get("signature") != signature)


def stale(acks: Mapping[str, Any], now: float) -> list[str]:
    """The balancers silent for `FORGET_AFTER` seconds."""
    return sorted(name for name, ack in acks.items() if _at(ack) < now - FORGET_AFTER)


class ChallengeRelay:
    """This balancer's side of the challenge spread (see the module doc)."""

    def __init__(self, acme: Any, runtime: Any, name: str,
                 has_work: Callable[[], bool]) -> None:
        self.acme = acme
        self.runtime = runtime
        self.name = name  # this balancer in the acknowledgements (the issuer's owner)
        self.has_work = has_work  # whether the table has ACME hosts (heartbeats)
        self.seen: str | None = None  # the signature this balancer's workers serve
        self.beat = -HEARTBEAT  # when it last acknowledged (monotonic: `look`)
        self.spread_max = SPREAD_MAX

    def relay_loop(self, stopped: Callable[[], bool]) -> None:
        restarts = Restarts("acme", log, quiet=False, loop="relaying the challenges",
                            then="trying again with backoff")
        while not stopped():
            try:
                self.look()
            except StoreError:
                pass  # the workers' own look, and the issuer, report the store
            except Exception as exc:  # a bug must not end the relay for good (nor log
                restarts.failed(exc)  # its traceback every second)
                nap(restarts.pause, stopped)
            gevent.sleep(RELAY_INTERVAL if self.has_work() else IDLE_INTERVAL)

    def look(self) -> None:
        """Serve and acknowledge a new signature; beat while there is ACME work."""
        signature = mark(self.acme.challenges_signature())
        if signature != self.seen:
            if self.tell_workers():
                self.acknowledge(signature)
        elif time.monotonic() - self.beat >= HEARTBEAT and self.has_work():
            self.acknowledge(signature)

    def tell_workers(self) -> bool:
        """Every worker serves the store's challenges now; whether all of them said so."""
        served = True
        for reply in self.runtime.ask_all("challenges"):
            if "error" in reply:
                served = False
                log.warning("acme: worker %s cannot read the challenges: %s",
                            reply.get("pid"), reply["error"])
        return served

    def acknowledge(self, signature: str) -> None:
        """Record `signature` as served, at the wall clock's time (the issuers of
        other balancers compare it with theirs); the next heartbeat is due
        `HEARTBEAT` seconds on the monotonic clock from now. Bug: it was due by
        the wall clock: set back an hour, this balancer did not beat for an hour,
        and every issuer stopped waiting for it to serve a challenge."""
        self.acme.acknowledge(self.name, {"signature": signature, "at": time.time()})
        self.seen, self.beat = signature, time.monotonic()

    def forget(self) -> None:
        """This balancer stops: not waited for any more."""
        self.acme.acknowledge(self.name, None)

    def spread(self, host: str) -> None:
        """Return once every live balancer serves what was just published (at most
        `spread_max` seconds)."""
        started = time.monotonic()
        signature = mark(self.acme.challenges_signature())
        self.tell_workers()
        self.acknowledge(signature)
        looks = 0  # at the acknowledgements: 1 when no balancer was waited for
        while True:
            acks = self.acme.acknowledgements()
            looks += 1
            waiting = late(acks, signature, time.time())
            if not waiting:
                break
            if time.monotonic() - started >= self.spread_max:
                log.warning("acme: %s did not acknowledge the challenge for %s within %.0f s; "
                            "asking the CA anyway (their workers look once a second)",
                            ", ".join(waiting), host, self.spread_max)
                break
            gevent.sleep(WAIT_STEP)
        for name in stale(acks, time.time()):
            self.acme.acknowledge(name, None)
        served = len([a for a in acks.values() if _at(a) >= time.time() - LIVE_FOR]) \
            - len(waiting)
        log.info("acme: the challenge for %s is served by %d balancer%s (%.2f s, %d look%s "
                 "at the acknowledgements); asking the CA to validate", host, served,
                 "" if served == 1 else "s", time.monotonic() - started, looks,
                 "" if looks == 1 else "s")


def _at(ack: Any) -> float:
    at = ack.get("at") if isinstance(ack, Mapping) else None
    return float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else 0.0
