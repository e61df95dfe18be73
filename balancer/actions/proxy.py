"""`proxy`: forward to one of the rule's backends, with retries and passive health.

Invariants:
* Retries go to a different backend each time, at most `retries` of them,
  within `retry_timeout` seconds in all.
* Connect failures are always retried. After bytes were sent, only
  idempotent requests whose body was not streamed are retried, and only
  while nothing was sent to the client. A connect that the client
  connection's own deadline cut (`ConnectOverdue`) is not the backend's
  failure: neither counted against it nor retried (a 504).
* A Content-Length body of up to `BUFFERED_BODY` bytes is read whole before
  any backend sees the request (as nginx buffers request bodies), so that it
  can be replayed however its bytes arrived; a larger body, a chunked one or
  one behind `Expect: 100-continue` streams.
* With `spin_when_down`, a request whose every try failed because backends
  were down (refused, or closed before answering a replayable request) is
  held instead of answered 502: it is tried again when a backend recovers,
  on a short backoff, and handed to the new rule when the host's rule
  changes; at the deadline it gets the `timeout` page (504).
* While held, connection attempts of all held requests of one rule are
  spaced at least `PROBE_GAP` apart; a success wakes every other one.
* `ip_hash` picks by the request's client as the limits name it
  (`balancer.sketch.client_address`): on a trusted listener the last
  X-Forwarded-For entry (bug: the front proxy's own address, so every client
  behind it went to one backend); the other algorithms ignore the client.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import Any, Final

from balancer.actions.secure import core
from balancer.balancing import Balancer, SlowStart, make_balancer
from balancer.connection import Exchange
from balancer.errors import (
    BackendClosed,
    BackendProtocolError,
    BackendTimeout,
    BackendTLSError,
    ConnectError,
    PayloadTooLarge,
    ProxyError,
)
from balancer.hold import Hold, Holds, hand_over
from balancer.http11 import declared_body
from balancer.pool import Backend
from balancer.relay import IDEMPOTENT, Flight, arrive, land
from balancer.rules import backend_entries
from balancer.sketch import client_address
from balancer.spans import Piece, join_pieces
from balancer.stats import BackendStats

DEFAULT_RETRIES: Final = 2
DEFAULT_FALL: Final = 3
DEFAULT_RETRY_TIMEOUT: Final = 15.0
FIRST_BACKOFF: Final = 0.05   # seconds between tries of a held request, doubling...
MAX_BACKOFF: Final = 0.5      # ...up to this (each wait jittered down to half)
PROBE_GAP: Final = 0.05       # at least this long between tries of one rule's held requests
BUFFERED_BODY: Final = 65536  # bytes of a Content-Length body read whole before forwarding


class ProxyAction:
    """Forwards requests to the backends of one rule."""

    def __init__(self, rule: Mapping[str, Any], registry: Any, host_stats: Any,
                 holder: Any = None, holds: Holds | None = None) -> None:
        self.rule = rule
        self.balancer = compile_balancer(rule, registry)
        self.backends = self.balancer.backends  # with a deploy's draining ones
        self.retries = rule.get("retries", DEFAULT_RETRIES)
        self.retry_timeout = rule.get("retry_timeout", DEFAULT_RETRY_TIMEOUT)
        self.by_client = rule.get("algorithm") == "ip_hash"  # (module doc)
        self.max_body = rule.get("max_body_bytes")
        self.fall = rule.get("health", {}).get("fall", DEFAULT_FALL)
        self.spin_when_down = rule.get("spin_when_down")
        self.verify = rule.get("backend_tls_verify", True)  # for https:// backends
        self.holder = holder
        self.holds = holds if holds is not None else Holds()
        self.next_probe = 0.0  # monotonic time before which held requests do not try
        self.backend_stats: dict[str, BackendStats] = {}
        for backend in self.backends:
            stats = host_stats.backend(backend.key)
            stats.source = backend
            self.backend_stats[backend.key] = stats

    def backend_keys(self) -> list[str]:
        return [backend.key for backend in self.backends]

    def handle(self, ex: Exchange) -> None:
        body = self.buffered_body(ex) if ex.head.has_body else None
        try:
            self.forward_with_retries(ex, body, ex.start)
        except ProxyError as failure:
            self.when_failed(ex, body, failure)

    def buffered_body(self, ex: Exchange) -> Piece | None:
        """The whole request body if it came with the head or is small enough to
        wait for (`BUFFERED_BODY`); None: it streams. Raises PayloadTooLarge over
        `max_body_bytes`, checked once, before the body is taken: a chunked body in
        hand has all its sizes declared already, and one waited for has a
        Content-Length (no body is larger than it says)."""
        head, max_body = ex.head, self.max_body
        if max_body is not None and declared_body(head) > max_body:
            raise PayloadTooLarge("Content-Length or chunk sizes over max_body_bytes")
        body = ex.conn.buffered_body()
        if body is not None:
            ex.count_body(body)
            ex.body_done = True
        elif (head.content_length is not None and head.content_length <= BUFFERED_BODY
              and not head.expect_continue):
            body = join_pieces(list(ex.body_chunks()))  # the rest is on its way: wait for it
        return body

    def resume(self, ex: Exchange, body: Piece | None) -> None:
        """Forward a request handed over from a hold, its body already read (`body`)."""
        if body is not None and self.max_body is not None and (
                declared_body(ex.head) > self.max_body):
            raise PayloadTooLarge("body over max_body_bytes")
        try:
            self.forward_with_retries(ex, body, time.monotonic())
        except ProxyError as failure:
            self.when_failed(ex, body, failure)

    def when_failed(self, ex: Exchange, body: Piece | None, failure: ProxyError) -> None:
        """Every try failed: hold the request (`spin_when_down`) or raise `failure`."""
        if self.spin_when_down is None or not self.is_down(failure, ex, body):
            raise failure
        with self.holds.held(ex):
            route = self.hold_while_down(ex, body)
        if route is not None:
            hand_over(route, ex, body)

    def forward_with_retries(self, ex: Exchange, body: Piece | None, since: float) -> None:
        """Try backends until one answers; raises the last failure. The first try
        is the one the hub began (`Exchange.flight`, `balancer.inline`), if any.

        `since` (time.monotonic, as `Exchange.start`) starts the `retry_timeout` budget."""
        flight = ex.flight
        if flight is None:
            flight = self.first_try(ex)
            if flight is None:
                raise ConnectError("no backend to try")
        backend = flight.backend
        failure = self.attempt(ex, flight, body)
        if failure is None:
            return
        replayable = is_replayable(ex, body)
        tried = [backend]
        while True:
            retryable = isinstance(failure, ConnectError) or (replayable and not ex.started)
            if (not retryable or len(tried) > self.retries
                    or time.monotonic() - since > self.retry_timeout):
                raise failure
            client = client_address(ex) if self.by_client else ex.conn.client_ip
            backend = self.balancer.pick(client, tried)
            if backend is None:
                raise failure
            tried.append(backend)
            failure = self.attempt(ex, self.start_try(ex, backend), body)
            if failure is None:
                return

    def first_try(self, ex: Exchange) -> Flight | None:
        """The first try of `ex` (`start_try` on the backend picked for it), or None
        when there is no backend to try."""
        client = client_address(ex) if self.by_client else ex.conn.client_ip  # (module doc)
        backend = self.balancer.pick(client, ())
        if backend is None:
            return None
        return self.start_try(ex, backend)

    def start_try(self, ex: Exchange, backend: Backend) -> Flight:
        """A try of `ex` on `backend`, counted in flight from now on."""
        stats = self.backend_stats[backend.key]
        ex.backend = backend.key
        stats.in_flight += 1
        if ex.head.upgrade:
            stats.tunnels += 1
        return Flight(backend, stats)

    def attempt(self, ex: Exchange, flight: Flight, body: Piece | None) -> ProxyError | None:
        """Take the try `flight` to its end (`start_try` began it, or the hub took it
        further: `Exchange.flight`): None on success, else the failure (already
        counted)."""
        ex.flight = None  # from now on this try is the action's alone
        backend, stats = flight.backend, flight.stats
        # One handler and no `finally`: mypyc makes a smaller C frame of it, and this
        # frame is saved with every greenlet waiting for its backend.
        try:
            arrive(ex, flight, body, self.max_body, self.verify)
        except BaseException as exc:
            stats.in_flight -= 1
            if ex.head.upgrade:
                stats.tunnels -= 1
            return self._failure(backend, stats, exc)
        self.landed(ex, flight)
        return None

    @staticmethod
    def landed(ex: Exchange, flight: Flight, now: float = 0.0) -> None:
        """The try `flight` answered `ex` (`arrive`, or the hub's `deliver`): landed
        (`land`: its connection pooled or closed, no longer in flight on its
        backend) and counted as its backend's success. Both paths end a try that
        answered here, so what it holds is released once whatever raises: `land`
        releases the backend's count first, and the rule's counts are released in
        the `finally` (a bug raised here ends the request without a retry: the
        greenlet's `attempt` calls this outside its handler, the hub's `_fault`
        finishes an exchange whose flight was taken off it). `now`: `CLOCK()` as
        read with nothing awaited since (`land`)."""
        stats = flight.stats
        try:
            land(flight, now)
        finally:
            stats.in_flight -= 1
            if ex.head.upgrade:
                stats.tunnels -= 1
        stats.successes += 1
        stats.observe(ex.backend_time)
        stats.bytes += ex.sent + ex.received
        flight.backend.record_success()

    def _failure(self, backend: Backend, stats: BackendStats,
                 exc: BaseException) -> ProxyError:
        """The failure of a try, counted against `backend`; raises `exc` again if it
        is not the backend's (the client's, a ConnectOverdue, a bug...)."""
        if isinstance(exc, BackendTLSError):
            return self._failed(backend, stats, "tls_error", exc)
        if isinstance(exc, ConnectError):
            return self._failed(backend, stats, "connect_error", exc)
        if isinstance(exc, BackendTimeout):
            return self._failed(backend, stats, "timeout", exc)
        if isinstance(exc, (BackendClosed, BackendProtocolError)):
            return self._failed(backend, stats, "error", exc)
        raise exc

    def _failed(self, backend: Any, stats: BackendStats, outcome: str,
                exc: ProxyError) -> ProxyError:
        stats.outcomes[outcome] += 1
        stats.failures += 1
        backend.record_failure(self.fall, exc)
        return exc

    # spin_when_down ------------------------------------------------------
    @staticmethod
    def is_down(failure: ProxyError, ex: Exchange, body: Piece | None) -> bool:
        """Whether `failure` says the backends are down and the request can wait."""
        if isinstance(failure, ConnectError):
            return True  # nothing was sent
        return isinstance(failure, BackendClosed) and is_replayable(ex, body) and not ex.started

    def hold_while_down(self, ex: Exchange, body: Piece | None) -> Any:
        """Retry until a backend answers (None) or the rule changes (the new route)."""
        hold = Hold(ex, self.holder, self.holds, self.spin_when_down or 0.0)
        backoff = FIRST_BACKOFF
        while True:
            route, changed = hold.lookup()
            if core(route.action) is not self:
                return route
            remaining = hold.remaining()
            recovered = [b.recovered_event() for b in self.backends]
            hold.wait([changed, *recovered],
                      min(remaining, backoff * (0.5 + random.random() / 2)))
            backoff = min(backoff * 2, MAX_BACKOFF)
            if changed.is_set():
                continue  # re-resolve the host first
            if not any(e.is_set() for e in recovered) and time.monotonic() < self.next_probe:
                continue  # another held request tried a moment ago
            self.next_probe = time.monotonic() + PROBE_GAP
            if self.try_again(ex, body):
                return None
            ex.conn.disarm()

    def try_again(self, ex: Exchange, body: Piece | None) -> bool:
        """One more round over the backends; True once answered. Raises a
        failure the request cannot wait out."""
        try:
            self.forward_with_retries(ex, body, time.monotonic())
        except ProxyError as failure:
            if not self.is_down(failure, ex, body):
                raise
            return False
        return True


def compile_balancer(rule: Mapping[str, Any], registry: Any) -> Balancer:
    """The rule's balancer; with `draining` (a deploy's switch), a `SlowStart` over
    the new backends and the draining ones."""
    algorithm = rule.get("algorithm", "round_robin")
    entries = backend_entries(rule)
    new = make_balancer(algorithm, [registry.get(address) for address, _ in entries],
                        [weight for _, weight in entries])
    draining = rule.get("draining")
    if draining is None:
        return new
    old_entries = backend_entries(draining)
    old = make_balancer(algorithm, [registry.get(address) for address, _ in old_entries],
                        [weight for _, weight in old_entries])
    return SlowStart(new, old, float(draining["since"]), float(draining["warmup"]))


def is_replayable(ex: Exchange, body: Piece | None) -> bool:
    """Whether the request can be sent again: idempotent, and its body (if any)
    in hand (`body`), not streamed."""
    head = ex.head
    return head.method in IDEMPOTENT and (body is not None or not head.has_body)
