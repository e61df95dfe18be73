"""Rule validation: the one validator used by the data plane and the management API.

Invariants:
* `validate_rule` never raises on bad input; it returns every problem it finds,
  each prefixed with the path of the offending field (``backends[1].weight``).
* A rule that validates cleanly compiles without error (`balancer.table`).
* Host keys are validated by `validate_host`; keys are stored lower-case, an
  IPv6 literal (``[::1]``, in brackets as in a Host field) in its shortest form.
* Numbers are finite (NaN and Infinity are refused wherever a number goes).
* A field that ends up in a response header or a request line (`to`,
  `content_type`, `health.path`) holds only visible ASCII (and spaces where
  the header allows them); a static `body` is any text that encodes as UTF-8:
  it is sent as the body, with its byte length as Content-Length.
* A redirect's `to` is an ``http://`` or ``https://`` URL with a host, or a
  relative reference (``/moved``, ``../x``, ``//host/x``); any other scheme
  (``javascript:``, ``data:``...) is refused (`_redirect_target`).
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from balancer.addr import AddrError, Address, parse_backend_addr

ACTIONS = ("proxy", "spin", "static", "redirect", "empty")
ALGORITHMS = ("round_robin", "least_connections", "random_two", "ip_hash")
REDIRECT_STATUSES = (301, 302, 307, 308)
_LABEL = r"[a-z0-9_][a-z0-9_-]{0,62}"
HOST_RE = re.compile(rf"^(\*|(\*\.)?{_LABEL}(\.{_LABEL})*\.?)$")
# a URI's scheme (RFC 3986 §3.1), as a `to` that is not a relative reference begins
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")
REDIRECT_SCHEMES = ("http", "https")  # the schemes a redirect's `to` may name
MAX_HOST_LEN = 253
MAX_HOLD = 86400   # seconds a request may be held (spin timeout, spin_when_down)
MAX_CHECK = 3600   # seconds: the longest health check interval or timeout
# The shortest health check interval and timeout, in seconds. Each worker checks each
# address on its own: below 0.1 s a check interval is a worker hammering its backend
# (1e-9 ran checks back to back, spinning the worker's CPU); a check given less than
# 10 ms cannot connect and be answered even on loopback under load, so it only ever fails.
MIN_CHECK_INTERVAL = 0.1
MIN_CHECK_TIMEOUT = 0.01
# health field → its floor. A rule written through the API below one is refused; one
# stored by an earlier version (which took any number > 0) is loaded raised to it
# (`balancer.stores.floors`).
CHECK_FLOORS = (("interval", MIN_CHECK_INTERVAL), ("timeout", MIN_CHECK_TIMEOUT))

COMMON_KEYS = {"action", "subdomains", "limits", "https_redirect", "hsts", "tls"}
TLS_MODES = ("acme",)  # "tls": "acme": a certificate issued and renewed by ACME (docs/tls.md)
MAX_HSTS = 63072000  # seconds: two years, the HSTS preload list's minimum and a sane ceiling
ACTION_KEYS = {
    "proxy": {"backends", "algorithm", "retries", "health", "spin_when_down",
              "max_body_bytes", "retry_timeout", "draining", "backend_tls_verify"},
    "spin": {"timeout"},
    "static": {"status", "body", "content_type", "page"},
    "redirect": {"to", "status", "keep_path"},
    "empty": {"status"},
}
HEALTH_KEYS = {"path", "interval", "timeout", "rise", "fall"}
DRAINING_KEYS = {"backends", "since", "warmup"}
LIMIT_KEYS = {"rate", "burst", "per", "max_connections_per_client"}
LIMIT_PER = ("client", "host")
MAX_RATE = 1_000_000  # requests per second (a limit, a burst)
# requests per second at least: below it 1 / rate overflowed to inf (5e-324), or
# rate and burst made the bucket's times infinite (1e-308), and the limit let
# everything through, or nothing ever again
MIN_RATE = 0.001
# (rule section, field, floor, unit) of every floor, for `balancer.stores.floors`
RULE_FLOORS = (*(("health", key, floor, "s") for key, floor in CHECK_FLOORS),
               ("limits", "rate", MIN_RATE, "requests/s"))


class RuleError(ValueError):
    """A rule or table failed validation; `problems` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def normalize_host(host: str) -> str:
    """The key form of a host name: lower-case, without a trailing dot; an IPv6
    literal in brackets, as in a Host field, its address in its shortest form
    (``[0:0::1]`` is ``[::1]``: `literal_key`)."""
    key = host.strip().lower()
    return literal_key(key) if key.startswith("[") else key.rstrip(".")


def literal_key(literal: str) -> str:
    """``[ADDRESS]`` with an IPv6 address in its shortest, lower-case form (as
    `balancer.table` reads a Host's); anything else as it is."""
    if _is_literal(literal):
        return f"[{ipaddress.IPv6Address(literal[1:-1]).compressed}]"
    return literal


def _is_literal(text: str) -> bool:
    """Whether `text` is an IPv6 address in brackets, without a zone."""
    if not (text.startswith("[") and text.endswith("]")) or "%" in text:
        return False
    try:
        ipaddress.IPv6Address(text[1:-1])
    except ValueError:
        return False
    return True


def validate_host(host: object) -> list[str]:
    """Problems with a routing-table key (empty when it is fine)."""
    if not isinstance(host, str) or not host:
        return ["host: must be a non-empty string"]
    if not host.isascii():  # checked before lower(): "\u212a" (KELVIN SIGN) lowers to "k"
        return [f"host {host!r}: not ASCII{_ascii_form(host)}"]
    if host.strip().startswith("["):  # an IPv6 literal, as nginx's server_name takes
        return [] if _is_literal(host.strip()) else [
            f"host {host!r}: not an IPv6 address in brackets (such as '[2001:db8::1]'; "
            f"no port, no zone)"]
    # one trailing dot at most, as in a Host field (bug: every trailing dot was
    # stripped first: "app.test.." was stored as app.test, "*." as the catch-all *)
    if len(normalize_host(host)) > MAX_HOST_LEN or not HOST_RE.match(host.strip().lower()):
        return [f"host {host!r}: not a valid host name, IPv6 literal ('[::1]'), "
                f"'*.suffix' or '*'"]
    return []


def _ascii_form(host: str) -> str:
    """A hint naming the ASCII (IDNA, punycode) form of an internationalized name."""
    try:
        ascii_name = host.strip().rstrip(".").encode("idna").decode("ascii").lower()
    except UnicodeError:
        return ""
    if not HOST_RE.match(ascii_name):
        return ""
    return f"; an internationalized name is written in its ASCII form, {ascii_name!r}"


def stored_key_problems(host: object) -> list[str]:
    """A stored table's key must be in key form (`normalize_host`): every writer
    stores that form, and the API finds, changes and deletes hosts by it. (Bug: a
    hand-edited ``APP.TEST`` or ``app.test.`` was served, but no API call or
    `balancerctl` command could read, change or delete it, and a write of
    ``app.test`` stored a second key the store then refused as a duplicate.)"""
    if isinstance(host, str) and not validate_host(host) and normalize_host(host) != host:
        return [f"host {host!r}: not stored in its key form {normalize_host(host)!r} "
                f"(lower-case, no trailing dot, no spaces): write it so"]
    return []


def validate_table(hosts: object, key_form: bool = False) -> list[str]:
    """Problems with a whole table ``{HOST: RULE}``, each prefixed by its host;
    `key_form`: a table read from a store, whose keys must be in key form."""
    if not isinstance(hosts, Mapping):
        return ["hosts: must be an object mapping host names to rules"]
    problems: list[str] = []
    seen: dict[str, str] = {}
    for host, rule in hosts.items():
        problems += validate_host(host)
        if key_form:
            problems += stored_key_problems(host)
        if isinstance(host, str):
            key = normalize_host(host)
            if key in seen:
                problems.append(f"host {host!r}: duplicates {seen[key]!r}")
            seen[key] = host
        problems += [f"{host}: {p}" for p in validate_rule(rule) + host_rule_problems(host, rule)]
    return problems


def host_rule_problems(host: object, rule: object) -> list[str]:
    """What a rule may not do for this host key: ACME (HTTP-01, TLS-ALPN-01) issues
    certificates for exact names only; a wildcard needs DNS-01, an IP address
    (IPv6 in brackets, IPv4: a key whose last label is all digits, as
    ``192.0.2.1`` or its short form ``127.1``, is no name a CA issues for; bug:
    an IPv4 key was taken) an IP address certificate."""
    if not (isinstance(rule, Mapping) and rule.get("tls") == "acme" and isinstance(host, str)):
        return []
    key = host.strip()
    if key[:1] == "*":
        hint = "upload one with `balancerctl cert set`"
    elif key[:1] == "[" or key.rstrip(".").rpartition(".")[2].isdigit():
        hint = "clients connecting by IP address get tls.default_host's certificate"
    else:
        return []
    return ['tls: "acme" needs an exact host name: ACME cannot issue a wildcard, '
            f'catch-all or IP address certificate over HTTP-01 or TLS-ALPN-01 ({hint})']


def validate_rule(rule: object) -> list[str]:
    """Every problem with one rule; an empty list means the rule is valid."""
    if not isinstance(rule, Mapping):
        return ["rule: must be a JSON object"]
    action = rule.get("action")
    if action not in ACTIONS:
        return [f"action: must be one of {', '.join(ACTIONS)}, got {action!r}"]
    problems: list[str] = []
    allowed = COMMON_KEYS | ACTION_KEYS[action]
    for key in rule:
        if key not in allowed:
            problems.append(f"{key}: unknown field for action {action!r}")
    if "subdomains" in rule and not isinstance(rule["subdomains"], bool):
        problems.append("subdomains: must be true or false")
    if "limits" in rule:
        problems += validate_limits(rule["limits"])
    if "https_redirect" in rule and not isinstance(rule["https_redirect"], bool):
        problems.append("https_redirect: must be true or false")
    problems += _int_at_least(rule, "hsts", 0) + _at_most(rule, "hsts", MAX_HSTS, "seconds")
    if "tls" in rule and rule["tls"] not in TLS_MODES:
        problems.append(f'tls: must be "acme" (a certificate issued by ACME), got {rule["tls"]!r}')
    problems += VALIDATORS[action](rule)
    return problems


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite int or float (not a bool, NaN or an infinity)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return isinstance(value, int) or math.isfinite(value)


def _positive_number(rule: Mapping[str, Any], key: str, prefix: str = "") -> list[str]:
    if key in rule and (not _is_number(rule[key]) or rule[key] <= 0):
        return [f"{prefix}{key}: must be a finite number > 0, got {rule[key]!r}"]
    return []


def is_visible_ascii(text: str, spaces: bool = False) -> bool:
    """True if `text` is printable ASCII only (0x21-0x7e, plus 0x20 with `spaces`):
    no control character, DEL or non-ASCII byte reaches a header or request line."""
    low = " " if spaces else "!"
    return all(low <= ch <= "~" for ch in text)


def _header_text(rule: Mapping[str, Any], key: str, default: object, what: str,
                 where: str, prefix: str = "") -> list[str]:
    """Problems with a field sent as is in `where` (a header or the request line);
    spaces are allowed in a header value, not in a URL or path."""
    value = rule.get(key, default)
    if not isinstance(value, str) or not value:
        return [f"{prefix}{key}: must be {what}, got {value!r}"]
    spaces = key == "content_type"
    if not is_visible_ascii(value, spaces):
        allowed = "visible ASCII and spaces" if spaces else "visible ASCII without spaces"
        hint = "" if spaces else " (percent-encode anything else: %C3%A9 for é)"
        return [f"{prefix}{key}: goes into the {where}, so it may hold only {allowed}"
                f"{hint}, got {value!r}"]
    return []


def _int_at_least(rule: Mapping[str, Any], key: str, low: int, prefix: str = "") -> list[str]:
    if key in rule and (not _is_int(rule[key]) or rule[key] < low):
        return [f"{prefix}{key}: must be an integer >= {low}, got {rule[key]!r}"]
    return []


def _at_most(rule: Mapping[str, Any], key: str, high: float, unit: str,
             prefix: str = "") -> list[str]:
    if _is_number(rule.get(key)) and rule[key] > high:
        return [f"{prefix}{key}: must be at most {high:g} {unit}, got {rule[key]!r}"]
    return []


def _number_between(rule: Mapping[str, Any], key: str, low: float, high: float, unit: str,
                    prefix: str = "") -> list[str]:
    if key in rule and (not _is_number(rule[key]) or not low <= rule[key] <= high):
        return [f"{prefix}{key}: must be a finite number from {low:g} to {high:g} {unit}, "
                f"got {rule[key]!r}"]
    return []


def _status(rule: Mapping[str, Any], allowed: Callable[[int], bool], text: str) -> list[str]:
    status = rule.get("status")
    if status is not None and (not _is_int(status) or not allowed(status)):
        return [f"status: must be {text}, got {status!r}"]
    return []


def backend_entries(rule: Mapping[str, Any]) -> list[tuple[str, int]]:
    """The ``(address, weight)`` pairs of a valid proxy rule."""
    out = []
    for entry in rule.get("backends", ()):
        if isinstance(entry, str):
            out.append((entry, 1))
        else:
            out.append((entry["address"], entry.get("weight", 1)))
    return out


def _validate_backend(i: int, entry: object) -> list[str]:
    """Every problem of one backend entry (bug: an object entry stopped at its
    first problem, so a write fixed for it was refused again for the next)."""
    where = f"backends[{i}]"
    problems: list[str] = []
    if isinstance(entry, str):
        address = entry
    elif isinstance(entry, Mapping):
        problems += [f"{where}.{key}: unknown field"
                     for key in sorted(map(str, entry)) if key not in ("address", "weight")]
        weight = entry.get("weight", 1)
        if not _is_int(weight) or not 1 <= weight <= 1000:
            problems.append(f"{where}.weight: must be an integer from 1 to 1000, got {weight!r}")
        given = entry.get("address")
        if not isinstance(given, str):
            return [*problems, f"{where}.address: must be a string 'host:port'"]
        address = given
    else:
        return [f"{where}: must be 'host:port', 'https://host:port' or "
                f"{{\"address\": ..., \"weight\": N}}"]
    try:
        parse_backend_addr(address)
    except AddrError as exc:
        problems.append(f"{where}: {exc}")
    return problems


def _validate_backends(rule: Mapping[str, Any], prefix: str = "",
                       seen: set[str] | None = None) -> list[str]:
    backends = rule.get("backends")
    if not isinstance(backends, list) or not backends:
        return [f"{prefix}backends: must be a non-empty list of backend addresses"]
    problems: list[str] = []
    seen = set() if seen is None else seen
    for i, entry in enumerate(backends):
        found = [prefix + p for p in _validate_backend(i, entry)]
        problems += found
        if not found:
            address = backend_identity(entry if isinstance(entry, str) else entry["address"])
            if address in seen:
                problems.append(f"{prefix}backends[{i}]: duplicate backend {address}")
            seen.add(address)
    return problems


def backend_identity(text: str) -> str:
    """One backend however its address is spelt: a name in lower case, an IP
    address in its shortest form (bug: ``LOCALHOST:1`` beside ``localhost:1``, or
    ``[0:0::1]:1`` beside ``[::1]:1``, were two backends: one server, two shares)."""
    address = parse_backend_addr(text)
    try:
        host = ipaddress.ip_address(address.host).compressed
    except ValueError:
        host = address.host.lower()
    return str(Address(host, address.port, address.tls))


def backend_addresses(rule: Mapping[str, Any]) -> set[str]:
    """The backends of a valid proxy rule, each by its `backend_identity`."""
    return {backend_identity(address) for address, _ in backend_entries(rule)}


def _validate_draining(rule: Mapping[str, Any]) -> list[str]:
    """`draining`: the backends a deploy moves away from (docs/deploys.md)."""
    draining = rule["draining"]
    if not isinstance(draining, Mapping):
        return ["draining: must be an object {\"backends\": [...], \"since\": T, "
                "\"warmup\": S}"]
    problems = [f"draining.{k}: unknown field" for k in draining if k not in DRAINING_KEYS]
    try:
        seen = backend_addresses(rule)
    except (AddrError, KeyError, TypeError):
        seen = set()  # the rule's own backends are reported already
    problems += _validate_backends(draining, "draining.", seen)
    for key in ("since", "warmup"):
        value: Any = draining.get(key)
        if not _is_number(value) or value < 0:
            problems.append(f"draining.{key}: must be a finite number >= 0, got {value!r}")
    problems += _at_most(draining, "warmup", MAX_HOLD, "seconds", "draining.")
    return problems


def _validate_health(health: object) -> list[str]:
    if not isinstance(health, Mapping):
        return ["health: must be an object"]
    problems = [f"health.{k}: unknown field" for k in health if k not in HEALTH_KEYS]
    path = health.get("path", "/")
    if not isinstance(path, str) or not path.startswith("/"):
        problems.append(f"health.path: must be a path starting with '/', got {path!r}")
    else:
        problems += _header_text(health, "path", "/", "a path", "health check's request line",
                                 "health.")
    for key, low in CHECK_FLOORS:
        problems += _number_between(health, key, low, MAX_CHECK, "seconds", "health.")
    problems += _int_at_least(health, "rise", 1, "health.")
    problems += _int_at_least(health, "fall", 1, "health.")
    return problems


def _validate_proxy(rule: Mapping[str, Any]) -> list[str]:
    problems = _validate_backends(rule)
    algorithm = rule.get("algorithm", "round_robin")
    if algorithm not in ALGORITHMS:
        problems.append(f"algorithm: must be one of {', '.join(ALGORITHMS)}, got {algorithm!r}")
    problems += _int_at_least(rule, "retries", 0)
    if _is_int(rule.get("retries")) and rule["retries"] > 10:
        problems.append(f"retries: must be at most 10, got {rule['retries']!r}")
    problems += _positive_number(rule, "spin_when_down")
    problems += _at_most(rule, "spin_when_down", MAX_HOLD, "seconds")
    problems += _positive_number(rule, "retry_timeout")
    problems += _int_at_least(rule, "max_body_bytes", 0)
    if "backend_tls_verify" in rule and not isinstance(rule["backend_tls_verify"], bool):
        problems.append("backend_tls_verify: must be true or false")
    if "health" in rule:
        problems += _validate_health(rule["health"])
    if "draining" in rule:
        problems += _validate_draining(rule)
    return problems


def validate_limits(limits: object) -> list[str]:
    """Problems with a rule's ``limits`` object (balancer.limits)."""
    if not isinstance(limits, Mapping):
        return ["limits: must be an object like {\"rate\": 10, \"burst\": 20}"]
    problems = [f"limits.{k}: unknown field (fields are {', '.join(sorted(LIMIT_KEYS))})"
                for k in limits if k not in LIMIT_KEYS]
    problems += _number_between(limits, "rate", MIN_RATE, MAX_RATE, "requests per second",
                                "limits.")
    for key in ("burst", "max_connections_per_client"):
        problems += _int_at_least(limits, key, 1, "limits.")
        if _is_int(limits.get(key)) and limits[key] > MAX_RATE:
            problems.append(f"limits.{key}: must be at most {MAX_RATE}, got {limits[key]!r}")
    if "per" in limits and limits["per"] not in LIMIT_PER:
        problems.append(f"limits.per: must be one of {', '.join(LIMIT_PER)}, "
                        f"got {limits['per']!r}")
    if "rate" not in limits and ("burst" in limits or "per" in limits):
        problems.append("limits.rate: required with 'burst' or 'per' (requests per second)")
    if not set(limits) & {"rate", "max_connections_per_client"}:
        problems.append("limits: give 'rate' (requests per second) and/or "
                        "'max_connections_per_client'")
    return problems


def _validate_spin(rule: Mapping[str, Any]) -> list[str]:
    return _positive_number(rule, "timeout") + _at_most(rule, "timeout", MAX_HOLD, "seconds")


def _validate_static(rule: Mapping[str, Any]) -> list[str]:
    from balancer.pages import PAGE_STATUS

    problems = _status(rule, lambda s: 200 <= s <= 599, "an HTTP status from 200 to 599")
    if "page" in rule:
        if not isinstance(rule["page"], str) or rule["page"] not in PAGE_STATUS:
            # (bug: a list or an object raised TypeError: a 500, and the routes
            # file's watcher ended)
            problems.append(f"page: must be one of {', '.join(sorted(PAGE_STATUS))}, "
                            f"got {rule['page']!r}")
        if "body" in rule:
            problems.append("body: give either 'body' or 'page', not both")
    elif not isinstance(rule.get("body"), str):
        problems.append("body: must be a string (or give 'page')")
    elif not _encodes(rule["body"]):
        problems.append("body: must be text that encodes as UTF-8 (it has a lone surrogate)")
    return problems + _header_text(rule, "content_type", "text/html", "a media type",
                                        "Content-Type header")


def _encodes(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _validate_redirect(rule: Mapping[str, Any]) -> list[str]:
    problems = _status(rule, lambda s: s in REDIRECT_STATUSES,
                       "one of " + ", ".join(map(str, REDIRECT_STATUSES)))
    if "to" not in rule:
        problems.append("to: required for action 'redirect': the URL or path to send "
                        "clients to, e.g. \"to\": \"https://example.com\"")
    else:
        problems += (_header_text(rule, "to", None, "a URL or path without spaces",
                                  "Location header") or _redirect_target(rule["to"]))
    if "keep_path" in rule and not isinstance(rule["keep_path"], bool):
        problems.append("keep_path: must be true or false")
    return problems


def _redirect_target(to: str) -> list[str]:
    """Problems with a `to` in visible ASCII: a scheme other than http(s), or one
    with no host after it. Bug: ``javascript:alert(1)`` and ``data:`` URLs were
    sent as the Location (a script run by a browser that follows it)."""
    scheme = _SCHEME.match(to)
    if scheme is None:
        return []  # a relative reference: a path, "?query", "//host/path"
    name = scheme.group()[:-1].lower()
    if name not in REDIRECT_SCHEMES:
        return [f"to: the scheme {name!r} is not allowed: give an http:// or https:// "
                f"URL, or a path such as /moved, got {to!r}"]
    if not to[scheme.end():].startswith("//") or len(to) == scheme.end() + 2 \
            or to[scheme.end() + 2] in "/?#":
        return [f"to: an {name} URL needs a host ({name}://HOST/...), got {to!r}"]
    return []


def _validate_empty(rule: Mapping[str, Any]) -> list[str]:
    problems = _status(rule, lambda s: 200 <= s <= 599, "an HTTP status from 200 to 599")
    if "status" not in rule:
        problems.append("status: required for action 'empty'")
    return problems


VALIDATORS: dict[str, Callable[[Mapping[str, Any]], list[str]]] = {
    "proxy": _validate_proxy,
    "spin": _validate_spin,
    "static": _validate_static,
    "redirect": _validate_redirect,
    "empty": _validate_empty,
}
