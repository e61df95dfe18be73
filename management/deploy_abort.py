"""What an abort does to a deploy (SPEC §10, docs/deploys.md "Aborting a deploy"),
carried out by the process running it once `Run.steps` raised `Aborted`.

Invariants:
* The record keeps the step the deploy stopped in (``step``), that step ended
  with the outcome ``aborted``; the deploy ends ``aborted`` (`Deployer.run`)
  with ``abort``: who asked, when, and the write it made (``since``,
  ``version``: None when it made none).
* Before the switch's write (the ready step, or the switch before its write)
  nothing is written: the rule the deploy started from serves on.
* After it the host goes back to the rule the deploy started from, in one
  conditional write made only while the rule is still this deploy's (its
  switch, with or without ``draining``): the new backends it does not name go
  under ``draining`` with no warmup (no new request, their requests in flight
  finish), which the abort waits for as a drain does (``drain_timeout``), in a
  step named ``abort``, then removes. A rule someone else wrote meanwhile is
  left as it is. Going back, not forward: the old backends still run (a deploy
  that has not ended never told anyone to stop them), the new ones are what
  the operator stopped trusting.
* The write's ``since`` is in the record before it is made, so a process that
  resumes the abort (a restart) knows whether it happened.
* An abort never ends half-way: while its write back (or the removal of
  ``draining``) cannot be made (the store down or refusing writes, the table
  lost or changing), it is tried again every `ABORT_RETRY` seconds, the deploy
  still running, its record's ``abort.problem`` saying why (the abort's answer
  says so: `management.deploys_api.abort`), until the store takes it, someone
  else's rule makes it moot, or `ABORT_PATIENCE` after the abort was asked
  (``requested``, whichever process resumes it) runs out (the deploy then
  fails, saying the switch stands, its cause's error code in ``abort.code``).
  A problem an outage noted (`Deployer.patiently`) goes at the store's next
  answer. Bug: the deploy ended ``failed`` at the
  first refusal (or after 30 s of outage) and the abort answered 200, the new
  backends serving on.
* A rule the store no longer has at the version the deploy started from
  (``from_version``), or a table the store's mirror judged lost, is the store's
  loss (flushed, restarted empty, an older copy), named as such and waited out
  as a refused write (`balancerctl restore` puts the switched rule back, and the
  abort goes on); never taken for someone else's change (bug: "the host's rule
  was changed meanwhile: left as it is", the deploy ended aborted, the new
  backends served on).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, TypeVar

from balancer.stores import HostRule, VersionConflict
from management.deploy_run import DeployFailed, Run, local_deadline, routed_again
from management.deploy_steps import addresses, leaving, reverted_rule, switched_rule

ABORT_RETRY = 1.0        # seconds between tries of an abort's write the store refused
ABORT_PATIENCE = 3600.0  # seconds an abort's write is tried before the deploy fails
T = TypeVar("T")


def abort(run: Run) -> None:
    """Stop `run`'s deploy where it stands (the module's invariants)."""
    record = run.record
    stopped = record["steps"][-1] if record["steps"] else None
    if stopped is not None and stopped["name"] != "abort" and stopped["ended"] is None:
        stopped.update(ended=time.time(), outcome="aborted",
                       detail=f"aborted (asked by {record['abort'].get('by')})")
    if record.get("since") is None:  # no switch begun: nothing to go back from
        return
    give_up = _give_up(record["abort"])
    if _persisting(run, give_up, lambda: _go_back(run)):
        _persisting(run, give_up, lambda: _drain_new(run))


def _give_up(asked: dict[str, Any]) -> float:
    """When (a monotonic time) the abort `asked` gives up: `ABORT_PATIENCE` after it
    was asked (its ``requested``, kept in the record: bug, every management process
    resuming the abort started a fresh hour of retries), at most that from now."""
    try:
        requested = float(asked.get("requested"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        requested = math.nan
    if not math.isfinite(requested):  # (a hand edit: from now)
        requested = time.time()
    return local_deadline(requested + ABORT_PATIENCE, ABORT_PATIENCE)


def _persisting(run: Run, give_up: float, call: Callable[[], T]) -> T:
    """`call()`, tried again every `ABORT_RETRY` seconds while it fails, the reason
    in the record's ``abort.problem`` and its error code in ``abort.code`` (for the
    abort's answer, the same as once it gave up), until `give_up` (a monotonic time)."""
    asked = run.record["abort"]
    while True:
        try:
            done = call()
            if asked.get("problem"):  # (its save retried with the call, which knows what
                asked.update(problem=None, code=None)  # it did: bug, a save failing here
                run.deployer.save(run.record)  # ended the deploy failed after it went back)
            return done
        except DeployFailed as exc:
            if time.monotonic() >= give_up:
                asked["code"] = exc.code
                raise DeployFailed(f"the abort gave up after {ABORT_PATIENCE:g}s: {exc}; "
                                   f"the switch stands", exc.code) from None
            run.deployer.trouble(run.record, str(exc), exc.code)
            run.pause(ABORT_RETRY)


def _go_back(run: Run) -> bool:
    """Write the rule the deploy started from (unless written already); False when
    there is nothing to go back from (no switch made, or someone else's rule)."""
    record, asked = run.record, run.record["abort"]
    before, to = record["before"], record["to"]
    ours = switched_rule(before, to, record["since"], float(run.settings["warmup"]))
    drained = {k: v for k, v in ours.items() if k != "draining"}
    for _ in range(10):
        found = run.read()
        back = None if asked["since"] is None else reverted_rule(before, to, asked["since"])
        if back is not None and found.rule == back:  # written: before a restart, or its
            asked["version"] = asked["version"] or found.version  # answer lost
            return True
        _not_lost(run, found)
        if found.rule == before or found.rule not in (ours, drained):
            _note(run, "nothing was switched" if found.rule == before else
                  "the host's rule was changed meanwhile: left as it is")
            return False
        if back is None:
            back = _begin(run)
        try:
            asked["version"] = run.write(back, found.version)
        except VersionConflict:
            continue
        return True
    raise DeployFailed("the table kept changing (each write back met a newer version)",
                       "version_conflict")


def _not_lost(run: Run, found: HostRule) -> None:
    """`DeployFailed` naming the store's loss of its table, if it lost it."""
    lost = run.deployer.lost()
    if lost is None and found.version < int(run.record.get("from_version") or 0):
        lost = (f"the store is at version {found.version}, below the version "
                f"{run.record['from_version']} the deploy started from: the store lost its "
                f"table (flushed, restarted empty, restored from an older copy); run "
                f"`balancerctl restore`")
    if lost is not None:
        raise DeployFailed(f"cannot go back: {lost} (the abort goes on once the host's rule "
                           f"is back; the new backends serve meanwhile)", "store_lost")


def _begin(run: Run) -> dict[str, Any]:
    """Name the write in the record (the ``abort`` step), then give the rule."""
    record = run.record
    record["abort"]["since"] = time.time()
    record["steps"].append({"name": "abort", "started": time.time(), "ended": None,
                            "outcome": None, "detail": f"back to {_names(record['before'])}"})
    run.deployer.save(record)
    return reverted_rule(record["before"], record["to"], record["abort"]["since"])


def _drain_new(run: Run) -> None:
    """Wait for the new backends' requests in flight, then remove ``draining``."""
    record, asked = run.record, run.record["abort"]
    before = record["before"]
    old = list(before.get("backends", ())) if before.get("action") == "proxy" else []
    going = addresses(leaving(record["to"], old)) if old else []
    back = f"back to {_names(before)}"
    if not going:
        run.end("ok", back)
        return
    drained, counts = run.wait_drained(going, float(asked["since"]), 0.0,
                                       int(asked["version"] or 0))
    routed = routed_again(run.finish(asked["since"]), going)
    if routed:  # (as a deploy's drain: bug, "no request in flight" and stopped)
        run.end("ok", f"{back}; the host's rule was changed meanwhile and routes to "
                      f"{', '.join(routed)} again: not drained, do not stop "
                      f"{'it' if len(routed) == 1 else 'them'}")
    elif drained:
        run.end("drained", f"{back}; {', '.join(going)}: no request in flight")
    else:
        run.timed_out("abort", counts)


def _note(run: Run, detail: str) -> None:
    run.record["steps"].append({"name": "abort", "started": time.time(),
                                "ended": time.time(), "outcome": "ok", "detail": detail})
    run.deployer.save(run.record)


def _names(rule: dict[str, Any]) -> str:
    if rule.get("action") != "proxy":
        return f"the {rule.get('action')} rule"
    return ", ".join(addresses(list(rule.get("backends", ())))) or "no backend"
