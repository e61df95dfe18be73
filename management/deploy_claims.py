"""A running deploy's store calls (SPEC §10, docs/deploys.md "One at a time, across
restarts and balancers"), made by its `management.deploys.Deployer` (`Claiming`, a
base of it) while this process holds the deploy's claim on its host.

Invariants:
* The claim's owner beats every `BEAT_EVERY` seconds (`beat_loop`); a claim
  quiet for `STALE_AFTER` seconds is taken over by another management process
  that resumes the deploy.
* Each rule write renews the claim in the write's own atomic step (`fenced`:
  `Store.put_host` with `Claimed`), and so does each save of the record
  (`save_claimed`): one taken over meanwhile (a process cut from the store
  longer than `STALE_AFTER`, whose deploy another resumed) hands the deploy
  over (`Interrupted`) and writes nothing more, so two processes never both
  carry a deploy (or its abort) on.
* A deploy is marked taken over (`taken`, which its run's pauses look at) only
  while this process still runs it (`running`, changed with `taken` under
  `handing`).
* A process that stops renews no claim: each claim-renewing call (`renewing`)
  made once it stops writes a beat of 0 (long stale: another process resumes
  the deploy at once), and one under way when it stopped sets the beat back to
  0 once it returned; `Deployer.stop` waits for those (`STOP_WAIT` at most).
* A store outage (`StoreUnavailable`), or a store that cannot be read
  (`CorruptStore`: a routes file half saved by hand), is waited out for
  `STORE_PATIENCE` seconds at every step's store call (`patiently`); only a
  longer one fails the deploy. A switch write whose answer was lost is
  recognised by its `since` on the next look, never taken for someone else's
  change. An aborting deploy's record says meanwhile why its abort is not
  carried out yet, and that cause's error code (`trouble`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from balancer.restarts import Restarts
from balancer.stores import CorruptStore, StoreError, StoreUnavailable
from balancer.stores.records import Claimed, HandedOver, handed_over
from management.deploy_run import DeployFailed, Interrupted

log = logging.getLogger("balancer.deploys")

STALE_AFTER = 5.0   # seconds without a beat before another process resumes a deploy
BEAT_EVERY = 1.0
STORE_PATIENCE = 30.0  # seconds a deploy waits for an unavailable store before it fails
STORE_RETRY = 0.2      # seconds between its attempts meanwhile
STOP_WAIT = 3.0        # seconds `Deployer.stop` waits for the claim-renewing calls under way
T = TypeVar("T")


class Claiming:
    """The store calls of the deploys one management process runs (a `Deployer`'s)."""

    records: Any  # the store's `Records`
    owner: str  # this process, as its claims name it
    running: dict[str, str]  # host -> deploy id run here
    taken: set[str]  # ids of those another process resumed meanwhile
    handing: threading.Lock  # `taken` and `running` changed together
    stopping: threading.Event
    calls: threading.Condition  # guards `under_way`
    under_way: int  # claim-renewing store calls under way (`renewing`)

    def save(self, record: dict[str, Any]) -> None:
        """Store the record (an outage waited out, `patiently`) while this process
        still runs it (`save_claimed`)."""
        self.patiently(record, "save its record", lambda: self.save_claimed(record))

    def save_claimed(self, record: dict[str, Any]) -> None:
        """Save the record and renew this process's claim in one write
        (`Records.save_claimed`), or `Interrupted` as `fence`."""
        self._go_on(record, self.renewing(record, lambda now: self.records.save_claimed(
            record, self.owner, now, STALE_AFTER)))

    def fenced(self, record: dict[str, Any], write: Callable[[Claimed], T]) -> T:
        """`write(claimed)`: a rule write made only while this process runs the deploy,
        its claim renewed in the same atomic step (`Store.put_host`), or `Interrupted`
        as `fence`, nothing written. Bug: fenced, then written in a second call, a
        takeover between them let this process write the rule once more."""
        try:
            return self.renewing(record, lambda now: write(
                Claimed(record["id"], self.owner, now, STALE_AFTER)))
        except HandedOver:
            self._hand_over(record)

    def fence(self, record: dict[str, Any]) -> str | None:
        """Renew this process's claim on the deploy's host at each beat
        (`Records.renew`; its rule writes and record saves renew it in their own
        atomic step: `fenced`, `save_claimed`), or `Interrupted` when another process
        took the deploy over or ended it. The id of another deploy holding the host
        (damaged records lost this one's claim: `beat_loop` says so), else None.
        Bug: a process cut from the store for longer than `STALE_AFTER` went on once
        it was back, beside the one that had resumed its deploy: both carried out
        its abort, and each overwrote the other's record."""
        return self._go_on(record, self.renewing(record, lambda now: self.records.renew(
            record["host"], record["id"], self.owner, now, STALE_AFTER)))

    def renewing(self, record: dict[str, Any], call: Callable[[float], T]) -> T:
        """`call(now)`, a store call that renews this process's claim on `record`'s
        host at `now`: the time, or 0.0 (a beat long stale) once this process stops;
        and a call under way when it stopped sets the claim's beat back to 0 once it
        returned (bug: a rule write under way as `Deployer.stop` handed the claim
        over renewed it, and the successor resumed the deploy 5 s later, not at once)."""
        with self.calls:
            self.under_way += 1
        live = not self.stopping.is_set()
        try:
            return call(time.time() if live else 0.0)
        finally:
            if live and self.stopping.is_set():
                self.hand_back(record["host"], record["id"])
            with self.calls:
                self.under_way -= 1
                self.calls.notify_all()

    def hand_back(self, host: str, deploy_id: str) -> None:
        """Set this process's claim on `host` for `deploy_id` to a beat of 0, long stale
        (another process resumes the deploy at once); nothing when another process
        holds it or the deploy ended (`Records.renew`), or the store cannot be reached
        (the claim then goes stale by itself)."""
        with contextlib.suppress(StoreError):
            self.records.renew(host, deploy_id, self.owner, 0.0, STALE_AFTER)

    def wait_for_calls(self) -> None:
        """Wait (`STOP_WAIT` at most) until no claim-renewing call is under way."""
        with self.calls:
            self.calls.wait_for(lambda: self.under_way == 0, timeout=STOP_WAIT)

    def _go_on(self, record: dict[str, Any], holder: str | None) -> str | None:
        """`holder`, or `Interrupted` when it says another process runs the deploy
        (or ended it): `handed_over`."""
        if handed_over(holder, record["id"]):
            self._hand_over(record)
        return holder

    def _hand_over(self, record: dict[str, Any]) -> NoReturn:
        """`Interrupted`, the deploy noted in `taken` while this process runs it (bug:
        a beat answered after its run had ended left the id there for good, and a
        later resumption of the deploy here handed over at its first pause, its claim
        going stale for `STALE_AFTER` seconds)."""
        with self.handing:
            if self.running.get(record["host"]) == record["id"]:
                self.taken.add(record["id"])
        raise Interrupted()

    def patiently(self, record: dict[str, Any], what: str, call: Callable[[], Any]) -> Any:
        """`call()`, tried again while the store is unavailable or damaged, for up to
        `STORE_PATIENCE` seconds (then `DeployFailed`) or until this process stops
        (`Interrupted`)."""
        give_up = time.monotonic() + STORE_PATIENCE
        # a cause the abort's record names already (its write back refused) is kept
        # through this call's failures (bug: a read hiccup replaced it, then cleared
        # it: `abort.code` went store_lost -> store_unavailable -> None -> store_lost,
        # the abort answered 503, then 202, for a store that had lost its table)
        known = bool((record.get("abort") or {}).get("problem"))
        troubled = False
        while True:
            try:
                done = call()
            except (StoreUnavailable, CorruptStore) as exc:  # (bug: a routes file damaged
                damaged = isinstance(exc, CorruptStore)       # mid-deploy: "internal error")
                code = "store_corrupt" if damaged else "store_unavailable"
                if time.monotonic() >= give_up:
                    raise DeployFailed(f"cannot {what}: the store is "
                                       f"{'damaged' if damaged else 'unavailable'} ({exc})",
                                       code) from None
                log.warning("deploy %s: cannot %s: %s (trying again)", record["id"], what, exc)
                if not known:
                    self.trouble(record, f"cannot {what}: {exc}", code)
                    troubled = True
                self.pause(STORE_RETRY)
                continue
            if troubled:  # (bug: the problem stayed until the whole drain had returned,
                self.trouble(record, None)  # the abort answered 503 for a hiccup long over)
            return done

    def trouble(self, record: dict[str, Any], problem: str | None,
                code: str | None = None) -> None:
        """Note in an aborting deploy's record why its abort is not carried out yet
        (``abort.problem``, and its cause's error code, ``abort.code``; None: nothing
        stops it now), saved when the store takes it (its answer says so:
        `deploys_api.abort`); nothing for a deploy not aborting."""
        asked = record.get("abort")
        if asked is None or (asked.get("problem"), asked.get("code")) == (problem, code):
            return
        asked.update(problem=problem, code=code)
        with contextlib.suppress(StoreError):  # (saved at the next write, if not now)
            self.save_claimed(record)

    def pause(self, seconds: float) -> None:
        """Wait, or raise `Interrupted` when this process is stopping."""
        if self.stopping.wait(seconds):
            raise Interrupted()

    def beat_loop(self, record: dict[str, Any]) -> None:
        told = None  # the other deploy whose claim on the host was already logged
        restarts = Restarts(f"deploy {record['id']}", log, quiet=False, loop="renewing its "
                            "claim", then="trying again with backoff")
        while self.running.get(record["host"]) == record["id"] and not self.stopping.is_set():
            try:
                holder = self.fence(record)
            except Interrupted:  # resumed by another process (this one was cut from the
                return           # store for longer than STALE_AFTER): the run hands over
            except StoreError as exc:
                log.warning("deploy %s: cannot renew its claim: %s", record["id"], exc)
            except Exception as exc:  # (bug: the heartbeat ended; the claim went stale
                restarts.failed(exc)  # and another process resumed the deploy beside it)
                self.stopping.wait(restarts.pause)
            else:
                if holder not in (None, told):  # its claim was lost (damaged records)
                    log.error("deploy %s of %s: deploy %s claimed the host meanwhile; the "
                              "one that switches first wins, the other fails", record["id"],
                              record["host"], holder)
                    told = holder
            self.stopping.wait(BEAT_EVERY)
