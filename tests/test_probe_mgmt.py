"""Outside probe of the management plane, the stores and the operator's tools,
against a real balancer. Each case a defect found and fixed (each test fails
without its fix):

* One byte that is not UTF-8 in Redis (``HSET NS:hosts "\\xff.test" ...``, from
  any other program) raised ``UnicodeDecodeError`` out of the store watcher of
  every worker and of the management process: they stopped following the store
  for good, reporting nothing (``/readyz`` ready, ``balancer_store_up`` 1), and
  ``GET /api/v1/hosts`` answered 500. Now it is a corrupt store naming the key.
* A routes file that is a symlink (documented as followed) was replaced by a
  regular file at the first write: the file it named stayed at the old table.
* Two balancers reaching one routes file through different symlinks took
  different lock files (``LINK.lock``): their writes could lose one another's.
* A routes file cut short at the version served was never reported, and a
  problem reported before was cleared as "readable again".
* ``balancerctl restore`` on a healthy store that was ahead of the table served
  (a write another balancer made, not applied here yet) wrote the older served
  table over it: that write was lost. Now 409 ``nothing_to_restore``.
* ``DEL NS:hosts`` with the version kept (or Redis evicting the hash under a
  ``maxmemory-policy``) was taken as that version's table: the API showed no
  hosts, the snapshot kept none, and a worker started afterwards served none.
  Now it is reported as a store changed without raising its version, the
  served table is kept (by a new worker too) and a restore writes it back.
* 20 backend adds at once to one host on Redis (instances registering at boot)
  failed a quarter of them with 503 "the table kept changing": the retries of
  the read-modify-write raced one another again at once, 10 times. Once they
  were spread out, more writes raced, and two races showed: a write whose
  read raced another's saw the store "behind" the version that one noted
  (409 ``store_lost``), and the management process took a whole read that
  began before a write it noted for a store that lost its table, for good:
  every later one-host write answered 409.
* With the routes file's directory deleted (or its disk remounted read-only),
  a worker or management process that died could not be replaced: each
  replacement exited at once (a crash loop; that slot served nothing, the API
  was gone). Now it starts and reports the store; at start the same path is
  still a bad setting (exit 2), and so is a path that is a directory.
* A Redis that wants a password the URL lacks was reported in Redis's words
  only ("HELLO must be called with the client already authenticated..."); the
  report now says to give it in ``store.url``.
* A history file (the management process's run directory) holding a JSON
  list or string raised AttributeError out of the management process's start.
* ``balancerctl --url http://[::1:8081`` ended in a traceback; a port of 99999
  said "Connection refused"; a token no HTTP client can send was tried.
* ``management.token`` with a control character, spaces at its ends or a
  non-ASCII letter was taken: no request could ever match it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.settings import SettingsError, load_settings
from management.ctl import main as ctl_main
from tests.conftest import RedisServer
from tests.support import Balancer, control_socket, in_threads, request, wait_for

WAIT = 10.0
STATIC = {"action": "static", "status": 200, "body": "hi"}


def serves(bal: Balancer, host: str = "app.test", body: bytes = b"hi") -> bool:
    status, _, got = request(bal.port, host=host, timeout=5)
    return status == 200 and got == body


# Redis: bytes that are not UTF-8 ----------------------------------------------------
@pytest.fixture
def redis_site(redis_factory: Callable[[], RedisServer], tmp_path: Path
               ) -> Iterator[tuple[Balancer, Any]]:
    """``bal, raw``: a balancer on a private Redis serving app.test; raw: a bytes client."""
    import redis

    server = redis_factory()
    bal = Balancer(tmp_path, None, store=server.url)
    assert bal.api("PUT", "/api/v1/hosts", {"hosts": {"app.test": STATIC}})[0] == 200
    raw = redis.Redis.from_url(server.url, socket_timeout=5)
    yield bal, raw
    raw.close()
    bal.stop()


def publish_change(raw: Any, host: bytes, value: bytes) -> int:
    """A write made elsewhere, as the Redis store makes it (one transaction); the new
    version."""
    version = int(raw.get("balancer:version")) + 1
    with raw.pipeline(transaction=True) as pipe:
        pipe.hset("balancer:hosts", host, value)
        pipe.set("balancer:version", version)
        pipe.publish("balancer:changes", b"%d %s" % (version, host))
        pipe.execute()
    return version


def test_bytes_that_are_not_utf8_in_redis_are_a_corrupt_store_and_the_watch_goes_on(
        redis_site: tuple[Balancer, Any]) -> None:
    bal, raw = redis_site
    rule = json.dumps(STATIC).encode()
    publish_change(raw, b"\xff.test", rule)
    named = "balancer:hosts[\\xff.test] is not valid JSON: the host name is not UTF-8 (byte 0xff"
    wait_for(lambda: named in bal.store_problem(), WAIT, what="the host name reported")
    status, answer = bal.api("GET", "/api/v1/hosts")  # was a 500
    assert status == 200 and named in answer["store_problem"], answer
    assert list(answer["hosts"]) == ["app.test"] and serves(bal)
    raw.hdel("balancer:hosts", b"\xff.test")
    publish_change(raw, b"bad.test", b'{"action": "static", "status": 200, "body": "\xfe"}')
    wait_for(lambda: "balancer:hosts[bad.test] is not valid JSON: the value is not UTF-8 "
                     "(byte 0xfe" in bal.store_problem(), WAIT, what="the value reported")
    raw.hdel("balancer:hosts", b"bad.test")
    raw.publish("balancer:changes", b"\xff\xfe garbage")  # a message of bytes
    # every watcher still follows the store: a change made elsewhere is served
    publish_change(raw, b"new.test", json.dumps({**STATIC, "body": "new"}).encode())
    wait_for(lambda: serves(bal, "new.test", b"new") and bal.store_problem() == "", WAIT,
             what="the change after the repair")
    assert "Traceback" not in bal.output()


def test_a_redis_table_changed_without_its_version_is_not_taken(
        redis_site: tuple[Balancer, Any]) -> None:
    import signal

    bal, raw = redis_site
    assert bal.api("PUT", "/api/v1/hosts/b.test", STATIC) == (200, {"version": 2})
    snapshot = bal.tmp / "balancer-balancer.last-good.json"
    wait_for(lambda: json.loads(snapshot.read_text())["version"] == 2, WAIT,
             what="the snapshot of version 2")
    raw.delete("balancer:hosts")  # as an eviction does: the version key stays
    said = "holds another table at version 2 (0 hosts) than the one this balancer serves"
    (pid,) = [p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]]
    os.kill(pid, signal.SIGKILL)  # a worker started now serves the served table
    wait_for(lambda: [p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]]
             not in ([], [pid]), WAIT, what="a new worker")
    wait_for(lambda: serves(bal, "b.test"), WAIT, what="the new worker serving b.test")
    worker = bal.api("GET", "/api/v1/info")[1]["processes"][0]
    assert said in worker["store_problem"]
    # the management process finds it at its next whole read (here the API's)
    answer = bal.api("GET", "/api/v1/hosts")[1]
    assert list(answer["hosts"]) == ["app.test", "b.test"] and said in answer["store_problem"]
    assert said in bal.store_problem()
    status, answer = bal.api("PUT", "/api/v1/hosts/c.test", STATIC)
    assert (status, answer["error"]) == (409, "store_lost"), answer
    assert bal.api("POST", "/api/v1/restore") == (
        200, {"version": 3, "restored_from": 2, "hosts": 2})
    assert sorted(raw.hkeys("balancer:hosts")) == [b"app.test", b"b.test"]
    wait_for(lambda: bal.store_problem() == "", WAIT, what="the repair seen")
    wait_for(lambda: bal.api("GET", "/api/v1/info")[1]["processes"][0]["store_problem"]
             is None, WAIT, what="the worker's problem cleared")


def test_concurrent_backend_adds_on_redis_all_land(redis_site: tuple[Balancer, Any]) -> None:
    bal, _ = redis_site
    for round_ in range(4):
        host = f"pool{round_}.test"
        rule = {"action": "proxy", "backends": ["127.0.0.1:1"]}
        assert bal.api("PUT", f"/api/v1/hosts/{host}", rule)[0] == 200
        added = [f"127.0.0.1:{100 + n}" for n in range(20)]
        answers = in_threads(len(added), lambda h=host, a=added: bal.api(
            "POST", f"/api/v1/hosts/{h}/backends", {"address": a.pop()}))
        assert [f.result()[0] for f in answers] == [200] * 20, [f.result() for f in answers]
        backends = bal.api("GET", f"/api/v1/hosts/{host}")[1]["rule"]["backends"]
        assert len(backends) == 21 and added == []
    assert bal.store_problem() == ""  # no race was taken for a store that lost its table
    assert bal.api("PUT", "/api/v1/hosts/after.test", STATIC)[0] == 200


def test_a_restore_never_writes_the_served_table_over_a_store_ahead_of_it(
        redis_factory: Callable[[], RedisServer], tmp_path: Path) -> None:
    server = redis_factory()
    bal = Balancer(tmp_path, None, store=server.url,
                   env={"BALANCER_STORE_RESYNC_INTERVAL": "600"})  # no catching up by itself
    raw = server.client()
    try:
        assert bal.api("PUT", "/api/v1/hosts", {"hosts": {"app.test": STATIC}}) == (
            200, {"version": 1})
        with raw.pipeline(transaction=True) as pipe:  # another balancer's write, unheard
            pipe.hset("balancer:hosts", "newer.test", json.dumps(STATIC))
            pipe.incr("balancer:version")
            pipe.execute()
        status, answer = bal.api("POST", "/api/v1/restore")
        assert (status, answer["error"]) == (409, "nothing_to_restore"), answer
        # (served: 1, or 2 when the watcher's read of version 1 came after the write)
        assert "the store holds version 2, not behind the table this balancer serves " \
               "(version " in answer["message"]
        assert raw.hgetall("balancer:hosts").keys() == {"app.test", "newer.test"}
        assert raw.get("balancer:version") == "2"
        raw.flushall()  # lost: now a restore writes the served table back
        status, answer = bal.api("POST", "/api/v1/restore")
        assert status == 200 and answer["version"] == 3, answer
        served = {"app.test"} if answer["restored_from"] == 1 else {"app.test", "newer.test"}
        assert raw.hgetall("balancer:hosts").keys() == served
    finally:
        bal.stop()



def test_a_balancer_restarted_onto_an_emptied_redis_restores_its_snapshot(
        redis_factory: Callable[[], RedisServer], tmp_path: Path) -> None:
    """The restore refusal (a store not behind) never blocks the restore of a table
    that only the snapshot still holds: the store is behind it."""
    server = redis_factory()
    raw = server.client()
    bal = Balancer(tmp_path, None, store=server.url)
    try:
        assert bal.api("PUT", "/api/v1/hosts", {"hosts": {"app.test": STATIC}})[0] == 200
        assert bal.api("PUT", "/api/v1/hosts/b.test", STATIC) == (200, {"version": 2})
        snapshot = tmp_path / "balancer-balancer.last-good.json"
        wait_for(lambda: snapshot.exists() and json.loads(snapshot.read_text())["version"]
                 == 2, WAIT, what="the snapshot of version 2")
    finally:
        bal.stop()
    raw.flushall()  # while the balancer is down
    bal = Balancer(tmp_path, None, store=server.url)
    try:
        assert serves(bal) and serves(bal, "b.test")
        wait_for(lambda: "lost its table" in bal.store_problem(), WAIT, what="the loss")
        assert bal.api("POST", "/api/v1/restore") == (
            200, {"version": 3, "restored_from": 2, "hosts": 2})
        assert raw.hgetall("balancer:hosts").keys() == {"app.test", "b.test"}
        wait_for(lambda: bal.store_problem() == "", WAIT, what="the repair seen")
    finally:
        bal.stop()


def test_a_redis_password_missing_or_wrong_says_where_it_goes(
        redis_factory: Callable[[], RedisServer]) -> None:
    from balancer.stores import StoreUnavailable
    from balancer.stores.redis import RedisStore

    server = redis_factory()
    server.client().config_set("requirepass", "s3cret")
    hint = "give it in store.url, redis://[user]:PASSWORD@host:port/db"
    for url in (server.url, server.url.replace("redis://", "redis://:wrong@")):
        store = RedisStore(url)
        with pytest.raises(StoreUnavailable, match=re.escape(hint)) as info:
            store.load()
        assert "wrong" not in str(info.value) and hint in (store.last_error() or "")
        store.close()
    good = RedisStore(server.url.replace("redis://", "redis://:s3cret@"))
    assert good.load().version == 0
    good.close()


# the file store ---------------------------------------------------------------------
def test_a_symlinked_routes_file_stays_a_link_and_its_file_is_written(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "routes.json").write_text(json.dumps({"version": 1, "hosts": {"app.test": STATIC}}))
    link = tmp_path / "routes-link.json"
    link.symlink_to(real / "routes.json")
    bal = Balancer(tmp_path, store=f"file:{link}")
    try:
        assert serves(bal)
        assert bal.api("PUT", "/api/v1/hosts/b.test", STATIC) == (200, {"version": 2})
        assert link.is_symlink(), "the write replaced the link by a file"
        assert set(json.loads((real / "routes.json").read_text())["hosts"]) == {
            "app.test", "b.test"}
        assert bal.api("PUT", "/api/v1/hosts", {"hosts": {"c.test": STATIC}})[0] == 200
        assert link.is_symlink()
        assert list(json.loads((real / "routes.json").read_text())["hosts"]) == ["c.test"]
        assert [p.name for p in real.iterdir() if p.name.endswith(".tmp")] == []
    finally:
        bal.stop()


def test_two_balancers_through_two_symlinks_share_the_writer_lock(tmp_path: Path) -> None:
    """Bug: the lock was ``LINK.lock`` beside each link, so two balancers reaching one
    routes file through different links wrote it unlocked against each other."""
    import fcntl
    from concurrent.futures import ThreadPoolExecutor, wait

    real = tmp_path / "data" / "routes.json"
    real.parent.mkdir()
    real.write_text(json.dumps({"version": 1, "hosts": {"app.test": STATIC}}))
    sites = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "routes.json").symlink_to(real)
        sites.append(Balancer(tmp_path / name, store=f"file:{tmp_path / name / 'routes.json'}"))
    lock = os.open(f"{real}.lock", os.O_RDWR | os.O_CREAT)
    try:
        with ThreadPoolExecutor(8) as pool:
            fcntl.flock(lock, fcntl.LOCK_EX)  # a third writer holds the file's lock
            held = [pool.submit(bal.api, "PUT", f"/api/v1/hosts/{name}.test", STATIC)
                    for bal, name in zip(sites, "ab", strict=True)]
            assert wait(held, timeout=0.5).done == set(), "a write went past the lock"
            fcntl.flock(lock, fcntl.LOCK_UN)
            assert sorted(f.result()[1]["version"] for f in held) == [2, 3]
            many = [pool.submit(bal.api, "PUT", f"/api/v1/hosts/h{n}.test", STATIC)
                    for n in range(20) for bal in [sites[n % 2]]]
            assert all(f.result()[0] == 200 for f in many)
        table = json.loads(real.read_text())
        assert table["version"] == 23, "a write was lost"
        assert set(table["hosts"]) == {"app.test", "a.test", "b.test",
                                       *(f"h{n}.test" for n in range(20))}
        assert all((tmp_path / name / "routes.json").is_symlink() for name in "ab")
        assert not (tmp_path / "a" / "routes.json.lock").exists()
    finally:
        os.close(lock)
        for bal in sites:
            bal.stop()


def test_a_worker_replaced_while_the_store_directory_is_gone_serves(tmp_path: Path) -> None:
    import signal

    store = tmp_path / "store"
    store.mkdir()
    bal = Balancer(tmp_path, store=f"file:{store / 'routes.json'}")
    try:
        assert bal.api("PUT", "/api/v1/hosts/app.test", STATIC)[0] == 200
        (pid,) = [p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]]
        run_dir = Path(control_socket(pid)).parent
        wait_for(lambda: [json.loads(p.read_text())["version"]
                          for p in run_dir.glob("last-good-*.json")] == [1], WAIT,
                 what="the snapshot's copy in the run directory")
        store.rename(tmp_path / "gone")
        wait_for(lambda: "deleted?" in bal.store_problem(), WAIT, what="the loss reported")
        os.kill(pid, signal.SIGKILL)

        def replaced() -> bool:
            info = bal.api("GET", "/api/v1/info")[1]
            return [p["pid"] != pid for p in info["processes"]] == [True]
        wait_for(replaced, WAIT, what="a new worker")
        assert serves(bal)  # the last good table (test_restart_unreadable_store.py)
        assert bal.api("GET", "/api/v1/info")[1]["arbiter"]["recent_crashes"] == 1
        store.mkdir()  # the operator puts it back, and the table
        assert bal.api("PUT", "/api/v1/hosts", {"hosts": {"app.test": STATIC}})[0] == 200
        assert serves(bal)
    finally:
        bal.stop()


@pytest.mark.parametrize("where", ["missing/routes.json", "."])
def test_a_store_path_that_cannot_be_the_routes_file_exits_2_at_start(
        tmp_path: Path, where: str) -> None:
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-m", "balancer", "serve", "--listen", "127.0.0.1:0",
                           "--management", "127.0.0.1:0", "--store", f"file:{tmp_path / where}"],
                          env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    said = "does not exist" if "missing" in where else "is a directory; name the routes file"
    assert said in done.stderr


def test_a_routes_file_cut_short_at_the_served_version_is_reported(tmp_path: Path) -> None:
    bal = Balancer(tmp_path, {"app.test": STATIC})
    try:
        assert bal.api("PUT", "/api/v1/hosts/b.test", STATIC)[0] == 200
        whole = bal.routes.read_bytes()
        bal.routes.write_bytes(b'{"version": 9, "hosts": {"\xff": 1}}')  # corrupt, reported
        wait_for(lambda: "not valid JSON" in bal.store_problem(), WAIT, what="the corrupt file")
        bal.routes.write_bytes(whole[:len(whole) // 2])  # the version served, cut short
        wait_for(lambda: any(word in bal.store_problem() for word in ("Unterminated", "Expecting")),
                 WAIT, what="the cut file reported, not cleared as readable")
        bal.routes.write_bytes(whole)
        wait_for(lambda: bal.store_problem() == "", WAIT, what="the whole file back")
        for cut in (whole[:-10], whole[:-len(b"\n}}\n")]):  # (the latter: after a rule's })
            bal.routes.write_bytes(cut)  # cut short with no problem before
            wait_for(lambda: "not valid JSON" in bal.store_problem(),
                     WAIT, what="the cut file reported")
            bal.routes.write_bytes(whole)
            wait_for(lambda: bal.store_problem() == "", WAIT, what="the whole file back")
        assert serves(bal) and serves(bal, "b.test")
    finally:
        bal.stop()


@pytest.mark.parametrize("saved", ["[]", '"x"', '{"points": 720, "series": ["rps", '
                                   '"error_rate", "p50", "p99"], "rings": []}'])
def test_a_damaged_history_file_is_ignored(tmp_path: Path, saved: str) -> None:
    from management.history import History

    path = tmp_path / "history.json"
    path.write_text(saved)
    assert History(str(path)).load() is False


# the operator's tools ---------------------------------------------------------------
@pytest.mark.parametrize(("args", "said"), [
    (["--url", "http://[::1:8081"], "Invalid IPv6 URL"),
    (["--url", "http://127.0.0.1:99999"], "Port out of range"),
    (["--url", "http://:8081"], "expected http://HOST:PORT"),
    (["--url", "http://127.0.0.1:1", "--token", "a\nb"], "--token (or BALANCER_TOKEN)"),
    (["--url", "http://127.0.0.1:1", "--token", " t"], "--token (or BALANCER_TOKEN)"),
])
def test_balancerctl_refuses_a_malformed_url_or_token_with_exit_2(
        args: list[str], said: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl_main([*args, "list"]) == 2
    assert said in capsys.readouterr().err


@pytest.mark.parametrize(("token", "found"), [
    ("secret\n", "a control character"), (" secret", "spaces at an end"),
    ("sécret", "not ASCII")])
def test_a_management_token_no_client_can_send_is_refused_unshown(token: str,
                                                                  found: str) -> None:
    with pytest.raises(SettingsError) as info:
        load_settings(flags={"management.token": token}, env={})
    (message,) = info.value.problems
    assert message.startswith("management.token (--token): must be visible ASCII")
    assert found in message and token.strip() not in message
    assert load_settings(flags={"management.token": "a b"}, env={}).management.token == "a b"


def test_env_token_with_a_newline_exits_2(tmp_path: Path) -> None:
    """As `balancer serve` sees a token read with its newline (``$(cat file)`` keeps none,
    an env file may)."""
    import subprocess
    import sys

    env = {**os.environ, "BALANCER_MANAGEMENT_TOKEN": "secret\n",
           "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run([sys.executable, "-m", "balancer", "serve", "--store",
                           f"file:{tmp_path / 'r.json'}"], env=env, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 2
    assert "management.token (BALANCER_MANAGEMENT_TOKEN): must be visible ASCII" in done.stderr
