"""The management API routes by the path as sent: a percent-encoded separator
(``%2F``, ``%3F``...) inside a host or address segment is part of that segment,
never a ``/`` that picks another route (management/http.py ``route_path``).

Bug: the path was decoded before routing, so ``DELETE
/api/v1/hosts/a.test%2Fbackends%2FADDR`` (with the token) removed a backend, and
``balancerctl delete 'a.test/backends/ADDR'`` did the same.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from management.ctl import main as ctl_main
from tests.support import Balancer

TOKEN = "t0ken-for-paths"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ADDRS = ["127.0.0.1:9001", "127.0.0.1:9002", "https://10.0.0.7:8443"]
RULE = {"action": "proxy", "backends": ADDRS}


@pytest.fixture(scope="module")
def bal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    tmp: Path = tmp_path_factory.mktemp("paths")
    balancer = Balancer(tmp, {"a.test": RULE}, args=["--token", TOKEN])
    yield balancer
    balancer.stop()


@pytest.fixture
def site(bal: Balancer) -> Balancer:
    """The balancer with a.test at `RULE` again."""
    status, body = bal.api("PUT", "/api/v1/hosts/a.test", RULE, AUTH)
    assert status == 200, body
    return bal


def raw_call(bal: Balancer, method: str, target: str, body: Any = None
             ) -> tuple[int, dict[str, Any]]:
    """`target` sent byte for byte (http.client sends the request line as given)."""
    conn = http.client.HTTPConnection("127.0.0.1", bal.mport, timeout=10)
    data = json.dumps(body).encode() if body is not None else None
    headers = {**AUTH, **({"Content-Type": "application/json"} if data else {})}
    try:
        conn.request(method, target, body=data, headers=headers)
        reply = conn.getresponse()
        return reply.status, json.loads(reply.read())
    finally:
        conn.close()


def rule_of(bal: Balancer) -> Any:
    return bal.api("GET", "/api/v1/hosts/a.test", headers=AUTH)[1]["rule"]


@pytest.mark.parametrize(("method", "target", "status", "body"), [
    # each one matched another route once decoded: remove_backend, delete_host
    # (strict_slashes off: "a.test/"), deploy, add_backend, issue_cert; and "?"
    ("DELETE", "/api/v1/hosts/a.test%2Fbackends%2F127.0.0.1%3A9001", 404, None),
    ("DELETE", "/api/v1/hosts/a.test%2fbackends%2f127.0.0.1:9002", 404, None),
    ("DELETE", "/api/v1/hosts/a.test%2F", 404, None),
    ("POST", "/api/v1/hosts/a.test%2Fdeploy", 405, {"backends": ["127.0.0.1:9009"]}),
    ("POST", "/api/v1/hosts/a.test%2Fbackends", 405, "127.0.0.1:9009"),
    ("POST", "/api/v1/certs/a.test%2Fissue", 405, None),
    ("DELETE", "/api/v1/hosts/a.test%3Fx", 404, None),
])
def test_an_encoded_separator_never_picks_another_route(
        site: Balancer, method: str, target: str, status: int, body: Any) -> None:
    got, answer = raw_call(site, method, target, body)
    assert got == status, answer
    assert set(answer) == {"error", "message", "details"}
    assert rule_of(site) == RULE  # nothing was removed, deleted or deployed
    assert site.api("GET", "/api/v1/deploys", headers=AUTH)[1]["deploys"] == []


def test_a_segment_that_is_not_utf8_names_no_host(site: Balancer) -> None:
    got, answer = raw_call(site, "GET", "/api/v1/hosts/%FF.test")
    assert (got, answer["error"]) == (404, "not_found"), answer
    got, answer = raw_call(site, "PUT", "/api/v1/hosts/%FF.test", RULE)
    assert (got, answer["error"]) == (400, "invalid_rule"), answer


def test_encoded_segments_still_name_their_host_and_address(site: Balancer) -> None:
    """Percent-encoding inside one segment is decoded for that segment alone."""
    assert raw_call(site, "GET", "/api/v1/hosts/%61.test")[0] == 200
    got, answer = raw_call(site, "DELETE", "/api/v1/hosts/a.test/backends/127.0.0.1%3A9001")
    assert got == 200, answer
    got, answer = raw_call(site, "DELETE",
                           "/api/v1/hosts/a.test/backends/https:%2F%2F10.0.0.7:8443")
    assert got == 200, answer
    assert rule_of(site)["backends"] == ["127.0.0.1:9002"]


def test_the_token_is_checked_on_the_path_as_sent(site: Balancer) -> None:
    """A path that decodes to a public one (``/static/...``) is not public."""
    conn = http.client.HTTPConnection("127.0.0.1", site.mport, timeout=10)
    conn.request("GET", "/static%2F..%2Fapi/v1/hosts")
    reply = conn.getresponse()
    assert reply.status == 401, reply.read()
    conn.close()


def test_balancerctl_sends_an_address_with_slashes_as_one_segment(
        site: Balancer, capsys: pytest.CaptureFixture[str]) -> None:
    """balancerctl encodes an address's ``//`` (``https:%2F%2F...``): still one
    segment, decoded alone; a host name with a ``/`` is refused before sending."""
    base = ["--url", f"http://127.0.0.1:{site.mport}", "--token", TOKEN]
    with pytest.raises(SystemExit):
        ctl_main([*base, "delete", "a.test/backends/127.0.0.1:9001"])
    assert ctl_main([*base, "remove-backend", "a.test", "https://10.0.0.7:8443"]) == 0
    assert rule_of(site)["backends"] == ADDRS[:2]
    capsys.readouterr()


@pytest.mark.parametrize("target", ["//healthz", "///healthz", "http://127.0.0.1//healthz"])
def test_leading_slashes_are_public_where_they_route_public(site: Balancer, target: str) -> None:
    """werkzeug routes ``//healthz`` as ``/healthz`` (its `match` drops leading
    slashes), so the token check sees the same path (bug: ``//healthz``, public
    before the raw-path routing, answered 401 without the token)."""
    conn = http.client.HTTPConnection("127.0.0.1", site.mport, timeout=10)
    conn.request("GET", target)
    reply = conn.getresponse()
    assert (reply.status, json.loads(reply.read())) == (200, {"status": "ok"})
    conn.close()


@pytest.mark.parametrize("target", ["//api/v1/hosts", "///api/v1/hosts",
                                    "http://127.0.0.1//api/v1/hosts"])
def test_leading_slashes_still_need_the_token_elsewhere(site: Balancer, target: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", site.mport, timeout=10)
    conn.request("GET", target)
    reply = conn.getresponse()
    assert reply.status == 401, reply.read()
    conn.close()


@pytest.mark.parametrize(("target", "status"), [
    ("http://[/healthz", 200), ("http://[::1/api/v1/hosts", 401), ("http://a]b/healthz", 200)])
def test_an_absolute_target_with_a_broken_authority_is_routed_by_its_path(
        site: Balancer, target: str, status: int) -> None:
    """Bug: ``urlsplit`` raised on the unclosed ``[`` before the app's error
    handling: 500 in plain text, and a traceback in the log."""
    conn = http.client.HTTPConnection("127.0.0.1", site.mport, timeout=10)
    conn.putrequest("GET", target, skip_host=True)  # (http.client cannot parse it either)
    conn.putheader("Host", f"127.0.0.1:{site.mport}")
    conn.endheaders()
    reply = conn.getresponse()
    assert (reply.status, reply.getheader("Content-Type")) == (status, "application/json")
    reply.read()
    conn.close()
    assert "Traceback" not in site.output()
