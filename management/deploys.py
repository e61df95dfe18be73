"""Deploys as one operation (SPEC §10, docs/deploys.md): ready → switch → warmup → drain.

A `Deployer` runs in the management process. Each deploy is a record in the
store (`balancer.stores.records`), so every balancer and dashboard sees it,
and a claim on its host, so one deploy per host runs at a time.

Invariants:
* Before the switch nothing is written to the table: a deploy that fails
  there leaves the previous rule serving, and one interrupted there is
  resumed by checking its new backends again, for what is left of its
  `ready_timeout`.
* The switch is one conditional write of the host's rule (`switched_rule`),
  made only while the rule is still the one the deploy started from; the
  record names the switch (`since`) before it is written, so a resumed
  deploy knows whether it happened.
* After the switch the rule is whole by itself: its `draining` ramp runs on
  the wall clock in every balancer, with or without this process. The end of
  the drain removes `draining` (a second write that changes no routing).
* A claim's owner beats every `BEAT_EVERY` seconds; a claim quiet for
  `STALE_AFTER` seconds (its process died) is taken over by a management
  process that resumes the deploy. A process that stops hands its claims
  over at once (beat 0). Each of its rule writes renews its claim in the
  write's own atomic step (`Deployer.fenced`), and so does each save of its
  record (`Deployer.save_claimed`): one taken over meanwhile (a
  process cut from the store longer than `STALE_AFTER`, whose deploy another
  resumed) hands the deploy over and writes nothing more, so two processes
  never both carry a deploy (or its abort) on.
* A store outage (`StoreUnavailable`), or a store that cannot be read
  (`CorruptStore`: a routes file half saved by hand), is waited out for
  `STORE_PATIENCE` seconds at every step's store call (`Deployer.patiently`);
  only a longer one fails the deploy. A switch write whose answer was lost is recognised
  by its `since` on the next look, never taken for someone else's change.
* A start is one write of the claim and the record (`Records.begin`). One
  the store's replicas did not acknowledge (`StoreNotReplicated`: the master
  applied it) answers that error having withdrawn it on the master, without
  waiting for the replicas again (`Deployer._withdrawn`): a retry of the same
  request is never refused by what the failed one left, and the refusal
  comes about one `wait` after the request.
* An abort (`ask_abort`, from any balancer's API) is a request stored beside
  the host's claim; the process running the deploy, or the one resuming it,
  carries it out (`management.deploy_abort`) and ends the deploy ``aborted``.
* While any host is claimed, every balancer publishes its in-flight counts
  on the claimed hosts' backends (`watch_loop`); the drain waits on all of
  them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from balancer.backend_tls import BackendTLS
from balancer.restarts import Restarts
from balancer.stores import (
    CorruptStore,
    HostRule,
    StoreError,
    StoreNotReplicated,
    StoreUnavailable,
)
from balancer.stores.records import Claimed, HandedOver, beat_of, handed_over
from management import deploy_abort
from management.deploy_run import IDLE_EVERY, Aborted, DeployFailed, Interrupted, Run
from management.deploy_steps import addresses, local_report

log = logging.getLogger("balancer.deploys")

STALE_AFTER = 5.0   # seconds without a beat before another process resumes a deploy
BEAT_EVERY = 1.0
WATCH_EVERY = 0.25  # seconds between in-flight reports while a deploy runs
GONE_AFTER = 60.0   # seconds after which an in-flight report's balancer is gone for good
STORE_PATIENCE = 30.0  # seconds a deploy waits for an unavailable store before it fails
STORE_RETRY = 0.2      # seconds between its attempts meanwhile
T = TypeVar("T")


class Deployer:
    """Starts, runs, resumes and reports deploys for one management process."""

    def __init__(self, store: Any, runtime: Any,
                 write_rule: Callable[[str, dict[str, Any], int, Claimed], int],
                 tls: BackendTLS | None = None,
                 lost: Callable[[], str | None] = lambda: None) -> None:
        self.store = store
        self.lost = lost  # why the store lost its table (`management.mirror`), or None
        self.tls = tls or BackendTLS()  # how https:// backends are probed
        self.records = store.records()
        self.runtime = runtime
        self.write_rule = write_rule  # (host, rule, if_version, claimed) -> version, published
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.running: dict[str, str] = {}  # host -> deploy id run here
        self.taken: set[str] = set()  # ids of those another process resumed meanwhile
        self.handing = threading.Lock()  # `taken` and `running` changed together
        self.stopping = threading.Event()
        self.watcher: threading.Thread | None = None

    # starting ----------------------------------------------------------------
    def start(self, host: str, found: HostRule, to: list[Any], settings: dict[str, float],
              kind: str = "deploy") -> dict[str, Any]:
        """Claim `host` and start a deploy of it to `to` from its rule as `found`
        (with the table's version); the new record. Raises `Busy` (with the id
        holding the host)."""
        if host in self.running:  # its claim may have been lost with damaged records
            raise Busy(self.running[host])
        deploy_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        record = self.new_record(deploy_id, host, found, to, settings, kind)
        try:
            holder = self.records.begin(record, time.time(), STALE_AFTER)
        except StoreNotReplicated as exc:
            raise self._withdrawn(record, exc) from None
        if holder is not None:
            raise Busy(holder)
        if self.watcher is None:
            self.start_watching()  # the app alone under another WSGI server
        self._spawn(record, resumed=False)
        return record

    def new_record(self, deploy_id: str, host: str, found: HostRule, to: list[Any],
                   settings: dict[str, float], kind: str) -> dict[str, Any]:
        rule = dict(found.rule or {})
        old = list(rule.get("backends", ())) if rule.get("action") == "proxy" else []
        now = time.time()
        return {"id": deploy_id, "host": host, "kind": kind, "from": old, "to": list(to),
                "settings": settings, "state": "running", "step": "ready", "started": now,
                "ended": None, "error": None, "warning": None, "before": rule,
                "from_version": found.version, "since": None, "version": None,
                "abort": None, "owner": self.owner,
                "steps": [{"name": "ready", "started": now, "ended": None, "outcome": None,
                           "detail": f"checking {', '.join(addresses(to))}"}]}

    def _withdrawn(self, record: dict[str, Any], exc: StoreNotReplicated
                   ) -> StoreNotReplicated:
        """A start whose claim and record the replicas did not acknowledge, though
        the master applied them: withdrawn (the record ended as failed, the claim
        released, with no wait for the replicas: `Records.withdraw`), so that a retry
        of the request finds nothing of it; the error to answer, about one `wait`
        after the request. Bugs: the claim, with no deploy run behind it, answered
        the retry 409 deploy_in_progress until the orphan sweep dropped it 5 s later
        (and a saved record was resumed then: a deploy answered 503 ran after all);
        the withdrawal's writes waited for the replicas too, one `wait` each."""
        host, deploy_id = record["host"], record["id"]
        record.update(state="failed", ended=time.time(), error=f"not started: {exc.reason}")
        try:
            self.records.withdraw(record)
        except StoreError as problem:
            withdrawn = (f"withdrawing it failed ({problem}): a new deploy of the host may "
                         f"answer 409 until its claim frees itself, {STALE_AFTER:.0f} s later")
        else:
            withdrawn = ("its claim on the host was withdrawn and its record ended as "
                         "failed, so sending the same request again is safe")
        log.warning("deploy %s of %s not started: %s; %s", deploy_id, host, exc.reason,
                    withdrawn)
        return StoreNotReplicated(f"{exc.where}: the {record['kind']} of {host} did not start: "
                                  f"{exc.reason}; {withdrawn}", exc.where, exc.reason)

    def _spawn(self, record: dict[str, Any], resumed: bool) -> None:
        self.running[record["host"]] = record["id"]
        threading.Thread(target=self.run, args=(record, resumed), daemon=True,
                         name=f"deploy {record['id']}").start()

    # running -----------------------------------------------------------------
    def run(self, record: dict[str, Any], resumed: bool) -> None:
        """The deploy's steps from where the record stands, to its end."""
        host = record["host"]
        beat = threading.Thread(target=self.beat_loop, args=(record,), daemon=True)
        beat.start()
        try:
            self._ended(record, Run(self, record, resumed))
        except Interrupted:  # (its claim stays: whoever holds it goes on)
            why = "another process resumed it" if record["id"] in self.taken else \
                "this process is stopping"
            log.info("deploy %s of %s: handed over (%s)", record["id"], host, why)
            return
        finally:
            with self.handing:
                self.running.pop(host, None)
                self.taken.discard(record["id"])
        self._release(record)

    def _ended(self, record: dict[str, Any], run: Run) -> None:
        """Run the deploy and record how it ended (`Interrupted`: handed over)."""
        try:
            state, error = self._steps(run), None
        except DeployFailed as exc:
            state, error = "failed", f"{exc}{_serving(record)}"
        except Interrupted:
            raise
        except Exception as exc:  # a bug or a store failure: end cleanly, never half-way
            log.exception("deploy %s of %s failed", record["id"], record["host"])
            state, error = "failed", f"internal error: {exc}"
        self._end(record, state, error)

    @staticmethod
    def _steps(run: Run) -> str:
        """Run's steps, or its abort once one is asked: how the deploy ended."""
        try:
            run.steps()
        except Aborted:
            deploy_abort.abort(run)
            return "aborted"
        return "done"

    def ask_abort(self, host: str) -> str | None:
        """Ask the deploy running on `host`, by whichever balancer, to stop: its id,
        or None when none runs (`Records.request_abort`)."""
        return self.records.request_abort(host, {"at": time.time(), "by": self.owner})

    def _end(self, record: dict[str, Any], state: str, error: str | None) -> None:
        record.update(state=state, ended=time.time(), error=error)
        if error:
            current = record["steps"][-1]
            if current["ended"] is None:
                current.update(ended=time.time(), outcome="failed", detail=error)
        log.log(logging.WARNING if error else logging.INFO, "deploy %s of %s %s%s",
                record["id"], record["host"], state, f": {error}" if error else "")
        try:
            self.save(record)
        except DeployFailed:
            log.error("deploy %s of %s: its end (%s) could not be recorded; the store is "
                      "unavailable", record["id"], record["host"], state)

    def _release(self, record: dict[str, Any]) -> None:
        try:
            self.records.release(record["host"], record["id"])
        except StoreError as exc:
            log.warning("deploy %s: cannot release %s: %s (it frees itself in %.0fs)",
                        record["id"], record["host"], exc, STALE_AFTER)

    def save(self, record: dict[str, Any]) -> None:
        """Store the record (an outage waited out, `patiently`) while this process
        still runs it (`save_claimed`)."""
        self.patiently(record, "save its record", lambda: self.save_claimed(record))

    def save_claimed(self, record: dict[str, Any]) -> None:
        """Save the record and renew this process's claim in one write
        (`Records.save_claimed`), or `Interrupted` as `fence`."""
        self._go_on(record, self.records.save_claimed(record, self.owner, time.time(),
                                                      STALE_AFTER))

    def fenced(self, record: dict[str, Any], write: Callable[[Claimed], T]) -> T:
        """`write(claimed)`: a rule write made only while this process runs the deploy,
        its claim renewed in the same atomic step (`Store.put_host`), or `Interrupted`
        as `fence`, nothing written. Bug: fenced, then written in a second call, a
        takeover between them let this process write the rule once more."""
        try:
            return write(Claimed(record["id"], self.owner, time.time(), STALE_AFTER))
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
        return self._go_on(record, self.records.renew(record["host"], record["id"],
                                                      self.owner, time.time(), STALE_AFTER))

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

    # every balancer ----------------------------------------------------------
    def watch_loop(self) -> None:
        """Publish this balancer's in-flight counts while hosts are claimed, and
        resume deploys whose owner went quiet."""
        reported = False
        restarts = Restarts("deploy watch", log, quiet=False, loop="the deploy claims' watch",
                            then="trying again with backoff")
        while not self.stopping.is_set():
            claims: dict[str, dict[str, Any]] = {}
            try:
                claims = self.records.claims()
                if claims:
                    self.report(sorted(claims))
                    reported = True
                elif reported:
                    self.records.report_inflight(self.owner, None)
                    self.forget_gone()
                    reported = False
                self.resume_orphans(claims)
            except StoreError as exc:
                log.debug("deploy watch: %s", exc)
            except Exception as exc:  # (bug: a traceback logged every 0.25 s)
                restarts.failed(exc)
                self.stopping.wait(restarts.pause)
            self.stopping.wait(WATCH_EVERY if claims or self.running else IDLE_EVERY)

    def forget_gone(self) -> None:
        """Withdraw the in-flight reports not renewed for `GONE_AFTER` seconds, once
        no deploy runs (bug: a management process killed outright never withdraws
        its own, and each such report stayed in the store for good)."""
        now = time.time()
        for owner, report in self.records.inflight().items():
            at = report.get("at") if isinstance(report, dict) else None
            if not isinstance(at, int | float) or now - at > GONE_AFTER:
                self.records.report_inflight(owner, None)

    def report(self, hosts: list[str]) -> None:
        info = self.runtime.info()
        versions = [p.get("version", 0) for p in info.get("processes", ())]
        version = min(versions) if versions else info.get("store", {}).get("version", 0)
        stats = self.runtime.stats({"hosts": hosts})
        if stats.get("lagging"):  # a worker not answering: its counts unknown, and maybe
            version = 0           # not serving the switch yet (see `deploy_steps.in_flight`)
        self.records.report_inflight(self.owner, local_report(stats, version, hosts, time.time()))

    def resume_orphans(self, claims: dict[str, dict[str, Any]]) -> None:
        now = time.time()
        for host, claim in claims.items():
            if host in self.running or now - beat_of(claim) < STALE_AFTER:
                continue
            record = self.records.deploy(str(claim.get("id")))
            if record is None or record.get("state") != "running":
                self.records.release(host, str(claim.get("id")))
                continue
            if self.records.claim(host, record["id"], self.owner, now, STALE_AFTER) is None:
                log.warning("deploy %s of %s: resuming at step %s (its process %s went quiet)",
                            record["id"], host, record.get("step"), claim.get("owner"))
                record["owner"] = self.owner
                self._spawn(record, resumed=True)

    def start_watching(self) -> None:
        self.watcher = threading.Thread(target=self.watch_loop, daemon=True,
                                        name="deploy watch")
        self.watcher.start()

    def stop(self) -> None:
        """Stop: running deploys are handed over (their claims' beat set to 0)."""
        self.stopping.set()
        for host, deploy_id in list(self.running.items()):
            with contextlib.suppress(StoreError):  # else it goes stale by itself
                self.records.claim(host, deploy_id, self.owner, 0.0, STALE_AFTER)
        with contextlib.suppress(StoreError):
            self.records.report_inflight(self.owner, None)


def _serving(record: dict[str, Any]) -> str:
    """What serves after a deploy failed at its `record`'s step (nothing said: the
    previous rule, as nothing was switched)."""
    if (record.get("abort") or {}).get("version"):
        return " (after the abort's write: the previous backends serve)"
    return " (after the switch: the new backends serve)" if record["version"] else ""


class Busy(Exception):
    """The host has a deploy running (its id)."""

    def __init__(self, deploy_id: str) -> None:
        super().__init__(deploy_id)
        self.deploy_id = deploy_id
