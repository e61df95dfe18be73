"""Hostile input at every edge: numbers that are not finite, text bound for a
header, deep or broken JSON bodies, and bad settings from TOML and env."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from balancer.rules import validate_rule
from balancer.settings import SETTINGS, SettingsError, load_settings
from balancer.settings_kinds import Integer, Number
from balancer.stores import CorruptStore
from balancer.stores.file import FileStore
from management.app import URL_MAP, create_app
from tests.support import Balancer, raw_exchange, request, split_responses, wait_for

REPO = Path(__file__).resolve().parent.parent
NOT_FINITE = (float("nan"), float("inf"), float("-inf"))


# rules --------------------------------------------------------------------------
NUMERIC_FIELDS = [
    ({"action": "spin"}, "timeout"),
    ({"action": "proxy", "backends": ["127.0.0.1:1"]}, "spin_when_down"),
    ({"action": "proxy", "backends": ["127.0.0.1:1"]}, "retry_timeout"),
    ({"action": "proxy", "backends": ["127.0.0.1:1"]}, "retries"),
    ({"action": "proxy", "backends": ["127.0.0.1:1"]}, "max_body_bytes"),
    ({"action": "static", "body": "x"}, "status"),
    ({"action": "empty"}, "status"),
    ({"action": "redirect", "to": "/x"}, "status"),
]


@pytest.mark.parametrize("base,key", NUMERIC_FIELDS)
@pytest.mark.parametrize("value", NOT_FINITE)
def test_no_numeric_rule_field_takes_nan_or_infinity(base: dict[str, Any], key: str,
                                                     value: float) -> None:
    problems = validate_rule({**base, key: value})
    assert any(p.startswith(f"{key}:") for p in problems), problems


@pytest.mark.parametrize("key", ["interval", "timeout", "rise", "fall"])
@pytest.mark.parametrize("value", NOT_FINITE)
def test_health_numbers_are_finite(key: str, value: float) -> None:
    rule = {"action": "proxy", "backends": ["127.0.0.1:1"], "health": {key: value}}
    assert any(p.startswith(f"health.{key}:") for p in validate_rule(rule))
    backend = {"action": "proxy", "backends": [{"address": "127.0.0.1:1", "weight": value}]}
    assert validate_rule(backend)


@pytest.mark.parametrize("key,low,below", [("interval", 0.1, [1e-9, 0.09]),
                                           ("timeout", 0.01, [1e-9, 0.009])])
def test_health_interval_and_timeout_have_a_floor(key: str, low: float,
                                                  below: list[float]) -> None:
    """Bug: health.interval 1e-9 was accepted; every worker then checked back to back."""
    for value in [*below, 0, -1, True, False, "1", None, [], 3601]:
        rule = {"action": "proxy", "backends": ["127.0.0.1:1"], "health": {key: value}}
        assert validate_rule(rule) == [f"health.{key}: must be a finite number from {low:g} "
                                       f"to 3600 seconds, got {value!r}"]
    for value in (low, 1, 3600):
        assert validate_rule({"action": "proxy", "backends": ["127.0.0.1:1"],
                              "health": {key: value}}) == []
    # a timeout longer than the interval is fine: checks never overlap
    assert validate_rule({"action": "proxy", "backends": ["127.0.0.1:1"],
                          "health": {"interval": 0.1, "timeout": 5}}) == []


HEADER_FIELDS = [
    ({"action": "redirect"}, "to", "Location header"),
    ({"action": "static", "body": "x"}, "content_type", "Content-Type header"),
]


@pytest.mark.parametrize("base,key,where", HEADER_FIELDS)
@pytest.mark.parametrize("bad", ["\x01", "\x0b", "\x7f", "\x00", "\r", "\n", "é", "\u2028",
                                 "\ud800"])
def test_header_fields_take_visible_ascii_only(base: dict[str, Any], key: str, where: str,
                                               bad: str) -> None:
    problems = validate_rule({**base, key: f"/a{bad}b" if key == "to" else f"text/plain{bad}"})
    assert len(problems) == 1 and problems[0].startswith(f"{key}: goes into the {where}")


def test_the_message_says_which_field_and_how_to_fix_it() -> None:
    [problem] = validate_rule({"action": "redirect", "to": "https://example.com/café"})
    assert problem.startswith("to: goes into the Location header")
    assert "percent-encode" in problem and "'https://example.com/café'" in problem
    assert validate_rule({"action": "redirect", "to": "https://example.com/caf%C3%A9"}) == []
    assert validate_rule({"action": "redirect", "to": "/a b"})  # no spaces in a URL
    assert validate_rule({"action": "static", "body": "x",
                          "content_type": "text/plain; charset=utf-8"}) == []
    [problem] = validate_rule({"action": "proxy", "backends": ["127.0.0.1:1"],
                               "health": {"path": "/héalth"}})
    assert problem.startswith("health.path: goes into the health check's request line")


def test_a_body_is_any_text_that_encodes() -> None:
    assert validate_rule({"action": "static", "body": "<h1>Zurück \x01\x7f ✓</h1>\r\n"}) == []
    [problem] = validate_rule({"action": "static", "body": "lone \ud800 surrogate"})
    assert problem.startswith("body: must be text that encodes as UTF-8")


def test_a_stored_nan_is_a_corrupt_store(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    path.write_text('{"version": 3, "hosts": {"a.test": {"action": "spin", "timeout": NaN}}}')
    with pytest.raises(CorruptStore, match="timeout: must be a finite number"):
        FileStore(str(path)).load()


# settings -----------------------------------------------------------------------
NUMERIC_SETTINGS = [s for s in SETTINGS if isinstance(s.kind, Number | Integer)]


@pytest.mark.parametrize("setting", NUMERIC_SETTINGS, ids=lambda s: s.name)
@pytest.mark.parametrize("text", ["NaN", "nan", "inf", "-Infinity", "1e999"])
def test_env_settings_refuse_non_finite_numbers(setting: Any, text: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(env={setting.env: text})
    [problem] = caught.value.problems
    assert problem.startswith(f"{setting.name} ({setting.env}): must be")


@pytest.mark.parametrize("setting", NUMERIC_SETTINGS, ids=lambda s: s.name)
@pytest.mark.parametrize("toml", ["nan", "inf", "-inf", "+nan"])
def test_toml_settings_refuse_non_finite_numbers(tmp_path: Path, setting: Any,
                                                 toml: str) -> None:
    path = tmp_path / "balancer.toml"
    path.write_text(f"[{setting.section}]\n{setting.key} = {toml}\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(env={}, config_path=str(path))
    [problem] = caught.value.problems
    assert problem.startswith(f"{setting.name} ({path}): must be")


def test_balancer_serve_exits_2_naming_a_nan_setting(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")}
    env.update(PYTHONPATH=str(REPO), BALANCER_TIMEOUTS_GRACEFUL="NaN")
    done = subprocess.run([sys.executable, "-m", "balancer", "serve", "--listen", "127.0.0.1:0",
                           "--management", "127.0.0.1:0", "--store", f"file:{tmp_path}/r.json"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "timeouts.graceful (BALANCER_TIMEOUTS_GRACEFUL): must be a number > 0, got 'NaN'" \
        in done.stderr


def test_balancer_serve_exits_2_naming_an_integer_too_large(tmp_path: Path) -> None:
    """Bug: limits.max_headers = 10**20 was taken and every request answered 400;
    server.workers = 100000 failed naming server.listen ("Too many open files")."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")}
    env.update(PYTHONPATH=str(REPO), BALANCER_LIMITS_MAX_HEADERS=str(10**20))
    done = subprocess.run([sys.executable, "-m", "balancer", "serve", "--listen", "127.0.0.1:0",
                           "--management", "127.0.0.1:0", "--store", f"file:{tmp_path}/r.json",
                           "--workers", "100000"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"balancer: limits.max_headers (BALANCER_LIMITS_MAX_HEADERS): must be an integer "
        f"from 1 to 2147483647, got '{10**20}'",
        "balancer: server.workers (--workers): must be an integer from 0 to 1024, "
        "got '100000'"]


# the management API ---------------------------------------------------------------
HOSTILE_BODIES: list[bytes] = [
    b"", b" ", b"\x00", b"\xff\xfe\x00", b"null", b"true", b"0", b"-1", b'"x"', b"[]", b"{}",
    b"[" * 100_000, b"{\"a\":" * 50_000, b"[" * 33 + b"]" * 33, b'{"a": NaN}', b"[Infinity]",
    b"-Infinity", b"[1e999]", b"[" + b"9" * 5000 + b"]", b'"\\ud800"', b'{"action": "\\ud800"}',
    b'{"action": "spin", "timeout": NaN}', b'{"action": "spin", "timeout": 1e999}',
    b'{"action": "static", "body": "\\ud800"}',
    b'{"action": "redirect", "to": "/\\u0001"}', b'{"action": "static", "body": "x", '
    b'"content_type": "a\\u000bb"}', b'{"action": "proxy", "backends": [[[[[]]]]]}',
    b'{"action": "proxy", "backends": ["127.0.0.1:1"], "health": {"path": "/\\u00e9"}}',
    b'{"hosts": {"a.test": {"action": "spin", "timeout": NaN}}}', b'{"hosts": []}',
    b'{"hosts": {"\\ud800": {"action": "empty", "status": 204}}}',
    b'{"address": NaN}', b'{"address": "127.0.0.1:1", "weight": 1e999}',
    b'{"address": "127.0.0.1:1", "weight": NaN}', b'{"address": ["x"]}', b'{"address": {}}',
    b'"127.0.0.1:1"', b'{"address": "127.0.0.1:1", "weight": true}',
    b'{"action": "static", "page": ["x"]}', b'{"action": "static", "page": {}}',
    b'{"hosts": {"a.test": {"action": "static", "page": ["unknown"]}}}',
    b'{"a": "' + b"\\\"" * 40_000 + b'"}', b'"' + b'\\"' * 40_000,
]


def _write_routes() -> list[tuple[str, str]]:
    """Every (method, path) of the API that takes a body, from its URL map."""
    out = []
    for rule in URL_MAP.iter_rules():
        for method in sorted((rule.methods or set()) & {"PUT", "POST", "DELETE", "PATCH"}):
            path = rule.rule.replace("<host>", "web.test").replace("<address>", "127.0.0.1:1")
            out.append((method, path.replace("<path:name>", "x")))
    return out


def test_no_bad_body_gets_a_500_on_any_write_route(tmp_path: Path,
                                                   serve_wsgi: Callable[[Any], str]) -> None:
    store = FileStore(str(tmp_path / "routes.json"))
    web = {"action": "proxy", "backends": ["127.0.0.1:1", "127.0.0.1:2"]}
    parts = urlsplit(serve_wsgi(create_app(store=store)))
    routes = _write_routes()
    assert len(routes) >= 5, routes
    for method, path in routes:
        for body in HOSTILE_BODIES:
            store.put_host("web.test", web)  # every body meets an existing host
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
            reply = conn.getresponse()
            raw = reply.read()
            conn.close()
            assert reply.status < 500, (method, path, body[:60], reply.status, raw[:300])
            assert isinstance(json.loads(raw), dict)  # every answer is JSON
            listed = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            listed.request("GET", "/api/v1/hosts")
            status = listed.getresponse().status
            listed.close()
            assert status == 200, (method, path, body[:60])


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"action": "spin", "timeout": NaN}',
                                  b'{"action": "spin", "timeout": 1e999}'],
                         ids=["deep", "nan", "1e999"])
def test_deep_and_non_finite_json_is_invalid_json(tmp_path: Path, body: bytes,
                                                  serve_wsgi: Callable[[Any], str]) -> None:
    parts = urlsplit(serve_wsgi(create_app(store=FileStore(str(tmp_path / "r.json")))))
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("PUT", "/api/v1/hosts/x.test", body=body,
                 headers={"Content-Type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 400
    assert json.loads(reply.read())["error"] == "invalid_json"


def test_every_problem_of_one_backend_entry_is_listed(
        tmp_path: Path, serve_wsgi: Callable[[Any], str]) -> None:
    """SPEC §3: invalid rules are refused with every problem listed (bug: a backend
    object stopped at its first problem)."""
    parts = urlsplit(serve_wsgi(create_app(store=FileStore(str(tmp_path / "r.json")))))
    rule = {"action": "proxy", "backends": [
        {"address": "nohost", "weight": 0, "colour": "red"}, {"address": 7, "weight": 1.5}]}
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    conn.request("PUT", "/api/v1/hosts/x.test", body=json.dumps(rule),
                 headers={"Content-Type": "application/json"})
    reply = conn.getresponse()
    body = json.loads(reply.read())
    assert (reply.status, body["error"]) == (400, "invalid_rule")
    details = body["details"]
    assert [d.partition(":")[0] for d in details] == [
        "backends[0].colour", "backends[0].weight", "backends[0]",
        "backends[1].weight", "backends[1].address"], details
    assert "nohost" in details[2]


# balancerctl ------------------------------------------------------------------------
def ctl(url: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")}
    env.update(PYTHONPATH=str(REPO), BALANCER_URL=url)
    return subprocess.run([sys.executable, "-m", "management.ctl", *args], env=env,
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("field", ["timeout=NaN", "timeout=Infinity", "timeout=-Infinity",
                                   "timeout=1e999"])
def test_ctl_set_with_a_non_finite_number_fails_with_the_reason(
        tmp_path: Path, serve_wsgi: Callable[[Any], str], field: str) -> None:
    store = FileStore(str(tmp_path / "routes.json"))
    url = serve_wsgi(create_app(store=store))
    done = ctl(url, "set", "x.test", "spin", field)
    assert done.returncode == 1, done
    assert done.stderr.startswith("balancerctl: 400 invalid_rule")
    assert "timeout: must be a finite number > 0" in done.stderr
    assert store.load().version == 0
    listed = ctl(url, "list")
    assert listed.returncode == 0 and "no hosts" in listed.stdout


def test_ctl_get_escapes_control_characters_of_a_body(tmp_path: Path,
                                                      serve_wsgi: Callable[[Any], str]) -> None:
    store = FileStore(str(tmp_path / "routes.json"))
    store.put_host("x.test", {"action": "static", "body": "\x1b]0;owned\x07<h1>hi</h1>"})
    done = ctl(serve_wsgi(create_app(store=store)), "get", "x.test")
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout and "\\u001b]0;owned\\u0007<h1>hi</h1>" in done.stdout


# the data plane ---------------------------------------------------------------------
def test_a_static_body_goes_out_whole_with_its_byte_length(tmp_path: Path) -> None:
    body = "<h1>Zurück ✓</h1>\r\n\r\nHTTP/1.1 200 OK\r\n\x00"
    hosts = {"s.test": {"action": "static", "status": 503, "body": body,
                        "content_type": "text/html; charset=utf-8"},
             "r.test": {"action": "redirect", "to": "https://example.com/caf%C3%A9"}}
    balancer = Balancer(tmp_path, hosts)
    try:
        raw = raw_exchange(balancer.port, b"GET / HTTP/1.1\r\nHost: s.test\r\n\r\n"
                           b"GET / HTTP/1.1\r\nHost: r.test\r\nConnection: close\r\n\r\n")
        [(status, headers, got), (moved, where, _)] = split_responses(raw)
        assert status == 503 and got == body.encode()
        assert int(headers["content-length"]) == len(body.encode())
        assert moved == 302 and where["location"] == "https://example.com/caf%C3%A9"
        status, _, _ = request(balancer.port, host="s.test", method="HEAD")
        assert status == 503
    finally:
        balancer.stop()


def test_a_205_goes_out_without_content_and_a_path_kept_stays_a_path(tmp_path: Path) -> None:
    """A static 205 sends Content-Length: 0 and not its body (RFC 9110 §15.3.6:
    the next response on the connection is read where it starts); a redirect to
    "/" keeping the path never turns a target "//host/x" into another host; an
    ``OPTIONS *`` has no path to keep (it got "https://example.com*")."""
    hosts = {"s.test": {"action": "static", "status": 205, "body": "HTTP/1.1 200 OK\r\n\r\n"},
             "r.test": {"action": "redirect", "to": "/", "keep_path": True},
             "o.test": {"action": "redirect", "to": "https://example.com/", "keep_path": True}}
    balancer = Balancer(tmp_path, hosts)
    try:
        raw = raw_exchange(balancer.port, b"GET / HTTP/1.1\r\nHost: s.test\r\n\r\n"
                           b"GET //evil.example/x?q HTTP/1.1\r\nHost: r.test\r\n\r\n"
                           b"OPTIONS * HTTP/1.1\r\nHost: o.test\r\n\r\n"
                           b"OPTIONS * HTTP/1.1\r\nHost: r.test\r\n"
                           b"Connection: close\r\n\r\n")
        [(status, headers, got), (moved, where, _), (star, there, _), (root, here, _)] = \
            split_responses(raw)
        assert status == 205 and headers["content-length"] == "0" and got == b""
        assert moved == 302 and where["location"] == "/evil.example/x?q"
        assert (star, there["location"]) == (302, "https://example.com/")
        assert (root, here["location"]) == (302, "/")
    finally:
        balancer.stop()



REDIRECTS_REFUSED = ["javascript:alert(1)", "JavaScript:alert(1)", "data:text/html,<script>",
                     "vbscript:x", "ftp://example.com/", "example.com:8080/x", "http:/x",
                     "https://", "http:///x"]


@pytest.mark.parametrize("to", REDIRECTS_REFUSED)
def test_a_redirect_to_another_scheme_or_no_host_is_refused(to: str) -> None:
    """Bug: ``javascript:`` and ``data:`` targets were taken and sent as the Location."""
    [problem] = validate_rule({"action": "redirect", "to": to})
    assert problem.startswith("to: ") and repr(to) in problem


@pytest.mark.parametrize("to", ["https://example.com", "HTTP://example.com:8080/x?y#z",
                                "/moved", "../up", "moved", "?page=2", "//example.com/x"])
def test_a_redirect_to_http_https_or_a_relative_reference_is_taken(to: str) -> None:
    assert validate_rule({"action": "redirect", "to": to}) == []


def test_a_stored_redirect_to_javascript_is_an_invalid_table(tmp_path: Path) -> None:
    """Through the API a 400 naming the field; in the routes file (an older version's,
    or edited by hand) the table is invalid: reported, the last good table served."""
    good = {"r.test": {"action": "redirect", "to": "/moved"}}
    balancer = Balancer(tmp_path, good)
    try:
        status, answer = balancer.api("PUT", "/api/v1/hosts/r.test",
                                      {"action": "redirect", "to": "javascript:alert(1)"})
        assert (status, answer["error"]) == (400, "invalid_rule"), answer
        assert "the scheme 'javascript' is not allowed" in answer["details"][0]
        balancer.write_routes({"r.test": {"action": "redirect", "to": "javascript:alert(1)"}})
        wait_for(lambda: "the scheme 'javascript' is not allowed" in balancer.store_problem(),
                 what="the stored rule reported")
        status, headers, _ = request(balancer.port, host="r.test")
        assert (status, headers["location"]) == (302, "/moved")  # the last good table
        balancer.write_routes(good)
        wait_for(lambda: balancer.store_problem() == "", what="the repair seen")
        # (bug: a page that is a list raised TypeError: the file's watcher ended)
        balancer.write_routes({"r.test": {"action": "static", "page": ["unknown"]}})
        wait_for(lambda: "page: must be one of" in balancer.store_problem(),
                 what="the page reported")
        balancer.write_routes({"r.test": {"action": "redirect", "to": "https://x.test/"}})
        wait_for(lambda: request(balancer.port, host="r.test")[1].get("location")
                 == "https://x.test/", what="the file followed after it")
    finally:
        balancer.stop()
