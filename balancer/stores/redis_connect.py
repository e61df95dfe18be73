"""Making the redis-py clients of a Redis store, from its URL (`balancer.stores.redis`).

Invariants:
* Every client has socket and connect timeouts and no retries of its own: a
  dead or stalled Redis fails a command in about the timeout, never hangs it,
  and the store decides what is tried again.
* Answers are decoded as UTF-8 with ``surrogateescape``: bytes that are not
  UTF-8 (only another program writes them) reach the store's checks, which
  name them, instead of failing inside redis-py.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from balancer.stores.urls import SENTINEL_SCHEME, StoreUrlError, parse_sentinel_url, redact_url


def connect(url: str, timeout: float, wait: float = 0.0,
            max_connections: int | None = None) -> redis.Redis:
    """A client for ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://``
    (`url` without the balancer's own options: `split_replication`); its commands
    time out after `timeout` + `wait` seconds (connecting, and the sentinels,
    after `timeout`)."""
    options: dict[str, Any] = {"socket_timeout": timeout + wait,
                               "socket_connect_timeout": timeout,
                               "retry": Retry(NoBackoff(), 0), "decode_responses": True,
                               "encoding_errors": "surrogateescape"}
    if max_connections is not None:
        options["max_connections"] = max_connections
    if url.startswith(SENTINEL_SCHEME):
        target = parse_sentinel_url(url)
        sentinel = Sentinel(list(target.sentinels),
                            sentinel_kwargs={"socket_timeout": timeout,
                                             "socket_connect_timeout": timeout},
                            **options)
        return sentinel.master_for(target.service_name, db=target.db,
                                   username=target.username, password=target.password)
    try:
        return redis.Redis.from_url(url, **options)
    except ValueError as exc:
        raise StoreUrlError(f"{redact_url(url)}: {exc}") from None
