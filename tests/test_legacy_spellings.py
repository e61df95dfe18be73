"""A table stored before 2026-12-07 may hold a backend in a short IPv4 spelling
(``0x7f.1:P``: then a host name, now refused in writes). An upgraded balancer
serves it, spelled in full, and the other hosts with it (bug: the whole table was
refused as corrupt, and a balancer started on it served only `no-hosts`)."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from balancer.addr import full_spelling
from balancer.rules import validate_table
from balancer.stores import open_store
from balancer.stores.floors import raise_rule
from tests.support import Backend, Balancer, request, wait_for


def short(address: str) -> str:
    """`127.0.0.1:P` spelled as inet_aton reads it too: ``0x7f.1:P``."""
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1"
    return f"0x7f.1:{port}"


def hosts_with_short(a: Backend, b: Backend) -> dict[str, Any]:
    return {"app.test": {"action": "proxy", "backends": [a.address]},
            "old.test": {"action": "proxy", "backends": [short(b.address)]}}


def served(bal: Balancer, host: str) -> int:
    return request(bal.port, host=host)[0]


def serving(bal: Balancer) -> None:
    """`check_serves`, then `bal` stopped."""
    try:
        check_serves(bal)
    finally:
        bal.stop()


def check_serves(bal: Balancer) -> None:
    wait_for(lambda: served(bal, "app.test") == 200, what="app.test served")
    assert served(bal, "old.test") == 200
    status, info = bal.api("GET", "/api/v1/info")
    assert status == 200
    raised = info["store"]["raised"]
    assert [(r["host"], r["field"]) for r in raised] == [("old.test", "backends[0]")], raised
    assert info["store"]["problem"] is None, info["store"]
    status, body = bal.api("GET", "/api/v1/hosts/old.test")
    assert status == 200, body
    assert body["rule"]["backends"] == [raised[0]["used"]], body
    line = ("1 stored backend address(es) an earlier version took and the API refuses "
            "(a short IPv4 spelling, one server listed twice), used as: "
            f"old.test backends[0] {raised[0]['stored']!r} -> {raised[0]['used']!r}")
    wait_for(lambda: line in bal.output(), what="the log line")  # (logs are written off-loop)


def test_a_file_store_with_a_short_spelling_still_serves(tmp_path: Path, a: Backend,
                                                         b: Backend) -> None:
    serving(Balancer(tmp_path, hosts_with_short(a, b)))


def test_a_redis_store_with_a_short_spelling_still_serves(
        tmp_path: Path, redis_server: Any, a: Backend, b: Backend) -> None:
    namespace = f"short-{uuid.uuid4().hex[:8]}"
    client = redis_server.client()
    hosts = hosts_with_short(a, b)
    client.hset(f"{namespace}:hosts", mapping={h: json.dumps(r) for h, r in hosts.items()})
    client.set(f"{namespace}:version", "3")
    try:
        serving(Balancer(tmp_path, store=redis_server.url,
                         config=f'[store]\nnamespace = "{namespace}"\n'))
    finally:
        client.delete(f"{namespace}:hosts", f"{namespace}:version")


@pytest.mark.parametrize("text, full", [
    ("0x7f.1:80", "127.0.0.1:80"), ("0x7f000001:80", "127.0.0.1:80"),
    ("https://0x7f.1:8443", "https://127.0.0.1:8443"), ("https://0x10", "https://0.0.0.16"),
    ("0X7F.1:80", "127.0.0.1:80"), ("127.1:80", None), ("127.0.0.1:80", None),
    ("app.test:80", None), ("[::1]:80", None), (80, None),
    ("https://app.test", None)])
def test_full_spelling(text: object, full: str | None) -> None:
    assert full_spelling(text) == full


def test_every_backend_list_of_a_rule_is_spelled_in_full() -> None:
    rule: dict[str, Any] = {
        "action": "proxy", "backends": [{"address": "0x7f.1:81", "weight": 2}, "a.test:80"],
        "draining": {"backends": ["0x7f.2:82"], "since": 1.0, "warmup": 0}}
    used, raised = raise_rule("h.test", rule)
    assert used["backends"] == [{"address": "127.0.0.1:81", "weight": 2}, "a.test:80"]
    assert used["draining"]["backends"] == ["127.0.0.2:82"]
    assert [(r.field, r.stored, r.used) for r in raised] == [
        ("backends[0]", "0x7f.1:81", "127.0.0.1:81"),
        ("draining.backends[0]", "0x7f.2:82", "127.0.0.2:82")]
    assert rule["backends"][0] == {"address": "0x7f.1:81", "weight": 2}  # (a copy)
    assert not validate_table({"h.test": used}, key_form=True)


def test_one_server_listed_twice_is_merged_with_both_weights() -> None:
    """Earlier versions compared backends as written: a stored list may hold one
    server twice (``LOCALHOST:1`` beside ``localhost:1``), which the API now refuses
    (`backend_identity`); loaded as one entry holding both shares."""
    rule: dict[str, Any] = {"action": "proxy", "backends": [
        "localhost:81", {"address": "LOCALHOST:81", "weight": 3}, "https://a.test",
        "HTTPS://a.test:443", {"address": "[0:0::1]:82", "weight": 999}, "[::1]:82",
        {"address": "localhost:81", "weight": 0}]}
    used, raised = raise_rule("h.test", rule)
    assert used["backends"][:3] == [{"address": "localhost:81", "weight": 4},
                                    {"address": "https://a.test", "weight": 2},
                                    {"address": "[0:0::1]:82", "weight": 1000}]
    assert used["backends"][3] == {"address": "localhost:81", "weight": 0}  # (left invalid)
    assert [(r.field, r.stored) for r in raised] == [
        ("backends[1]", "LOCALHOST:81"), ("backends[3]", "HTTPS://a.test:443"),
        ("backends[5]", "[::1]:82")]
    assert rule["backends"][0] == "localhost:81"  # (a copy)
    assert validate_table({"h.test": {**used, "backends": used["backends"][:3]}},
                          key_form=True) == []
    plain = {"action": "proxy", "backends": ["a.test:80", "b.test:80"]}
    assert raise_rule("h.test", plain) == (plain, ())


def test_a_file_store_with_one_server_listed_twice_still_serves(
        tmp_path: Path, a: Backend, b: Backend) -> None:
    port = a.address.rsplit(":", 1)[1]
    hosts = {"app.test": {"action": "proxy", "backends": [b.address]},
             "old.test": {"action": "proxy",
                          "backends": [f"localhost:{port}", f"LOCALHOST:{port}"]}}
    bal = Balancer(tmp_path, hosts)
    try:
        wait_for(lambda: served(bal, "app.test") == 200, what="app.test served")
        assert served(bal, "old.test") == 200
        status, body = bal.api("GET", "/api/v1/hosts/old.test")
        assert status == 200, body
        assert body["rule"]["backends"] == [{"address": f"localhost:{port}", "weight": 2}]
        status, info = bal.api("GET", "/api/v1/info")
        assert [(r["host"], r["field"]) for r in info["store"]["raised"]] == [
            ("old.test", "backends[1]")], info["store"]
    finally:
        bal.stop()


def test_one_server_serving_and_draining_is_loaded_serving(
        tmp_path: Path, a: Backend, b: Backend) -> None:
    """A rule an earlier version's deploy stored with one server under two spellings
    in ``backends`` and ``draining.backends`` (now refused: "duplicate backend") is
    loaded with that server serving, not draining (``draining`` gone when nothing
    is left in it), and listed in ``store.raised``. Bug: the whole table was
    refused, the balancer serving only `no-hosts`."""
    port = a.address.rsplit(":", 1)[1]
    since = {"since": 1.0, "warmup": 0}
    hosts = {"app.test": {"action": "proxy", "backends": [f"localhost:{port}"],
                          "draining": {"backends": [f"LOCALHOST:{port}"], **since}},
             "old.test": {"action": "proxy", "backends": [short(a.address)],
                          "draining": {"backends": [a.address, b.address], **since}}}
    bal = Balancer(tmp_path, hosts)
    try:
        wait_for(lambda: served(bal, "app.test") == 200, what="app.test served")
        assert served(bal, "old.test") == 200
        rules = {h: bal.api("GET", f"/api/v1/hosts/{h}")[1]["rule"] for h in hosts}
        raised = bal.api("GET", "/api/v1/info")[1]["store"]["raised"]
    finally:
        bal.stop()
    assert rules["app.test"] == {"action": "proxy", "backends": [f"localhost:{port}"]}
    assert rules["old.test"]["backends"] == [a.address]
    assert rules["old.test"]["draining"]["backends"] == [b.address]
    assert [(r["host"], r["field"], r["stored"]) for r in raised] == [
        ("app.test", "draining.backends[0]", f"LOCALHOST:{port}"),
        ("old.test", "backends[0]", short(a.address)),
        ("old.test", "draining.backends[0]", a.address)], raised


def test_a_deploy_stored_with_a_short_spelling_is_resumed_and_finishes(
        tmp_path: Path, a: Backend, b: Backend) -> None:
    """A deploy an earlier version switched to ``0x7f.1:P`` and was draining when
    the balancer was upgraded: the new management process resumes it, its record
    loaded as the table is (spelled in full), and it ends done. Bug: "internal
    error: invalid address"."""
    from tests.test_deploys import HOST, finished

    since = time.time() - 1
    before = {"action": "proxy", "backends": [a.address]}
    to = [short(b.address)]
    switched = {**before, "backends": to,
                "draining": {"backends": [a.address], "since": since, "warmup": 0}}
    routes = tmp_path / "routes.json"  # (as the earlier version wrote it)
    routes.write_text(json.dumps({"version": 2, "hosts": {HOST: switched}}))
    store = open_store(f"file:{routes}")
    record = {"id": "d1", "host": HOST, "kind": "deploy", "from": [a.address], "to": to,
              "settings": {"ready_timeout": 5.0, "drain_timeout": 5.0, "warmup": 0.0},
              "state": "running", "step": "drain", "started": since - 1, "ended": None,
              "error": None, "warning": None, "before": before, "from_version": 1,
              "since": since, "version": 2, "abort": None, "owner": "gone",
              "steps": [{"name": "drain", "started": since, "ended": None, "outcome": None,
                         "detail": f"waiting for {a.address}"}]}
    assert store.records().begin(record, 0.0, 5.0) is None  # (its beat long gone)
    bal = Balancer(tmp_path)
    try:
        stored = finished(bal, "d1")
        rule = bal.api("GET", f"/api/v1/hosts/{HOST}")[1]["rule"]
        log = bal.output()
    finally:
        bal.stop()
    assert stored["state"] == "done" and stored["error"] is None, stored
    assert stored["to"] == [b.address], stored
    assert rule == {"action": "proxy", "backends": [b.address]}
    assert (f"deploy d1: its record holds {HOST} to backends[0] {short(b.address)!r} -> "
            f"{b.address!r}") in log
