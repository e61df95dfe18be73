"""What a Redis store's watcher hears on its subscription (``NS:changes`` and
``NS:changed-hosts``; their format: `balancer.stores.redis`): `Inbox`, the
messages in order, and what a batch of them announces (`named_changes`).

Invariants:
* Each write publishes its version on ``NS:changes`` (SPEC §6: the version
  alone), a one-host write first ``VERSION HOST`` on ``NS:changed-hosts``, both
  in the write's transaction. The inbox drops a version on ``NS:changes`` that
  ``NS:changed-hosts`` announced just before it (only the version announced
  last: a stranger's announcement of a high version must not hide later
  writes); a version on ``NS:changes`` announced nowhere else is a whole-table
  write (`is_bare_version`).
* The subscription's replies (``subscribe``) are no messages: dropped here.
* Messages a whole read looked at (`Inbox.put_back`) come out again first, in
  their order, but for those of versions up to the one it read, which are in
  what it read (`read_at`): a message is taken from the subscription once,
  never lost. So are a whole-table write's messages the read holds that come
  within `lag` of it, of versions above the highest heard (sent on another
  connection than the read's answer, they may come after it), once a version
  was heard on this subscription; one heard before asks for another read
  (published again by hand: "look again"), as does any before the first.
"""

from __future__ import annotations

import time
from typing import Any

DRAIN_MAX = 1000          # queued messages folded into one batch
VERSION_DIGITS = 19       # a version's digits at most (2**63 - 1 has 19)


class Inbox:
    """The subscription's messages, without the announced versions' own."""

    def __init__(self, pubsub: Any, hosts_channel: str) -> None:
        self.pubsub = pubsub
        self.hosts_channel = hosts_channel
        self.announced = -1  # the version ``NS:changed-hosts`` last named hosts for
        self.back: list[Any] = []  # put back by a whole read: handed out first
        self.heard = -1  # the highest version heard on ``NS:changes``
        # an announcement of a version at or below one heard: the store went back
        # (flushed, then written again from a lower version), taken by `went_back`
        self._back_at: tuple[int, int] | None = None
        self.read_version = -1  # the version a whole read held ...
        self.read_until = 0.0  # ... and until when its writes' late messages are dropped

    def within(self, seconds: float) -> list[Any]:
        """The messages put back, else those that come within `seconds`; with those
        queued behind them (one read covers them all)."""
        kept, self.back = self.back, []
        deadline = time.monotonic() + seconds
        while not kept:
            left = deadline - time.monotonic()
            message = self.pubsub.get_message(timeout=max(0.0, left))
            if message is None:
                return []
            kept = self._kept(message)
            if left <= 0:
                break
        return kept + self.queued()

    def queued(self) -> list[Any]:
        """The messages already queued (up to `DRAIN_MAX`)."""
        kept: list[Any] = []
        for _ in range(DRAIN_MAX):
            message = self.pubsub.get_message(timeout=0)
            if message is None:
                break
            kept += self._kept(message)
        return kept

    def went_back(self) -> tuple[int, int] | None:
        """(the version announced, the higher one heard before) when a write was
        announced at a version this subscription heard already (then counted from
        there: each going back is told once): the store
        went back (a ``FLUSHALL``, a Redis restarted empty that the subscription
        outlived) and another writer counts again from below. Bug: its messages up
        to the version served were skipped as served already, and the next one's
        hosts applied on the table the store had lost: served, mixed, at the
        store's version, no problem reported."""
        back, self._back_at = self._back_at, None
        return back

    def put_back(self, messages: list[Any]) -> None:
        """`messages` (taken from this inbox) to be handed out again, first."""
        self.back = messages + self.back

    def read_at(self, version: int, lag: float) -> None:
        """The table was read whole at `version`: the messages put back or queued up
        to it are in it (a whole-table write's among them asks for no other read),
        as are those of versions never heard that come within `lag` (`_kept`).
        Bugs: two whole-table writes in a row, the second landing before the read
        the first asked for, were read whole twice (at the second one's message);
        and so they were when the second one's message came just after the read."""
        self.back = [m for m in self.back + self.queued()
                     if not (is_version_message(m) and _version_of(m) <= version)]
        self.read_version, self.read_until = version, time.monotonic() + lag

    def _kept(self, message: Any) -> list[Any]:
        """[`message`], or [] for the version on ``NS:changes`` announced just before,
        and for the subscription's own replies (kept from redis-py, whose
        ``ignore_subscribe_messages`` answers None for them: no message, to a drain)."""
        if message.get("type") != "message":
            return []
        words = str(message.get("data", "")).split()
        if message.get("channel") == self.hosts_channel:
            if len(words) > 1 and is_number(words[0]):
                self.announced = int(words[0])
                if self.announced <= self.heard:
                    self._back_at = self.announced, self.heard
                    self.heard = self.announced  # counted again from there
        elif len(words) == 1 and is_number(words[0]):
            version, heard = int(words[0]), self.heard
            self.heard = max(heard, version)
            if version == self.announced:
                return []
            # a write the whole read holds, its message late (`read_at`); not before a
            # message was heard here: the first read's version was written before the
            # subscription, and its number published then is a hand's "look again"
            if -1 < heard < version <= self.read_version \
                    and time.monotonic() < self.read_until:
                return []
        return [message]


def is_number(word: str) -> bool:
    """Whether `word` can be a version: digits, at most `VERSION_DIGITS`. Bug
    (review): a stranger's message of 5,000 digits raised in int() (Python reads
    4,300 at most): taken for a bug of ours, every process reported the store down
    and read the whole table again, at each such message."""
    return word.isdecimal() and len(word) <= VERSION_DIGITS


def is_version_message(message: Any) -> bool:
    words = str(message.get("data", "")).split()
    return bool(words) and is_number(words[0])


def _version_of(message: Any) -> int:
    return int(str(message.get("data", "")).split()[0])


def is_bare_version(message: Any) -> bool:
    return is_number(str(message.get("data", "")).strip())


def named_changes(messages: list[Any], base: int) -> tuple[int, int, list[str]] | None:
    """(first version, last version, hosts) of the messages after version `base` when
    every one names its hosts and those versions are consecutive; (`base`, `base`,
    []) when none is after it; None otherwise (a whole-table write, or a message
    that is no version: read the whole table). Messages up to `base` are served
    already (told directly, or read). Bugs: a batch that began at a version told
    directly was read whole (two balancers racing one-host writes on one store,
    the management processes' mirrors and the workers alike); and a whole-table
    write's own version, told directly, read the whole table again."""
    versions: list[int] = []
    hosts: dict[str, None] = {}
    for message in messages:
        words = str(message.get("data", "")).split()
        if not words or not is_number(words[0]):
            return None
        if int(words[0]) <= base:
            continue
        if len(words) < 2:
            return None
        versions.append(int(words[0]))
        hosts.update(dict.fromkeys(words[1:]))
    if not versions:
        return base, base, []
    versions.sort()
    if versions != list(range(versions[0], versions[0] + len(versions))):
        return None
    return versions[0], versions[-1], list(hosts)
