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
* A claim's owner beats every second, and every store call of a
  running deploy is made while this process holds its claim, an outage waited
  out (`management.deploy_claims`). A claim quiet for `STALE_AFTER` seconds
  (its process died) is taken over by a management process that resumes the
  deploy (`resume_orphans`). A process that stops hands its claims over at
  once (beat 0).
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
from typing import Any

from balancer.backend_tls import BackendTLS
from balancer.restarts import Restarts
from balancer.stores import HostRule, StoreError, StoreNotReplicated
from balancer.stores.records import Claimed, beat_of
from management import deploy_abort
from management.deploy_claims import STALE_AFTER, Claiming
from management.deploy_run import IDLE_EVERY, Aborted, DeployFailed, Interrupted, Run
from management.deploy_steps import addresses, local_report

log = logging.getLogger("balancer.deploys")

WATCH_EVERY = 0.25  # seconds between in-flight reports while a deploy runs
GONE_AFTER = 60.0   # seconds after which an in-flight report's balancer is gone for good


class Deployer(Claiming):
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
        self.taken: set[str] = set()
        self.handing = threading.Lock()
        self.stopping = threading.Event()
        self.calls = threading.Condition()
        self.under_way = 0
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
            holder = self.renewing(record, lambda now: self.records.begin(
                record, now, STALE_AFTER))
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
        with self.handing:  # (`running` changed with `taken`: `deploy_claims`)
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
            serving = _serving(record) if exc.serving is None else exc.serving
            state, error = "failed", f"{exc}{serving}"
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

    def ask_abort(self, host: str, request: dict[str, Any], deploy_id: str) -> str | None:
        """Ask the deploy `deploy_id`, running on `host` by whichever balancer, to stop
        (`request`: ``{"at", "by"}``): its id, or None when it does not hold the host
        (`Records.request_abort`)."""
        return self.records.request_abort(host, request, deploy_id)

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
            if self._taken_over(host, record):
                log.warning("deploy %s of %s: resuming at step %s (its process %s went quiet)",
                            record["id"], host, record.get("step"), claim.get("owner"))
                record["owner"] = self.owner
                self._spawn(record, resumed=True)

    def _taken_over(self, host: str, record: dict[str, Any]) -> bool:
        """Claim `host` for the deploy `record`, its owner quiet: whether this process
        runs it now (not once it stops: `Claiming.renewing`)."""
        held = self.renewing(record, lambda now: self.records.claim(
            host, record["id"], self.owner, now, STALE_AFTER))
        return held is None and not self.stopping.is_set()

    def start_watching(self) -> None:
        self.watcher = threading.Thread(target=self.watch_loop, daemon=True,
                                        name="deploy watch")
        self.watcher.start()

    def stop(self) -> None:
        """Stop: running deploys are handed over (their claims' beat set to 0, after
        the claim-renewing calls under way: `Claiming.renewing`)."""
        self.stopping.set()
        for host, deploy_id in list(self.running.items()):
            self.hand_back(host, deploy_id)
        self.wait_for_calls()
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
