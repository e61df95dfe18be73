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
    UNREADABLE,
    Records,
    beyond_kept,
    decide_renew,
    handed_over,
    newest,
)
from balancer.stores.redis_replicas import Writing, WritingBlock

log = logging.getLogger("balancer.deploys")


class RedisRecords(Records):
    """The records in four hashes: ``NS:deploys`` (id → JSON), ``NS:deploy-claims``
    (host → JSON), ``NS:deploy-inflight`` (balancer → JSON) and ``NS:deploy-aborts``
    (id → JSON)."""

    def __init__(self, client: Any, namespace: str, talking: Callable[[str], Any],
                 writing: WritingBlock) -> None:
        self.client = client
        self.talking = talking
        self.writing = writing
        self.deploys_key = f"{namespace}:deploys"
        self.claims_key = f"{namespace}:deploy-claims"
        self.inflight_key = f"{namespace}:deploy-inflight"
        self.aborts_key = f"{namespace}:deploy-aborts"

    def _all(self, key: str) -> dict[str, dict[str, Any]]:
        with self.talking("read"):
            raw = self.client.hgetall(key)
        found = {}
        for name, text in raw.items():
            with contextlib.suppress(*UNREADABLE):
                value = json.loads(text)
                if isinstance(value, dict):
                    found[name] = value
        return found

    def save_deploy(self, record: dict[str, Any]) -> None:
        with self.writing(f"deploy {record['id']}'s record") as writing:
            writing.client.hset(self.deploys_key, record["id"],
                                json.dumps(record, sort_keys=True))
        self._trim()

    def _trim(self) -> None:
        """Remove the records `beyond_kept`, after a record's write
        and apart from it: waited for by no replica, and a failure only logged, the
        next record's write removing what this one left (the module's doc). Bug: a
        removal the replicas did not acknowledge made the write of a record they had
        acknowledged answer `StoreNotReplicated`: a deploy's start was withdrawn for
        it, and a running deploy waited it out as an outage."""
        try:
            kept = self.deploys()
            beyond = beyond_kept(kept, self.claims()) if len(kept) > MAX_DEPLOYS else []
            if beyond:
                with self.talking("write"):
                    self.client.hdel(self.deploys_key, *beyond)
        except StoreUnavailable as exc:
            log.info("deploy records: the old ones are removed at the next write: %s", exc)

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
        for _ in range(CLAIM_ATTEMPTS):
            with writing.client.pipeline(transaction=True) as pipe:
                pipe.watch(self.claims_key)
                held = _object(pipe.hget(self.claims_key, host))
                stored = None
                if renewing and held is None:  # (ended and released by another?)
                    pipe.watch(self.deploys_key)
                    stored = _object(pipe.hget(self.deploys_key, deploy_id))
                holder = decide_renew(held, stored, deploy_id, owner, now, stale_after)
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

    def request_abort(self, host: str, request: dict[str, Any]) -> str | None:
        with self.writing(f"the abort request of the deploy of {host}") as writing:
            for _ in range(CLAIM_ATTEMPTS):
                with writing.client.pipeline(transaction=True) as pipe:
                    pipe.watch(self.claims_key)
                    held = _claim_id(pipe.hget(self.claims_key, host))
                    if held is None:
                        writing.wrote = False  # no deploy holds the host: nothing written
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
