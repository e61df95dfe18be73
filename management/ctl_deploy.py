"""`balancerctl deploy`, `rollback` and `deploys` (SPEC §10, docs/deploys.md).

Invariants:
* `deploy` and `rollback` follow the deploy until it ends (unless --no-wait),
  printing one line per step as it starts and ends (not with --json), and
  fail (`CtlError`: exit 1 and the reason) when the deploy fails.
* The wait is bounded: the deploy's own timeouts plus `WAIT_MARGIN`; a deploy
  still running then fails the command saying so (it goes on), never as failed.
* `deploy HOST --abort` asks the host's running deploy to stop (any balancer
  sharing the store), follows it the same way, and succeeds once it ended
  ``aborted``; a deploy followed that someone else aborted fails the command,
  saying so.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from balancer.rules import MAX_HOLD
from management import ctl_help
from management.ctl_client import UsageError
from management.ctl_format import moment, shown

POLL = 0.25
WAIT_MARGIN = 60.0  # seconds beyond the deploy's own timeouts before giving up waiting


def add_parsers(sub: Any, common: argparse.ArgumentParser,
                host: Callable[[argparse.ArgumentParser], None]) -> None:
    deploy = sub.add_parser(
        "deploy", parents=[common], help="move a host to new backends without a failed request",
        description="Check the new backends until they answer, switch HOST's rule to them in "
                    "one write, ramp them up over --warmup while the old ones get less, then "
                    "wait until the old backends have no request in flight (drain). Shows "
                    "each step; exits non-zero with the reason if one fails (the previous "
                    "rule keeps serving) or the deploy is aborted. With --abort, stop HOST's "
                    "running deploy instead and show it to its end.")
    host(deploy)
    what = deploy.add_mutually_exclusive_group(required=True)
    what.add_argument("--backend", action="append", metavar="ADDR",
                      help="a new backend address (repeatable)")
    what.add_argument("--abort", action="store_true",
                      help="stop HOST's running deploy instead (whichever balancer runs it): "
                           "before the switch nothing changes; after it HOST goes back to its "
                           "previous backends and the new ones are drained")
    _timings(deploy)
    rollback = sub.add_parser(
        "rollback", parents=[common], help="deploy a host back to its previous backends",
        description="Deploy HOST back to the backends its last finished deploy moved away "
                    "from, with the same steps as deploy.")
    host(rollback)
    _timings(rollback)
    sub.add_parser("deploys", parents=[common], help="recent deploys and their steps",
                   description="The recent deploys of every host (kept in the store), "
                               "newest first.")


def _timings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ready-timeout", type=ctl_help.finite, metavar="S",
                        help="give up if the new backends are not up by then (default 60)")
    parser.add_argument("--drain-timeout", type=ctl_help.finite, metavar="S",
                        help="stop waiting for the old backends' requests (default 30)")
    parser.add_argument("--warmup", type=ctl_help.finite, metavar="S",
                        help="seconds over which the new backends ramp up (default 10)")
    parser.add_argument("--no-wait", action="store_true",
                        help="return once the request is answered (follow the deploy "
                             "with `deploys`)")


def body_of(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if getattr(args, "backend", None):
        body["backends"] = list(args.backend)
    for key in ("ready_timeout", "drain_timeout", "warmup"):
        if getattr(args, key) is not None:
            body[key] = getattr(args, key)
    return body


def run(args: argparse.Namespace, client: Any, error: type[Exception]) -> tuple[Any, str]:
    """`deploy`, `rollback` or `deploys`: (the API's answer, the text for people)."""
    if args.command == "deploys":
        answer = client.call("GET", "/api/v1/deploys")
        return answer, format_deploys(answer["deploys"])
    path = f"/api/v1/hosts/{quote(args.host, safe='*')}/{args.command}"
    if getattr(args, "abort", False):
        return _abort(args, client, path, error)
    record = client.call("POST", path, body_of(args))["deploy"]
    if args.no_wait:
        return {"deploy": record}, f"{shown(_named(record))} started"
    record = _ended(args, client, record, error)
    if record["state"] == "aborted":  # (by someone else)
        raise error(f"{_aborted(record)}")
    text = f"{shown(_named(record))} done in {record['ended'] - record['started']:.1f}s: " \
           f"{shown(', '.join(map(str, record['to'])))}"
    if record.get("warning"):
        text += f"\nwarning: {shown(record['warning'])}"
    return {"deploy": record}, text


def _abort(args: argparse.Namespace, client: Any, path: str,
           error: type[Exception]) -> tuple[Any, str]:
    """`deploy HOST --abort`: DELETE the host's deploy, then follow it to its end."""
    given = [f"--{k.replace('_', '-')}" for k in ("ready_timeout", "drain_timeout", "warmup")
             if getattr(args, k) is not None]
    if given:
        raise UsageError(f"--abort takes no timings ({', '.join(given)})")
    record = client.call("DELETE", path)["deploy"]
    if args.no_wait and record["state"] == "running":
        return {"deploy": record}, f"{shown(_named(record))}: abort asked; it is stopping"
    record = _ended(args, client, record, error)
    if record["state"] != "aborted":
        raise error(f"{_named(record)} did not stop: {record['state']}")
    return {"deploy": record}, shown(_aborted(record))


def _ended(args: argparse.Namespace, client: Any, record: dict[str, Any],
           error: type[Exception]) -> dict[str, Any]:
    """The deploy followed to its end (one line per step, unless --json); `error`
    when it failed or still runs when the wait is over."""
    show = None if getattr(args, "json", False) else Progress()
    record = follow(client, record, show)
    if record["state"] == "running":  # (bug: "failed at step drain: None")
        raise error(f"{_named(record)} still running at step {record['step']} when this "
                    f"command stopped waiting (its timeouts plus {WAIT_MARGIN:g}s); it goes "
                    f"on: follow it with `balancerctl deploys`")
    if record["state"] == "failed":
        step = record["steps"][-1]["name"] if record["steps"] else "?"
        raise error(f"{_named(record)} failed at step {step}: {record['error']}")
    return record


def _aborted(record: dict[str, Any]) -> str:
    """``deploy ID of HOST aborted at step S (asked by B): what the abort did``."""
    last = record["steps"][-1] if record["steps"] else {}
    did = last.get("detail") if last.get("name") == "abort" else "nothing was switched"
    text = f"{_named(record)} aborted at step {record['step']} (asked by " \
           f"{(record.get('abort') or {}).get('by')}): {did}"
    return text + (f"\nwarning: {record['warning']}" if record.get("warning") else "")


def _named(record: dict[str, Any]) -> str:
    """``deploy ID of HOST`` (as the answer has it: `shown` by the caller)."""
    return f"{record['kind']} {record['id']} of {record['host']}"


def follow(client: Any, record: dict[str, Any], show: Progress | None) -> dict[str, Any]:
    """Poll the deploy until it ends (bounded by its timeouts); the final record."""
    deadline = time.monotonic() + sum(_timing(record["settings"], k) for k in
                                      ("ready_timeout", "drain_timeout", "warmup")) + WAIT_MARGIN
    while True:
        if show is not None:
            show.update(record)
        if record["state"] != "running" or time.monotonic() > deadline:
            return record
        time.sleep(POLL)
        record = client.call("GET", f"/api/v1/deploys/{quote(record['id'], safe='')}")["deploy"]


def _timing(settings: dict[str, Any], key: str) -> float:
    """A deploy's timing, as the API bounds it (bug: a server's ``1e999`` or ``NaN``
    made the wait endless)."""
    value = float(settings[key])
    if not 0 <= value <= MAX_HOLD:
        raise ValueError(f"the deploy's {key} is {value}, not 0 to {MAX_HOLD} seconds")
    return value


class Progress:
    """Prints each step's start and end once, as they appear in the record."""

    def __init__(self) -> None:
        self.printed: set[tuple[str, bool | str]] = set()

    def update(self, record: dict[str, Any]) -> None:
        problem = (record.get("abort") or {}).get("problem")
        if problem and ("problem", problem) not in self.printed:  # (each one once)
            self.printed.add(("problem", problem))
            print(shown(f"abort   not carried out yet (tried again): {problem}"), flush=True,
                  file=sys.stdout)
        for step in record["steps"]:
            for done in (False, True):
                key = (step["name"], done)
                if key in self.printed or (done and step["ended"] is None):
                    continue
                self.printed.add(key)
                print(shown(_step_line(step, done)), flush=True, file=sys.stdout)


def _step_line(step: dict[str, Any], done: bool) -> str:
    if not done:
        return f"{step['name']:<7} ... {step['detail']}"
    took = step["ended"] - step["started"]
    return f"{step['name']:<7} {step['outcome']} in {took:.1f}s: {step['detail']}"


def format_deploys(records: list[dict[str, Any]]) -> str:
    """One line per deploy: when, host, state, step, from → to."""
    if not records:
        return "no deploys recorded"
    lines = [f"{'STARTED':<19}  {'HOST':<24} {'KIND':<8} {'STATE':<8} {'STEP':<7} FROM -> TO"]
    for r in records:
        started = moment(r.get("started", 0), "%Y-%m-%d %H:%M:%S")
        moved = f"{_names(r.get('from'))} -> {_names(r.get('to'))}"
        lines.append(f"{started:<19}  {shown(r.get('host', '')):<24} "
                     f"{shown(r.get('kind', '')):<8} {shown(r.get('state', '')):<8} "
                     f"{shown(r.get('step') or ''):<7} {shown(moved)}")
        if r.get("error"):
            lines.append(f"{'':<21}error: {shown(r['error'])}")
    return "\n".join(lines)


def _names(entries: Any) -> str:
    out = [e if isinstance(e, str) else str(e.get("address")) for e in entries or []]
    return ",".join(out) or "-"
