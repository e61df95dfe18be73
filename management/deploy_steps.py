"""The pieces of a deploy's steps that need no record (SPEC §10, docs/deploys.md).

* `probe`: one readiness check of a new backend: the rule's `health` (a 2xx or
  3xx to its path, as the active checks) or, without one, ``GET /`` answering
  below 500; over TLS for an https:// backend, verified as a request's would be.
  `probe_all` checks every pending backend at once (at most `PROBE_PARALLEL`
  at a time), none past the ready step's deadline: a backend that accepts and
  never answers costs the step no more than its `ready_timeout`, however long
  the health check's own timeout and however many such backends. A check the
  deadline would leave less than `PROBE_LEAST` is not begun (`NOT_CHECKED`):
  it would judge the clock, not the backend.
* `switched_rule`: the rule a deploy writes in its one switch: the new
  backends, and the old ones under `draining` (they share new requests while
  the new ones warm up, then get none). `reverted_rule`: the one an abort
  writes after the switch: the rule the deploy started from, the new backends
  under `draining` with no warmup.
* `leaving` / `same_server`: which old backends a deploy drains. Two spellings
  of one literal address (``[::ffff:127.0.0.1]:80`` and ``127.0.0.1:80``,
  ``[::1]`` and ``[0::1]``, ``LOCALHOST`` and ``localhost``) are one backend:
  it keeps serving and is not drained (bug: ``127.0.0.1:P`` to
  ``[::ffff:127.0.0.1]:P`` drained, and reported safe to stop, the server
  that went on serving). Names are never resolved; `spelling_problems`
  refuses the one case known without resolving to be maybe one server under
  two spellings: ``localhost`` (loopback by RFC 6761) against a loopback
  literal on the same port.
* `in_flight`: the sum of every live balancer's published in-flight counts on
  the draining backends, or None while some balancer's report is too old to
  tell (taken before the drain began, or before it served the switch; a
  balancer with a worker that does not answer reports version 0: bug, such a
  worker's requests on the old backends were left out of its counts, and the
  drain ended "drained" while they ran).

* `loaded_record`: a deploy record stored by an earlier version, its backends
  loaded as the table's are (`balancer.stores.floors`: ``0x7f.1:P`` written in
  full), so that a deploy in flight across an upgrade is resumed (bug: it ended
  "internal error: invalid address").

Invariants: nothing here writes to the store or the routing table.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from balancer.addr import Address, parse_backend_addr
from balancer.backend_tls import BackendTLS, pool_key
from balancer.errors import BackendTLSError
from balancer.health import CheckConfig, check_tls_key, read_status
from balancer.http11 import ProtocolError
from balancer.rules import COMMON_KEYS, backend_entries
from balancer.stores.floors import Raised, loaded_backends, raise_rule

REPORT_FRESH = 3.0   # seconds: an older in-flight report is a balancer gone away
DEPLOY_RISE = 1      # good answers in a row without a `health` (with one: its `rise`)
PROBE_TIMEOUT = 1.0  # seconds per check without a `health`
PROBE_EVERY = 0.25   # seconds between checks at most (a `health.interval` that is shorter wins)
PROBE_PARALLEL = 32  # checks of one deploy's backends running at once
PROBE_LEAST = 0.1    # seconds: the least a check is begun with (its own timeout, if less)
# A check the ready step's deadline left no time for: no finding about the backend
NOT_CHECKED = "not checked: the ready timeout ran out before this check"


def check_config(rule: Mapping[str, Any], host: str = "*") -> tuple[CheckConfig, bool]:
    """How the new backends are checked: the rule's health (True: 2xx/3xx needed)
    or ``GET /`` below 500."""
    health = rule.get("health") if rule.get("action") == "proxy" else None
    if isinstance(health, Mapping):
        config = CheckConfig.from_rule(health, check_tls_key(host, rule))
        return CheckConfig(config.path, min(config.interval, PROBE_EVERY), config.timeout,
                           config.rise, config.fall, config.tls_key), True
    return CheckConfig("/", PROBE_EVERY, PROBE_TIMEOUT, DEPLOY_RISE, 1,
                       check_tls_key(host, rule)), False


def probe_all(pending: list[str], host: str, config: CheckConfig, strict: bool,
              tls: BackendTLS | None, until: float,
              least: float = PROBE_LEAST) -> dict[str, str | None]:
    """One `probe` of each address in `pending`, at once, none past `until`
    (a `time.monotonic` deadline): address → None (it passed) or the problem."""
    with ThreadPoolExecutor(min(PROBE_PARALLEL, max(1, len(pending))),
                            thread_name_prefix="deploy probe") as pool:
        found = pool.map(lambda a: probe(a, host, config, strict, tls, until, least),
                         pending)
        return dict(zip(pending, found, strict=True))


def probe(address: str, host: str, config: CheckConfig, strict: bool,
          tls: BackendTLS | None = None, until: float | None = None,
          least: float = PROBE_LEAST) -> str | None:
    """One check of `address`: None when it passes, else what went wrong. An
    https:// backend is checked over TLS (`tls`, default: the system's CAs), its
    certificate verified for `host` as a request's would be. The check gives up
    at `config.timeout`, or at `until` (a `time.monotonic` deadline) if sooner;
    `NOT_CHECKED` when `until` leaves it less than `least` (bug: a round
    begun 0.8 ms before the ready step's end failed "no answer within 0.0008s",
    and that replaced the backend's real answer, a 503, in the deploy's error)."""
    target = parse_backend_addr(address)
    plain = str(Address(target.host, target.port))
    deadline = time.monotonic() + config.timeout
    if until is not None and until < deadline:
        deadline = until
        if until - time.monotonic() < min(least, config.timeout):
            return NOT_CHECKED
    timeout = deadline - time.monotonic()
    try:
        sock = socket.create_connection((target.host, target.port), timeout)
        if target.tls:
            sock = (tls or BackendTLS()).secure(sock, config.tls_key or pool_key(b"", False),
                                                plain, deadline, contextlib.nullcontext)
    except TimeoutError:
        return f"connect: no answer within {timeout:.3g}s"
    except OSError as exc:
        return f"connect: {exc.strerror or exc}"
    except BackendTLSError as exc:
        return str(exc)
    name = plain if host.startswith("*") else host
    try:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: balancer-deploy\r\n"
                     b"Connection: close\r\n\r\n" % (config.path.encode(), name.encode()))
        status = read_status(sock, deadline)
    except TimeoutError:
        return f"no answer within {timeout:.3g}s"
    except OSError as exc:
        return str(exc.strerror or exc) or type(exc).__name__
    except ProtocolError as exc:
        return f"invalid response: {exc.reason}"
    finally:
        sock.close()
    good = 200 <= status < 400 if strict else status < 500
    return None if good else f"GET {config.path} answered {status}"


def addresses(entries: list[Any]) -> list[str]:
    """The normalised addresses of backend entries (strings or objects)."""
    return [str(parse_backend_addr(a)) for a, _ in backend_entries({"backends": entries})]


def canonical(address: str) -> str:
    """One spelling per literal address: an IP in its compressed form (an IPv4-mapped
    IPv6 address as its IPv4), a name in lower case without a final dot."""
    parsed = parse_backend_addr(address)
    try:
        ip = ipaddress.ip_address(parsed.host)
    except ValueError:
        host = parsed.host.lower().rstrip(".")
    else:
        mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        host = str(mapped or ip)
    return str(Address(host, parsed.port, parsed.tls))


def leaving(old: list[Any], new: list[Any]) -> list[Any]:
    """The entries of `old` (as given) that no entry of `new` names, in any spelling."""
    kept = {canonical(a) for a in addresses(new)}
    return [e for e, a in zip(old, addresses(old), strict=True) if canonical(a) not in kept]


def spelling_problems(old: list[Any], new: list[Any]) -> list[str]:
    """The new backends that may be an old one under another spelling, which the
    deploy cannot tell without resolving names: ``localhost`` against a loopback
    literal on the same port and scheme (either way round)."""
    problems = []
    for i, new_address in enumerate(addresses(new)):
        for old_address in addresses(old):
            if _maybe_same(parse_backend_addr(canonical(new_address)),
                           parse_backend_addr(canonical(old_address))):
                problems.append(
                    f"backends[{i}]: {new_address} may be the old backend {old_address} "
                    f"(localhost is a loopback address): the deploy would drain, and report "
                    f"safe to stop, a server that serves on; spell it as the rule does to "
                    f"keep that server, or use another port for the new one")
    return problems


def _maybe_same(one: Address, other: Address) -> bool:
    if (one.port, one.tls) != (other.port, other.tls) or not (
            one.is_loopback and other.is_loopback):
        return False
    named = [a.host == "localhost" for a in (one, other)]  # (`canonical` forms)
    return named[0] != named[1]


def loaded_record(record: dict[str, Any]) -> list[Raised]:
    """Load `record`'s backends (``from``, ``to``, the rule it started from) as the
    table loader loads a rule's, in place: what was changed (none for a record of
    this version, whose addresses were validated)."""
    host = str(record.get("host"))
    raised: list[Raised] = []
    for key in ("from", "to"):
        record[key], found = loaded_backends(host, f"{key} ", record.get(key))
        raised += found
    record["before"], before = raise_rule(host, record.get("before"))
    return raised + list(before)


def switched_rule(before: Mapping[str, Any], to: list[Any], since: float,
                  warmup: float) -> dict[str, Any]:
    """The rule after the switch from `before` to the backends `to`: a proxy
    rule keeps every field, another rule the fields that are not its action's
    (bug: only ``subdomains`` was kept, so a deploy from a holding page dropped
    its ``https_redirect``, ``hsts``, ``limits`` and ``"tls": "acme"``)."""
    if before.get("action") == "proxy":
        rule = {k: v for k, v in before.items() if k != "draining"}
        old = list(before.get("backends", ()))
    else:
        rule = {k: v for k, v in before.items() if k in COMMON_KEYS}
        rule["action"] = "proxy"
        old = []
    rule["backends"] = list(to)
    going = leaving(old, to)
    if going:
        rule["draining"] = {"backends": going, "since": since, "warmup": warmup}
    return rule


def reverted_rule(before: Mapping[str, Any], to: list[Any], since: float) -> dict[str, Any]:
    """The rule an abort writes after the switch: `before` again, the new backends
    it does not name under `draining` with no warmup (they get no new request;
    their requests in flight finish)."""
    rule = {k: v for k, v in before.items() if k != "draining"}
    if rule.get("action") != "proxy":
        return rule
    going = leaving(to, list(rule.get("backends", ())))
    if going:
        rule["draining"] = {"backends": going, "since": since, "warmup": 0.0}
    return rule


def in_flight(reports: Mapping[str, Mapping[str, Any]], host: str, draining: list[str],
              version: int, since: float, now: float) -> dict[str, dict[str, int]] | None:
    """Per draining address, ``{"in_flight", "tunnels"}`` summed over every live
    balancer; None while a live balancer's report predates `since` or the switch
    (`version`), or no balancer reported at all."""
    totals = {a: {"in_flight": 0, "tunnels": 0} for a in draining}
    live = 0
    for report in reports.values():
        at = float(report.get("at", 0))
        if now - at > REPORT_FRESH:
            continue  # that balancer stopped reporting: gone
        if at < since or int(report.get("version", 0)) < version:
            return None
        live += 1
        for address, counts in report.get("hosts", {}).get(host, {}).items():
            if address in totals:
                totals[address]["in_flight"] += int(counts.get("in_flight", 0))
                totals[address]["tunnels"] += int(counts.get("tunnels", 0))
    return totals if live else None


def local_report(stats: Mapping[str, Any], version: int, hosts: list[str],
                 now: float) -> dict[str, Any]:
    """This balancer's in-flight report on `hosts` from its merged worker stats."""
    counts = {}
    for host in hosts:
        backends = stats.get("hosts", {}).get(host, {}).get("backends", {})
        counts[host] = {a: {"in_flight": b.get("in_flight", 0), "tunnels": b.get("tunnels", 0)}
                        for a, b in backends.items()}
    return {"at": now, "version": version, "hosts": counts}
