"""What the live documentation tests share (tests/test_docs_live.py and
tests/test_docs_live_redis.py): a client of the management API, and the
tables and examples of docs/ read as data."""

from __future__ import annotations

import http.client
import json
import re
import socket
from typing import Any

from tests.support import ROOT, Balancer, dead_address, request, wait_for
from tests.test_tls import client_context, https_get

TOKEN = "docs-token"
CERT_HOSTS = ("app.test",)
# a metric family: its type, its labels and the values of each label
Families = dict[str, tuple[str, set[str], dict[str, set[str]]]]


class Live:
    """The balancer of this module and its management API, token included."""

    def __init__(self, bal: Balancer, token: str | None = TOKEN) -> None:
        self.bal = bal
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}

    def call(self, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
             headers: dict[str, str] | None = None, token: bool = True
             ) -> tuple[int, dict[str, str], Any]:
        """(status, headers lower-cased, JSON body or bytes) of one API request."""
        sent = dict(self.auth) if token else {}
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        sent.update(headers or {})
        conn = http.client.HTTPConnection("127.0.0.1", self.bal.mport, timeout=10)
        try:
            conn.request(method, path, body=data, headers=sent)
            resp = conn.getresponse()
            payload = resp.read()
        finally:
            conn.close()
        answer: Any = payload
        if resp.getheader("Content-Type", "").startswith("application/json"):
            answer = json.loads(payload)
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, answer

    def error(self, method: str, path: str, body: Any = None, **kw: Any) -> tuple[int, str]:
        """(status, `error` code) of a request the API refuses."""
        status, _, answer = self.call(method, path, body, **kw)
        assert isinstance(answer, dict) and "error" in answer, (method, path, status, answer)
        return status, answer["error"]


def documented_metrics() -> dict[str, tuple[str, set[str], str]]:
    """docs/metrics.md's table: name -> (type, labels, what)."""
    doc = (ROOT / "docs" / "metrics.md").read_text()
    rows = re.findall(r"^\| `(balancer_\w+)` \| (\w+) \| ([^|]*) \| (.*) \|$", doc, re.M)
    assert len(rows) >= len(SPEC_METRICS), "docs/metrics.md's table no longer reads"
    return {name: (kind, set(re.findall(r"`(\w+)`", labels)), what)
            for name, kind, labels, what in rows}


# SPEC §7's families and labels: the names dashboards and alerts are written
# against (docs/metrics.md may add families, never rename these)
SPEC_METRICS = {
    "balancer_requests_total": {"host", "code"},
    "balancer_request_duration_seconds": {"host"},
    "balancer_bytes_received_total": {"host"},
    "balancer_bytes_sent_total": {"host"},
    "balancer_open_connections": set(),
    "balancer_open_requests": {"host"},
    "balancer_backend_requests_total": {"host", "backend", "outcome"},
    "balancer_backend_up": {"host", "backend"},
    "balancer_spinning_requests": {"host"},
    "balancer_routing_version": set(),
    "balancer_config_reloads_total": set(),
    "balancer_store_up": set(),
}


def traffic_hosts(backend: str) -> dict[str, Any]:
    """The rules `drive_every_path` sends its requests to (`backend` answers)."""
    proxy = {"action": "proxy", "backends": [backend]}
    return {"app.test": proxy, "deploy.test": proxy,
            "limited.test": {**proxy, "limits": {"rate": 0.01, "burst": 1}},
            "down.test": {"action": "proxy", "backends": [dead_address()]},
            "spin.test": {"action": "spin", "timeout": 0.1},
            "static.test": {"action": "static", "page": "maintenance"},
            "acme.test": {**proxy, "tls": "acme"}}


def drive_every_path(live: Live) -> None:
    """A request through each kind of path whose series the docs describe."""
    port = live.bal.port
    assert request(port, host="app.test")[0] == 200
    passed, limited = request(port, host="limited.test"), request(port, host="limited.test")
    assert (passed[0], limited[0]) == (200, 429)
    assert int(limited[1]["retry-after"]) >= 1  # docs/rules.md#limits
    assert request(port, host="down.test")[0] == 502
    held = request(port, host="spin.test")
    assert held[0] == 504 and "retry-after" in held[1]  # docs/rules.md#spin
    assert request(port, host="static.test")[0] == 503
    assert request(port, host="nowhere.test")[0] == 404
    tls = live.bal.ports["tls"]
    assert https_get(tls, "app.test", client_context(live.bal.tmp))[0] == 200
    with socket.create_connection(("127.0.0.1", tls), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")  # plain HTTP: protocol_error
        sock.recv(100)


def exported(text: str) -> Families:
    """Each family of `/metrics`: name -> (type, labels, values of each label)."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(text):
        values: dict[str, set[str]] = {}
        for sample in family.samples:
            for label, value in sample.labels.items():
                values.setdefault(label, set()).add(value)
        values.pop("le", None)  # the histogram's buckets, not a label of the family
        # prometheus_client names a counter family without its `_total`
        name = family.name + ("_total" if family.type == "counter" else "")
        found[name] = (family.type, set(values), values)
    return found


def documented_families_exported(live: Live) -> tuple[str, Families]:
    """`/metrics` after traffic through every path, and its families (`exported`),
    once checked against docs/metrics.md's table: the same families, each of the
    type and labels the table says, each value of a label that is not a name
    (`outcome`, `state`, `process`) shown in its row."""
    drive_every_path(live)
    documented = documented_metrics()
    text = scrape_when(live, lambda found: all(
        found.get(name, ("", set()))[1] == labels
        for name, (_, labels, _) in documented.items()))
    found = exported(text)
    assert set(found) == set(documented), (
        f"exported, not in docs/metrics.md: {sorted(set(found) - set(documented))}; "
        f"in docs/metrics.md, not exported: {sorted(set(documented) - set(found))}")
    for name, (kind, labels, what) in documented.items():
        assert found[name][:2] == (kind, labels), f"{name}: docs say {kind} {labels}"
        for label in labels - {"host", "backend", "code"}:  # those are names, not a fixed set
            for value in found[name][2][label]:
                assert f"`{value}`" in what, f"{name}: {label}={value} not in docs/metrics.md"
    return text, found


def scrape_when(live: Live, ready: Any) -> str:
    """`/metrics` once `ready(families)` holds (the issuer's first pass, the
    worker's counters reach the management process within its sampling)."""
    text = ""

    def scraped() -> bool:
        nonlocal text
        status, _, body = live.call("GET", "/metrics")
        assert status == 200, (status, body)
        text = body.decode()
        return ready(exported(text))
    wait_for(scraped, timeout=15, what="every family with its series")
    return text


def documented_errors() -> dict[str, int]:
    errors = (ROOT / "docs" / "api.md").read_text().split("## Errors")[1].split("\n## ")[0]
    return {code: int(status) for status, code in
            re.findall(r"^\| (\d{3}) \| `(\w+)` \|", errors, re.M)}


def raw_error(live: Live, length: int, body: bytes) -> tuple[int, str]:
    """(status, `error` code) of a write announcing `length` bytes of body and
    sending `body`; the answer is read until the server closes."""
    return raw_answer(live, b"PUT /api/v1/hosts/x.test HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
                      b"Content-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n" % length + body)


def raw_answer(live: Live, data: bytes) -> tuple[int, str]:
    """(status, `error` code) of the answer to `data`, read until the server closes."""
    with socket.create_connection(("127.0.0.1", live.bal.mport), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        for _ in range(64):  # the connection is closed after the answer
            chunk = sock.recv(65536)
            if not chunk:
                head, _, json_body = answer.partition(b"\r\n\r\n")
                return int(head.split()[1]), json.loads(json_body)["error"]
            answer += chunk
        raise AssertionError(f"the connection stayed open after {answer[:200]!r}")


# objects keyed by a name (a host, a backend address), not by a field
NAMED = {"hosts", "backends", "acme"}


def key_paths(value: Any, path: str = "") -> set[str]:
    """Every field of a JSON value as a dotted path; `[]` for a list's items, `*`
    for the keys of an object in `NAMED`."""
    found: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{'*' if path.rsplit('.', 1)[-1] in NAMED else key}".lstrip(".")
            found |= {inner} | key_paths(item, inner)
    elif isinstance(value, list):
        for item in value:
            found |= key_paths(item, f"{path}.[]")
    return found


def documented_example(doc: str, marker: str) -> Any:
    """The first ```json block after `marker` in docs/`doc` (``[...]`` read as ``[]``)."""
    text = (ROOT / "docs" / doc).read_text()
    assert marker in text, f"docs/{doc} no longer has {marker!r}"
    block = re.search(r"```json\n(.*?)```", text[text.index(marker):], re.S)
    assert block is not None, marker
    return json.loads(block.group(1).replace("[...]", "[]"))
