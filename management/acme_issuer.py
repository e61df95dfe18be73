"""The ACME issuer of the management process (SPEC §9, docs/tls.md).

Every `CHECK_INTERVAL` seconds, at once when the table changes and when an
operator asks (`request`), `step` runs: when the table has hosts with
``"tls": "acme"``, take (or extend) the cluster's issuer lock in the store;
holding it, issue a certificate for each such host that is due, one at a
time, and store it with the other certificates (``source: "acme"``), which
this balancer's workers serve at once (told over their control sockets) and
every worker of every other balancer within a second (`balancer.tls.follow`).

A host is due when it has no certificate, when its certificate expires
within ``[acme] renew_before`` days, or when an operator asked
(`balancerctl cert issue`), unless it failed and its backoff has not passed.

Invariants:
* One issuer acts per cluster: nothing is issued, published or stored
  without the lock, which is extended while an issuance runs and released
  when the process stops; a lock that is not extended lapses after
  `LOCK_TTL` and another balancer's issuer takes over.
* Per-host state lives in the store (`Acme.put_state`), so every balancer's
  API shows the same thing and backoff survives a change of issuer:
  ``pending`` (queued or running), ``issued``, ``failed`` (with ``reason``,
  ``attempts`` and ``next_retry``). Failures back off exponentially from
  `BACKOFF_FIRST` to `BACKOFF_MAX` seconds per host, or wait what the CA asked
  (a rate limit's ``Retry-After``) when that is longer, `BACKOFF_MAX` at most.
* The CA is asked to validate once every live balancer serves the challenge
  (`management.acme_spread`: at once with one balancer; Redis clusters wait
  for the others' acknowledgements, at most `acme_spread.SPREAD_MAX`).
* One issuance is bounded (`ISSUE_TIMEOUT`, whatever the CA does) and cut
  short (`management.acme_guard`) when the lock is lost, which leaves the
  host's state and challenges to the new holder, or when the host's rule stops
  asking for ACME, which stores nothing and forgets the state; neither counts
  as a failure.
* A failure for one host never stops the others, and nothing here raises
  out of `run_loop`: a store or CA problem is logged and retried. A step that
  fails unexpectedly (a bug, `balancer.restarts`) `STAND_ASIDE_AFTER` times in
  a row releases the lock and takes none for two looks of the others
  (2 x (`CHECK_INTERVAL` + `TICK`)): another balancer's issuer takes over
  (bug: the failing step extended the lock at each look, and no other
  balancer could ever issue).
* `passes` counts the steps finished (whatever they did), and
  `passed_version` is the table version the last one began on: what was
  due then has been issued, or has failed, when both show
  (``GET /api/v1/acme`` → ``passes``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Mapping
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

import gevent
from gevent.event import Event

from balancer.certificates import CertificateError, make_record, public_record
from balancer.restarts import Restarts
from balancer.stores.base import StoreError
from management.acme_guard import Guard, Interrupted, IssueError
from management.acme_spread import ChallengeRelay
from management.certs_api import tell_workers

log = logging.getLogger("balancer.acme")

CHECK_INTERVAL = 10.0  # seconds between looks at what is due (sooner on a change)
TICK = 1.0  # seconds between checks of the table's version and of requests
LOCK_TTL = 60.0  # seconds the issuer lock lasts unless extended
EXTEND_EVERY = LOCK_TTL / 4  # seconds between extensions while an issuance runs
ISSUE_TIMEOUT = 180.0  # seconds one issuance may take, from order to certificate
BACKOFF_FIRST = 300.0  # seconds before the first retry of a failed host
BACKOFF_MAX = 6 * 3600.0  # the longest wait between retries
REISSUE_AFTER = 3600.0  # a certificate issued this recently is not renewed unasked
DAY = 86400.0
CLOCK_SKEW = 300.0  # seconds the clocks of a cluster's balancers may differ
# steps failing unexpectedly in a row after which the issuer hands the lock over
# and takes none for two other issuers' looks (`Issuer.stand_aside`)
STAND_ASIDE_AFTER = 3


def aside_seconds() -> float:
    """How long an issuer stands aside (`Issuer.stand_aside`): two looks of the others."""
    return 2 * (CHECK_INTERVAL + TICK)


def acme_hosts(hosts: Mapping[str, Any]) -> list[str]:
    """The table's hosts whose rule has ``"tls": "acme"`` (exact names only)."""
    return sorted(h for h, rule in hosts.items()
                  if isinstance(rule, Mapping) and rule.get("tls") == "acme"
                  and not h.startswith("*"))


class AcmeHosts:
    """`acme_hosts` of the table served, found again only when the table changes
    (the issuer looks every `CHECK_INTERVAL`: walking 100,000 rules each time
    held this process's loop ~50 ms, interpreted)."""

    def __init__(self) -> None:
        self.table: Any = None  # the table (the mirror's, replaced on each change) last read
        self.hosts: list[str] = []

    def of(self, table: Any) -> list[str]:
        if table is not self.table:
            self.table = table
            self.hosts = acme_hosts(table.hosts) if table is not None else []
        return self.hosts


def backoff(attempts: int) -> float:
    """Seconds before retry number `attempts` (1 = after the first failure)."""
    return min(BACKOFF_FIRST * 2 ** max(0, min(attempts - 1, 30)), BACKOFF_MAX)


def due(host: str, cert: Mapping[str, Any] | None, state: Mapping[str, Any] | None,
        renew_before: int, now: float) -> str | None:
    """Why `host` needs a certificate now, or None. A time in the state that
    cannot be true (a request or issuance in the future, a retry further than
    the longest backoff: a damaged or hand-edited store) is ignored: it would
    otherwise issue in a loop or never again."""
    state = state or {}
    asked = _moment(state.get("requested"), now + CLOCK_SKEW)
    if asked is not None and asked > _number(state.get("attempted")):
        return "requested by an operator"
    retry = _moment(state.get("next_retry"), now + BACKOFF_MAX + CLOCK_SKEW)
    if state.get("state") == "failed" and retry is not None and retry > now:
        return None
    if cert is None:
        return "no certificate"
    shown = public_record(host, dict(cert), now)
    not_after = shown.get("not_after")
    if "problem" in shown or not isinstance(not_after, (int, float)):
        return "the stored certificate cannot be read"
    if host not in shown.get("names", []):
        return "the stored certificate does not name it"
    if not_after - renew_before * DAY > now:
        return None
    issued = _moment(state.get("issued_at"), now + CLOCK_SKEW)
    if issued is not None and now - issued < REISSUE_AFTER:
        return None  # renew_before is longer than the CA's certificates last
    return f"expires {_when(not_after)}, within renew_before ({renew_before} days)"


def note_request(acme: Any, host: str, now: float) -> dict[str, Any]:
    """Note in the store that an operator asked for `host`'s certificate now."""
    state = dict(acme.states().get(host) or {})
    state.update(state="pending", requested=now, reason="requested by an operator")
    state.pop("next_retry", None)
    acme.put_state(host, state)
    log.info("acme: issuance for %s requested by an operator", host)
    return state


class Issuer:
    """Issues and renews the certificates of ``"tls": "acme"`` hosts for the cluster."""

    def __init__(self, settings: Any, store: Any, table: Any, runtime: Any) -> None:
        self.settings = settings.acme
        self.listeners = {"http-01": settings.server.listen + settings.server.internal_listen,
                          "tls-alpn-01": settings.tls.listen}
        self.store = store
        self.acme = store.acme()
        self.table = table  # () -> the hosts served (the management process's mirror)
        self.runtime = runtime
        self.ca: Any = None  # made at the first issuance (`authority`)
        self.owner = f"{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:6]}"
        self.holding = False
        self.stopped = False
        self.wake = Event()
        self.problem: str | None = None  # the last store problem or failure, logged once
        self.restarts = Restarts("acme", log, quiet=False, loop="the issuer's step",
                                 then="trying again at the next look")
        self.failed_steps = 0  # steps in a row that failed unexpectedly
        self.aside_until = 0.0  # (monotonic) no step, no lock, until then (`stand_aside`)
        self.owed_until = 0.0  # (monotonic) the lock's release failed: retried until then
        self.outcomes = {"ok": 0, "failed": 0}  # issuances finished here (`/metrics`)
        self.passes = 0  # steps finished (`GET /api/v1/acme`)
        self.passed_version: int | None = None  # the table version the last step began on
        self.task: Any = None
        self.relay = ChallengeRelay(self.acme, runtime, self.owner, self.has_work)
        self.relaying: Any = None
        self.acme_hosts = AcmeHosts()

    # lifecycle ----------------------------------------------------------
    def start(self) -> None:
        """Issue from now on (in the management process, after gevent patched `ssl`)."""
        if not self.listeners[self.settings.challenge]:
            log.warning("acme: challenge %s is answered on %s listeners, and this balancer "
                        "has none: the CA must reach another balancer of the cluster",
                        self.settings.challenge,
                        "plain" if self.settings.challenge == "http-01" else "TLS")
        self.task = gevent.spawn(self.run_loop)
        self.relaying = gevent.spawn(self.relay.relay_loop, lambda: self.stopped)

    def stop(self) -> None:
        """Stop issuing and hand the lock over (a running issuance is cut short)."""
        self.stopped = True
        self.wake.set()
        for task in (self.task, self.relaying):
            if task is not None:
                task.kill(timeout=5)
        with suppress(StoreError):  # else it goes stale by itself
            self.relay.forget()
        if self.holding or self.owed_until:
            with suppress(StoreError):  # else it lapses by itself
                self.acme.unlock(self.owner)
            self.holding = False

    def authority(self) -> Any:
        """The CA's client (`management.acme_ca.CA`), made at the first issuance:
        the ACME client, requests and josepy (~15 MiB) are imported only by a
        management process that issues (`balancer.preload`)."""
        if self.ca is None:
            try:
                from management.acme_ca import CA, adopt_patched_ssl
            except ImportError as exc:  # a failure of this host's issuance, retried
                raise IssueError(f"the ACME client cannot be imported: {exc}") from None
            adopt_patched_ssl()
            self.ca = CA(self.settings, self.acme)
        return self.ca

    def request(self, host: str) -> dict[str, Any]:
        """An operator asks for `host` now (`balancerctl cert issue`): noted in the
        store, so whichever balancer issues sees it; the host's state."""
        state = note_request(self.acme, host, time.time())
        self.wake.set()
        return state

    def has_work(self) -> bool:
        """Whether the table has ``"tls": "acme"`` hosts (looked at once per table)."""
        return bool(self.acme_hosts.of(self.table()))

    def run_loop(self) -> None:
        last_version, last_step = None, 0.0
        while not self.stopped:
            version = getattr(self.table(), "version", None)
            now = time.monotonic()
            if self.owed_until:
                self.retry_release(now)
            if now < self.aside_until:  # no look, so no pass (bug: counted, on `version`)
                gevent.sleep(min(TICK, self.aside_until - now))  # (wake may stay set)
                continue
            if self.wake.is_set() or version != last_version \
                    or now - last_step >= CHECK_INTERVAL:
                self.wake.clear()
                last_version, last_step = version, now
                self.safe_step()
                self.passes += 1
                self.passed_version = version
            self.wake.wait(TICK)

    def safe_step(self) -> None:
        """`step`; a store problem, or an exception no branch expects (a bug must
        not end issuing for good: `balancer.restarts`, logged once, not at every
        look), is `problem` (``GET /api/v1/acme``) until a step succeeds."""
        try:
            self.step()
        except StoreError as exc:
            if str(exc) != self.problem:
                log.error("acme: %s; retrying", exc)
                self.problem = str(exc)
            return
        except Exception as exc:
            self.problem = self.restarts.failed(exc)
            self.failed_steps += 1
            if self.failed_steps >= STAND_ASIDE_AFTER:
                self.stand_aside()
            return
        self.failed_steps = 0
        if self.problem is not None:
            log.warning("acme: the issuer's step succeeds again")
            self.problem = None

    def stand_aside(self) -> None:
        """After `STAND_ASIDE_AFTER` steps in a row failed unexpectedly: release the
        issuer lock and take none while another balancer's issuer looks twice (each
        looks every `CHECK_INTERVAL`, on a `TICK`), so that it takes the lock (its code
        or its store may work). Alone, this one tries again after; meanwhile
        `run_loop` takes no look (and counts no pass)."""
        aside = aside_seconds()
        self.failed_steps = 0
        self.aside_until = time.monotonic() + aside
        self.problem = f"{self.problem}; {STAND_ASIDE_AFTER} steps in a row failed: this " \
                       f"balancer takes no issuer lock for {aside:g} s"
        try:
            if self.holding:
                self.acme.unlock(self.owner)
        except StoreError as exc:
            self.owed_until = time.monotonic() + LOCK_TTL  # by then it lapsed by itself
            log.warning("acme: %s: %d steps in a row failed unexpectedly; releasing the issuer "
                        "lock failed (%s): trying again every %g s, taking none until it is "
                        "released or lapsed, then none for %g s", self.owner,
                        STAND_ASIDE_AFTER, exc, TICK, aside)
            return
        finally:
            self.holding = False
        log.warning("acme: %s: %d steps in a row failed unexpectedly; released the issuer "
                    "lock, taking none for %g s (another balancer's issuer may take it)",
                    self.owner, STAND_ASIDE_AFTER, aside)

    def retry_release(self, now: float) -> None:
        """The release `stand_aside` owes, tried again at each `TICK` of the aside
        until it is done or the lock lapsed by itself (`LOCK_TTL` after the last
        extension: none is made meanwhile); then no lock is taken for the aside's
        length, from then on. Bug: a release that failed (a store error) was not
        tried again, and the issuer, back after its aside, extended the lock it
        still held: no other balancer could take it."""
        if now < self.owed_until:
            try:
                self.acme.unlock(self.owner)
            except StoreError:
                self.aside_until = max(self.aside_until, now + TICK)
                return
            log.warning("acme: %s released the issuer lock (another balancer's issuer may "
                        "take it)", self.owner)
        self.owed_until = 0.0
        self.aside_until = max(self.aside_until, now + aside_seconds())

    # one step -----------------------------------------------------------
    def step(self) -> None:
        """Take the lock if there is work, then issue what is due."""
        hosts = self.acme_hosts.of(self.table())
        if not hosts:
            self.release()
            return
        if not self.take():
            return
        states = self.acme.states()
        certs = self.store.certs().all()
        for host in hosts:
            if self.stopped or not self.take():
                return
            why = due(host, certs.get(host), states.get(host), self.settings.renew_before,
                      time.time())
            if why is not None:
                self.issue(host, why, states.get(host) or {})
            elif host not in states and host in certs:
                self.note_issued(host, certs[host], None)  # issued before, or uploaded
        self.forget(set(hosts), states)

    def take(self) -> bool:
        """Take or extend the lock; whether this issuer holds it."""
        held = self.acme.lock(self.owner, LOCK_TTL)
        if held and not self.holding:
            log.info("acme: %s issues certificates for the cluster (took the lock)", self.owner)
        elif not held and self.holding:
            log.warning("acme: %s lost the issuer lock to another balancer", self.owner)
        self.holding = held
        return held

    def release(self) -> None:
        if self.holding:
            self.acme.unlock(self.owner)
            self.holding = False
            log.info("acme: no host has \"tls\": \"acme\"; released the issuer lock")

    def forget(self, hosts: set[str], states: Mapping[str, Any]) -> None:
        """Drop the state of hosts that no longer ask for ACME."""
        for host in states:
            if host not in hosts:
                self.acme.delete_state(host)

    # one host -----------------------------------------------------------
    def issue(self, host: str, why: str, state: dict[str, Any]) -> None:
        attempts = int(_number(state.get("attempts")))
        now = time.time()
        kind = self.settings.challenge
        self.acme.put_state(host, {**state, "state": "pending", "reason": why,
                                   "since": now, "attempted": now, "challenge": kind})
        log.info("acme: issuing a certificate for %s (%s) from %s, %s", host, why,
                 self.settings.directory, kind)
        guard = Guard(self.take, lambda: self.wants(host), ISSUE_TIMEOUT, EXTEND_EVERY, LOCK_TTL)
        try:
            ca = self.authority()  # imported outside the guard's deadline
            with guard:
                chain, key = ca.issue(host, kind, self.publish, self.withdraw,
                                      lambda: self.relay.spread(host), ISSUE_TIMEOUT)
                record = servable(host, chain, key)
                self.check_still_wanted(host)
                self.store.certs().put(host, record)
            tell_workers(self.runtime)  # this balancer's workers serve it now
        except Interrupted as cut:
            self.note_interrupted(host, cut)
            return
        except (IssueError, StoreError) as exc:
            self.outcomes["failed"] += 1
            self.note_failed(host, state, attempts + 1, str(exc), now,
                             getattr(exc, "retry_after", None))
            return
        self.outcomes["ok"] += 1
        self.note_issued(host, record, now)

    def wants(self, host: str) -> bool:
        """Whether the table still has `host` with ``"tls": "acme"``."""
        data = self.table()
        return data is not None and host in acme_hosts({host: data.hosts.get(host)})

    def check_still_wanted(self, host: str) -> None:
        """Just before storing: the lock held and the rule still asking (whatever
        the keeper saw last)."""
        if not self.take():
            raise Interrupted("another balancer took the issuer lock", True)
        if not self.wants(host):
            raise Interrupted('its rule no longer has "tls": "acme"', False)

    def note_interrupted(self, host: str, cut: Interrupted) -> None:
        """An issuance cut short is no failure: with the lock lost, the state is the
        new issuer's; with the rule gone, there is no state to keep."""
        if cut.lock_lost:
            self.holding = False
            log.warning("acme: issuing a certificate for %s stopped: %s; the balancer "
                        "holding the lock takes over", host, cut.reason)
            return
        log.warning("acme: issuing a certificate for %s stopped: %s; nothing stored",
                    host, cut.reason)
        with suppress(StoreError):  # else `forget` drops it at the next step
            self.acme.delete_state(host)

    def note_issued(self, host: str, record: Mapping[str, Any], attempted: float | None) -> None:
        """Record `host`'s certificate as issued (just now when `attempted` is set)."""
        shown = public_record(host, dict(record))
        not_after = float(shown.get("not_after") or 0)
        renew_at = not_after - self.settings.renew_before * DAY
        state = {"state": "issued", "not_after": not_after, "renew_at": renew_at,
                 "issuer": shown.get("issuer", ""), "attempts": 0}
        if attempted is not None:
            state.update(attempted=attempted, issued_at=time.time())
        self.acme.put_state(host, state)
        if attempted is not None:
            log.info("acme: certificate for %s issued by %s, valid until %s; renewal from %s",
                     host, shown.get("issuer", "?"), _when(not_after), _when(renew_at))

    def note_failed(self, host: str, state: Mapping[str, Any], attempts: int, reason: str,
                    now: float, asked: float | None = None) -> None:
        """Record the failure; the next try after the backoff, or after what the CA
        asked to wait (`asked`, a 429's Retry-After) when longer, `BACKOFF_MAX` at most."""
        retry = now + max(backoff(attempts), min(asked or 0.0, BACKOFF_MAX))
        kept = {k: state[k] for k in ("issued_at", "not_after", "renew_at", "issuer")
                if k in state}
        self.acme.put_state(host, {**kept, "state": "failed", "reason": reason,
                                   "attempts": attempts, "failed_at": now, "attempted": now,
                                   "next_retry": retry, "challenge": self.settings.challenge})
        log.error("acme: issuing a certificate for %s failed (attempt %d): %s; next try %s",
                  host, attempts, reason, _when(retry))

    # challenges ---------------------------------------------------------
    def publish(self, name: str, record: dict[str, Any]) -> None:
        self.acme.put_challenge(name, record)

    def withdraw(self, name: str) -> None:
        if not self.holding:
            return  # the lock's new holder may have published under the same name
        try:
            self.acme.delete_challenge(name)
        except StoreError as exc:
            log.warning("acme: cannot withdraw challenge %s (it expires by itself): %s",
                        name, exc)
        self.relay.tell_workers()


def servable(host: str, chain: str, key: str) -> dict[str, Any]:
    """The store record of what the CA issued; IssueError when it cannot serve
    `host` (`balancer.certificates.check`: a chain for another name or key, out of
    order, expired, not PEM)."""
    try:
        return make_record(host, chain, key, source="acme")
    except CertificateError as exc:
        raise IssueError(f"the CA's certificate cannot be served: {exc}") from None


def _moment(value: Any, latest: float) -> float | None:
    """A stored time (UNIX seconds) no later than `latest`, else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value <= latest:
        return None  # (NaN compares false)
    return float(value)


def _number(value: Any) -> float:
    """A stored number, or 0 for anything else (a hand-edited or damaged state)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return 0.0
    return float(value) if abs(value) < 1e12 else 0.0


def _when(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
