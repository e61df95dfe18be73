"""Deploy records kept beside the routing table (SPEC §10), for every balancer to see.

Three small collections, none of them read per request:
* deploys: deploy id → record (a JSON object with at least ``id``, ``host``
  and ``started``); only the `MAX_DEPLOYS` that ended last are kept, and the
  records of the deploys a claim names (running: at most one per host)
  whatever their age (`beyond_kept`).
* claims: host → ``{"id", "owner", "beat"}``: the one deploy running on a host,
  the management process running it and when it last said so (unix time).
* in-flight reports: balancer → ``{"at", ...}``: each balancer's in-flight
  counts on the backends being drained, published while a deploy runs.
* abort requests: deploy id → ``{"at", "by"}``: an operator asked (through any
  balancer's management API) that the running deploy stop; the process running
  it reads it at its next round (`management.deploy_run`).
* gone: deploy id → ``{"host", "kind", "state", "started", "ended"}`` for the
  `MAX_GONE` deploys whose records went last (`beyond_kept`): a deploy that
  ended is known as ended after its record went too.

Invariants:
* `claim` is atomic (Redis ``WATCH``/``MULTI``; the file store's writer lock):
  of two deploys racing for one host exactly one gets it. A claim is taken
  over only by the same deploy id (resuming it) and only once its owner's
  beat is older than `stale_after`. `begin`, a deploy's start, writes its
  claim and its record together, atomically the same way.
* `renew`, a running deploy's claim renewed, never makes a claim again for a
  deploy another process ended (a process cut from the store longer than
  `stale_after` finds its deploy resumed and ended by another), its record
  kept or gone: the claim's read, the record's (or its `gone` entry's) and the
  write are one atomic step, as `claim`.
  `save_claimed` is `renew` with the record's save in the same write, made
  only while the claim is this process's (or another deploy's: damaged records).
* A deploy's rule write (`Store.put_host` with `Claimed`) is `renew` with the
  table's write in the same atomic step (the same ``MULTI``; the file store's
  writer lock over both files): `HandedOver`, nothing written, when another
  process took the deploy over or ended it.
* `request_abort` is atomic with the claim it reads: an abort is only stored
  for the deploy holding the host's claim (the one named, when one is), and
  `release` drops it with the claim, so no request outlives its deploy.
* A record that goes (`beyond_kept`) is known as `gone` in the same atomic step
  as its removal, and both are decided on the records and claims read in that
  step (Redis: watched), so a deploy is always kept or known gone, as it ended.
* None of these writes touches the routing table or its version.
* Reads and writes raise `StoreUnavailable` when the store cannot be reached,
  `CorruptStore` never: an unreadable record collection reads as empty (a
  deploy is never blocked by damaged records), and the write that starts the
  file store's records over logs what was lost. A management process never
  starts a second deploy of a host it runs one of, claims or not
  (`management.deploys.Deployer.start`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from balancer.stores.atomic import read_regular, write_store_file

MAX_DEPLOYS = 50
MAX_GONE = 1000  # ended deploys known by id (`Records.gone`) after their record went
ENDED = "(ended)"  # `Records.renew`: the deploy ended, its claim released
# what decoding a hand-edited value can raise: bad JSON or UTF-8, an integer of
# 4,300+ digits (ValueError), deep nesting (RecursionError)
UNREADABLE = (ValueError, RecursionError)
CLAIM_ATTEMPTS = 50

log = logging.getLogger("balancer.deploys")


@dataclass(frozen=True)
class Claimed:
    """A write made only while the deploy `deploy_id`, run by `owner`, holds its host's
    claim, renewed in the same atomic step as `Records.renew` (at `now`, taken over
    after `stale_after`)."""

    deploy_id: str
    owner: str
    now: float
    stale_after: float


class HandedOver(Exception):
    """A `Claimed` write refused, nothing written: another process runs the deploy, or
    ended it (`holder`: `renew`'s answer)."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


class Records(ABC):
    """Deploy records, host claims and in-flight reports of one store."""

    @abstractmethod
    def deploys(self) -> list[dict[str, Any]]:
        """Every kept record, newest first."""

    def deploy(self, deploy_id: str) -> dict[str, Any] | None:
        """One record, or None."""
        return next((r for r in self.deploys() if r.get("id") == deploy_id), None)

    @abstractmethod
    def claim(self, host: str, deploy_id: str, owner: str, now: float,
              stale_after: float) -> str | None:
        """Take `host` for `deploy_id` run by `owner`: None when taken, else the id
        of the deploy that holds it. A claim of the same id is refreshed by its
        owner, or taken over by another once its beat is older than `stale_after`."""

    @abstractmethod
    def renew(self, host: str, deploy_id: str, owner: str, now: float,
              stale_after: float) -> str | None:
        """`claim` for a deploy under way, never made again once the deploy ended
        (its claim released and its record ended, by the process that took it
        over): then `ENDED`, nothing written. The claim's read, the record's and the
        write are one atomic step (`decide_renew`). Bug: read apart, a takeover's end
        and release between them let the claim be made again for the ended deploy,
        and its first process carried it on."""

    @abstractmethod
    def save_claimed(self, record: dict[str, Any], owner: str, now: float,
                     stale_after: float) -> str | None:
        """`renew` the claim of the running deploy `record` (run by `owner`) and save
        the record, in one atomic write: `renew`'s answer, the record not saved when
        that is its id (another process resumed it) or `ENDED`. Bug: renewed, then
        saved in a second write, a takeover between them was written over (and,
        with ``replicas=N``, each save waited for the replicas twice)."""

    @abstractmethod
    def begin(self, record: dict[str, Any], now: float, stale_after: float) -> str | None:
        """Start the deploy `record` (run by ``record["owner"]``): claim its host as
        `claim` does and save the record, in one write. None when both are done,
        else the id of the deploy that holds the host (nothing was written)."""

    @abstractmethod
    def withdraw(self, record: dict[str, Any]) -> None:
        """Save `record` (a start that did not stand, ended) and drop its host's
        claim (and its abort request) if it holds it, in one write that waits for
        no replica: it only undoes, on the master, what `begin` wrote there."""

    @abstractmethod
    def release(self, host: str, deploy_id: str) -> None:
        """Drop `host`'s claim (and its abort request) if `deploy_id` holds it."""

    @abstractmethod
    def gone(self, deploy_id: str) -> dict[str, Any] | None:
        """What is known of a deploy whose record is no longer kept (``{"host",
        "kind", "state", "started", "ended"}``: it ended), or None."""

    @abstractmethod
    def request_abort(self, host: str, request: dict[str, Any],
                      deploy_id: str | None = None) -> str | None:
        """Ask the deploy holding `host`'s claim to stop (`request`: ``{"at", "by"}``),
        in one write with the claim's read: the id of that deploy, or None when no
        deploy holds the host, or another than `deploy_id` (when given) does (nothing
        written). A request already stored stays."""

    @abstractmethod
    def abort_request(self, deploy_id: str) -> dict[str, Any] | None:
        """The abort request stored for `deploy_id`, or None."""

    @abstractmethod
    def claims(self) -> dict[str, dict[str, Any]]:
        """host → ``{"id", "owner", "beat"}`` for every held claim."""

    @abstractmethod
    def report_inflight(self, balancer: str, report: dict[str, Any] | None) -> None:
        """Publish (or, with None, withdraw) one balancer's in-flight report."""

    @abstractmethod
    def inflight(self) -> dict[str, dict[str, Any]]:
        """balancer → its latest in-flight report."""


def decide_claim(held: dict[str, Any] | None, deploy_id: str, owner: str, now: float,
                 stale_after: float) -> str | None:
    """None when a claim may be written over `held`, else the id that keeps it."""
    if held is None:
        return None
    if held.get("id") != deploy_id:
        return str(held.get("id"))
    if held.get("owner") == owner or now - beat_of(held) >= stale_after:
        return None
    return deploy_id


def decide_renew(held: dict[str, Any] | None, stored: dict[str, Any] | None, deploy_id: str,
                 owner: str, now: float, stale_after: float) -> str | None:
    """`decide_claim` for a renewal (`Records.renew`): `ENDED` when no claim is held
    and the deploy's record `stored` (or its `Records.gone` entry, once the record
    went) says it ended (one absent, a store that lost its records, is claimed
    again). Bug: a deploy ended by another process was taken for one a store had
    lost once 50 newer records had pushed its record out, and its first process,
    back from a partition, claimed the host again and carried the deploy on."""
    if held is None and stored is not None and stored.get("state") != "running":
        return ENDED
    return decide_claim(held, deploy_id, owner, now, stale_after)


def handed_over(holder: str | None, deploy_id: str) -> bool:
    """Whether `renew`'s answer `holder` means that `deploy_id`'s process runs it no
    more (resumed by another, or ended)."""
    return holder in (deploy_id, ENDED)


def beat_of(claim: dict[str, Any]) -> float:
    """When `claim`'s owner last beat (UNIX time); 0.0, long stale, when its beat
    is no finite number (a hand edit, a damaged store). Bug: ``"beat": "soon"``
    raised ValueError in every deploy watch, a traceback logged every 0.25 s, and
    in the claim's renewal, which ended the deploy's heartbeat."""
    try:
        beat = float(claim.get("beat", 0))
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return beat if math.isfinite(beat) else 0.0


def tombstone(record: dict[str, Any]) -> dict[str, Any]:
    """What `Records.gone` keeps of a record that goes (`beyond_kept`: it ended)."""
    return {k: record.get(k) for k in ("host", "kind", "state", "started", "ended")}


def beyond_gone(gone: dict[str, Any]) -> list[str]:
    """The ids of the `gone` entries to forget: beyond the `MAX_GONE` that ended last."""
    ordered = sorted((dict(v, id=k) for k, v in gone.items() if isinstance(v, dict)),
                     key=_last, reverse=True)
    return [str(r["id"]) for r in ordered[MAX_GONE:]] + \
        [k for k, v in gone.items() if not isinstance(v, dict)]


def newest(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records newest first (by ``started``, then id)."""
    return sorted(records, key=lambda r: (float(r.get("started", 0)), str(r.get("id"))),
                  reverse=True)


class FileRecords(Records):
    """The records in one JSON file beside the routes file, written whole under the
    routes file's writer lock (temp file, fsync, rename)."""

    def __init__(self, path: str, locked: Callable[[], Any]) -> None:
        self.path = path
        self.locked = locked

    def _read(self) -> dict[str, dict[str, Any]]:
        return self._read_why()[0]

    def _read_why(self) -> tuple[dict[str, dict[str, Any]], str]:
        """The sections, and what made the file unreadable ("" when nothing did)."""
        problem = ""
        try:
            doc = json.loads(read_regular(self.path))
        except FileNotFoundError:
            doc = {}
        except (OSError, *UNREADABLE) as exc:
            doc, problem = {}, str(exc)  # start over rather than block every deploy
        if not isinstance(doc, dict):
            doc, problem = {}, problem or "not a JSON object"
        sections: dict[str, dict[str, Any]] = {}
        for key in ("deploys", "claims", "inflight", "aborts", "gone"):
            value = doc.get(key)
            sections[key] = value if isinstance(value, dict) else {}
        # a claim that is no object is none (as Redis's reads skip one)
        sections["claims"] = {host: claim for host, claim in sections["claims"].items()
                              if isinstance(claim, dict)}
        return sections, problem

    @contextlib.contextmanager
    def _changing(self) -> Iterator[dict[str, dict[str, Any]]]:
        with self.locked(), self._changed() as doc:
            yield doc

    @contextlib.contextmanager
    def _changed(self) -> Iterator[dict[str, dict[str, Any]]]:
        """`_changing` by a caller holding the writer lock already."""
        doc, problem = self._read_why()
        yield doc
        if problem:
            log.error("deploy records %s cannot be read (%s): starting them over; the "
                      "deploy records and host claims it held are lost", self.path, problem)
        self._write(doc)

    def renew_held(self, host: str, claimed: Claimed) -> None:
        """`renew` by a caller holding the writer lock (`FileStore.put_host`'s
        `Claimed` write), or `HandedOver`, nothing written."""
        with self._changed() as doc:
            holder = _claim(doc, host, claimed.deploy_id, claimed.owner, claimed.now,
                            claimed.stale_after, _stored(doc, claimed.deploy_id))
            if handed_over(holder, claimed.deploy_id):
                raise HandedOver(str(holder))

    def _write(self, doc: dict[str, Any]) -> None:
        write_store_file(self.path, json.dumps(doc, sort_keys=True).encode())

    def begin(self, record: dict[str, Any], now: float, stale_after: float) -> str | None:
        with self._changing() as doc:
            holder = _claim(doc, record["host"], record["id"], record["owner"], now,
                            stale_after)
            if holder is None:
                _save(doc, record)
            return holder

    def withdraw(self, record: dict[str, Any]) -> None:
        with self._changing() as doc:
            _save(doc, record)
            _release(doc, record["host"], record["id"])

    def deploys(self) -> list[dict[str, Any]]:
        return newest([r for r in self._read()["deploys"].values() if isinstance(r, dict)])

    def claim(self, host: str, deploy_id: str, owner: str, now: float,
              stale_after: float) -> str | None:
        with self._changing() as doc:
            return _claim(doc, host, deploy_id, owner, now, stale_after)

    def renew(self, host: str, deploy_id: str, owner: str, now: float,
              stale_after: float) -> str | None:
        with self._changing() as doc:
            return _claim(doc, host, deploy_id, owner, now, stale_after,
                          _stored(doc, deploy_id))

    def save_claimed(self, record: dict[str, Any], owner: str, now: float,
                     stale_after: float) -> str | None:
        with self._changing() as doc:
            holder = _claim(doc, record["host"], record["id"], owner, now, stale_after,
                            _stored(doc, record["id"]))
            if not handed_over(holder, record["id"]):
                _save(doc, record)
            return holder

    def release(self, host: str, deploy_id: str) -> None:
        with self._changing() as doc:
            _release(doc, host, deploy_id)

    def claims(self) -> dict[str, dict[str, Any]]:
        return self._read()["claims"]

    def gone(self, deploy_id: str) -> dict[str, Any] | None:
        found = self._read()["gone"].get(deploy_id)
        return found if isinstance(found, dict) else None

    def request_abort(self, host: str, request: dict[str, Any],
                      deploy_id: str | None = None) -> str | None:
        with self._changing() as doc:
            held = (doc["claims"].get(host) or {}).get("id")
            if held is None or deploy_id not in (None, held):
                return None
            doc["aborts"].setdefault(str(held), request)
            return str(held)

    def abort_request(self, deploy_id: str) -> dict[str, Any] | None:
        found = self._read()["aborts"].get(deploy_id)
        return found if isinstance(found, dict) else None

    def report_inflight(self, balancer: str, report: dict[str, Any] | None) -> None:
        with self._changing() as doc:
            if report is None:
                doc["inflight"].pop(balancer, None)
            else:
                doc["inflight"][balancer] = report

    def inflight(self) -> dict[str, dict[str, Any]]:
        return self._read()["inflight"]


def beyond_kept(records: list[dict[str, Any]], claims: dict[str, Any]) -> list[str]:
    """The ids of `records` to remove: beyond the `MAX_DEPLOYS` that ended last (or,
    not ended, started last), but never one a claim names (a running deploy).
    Bugs: by their start only, a deploy still running when 50 newer ones had
    started (a long drain while other hosts were deployed, or 51 at once) lost
    its record at once, and at each of its saves: its progress read 404, its end
    was never recorded (no rollback), a crash of its process could not be resumed;
    and a long deploy that had just ended went at the next record's write."""
    running = {claim.get("id") for claim in claims.values() if isinstance(claim, dict)}
    ordered = sorted(records, key=_last, reverse=True)
    return [str(r.get("id")) for r in ordered[MAX_DEPLOYS:] if r.get("id") not in running]


def _last(record: dict[str, Any]) -> tuple[float, str]:
    """When `record` ended (or started), and its id: the order `beyond_kept` keeps;
    a time that is no number (a hand edit) sorts first to go."""
    try:
        return float(record.get("ended") or record.get("started") or 0), str(record.get("id"))
    except (TypeError, ValueError):
        return -math.inf, str(record.get("id"))


def _save(doc: dict[str, dict[str, Any]], record: dict[str, Any]) -> None:
    """Put `record` in the file's `doc`, removing the records `beyond_kept`."""
    doc["deploys"][record["id"]] = record
    records = [dict(r, id=i) for i, r in doc["deploys"].items() if isinstance(r, dict)]
    beyond = beyond_kept(records, doc["claims"])
    for deploy_id in beyond:
        doc["gone"][deploy_id] = tombstone(doc["deploys"].pop(deploy_id))
    for deploy_id in beyond_gone(doc["gone"]) if beyond else ():
        del doc["gone"][deploy_id]


def _stored(doc: dict[str, dict[str, Any]], deploy_id: str) -> dict[str, Any] | None:
    """The deploy's record in the file's `doc`, or what is known of it once it went."""
    stored = doc["deploys"].get(deploy_id)
    if not isinstance(stored, dict):
        stored = doc["gone"].get(deploy_id)
    return stored if isinstance(stored, dict) else None


def _claim(doc: dict[str, dict[str, Any]], host: str, deploy_id: str, owner: str, now: float,
           stale_after: float, stored: dict[str, Any] | None = None) -> str | None:
    """The claim made in `doc` unless another holds it (`decide_renew`, with the
    deploy's record `stored` when renewing)."""
    holder = decide_renew(doc["claims"].get(host), stored, deploy_id, owner, now, stale_after)
    if holder is None:
        doc["claims"][host] = {"id": deploy_id, "owner": owner, "beat": now}
    return holder


def _release(doc: dict[str, dict[str, Any]], host: str, deploy_id: str) -> None:
    if (doc["claims"].get(host) or {}).get("id") == deploy_id:
        del doc["claims"][host]
        doc["aborts"].pop(deploy_id, None)
