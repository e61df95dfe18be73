"""One deploy's steps over its record (SPEC §10, docs/deploys.md): ready → switch →
warmup → drain, run by a `management.deploys.Deployer` in its own thread.

Invariants (the `Deployer`'s, step by step):
* ready writes nothing to the table; the new backends are checked at once and
  the step ends by `ready_timeout` after the deploy started whatever they do
  (`deploy_steps.probe_all`), resumed by another process or not, or at once
  when the host's rule changes or goes meanwhile (the deploy fails as the
  switch would fail it: changing or deleting the host is how an operator
  stops a deploy that waits for backends that will never be ready).
* switch is one conditional write of the host's rule, made only while the rule
  is still the one the deploy started from; a write whose answer was lost is
  recognised by its rule (its `since`), never taken for someone else's change.
* warmup only waits; drain waits for every live balancer's in-flight counts on
  the old backends to reach zero, or `drain_timeout`, then removes `draining`
  from the rule if it is still this deploy's.
* Every store call goes through `Deployer.patiently` (an outage waited out),
  but the ready step's look at the rule and the look for an abort request,
  which an outage just skips.
* An abort request (`Records.request_abort`, from any balancer) is looked for
  at every wait and before the switch's write (`Aborted`); what it does is
  `management.deploy_abort`'s.
* The ready step judges a rule it no longer finds as changed only at a table
  version at least the one the deploy started from (`from_version`): a store
  that went back (flushed, restored) lost its table, which the switch names
  (bug: a deploy resumed by a new management process whose first look came
  just after a flush had a floor of 0, and failed "the host's rule changed").
* A step's times are the record's wall-clock times (any process may resume
  the deploy), but a step waits on the monotonic clock (`local_deadline`),
  never longer than the step's own setting: a wall clock set back or ahead
  while it waits changes nothing.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from balancer.stores import (
    CorruptStore,
    HostRule,
    StoreError,
    StoreLost,
    StoreUnavailable,
    VersionConflict,
)
from management.deploy_steps import (
    NOT_CHECKED,
    PROBE_LEAST,
    addresses,
    check_config,
    in_flight,
    leaving,
    loaded_record,
    probe_all,
    switched_rule,
)
from management.http import ApiError

log = logging.getLogger("balancer.deploys")

IDLE_EVERY = 1.0    # seconds between looks for a deploy while none runs (`Deployer.watch_loop`)
DRAIN_SETTLE = 0.5  # seconds after the warmup before the old backends' counts are trusted
STEPS = ("ready", "switch", "warmup", "drain")

if TYPE_CHECKING:
    from management.deploys import Deployer


def routed_again(rule: dict[str, Any] | None, drained: list[str]) -> list[str]:
    """The addresses of `drained` that `rule` (someone else's, written meanwhile;
    None: none) routes requests to, in any spelling."""
    if not rule or rule.get("action") != "proxy":
        return []
    try:
        return [a for a in drained if not leaving([a], list(rule.get("backends", ())))]
    except ValueError:  # (a rule the store holds is valid: nothing routed otherwise)
        return []


def local_deadline(at: float, longest: float) -> float:
    """The monotonic deadline of the wall-clock time `at`, at most `longest` seconds
    from now. Bug: the warmup and drain waited on the wall clock: set back an hour
    (NTP's first sync, an operator's `date`), a deploy waited an hour more, its host
    claimed all along (409 for the next deploy); set ahead, the drain ended at once
    with requests still in flight on the old backends."""
    return time.monotonic() + min(max(0.0, at - time.time()), longest)


class DeployFailed(Exception):
    """A step failed: the deploy ends with this reason. `code` is the management
    API's error code of its cause (docs/api.md), which an abort that gives up
    answers with (`deploys_api.abort`)."""

    def __init__(self, message: str, code: str = "store_unavailable",
                 serving: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.serving = serving  # what serves, said after it (None: as the step implies)


class Interrupted(Exception):
    """This process is stopping: the deploy is handed over, not ended."""


class Aborted(Exception):
    """An operator asked the deploy to stop (its record's ``abort`` says who, when)."""


class Run:
    """One deploy's steps over its record."""

    def __init__(self, deployer: Deployer, record: dict[str, Any], resumed: bool) -> None:
        self.deployer = deployer
        self.record = record
        self.resumed = resumed
        for raised in loaded_record(record) if resumed else ():  # (an earlier version's)
            log.warning("deploy %s: its record holds %s (loaded as the table is)",
                        record["id"], raised)
        self.host = record["host"]
        self.settings = record["settings"]
        # the table's highest version the ready step saw the rule at (at least the one
        # the deploy started from: records of before 2026-12-07 lack it)
        self.seen_version = int(record.get("from_version") or 0)

    def steps(self) -> None:
        """Run the steps from where the record stands; `Aborted` when an abort is asked
        (or was, before a restart), for `deploy_abort.abort` to carry out."""
        if self.record.get("abort") is not None:
            raise Aborted()
        self.check_abort()
        step = STEPS.index(self.record.get("step") or "ready")
        if step == 0:
            self.ready()
        if step <= 1:
            self.switch()
        if step <= 2:
            self.warmup()
        self.drain()

    def pause(self, seconds: float) -> None:
        """Wait (`Deployer.pause`), then `Interrupted` if another process took the
        deploy over meanwhile (`Deployer.fence`), `Aborted` if an abort was asked."""
        self.deployer.pause(seconds)
        if self.record["id"] in self.deployer.taken:
            raise Interrupted()
        self.check_abort()

    def check_abort(self) -> None:
        """`Aborted`, noted in the record, when an abort of this deploy is stored (a
        store that cannot answer now tells nothing: the next look asks again)."""
        if self.record.get("abort") is not None:
            return  # (being carried out: `deploy_abort`)
        try:
            found = self.deployer.records.abort_request(self.record["id"])
        except StoreError:
            return
        if found is not None:
            self.record["abort"] = {"requested": found.get("at"), "by": found.get("by"),
                                    "since": None, "version": None, "problem": None,
                                    "code": None}
            raise Aborted()

    def begin(self, name: str, detail: str) -> None:
        now = time.time()
        steps = self.record["steps"]
        if steps and steps[-1]["ended"] is None and steps[-1]["name"] != name:
            steps[-1].update(ended=now, outcome=steps[-1]["outcome"] or "ok")
        if not steps or steps[-1]["name"] != name:
            steps.append({"name": name, "started": now, "ended": None, "outcome": None,
                          "detail": detail})
        self.record["step"] = name
        self.deployer.save(self.record)

    def end(self, outcome: str, detail: str) -> None:
        self.record["steps"][-1].update(ended=time.time(), outcome=outcome, detail=detail)
        self.deployer.save(self.record)

    # 1. ready ----------------------------------------------------------------
    def ready(self) -> None:
        """Check the new backends until each is up, by `ready_timeout` after the
        deploy started (a resumed deploy checks them again for the time left)."""
        config, strict = check_config(self.record["before"], self.host)
        timeout = float(self.settings["ready_timeout"])
        left = min(float(self.record["started"]) + timeout - time.time(), timeout) \
            if self.resumed else timeout
        if left <= 0:
            raise DeployFailed(f"not ready after {timeout:g}s (the management process "
                               f"restarted during the ready step); nothing was switched")
        deadline = time.monotonic() + left
        least = min(PROBE_LEAST, timeout / 2)  # (a short ready_timeout still checks once)
        pending = {a: 0 for a in addresses(self.record["to"])}
        problems: dict[str, str] = {}
        while pending:
            if self._rule_changed():  # (bug: waited out `ready_timeout` all the same, the
                raise DeployFailed("the host's rule changed during the deploy; nothing "
                                   "was switched")  # host refusing new deploys 409 meanwhile)
            found = probe_all(list(pending), self.host, config, strict, self.deployer.tls,
                              deadline, least)
            for address, problem in found.items():
                if problem == NOT_CHECKED:  # no finding: an earlier one stands
                    problems.setdefault(address, problem)
                elif problem is None:
                    pending[address] += 1
                    if pending[address] >= config.rise:
                        del pending[address]
                else:
                    pending[address], problems[address] = 0, problem
            if not pending:
                break
            self.pause(min(config.interval, max(0.0, deadline - time.monotonic())))
            if time.monotonic() >= deadline:
                why = "; ".join(f"{a}: {problems.get(a, 'not up yet')}" for a in pending)
                raise DeployFailed(f"not ready after {self.settings['ready_timeout']:g}s "
                                   f"({why}); nothing was switched")
        self.end("ok", f"{', '.join(addresses(self.record['to']))} up")

    # 2. switch ---------------------------------------------------------------
    def switch(self) -> None:
        if self.resumed and self.record.get("since") is not None:
            rule = dict(self.read().rule or {})
            if (rule.get("draining") or {}).get("since") == self.record["since"] or \
                    self._is_switched(rule):
                self.end("ok", "switched (before the restart)")
                return
        self.record["since"] = time.time()
        self.begin("switch", "one write of the rule")
        rule = switched_rule(self.record["before"], self.record["to"], self.record["since"],
                             float(self.settings["warmup"]))
        for _ in range(10):
            found = self.read()
            if found.rule == rule:  # written, its answer lost in an outage
                self.record["version"] = found.version
                self.end("ok", f"version {found.version}")
                return
            if found.rule != self.record["before"]:
                self._not_lost(found.version)
                raise DeployFailed("the host's rule changed during the deploy; nothing "
                                   "was switched")
            self.check_abort()  # (the last moment an abort changes nothing)
            try:
                version = self.write(rule, found.version)
            except VersionConflict:
                continue  # another host changed meanwhile (or our write landed): look again
            self.record["version"] = version
            self.end("ok", f"version {version}")
            return
        raise DeployFailed("the table kept changing; nothing was switched", "version_conflict")

    def read(self) -> HostRule:
        """The host's rule and the table's version (not the whole table: `host_rule`),
        an outage waited out."""
        found: HostRule = self.deployer.patiently(
            self.record, "read the rule", lambda: self.deployer.store.host_rule(self.host))
        return found

    def _rule_changed(self) -> bool:
        """Whether the host's rule is no longer the one the deploy started from (a
        store that cannot answer now tells nothing: the switch reads it again,
        patiently); `DeployFailed` naming the loss when the store lost its table."""
        try:
            found = self.deployer.store.host_rule(self.host)
        except (StoreUnavailable, CorruptStore):
            return False
        if found.rule == self.record["before"]:
            self.seen_version = max(self.seen_version, found.version)
            return False
        self._not_lost()
        # a table whose version went back lost it (a flushed Redis, an older routes
        # file) before this process's mirror judged it: its next look names the loss
        # (bug: the deploy failed "the host's rule changed" on a flushed Redis)
        return found.version >= self.seen_version

    def write(self, rule: dict[str, Any], if_version: int) -> int:
        """Write the host's `rule` if the table is at `if_version`, an outage waited
        out; `DeployFailed` when the store lost its table (the 409 `store_lost` of a
        one-host write: bug, it went up as an "internal error" with a traceback in
        the log)."""
        try:
            return int(self.deployer.patiently(self.record, "write the rule", lambda: (
                self.deployer.fenced(self.record, lambda claimed: (
                    self.deployer.write_rule(self.host, rule, if_version, claimed))))))
        except ApiError as exc:
            switched = "" if self.record["version"] else "; nothing was switched"
            raise DeployFailed(f"cannot write the rule: {exc.message}{switched}",
                               exc.code) from None

    def _not_lost(self, version: int | None = None,
                  cannot: str = "switch: {lost}; nothing was switched") -> None:
        """`DeployFailed` naming the store's loss (`cannot`, formatted with it), if it
        lost its table (bug: a flushed Redis read as no rule, and the deploy failed
        "the host's rule changed"): as this process's mirror judged it, or as the rule
        read at `version`, below the one the ready step saw it at, shows it (bug: the
        switch read a flushed Redis before the mirror's next resync, and failed "the
        host's rule changed")."""
        lost = self.deployer.lost()
        if not lost and version is not None and version < self.seen_version:
            lost = str(StoreLost(self.deployer.store.display_url, version, self.seen_version))
        if lost:
            raise DeployFailed(f"cannot {cannot.format(lost=lost)}", "store_lost")

    def _is_switched(self, rule: dict[str, Any]) -> bool:
        return rule.get("action") == "proxy" and "draining" not in rule and \
            addresses(rule.get("backends", [])) == addresses(self.record["to"])

    # 3. warmup ---------------------------------------------------------------
    def warmup(self) -> None:
        warmup = float(self.settings["warmup"])
        end = float(self.record["since"]) + warmup
        if not leaving(self.record["from"], self.record["to"]) or warmup <= 0:
            return  # (no old backend leaves: no ramp to wait for)
        self.begin("warmup", f"new backends ramp up over {warmup:g}s")
        deadline = local_deadline(end, warmup)
        while (left := deadline - time.monotonic()) > 0:
            self.pause(min(0.25, left))
        self.end("ok", f"{warmup:g}s")

    # 4. drain ----------------------------------------------------------------
    def drain(self) -> None:
        draining = sorted(set(addresses(leaving(self.record["from"], self.record["to"]))))
        if not draining:
            self.finish(self.record["since"])
            return
        warmup = float(self.settings["warmup"])
        self.begin("drain", f"waiting for {', '.join(draining)}")
        drained, counts = self.wait_drained(draining, float(self.record["since"]) + warmup,
                                            warmup, int(self.record["version"] or 0))
        routed = routed_again(self.finish(self.record["since"]), draining)
        if routed:  # (bug: "drained", and a script stopped backends the rule named)
            raise DeployFailed(f"the host's rule was changed during the drain and routes to "
                               f"{', '.join(routed)} again: not drained, do not stop "
                               f"{'it' if len(routed) == 1 else 'them'}", "version_conflict",
                               " (the rule set meanwhile serves)")
        if drained:
            self.end("drained", f"{', '.join(draining)}: no request in flight")
        else:
            self.timed_out("drain", counts)

    def wait_drained(self, draining: list[str], after: float, ramp: float, version: int
                     ) -> tuple[bool, dict[str, dict[str, int]] | None]:
        """Wait until every live balancer serving `version` counts no request in flight
        on `draining`, in counts taken from `after` on, or `drain_timeout` after that
        (`ramp` seconds of it may be left to wait for `after`): (drained, the last
        counts, None when no balancer could tell)."""
        timeout = float(self.settings["drain_timeout"])
        # counts taken after `after`, and late enough that every balancer (looking
        # once every IDLE_EVERY) has seen the claim made when the deploy started
        since = max(after, float(self.record["started"]) + IDLE_EVERY) + DRAIN_SETTLE
        longest = ramp + IDLE_EVERY + DRAIN_SETTLE + timeout
        deadline = local_deadline(max(time.time(), since) + timeout, longest)
        while True:
            reports = self.deployer.patiently(self.record, "read the in-flight counts",
                                              self.deployer.records.inflight)
            counts = in_flight(reports, self.host, draining, version, since, time.time())
            if counts is not None and not any(c["in_flight"] for c in counts.values()):
                return True, counts
            if time.monotonic() >= deadline:
                return False, counts
            self.pause(0.1)

    def timed_out(self, what: str, counts: dict[str, dict[str, int]] | None) -> None:
        """End the step that waited for a drain (`what`) with its warning: what is
        still open per backend."""
        timeout = float(self.settings["drain_timeout"])
        left = ", ".join(f"{a}: {c['in_flight']} in flight ({c['tunnels']} WebSocket tunnels)"
                         for a, c in (counts or {}).items() if c["in_flight"]) \
            or ("not every balancer could tell its counts (one not serving the switch "
                "yet, or a worker of one not answering its control socket)")
        self.record["warning"] = f"{what} timed out after {timeout:g}s; still open: {left}"
        self.record["remaining"] = counts
        self.end("timeout", self.record["warning"])

    def finish(self, since: float | None) -> dict[str, Any] | None:
        """Remove `draining` from the rule if it is still the one written at `since`
        (the switch's, or an abort's): None, or the rule someone else wrote meanwhile
        (``{}``: the host deleted), left as it is. A rule the store lost with its table
        is no one else's: `DeployFailed` naming the loss (bug: read as someone else's
        change, the deploy ended done, and the rule `balancerctl restore` put back kept
        the drained backends under `draining` for good)."""
        for _ in range(10):
            found = self.read()
            rule = found.rule
            if rule is None:
                self._not_lost(found.version, "remove 'draining' from the rule: {lost} (once "
                               "restored, the drained backends stay listed under 'draining', "
                               "getting no new request)")
            if not rule or (rule.get("draining") or {}).get("since") != since:
                return dict(rule or {})
            clean = {k: v for k, v in rule.items() if k != "draining"}
            try:
                self.write(clean, found.version)
                return None
            except VersionConflict:
                continue
        raise DeployFailed("the table kept changing; the backends drained stay listed under "
                           "'draining' (they get no new request)", "version_conflict")
