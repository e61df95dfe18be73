"""One issuance's guard (`management.acme_issuer`): bounded in time, and cut
short when this balancer loses the issuer lock or the host's rule stops asking
for ACME.

`Guard` is a context manager around one conversation with the CA, entered in
the issuing greenlet. A keeper greenlet looks every `LOOK_EVERY` seconds: it
extends the lock every `EXTEND_EVERY` seconds and checks that the host is
still wanted; on a loss it interrupts the issuing greenlet with `Interrupted`.
The whole body runs under one deadline: a CA that answers slowly, trickles
bytes or hangs ends in `IssueError` when it passes (each HTTP request has its
own read timeout too: `acme_ca.NETWORK_TIMEOUT`).

Invariants:
* `Interrupted` is a BaseException, so no ``except Exception`` in the ACME
  client or requests swallows it; the issuer catches it by name.
* The interruption is delivered from the hub only while the body runs (checked
  when it is delivered): it never lands after the guard is left.
* The keeper never outlives the body. A lock that cannot be extended (the store
  is down) counts as lost once `lock_ttl` seconds passed since it last was: by
  then another balancer may hold it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import gevent

from balancer.stores.base import StoreError

LOOK_EVERY = 1.0  # seconds between the keeper's looks at the rule


class IssueError(Exception):
    """Issuance failed; the message is the operator's reason (raised by
    `management.acme_ca` too, which is imported only once a balancer issues).
    `retry_after`: the seconds the CA asked to wait (``Retry-After`` of a 429 or
    503), or None."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class Interrupted(BaseException):
    """The issuance was cut short; `lock_lost` tells which way."""

    def __init__(self, reason: str, lock_lost: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.lock_lost = lock_lost


class Guard:
    """Deadline, lock extension and rule watch for one issuance (see the module doc)."""

    def __init__(self, extend: Callable[[], bool], wanted: Callable[[], bool],
                 timeout: float, extend_every: float, lock_ttl: float) -> None:
        self.extend = extend  # extend (or take) the lock; whether it is held
        self.wanted = wanted  # whether the host's rule still asks for ACME
        self.timeout = timeout
        self.extend_every = extend_every
        self.lock_ttl = lock_ttl
        self.active = False
        self.issuing: Any = None
        self.keeper: Any = None
        self.timer: Any = None

    def __enter__(self) -> Guard:
        self.issuing = gevent.getcurrent()
        self.active = True
        self.timer = gevent.Timeout(self.timeout)
        self.timer.start()
        self.keeper = gevent.spawn(self.keeper_loop)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        self.active = False
        self.keeper.kill(block=False)
        self.timer.close()
        if exc is not None and exc is self.timer:
            raise IssueError(f"the CA did not finish within {self.timeout:.0f}s "
                             f"(slow or hanging answers)") from None
        return False

    def keeper_loop(self) -> None:
        held_at = extended_at = time.monotonic()
        while self.active:
            gevent.sleep(LOOK_EVERY)
            now = time.monotonic()
            if now - extended_at >= self.extend_every:
                extended_at = now
                try:
                    held = self.extend()
                except StoreError:
                    held = None  # unknown: the body's own store calls report it
                if held is False:
                    self.interrupt("another balancer took the issuer lock", True)
                    return
                if held:
                    held_at = now
            if now - held_at >= self.lock_ttl:
                self.interrupt(f"the issuer lock could not be extended for "
                               f"{self.lock_ttl:.0f}s (store unreachable)", True)
                return
            if not self.wanted():
                self.interrupt('its rule no longer has "tls": "acme"', False)
                return

    def interrupt(self, reason: str, lock_lost: bool) -> None:
        """Raise `Interrupted` in the issuing greenlet, from the hub, if it still issues."""
        def deliver() -> None:
            if self.active:
                self.active = False
                self.issuing.throw(Interrupted(reason, lock_lost))

        gevent.get_hub().loop.run_callback(deliver)
