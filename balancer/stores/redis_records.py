"""Deploy records in Redis (`balancer.stores.records`: the collections and their
invariants), for `RedisStore.records`. Apart from `records` so that a balancer
on the file store never imports `redis` (`balancer.preload`).

Every write goes through the store's `writing` (which waits for the replicas
the store URL asks for, ``replicas=N``, unless the block wrote nothing: a claim
another deploy holds, a release of a claim not held) but three:
* the in-flight reports: every balancer rewrites them every
  `management.deploys.WATCH_EVERY` seconds while a deploy runs, so a lost one is
  replaced at once, and waiting would slow the drain they time;
* the removal of the records `beyond_kept` (`_trim`), after a
  record's write: one a failover lost leaves a few old records more, which the
  next record's write removes, and the record's own write stands whatever
  became of it;
* a withdrawal (`withdraw`): it undoes, on the master, a start whose claim and
  record the replicas did not acknowledge; waiting for them again would only
  delay the refusal by another `wait`."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import WatchError

from balancer.stores.base import StoreUnavailable
from balancer.stores.records import (
    CLAIM_ATTEMPTS,
    MAX_DEPLOYS,
    MAX_GONE,
    UNREADABLE,
    Claimed,
    HandedOver,
    Records,
    beyond_gone,
    beyond_kept,
    decide_renew,
    handed_over,
    newest,
    tombstone,
)
from balancer.stores.redis_replicas import Writing, WritingBlock

log = logging.getLogger("balancer.deploys")


class RedisRecords(Records):
    """The records in five hashes: ``NS:deploys`` (id → JSON), ``NS:deploy-claims``
    (host → JSON), ``NS:deploy-inflight`` (balancer → JSON), ``NS:deploy-aborts``
    (id → JSON) and ``NS:deploys-gone`` (id → JSON)."""

    def __init__(self, client: Any, namespace: str, talking: Callable[[str], Any],
                 writing: WritingBlock) -> None:
        self.client = client
        self.talking = talking
        self.writing = writing
        self.deploys_key, self.claims_key, self.gone_key = _keys(namespace)
        self.inflight_key = f"{namespace}:deploy-inflight"
        self.aborts_key = f"{namespace}:deploy-aborts"

    def _all(self, key: str, doing: str = "read") -> dict[str, dict[str, Any]]:
        with self.talking(doing):
            return _objects(self.client.hgetall(key))

    def _trim(self) -> None:
        """Remove the records `beyond_kept`, after a record's write
        and apart from it: waited for by no replica, and a failure only logged, the
        next record's write removing what this one left (the module's doc). Bug: a
        removal the replicas did not acknowledge made the write of a record they had
        acknowledged answer `StoreNotReplicated`: a deploy's start was withdrawn for
        it, and a running deploy waited it out as an outage."""
        try:
            if len(self.deploys()) > MAX_DEPLOYS:
                self._forget()
        except StoreUnavailable as exc:
            log.info("deploy records: the old ones are removed at the next write: %s", exc)

    def _forget(self) -> None:
        """Remove the records `beyond_kept`, each known as `gone` from then on, read and
        removed in one transaction (the records and the claims watched), and forget the
        `gone` entries `beyond_gone`. Bug: removed by a read of the records made before
        the claims', a deploy that ended between the two reads lost its `done` record
        and was known as `running` (its `gone` entry), so its first process, back from
        a partition, claimed the host again for it."""
        with self.talking("write"):
            for _ in range(CLAIM_ATTEMPTS):
                with self.client.pipeline(transaction=True) as pipe:
                    pipe.watch(self.deploys_key, self.claims_key)
                    kept = [dict(r, id=i) for i, r in
                            _objects(pipe.hgetall(self.deploys_key)).items()]
                    beyond = set(beyond_kept(kept, _objects(pipe.hgetall(self.claims_key))))
                    if not beyond:
                        return
                    went = {r["id"]: json.dumps(tombstone(r), sort_keys=True)
                            for r in kept if r["id"] in beyond}
                    pipe.multi()
                    pipe.hdel(self.deploys_key, *went)
                    pipe.hset(self.gone_key, mapping=went)
                    pipe.hlen(self.gone_key)
                    try:
                        many = pipe.execute()[-1]
                    except WatchError:
                        continue
                break
            else:
                raise StoreUnavailable("gave up removing the old deploy records after "
                                       "concurrent writes")
            if many > MAX_GONE:
                self._forget_gone()

    def _forget_gone(self) -> None:
        """Remove the `gone` entries `beyond_gone` (apart from their records' removal:
        one left by a failure goes at the next)."""
        old = beyond_gone(self._all(self.gone_key, "write"))
        if old:
            with self.talking("write"):
                self.client.hdel(self.gone_key, *old)

    def gone(self, deploy_id: str) -> dict[str, Any] | None:
        return self._one(self.gone_key, deploy_id)

    def deploys(self) -> list[dict[str, Any]]:
        return newest([dict(r, id=i) for i, r in self._all(self.deploys_key).items()])

    def deploy(self, deploy_id: str) -> dict[str, Any] | None:
        return self._one(self.deploys_key, deploy_id)

    def _one(self, key: str, name: str) -> dict[str, Any] | None:
        """The JSON object under `name` in the hash `key` (None: absent or unreadable)."""
        with self.talking("read"):
            text = self.client.hget(key, name)
        return _object(text)

    def claim(self, host: str, deploy_id: str, owner: str, now: float,
              stale_after: float) -> str | None:
        with self.writing(f"the deploy claim on {host}") as writing:
            return self._claim(writing, host, deploy_id, owner, now, stale_after, None)

    def renew(self, host: str, deploy_id: str, owner: str, now: float,
              stale_after: float) -> str | None:
        """One transaction, as `claim`'s, that also reads the deploy's record when
        no claim is held (`Records.renew`)."""
        with self.writing(f"the deploy claim on {host}") as writing:
            return self._claim(writing, host, deploy_id, owner, now, stale_after, None,
                               renewing=True)

    def save_claimed(self, record: dict[str, Any], owner: str, now: float,
                     stale_after: float) -> str | None:
        """`renew`'s transaction, the record saved in it (`Records.save_claimed`)."""
        host, deploy_id = record["host"], record["id"]
        with self.writing(f"deploy {deploy_id}'s record") as writing:
            holder = self._claim(writing, host, deploy_id, owner, now, stale_after, record,
                                 renewing=True)
        if not handed_over(holder, deploy_id):
            self._trim()
        return holder

    def begin(self, record: dict[str, Any], now: float, stale_after: float) -> str | None:
        """The claim and the record in one transaction, so one ``WAIT`` (bug: a
        claim, a record and their clean-up each waited: a start the replicas did not
        acknowledge answered after 2-3 times `wait`)."""
        host, deploy_id = record["host"], record["id"]
        with self.writing(f"the start of deploy {deploy_id} (its claim on {host} and its "
                          f"record)") as writing:
            holder = self._claim(writing, host, deploy_id, record["owner"], now, stale_after,
                                 record)
        if holder is None:
            self._trim()
        return holder

    def _claim(self, writing: Writing, host: str, deploy_id: str, owner: str, now: float,
               stale_after: float, record: dict[str, Any] | None,
               renewing: bool = False) -> str | None:
        """`claim` with `writing`'s client, saving `record` in the same transaction;
        `renewing`: `renew`'s (the record read, watched, when no claim is held), and
        `record` saved too when another deploy holds the host (`save_claimed`)."""
        claim = json.dumps({"id": deploy_id, "owner": owner, "beat": now})
        keys = (self.deploys_key, self.claims_key, self.gone_key)
        for _ in range(CLAIM_ATTEMPTS):
            with writing.client.pipeline(transaction=True) as pipe:
                holder = _watched_holder(pipe, keys, host, Claimed(deploy_id, owner, now,
                                                                   stale_after), renewing)
                if holder is not None and (record is None or not renewing or
                                           handed_over(holder, deploy_id)):
                    writing.wrote = False  # another deploy's claim: nothing to wait for
                    return holder
                pipe.multi()
                if holder is None:  # (else another deploy's: the record saved alone)
                    pipe.hset(self.claims_key, host, claim)
                if record is not None:
                    pipe.hset(self.deploys_key, deploy_id, json.dumps(record, sort_keys=True))
                try:
                    pipe.execute()
                except WatchError:
                    continue
                return holder
        raise StoreUnavailable("gave up claiming the host after concurrent claims")

    def withdraw(self, record: dict[str, Any]) -> None:
        host, deploy_id = record["host"], record["id"]
        with self.talking("write"):  # waited for by no replica (`Records.withdraw`)
            for _ in range(CLAIM_ATTEMPTS):
                with self.client.pipeline(transaction=True) as pipe:
                    pipe.watch(self.claims_key)
                    held = _claim_id(pipe.hget(self.claims_key, host)) == deploy_id
                    pipe.multi()
                    pipe.hset(self.deploys_key, deploy_id, json.dumps(record, sort_keys=True))
                    if held:  # (its abort request too, as `release`)
                        pipe.hdel(self.claims_key, host)
                        pipe.hdel(self.aborts_key, deploy_id)
                    try:
                        pipe.execute()
                    except WatchError:
                        continue
                    return
        raise StoreUnavailable("gave up withdrawing the deploy after concurrent claims")

    def release(self, host: str, deploy_id: str) -> None:
        with self.writing(f"the release of the deploy claim on {host}") as writing:
            for _ in range(CLAIM_ATTEMPTS):
                with writing.client.pipeline(transaction=True) as pipe:
                    pipe.watch(self.claims_key)
                    if _claim_id(pipe.hget(self.claims_key, host)) != deploy_id:
                        writing.wrote = False  # not its claim (any more): nothing written
                        return
                    pipe.multi()
                    pipe.hdel(self.claims_key, host)
                    pipe.hdel(self.aborts_key, deploy_id)
                    try:
                        pipe.execute()
                    except WatchError:
                        continue
                    return

    def claims(self) -> dict[str, dict[str, Any]]:
        return self._all(self.claims_key)

    def request_abort(self, host: str, request: dict[str, Any],
                      deploy_id: str | None = None) -> str | None:
        with self.writing(f"the abort request of the deploy of {host}") as writing:
            for _ in range(CLAIM_ATTEMPTS):
                with writing.client.pipeline(transaction=True) as pipe:
                    pipe.watch(self.claims_key)
                    held = _claim_id(pipe.hget(self.claims_key, host))
                    if held is None or deploy_id not in (None, held):
                        writing.wrote = False  # not the deploy asked: nothing written
                        return None
                    pipe.multi()
                    pipe.hsetnx(self.aborts_key, held, json.dumps(request, sort_keys=True))
                    try:
                        pipe.execute()
                    except WatchError:
                        continue
                    return str(held)
        raise StoreUnavailable("gave up asking for the abort after concurrent claims")

    def abort_request(self, deploy_id: str) -> dict[str, Any] | None:
        return self._one(self.aborts_key, deploy_id)

    def report_inflight(self, balancer: str, report: dict[str, Any] | None) -> None:
        with self.talking("write"):  # not waited for (the module's doc)
            if report is None:
                self.client.hdel(self.inflight_key, balancer)
            else:
                self.client.hset(self.inflight_key, balancer, json.dumps(report, sort_keys=True))

    def inflight(self) -> dict[str, dict[str, Any]]:
        return self._all(self.inflight_key)


class Fence:
    """A deploy's rule write's claim (`Claimed`), checked and renewed inside the
    write's transaction (`RedisStore.put_host`): `check` after the ``WATCH`` (the
    claim watched too), `renew` inside the ``MULTI``."""

    def __init__(self, namespace: str, host: str, claimed: Claimed | None) -> None:
        self.keys = _keys(namespace)
        self.host = host
        self.claimed = claimed
        self.holder: str | None = None

    def check(self, pipe: Any) -> None:
        """`HandedOver` when the claim says another process runs the deploy, or
        ended it (nothing written then)."""
        if self.claimed is None:
            return
        self.holder = _watched_holder(pipe, self.keys, self.host, self.claimed, True)
        if handed_over(self.holder, self.claimed.deploy_id):
            raise HandedOver(str(self.holder))

    def renew(self, pipe: Any) -> None:
        """Queue the claim's renewal (unless another deploy holds it: damaged records)."""
        claimed = self.claimed
        if claimed is not None and self.holder is None:
            pipe.hset(self.keys[1], self.host, json.dumps(
                {"id": claimed.deploy_id, "owner": claimed.owner, "beat": claimed.now}))


def _keys(namespace: str) -> tuple[str, str, str]:
    """The hashes of the deploy records, of the claims and of the deploys gone."""
    return f"{namespace}:deploys", f"{namespace}:deploy-claims", f"{namespace}:deploys-gone"


def _watched_holder(pipe: Any, keys: tuple[str, str, str], host: str, claimed: Claimed,
                    renewing: bool) -> str | None:
    """`decide_renew`'s answer for `claimed` from the claim read under ``WATCH`` (and,
    `renewing` with no claim held, the deploy's record or its `gone` entry, watched
    too)."""
    deploys_key, claims_key, gone_key = keys
    pipe.watch(claims_key)
    held = _object(pipe.hget(claims_key, host))
    stored = None
    if renewing and held is None:  # (ended and released by another?)
        pipe.watch(deploys_key, gone_key)
        stored = _object(pipe.hget(deploys_key, claimed.deploy_id)) or \
            _object(pipe.hget(gone_key, claimed.deploy_id))
    return decide_renew(held, stored, claimed.deploy_id, claimed.owner, claimed.now,
                        claimed.stale_after)


def _objects(raw: dict[str, str]) -> dict[str, dict[str, Any]]:
    """The JSON objects of a hash read whole (the unreadable ones and others left out)."""
    found = {}
    for name, text in raw.items():
        with contextlib.suppress(*UNREADABLE):
            value = json.loads(text)
            if isinstance(value, dict):
                found[name] = value
    return found


def _object(text: str | None) -> dict[str, Any] | None:
    """The JSON object stored as `text` (None when absent, unreadable or no object)."""
    try:
        value = json.loads(text) if text else None
    except UNREADABLE:
        return None
    return value if isinstance(value, dict) else None


def _claim_id(text: str | None) -> str | None:
    """The deploy id of a stored claim (None when absent or unreadable)."""
    held = _object(text)
    return None if held is None else held.get("id")
