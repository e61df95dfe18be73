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
"""

from __future__ import annotations

import time
from typing import Any

from balancer.stores import VersionConflict
from management.deploy_run import DeployFailed, Run
from management.deploy_steps import addresses, leaving, reverted_rule, switched_rule


def abort(run: Run) -> None:
    """Stop `run`'s deploy where it stands (the module's invariants)."""
    record = run.record
    stopped = record["steps"][-1] if record["steps"] else None
    if stopped is not None and stopped["name"] != "abort" and stopped["ended"] is None:
        stopped.update(ended=time.time(), outcome="aborted",
                       detail=f"aborted (asked by {record['abort'].get('by')})")
    if record.get("since") is not None and _go_back(run):  # (None: no switch begun)
        _drain_new(run)


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
    raise DeployFailed("the table kept changing; the switch stands")


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
    run.finish(asked["since"])
    if drained:
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
