"""Probe of a deploy's switch from a rule without backends (SPEC §10): a host that
began as a holding page (``static``) or a held start (``spin``) with its HTTPS,
HSTS, ACME and rate-limit fields, deployed onto its first backends.

Found and fixed: the switched rule kept only ``subdomains`` of such a rule, so
the deploy silently dropped ``https_redirect`` (plain HTTP served again),
``hsts``, ``limits`` and ``"tls": "acme"`` (the certificate no longer renewed:
it expired weeks later). Every field that is not the action's own is kept now,
as a deploy from a proxy rule keeps them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.support import Backend, Balancer, dead_address, request
from tests.test_deploys import HOST, deploy, finished

# the rule's fields that are not its action's (`balancer.rules.COMMON_KEYS`)
FIELDS: dict[str, Any] = {"https_redirect": True, "hsts": 600, "tls": "acme",
                          "limits": {"rate": 1000, "burst": 1000,
                                     "max_connections_per_client": 50}}
ACME_NOWHERE = '[acme]\ndirectory = "http://127.0.0.1:1/directory"\n'  # refused at once


@pytest.mark.parametrize(("before", "fields"), [
    ({"action": "static", "body": "soon"}, FIELDS),
    ({"action": "spin", "timeout": 30}, FIELDS),
    ({"action": "static", "body": "soon"}, {"subdomains": True, "https_redirect": True}),
])
def test_a_deploy_from_a_rule_without_backends_keeps_its_fields(
        tmp_path: Path, b: Backend, before: dict[str, Any], fields: dict[str, Any]) -> None:
    lb = Balancer(tmp_path, {HOST: {**before, **fields}}, config=ACME_NOWHERE)
    try:
        record = finished(lb, deploy(lb, {"backends": [b.address], "warmup": 0})["id"])
        assert record["state"] == "done", record
        rule = lb.api("GET", f"/api/v1/hosts/{HOST}")[1]["rule"]
        assert rule == {"action": "proxy", "backends": [b.address], **fields}
        status, headers, _ = request(lb.port, path="/x?y=1")
        assert (status, headers["location"]) == (308, f"https://{HOST}/x?y=1")
        assert request(lb.port, path="/.well-known/acme-challenge/t")[0] != 308
    finally:
        lb.stop()


@pytest.mark.parametrize("change", ["DELETE", "PUT"])
def test_a_rule_changed_during_the_ready_step_ends_the_deploy_at_once(
        tmp_path: Path, b: Backend, change: str) -> None:
    """An operator stopping a deploy to a backend that will never answer (a typo,
    a long `ready_timeout`): the host's rule changed or deleted ends it within a
    probe round, and the host takes a new deploy; before, it waited out the whole
    `ready_timeout`, refusing new deploys 409 meanwhile."""
    lb = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [b.address]}})
    try:
        record = deploy(lb, {"backends": [dead_address()], "ready_timeout": 600})
        rule = {"action": "static", "body": "kept"} if change == "PUT" else None
        assert lb.api(change, f"/api/v1/hosts/{HOST}", rule)[0] == 200
        ended = finished(lb, record["id"], timeout=10)
        assert ended["state"] == "failed" and "changed during the deploy" in ended["error"]
        assert "nothing was switched" in ended["error"]
        if change == "PUT":
            assert lb.api("GET", f"/api/v1/hosts/{HOST}")[1]["rule"] == rule
            again = deploy(lb, {"backends": [b.address], "warmup": 0})
            assert finished(lb, again["id"])["state"] == "done"
    finally:
        lb.stop()
