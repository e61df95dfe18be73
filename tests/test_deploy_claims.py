"""A deploy against another management process taking it over, or a store losing its
table (docs/deploys.md "One at a time, across restarts and balancers"), in process:
a real `Deployer` on a real routes file or Redis, the other process's takeover (or
the loss) scripted at the worst moment. A rule write and the claim's check are one
atomic step; a late beat's hand-over leaves nothing behind; a rule lost before the
drain's end is the store's loss, never someone else's change.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.stores import Store, open_store
from management.deploy_claims import STALE_AFTER
from tests.deploy_fixtures import HOST
from tests.support import wait_for

BEFORE = {"action": "proxy", "backends": ["127.0.0.1:9001"]}
SETTINGS = {"ready_timeout": 5.0, "drain_timeout": 0.2, "warmup": 0.0}


@pytest.fixture(params=["file", "redis"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "file":
        return f"file:{tmp_path / 'routes.json'}"
    return str(request.getfixturevalue("redis_server").url)


@pytest.fixture
def stores(url: str) -> Iterator[Callable[[], Store]]:
    """Store instances on one table (one per management process)."""
    namespace, opened = f"test-{uuid.uuid4().hex}", []

    def make() -> Store:
        opened.append(open_store(url, namespace))
        return opened[-1]
    yield make
    for store in opened:
        store.close()


def about_to_switch(store: Store) -> tuple[Any, dict[str, Any]]:
    """A management process (its app) holding the claim of a deploy of HOST from
    BEFORE to 127.0.0.1:9002, started the real way (`Records.begin`), at its
    switch: its run's next store call is the switch's write."""
    from management.app import create_app

    app: Any = create_app(store=store)
    store.put_host(HOST, BEFORE)
    record = app.deployer.new_record("d1", HOST, store.host_rule(HOST), ["127.0.0.1:9002"],
                                     SETTINGS, "deploy")
    record["step"] = "switch"
    assert store.records().begin(record, time.time(), STALE_AFTER) is None
    return app, record


def taking_over(other: Store) -> Callable[[], None]:
    """The other process's takeover, once: its view is that the claim's owner went
    quiet (its clock `STALE_AFTER` seconds ahead)."""
    done: list[bool] = []

    def take() -> None:
        if not done:
            done.append(True)
            assert other.records().claim(HOST, "d1", "owner-b", time.time() + STALE_AFTER,
                                         STALE_AFTER) is None
    return take


def run(app: Any, record: dict[str, Any]) -> None:
    """Run the deploy here, as `Deployer.start` does, until it ends or hands over."""
    app.deployer.running[HOST] = record["id"]
    running = threading.Thread(target=app.deployer.run, args=(record, False), daemon=True)
    running.start()
    running.join(5)
    assert not running.is_alive(), "the deploy did not end or hand over"


def test_a_takeover_just_before_the_switchs_write_leaves_the_rule_unwritten(
        stores: Callable[[], Store]) -> None:
    """Another process takes the deploy over just as this one calls the store to
    write the switch: the write is refused with the claim's check, and the deploy
    handed over. Bug: the claim was renewed (the fence), then the rule written in a
    second call: a takeover between them let the stale process write the switch."""
    store, other = stores(), stores()
    app, record = about_to_switch(store)
    version = other.load().version
    take, put_host = taking_over(other), store.put_host
    store.put_host = lambda *args, **kwargs: (take(), put_host(*args, **kwargs))[1]  # type: ignore[method-assign]
    run(app, record)
    assert other.host_rule(HOST).rule == BEFORE
    assert other.load().version == version
    assert other.records().claims()[HOST]["owner"] == "owner-b"
    assert (other.records().deploy("d1") or {}).get("state") == "running"


def test_a_takeover_inside_the_writes_transaction_refuses_the_write(
        redis_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis: the takeover lands after the write read the claim, before its
    ``EXEC``: the claim is watched with the table, so the write is tried again and
    refused."""
    from balancer.stores import redis_records

    namespace = f"test-{uuid.uuid4().hex}"
    store, other = open_store(redis_server.url, namespace), open_store(redis_server.url,
                                                                       namespace)
    try:
        app, record = about_to_switch(store)
        take, decide, put_host = taking_over(other), redis_records.decide_renew, store.put_host
        seen: list[str | None] = []

        def racing(*args: Any) -> str | None:  # (the claim's check, in the write's)
            if threading.current_thread() is not writer[0]:  # (the heartbeat's renewal)
                return decide(*args)
            seen.append(decide(*args))
            take()
            return seen[-1]

        writer: list[threading.Thread] = []

        def writing(*args: Any, **kwargs: Any) -> int:
            writer.append(threading.current_thread())
            monkeypatch.setattr(redis_records, "decide_renew", racing)
            return put_host(*args, **kwargs)
        store.put_host = writing  # type: ignore[method-assign]
        run(app, record)
        # read as its own (the takeover's claim read next, inside it), then, tried
        # again once the EXEC failed, as taken over
        assert seen == [None, None, "d1"]
        assert other.host_rule(HOST).rule == BEFORE
        assert other.records().claims()[HOST]["owner"] == "owner-b"
    finally:
        store.close()
        other.close()


def test_a_late_beats_hand_over_leaves_no_mark_on_a_later_resumption(
        stores: Callable[[], Store]) -> None:
    """The run handed over (a takeover at its write), and its heartbeat's renewal,
    answered after the run ended, says so too. Later this process resumes the deploy
    again (the other went quiet): it goes on. Bug: the late answer left the deploy's
    id in `Deployer.taken`, and the resumed run handed over at its first pause, its
    claim going stale for `STALE_AFTER` seconds."""
    from management.deploy_run import Run

    store, other = stores(), stores()
    app, record = about_to_switch(store)
    deployer = app.deployer
    take, put_host = taking_over(other), store.put_host
    renew, late, beats = deployer.records.renew, [], list[threading.Thread]()

    def writing(*args: Any, **kwargs: Any) -> int:  # once the beat renews
        wait_for(lambda: beats, 5, what="the beat's renewal")
        take()
        return put_host(*args, **kwargs)
    store.put_host = writing  # type: ignore[method-assign]

    def after_the_run(*args: Any) -> str | None:  # the beat's renewal, answered late
        beats.append(threading.current_thread())
        wait_for(lambda: HOST not in deployer.running, 5, what="the run's end")
        late.append(renew(*args))
        return late[-1]
    deployer.records.renew = after_the_run
    run(app, record)
    beats[0].join(5)
    assert late == ["d1"] and not beats[0].is_alive()
    deployer.running[HOST] = "d1"  # resumed here again (`Deployer._spawn`)
    Run(deployer, record, resumed=True).pause(0)  # no hand-over


def test_a_redis_restarted_empty_before_the_drains_end_fails_the_deploy_naming_the_loss(
        redis_factory: Any) -> None:
    """Redis comes back empty (a restart without persistence) while the deploy
    drains: its end cannot remove ``draining`` from a rule the store no longer
    has, and the deploy fails naming the loss (`balancerctl restore` puts the
    served rule back). Bug: the missing rule read as someone else's change, and
    the deploy ended ``done``: after the restore the old backends stayed listed
    under ``draining`` for good, no deploy left to remove them."""
    from management.app import create_app
    from management.deploy_steps import switched_rule

    redis = redis_factory()
    store = open_store(redis.url, f"test-{uuid.uuid4().hex}")
    try:
        app: Any = create_app(store=store)
        store.put_host(HOST, BEFORE)
        since = time.time() - 10
        switched = switched_rule(BEFORE, ["127.0.0.1:9002"], since, 0.0)
        record = app.deployer.new_record("d1", HOST, store.host_rule(HOST), ["127.0.0.1:9002"],
                                         SETTINGS, "deploy")
        record.update(step="drain", started=since - 1, since=since,
                      version=store.put_host(HOST, switched))
        assert store.records().begin(record, time.time(), STALE_AFTER) is None
        redis.client().flushall()
        run(app, record)
        stored = store.records().deploy("d1") or {}
    finally:
        store.close()
    assert stored.get("state") == "failed", stored
    assert stored["error"].startswith("cannot remove 'draining' from the rule: "), stored
    assert "lost its table" in stored["error"], stored
    assert "(after the switch: the new backends serve)" in stored["error"], stored


def test_a_host_deleted_after_the_switch_is_not_brought_back(tmp_path: Path) -> None:
    """An operator deletes the host while its deploy drains (the table's version
    moving on, nothing lost): the deploy's end leaves the host deleted, writing
    nothing."""
    from management.app import create_app
    from management.deploy_steps import switched_rule

    store = open_store(f"file:{tmp_path / 'routes.json'}")
    app: Any = create_app(store=store)
    store.put_host(HOST, BEFORE)
    since = time.time() - 10
    record = app.deployer.new_record("d1", HOST, store.host_rule(HOST), ["127.0.0.1:9002"],
                                     SETTINGS, "deploy")
    record.update(step="drain", started=since - 1, since=since, version=store.put_host(
        HOST, switched_rule(BEFORE, ["127.0.0.1:9002"], since, 0.0)))
    assert store.records().begin(record, time.time(), STALE_AFTER) is None
    version = store.delete_host(HOST)
    run(app, record)
    stored = store.records().deploy("d1") or {}
    assert stored.get("state") == "done", stored
    assert store.load().hosts == {} and store.load().version == version


def test_a_stop_during_a_rule_write_leaves_the_claim_stale_for_the_successor(
        stores: Callable[[], Store]) -> None:
    """The process stops (a reload) while the switch's write is under way: `stop`
    sets the claim's beat to 0 first, then the write lands; the claim stays stale
    (a successor resumes the deploy at once) and the run hands over. Bug: the write
    renewed the claim `stop` had just handed over, and the successor resumed the
    deploy `STALE_AFTER` (5 s) later."""
    store, other = stores(), stores()
    app, record = about_to_switch(store)
    deployer, put_host, writing = app.deployer, store.put_host, threading.Event()

    def after_the_stops_hand_over(*args: Any, **kwargs: Any) -> int:
        writing.set()
        wait_for(lambda: other.records().claims()[HOST]["beat"] == 0, 5,
                 interval=0.005, what="the stop's hand-over")
        return put_host(*args, **kwargs)
    store.put_host = after_the_stops_hand_over  # type: ignore[method-assign]
    deployer.running[HOST] = record["id"]
    running = threading.Thread(target=deployer.run, args=(record, False), daemon=True)
    running.start()
    assert writing.wait(5)
    deployer.stop()
    running.join(5)
    assert not running.is_alive()
    assert other.host_rule(HOST).rule != BEFORE  # (the write landed)
    claim = other.records().claims()[HOST]
    assert claim["beat"] == 0, claim
    assert (other.records().deploy("d1") or {}).get("state") == "running"
