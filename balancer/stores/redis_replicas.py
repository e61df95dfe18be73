"""Writes that wait for replicas (``?replicas=N&wait=MS`` on a Redis store URL).

Redis replicates asynchronously: a write its master answered can be lost when
a replica that never received it is promoted. With ``replicas=N``, every write
block of the management process ends with ``WAIT N MS``, and is answered as
done only when N replicas acknowledged it (`Writers.wait`).

Invariants:
* ``WAIT`` counts the replicas that acknowledged the writes made on the
  connection it is sent on, so a block's writes and its ``WAIT`` share one
  connection: each block holds a client of its own whose pool has exactly one
  connection (`Writers.held`), and every command of the block (pipelines,
  ``WATCH``, scripts) and the ``WAIT`` go over it. Replication keeps the
  master's order, so an acknowledgement covers every write before it.
* Clients are made at the first write (workers, which only read, make none)
  and reused; one block uses a client at a time.
* A write whose replicas did not acknowledge it in time was applied by the
  master: `StoreNotReplicated` says so, never that nothing was written.
* Their socket timeout is the store's plus `wait_ms` (`make`), so that a
  ``WAIT`` is answered by Redis (with the replicas that acknowledged) before
  the socket gives up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError

from balancer.stores.base import StoreNotReplicated
from balancer.stores.redis_answers import why
from balancer.stores.urls import Replication

KEEP = 8  # idle clients kept for the next blocks; more concurrent writes make more


@dataclass
class Writing:
    """One block of writes: the client to make them with, and what they are (for
    the error when they are not replicated; the block may name its result)."""

    client: Any
    what: str = "the write"


class WritingBlock(Protocol):
    """`RedisStore._writing`, as the store's parts (certificates, records, ACME) call it."""

    def __call__(self, what: str = ...) -> contextlib.AbstractContextManager[Writing]: ...


class Writers:
    """Clients of one connection each, for write blocks that end with ``WAIT``."""

    def __init__(self, make: Callable[[], Any], replication: Replication, where: str) -> None:
        self._make = make  # a client whose pool holds one connection
        self.replication = replication
        self.where = where
        self._idle: list[Any] = []

    @contextlib.contextmanager
    def held(self) -> Iterator[Any]:
        """A client for one block of writes (and its ``WAIT``), given back after."""
        client = self._idle.pop() if self._idle else self._make()
        try:
            yield client
        finally:
            if len(self._idle) < KEEP:
                self._idle.append(client)
            else:
                client.close()

    def wait(self, client: Any, what: str) -> None:
        """``WAIT`` for the replicas to acknowledge the writes made with `client`;
        `StoreNotReplicated` naming `what` was written when fewer did in time."""
        wanted, millis = self.replication.replicas, self.replication.wait_ms
        try:
            acknowledged = int(client.execute_command("WAIT", wanted, millis))
        except (RedisError, OSError, ValueError) as exc:
            raise self._not_replicated(what, f"the WAIT for them got no answer "
                                             f"({why(exc)})") from exc
        if acknowledged < wanted:
            raise self._not_replicated(what, f"{acknowledged} of them did within {millis} ms")

    def _not_replicated(self, what: str, how: str) -> StoreNotReplicated:
        wanted = self.replication.replicas
        return StoreNotReplicated(
            f"{self.where}: {what} was applied by the Redis master, but the store wants "
            f"{wanted} replica{'s' if wanted > 1 else ''} to acknowledge every write and "
            f"{how}: it is served, and it may still be lost if the master fails over "
            f"before it is replicated; read it back before writing again (a retry with "
            f"If-Match is safe)")

    def close(self) -> None:
        while self._idle:
            self._idle.pop().close()
