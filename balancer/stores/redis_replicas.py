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
* redis-py reconnects silently when it finds a pooled socket closed (a
  failover's sentinels ``CLIENT KILL`` the old master's clients), to the master
  the sentinels name then: so the connection is made before the block's first
  write (`Writer.ready`), its reconnects are counted, and a ``WAIT`` goes only
  over the connection the writes went over, never a new one (bug: the new
  master's replicas answered it, for a write that master never had).
* Clients are made at the first write (workers, which only read, make none)
  and kept; one block uses a client at a time, and at most `WRITERS` are ever
  made: a block finding all of them in use waits for one, up to the store's
  timeout (bug: beyond 8 kept, a client was made and closed per write; through
  Sentinel each was a new set of sentinel connections and a master lookup).
  Through Sentinel the clients share one set of sentinel connections
  (`balancer.stores.redis_connect.Connector`).
* A block that knows it wrote nothing (a claim or lock another holds, an
  entry already gone: `Writing.wrote`) sends no ``WAIT``: its ``WAIT`` would
  vouch for earlier writes, and with the replicas down answer a
  `StoreNotReplicated` that says a write was applied (bug: a deploy refused
  because another held the host answered 503 after `wait`, not 409).
* A write whose replicas did not acknowledge it in time was applied by the
  master: `StoreNotReplicated` says so, never that nothing was written.
* Their socket timeout is the store's plus `wait_ms` (`Connector`), so that a
  ``WAIT`` is answered by Redis (with the replicas that acknowledged) before
  the socket gives up.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError

from balancer.stores.base import StoreNotReplicated, StoreUnavailable
from balancer.stores.redis_answers import why
from balancer.stores.redis_connect import Connector
from balancer.stores.urls import Replication

# clients (each one connection to the master) a store writes with, all kept once
# made: writes of one store contend on its keys (WATCH), so more at once would
# only retry more; the rest wait for one of these
WRITERS = 16


@dataclass
class Writing:
    """One block of writes: the client to make them with, what they are (for
    the error when they are not replicated; the block may name its result), and
    whether it wrote anything (a block sets False on a path it knows wrote
    nothing; unsure, it leaves True and waits)."""

    client: Any
    what: str = "the write"
    wrote: bool = True


class WritingBlock(Protocol):
    """`RedisStore._writing`, as the store's parts (certificates, records, ACME) call it."""

    def __call__(self, what: str = ...) -> contextlib.AbstractContextManager[Writing]: ...


class Writer:
    """A client whose pool holds one connection, and how many times that
    connection connected since `ready` first saw it."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.connection: Any = None  # the pool's one connection, once made
        self.connects = 0

    def ready(self) -> int:
        """Connect now (again, if the socket was found closed), before the block's
        first write; the connects so far, which the block's ``WAIT`` checks."""
        pool = self.client.connection_pool
        connection = pool.get_connection()
        pool.release(connection)
        if connection is not self.connection:  # the first, or one redis-py made anew
            self.connection = connection
            connection.register_connect_callback(self._connected)
        return self.connects

    def _connected(self, connection: Any) -> None:
        self.connects += 1


class Writers:
    """Clients of one connection each, for write blocks that end with ``WAIT``."""

    def __init__(self, make: Connector, replication: Replication, where: str,
                 timeout: float) -> None:
        self._make = make  # clients whose pools hold one connection
        self.replication = replication
        self.where = where
        self.timeout = timeout  # seconds a block waits for a client, at most
        self._idle: list[Writer] = []
        self._free = threading.BoundedSemaphore(WRITERS)  # clients made or to make

    @contextlib.contextmanager
    def held(self) -> Iterator[Writer]:
        """A client for one block of writes (and its ``WAIT``), given back after;
        `StoreUnavailable` (nothing written) when none was free in `timeout`."""
        if not self._free.acquire(timeout=self.timeout):
            raise StoreUnavailable(f"{self.where}: all {WRITERS} write connections stayed "
                                   f"in use for {self.timeout:g} s (writes waiting for their "
                                   f"replicas); nothing was written")
        try:
            writer = self._idle.pop() if self._idle else Writer(self._make())
            try:
                yield writer
            finally:
                self._idle.append(writer)
        finally:
            self._free.release()

    def wait(self, writer: Writer, since: int, what: str) -> None:
        """``WAIT`` for the replicas to acknowledge the writes made with `writer`
        since `Writer.ready` returned `since`; `StoreNotReplicated` naming `what`
        was written when fewer did in time, or the connection was lost."""
        wanted, millis = self.replication.replicas, self.replication.wait_ms
        pool = writer.client.connection_pool
        try:
            connection = pool.get_connection()  # may reconnect: counted
        except (RedisError, OSError) as exc:
            raise self._not_replicated(what, f"the WAIT for them got no answer "
                                             f"({why(exc)})") from exc
        try:
            if connection is not writer.connection or writer.connects != since:
                raise self._not_replicated(what, "the connection they were made on was "
                                                 "lost before the WAIT for them")
            connection.send_command("WAIT", wanted, millis)
            acknowledged = int(connection.read_response())
        except (RedisError, OSError, ValueError) as exc:
            connection.disconnect()  # an answer may be left unread on it
            raise self._not_replicated(what, f"the WAIT for them got no answer "
                                             f"({why(exc)})") from exc
        finally:
            pool.release(connection)
        if acknowledged < wanted:
            raise self._not_replicated(what, f"{acknowledged} of them did within {millis} ms")

    def _not_replicated(self, what: str, how: str) -> StoreNotReplicated:
        wanted = self.replication.replicas
        reason = (f"the store wants {wanted} replica{'s' if wanted > 1 else ''} to "
                  f"acknowledge every write and {how}")
        return StoreNotReplicated(
            f"{self.where}: {what} was applied by the Redis master, but {reason}: it is "
            f"served, and it may still be lost if the master fails over before it is "
            f"replicated; read it back before writing again (a retry with If-Match is safe)",
            self.where, reason)

    def close(self) -> None:
        while self._idle:
            self._idle.pop().client.close()
        self._make.close()
