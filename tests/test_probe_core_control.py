"""A routing table edited outside the API (a hand-edited routes file, an
``HSET`` by another program) against a real balancer: each case a defect found
and fixed (each test fails without its fix).

* A host key not in its key form (``APP.TEST``, ``app.test.``, `` app.test``)
  was served (requests are matched case-insensitively, without a trailing dot),
  but the management API, which finds hosts by that form, answered 404 to
  every spelling of it: ``balancerctl get``, ``delete``, ``add-backend`` and
  ``remove-backend`` could not reach it, and ``balancerctl set app.test`` stored
  a second key beside it, a table the store then refused as a duplicate at its
  next read (a restart served no table). Now such a key is a corrupt store,
  named with its key form: reported, the last good table kept, as any other
  table the balancer cannot take. A balancer that served such a table before
  (its snapshot holds it) still serves it when started on that file.
* A routes file edited to a version Redis cannot count to (``10**22``, a typo)
  was served: it became the balancer's floor for versions for good (kept in
  its snapshot), so no later table could ever be moved to Redis, and
  ``balancer_routing_version`` (a float) no longer changed with a write. A
  version of Redis was refused so already; now the file's is too, with the
  same bound (below ``2**63 - 1``).
* A Redis version Python's ``int`` reads but ``INCR`` refuses (`` 5``, ``+5``,
  ``5_0``, ``05``, set by hand) was served as a version (``5_0`` as 50,
  raising the floor) with no problem reported, while every write failed with
  503 "Redis refused to write: value is not an integer". Now it is a corrupt
  store, as any other version that is no count.
* ``balancerctl`` took any HOST and put it in the API path: an empty one (an
  unset shell variable) named the whole table (``get ""`` printed a host
  ``None`` and exit 0), and one with a ``/`` another route (``delete
  "app.test/backends/ADDR"`` removed that backend and said the host was
  deleted). Now a HOST that is no routing-table key is a usage error (exit 2)
  and nothing is sent.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from management.ctl import main as ctl_main
from tests.support import Balancer, request, wait_for
from tests.test_probe_mgmt import STATIC, redis_site

__all__ = ["redis_site"]  # the fixture (a balancer on a private Redis)
WAIT = 10.0


def serves(bal: Balancer, host: str, body: bytes = b"hi") -> bool:
    status, _, got = request(bal.port, host=host, timeout=5)
    return status == 200 and got == body


@pytest.mark.parametrize("key", ["APP.TEST", "app.test.", " app.test", "*.App.Test"])
def test_a_hand_written_key_not_in_key_form_is_a_corrupt_file(tmp_path: Path, key: str) -> None:
    bal = Balancer(tmp_path, {"other.test": STATIC})
    try:
        wait_for(lambda: serves(bal, "other.test"), WAIT, what="the first table")
        bal.write_routes({"other.test": STATIC, key: {**STATIC, "body": "hand"}})
        form = key.strip().lower().rstrip(".")
        named = f"host {key!r}: not stored in its key form {form!r}"
        wait_for(lambda: named in bal.store_problem(), WAIT, what="the key named")
        assert bal.version() == 1 and serves(bal, "other.test")
        assert not serves(bal, "x.app.test" if key.startswith("*") else "app.test", b"hand")
        status, answer = bal.api("PUT", f"/api/v1/hosts/{form}", STATIC)
        assert status == 503 and named in answer["message"], answer  # no second key
        assert key in json.loads(bal.routes.read_text())["hosts"]
        bal.write_routes({"other.test": STATIC, form: {**STATIC, "body": "hand"}})
        wait_for(lambda: bal.store_problem() == "", WAIT, what="the repaired file read")
        assert serves(bal, "x.app.test" if key.startswith("*") else "app.test", b"hand")
        status, _ = bal.api("DELETE", f"/api/v1/hosts/{form}")
        assert status == 200
    finally:
        bal.stop()


def test_a_snapshot_with_a_key_not_in_key_form_still_serves_at_start(tmp_path: Path) -> None:
    """An upgrade: the last version served ``APP.TEST`` from the file and kept it in
    its snapshot; started on that file, the balancer serves the snapshot and
    reports the file."""
    first = Balancer(tmp_path, {"app.test": STATIC})
    snapshot = Path(f"{first.routes}.last-good")
    try:
        wait_for(snapshot.exists, WAIT, what="the snapshot")
    finally:
        first.stop()
    saved = json.loads(snapshot.read_text())
    saved["hosts"] = {"APP.TEST": saved["hosts"]["app.test"]}
    snapshot.write_text(json.dumps(saved))
    first.write_routes({"APP.TEST": STATIC}, version=saved["version"])
    bal = Balancer(tmp_path, None)
    try:
        wait_for(lambda: "not stored in its key form 'app.test'" in bal.store_problem(), WAIT,
                 what="the file reported")
        assert serves(bal, "app.test")
    finally:
        bal.stop()


@pytest.mark.parametrize("exponent", [22, 400])  # 400: past a float (review: OverflowError)
def test_a_routes_file_version_past_what_redis_counts_is_a_corrupt_file(tmp_path: Path,
                                                                       exponent: int) -> None:
    bal = Balancer(tmp_path, {"app.test": STATIC})
    try:
        wait_for(lambda: serves(bal, "app.test"), WAIT, what="the first table")
        bal.write_routes({"app.test": {**STATIC, "body": "typo"}}, version=10**exponent)
        named = f"version must be below 9223372036854775807, got 1.000e+{exponent}"
        wait_for(lambda: named in bal.store_problem(), WAIT, what="the version refused")
        assert bal.version() == 1 and serves(bal, "app.test")
        status, answer = bal.api("PUT", "/api/v1/hosts", {"hosts": {"app.test": STATIC}})
        assert (status, answer) == (200, {"version": 2})  # the repair, above what was served
        wait_for(lambda: bal.store_problem() == "", WAIT, what="the repaired file read")
        assert 'balancer_routing_version 2.0' in bal.metrics_text()
    finally:
        bal.stop()


@pytest.mark.parametrize("announced", [True, False])
def test_a_redis_key_not_in_key_form_is_a_corrupt_store(redis_site: tuple[Balancer, Any],
                                                         announced: bool) -> None:
    """Written as the store writes (one transaction, the change announced) or with
    the version raised alone (the resync finds it)."""
    bal, raw = redis_site
    version = int(raw.get("balancer:version")) + 1
    with raw.pipeline(transaction=True) as pipe:
        pipe.hset("balancer:hosts", "Web.Test", json.dumps({**STATIC, "body": "web"}))
        pipe.set("balancer:version", version)
        if announced:
            pipe.publish("balancer:changes", b"%d Web.Test" % version)
        pipe.execute()
    named = "host 'Web.Test': not stored in its key form 'web.test'"
    wait_for(lambda: named in bal.store_problem(), WAIT, what="the key named")
    assert not serves(bal, "web.test", b"web") and serves(bal, "app.test")
    status, answer = bal.api("GET", "/api/v1/hosts")
    assert status == 200 and named in answer["store_problem"], answer
    assert list(answer["hosts"]) == ["app.test"]
    raw.hdel("balancer:hosts", "Web.Test")
    status, _ = bal.api("PUT", "/api/v1/hosts/web.test", {**STATIC, "body": "web"})
    assert status == 200
    wait_for(lambda: bal.store_problem() == "" and serves(bal, "web.test", b"web"), WAIT,
             what="the repaired store served")



@pytest.mark.parametrize("bad", [" 5", "+5", "5_0", "05"])
def test_a_redis_version_incr_refuses_is_a_corrupt_store(redis_site: tuple[Balancer, Any],
                                                         bad: str) -> None:
    bal, raw = redis_site
    good = raw.get("balancer:version")
    raw.set("balancer:version", bad)
    raw.publish("balancer:changes", b"nothing")
    named = f"balancer:version is not an integer from 0 to 9223372036854775806: {bad!r}"
    wait_for(lambda: named in bal.store_problem(), WAIT, what="the version reported")
    assert bal.version() == int(good) and serves(bal, "app.test")
    status, answer = bal.api("PUT", "/api/v1/hosts/b.test", STATIC)
    assert status == 503 and answer["error"] == "store_corrupt", answer
    raw.set("balancer:version", good)  # repaired by hand, then changed elsewhere
    version = raw.incr("balancer:version")
    raw.hset("balancer:hosts", "new.test", json.dumps({**STATIC, "body": "new"}))
    raw.publish("balancer:changes", f"{version} new.test")
    wait_for(lambda: bal.store_problem() == "" and serves(bal, "new.test", b"new"), WAIT,
             what="the change served")
    assert bal.api("PUT", "/api/v1/hosts/b.test", STATIC) == (200, {"version": version + 1})


@pytest.fixture(scope="module")
def two_backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    bal = Balancer(tmp_path_factory.mktemp("probe-core-ctl"),
                   {"app.test": {"action": "proxy", "backends": ["127.0.0.1:9", "127.0.0.1:10"]}})
    yield bal
    bal.stop()


@pytest.mark.parametrize("args", [
    ("get", ""), ("delete", ""), ("set", "", "static", "body=x"), ("stats", ""),
    ("add-backend", "", "127.0.0.1:11"), ("deploy", "", "--backend", "127.0.0.1:11"),
    ("delete", "app.test/backends/127.0.0.1:10"), ("delete", "app.test/"),
    ("get", "app.test?x=1"), ("remove-backend", "app.test/x", "127.0.0.1:10"),
])
def test_balancerctl_refuses_a_host_that_is_no_key_and_sends_nothing(
        two_backends: Balancer, capsys: pytest.CaptureFixture[str], args: tuple) -> None:
    bal = two_backends
    url = ["--url", f"http://127.0.0.1:{bal.mport}"]
    with pytest.raises(SystemExit) as exited:
        ctl_main([*args[:1], *url, *args[1:]])
    out, err = capsys.readouterr()
    assert exited.value.code == 2 and out == "", (out, err)
    assert err.startswith("balancerctl: argument HOST: host") and len(err.splitlines()) == 1
    assert bal.api("GET", "/api/v1/hosts")[1]["version"] == 1  # nothing written
    assert ctl_main(["get", *url, "APP.Test."]) == 0  # a key in another case names it
    assert "127.0.0.1:10" in capsys.readouterr().out
