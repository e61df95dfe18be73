"""A bound on what one Redis answer may bring in (`balancer.stores.redis_connect`).

Bug: one 200 MB rule written into ``NS:hosts`` by another program grew every
worker and management process to ~500 MB and stalled each for more than 10 s
(the store shown unreachable while its reads timed out), at every read.

Invariants:
* A connection reads at most `MAX_ANSWER` bytes off its socket for one answer
  (plus the rest of the socket read that ended the answer before it: up to
  64 KiB), counted as they arrive, before hiredis parses them into Python
  objects; past it the command fails with `AnswerTooBig`, which the store reports
  as a corrupt store naming the bound (`balancer.stores.redis`), the table served
  kept. A 100,000-host table's whole ``HGETALL`` is about 7 MB.
* The count starts again only when hiredis hands out a whole answer, never when
  a read begins: a read given its own timeout (a pub/sub message looked for) may
  end with half an answer that the next read resumes (bug: each resumed read
  counted from 0, and a huge message arriving slowly was read whole). Past the
  bound every later read of the connection fails at once, until it is dropped
  (redis-py drops it, but for a subscription's: the watcher closes that).
* Only with hiredis (redis-py's fallback parsers are not counted):
  `parser_problem` names its absence, and `redis_connect` refuses to start.
* Counting costs one Python call per ``recv`` (up to 64 KiB) and one per answer,
  none per field.
"""

from __future__ import annotations

from typing import Any

from redis._parsers import _HiredisParser
from redis._parsers import hiredis as redis_hiredis

from balancer.stores.base import CorruptStore

MAX_ANSWER = 64 * 2**20  # bytes of one Redis answer: 9 times a 100,000-host HGETALL
_PARTIAL = redis_hiredis.NOT_ENOUGH_DATA  # what hiredis gives before an answer is whole


class AnswerTooBig(CorruptStore):
    """Redis answered with more than a connection's bound (`MAX_ANSWER`)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"Redis answered a read with more than {limit:,} bytes (the "
                         "bound of one answer): another program wrote a huge value; "
                         "the read was dropped unparsed (docs/stores.md)")


def parser_problem() -> str | None:
    """Why `BoundedParser` cannot read answers here (hiredis missing), or None."""
    if redis_hiredis.HIREDIS_AVAILABLE:
        return None
    return ("a Redis store needs the hiredis package, in a version redis-py works "
            "with (pip install 'redis[hiredis]'): the bound of one answer is "
            "counted by its parser (docs/stores.md)")


class _Counting:
    """A hiredis reader that counts the bytes fed since it last gave a whole answer."""

    __slots__ = ("reader", "count", "limit")

    def __init__(self, reader: Any, limit: int) -> None:
        self.reader, self.count, self.limit = reader, 0, limit

    def feed(self, data: Any, offset: int = 0, length: int = -1) -> None:
        self.count += length if length >= 0 else len(data) - offset
        if self.count > self.limit:
            raise AnswerTooBig(self.limit)
        self.reader.feed(data, offset, length)

    def gets(self, *args: Any) -> Any:
        answer = self.reader.gets(*args)
        if answer is not _PARTIAL:
            self.count = 0
        return answer

    def has_data(self) -> bool:
        return bool(self.reader.has_data())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.reader, name)


class BoundedParser(_HiredisParser):  # type: ignore[misc]
    """redis-py's hiredis parser reading at most `limit` bytes per answer."""

    limit = MAX_ANSWER

    def on_connect(self, connection: Any, **kwargs: Any) -> None:
        super().on_connect(connection, **kwargs)
        self._reader = _Counting(self._reader, self.limit)
