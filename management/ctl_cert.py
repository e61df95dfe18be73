"""`balancerctl cert list|set|delete|issue|restore` (SPEC §9, docs/tls.md).

Invariants:
* `set` reads the PEM files here (UTF-8, `MAX_FILE` bytes at most) and sends
  them to the API, which checks them (`balancer.certificates`); a refusal prints
  the API's reason and exits 1.
* Nothing printed contains a private key: the API never returns one.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from datetime import UTC
from typing import Any
from urllib.parse import quote

from management.ctl_format import moment, shown, warn

SOON_DAYS = 14  # `list` flags certificates expiring within this many days
MAX_FILE = 1 << 20  # bytes of a --chain or --key file at most (the API's body limit)


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    cert = sub.add_parser("cert", parents=[common], help="TLS certificates in the store",
                          description="List, upload or delete the TLS certificates every "
                                      "balancer on the store serves.",
                          epilog="actions:\n  cert list\n"
                                 "  cert set HOST --chain FILE --key FILE\n"
                                 "  cert delete HOST\n"
                                 "  cert issue HOST\n"
                                 "  cert restore",
                          formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = cert.add_subparsers(dest="cert_command", required=True, metavar="ACTION",
                                  parser_class=type(cert))
    actions.add_parser("list", parents=[common], help="every certificate and its expiry",
                       description="Every stored certificate: host, expiry (UTC), days "
                                   "left, source, names; then the ACME state of every host "
                                   "whose rule has tls=acme (issued, pending, failed and "
                                   "why).")
    put = actions.add_parser("set", parents=[common], help="upload a certificate for HOST",
                             description="Store HOST's certificate: --chain is the PEM leaf "
                                         "certificate then its intermediates, --key its "
                                         "unencrypted PEM private key.")
    put.add_argument("host", metavar="HOST", help="a host name or *.suffix")
    put.add_argument("--chain", required=True, metavar="FILE", help="PEM certificate chain")
    put.add_argument("--key", required=True, metavar="FILE", help="PEM private key")
    delete = actions.add_parser("delete", parents=[common], help="remove HOST's certificate",
                                description="Remove HOST's certificate from the store.")
    delete.add_argument("host", metavar="HOST", help="a host name or *.suffix")
    issue = actions.add_parser("issue", parents=[common],
                               help="issue or renew HOST's ACME certificate now",
                               description='Ask the ACME issuer for HOST\'s certificate now '
                                           '(a rule with "tls": "acme"), whatever its '
                                           'backoff; `cert list` shows the progress.')
    issue.add_argument("host", metavar="HOST", help="a host whose rule has tls=acme")
    actions.add_parser("restore", parents=[common],
                       help="write the certificates last read back to a damaged store",
                       description="When the store's certificates are damaged or lost (a "
                                   "corrupt or deleted certs file, a flushed Redis), write "
                                   "back the certificates the management process last read "
                                   "in good order (what the workers serve).")


def cert_path(host: str = "") -> str:
    return "/api/v1/certs" + (f"/{quote(host, safe='*')}" if host else "")


def run(args: argparse.Namespace, client: Any,
        error: Callable[[str], Exception]) -> tuple[Any, str]:
    """Do the `cert` action; returns (the API's answer, the text for people)."""
    action = args.cert_command
    if action == "list":
        answer = client.call("GET", cert_path())
        if answer.get("problem"):  # the certificates last read, not the store's (as `list`)
            warn(answer["problem"])
        return answer, format_certs(answer["certs"], acme=answer.get("acme"))
    if action == "restore":
        answer = client.call("POST", cert_path("restore"))
        return answer, f"restored {shown(answer['restored'])} certificates to the store"
    if action == "issue":
        answer = client.call("POST", cert_path(args.host) + "/issue")
        return answer, f"{shown(answer['host'])}: issuance requested\n" \
            f"acme: {format_state(answer.get('acme') or {})}"
    if action == "set":
        body = {"chain": _read(args.chain, error), "key": _read(args.key, error)}
        answer = client.call("PUT", cert_path(args.host), body)
        return answer, f"{args.host}: certificate stored\n" + format_certs([answer["cert"]])
    answer = client.call("DELETE", cert_path(args.host))
    return answer, f"{args.host}: certificate deleted"


def _read(path: str, error: Callable[[str], Exception]) -> str:
    """A PEM file's text: at most `MAX_FILE` bytes (the API's own limit on a body;
    ``/dev/zero`` or a wrong file given by mistake is not read whole), UTF-8."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_FILE:
        raise error(f"cannot read {path}: larger than {MAX_FILE // 1024} KiB (a PEM "
                    f"certificate chain or key is a few KiB)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"cannot read {path}: not UTF-8 text (byte {exc.start}); "
                    f"PEM files are ASCII") from None


def format_state(state: dict[str, Any], now: float | None = None) -> str:
    """An ACME state on one line: ``failed (attempt 2, next try in 10 min): REASON``."""
    now = time.time() if now is None else now
    name = shown(state.get("state", "?"))
    reason = shown(state.get("reason", ""))
    if name == "failed":
        retry = state.get("next_retry")
        wait = f", next try in {_span(retry - now)}" if isinstance(retry, (int, float)) else ""
        return f"failed (attempt {shown(state.get('attempts', '?'))}{wait}): {reason}"
    if name == "pending":
        return f"pending: {reason}"
    renew = state.get("renew_at")
    return name + (f", renewal in {_span(renew - now)}" if isinstance(renew, (int, float))
                   else "")


def _span(seconds: float) -> str:
    if seconds <= 0:
        return "now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def format_certs(certs: list[dict[str, Any]], now: float | None = None,
                 acme: dict[str, Any] | None = None) -> str:
    """A table: host, expiry date, days left (flagged when soon), source, names; then
    the ACME state of each host whose rule has ``"tls": "acme"``."""
    text = _cert_table(certs, time.time() if now is None else now)
    if acme:
        lines = [f"  {shown(host)}: {format_state(state, now)}"
                 for host, state in sorted(acme.items())]
        text += "\n\nACME\n" + "\n".join(lines)
    return text


def _cert_table(certs: list[dict[str, Any]], now: float) -> str:
    if not certs:
        return "no certificates"
    rows: list[list[str]] = [["HOST", "EXPIRES (UTC)", "DAYS LEFT", "SOURCE", "NAMES"]]
    for cert in certs:
        not_after = cert.get("not_after")
        if isinstance(not_after, (int, float)):
            expires = moment(not_after, "%Y-%m-%d %H:%M", UTC)
            days = (not_after - now) / 86400
            left = "EXPIRED" if days <= 0 else f"{days:.0f}" + (" SOON" if days < SOON_DAYS
                                                                 else "")
        else:
            expires, left = "?", "?"
        names = ", ".join(cert.get("names", [])) or cert.get("problem", "")
        rows.append([shown(c) for c in (cert.get("host", "?"), expires, left,
                                        cert.get("source", ""), names)])
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths, strict=True))
                     + "  " + r[4] for r in rows)
