"""`balancerctl` run as a subprocess against a live management app."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from balancer.stores.file import FileStore
from loadtest.procs import HeldPort
from management.app import create_app
from management.ctl import main as ctl_main
from management.ctl import parse_fields
from tests.support import Balancer

REPO = Path(__file__).resolve().parent.parent
TOKEN = "ctl-token"


def ctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in ("BALANCER_URL",
                                                                  "BALANCER_TOKEN")}
    full_env["PYTHONPATH"] = str(REPO)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "management.ctl", *args], cwd=REPO,
                          env=full_env, capture_output=True, text=True, timeout=30)


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    done = ctl(*args, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


def fails(*args: str, env: dict[str, str] | None = None, code: int = 1) -> str:
    """The one stderr line of a run failing with exit status `code` (2: usage)."""
    done = ctl(*args, env=env)
    assert done.returncode == code, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("balancerctl: ")
    assert done.stdout == ""
    return lines[0]


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(str(tmp_path / "routes.json"))


@pytest.fixture
def url(store: FileStore, serve_wsgi: Callable[[Any], str]) -> str:
    return serve_wsgi(create_app(store=store, token=TOKEN))


@pytest.fixture
def env(url: str) -> dict[str, str]:
    return {"BALANCER_URL": url, "BALANCER_TOKEN": TOKEN}


def test_set_list_get_delete(env: dict[str, str], store: FileStore) -> None:
    out = ok("set", "web.example.com", "proxy", "--backend", "127.0.0.1:9001",
             "--backend", "[::1]:9002", "algorithm=least_connections", "retries=1",
             "health.path=/up", env=env)
    assert "version 1" in out
    assert store.load().hosts["web.example.com"] == {
        "action": "proxy", "backends": ["127.0.0.1:9001", "[::1]:9002"],
        "algorithm": "least_connections", "retries": 1, "health": {"path": "/up"}}
    ok("set", "old.example.com", "static", "page=maintenance", env=env)
    listing = ok("list", env=env)
    assert listing.splitlines()[0].split() == ["HOST", "ACTION", "TARGET"]
    assert "web.example.com" in listing and "least_connections" in listing
    assert "old.example.com  static" in listing and "version 2, 2 host(s)" in listing
    shown = ok("get", "web.example.com", env=env)
    assert "127.0.0.1:9001, [::1]:9002" in shown and "version" in shown
    assert "deleted" in ok("delete", "old.example.com", env=env)
    assert set(store.load().hosts) == {"web.example.com"}


def test_json_output_is_the_api_answer(env: dict[str, str]) -> None:
    ok("set", "a.example.com", "empty", "status=204", env=env)
    assert json.loads(ok("--json", "list", env=env)) == {
        "version": 1, "hosts": {"a.example.com": {"action": "empty", "status": 204}}}
    assert json.loads(ok("get", "a.example.com", "--json", env=env))["version"] == 1
    assert json.loads(ok("reload", "--json", env=env)) == {"version": 1}


def test_backends_and_reload(env: dict[str, str], store: FileStore) -> None:
    ok("set", "web.example.com", "proxy", "--backend", "127.0.0.1:9001", env=env)
    assert "added" in ok("add-backend", "web.example.com", "[::1]:9002", "--weight", "4",
                         env=env)
    assert store.load().hosts["web.example.com"]["backends"][1] == {"address": "[::1]:9002",
                                                                    "weight": 4}
    ok("remove-backend", "web.example.com", "[::1]:9002", env=env)
    assert store.load().hosts["web.example.com"]["backends"] == ["127.0.0.1:9001"]
    assert ok("reload", env=env).strip() == "reloaded: version 3"


def test_stats_reads_every_page() -> None:
    from urllib.parse import parse_qs, urlsplit

    from management.ctl import STATS_PAGE, every_stats_page

    class Pages:
        """The API's answers for 3 pages of hosts "a", "b", "c"."""

        def __init__(self) -> None:
            self.asked: list[str] = []
            self.url, self.received = "http://fake", 0

        def call(self, method: str, path: str) -> dict[str, Any]:
            query = parse_qs(urlsplit(path).query)
            assert method == "GET" and query["limit"] == [str(STATS_PAGE)]
            after = query.get("after", [""])[0]
            self.asked.append(after)
            following = {"": "a", "a": "b", "b": "c"}[after]
            return {"routing_version": 1, "hosts": {following: {"completed_requests": 1}},
                    "next": following if following != "c" else None}

    client = Pages()
    answer = every_stats_page(client)
    assert client.asked == ["", "a", "b"]
    assert list(answer["hosts"]) == ["a", "b", "c"] and answer["next"] is None


def test_stats(env: dict[str, str]) -> None:
    assert ok("stats", env=env).strip() == "no traffic yet"
    ok("set", "web.example.com", "empty", "status=204", env=env)
    out = ok("stats", "web.example.com", env=env)
    assert out.splitlines()[0].split()[:3] == ["HOST", "OPEN", "DONE"]
    assert json.loads(ok("--json", "stats", env=env))["hosts"] == {}


def test_flags_override_the_environment(url: str) -> None:
    assert "no hosts" in ok("--url", url, "--token", TOKEN, "list",
                            env={"BALANCER_URL": "http://127.0.0.1:1"})


def test_error_exits(url: str, env: dict[str, str]) -> None:
    line = fails("set", "web.example.com", "proxy", "--backend", "nope", "retries=-1",
                 env=env)
    assert "400 invalid_rule" in line and "backends[0]" in line and "retries" in line
    assert "404 not_found" in fails("get", "nobody.example.com", env=env)
    assert "404 not_found" in fails("delete", "nobody.example.com", env=env)
    for line in (fails("list", env={"BALANCER_URL": url}),
                 fails("--token", "wrong", "list", env=env)):
        assert "401 unauthorized" in line and "--token or BALANCER_TOKEN" in line, line
    with HeldPort() as nobody:  # connections refused
        line = fails("list", env={"BALANCER_URL": f"http://{nobody.address}"})
    assert f"cannot reach http://{nobody.address}" in line and "refused" in line
    assert "is `balancer serve` running?" in line and "BALANCER_URL" in line
    assert "invalid choice" in fails("set", "a.example.com", "teleport", env=env, code=2)
    assert "invalid choice" in fails("frobnicate", env=env, code=2)
    assert "expected http://HOST:PORT" in fails("--url", "nonsense", "list", code=2)
    assert "a query, a fragment" in fails("--url", "http://127.0.0.1:1/?x=1", "list", code=2)


@pytest.mark.parametrize(("argv", "named"), [
    (["set", "a.example.com", "empty", "status"], "expected key=value, got 'status'"),
    (["set", "a.example.com", "proxy", "--backend", "127.0.0.1:1", "retries"],
     "expected key=value, got 'retries'"),
    (["set", "a.example.com", "empty", "=204"], "expected key=value, got '=204'"),
    (["set", "a.example.com", "empty", "colour=red"], "colour: unknown key for action 'empty'"),
    (["set", "a.example.com", "spin", "status=204"], "status: unknown key for action 'spin'"),
    (["set", "a.example.com", "proxy", "health.colour=1"], "health.colour: unknown key of health"),
    (["set", "a.example.com", "proxy", "health..path=/"], "health..path: a dotted key needs"),
    (["set", "a.example.com", "spin", "timeout.x=1"], "timeout.x: timeout has no keys"),
    (["set", "a.example.com", "proxy", "health=1", "health.path=/"],
     "health is both a value and an object"),
    (["top", "--window", "inf"], "argument --window: expected a finite number, got 'inf'"),
    (["top", "--limit", "ten"], "argument --limit: invalid int value: 'ten'"),
    (["inflight", "--min-age", "nan"], "argument --min-age: expected a finite number"),
    (["deploy", "a.example.com", "--backend", "127.0.0.1:1", "--warmup", "nan"],
     "argument --warmup: expected a finite number, got 'nan'"),
    (["add-backend", "a.example.com", "127.0.0.1:1", "--weight", "x"],
     "argument --weight: invalid int value: 'x'"),
])
def test_usage_errors_exit_2_naming_the_problem_and_send_nothing(
        argv: list[str], named: str, env: dict[str, str], store: FileStore,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """Run in this process: `main`'s status, which `python -m management.ctl` exits
    with (a run as a process costs ~0.45 CPU-s, mostly imports; `test_error_exits`
    checks a process's exit 2)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        code = ctl_main(argv)
    except SystemExit as exc:  # (argparse's own refusals exit)
        code = exc.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert (code, out, len(lines)) == (2, "", 1), (code, out, err)
    assert lines[0].startswith("balancerctl: ")
    assert named in lines[0] and lines[0].endswith("--help)"), lines[0]
    assert store.load().hosts == {}  # the API never saw a request


def test_an_api_refusal_keeps_exit_1(env: dict[str, str]) -> None:
    line = fails("set", "a.example.com", "empty", "status=teapot", env=env)
    assert "400 invalid_rule" in line and "status" in line


def test_values_parse_as_json_when_they_can() -> None:
    assert parse_fields(["status=503", "keep_path=true", "to=https://x", "body=<h1>hi</h1>",
                         "health.rise=2", "health.path=/up", "name=\"quoted\""]) == {
        "status": 503, "keep_path": True, "to": "https://x", "body": "<h1>hi</h1>",
        "health": {"rise": 2, "path": "/up"}, "name": "quoted"}


def test_help_describes_positional_arguments() -> None:
    top = ok("--help")
    for command in ("list", "get", "set", "delete", "add-backend", "remove-backend", "stats",
                    "reload"):
        assert command in top
    assert "HOST is a routing-table key" in top and "ADDR is host:port" in top
    assert "not on the proxy port" in top
    for command, positionals in (("get", ["HOST"]), ("delete", ["HOST"]),
                                 ("add-backend", ["HOST", "ADDR"]),
                                 ("remove-backend", ["HOST", "ADDR"]), ("stats", ["HOST"]),
                                 ("set", ["HOST", "ACTION", "key=value"])):
        text = ok(command, "--help")
        section = text.split("positional arguments:")[1].split("options:")[0]
        for name in positionals:
            line = next(ln for ln in section.splitlines() if ln.strip().startswith(name))
            assert len(line.split()) > 1, f"{command} {name} has no description"


def test_set_help_lists_every_key_of_every_action() -> None:
    from balancer.rules import ACTION_KEYS, ACTIONS, COMMON_KEYS, HEALTH_KEYS

    text = ok("set", "--help")
    epilog = text.split("actions and their keys:")[1]
    blocks = dict(re.findall(r"^  (\w+): .*\n((?:    .*\n)+)", epilog, re.M))
    assert set(blocks) == set(ACTIONS)
    for action in ACTIONS:
        lines = [line for line in blocks[action].splitlines() if not line.startswith(" " * 20)]
        assert {line.split()[0] for line in lines} == ACTION_KEYS[action] - {"action",
                                                                            "subdomains"}, action
        assert all(len(line.split()) > 1 for line in lines), f"{action}: a key has no help"
    for key in COMMON_KEYS - {"action"}:
        assert f" {key}=" in epilog or f" {key}." in epilog, key
    assert all(f"health.{key}=" in text for key in HEALTH_KEYS)


def test_a_redirect_without_to_says_it_is_required(env: dict[str, str]) -> None:
    line = fails("set", "old.example.com", "redirect", "status=301", env=env)
    assert "to: required for action 'redirect'" in line and "None" not in line


def test_url_of_the_proxy_gets_a_hint(tmp_path: Path) -> None:
    balancer = Balancer(tmp_path)
    try:
        for version, routes in enumerate(({}, {"*": {"action": "static", "body": "<p>hi</p>"}}),
                                         start=1):
            balancer.write_routes(routes, version)
            balancer.wait_version(version)  # the proxy answers 503 no-hosts, then 200
            proxy = f"http://127.0.0.1:{balancer.port}"
            line = fails("list", env={"BALANCER_URL": proxy})
            assert f"{proxy} answered" in line and "text/html" in line
            assert "this looks like the proxy" in line and "[management] listen" in line
        managed = f"http://127.0.0.1:{balancer.mport}"
        assert "version" in ok("list", env={"BALANCER_URL": managed})
    finally:
        balancer.stop()

