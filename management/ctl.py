"""`balancerctl`: the command-line client of the management API (SPEC §2).

Invariants:
* Every failure ends the same way: one line ``balancerctl: <reason>`` on
  stderr and a non-zero exit (1 for errors, 2 for usage), whatever the server
  at ``--url`` answers (`management.ctl_client`; an answer of another shape
  than the command reads is `MISSHAPEN`).
* ``--json`` prints the API's JSON answer unchanged; otherwise a table.
* Nothing from an answer reaches the terminal as is: the fields a line shows
  are `shown` (escaped), and the whole text passes `terminal` before printing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn
from urllib.parse import quote, urlencode

from balancer.rules import (
    ACTION_KEYS,
    ACTIONS,
    COMMON_KEYS,
    DRAINING_KEYS,
    HEALTH_KEYS,
    LIMIT_KEYS,
)
from balancer.top_names import BY, GROUPS
from balancer.version import VersionAction
from management import ctl_cert, ctl_deploy, ctl_help
from management.ctl_client import (
    DEFAULT_URL,
    MAX_ANSWER,
    TIMEOUT,
    Client,
    CtlError,
    UsageError,
    finite_float,
    refuse_constant,
)
from management.ctl_format import (
    format_hosts,
    format_inflight,
    format_rule,
    format_stats,
    format_top,
    shown,
    terminal,
    warn,
)

STATS_PAGE = 10000  # hosts per `stats` page (the API's most)
STATS_PAGES = 1000  # pages at most: 10 million hosts


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"balancerctl: {message} (see balancerctl --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> Parser:
    common = Parser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help="the management API, not the proxy "
                             f"(default $BALANCER_URL or {DEFAULT_URL})")
    common.add_argument("--token", default=argparse.SUPPRESS,
                        help="bearer token (default $BALANCER_TOKEN)")
    common.add_argument("--timeout", type=ctl_help.seconds, default=argparse.SUPPRESS,
                        metavar="SECONDS", help="give up on an API call after this long in "
                                                f"all (default {TIMEOUT:g})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the API's JSON instead of a table")
    parser = Parser(prog="balancerctl", parents=[common], description=ctl_help.DESCRIPTION,
                    epilog=ctl_help.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser,
                                metavar="COMMAND", title="commands")
    sub.add_parser("list", parents=[common], help="list every host and its rule",
                   description="List every host of the routing table and its rule.")
    _host(sub.add_parser("get", parents=[common], help="show one host's rule",
                         description="Show HOST's rule and the table version."))
    _add_set(sub, common)
    _host(sub.add_parser("delete", parents=[common], help="remove a host",
                         description="Remove HOST from the routing table."))
    add = sub.add_parser("add-backend", parents=[common], help="add a backend to a proxy host",
                         description="Add ADDR to HOST's proxy rule (or change its weight "
                                     "when the rule has it already).")
    _host(add)
    add.add_argument("address", metavar="ADDR",
                     help="backend address: host:port, [v6]:port, or https://ADDR for TLS")
    add.add_argument("--weight", type=int, metavar="N", help="1-1000 (default 1)")
    remove = sub.add_parser("remove-backend", parents=[common], help="remove one backend",
                            description="Remove ADDR from HOST's proxy rule.")
    _host(remove)
    remove.add_argument("address", metavar="ADDR", help="the backend address to remove")
    stats = sub.add_parser("stats", parents=[common], help="traffic per host and backend",
                           description="Requests, bytes and responses per host; state, "
                                       "in-flight requests and failures per backend.")
    stats.add_argument("host", nargs="?", metavar="HOST", type=ctl_help.host_key,
                       help="only this host (default: all)")
    top = sub.add_parser("top", parents=[common], help="the heaviest clients, hosts, paths "
                         "or backends", description="The heaviest keys of a group over the "
                         "last WINDOW seconds, summed over every worker.")
    top.add_argument("--by", default="requests", choices=BY,
                     help="what to rank by (default requests)")
    top.add_argument("--group", default="client", choices=GROUPS,
                     help="what to rank (default client)")
    top.add_argument("--window", type=ctl_help.finite, default=60.0,
                     help="seconds, 1 to 300 (default 60)")
    top.add_argument("--limit", type=int, default=10, help="keys shown, 1 to 100 (default 10)")
    inflight = sub.add_parser("inflight", parents=[common], help="requests open for a while",
                              description="The requests open for at least MIN_AGE seconds, "
                                          "oldest first, on every worker.")
    inflight.add_argument("--min-age", type=ctl_help.finite, default=0.0, metavar="SECONDS",
                          help="only requests open this long (default 0)")
    sub.add_parser("reload", parents=[common], help="make the balancer re-read its store",
                   description="Make every worker re-read the store now; prints the version "
                               "served. The settings (flags, environment, config file) are "
                               "re-read by SIGHUP to the arbiter (systemctl reload "
                               "balancer), not by this.")
    sub.add_parser("restore", parents=[common],
                   help="write the table the balancer serves back to its store",
                   description="After the store lost its table (Redis flushed or restarted "
                               "empty, an older copy restored, the routes file deleted), "
                               "write the table the workers serve back, at a version above "
                               "any served.")
    ctl_deploy.add_parsers(sub, common, _host)
    ctl_cert.add_parsers(sub, common)
    return parser


def _host(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("host", metavar="HOST", type=ctl_help.host_key,
                        help="a routing-table key: a host name, *.suffix or *")


def _add_set(sub: Any, common: Parser) -> None:
    put = sub.add_parser("set", parents=[common], help="set a host's rule",
                         description=ctl_help.SET_DESCRIPTION,
                         epilog=ctl_help.action_keys_help(),
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _host(put)
    put.add_argument("action", metavar="ACTION", choices=list(ACTIONS),
                     help="one of " + ", ".join(ACTIONS) + " (keys below)")
    put.add_argument("--backend", action="append", default=[], metavar="ADDR",
                     help="a backend address for proxy (repeatable)")
    put.add_argument("fields", nargs="*", metavar="key=value",
                     help="the rule's other keys (below)")


def parse_fields(pairs: list[str], action: str | None = None) -> dict[str, Any]:
    """``key=value`` pairs to a dict: JSON values when they parse, text otherwise.

    `UsageError` for a pair without ``=`` or a key, a key `action` does not
    have (`balancer.rules` keys; deeper checks are the API's), or a key set both
    as a value and as an object."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {pair!r}")
        *parents, leaf = key.split(".")
        if not all(parents) or not leaf:
            raise UsageError(f"{key}: a dotted key needs a name on each side of every dot")
        if action is not None:
            _check_key(action, key.split("."))
        try:
            value = json.loads(text, parse_constant=refuse_constant,
                               parse_float=finite_float)
        except ValueError:  # NaN and Infinity stay text: the API names the field it refuses
            value = text
        node = out
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UsageError(f"{key}: {part} is both a value and an object")
        if isinstance(node.get(leaf), dict):
            raise UsageError(f"{key}: {leaf} is both an object and a value")
        node[leaf] = value
    return out


NESTED_KEYS = {"health": HEALTH_KEYS, "limits": LIMIT_KEYS, "draining": DRAINING_KEYS}


def _check_key(action: str, parts: list[str]) -> None:
    """`UsageError` unless `parts` (a dotted key) names a key of `action`'s rules."""
    allowed = (COMMON_KEYS | ACTION_KEYS[action]) - {"action"}
    if parts[0] not in allowed:
        raise UsageError(f"{parts[0]}: unknown key for action {action!r}; its keys: "
                         + ", ".join(sorted(allowed)))
    nested = NESTED_KEYS.get(parts[0])
    if len(parts) > 1 and (nested is None or len(parts) > 2):
        raise UsageError(f"{'.'.join(parts)}: {parts[0]} has no keys"
                         if nested is None else f"{'.'.join(parts)}: too many dots")
    if nested is not None and len(parts) == 2 and parts[1] not in nested:
        raise UsageError(f"{'.'.join(parts)}: unknown key of {parts[0]}; its keys: "
                         + ", ".join(sorted(nested)))


def host_path(host: str, *rest: str) -> str:
    parts = ["/api/v1/hosts", quote(host, safe="*")] + [quote(p, safe="[]:") for p in rest]
    return "/".join(parts)


def run(args: argparse.Namespace, client: Client) -> tuple[Any, str]:
    """Do the command; returns (the API's answer, the text for people)."""
    command = args.command
    if command == "list":
        answer = client.call("GET", "/api/v1/hosts")
        return answer, _warned(answer, format_hosts(answer))
    if command == "get":
        answer = client.call("GET", host_path(args.host))
        return answer, _warned(answer, format_rule(answer))
    if command == "set":
        rule = {"action": args.action, **parse_fields(args.fields, args.action)}
        if args.backend:
            rule["backends"] = list(rule.get("backends", [])) + args.backend
        answer = client.call("PUT", host_path(args.host), rule)
        return answer, _done(answer, f"{args.host}: {args.action}")
    if command == "delete":
        answer = client.call("DELETE", host_path(args.host))
        return answer, _done(answer, f"{args.host}: deleted")
    if command == "add-backend":
        body: dict[str, Any] = {"address": args.address}
        if args.weight is not None:
            body["weight"] = args.weight
        answer = client.call("POST", host_path(args.host, "backends"), body)
        return answer, _done(answer, f"{args.host}: added {args.address}")
    if command == "remove-backend":
        answer = client.call("DELETE", host_path(args.host, "backends", args.address))
        return answer, _done(answer, f"{args.host}: removed {args.address}")
    if command == "stats":
        if args.host:
            answer = client.call("GET", f"/api/v1/stats/{quote(args.host, safe='*')}")
        else:
            answer = every_stats_page(client)
        return answer, _partial(answer, format_stats(answer))
    if command in ("deploy", "rollback", "deploys"):
        return ctl_deploy.run(args, client, CtlError)
    if command == "top":
        query = urlencode({"by": args.by, "group": args.group, "window": f"{args.window:g}",
                           "limit": args.limit})
        answer = client.call("GET", f"/api/v1/top?{query}")
        return answer, _partial(answer, format_top(answer))
    if command == "inflight":
        answer = client.call("GET", f"/api/v1/inflight?min_age={args.min_age:g}")
        return answer, _partial(answer, format_inflight(answer))
    if command == "cert":
        return ctl_cert.run(args, client, CtlError)
    if command == "restore":
        answer = client.call("POST", "/api/v1/restore")
        return answer, _applied(answer, f"restored {shown(answer['hosts'])} hosts (served "
                                        f"version {shown(answer['restored_from'])}) as "
                                        f"version {shown(answer['version'])}")
    answer = client.call("POST", "/api/v1/reload")
    return answer, f"reloaded: version {shown(answer['version'])}"


def every_stats_page(client: Any) -> dict[str, Any]:
    """``/api/v1/stats`` page after page (`STATS_PAGE` hosts each), as one answer: at
    most `MAX_ANSWER` bytes of pages in all, each page's ``next`` above the last
    (bug: a server repeating its ``next`` or sending pages without end was followed
    for `STATS_PAGES` pages, each kept)."""
    start = client.received
    answer = client.call("GET", f"/api/v1/stats?limit={STATS_PAGE}")
    hosts, after = answer["hosts"], ""
    for _ in range(STATS_PAGES):
        following = answer.get("next")
        if not following:
            break
        if not isinstance(following, str) or following <= after:
            raise CtlError(f"{client.url}: its stats pages do not advance (after {after!r} "
                           f"comes {following!r})")
        if client.received - start > MAX_ANSWER:
            raise CtlError(f"{client.url}: its stats pages go on past the "
                           f"{MAX_ANSWER >> 20} MiB balancerctl reads (`balancerctl stats "
                           f"HOST` shows one host)")
        after = following
        query = urlencode({"limit": STATS_PAGE, "after": after})
        answer = client.call("GET", f"/api/v1/stats?{query}")
        hosts.update(answer["hosts"])
    return {**answer, "hosts": hosts, "next": None}


def _warned(answer: Any, text: str) -> str:
    """`text`, after a warning on stderr when the answer is the served table, not the store's."""
    problem = answer.get("store_problem") if isinstance(answer, dict) else None
    if problem:
        warn(problem)
    return text


def _partial(answer: Any, text: str) -> str:
    """`text`, after a warning on stderr naming the workers left out (they do not answer)."""
    lagging = answer.get("lagging") if isinstance(answer, dict) else None
    if lagging:
        warn(f"without worker(s) {_workers(lagging)}")
    return text


def _done(answer: dict[str, Any], what: str) -> str:
    """``WHAT (version N)`` for a write's answer, with `_applied`'s warning."""
    return _applied(answer, f"{what} (version {shown(answer['version'])})")


def _applied(answer: Any, text: str) -> str:
    """`text`, plus which workers do not serve the write yet (a 202 answer)."""
    if isinstance(answer, dict) and answer.get("applied") is False:
        text += f"\nwarning: not yet served by worker(s) {_workers(answer.get('lagging', []))}"
    return text


def _workers(lagging: list[dict[str, Any]]) -> str:
    """The workers of a ``lagging`` list, as ``PID (REASON), ...``."""
    return ", ".join(f"{shown(w.get('pid'))} ({shown(w.get('reason'))})"
                     if w.get("pid") is not None else shown(w.get("reason"))  # none asked
                     for w in lagging)


# what reading an answer of another shape raises: a field missing (KeyError), a list for an
# object (AttributeError), text for a number (TypeError, ValueError in a format), a timestamp
# out of range (OverflowError)
MISSHAPEN = (KeyError, IndexError, TypeError, AttributeError, ValueError, OverflowError)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``balancerctl`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "set":  # key=value pairs may follow --backend options
        args.fields += [e for e in extra if not e.startswith("-")]
        extra = [e for e in extra if e.startswith("-")]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    url = getattr(args, "url", None) or os.environ.get("BALANCER_URL") or DEFAULT_URL
    token = getattr(args, "token", None) or os.environ.get("BALANCER_TOKEN") or None
    try:
        answer, text = run(args, Client(url, token, getattr(args, "timeout", TIMEOUT)))
    except UsageError as exc:
        command = " ".join(filter(None, ("balancerctl", args.command)))
        print(f"balancerctl: {shown(exc)} (see {command} --help)", file=sys.stderr)
        return 2
    except CtlError as exc:
        print(f"balancerctl: {shown(exc)}", file=sys.stderr)
        return 1
    except MISSHAPEN as exc:  # bug: a traceback for an answer of another shape
        print(f"balancerctl: {shown(url)} answered JSON of a shape the management API "
              f"does not answer ({shown(exc)}): is --url the management API of this "
              f"balancerctl's version?", file=sys.stderr)
        return 1
    if getattr(args, "json", False):  # (JSON text is ASCII: control characters escaped)
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        print(terminal(text))
    return 0



if __name__ == "__main__":
    sys.exit(main())
