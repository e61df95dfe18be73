"""Deploy records in Redis (`balancer.stores.records`: the collections and their
invariants), for `RedisStore.records`. Apart from `records` so that a balancer
on the file store never imports `redis` (`balancer.preload`).

Every write goes through the store's `writing` (which waits for the replicas
the store URL asks for, ``replicas=N``, unless the block wrote nothing: a claim
another deploy holds, a release of a claim not held) but the in-flight
reports: every balancer rewrites them every `management.deploys.WATCH_EVERY`
seconds while a deploy runs, so a lost one is replaced at once, and waiting
would slow the drain they time."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

from redis.exceptions import WatchError

from balancer.stores.base import StoreUnavailable
from balancer.stores.records import (
    CLAIM_ATTEMPTS,
    MAX_DEPLOYS,
    UNREADABLE,
    Records,
    decide_claim,
    newest,
)
from balancer.stores.redis_replicas import WritingBlock


class RedisRecords(Records):
    """The records in three hashes: ``NS:deploys`` (id → JSON), ``NS:deploy-claims``
    (host → JSON) and ``NS:deploy-inflight`` (balancer → JSON)."""

    def __init__(self, client: Any, namespace: str, talking: Callable[[str], Any],
                 writing: WritingBlock) -> None:
        self.client = client
        self.talking = talking
        self.writing = writing
        self.deploys_key = f"{namespace}:deploys"
        self.claims_key = f"{namespace}:deploy-claims"
        self.inflight_key = f"{namespace}:deploy-inflight"

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
        kept = self.deploys()
        if len(kept) > MAX_DEPLOYS:
            with self.writing("the removal of old deploy records") as writing:
                writing.client.hdel(self.deploys_key, *[r["id"] for r in kept[MAX_DEPLOYS:]])

    def deploys(self) -> list[dict[str, Any]]:
        return newest([dict(r, id=i) for i, r in self._all(self.deploys_key).items()])

    def deploy(self, deploy_id: str) -> dict[str, Any] | None:
        with self.talking("read"):
            text = self.client.hget(self.deploys_key, deploy_id)
        try:
            value = json.loads(text) if text else None
        except UNREADABLE:
            return None
        return value if isinstance(value, dict) else None

    def claim(self, host: str, deploy_id: str, owner: str, now: float,
              stale_after: float) -> str | None:
        claim = json.dumps({"id": deploy_id, "owner": owner, "beat": now})
        with self.writing(f"the deploy claim on {host}") as writing:
            for _ in range(CLAIM_ATTEMPTS):
                with writing.client.pipeline(transaction=True) as pipe:
                    pipe.watch(self.claims_key)
                    text = pipe.hget(self.claims_key, host)
                    try:
                        held = json.loads(text) if text else None
                    except UNREADABLE:
                        held = None
                    holder = decide_claim(held if isinstance(held, dict) else None,
                                          deploy_id, owner, now, stale_after)
                    if holder is not None:
                        writing.wrote = False  # another deploy's claim: nothing to wait for
                        return holder
                    pipe.multi()
                    pipe.hset(self.claims_key, host, claim)
                    try:
                        pipe.execute()
                    except WatchError:
                        continue
                    return None
        raise StoreUnavailable("gave up claiming the host after concurrent claims")

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
                    try:
                        pipe.execute()
                    except WatchError:
                        continue
                    return

    def claims(self) -> dict[str, dict[str, Any]]:
        return self._all(self.claims_key)

    def report_inflight(self, balancer: str, report: dict[str, Any] | None) -> None:
        with self.talking("write"):  # not waited for (the module's doc)
            if report is None:
                self.client.hdel(self.inflight_key, balancer)
            else:
                self.client.hset(self.inflight_key, balancer, json.dumps(report, sort_keys=True))

    def inflight(self) -> dict[str, dict[str, Any]]:
        return self._all(self.inflight_key)



def _claim_id(text: str | None) -> str | None:
    """The deploy id of a stored claim (None when absent or unreadable)."""
    try:
        held = json.loads(text) if text else None
    except UNREADABLE:
        return None
    return held.get("id") if isinstance(held, dict) else None
