"""The references say what a running balancer does: every metric family of
docs/metrics.md (name, type, labels, label values) is what `/metrics` exports
after traffic through every kind of path; every error of docs/api.md is
answered with its status where its trigger is cheap; the documented headers
and query parameter bounds hold; the JSON examples of docs/api.md and
docs/deploys.md have the fields the answers have. One `balancer serve` (file
store, a TLS listener, a token) for the module."""

from __future__ import annotations

import json
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.docs_live import (
    CERT_HOSTS,
    SPEC_METRICS,
    TOKEN,
    Live,
    documented_errors,
    documented_example,
    documented_families_exported,
    documented_metrics,
    key_paths,
    raw_answer,
    raw_error,
    traffic_hosts,
)
from tests.support import ROOT, Backend, Balancer, dead_address, request, wait_for
from tests.test_tls import CA, put_cert

# one balancer for the module: its tests go to one xdist worker
pytestmark = pytest.mark.xdist_group("docs_live")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("docs_live")
    backend = Backend("docs")
    routes = tmp / "routes.json"
    proxy = {"action": "proxy", "backends": [backend.address]}
    hosts = {**traffic_hosts(backend.address),
             "idle.test": proxy,  # never sent a request
             "checked.test": {**proxy, "health": {"path": "/", "interval": 60}}}  # nor this one
    routes.write_text(json.dumps({"version": 1, "hosts": hosts}))
    for host in CERT_HOSTS:
        put_cert(routes, host)
    config = (f'[timeouts]\nclient_header = 0.5\n[management]\ntoken = "{TOKEN}"\n'
              '[acme]\ndirectory = "http://127.0.0.1:1/directory"\n'
              f'[log]\naccess_log = "{tmp / "access.log"}"\naccess_format = "json"\n')
    bal = Balancer(tmp, args=["--tls-listen", "127.0.0.1:0"], config=config)
    try:
        yield Live(bal)
    finally:
        bal.stop()
        backend.stop()


# metrics --------------------------------------------------------------------------

def test_metrics_reference_is_what_the_balancer_exports(live: Live) -> None:
    text, found = documented_families_exported(live)
    buckets = sorted(float(le) for le in re.findall(
        r'^balancer_request_duration_seconds_bucket\{[^}]*le="([^"+]+)"', text, re.M))
    assert (buckets[0], buckets[-1]) == (0.005, 60.0)  # "buckets 5 ms to 60 s"
    for name, labels in SPEC_METRICS.items():
        assert name in found and found[name][1] == labels, name
    hosts = {host for _, _, values in found.values() for host in values.get("host", ())}
    assert "(unknown)" in hosts  # the 404 of a name no rule matched
    assert "idle.test" not in hosts  # "a host that has never had a request has no series"
    assert "checked.test" in found["balancer_backend_up"][2]["host"]  # "... the exception"


def test_metrics_table_is_read_with_its_types_and_labels() -> None:
    documented = documented_metrics()
    assert documented["balancer_backend_requests_total"][:2] == (
        "counter", {"host", "backend", "outcome"})
    assert documented["balancer_open_connections"][1] == set()


# API errors -------------------------------------------------------------------------

# documented errors no cheap request of a healthy balancer triggers, and where
# they are tested instead
NOT_TRIGGERED_HERE = {
    "internal_error": "a bug (tests/test_management_app.py)",
    "store_unavailable": "Redis down (tests/test_redis_integration.py)",
    "store_not_replicated": "Redis replicas (tests/test_redis_replicas.py)",
    "workers_unreachable": "run directory removed (tests/test_run_dir.py)",
    "metrics_unavailable": "prometheus-client broken (tests/test_management_app.py)",
    "store_full": "disk full (tests/test_file_store.py)",
    "resources_exhausted": "out of descriptors (tests/test_management_limits.py)",
    "deploy_gone": "a deploy record pushed out (tests/test_deploy_targets.py)",
}


def cheap_triggers(live: Live, tmp: Path) -> Iterator[tuple[str, int, str]]:
    """(expected code, status, code) for each error a request can cause here."""
    chain, key = CA.issue("app.test")
    yield "invalid_rule", *live.error("PUT", "/api/v1/hosts/x.test", {"action": "proxy"})
    yield "invalid_deploy", *live.error("POST", "/api/v1/hosts/deploy.test/deploy",
                                        {"backends": []})
    yield "invalid_certificate", *live.error("PUT", "/api/v1/certs/app.test",
                                             {"chain": "x", "key": "y"})
    yield "invalid_host", *live.error("PUT", "/api/v1/certs/-bad-", {"chain": chain, "key": key})
    yield "invalid_json", *live.error("PUT", "/api/v1/hosts/x.test", raw=b"{",
                                      headers={"Content-Type": "application/json"})
    yield "invalid_header", *live.error("PUT", "/api/v1/hosts/x.test", {"action": "spin"},
                                        headers={"If-Match": "twelve"})
    yield "bad_request", *live.error("GET", "/api/v1/stats?limit=0")
    yield "unauthorized", *live.error("GET", "/api/v1/hosts", token=False)
    yield "host_not_allowed", *live.error("GET", "/api/v1/hosts",
                                          headers={"Host": "evil.example"})
    yield "cross_origin", *live.error("GET", "/api/v1/hosts",
                                      headers={"Origin": "http://evil.example"})
    yield "not_found", *live.error("GET", "/api/v1/nothing")
    yield "method_not_allowed", *live.error("DELETE", "/api/v1/stats")
    yield "request_timeout", *raw_error(live, 10, b"{")  # the rest never comes
    yield "deploy_in_progress", *two_deploys(live)
    yield "nothing_to_roll_back", *live.error("POST", "/api/v1/hosts/app.test/rollback")
    yield "nothing_to_abort", *live.error("DELETE", "/api/v1/hosts/app.test/deploy")
    yield "not_acme", *live.error("POST", "/api/v1/certs/app.test/issue")
    yield "version_conflict", *live.error("PUT", "/api/v1/hosts/x.test", {"action": "spin"},
                                          headers={"If-Match": '"0"'})
    yield "host_exists", *live.error("PUT", "/api/v1/hosts/app.test", {"action": "spin"},
                                     headers={"If-None-Match": "*"})
    yield "payload_too_large", *raw_error(live, 1024 * 1024 + 1, b"{")
    yield "uri_too_long", *raw_answer(live, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")
    yield "headers_too_large", *raw_answer(live, b"GET /healthz HTTP/1.1\r\n" + b"".join(
        b"X-%d: 1\r\n" % n for n in range(120)) + b"\r\n")
    yield "unsupported_media_type", *live.error("PUT", "/api/v1/hosts/x.test", raw=b"{}",
                                                headers={"Content-Type": "text/plain"})
    yield from damaged_store(live, tmp)


def two_deploys(live: Live) -> tuple[int, str]:
    """The second of two deploys of one host (the first waits for a backend that
    never answers, until the balancer stops)."""
    body = {"backends": [dead_address()], "ready_timeout": 60}
    status, _, answer = live.call("POST", "/api/v1/hosts/deploy.test/deploy", body)
    assert status == 202, answer
    return live.error("POST", "/api/v1/hosts/deploy.test/deploy", body)


def damaged_store(live: Live, tmp: Path) -> Iterator[tuple[str, int, str]]:
    """The store's errors: its file lost, then damaged, each repaired after."""
    routes = tmp / "routes.json"
    kept = routes.read_bytes()
    routes.unlink()
    yield "store_lost", *live.error("PUT", "/api/v1/hosts/x.test", {"action": "spin"})
    status, _, answer = live.call("POST", "/api/v1/restore")
    assert status == 200, answer
    yield "nothing_to_restore", *live.error("POST", "/api/v1/restore")
    kept = routes.read_bytes()
    routes.write_text("{not json")
    yield "store_corrupt", *live.error("PUT", "/api/v1/hosts/x.test", {"action": "spin"})
    routes.write_bytes(kept)
    certs = tmp / "routes.json.certs.json"
    chain, key = CA.issue("app.test")
    certs.write_text("{not json")
    yield "certs_corrupt", *live.error("PUT", "/api/v1/certs/app.test",
                                       {"chain": chain, "key": key})
    certs.unlink()
    yield "certs_lost", *live.error("PUT", "/api/v1/certs/app.test",
                                    {"chain": chain, "key": key})
    status, _, answer = live.call("POST", "/api/v1/certs/restore")
    assert status == 200 and answer["restored"] == len(CERT_HOSTS), answer
    assert certs.exists()


def test_every_documented_error_is_answered_with_its_status(live: Live) -> None:
    documented = documented_errors()
    answered = {}
    for expected, status, code in cheap_triggers(live, live.bal.tmp):
        assert code == expected, (expected, status, code)
        answered[code] = status
    assert set(answered) | set(NOT_TRIGGERED_HERE) == set(documented), (
        "docs/api.md errors neither triggered here nor listed in NOT_TRIGGERED_HERE: "
        f"{sorted(set(documented) - set(answered) - set(NOT_TRIGGERED_HERE))}; "
        f"answered but not documented: {sorted(set(answered) - set(documented))}")
    for code, status in answered.items():
        assert documented[code] == status, f"{code}: docs/api.md says {documented[code]}"


def test_documented_answer_headers(live: Live) -> None:
    """docs/api.md's introduction, Authentication and Errors."""
    status, headers, _ = live.call("GET", "/api/v1/hosts", token=False)
    assert (status, headers["www-authenticate"]) == (401, 'Bearer realm="balancer"')
    status, headers, _ = live.call("DELETE", "/api/v1/stats")
    assert (status, headers["allow"]) == (405, "GET, HEAD")
    status, headers, _ = live.call("GET", "/api/v1/hosts")
    assert status == 200
    assert (headers["cache-control"], headers["x-content-type-options"]) == ("no-store", "nosniff")
    assert re.fullmatch(r'"\d+"', headers["etag"])
    assert live.call("GET", "/api/v1/hosts", headers={"If-None-Match": headers["etag"]})[0] == 304
    assert live.call("GET", "/metrics")[1]["cache-control"] == "no-store"
    static = sorted((ROOT / "management" / "static").iterdir())[0].name
    status, headers, _ = live.call("GET", f"/static/{static}", token=False)
    assert (status, headers["cache-control"]) == (200, "no-cache")
    assert live.call("GET", "/healthz", token=False)[0] == 200
    assert live.call("GET", "/readyz", token=False)[0] == 401
    assert live.call("GET", f"/api/v1/hosts?token={TOKEN}", token=False)[0] == 401
    with socket.create_connection(("127.0.0.1", live.bal.mport), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")  # "a request without Host passes"
        assert sock.recv(100).startswith(b"HTTP/1.1 200 ")
    # "a request line of 8 KiB (414)", "100 fields (431)"
    line = b"GET /" + b"a" * 8192 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    fields = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % n for n in range(101)) + b"\r\n"
    for head, refused in ((line, b"414"), (fields, b"431")):
        with socket.create_connection(("127.0.0.1", live.bal.mport), timeout=10) as sock:
            sock.sendall(head)
            assert sock.recv(100).split(b" ")[1] == refused


# (route, parameter, the largest or smallest value taken, the next one refused,
# what docs/api.md says of it)
QUERY_BOUNDS = [
    ("/api/v1/stats", "limit", "10000", "10001", "`?limit=N` (1 to 10,000)"),
    ("/api/v1/stats", "limit", "1", "0", "`?limit=N` (1 to 10,000)"),
    ("/api/v1/top", "limit", "100", "101", "`limit`: 1 to 100 (default 10)"),
    ("/api/v1/top", "window", "300", "301", "`window`: seconds, 1 to 300 (default 60)"),
    ("/api/v1/top", "by", "in_flight", "speed", "refused) or `in_flight` (requests open now"),
    ("/api/v1/top", "group", "backend", "country", "`app.example.com/api`) or `backend`."),
    ("/api/v1/inflight", "min_age", "0", "-1", "at least that many seconds (default 0)"),
    ("/api/v1/history", "since", "3600", "3601", "`since`: seconds back, 1 to 3600"),
    ("/api/v1/history", "since", "1", "0.5", "`since`: seconds back, 1 to 3600"),
]


@pytest.mark.parametrize("route, name, taken, refused, doc", QUERY_BOUNDS,
                         ids=[f"{r}?{n}={v}" for r, n, _, v, _ in QUERY_BOUNDS])
def test_query_parameters_take_what_the_docs_say(live: Live, route: str, name: str, taken: str,
                                                 refused: str, doc: str) -> None:
    text = " ".join((ROOT / "docs" / "api.md").read_text().split())  # lines rewrapped
    assert doc in text, f"docs/api.md no longer says {doc!r}"
    status, _, answer = live.call("GET", f"{route}?{name}={taken}&unknown=1")
    assert status == 200, answer
    status, _, answer = live.call("GET", f"{route}?{name}={refused}")
    assert (status, answer["error"]) == (400, "bad_request"), answer
    assert any(problem.startswith(f"{name}: ") for problem in answer["details"]), answer


# answer shapes ------------------------------------------------------------------------

def start_deploy(live: Live, backend: Backend) -> str:
    """The path of the record of a deploy of shape.test to `backend`, started."""
    status, _, answer = live.call("POST", "/api/v1/hosts/shape.test/deploy",
                                  {"backends": [backend.address], "warmup": 0})
    assert status == 202, answer
    return f"/api/v1/deploys/{answer['deploy']['id']}"


def ended(live: Live, path: str) -> dict[str, Any]:
    """The record at `path` once its deploy has ended, done."""
    wait_for(lambda: live.call("GET", path)[2]["deploy"]["state"] != "running", timeout=15,
             what="the deploy to end")
    record = live.call("GET", path)[2]["deploy"]
    assert record["state"] == "done", record
    return record


def test_documented_answers_have_the_fields_answered(live: Live) -> None:
    """Every field of the JSON examples of docs/api.md and docs/deploys.md is in the
    answer, and every field answered is in the example (fields under a name, as
    `hosts.*`, and of a list's items may be fewer: the example shows several
    states at once, and a list may be empty)."""
    backend, new = Backend("shape-a"), Backend("shape-b")
    try:
        rule = {"action": "proxy", "backends": [backend.address]}
        assert live.call("PUT", "/api/v1/hosts/shape.test", rule)[0] == 200
        assert request(live.bal.port, host="shape.test")[0] == 200
        slow = threading.Thread(target=request, args=(live.bal.port,),
                                kwargs={"host": "shape.test", "path": "/slow?s=1"})
        slow.start()
        wait_for(lambda: live.call("GET", "/api/v1/inflight")[2]["requests"], timeout=5,
                 what="a request in flight")
        deploy = start_deploy(live, new)  # its drain waits for the slow request
        answers = {marker: live.call("GET", path)[2] for marker, path in (
            ("`GET /api/v1/stats`:", "/api/v1/stats?host=shape.test"),
            ("`GET /api/v1/info`:", "/api/v1/info"),
            ("`GET /api/v1/top?", "/api/v1/top?group=host"),
            ("`GET /api/v1/inflight?min_age=5`", "/api/v1/inflight"),
            ("`GET /api/v1/history?", "/api/v1/history"),
            ("`GET /api/v1/acme` shows", "/api/v1/acme"))}
        record = ended(live, deploy)
        slow.join(10)
    finally:
        backend.stop()
        new.stop()
    examples = [("api.md", marker, answer) for marker, answer in answers.items()]
    examples.append(("deploys.md", "`GET /api/v1/deploys/ID`. A record:", record))
    for doc, marker, answer in examples:
        shown, answered = key_paths(documented_example(doc, marker)), key_paths(answer)
        assert answered <= shown, f"docs/{doc} {marker}: fields not shown: {answered - shown}"
        missing = {path for path in shown - answered if "*" not in path and "[]" not in path}
        assert not missing, f"docs/{doc} {marker}: fields not answered: {missing}"


def test_json_access_log_has_the_documented_fields(live: Live) -> None:
    doc = " ".join((ROOT / "docs" / "operations.md").read_text().split())
    listed = doc.split("`json`: one object per line with ")[1].split(". Strings")[0]
    documented = re.findall(r"`(\w+)`", listed)
    assert len(documented) >= 10, listed
    assert request(live.bal.port, host="app.test", path="/logged")[0] == 200
    log = live.bal.tmp / "access.log"

    def logged() -> dict[str, Any] | None:
        lines = log.read_text().splitlines() if log.exists() else []
        found = [json.loads(line) for line in lines if '"/logged"' in line]
        return found[0] if found else None
    record = wait_for(logged, timeout=10, what="the request's access log line")
    assert list(record) == documented


# a call of each route naming what does not exist, and a body it would take
ABSENT_BODIES: dict[str, Any] = {
    "PUT /api/v1/hosts/HOST": {"action": "spin"},
    "POST /api/v1/hosts/HOST/backends": "127.0.0.1:9",
    "POST /api/v1/hosts/HOST/deploy": {"backends": ["127.0.0.1:9"]},
    "PUT /api/v1/certs/HOST": {"chain": "x", "key": "y"},
}


def test_routes_answer_404_for_what_is_absent_as_documented(live: Live) -> None:
    """A route of docs/api.md's table naming a host, backend or deploy that does
    not exist answers 404 `not_found` exactly when its row says 404."""
    table = (ROOT / "docs" / "api.md").read_text().split("## Routes")[1].split("\n## ")[0]
    rows = re.findall(r"^\| `([A-Z]+ /\S*(?:HOST|ADDR|ID)\S*)` \|.*\| (.*) \|$", table, re.M)
    assert len(rows) >= 12
    for number, (route, answer) in enumerate(rows):
        method, path = route.split()
        named = (path.replace("HOST", f"absent-{number}.test").replace("ADDR", "127.0.0.1:9")
                 .replace("ID", "20000101-000000-000000"))
        status, _, body = live.call(method, named, ABSENT_BODIES.get(route))
        documented = "404" in answer
        assert (status == 404) == documented, (
            f"{route}: answered {status} {body} for an absent one; docs/api.md says "
            f"{'404' if documented else 'no 404'}")
        if documented:
            assert body["error"] == "not_found", body


def test_forwarding_fields_are_replaced_as_documented(live: Live) -> None:
    """docs/headers.md: on an external listener each listed field a client sends
    is removed, and the balancer's own fields carry its values."""
    doc = (ROOT / "docs" / "headers.md").read_text()
    listed = doc.split("`X_Forwarded_For` as\n`X-Forwarded-For`):")[1].split("These are what")[0]
    removed = re.findall(r"`([A-Za-z0-9-]+)`", listed)
    table = doc.split("The balancer then sets its own:")[1].split("An **internal**")[0]
    own = re.findall(r"^\| `([A-Za-z-]+)` \|", table, re.M)
    assert len(removed) >= 30 and len(own) >= 5, (removed, own)
    backend = Backend("headers")
    try:
        rule = {"action": "proxy", "backends": [backend.address]}
        assert live.call("PUT", "/api/v1/hosts/headers.test", rule)[0] == 200
        forged = {name: "forged" for name in removed}
        status, answer, _ = request(live.bal.port, host="headers.test", headers=forged)
        assert status == 200
        _, _, seen = backend.requests[-1]
    finally:
        backend.stop()
    seen = {name.lower(): value for name, value in seen.items()}
    assert {name for name in removed if seen.get(name.lower()) == "forged"} == set()
    assert (seen["x-forwarded-for"], seen["x-real-ip"]) == ("127.0.0.1", "127.0.0.1")
    assert (seen["x-forwarded-proto"], seen["x-forwarded-host"]) == ("http", "headers.test")
    assert seen["x-request-id"] == answer["x-request-id"]
    assert {name.lower() for name in own} <= set(seen)
