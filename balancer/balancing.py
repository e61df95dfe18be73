"""Balancing algorithms: which backend a request goes to.

Invariants:
* A balancer is built once per compiled rule; `pick` is the only per-request
  call and does no I/O.
* `pick` never returns a backend in `tried`; it prefers available backends,
  and when none is available it still returns an untried one (a dead mark
  never takes a site down by itself). It returns None when all were tried.
"""

from __future__ import annotations

from collections.abc import Sequence

from balancer.pool import Backend


class Balancer:
    """Base: weighted backends and the shared fallback of `pick`."""

    def __init__(self, backends: Sequence[Backend], weights: Sequence[int]) -> None:
        self.backends = list(backends)
        self.weights = list(weights)

    def pick(self, client: str, tried: Sequence[Backend]) -> Backend | None:
        """The backend for the next attempt of a request from `client`."""
        for backend in self.candidates(client):
            if backend not in tried and backend.is_available():
                return backend
        return self.any_untried(tried)

    def candidates(self, client: str) -> Sequence[Backend]:
        """Backends in the order this algorithm prefers them for one request."""
        raise NotImplementedError

    def any_untried(self, tried: Sequence[Backend]) -> Backend | None:
        for backend in self.backends:
            if backend not in tried:
                return backend
        return None


class RoundRobin(Balancer):
    """Smooth weighted round robin (as nginx): even spread, weights respected."""

    def __init__(self, backends: Sequence[Backend], weights: Sequence[int]) -> None:
        super().__init__(backends, weights)
        self.current = [0] * len(self.backends)
        self.total = sum(self.weights)
        self.uniform = len(set(self.weights)) <= 1
        self.index = -1

    def _next_index(self) -> int:
        if self.uniform:
            self.index = (self.index + 1) % len(self.backends)
            return self.index
        current, weights = self.current, self.weights
        best = 0
        for i, weight in enumerate(weights):
            current[i] += weight
            if current[i] > current[best]:
                best = i
        current[best] -= self.total
        return best

    def pick(self, client: str, tried: Sequence[Backend]) -> Backend | None:
        backends = self.backends
        for _ in range(len(backends)):
            backend = backends[self._next_index()]
            if backend not in tried and backend.is_available():
                return backend
        return self.any_untried(tried)

    def candidates(self, client: str) -> Sequence[Backend]:
        return self.backends


ALGORITHMS: dict[str, type[Balancer]] = {
    "round_robin": RoundRobin,
}


def make_balancer(algorithm: str, backends: Sequence[Backend],
                  weights: Sequence[int]) -> Balancer:
    """The balancer named `algorithm` over `backends` (validated names only)."""
    return ALGORITHMS[algorithm](backends, weights)
