"""The certificate routes of the management API (SPEC §9, docs/api.md).

* ``GET /api/v1/certs`` → ``{"certs": [PUBLIC_RECORD...]}`` sorted by host
* ``PUT /api/v1/certs/HOST`` ``{"chain": PEM, "key": PEM}`` → 200 ``{"cert": PUBLIC_RECORD}``;
  400 `invalid_certificate` with the reason (key does not match, chain does not
  cover HOST, expired, weak key, not PEM)
  or 400 `invalid_host`: not a host name or ``*.suffix``, or an IP address
  (`_not_by_ip`: no client asks for one by SNI)
* ``DELETE /api/v1/certs/HOST`` → 200 ``{"deleted": HOST}``; 404 when absent
* ``POST /api/v1/certs/restore`` → 200 ``{"restored": N}``: writes the certificates
  last read in good order back over a damaged or lost store
  (`management.certs_watch`); 409 `nothing_to_restore` when the store's
  certificates are readable or none were ever read
* While the store's certificates cannot be read as a whole, writes answer 503
  `certs_corrupt` (damaged file) or `certs_lost` (deleted file, flushed Redis),
  and the list shows the certificates last read, with ``problem``.

Invariants:
* A public record (`balancer.certificates.public_record`) never holds the key;
  no answer or log line made here does.
* A refused upload changes nothing; so does any write while the store's
  certificates are damaged or lost (`balancer.stores.certs`). A stored change is served by this
  balancer's workers when the API answers (`tell_workers`: the control socket's
  ``certs``), and by the workers of every other balancer on the store within a
  second (`balancer.tls.follow`), without a restart.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from typing import Any

from balancer.certificates import (
    CertificateError,
    keep_facts,
    make_record,
    public_record,
    served_chain,
)
from balancer.rules import normalize_host, validate_host
from balancer.stores import Store
from balancer.stores.certs import CertsCorrupt, CertsLost
from management.http import ApiError, Route

log = logging.getLogger("balancer")

RULES = [
    Route("/api/v1/certs", endpoint="list_certs", methods=["GET"]),
    Route("/api/v1/certs/<host>", endpoint="put_cert", methods=["PUT"]),
    Route("/api/v1/certs/<host>", endpoint="delete_cert", methods=["DELETE"]),
    Route("/api/v1/certs/restore", endpoint="restore_certs", methods=["POST"]),
]


def list_certs(store: Store) -> tuple[list[dict[str, Any]], str | None]:
    """Every stored certificate as the API shows it (no keys), by host, and the
    store's problem: while its certificates cannot be read as a whole, those
    last read in good order (what the workers serve). A damaged record is
    listed with its ``problem``. What each chain says is parsed once
    (`balancer.certificates.chain_facts`); those no longer stored are dropped."""
    now = time.time()
    certs = store.certs()
    problem = None
    try:
        stored = certs.all()
    except (CertsCorrupt, CertsLost) as exc:
        stored, problem = dict(certs.last_good or {}), str(exc)
    shown = {host: public_record(host, record, now) for host, record in stored.items()}
    keep_facts(served_chain(record) for record in stored.values())
    for host, why in certs.damaged.items():
        shown.setdefault(host, {"host": host, "problem": why})
    return [shown[host] for host in sorted(shown)], problem


def expiries(store: Store) -> dict[str, float]:
    """HOST → seconds until its certificate expires (negative once expired)."""
    return {c["host"]: c["expires_in"] for c in list_certs(store)[0] if "expires_in" in c}


def restore_certs(store: Store, problem: str | None) -> int:
    """Write the certificates last read in good order back over a damaged or lost
    store; how many. 409 `nothing_to_restore` when there is nothing to repair."""
    certs = store.certs()
    if problem is None:
        try:
            certs.all()
        except (CertsCorrupt, CertsLost) as exc:
            problem = str(exc)
    if problem is None:
        raise ApiError(409, "nothing_to_restore", "the store's certificates are readable: "
                       "there is nothing to restore")
    if certs.last_good is None:
        raise ApiError(409, "nothing_to_restore",
                       "this balancer's management process has read no certificates in "
                       "good order since it started; restore the certificates file (or "
                       "Redis) from a backup, or upload each certificate again after "
                       "repairing the store by hand (docs/tls.md)")
    records = dict(certs.last_good)
    certs.restore(records)
    log.warning("certificates: restored %d certificates to the store (it was: %s)",
                len(records), problem)
    return len(records)


def put_cert(store: Store, host: str, body: Any) -> dict[str, Any]:
    """Check and store one certificate; its public record, or 400 naming the reason."""
    key = _not_by_ip(_host(host))
    if not isinstance(body, dict) or set(body) - {"chain", "key"} \
            or not isinstance(body.get("chain"), str) or not isinstance(body.get("key"), str):
        raise ApiError(400, "invalid_certificate",
                       'expected {"chain": PEM text, "key": PEM text}')
    try:
        record = make_record(key, body["chain"], body["key"])
    except CertificateError as exc:
        raise ApiError(400, "invalid_certificate", f"certificate for {key} refused: {exc}",
                       [str(exc)]) from None
    store.certs().put(key, record)
    return public_record(key, record)


def delete_cert(store: Store, host: str) -> str:
    key = _host(host)
    if not store.certs().delete(key):
        raise ApiError(404, "not_found", f"no certificate for host {key!r}")
    return key


def _host(host: str) -> str:
    problems = validate_host(host)
    if problems or host.strip() == "*":
        raise ApiError(400, "invalid_host", problems[0] if problems
                       else "a certificate needs a host name or *.suffix")
    return normalize_host(host)


def _not_by_ip(key: str) -> str:
    """`key`, unless it is an IP address (``[::1]``, ``192.0.2.1``, and what
    inet_aton reads as one, ``127.1``, as browsers and curl do): 400 `invalid_host`.
    A client connecting by address sends no SNI name (RFC 6066 §3 keeps IP
    literals out of it) and checks the address against the certificate's IP
    addresses, never its DNS names: a certificate stored for it was never served
    (bug: accepted, and listed as served)."""
    if key.startswith("["):
        address = key[1:-1]  # (`_host`: an IPv6 address in brackets)
    else:
        try:
            address = socket.inet_ntoa(socket.inet_aton(key))
        except OSError:
            return key
    raise ApiError(400, "invalid_host",
                   f"certificate for {key} refused: {ipaddress.ip_address(address)} is an IP "
                   f"address, which clients never ask for by SNI (RFC 6066), so no certificate "
                   f"is served for it; for clients that connect by IP address, store the "
                   f"certificate (with the address among its IP addresses) under a host name "
                   f"it covers and set tls.default_host to that name")


def tell_workers(runtime: Any) -> None:
    """Make every worker of this balancer serve the store's certificates now (a
    certificate was just written); a worker that cannot is logged, and its
    once-a-second look at the store catches up."""
    for reply in runtime.ask_all("certs"):
        if "error" in reply:
            log.warning("certificates: worker %s cannot read them now (it looks again within "
                        "a second): %s", reply.get("pid"), reply["error"])
