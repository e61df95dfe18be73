"""`spin`: hold the request while the app deploys, and apply the next rule.

Invariants:
* A held request waits on the table holder's change event, so it wakes on
  the swap itself, never on a polling tick.
* On wake it re-resolves its host against the new table; a route that is
  still `spin` keeps it waiting until the first rule's deadline, then the
  `timeout` page (504) with Retry-After.
* The cap and the client watch are `balancer.hold`'s: at most
  `spin_max_waiting` requests held per worker (503 `busy` beyond); a client
  that disconnects while held frees its slot at once; a stopping worker
  answers every held request 503 at once (`Holds.close`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from balancer.actions.secure import core
from balancer.hold import Hold, Holds, hand_over
from balancer.spans import Piece
from balancer.table import Route

DEFAULT_TIMEOUT = 120.0


class SpinAction:
    """Holds requests until the host's rule changes or `timeout` passes."""

    def __init__(self, rule: Mapping[str, Any], holder: Any, holds: Holds) -> None:
        self.rule = rule
        self.timeout = float(rule.get("timeout", DEFAULT_TIMEOUT))
        self.holder = holder
        self.holds = holds

    def handle(self, ex: Any) -> None:
        self.resume(ex, None)

    def backend_keys(self) -> Iterable[str]:
        return ()

    def resume(self, ex: Any, body: Piece | None) -> None:
        """Hold `ex` (whose body, if already read, is `body`), then apply the next rule."""
        with self.holds.held(ex):
            route = self.hold(ex)
        hand_over(route, ex, body)

    def hold(self, ex: Any) -> Route:
        """Wait until the host resolves to a non-spin route; return that route."""
        hold = Hold(ex, self.holder, self.holds, self.timeout)
        while True:
            route, changed = hold.lookup()
            if not isinstance(core(route.action), SpinAction):
                return route
            hold.wait((changed,), hold.remaining())
