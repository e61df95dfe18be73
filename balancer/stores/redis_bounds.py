"""A bound on what one Redis answer may bring in (`balancer.stores.redis_connect`).

Bug: one 200 MB rule written into ``NS:hosts`` by another program grew every
worker and management process to ~500 MB and stalled each for more than 10 s
(the store shown unreachable while its reads timed out), at every read.

Invariants:
* A connection reads at most `MAX_ANSWER` bytes off its socket for one answer,
  counted as they arrive, before hiredis parses them into Python objects; past
  it the connection is dropped and the command fails with `AnswerTooBig`, which
  the store reports as a corrupt store naming the bound (`balancer.stores.redis`),
  the table served kept. A 100,000-host table's whole ``HGETALL`` is about 7 MB.
* Counting costs one Python call per ``recv`` (up to 64 KiB), none per field.
"""

from __future__ import annotations

from typing import Any

from redis._parsers import _HiredisParser

from balancer.stores.base import CorruptStore

MAX_ANSWER = 64 * 2**20  # bytes of one Redis answer: 9 times a 100,000-host HGETALL


class AnswerTooBig(CorruptStore):
    """Redis answered with more than a connection's bound (`MAX_ANSWER`)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"Redis answered a read with more than {limit:,} bytes (the "
                         "bound of one answer): another program wrote a huge value; "
                         "the read was dropped unparsed (docs/stores.md)")


class _Counting:
    """A hiredis reader that counts the bytes fed since `count` was last set to 0."""

    __slots__ = ("reader", "count", "limit")

    def __init__(self, reader: Any, limit: int) -> None:
        self.reader, self.count, self.limit = reader, 0, limit

    def feed(self, data: Any, offset: int = 0, length: int = -1) -> None:
        self.count += length if length >= 0 else len(data) - offset
        if self.count > self.limit:
            raise AnswerTooBig(self.limit)
        self.reader.feed(data, offset, length)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reader, name)


class BoundedParser(_HiredisParser):  # type: ignore[misc]
    """redis-py's hiredis parser reading at most `limit` bytes per answer."""

    limit = MAX_ANSWER

    def on_connect(self, connection: Any, **kwargs: Any) -> None:
        super().on_connect(connection, **kwargs)
        self._reader = _Counting(self._reader, self.limit)

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if self._reader is not None:
            self._reader.count = 0
        return super().read_response(*args, **kwargs)
