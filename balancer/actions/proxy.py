"""`proxy`: forward to one of the rule's backends, with retries and passive health.

Invariants:
* Retries go to a different backend each time, at most `retries` of them,
  within `retry_timeout` seconds in all.
* Connect failures are always retried. After bytes were sent, only
  idempotent requests whose body was not streamed are retried, and only
  while nothing was sent to the client.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from balancer.balancing import make_balancer
from balancer.errors import (
    BackendClosed,
    BackendProtocolError,
    BackendTimeout,
    ConnectError,
    PayloadTooLarge,
    ProxyError,
)
from balancer.relay import forward
from balancer.rules import backend_entries

IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"))
DEFAULT_RETRIES = 2
DEFAULT_FALL = 3
DEFAULT_RETRY_TIMEOUT = 15.0


class ProxyAction:
    """Forwards requests to the backends of one rule."""

    def __init__(self, rule: Mapping[str, Any], registry: Any, host_stats: Any) -> None:
        self.rule = rule
        entries = backend_entries(rule)
        self.backends = [registry.get(address) for address, _ in entries]
        self.balancer = make_balancer(rule.get("algorithm", "round_robin"), self.backends,
                                      [weight for _, weight in entries])
        self.retries = rule.get("retries", DEFAULT_RETRIES)
        self.retry_timeout = rule.get("retry_timeout", DEFAULT_RETRY_TIMEOUT)
        self.max_body = rule.get("max_body_bytes")
        self.fall = rule.get("health", {}).get("fall", DEFAULT_FALL)
        self.backend_stats = {}
        for backend in self.backends:
            stats = host_stats.backend(backend.key)
            stats.source = backend
            self.backend_stats[backend.key] = stats

    def handle(self, ex: Any) -> None:
        head = ex.head
        max_body = self.max_body
        if max_body is not None and (head.content_length or 0) > max_body:
            raise PayloadTooLarge("Content-Length over max_body_bytes")
        body = None
        if head.has_body:
            body = ex.conn.buffered_body()
            if body is not None:
                ex.received += len(body)
                ex.body_done = True
                if max_body is not None and len(body) > max_body:
                    raise PayloadTooLarge("body over max_body_bytes")
        self.forward_with_retries(ex, body)

    def forward_with_retries(self, ex: Any, body: bytes | None) -> None:
        head = ex.head
        replayable = head.method in IDEMPOTENT and (body is not None or not head.has_body)
        tried: list = []
        failure: ProxyError = ConnectError("no backend to try")
        while True:
            backend = self.balancer.pick(ex.conn.client_ip, tried)
            if backend is None:
                raise failure
            tried.append(backend)
            failure = self.attempt(ex, backend, body)
            if failure is None:
                return
            retryable = isinstance(failure, ConnectError) or (replayable and not ex.started)
            if (not retryable or len(tried) > self.retries
                    or time.perf_counter() - ex.start > self.retry_timeout):
                raise failure

    def attempt(self, ex: Any, backend: Any, body: bytes | None) -> ProxyError | None:
        """One try on `backend`: None on success, else the failure (already counted)."""
        stats = self.backend_stats[backend.key]
        ex.backend = backend.key
        stats.in_flight += 1
        try:
            forward(ex, backend, body, self.max_body)
        except ConnectError as exc:
            return self._failed(backend, stats, "connect_error", exc)
        except BackendTimeout as exc:
            return self._failed(backend, stats, "timeout", exc)
        except (BackendClosed, BackendProtocolError) as exc:
            return self._failed(backend, stats, "error", exc)
        finally:
            stats.in_flight -= 1
        stats.outcomes["success"] += 1
        backend.record_success()
        return None

    def _failed(self, backend: Any, stats: Any, outcome: str, exc: ProxyError) -> ProxyError:
        stats.outcomes[outcome] += 1
        stats.failures += 1
        backend.record_failure(self.fall)
        return exc
