"""What the management API's reads of the table answer with: the table this process
holds (`management.mirror`), checked against the store's version, and its
``GET /api/v1/hosts`` body, encoded once per version.

Invariants:
* Every read asks the store for its version and number of hosts
  (`Store.current_shape`: one Redis round trip, the file's stat; asked once
  for all the reads that arrive while it is asked, `_shape`) and answers
  with a table at that version or later: read-your-writes holds for the API's
  own writes (noted in the mirror before they answer), for concurrent readers
  and for another balancer's writes to the same store.
* The mirror's table answers when it is at the store's version with as many
  hosts. When the store is ahead, a read waits up to `CATCH_UP` seconds for
  the mirror's watcher to deliver it (unless the store reports a problem: the
  watcher then keeps the last good table); then (or with a mirror that follows
  nothing) the store's table is read whole, once for every read waiting on it
  (`_load`), and kept while the mirror is behind it. Another number of hosts
  at the mirror's version, or a store behind it, is read whole too, and a
  table behind the highest version the mirror knows, or rewritten at the
  mirror's version, is judged by the mirror (a lost table:
  `balancer.stores.snapshot.judge`; a damaged store: `rewritten`). Bug: a read
  after a flush, before the watcher's next resync (`store.resync_interval`,
  5 s), answered the emptied store's table as current (404 for every host).
* While the mirror reports a problem, or the store cannot be read, reads
  answer the table served and the problem (no table known: the store's error,
  503), as before this module.
* The body is encoded lazily, at the first read of a version, once however
  many reads wait on it; it is dropped when the mirror moves past its version,
  so an idle process holds no encoded body but the current one's, and none
  before a read.
"""

from __future__ import annotations

from typing import Any

from gevent.event import AsyncResult

from balancer.stores import CorruptStore, Store, StoreUnavailable, TableData
from balancer.stores.snapshot import rewritten
from management.http import encode_json
from management.mirror import Mirror

CATCH_UP = 1.0  # seconds a read waits for the mirror to reach the store's version


class TableReads:
    """The table the reads answer with, and its encoded list body."""

    def __init__(self, store: Store, mirror: Mirror) -> None:
        self.store = store
        self.mirror = mirror
        self._loaded: TableData | None = None  # read whole while the mirror was behind
        self._loading: AsyncResult | None = None  # the whole read under way
        self._asking: AsyncResult | None = None  # the `current_shape` under way
        self._encoded: tuple[int, bytes] | None = None  # (version, list body)
        mirror.listen(self._drop_behind)

    def readable(self) -> tuple[TableData, str | None]:
        """The table at the store's version, or the table served and why (the store
        lost its table or cannot be read, but this process knows the served one)."""
        served = self.mirror.table
        if self.mirror.problem and served is not None:
            return served, self.mirror.problem
        try:
            version, count = self._shape()
            data = self._held(version, count)
            if data is None:
                data = self._load()
        except (StoreUnavailable, CorruptStore) as exc:
            if served is None:
                raise
            return served, f"{exc}; showing the table this balancer serves (version " \
                f"{served.version})"
        served = self.mirror.table
        if self.mirror.problem and served is not None:
            return served, self.mirror.problem  # found while this read waited
        if served is not None and (data.version < self.mirror.highest or rewritten(
                data, served, self.store.display_url)):  # behind, or another table at
            self.mirror.on_table(data)  # its version: judged there (a race, or a loss?)
            return self.mirror.table or served, self.mirror.problem
        return data, None

    def body(self, data: TableData) -> bytes:
        """The encoded list body of `data`, a table `readable` answered without a
        problem: encoded at the first read of its version (a read of an older one, which
        began before the table moved, encodes it without keeping it)."""
        if self._encoded is not None and self._encoded[0] == data.version:
            return self._encoded[1]
        body = encode_json(list_body(data))
        if self._encoded is None or self._encoded[0] < data.version:
            self._encoded = (data.version, body)
        return body

    def _shape(self) -> tuple[int, int]:
        """`Store.current_shape`, asked after this call began: a read that arrives while
        it is asked waits for that answer (which may miss a write answered just before
        the read), then shares the next one with every read that waited. Bug: reads at
        once after another process rewrote a file store each parsed the file."""
        ahead = self._asking
        if ahead is not None:
            ahead.wait()
            if self._asking is not None:  # begun after `ahead` ended: after this read
                shape: tuple[int, int] = self._asking.get()
                return shape
        asking = self._asking = AsyncResult()
        try:
            shape = self.store.current_shape()
        except BaseException as exc:
            asking.set_exception(exc)
            raise
        finally:
            self._asking = None
        asking.set(shape)
        return shape

    def _held(self, version: int, count: int) -> TableData | None:
        """The table held at `version` (the mirror's, or one read whole), waiting for
        the mirror when the store is ahead of it; None: read the store's."""
        served = self.mirror.table
        if (served is not None and served.version < version and self.mirror.following
                and self.store.last_error() is None):  # (a watcher stuck on a problem
            # delivers nothing: bug, every read of a corrupt store waited `CATCH_UP`)
            self.mirror.wait_for(version, CATCH_UP)
            served = self.mirror.table
            if served is not None and (served.version > version or self.mirror.problem):
                return served  # later than the version asked (or a problem: `readable`)
        if served is not None and served.version == version and len(served.hosts) == count:
            return served
        loaded = self._loaded
        if loaded is not None and loaded.version == version and len(loaded.hosts) == count:
            return loaded
        return None

    def _load(self) -> TableData:
        """The store's whole table: one read for every read that asks meanwhile."""
        loading = self._loading
        if loading is not None:
            data: TableData = loading.get()
            return data
        loading = self._loading = AsyncResult()
        try:
            data = self.store.load()
        except BaseException as exc:
            loading.set_exception(exc)
            raise
        finally:
            self._loading = None
        loading.set(data)
        if data.version > self.mirror.version:
            self._loaded = data
        return data

    def _drop_behind(self) -> None:
        """The mirror moved: forget what is behind it."""
        version = self.mirror.version
        if self._loaded is not None and self._loaded.version <= version:
            self._loaded = None
        if self._encoded is not None and self._encoded[0] < version:
            self._encoded = None


def list_body(data: TableData) -> dict[str, Any]:
    return {"version": data.version, "hosts": data.hosts}
