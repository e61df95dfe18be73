"""Balancing algorithms: which backend a request goes to.

Invariants:
* A balancer is built once per compiled rule; `pick` is the only per-request
  call and does no I/O. Every structure it needs is built in `__init__`.
* `pick` never returns a backend in `tried`; it prefers available backends,
  and when none is available it still returns an untried one (a dead mark
  never takes a site down by itself). It returns None when all were tried.
* `Backend.is_available` turns an expired down mark into the one half-open
  probe, so it is called only on a backend `pick` is about to return; scans
  use the side-effect-free `is_healthy`.
* All algorithms are weight-aware: with equal load, backend i gets a share
  weight[i] / sum(weights) of the requests.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_right
from collections.abc import Sequence
from hashlib import blake2b
from itertools import accumulate
from random import random
from typing import Final

from balancer.pool import UP, Backend

MASK64: Final = (1 << 64) - 1
IP_HASH_CACHE = 65536  # clients whose backend order is remembered (cleared when full)
FIRST_SHARE: Final = 0.05  # the new backends' share of new requests when a warmup starts
SHARE_EVERY: Final = 0.1   # seconds between re-evaluations of a warmup's share


def may_take(backend: Backend, tried: Sequence[Backend]) -> bool:
    """Whether `backend` may take the next try (no side effect): not tried yet,
    and up, or down with its mark expired (its probe is due: `is_available`
    claims it)."""
    if tried and backend in tried:
        return False
    return backend.is_healthy or (not backend.checked_down
                                  and time.monotonic() >= backend.down_until)


class Balancer:
    """Base: weighted backends and the shared fallback of `pick`."""

    def __init__(self, backends: Sequence[Backend], weights: Sequence[int]) -> None:
        self.backends = list(backends)
        self.weights = list(weights)

    def pick(self, client: str, tried: Sequence[Backend]) -> Backend | None:
        """The backend for the next attempt of a request from `client`."""
        order = self.candidates(client)
        for backend in order:
            if backend not in tried and backend.is_available():
                return backend
        for backend in order:
            if backend not in tried:
                return backend
        return None

    def candidates(self, client: str) -> Sequence[Backend]:
        """Backends in the order this algorithm prefers them for one request."""
        return self.backends

    def any_untried(self, tried: Sequence[Backend]) -> Backend | None:
        for backend in self.backends:
            if backend not in tried:
                return backend
        return None

    def __repr__(self) -> str:
        listed = ", ".join(f"{b.key}*{w}" for b, w in zip(self.backends, self.weights, strict=True))
        return f"<{type(self).__name__} {listed}>"


class RoundRobin(Balancer):
    """Smooth weighted round robin (as nginx): even spread, weights respected.

    With weights, each pick is one step of the smooth order over the backends
    that may take it (`may_take`: untried, and up or due for their probe), as
    nginx steps over its available peers: a backend down has no weight
    meanwhile, and the others share its requests by theirs. Bug: the order was
    walked over every backend, as many steps as there are backends, and one
    down that weighs more than the others together took every step: each
    request went to it anyway."""

    def __init__(self, backends: Sequence[Backend], weights: Sequence[int]) -> None:
        super().__init__(backends, weights)
        self.current = [0] * len(self.backends)
        self.uniform = len(set(self.weights)) <= 1
        self.index = -1

    def _next_index(self, tried: Sequence[Backend]) -> int:
        """One step of the smooth order over the backends that `may_take` a
        request; -1 when none may."""
        current, weights = self.current, self.weights
        best, total = -1, 0
        for i, backend in enumerate(self.backends):
            if not may_take(backend, tried):
                continue
            current[i] += weights[i]
            total += weights[i]
            if best < 0 or current[i] > current[best]:
                best = i
        if best >= 0:
            current[best] -= total
        return best

    def pick(self, client: str, tried: Sequence[Backend]) -> Backend | None:
        backends = self.backends
        if not self.uniform:
            index = self._next_index(tried)
            if index >= 0 and backends[index].is_available():  # (claims a probe)
                return backends[index]
            return self.any_untried(tried)
        count = len(backends)
        for _ in range(count):
            index = self.index = (self.index + 1) % count
            backend = backends[index]
            if backend not in tried and backend.is_available():
                return backend
        return self.any_untried(tried)


class LeastConnections(Balancer):
    """Fewest in-flight requests per unit of weight; ties go by smooth weighted
    round robin among the tied backends (as nginx `least_conn`)."""

    def __init__(self, backends: Sequence[Backend], weights: Sequence[int]) -> None:
        super().__init__(backends, weights)
        self.inverse = [1.0 / w for w in self.weights]
        self.current = [0] * len(self.backends)

    def pick(self, client: str, tried: Sequence[Backend]) -> Backend | None:
        backends, inverse = self.backends, self.inverse
        best, best_load, ties = -1, 0.0, 0
        for i, backend in enumerate(backends):
            if backend.state is not UP or backend.checked_down:
                if backend not in tried and backend.is_available():
                    return backend  # the half-open probe goes out at once
                continue
            if tried and backend in tried:
                continue
            load = backend.in_flight * inverse[i]
            if best < 0 or load < best_load:
                best, best_load, ties = i, load, 1
            elif load == best_load:
                ties += 1
        if best < 0:
            return self.any_untried(tried)
        if ties > 1:
            best = self._break_tie(best_load, tried)
        return backends[best]

    def _break_tie(self, load: float, tried: Sequence[Backend]) -> int:
        """Smooth weighted round robin over the healthy untried backends at `load`."""
        weights, current, inverse = self.weights, self.current, self.inverse
        best, total = -1, 0
        for i, backend in enumerate(self.backends):
            if (backend.in_flight * inverse[i] != load or not backend.is_healthy
                    or backend in tried):
                continue
            current[i] += weights[i]
            total += weights[i]
            if best < 0 or current[i] > current[best]:
                best = i
        current[best] -= total
        return best


class RandomTwo(Balancer):
    """Power of two choices: two distinct backends drawn by weight, the one with
    fewer in-flight requests per unit of weight wins (the first drawn on a tie)."""

    def __init__(self, backends: Sequence[Backend], weights: Sequence[int]) -> None:
        super().__init__(backends, weights)
        self.cumulative = list(accumulate(self.weights))
        self.starts = [c - w for c, w in zip(self.cumulative, self.weights, strict=True)]
        self.total = self.cumulative[-1] if self.cumulative else 0
        self.inverse = [1.0 / w for w in self.weights]

    def draw_pair(self) -> tuple[int, int]:
        """Two distinct indexes: the first by weight, the second by weight among the rest."""
        cumulative, weights = self.cumulative, self.weights
        first = bisect_right(cumulative, random() * self.total)
        # draw from the total without `first`'s share, then step over its span
        point = random() * (self.total - weights[first])
        if point >= self.starts[first]:
            point += weights[first]
        return first, min(bisect_right(cumulative, point), len(cumulative) - 1)

    def pick(self, client: str, tried: Sequence[Backend]) -> Backend | None:
        backends = self.backends
        if len(backends) < 2:
            return super().pick(client, tried)
        i, j = self.draw_pair()
        a, b = backends[i], backends[j]
        if a.state is not UP and a not in tried and a.is_available():
            return a  # the half-open probe goes out at once
        if b.state is not UP and b not in tried and b.is_available():
            return b
        a_ok = a.is_healthy and a not in tried
        b_ok = b.is_healthy and b not in tried
        if a_ok and b_ok:
            return b if b.in_flight * self.inverse[j] < a.in_flight * self.inverse[i] else a
        if a_ok:
            return a
        if b_ok:
            return b
        return super().pick(client, tried)


class IpHash(Balancer):
    """Sticky by client address: weighted rendezvous hashing (highest random weight).

    Each (client, backend) pair gets a pseudo-random score u in (0, 1); the
    backend with the smallest -ln(u) / weight wins, which happens with
    probability weight / sum(weights). Adding or removing a backend moves only
    the clients that gain or lose it (a share weight / sum(weights)); every
    other client keeps its backend. The full score order is the retry order.
    """

    def __init__(self, backends: Sequence[Backend], weights: Sequence[int]) -> None:
        super().__init__(backends, weights)
        self.seeds = [hash64(b.key.encode()) for b in self.backends]
        self.cache: dict[str, tuple[Backend, ...]] = {}

    def candidates(self, client: str) -> Sequence[Backend]:
        order = self.cache.get(client)
        if order is None:
            order = self.rank(client)
            if len(self.cache) >= IP_HASH_CACHE:
                self.cache.clear()
            self.cache[client] = order
        return order

    def rank(self, client: str) -> tuple[Backend, ...]:
        """Every backend, in this client's order of preference."""
        point = hash64(client.encode())
        scored = sorted((-math.log((mix64(point ^ seed) + 0.5) / 2.0 ** 64) / weight, i)
                        for i, (seed, weight) in enumerate(zip(self.seeds, self.weights,
                                                               strict=True)))
        return tuple(self.backends[i] for _, i in scored)


class SlowStart(Balancer):
    """A deploy's switch (the rule's `draining`): new requests go to the new
    backends with a share that ramps linearly from `FIRST_SHARE` to 1 over
    `warmup` seconds from `since` (unix time, the same on every balancer), the
    rest to the old backends; from then on the old backends get no new request
    (their in-flight ones finish: the drain). While no backend of the side a
    request drew may take it (`may_take`: every one down, or tried), it goes to
    the other side. Each side keeps the rule's
    algorithm. The share is re-evaluated at most every `SHARE_EVERY` seconds
    (one monotonic clock read per pick, no system call)."""

    def __init__(self, new: Balancer, old: Balancer, since: float, warmup: float) -> None:
        super().__init__(new.backends + old.backends, new.weights + old.weights)
        self.new = new
        self.old = old
        self.start = time.monotonic() - (time.time() - since)
        self.warmup = warmup
        self.share = 0.0
        self.next_share = 0.0
        self.update_share(time.monotonic())

    def update_share(self, now: float) -> None:
        elapsed = now - self.start
        if self.warmup <= 0 or elapsed >= self.warmup:
            self.share, self.next_share = 1.0, math.inf
            return
        ramp = max(0.0, elapsed) / self.warmup
        self.share = FIRST_SHARE + (1.0 - FIRST_SHARE) * ramp
        self.next_share = now + SHARE_EVERY

    def is_warming(self) -> bool:
        """Whether the old backends still get a share of new requests (no clock read
        once the warmup is over)."""
        if self.share < 1.0:
            now = time.monotonic()
            if now >= self.next_share:
                self.update_share(now)
        return self.share < 1.0

    def pick(self, client: str, tried: Sequence[Backend]) -> Backend | None:
        if not self.is_warming():
            return self.new.pick(client, tried)
        first, then = (self.old, self.new) if self.draw(client) >= self.share else (
            self.new, self.old)
        if not any(may_take(b, tried) for b in first.backends):
            first, then = then, first  # (bug: its share went to a backend down first)
        backend = first.pick(client, tried)
        return backend if backend is not None else then.pick(client, tried)

    def draw(self, client: str) -> float:
        """A point in [0, 1): random per request, or fixed per client with ip_hash (a
        client then moves to the new backends once, as the share passes its point)."""
        if isinstance(self.new, IpHash):
            return (hash64(client.encode()) & 0xFFFF) / 65536.0
        return random()


def hash64(data: bytes) -> int:
    """A stable 64-bit hash (the same in every process and every run)."""
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


def mix64(value: int) -> int:
    """splitmix64's finaliser: spreads the bits of a 64-bit integer."""
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & MASK64
    return value ^ (value >> 31)


ALGORITHMS: Final[dict[str, type[Balancer]]] = {
    "round_robin": RoundRobin,
    "least_connections": LeastConnections,
    "random_two": RandomTwo,
    "ip_hash": IpHash,
}


def make_balancer(algorithm: str, backends: Sequence[Backend],
                  weights: Sequence[int]) -> Balancer:
    """The balancer named `algorithm` over `backends` (validated names only)."""
    return ALGORITHMS[algorithm](backends, weights)
