"""The management API (SPEC §5) through a real HTTP server, every route and error shape."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest

from balancer.stats import Stats
from balancer.stores import Store, TableData, VersionConflict, open_store
from balancer.stores.file import FileStore
from management import dashboard_page
from management.app import create_app
from management.runtime import snapshot_of
from tests.conftest import RedisServer
from tests.support import ScriptedHealth

WEB = {"action": "proxy", "backends": ["127.0.0.1:9001"]}
GONE = {"action": "empty", "status": 410}
TOKEN = "s3cret-token"


class Reply:
    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def json(self) -> Any:
        assert self.headers["Content-Type"].startswith("application/json"), self.headers
        return json.loads(self.body)


def call(base: str, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
         headers: dict[str, str] | None = None, chunked: bool = False) -> Reply:
    """One request on a fresh connection; `body` is sent as JSON, `raw` as is."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    try:
        if chunked:
            conn.request(method, path, body=iter([data]), headers=headers or {},
                         encode_chunked=True)
        else:
            conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        conn.close()


def assert_error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    assert reply.status == status, reply.body
    body = reply.json
    assert set(body) == {"error", "message", "details"}
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    assert isinstance(body["details"], list)
    return body


class CountingRuntime:
    """A runtime over real `balancer.stats` counters, as one worker would keep them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.counters = Stats()
        self.ready = True
        self.reloads = 0

    def stats(self, select: dict[str, Any] | None = None) -> dict[str, Any]:
        return snapshot_of(self.counters, select)

    def reload(self) -> int:
        self.reloads += 1
        return self.store.load().version

    def is_ready(self) -> bool:
        return self.ready

    def info(self) -> dict[str, Any]:
        return {"workers": 1, "store": {"kind": self.store.kind, "url": self.store.display_url,
                                        "reachable": True, "version": 0, "last_reload": 0}}


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(str(tmp_path / "routes.json"))


@pytest.fixture
def base(store: FileStore, serve_wsgi: Callable[[Any], str]) -> str:
    return serve_wsgi(create_app(store=store))


# hosts -------------------------------------------------------------------------
def test_list_hosts_of_an_empty_table(base: str) -> None:
    reply = call(base, "GET", "/api/v1/hosts")
    assert reply.status == 200
    assert reply.json == {"version": 0, "hosts": {}}
    assert reply.headers["ETag"] == '"0"'


def test_put_get_and_delete_one_host(base: str) -> None:
    put = call(base, "PUT", "/api/v1/hosts/Web.Example.COM", WEB)
    assert (put.status, put.json) == (200, {"version": 1})
    got = call(base, "GET", "/api/v1/hosts/web.example.com")
    assert got.json == {"host": "web.example.com", "rule": WEB, "version": 1}
    assert call(base, "GET", "/api/v1/hosts").json == {"version": 1,
                                                       "hosts": {"web.example.com": WEB}}
    assert call(base, "DELETE", "/api/v1/hosts/WEB.example.com").json == {"version": 2}
    assert_error(call(base, "GET", "/api/v1/hosts/web.example.com"), 404, "not_found")
    assert_error(call(base, "DELETE", "/api/v1/hosts/web.example.com"), 404, "not_found")


def test_wildcard_and_catch_all_keys(base: str) -> None:
    assert call(base, "PUT", "/api/v1/hosts/*.example.com", GONE).status == 200
    assert call(base, "PUT", "/api/v1/hosts/*", WEB).status == 200
    assert call(base, "GET", "/api/v1/hosts/*").json["rule"] == WEB
    assert set(call(base, "GET", "/api/v1/hosts").json["hosts"]) == {"*.example.com", "*"}


def test_replace_the_whole_table(base: str) -> None:
    call(base, "PUT", "/api/v1/hosts/old.example.com", GONE)
    reply = call(base, "PUT", "/api/v1/hosts", {"hosts": {"A.example.com": WEB, "b.example.com":
                                                          GONE}})
    assert reply.json == {"version": 2}
    assert call(base, "GET", "/api/v1/hosts").json == {
        "version": 2, "hosts": {"a.example.com": WEB, "b.example.com": GONE}}


def test_an_invalid_rule_lists_every_problem_and_changes_nothing(base: str) -> None:
    bad = {"action": "proxy", "backends": ["nope", {"address": "127.0.0.1:1", "weight": 0}],
           "algorithm": "fastest"}
    body = assert_error(call(base, "PUT", "/api/v1/hosts/web.example.com", bad), 400,
                        "invalid_rule")
    assert len(body["details"]) == 3
    assert any("backends[0]" in d for d in body["details"])
    assert any("backends[1].weight" in d for d in body["details"])
    assert any("algorithm" in d for d in body["details"])
    body = assert_error(call(base, "PUT", "/api/v1/hosts/bad%20host!", GONE), 400, "invalid_rule")
    assert "not a valid host name" in body["details"][0]
    assert call(base, "GET", "/api/v1/hosts").json["version"] == 0


def test_an_invalid_table_lists_every_problem_and_changes_nothing(base: str) -> None:
    call(base, "PUT", "/api/v1/hosts/keep.example.com", GONE)
    table = {"hosts": {"a.example.com": {"action": "empty"}, "A.EXAMPLE.COM": GONE,
                       "b.example.com": {"action": "redirect", "to": "x", "status": 200}}}
    body = assert_error(call(base, "PUT", "/api/v1/hosts", table), 400, "invalid_rule")
    assert len(body["details"]) == 3, body["details"]
    assert_error(call(base, "PUT", "/api/v1/hosts", {"rules": {}}), 400, "invalid_rule")
    assert_error(call(base, "PUT", "/api/v1/hosts", [1]), 400, "invalid_rule")
    assert call(base, "GET", "/api/v1/hosts").json == {"version": 1,
                                                       "hosts": {"keep.example.com": GONE}}


@pytest.mark.parametrize("raw", [b"{not json", b"", b"\xff\xfe", b"[1,"])
def test_invalid_json(base: str, raw: bytes) -> None:
    assert_error(call(base, "PUT", "/api/v1/hosts/web.example.com", raw=raw), 400,
                 "invalid_json")
    assert call(base, "GET", "/api/v1/hosts").json["version"] == 0


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_one_mebibyte_is_refused(base: str, chunked: bool) -> None:
    huge = json.dumps({"action": "static", "body": "x" * (1024 * 1024)}).encode()
    reply = call(base, "PUT", "/api/v1/hosts/web.example.com", raw=huge, chunked=chunked)
    assert_error(reply, 413, "payload_too_large")
    assert call(base, "GET", "/api/v1/hosts").json["version"] == 0


def test_unknown_routes_and_wrong_methods_answer_json(base: str) -> None:
    assert_error(call(base, "GET", "/api/v2/hosts"), 404, "not_found")
    assert_error(call(base, "GET", "/api/v1/hosts/a/b/c/d"), 404, "not_found")
    reply = call(base, "POST", "/api/v1/hosts")
    assert_error(reply, 405, "method_not_allowed")
    assert set(reply.headers["Allow"].split(", ")) >= {"GET", "PUT"}
    assert_error(call(base, "DELETE", "/api/v1/reload"), 405, "method_not_allowed")


# conditional writes -----------------------------------------------------------------
def test_if_match_guards_every_write(base: str) -> None:
    call(base, "PUT", "/api/v1/hosts/web.example.com", WEB)
    stale = {"If-Match": '"0"'}
    writes = [("PUT", "/api/v1/hosts/b.example.com", GONE), ("PUT", "/api/v1/hosts",
              {"hosts": {}}), ("DELETE", "/api/v1/hosts/web.example.com", None),
              ("POST", "/api/v1/hosts/web.example.com/backends", {"address": "127.0.0.1:2"}),
              ("DELETE", "/api/v1/hosts/web.example.com/backends/127.0.0.1:9001", None)]
    for method, path, body in writes:
        reply = call(base, method, path, body, headers=stale)
        assert_error(reply, 412, "version_conflict")
        assert reply.headers["ETag"] == '"1"'
    assert call(base, "GET", "/api/v1/hosts").json["version"] == 1
    ok = call(base, "PUT", "/api/v1/hosts/b.example.com", GONE, headers={"If-Match": '"1"'})
    assert ok.json == {"version": 2}
    assert_error(call(base, "PUT", "/api/v1/hosts/c.example.com", GONE,
                      headers={"If-Match": "yesterday"}), 400, "invalid_header")


# backends -------------------------------------------------------------------------
def test_add_and_remove_backends(base: str) -> None:
    call(base, "PUT", "/api/v1/hosts/web.example.com", WEB)
    added = call(base, "POST", "/api/v1/hosts/web.example.com/backends",
                 {"address": "[::1]:9002", "weight": 3})
    assert added.json == {"version": 2}
    again = call(base, "POST", "/api/v1/hosts/web.example.com/backends",
                 {"address": "[::1]:9002", "weight": 5})
    assert again.json == {"version": 3}
    rule = call(base, "GET", "/api/v1/hosts/web.example.com").json["rule"]
    assert rule["backends"] == ["127.0.0.1:9001", {"address": "[::1]:9002", "weight": 5}]
    removed = call(base, "DELETE",
                   "/api/v1/hosts/web.example.com/backends/" + quote("[::1]:9002"))
    assert removed.json == {"version": 4}
    assert call(base, "GET", "/api/v1/hosts/web.example.com").json["rule"] == WEB


def test_https_backends_are_added_and_removed_by_address(base: str) -> None:
    call(base, "PUT", "/api/v1/hosts/web.example.com", WEB)
    assert call(base, "POST", "/api/v1/hosts/web.example.com/backends",
                {"address": "https://10.0.0.7:8443"}).json == {"version": 2}
    for spelling in ("https://10.0.0.7:8443", quote("HTTPS://10.0.0.7:8443", safe="")):
        call(base, "POST", "/api/v1/hosts/web.example.com/backends",
             {"address": "https://10.0.0.7:8443"})
        removed = call(base, "DELETE", "/api/v1/hosts/web.example.com/backends/" + spelling)
        assert removed.status == 200, removed.json  # the address's "//" is part of it
        assert call(base, "GET", "/api/v1/hosts/web.example.com").json["rule"] == WEB


def test_backend_edit_errors(base: str) -> None:
    call(base, "PUT", "/api/v1/hosts/web.example.com", WEB)
    call(base, "PUT", "/api/v1/hosts/gone.example.com", GONE)
    path = "/api/v1/hosts/web.example.com/backends"
    assert_error(call(base, "POST", "/api/v1/hosts/nobody.example.com/backends",
                      {"address": "127.0.0.1:2"}), 404, "not_found")
    assert_error(call(base, "POST", "/api/v1/hosts/gone.example.com/backends",
                      {"address": "127.0.0.1:2"}), 400, "invalid_rule")
    body = assert_error(call(base, "POST", path, {"address": "no port"}), 400, "invalid_rule")
    assert "backends[1]" in body["details"][0]
    assert_error(call(base, "POST", path, {"weight": 2, "colour": 1}), 400, "invalid_rule")
    assert_error(call(base, "DELETE", path + "/127.0.0.1:7"), 404, "not_found")
    body = assert_error(call(base, "DELETE", path + "/127.0.0.1:9001"), 400, "invalid_rule")
    assert body["details"] == [  # bug: "backends: must be a non-empty list", no way out
        "backends: 127.0.0.1:9001 is web.example.com's last backend, and a proxy rule needs "
        "one: add another first, or delete the host or give it another rule"]
    assert call(base, "GET", "/api/v1/hosts").json["version"] == 2



class AlwaysRaced(FileStore):
    """A store on which every one-host write loses a race with another writer."""

    writes = 0

    def put_host(self, host: str, rule: Any, if_version: int | None = None,
                 claimed: Any = None) -> int:
        self.writes += 1
        raise VersionConflict(self.load().version)


def test_a_backend_edit_that_always_races_gives_up_after_bounded_pauses(
        tmp_path: Path, serve_wsgi: Callable[[Any], str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Bounded in count and time: 20 attempts, the 19 pauses between them random up
    to a cap that doubles from 5 ms to 0.25 s (3.6 s at most), none after the last."""
    import random

    store = AlwaysRaced(str(tmp_path / "routes.json"))
    store.replace({"web.example.com": WEB})
    base = serve_wsgi(create_app(store=store))
    caps: list[float] = []
    monkeypatch.setattr(random, "uniform", lambda low, high: caps.append(high) or 0.0)
    reply = call(base, "POST", "/api/v1/hosts/web.example.com/backends",
                 {"address": "127.0.0.1:2"})
    body = assert_error(reply, 503, "store_unavailable")
    assert "kept changing during 20 attempts" in body["message"]
    assert store.writes == 20
    assert caps == [min(0.25, 0.005 * 2 ** n) for n in range(19)]
    assert sum(caps) < 3.6



def test_a_restore_is_refused_onto_a_store_written_ahead_while_the_loss_was_still_reported(
        store: FileStore, serve_wsgi: Callable[[Any], str]) -> None:
    """The loss this process reported is stale: another balancer restored the store,
    and wrote since, before this process's watcher saw it. The store is ahead of the
    table served: a restore would undo that write (as on a healthy store)."""
    from management.mirror import Mirror

    mirror = Mirror(store)  # not started: its watcher has not seen the writes below
    served = TableData(5, {"web.example.com": WEB})
    mirror.table, mirror.highest = served, served.version
    mirror.problem = "store lost its table (reported before the repair)"
    base = serve_wsgi(create_app(store=store, mirror=mirror))
    other = FileStore(store.path)  # another balancer: its restore, then a write
    other.raise_floor(5)
    other.replace({"web.example.com": WEB})
    assert other.put_host("gone.example.com", GONE) == 7
    body = assert_error(call(base, "POST", "/api/v1/restore"), 409, "nothing_to_restore")
    assert "the store holds version 7, not behind" in body["message"]
    assert store.load() == TableData(7, {"web.example.com": WEB, "gone.example.com": GONE})


# auth -----------------------------------------------------------------------------
def test_a_token_guards_every_route_but_healthz(store: FileStore,
                                                serve_wsgi: Callable[[Any], str]) -> None:
    base = serve_wsgi(create_app(store=store, token=TOKEN))
    for method, path in [("GET", "/api/v1/hosts"), ("PUT", "/api/v1/hosts/a.example.com"),
                         ("GET", "/metrics"), ("GET", "/readyz"), ("GET", "/api/v1/stats"),
                         ("POST", "/api/v1/reload"), ("GET", "/api/v1/info"),
                         ("GET", "/api/v1/nowhere")]:
        reply = call(base, method, path, GONE if method == "PUT" else None)
        assert_error(reply, 401, "unauthorized")
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = call(base, "GET", "/api/v1/hosts", headers={"Authorization": "Bearer nope"})
    assert_error(wrong, 401, "unauthorized")
    assert_error(call(base, "GET", "/api/v1/hosts", headers={"Authorization": f"Basic {TOKEN}"}),
                 401, "unauthorized")
    good = {"Authorization": f"Bearer {TOKEN}"}
    assert call(base, "PUT", "/api/v1/hosts/a.example.com", GONE, headers=good).status == 200
    assert call(base, "GET", "/api/v1/hosts", headers=good).json["version"] == 1
    assert call(base, "GET", "/healthz").json == {"status": "ok"}
    assert call(base, "GET", "/").status == 200  # the dashboard shell carries no data


# data plane -------------------------------------------------------------------------
def test_stats_shapes_follow_the_counters(store: FileStore,
                                          serve_wsgi: Callable[[Any], str]) -> None:
    runtime = CountingRuntime(store)
    host = runtime.counters.host("web.example.com")
    host.open_requests = 3
    host.finish(200, 100, 2000, 0.01)
    host.finish(502, 50, 10, 0.2)
    backend = host.backend("127.0.0.1:9001")
    backend.source, backend.in_flight, backend.failures = ScriptedHealth("down"), 1, 4
    base = serve_wsgi(create_app(store=store, runtime=runtime))
    whole = call(base, "GET", "/api/v1/stats").json
    assert set(whole) >= {"hosts", "open_connections", "routing_version"}
    expected = {"open_requests": 1, "completed_requests": 2, "bytes_received": 150,
                "bytes_sent": 2010, "spinning": 0, "limited": 0,
                "responses": {"1xx": 0, "2xx": 1, "3xx": 0, "4xx": 0, "5xx": 1},
                "latency": {"p50": 0.01, "p95": 0.235, "p99": 0.247},
                "backends": {"127.0.0.1:9001": {
                    "state": "down", "in_flight": 1, "tunnels": 0, "failures": 4,
                    "outcomes": {"success": 0, "connect_error": 0, "tls_error": 0,
                                 "timeout": 0, "error": 0},
                    "latency": {"p50": None, "p95": None, "p99": None}}}}
    assert whole["hosts"]["web.example.com"] == expected
    one = call(base, "GET", "/api/v1/stats/WEB.example.com").json
    assert one == {"host": "web.example.com", **expected}
    assert_error(call(base, "GET", "/api/v1/stats/nobody.example.com"), 404, "not_found")
    call(base, "PUT", "/api/v1/hosts/quiet.example.com", GONE)
    quiet = call(base, "GET", "/api/v1/stats/quiet.example.com").json
    assert quiet["completed_requests"] == 0 and quiet["backends"] == {}


def test_stats_come_in_pages_or_by_host(store: FileStore,
                                        serve_wsgi: Callable[[Any], str]) -> None:
    runtime = CountingRuntime(store)
    keys = [f"app{i:02d}.example.com" for i in range(25)]
    for key in keys:
        runtime.counters.host(key).backend("127.0.0.1:9001")
    runtime.counters.host("app03.example.com").finish(200, 1, 2, 0.01)
    base = serve_wsgi(create_app(store=store, runtime=runtime))
    seen, after = [], ""
    for _ in range(10):  # 25 hosts, 10 a page: 3 pages
        page = call(base, "GET", f"/api/v1/stats?limit=10&after={after}").json
        seen += list(page["hosts"])
        if page["next"] is None:
            break
        after = page["next"]
    assert seen == keys
    first = call(base, "GET", "/api/v1/stats").json  # the first PAGE_LIMIT hosts
    assert list(first["hosts"]) == keys and first["next"] is None
    # an idle host has the shape of a busy one
    assert first["hosts"]["app04.example.com"]["backends"]["127.0.0.1:9001"]["outcomes"] == \
        {"success": 0, "connect_error": 0, "tls_error": 0, "timeout": 0, "error": 0}
    assert first["hosts"]["app03.example.com"]["completed_requests"] == 1
    named = call(base, "GET", "/api/v1/stats?host=APP03.example.com&host=app07.example.com"
                              "&host=nobody.example.com").json
    assert list(named["hosts"]) == ["app03.example.com", "app07.example.com"]
    assert named["next"] is None
    for bad in ("0", "x", "10001"):
        body = assert_error(call(base, "GET", f"/api/v1/stats?limit={bad}"), 400, "bad_request")
        assert body["details"] == [f"limit: must be an integer from 1 to 10000, got {bad!r}"]


def test_reload_info_and_readiness(store: FileStore, serve_wsgi: Callable[[Any], str]) -> None:
    runtime = CountingRuntime(store)
    base = serve_wsgi(create_app(store=store, runtime=runtime))
    store.put_host("web.example.com", WEB)
    assert call(base, "POST", "/api/v1/reload").json == {"version": 1}
    assert runtime.reloads == 1
    assert call(base, "GET", "/api/v1/info").json["workers"] == 1
    assert call(base, "GET", "/readyz").json == {"ready": True, "reasons": []}
    runtime.ready = False
    reply = call(base, "GET", "/readyz")
    assert reply.status == 503
    assert reply.json["reasons"] == ["no routing table loaded yet"]


def test_without_a_runtime_reload_rereads_the_store(base: str, store: FileStore) -> None:
    store.put_host("web.example.com", WEB)
    assert call(base, "POST", "/api/v1/reload").json == {"version": 1}
    info = call(base, "GET", "/api/v1/info").json
    assert info["store"]["kind"] == "file" and info["store"]["version"] == 1
    assert call(base, "GET", "/api/v1/stats").json["hosts"] == {}
    assert call(base, "GET", "/readyz").status == 200


def test_metrics_are_served_as_prometheus_text(base: str) -> None:
    reply = call(base, "GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert reply.headers["Cache-Control"] == "no-store"  # as documented for every answer
    assert b"balancer_store_up 1.0" in reply.body


def test_create_app_alone_reads_the_store_url_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        serve_wsgi: Callable[[Any], str]) -> None:
    path = tmp_path / "env-routes.json"
    monkeypatch.setenv("BALANCER_STORE_URL", f"file:{path}")
    monkeypatch.setenv("BALANCER_MANAGEMENT_TOKEN", TOKEN)
    monkeypatch.delenv("BALANCER_CONFIG", raising=False)
    base = serve_wsgi(create_app())
    assert_error(call(base, "GET", "/api/v1/hosts"), 401, "unauthorized")
    reply = call(base, "PUT", "/api/v1/hosts/a.example.com", GONE,
                 headers={"Authorization": f"Bearer {TOKEN}"})
    assert_error(reply, 415, "unsupported_media_type")  # alone, it keeps the browser rules
    call(base, "PUT", "/api/v1/hosts/a.example.com", GONE,
         headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    assert json.loads(path.read_text())["hosts"] == {"a.example.com": GONE}
    assert_error(call(base, "GET", "/api/v1/hosts", headers={
        "Authorization": f"Bearer {TOKEN}", "Host": "rebind.evil.example"}),
        403, "host_not_allowed")


# dashboard -----------------------------------------------------------------------
def test_dashboard_and_static_files(base: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dashboard_page, "STATIC_DIR", tmp_path / "static")
    index = call(base, "GET", "/")
    assert index.status == 200 and b"/api/v1/hosts" in index.body  # the fallback page
    assert index.headers["Content-Type"].startswith("text/html")
    (tmp_path / "static").mkdir()
    (tmp_path / "static" / "index.html").write_text("<h1>dash</h1>")
    (tmp_path / "static" / "app.js").write_text("let x = 1;")
    (tmp_path / "static" / "style.css").write_text("h1 {}")
    assert call(base, "GET", "/").body == b"<h1>dash</h1>"
    js = call(base, "GET", "/static/app.js")
    assert (js.status, js.body) == (200, b"let x = 1;")
    assert "javascript" in js.headers["Content-Type"]
    assert call(base, "GET", "/static/style.css").headers["Content-Type"].startswith("text/css")
    assert_error(call(base, "GET", "/static/missing.js"), 404, "not_found")
    assert_error(call(base, "GET", "/static/../app.py"), 404, "not_found")
    assert_error(call(base, "GET", "/static/%2e%2e/app.py"), 404, "not_found")


# store outages ------------------------------------------------------------------------
def test_a_dead_redis_answers_503_quickly_and_keeps_the_version(
        redis_factory: Callable[[], RedisServer], serve_wsgi: Callable[[Any], str]) -> None:
    server = redis_factory()
    store = open_store(server.url, "apptest")
    base = serve_wsgi(create_app(store=store))
    assert call(base, "PUT", "/api/v1/hosts/web.example.com", WEB).json == {"version": 1}
    server.stop()
    started = time.monotonic()
    assert_error(call(base, "PUT", "/api/v1/hosts/b.example.com", GONE), 503,
                 "store_unavailable")
    listed = call(base, "GET", "/api/v1/hosts")  # issue 14.8: the served table, with why
    assert listed.status == 200 and listed.json["hosts"] == {"web.example.com": WEB}
    assert "Connection refused" in listed.json["store_problem"]
    assert time.monotonic() - started < 5
    ready = call(base, "GET", "/readyz")
    assert ready.status == 503
    assert any("store unreachable" in r for r in ready.json["reasons"])
    assert call(base, "GET", "/healthz").status == 200
    server.start()
    assert call(base, "GET", "/api/v1/hosts").json == {"version": 1,
                                                       "hosts": {"web.example.com": WEB}}


def test_a_corrupt_file_store_answers_503(base: str, store: FileStore) -> None:
    Path(store.path).write_text("{oops")
    body = assert_error(call(base, "GET", "/api/v1/hosts"), 503, "store_corrupt")
    assert store.path in body["message"]
    assert call(base, "PUT", "/api/v1/hosts", {"hosts": {}}).json == {"version": 1}


def test_the_routes_compile_no_url_builder_until_one_builds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """werkzeug compiles two URL builders per rule as it is added to a map (code
    generated and compiled: a fifth of the management process's start-up CPU);
    the API's routes (`management.http.Route`) compile them only when a URL is
    built, and build the same URLs."""
    from werkzeug.routing import Map, Rule

    from management.app import URL_MAP
    from management.http import Route

    compiled = []
    original = Rule._compile_builder

    def counted(rule: Rule, append_unknown: bool = True) -> Any:
        compiled.append(rule.rule)
        return original(rule, append_unknown)

    monkeypatch.setattr(Rule, "_compile_builder", counted)
    routes = Map([Route(rule.rule, endpoint=rule.endpoint, methods=rule.methods)
                  for rule in URL_MAP.iter_rules()])
    assert compiled == []
    urls = routes.bind("h.test")
    assert urls.match("/api/v1/hosts/a.test", "GET") == ("get_host", {"host": "a.test"})
    assert urls.build("get_host", {"host": "a.test", "q": "1"}) == "/api/v1/hosts/a.test?q=1"
    assert compiled == ["/api/v1/hosts/<host>"]  # (the one built, once)
    assert urls.build("get_host", {"host": "b.test"}) == "/api/v1/hosts/b.test"
    assert compiled == ["/api/v1/hosts/<host>"]
