"""The ACME routes of the management API (SPEC §9, docs/api.md, docs/tls.md).

* ``GET /api/v1/acme`` → ``{"directory", "challenge", "renew_before", "email",
  "account": {"registered", "uri", "key_thumbprint"}, "issuer": {"owner",
  "expires", "this_balancer"} or null, "passes": {"count", "table_version"},
  "problem", "hosts": {HOST: STATE}}``: every host whose rule has ``"tls": "acme"``, with
  its state (`management.acme_issuer`); a host the issuer has not looked at yet
  is ``pending``. ``passes``: the steps this process's issuer finished, and the
  table version the last one began on (null before the first); ``problem``: why
  its last step failed (the store, or an unexpected failure), null once one
  succeeds.
* ``POST /api/v1/certs/HOST/issue`` → 202 ``{"host", "acme": STATE}``: issue
  (or renew) HOST's certificate now, whatever its backoff; 404 without a rule,
  409 `not_acme` when the rule has no ``"tls": "acme"``.

Invariants: no answer holds a private key (the account's or a certificate's);
a request is noted in the store, so the balancer that holds the issuer lock
acts on it, whichever balancer was asked.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from balancer.rules import normalize_host
from management.acme_issuer import acme_hosts, note_request
from management.http import ApiError, Route

RULES = [
    Route("/api/v1/acme", endpoint="acme", methods=["GET"]),
    Route("/api/v1/certs/<host>/issue", endpoint="issue_cert", methods=["POST"]),
]
INTERNAL = ("attempted", "requested")  # bookkeeping of the issuer, not for people
WAITING = {"state": "pending", "reason": "waiting for the issuer"}
STATES = ("pending", "issued", "failed")
OUTCOMES = ("ok", "failed")


def host_states(store: Any, hosts: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """HOST → shown state for every ``"tls": "acme"`` host of the table."""
    states = store.acme().states()
    return {host: shown_state(states.get(host)) for host in acme_hosts(hosts)}


def shown_state(state: Mapping[str, Any] | None) -> dict[str, Any]:
    if not state:
        return dict(WAITING)
    return {k: v for k, v in state.items() if k not in INTERNAL}


def acme_view(store: Any, hosts: Mapping[str, Any], issuer: Any) -> dict[str, Any]:
    """The answer of ``GET /api/v1/acme``."""
    acme = store.acme()
    holder = acme.holder()
    view: dict[str, Any] = {"account": describe_account(acme.account()),
                            "issuer": None, "hosts": host_states(store, hosts)}
    if holder is not None:
        view["issuer"] = {**holder, "this_balancer": issuer is not None
                          and holder.get("owner") == issuer.owner}
    if issuer is not None:
        settings = issuer.settings
        view.update(directory=settings.directory, challenge=settings.challenge,
                    renew_before=settings.renew_before, email=settings.email,
                    passes={"count": issuer.passes, "table_version": issuer.passed_version},
                    problem=issuer.problem)
    return view


def figures(store: Any, hosts: Mapping[str, Any], issuer: Any, now: float
            ) -> dict[str, Any]:
    """What ``/metrics`` shows of ACME (`management.metrics`): ``{"issuances":
    {OUTCOME: N} (this process's issuer), "hosts": {STATE: N}, "next_attempt":
    {HOST: SECONDS}}``; seconds until the issuer acts on a host again (its
    renewal for ``issued``, its retry for ``failed``; 0 for ``pending``: due now)."""
    counts = dict.fromkeys(STATES, 0)
    next_attempt: dict[str, float] = {}
    for host, state in host_states(store, hosts).items():
        name = state.get("state")
        counts[name if name in counts else "pending"] += 1
        at = {"issued": state.get("renew_at"), "failed": state.get("next_retry")}.get(name)
        usable = isinstance(at, (int, float)) and not isinstance(at, bool)
        next_attempt[host] = max(0.0, float(at) - now) if usable else 0.0
    done = getattr(issuer, "outcomes", None) or {}
    return {"issuances": {o: int(done.get(o, 0)) for o in OUTCOMES}, "hosts": counts,
            "next_attempt": next_attempt}


def describe_account(stored: Mapping[str, Any] | None) -> dict[str, Any]:
    """What the API may show of the account: never its key, only its thumbprint."""
    if stored is None:
        return {"registered": False}
    import josepy as jose
    from cryptography.hazmat.primitives import hashes

    try:
        key = jose.JWKRSA.json_loads(stored["key"])
        thumbprint = jose.b64encode(key.thumbprint(hash_function=hashes.SHA256)).decode()
    except (KeyError, TypeError, ValueError, jose.errors.DeserializationError):
        thumbprint = "unreadable"
    return {"registered": bool(stored.get("uri")), "uri": stored.get("uri", ""),
            "key_thumbprint": thumbprint}


def request_issue(store: Any, hosts: Mapping[str, Any], host: str, issuer: Any
                  ) -> dict[str, Any]:
    """Ask for HOST's certificate now; its state (see the module doc for errors)."""
    key = normalize_host(host)
    rule = hosts.get(key)
    if rule is None:
        raise ApiError(404, "not_found", f"no rule for host {key!r}")
    if not isinstance(rule, Mapping) or rule.get("tls") != "acme":
        raise ApiError(409, "not_acme",
                       f'the rule of {key} has no "tls": "acme": ACME issues certificates '
                       f'only for such rules (set tls=acme, or upload one with '
                       f'`balancerctl cert set`)')
    if issuer is not None:
        state = issuer.request(key)
    else:
        state = note_request(store.acme(), key, time.time())
    return {"host": key, "acme": shown_state(state)}
