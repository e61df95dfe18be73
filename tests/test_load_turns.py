"""A worker that reads a big table or loads many certificates lets its loop poll
between slices (`balancer.turns.turn`): a request that arrived and a timer that
is due are served before the load ends. The pause was ``time.sleep(0)``
(``gevent.sleep(0)`` once patched), which ran up to 50 slices back to back
without polling: a live request waited for a whole 100,000-host table's check.
The loop's rounds are counted too, so that each pass of a load is seen to turn
it: the store's parse and its check, the certificates, the compile.
"""

from __future__ import annotations

import gc
import json
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gevent
import pytest
from gevent._hub_local import get_hub_if_exists

from balancer import big_loads
from balancer.certificates import make_record
from balancer.server import Worker
from balancer.settings import load_settings
from balancer.stores import redis_reads
from balancer.stores.base import PAUSE_EVERY, CorruptStore, TableData
from balancer.stores.file import FileStore
from balancer.stores.redis import RedisStore
from balancer.stores.redis_reads import PAUSE_EVERY as REDIS_PAUSE_EVERY
from balancer.stores.redis_reads import SCAN_ATTEMPTS, SCAN_COUNT
from balancer.table import PAUSE_EVERY as COMPILE_EVERY
from management.mirror import Mirror
from tests.conftest import RedisServer
from tests.support import loop_until, polls_during
from tests.tlsca import TestCA

HOSTS = 6000  # several slices of each pass (500 hosts checked or compiled, 2000 parsed)
CERTS = 4  # one turn before each new certificate
BIG_FILE = 100_000  # hosts: a 6 MB file, whose decode in one call took 0.2-0.3 s of CPU
NEW = {"action": "static", "body": "new"}
BIG_GAP = 0.08  # s of CPU the loop may wait while a big table is decoded or compared


def big_table() -> dict[str, Any]:
    return {f"h{n}.example": {"action": "static", "body": f"host {n}"} for n in range(HOSTS)}


def big_file(tmp_path: Path) -> FileStore:
    path = tmp_path / "routes.json"
    path.write_text(json.dumps({"version": 1, "hosts": big_table()}))
    return FileStore(str(path))


def a_worker(store: Any) -> Worker:
    return Worker(load_settings(env={"BALANCER_STORE_SNAPSHOT": "off"}), store)


def test_a_big_file_table_is_checked_with_the_loop_polling_between_slices(
        tmp_path: Path) -> None:
    store = big_file(tmp_path)
    loaded: list[Any] = []
    rounds = polls_during(lambda: loaded.append(store.load()))
    assert loaded[0].version == 1 and len(loaded[0].hosts) == HOSTS
    assert rounds >= 2 * (HOSTS // PAUSE_EVERY)  # the rules' texts, then the check


def longest_gap_during(job: Callable[[], object]) -> float:
    """The most CPU time this thread spent between two rounds of the loop while
    `job` ran (CPU, not wall time: a loaded machine's waits do not count)."""
    gaps: list[float] = []

    def ticker() -> None:
        while True:
            before = time.thread_time()
            gevent.sleep(0.001)  # a timer: due at the loop's next round but one, at most
            gaps.append(time.thread_time() - before)

    ticking = gevent.spawn(ticker)
    try:
        assert loop_until(lambda: gaps)
        gaps.clear()
        job()
        assert loop_until(lambda: gaps)  # the gap that ends with the job
        return max(gaps)
    finally:
        ticking.kill()


def longest_gap_without_gc(job: Callable[[], object]) -> float:
    """`longest_gap_during`, the garbage collector off: a full collection's pause
    (30 ms in a test process) depends on all the process holds, not on `job`."""
    gc.disable()
    try:
        return longest_gap_during(job)
    finally:
        gc.enable()


def test_a_big_file_is_decoded_with_the_loop_polling_between_slices(tmp_path: Path) -> None:
    """The file's JSON is decoded in slices (`balancer.stores.json_slices`): it was
    one call, 0.2-0.3 s of CPU for 100,000 hosts (1.3 s on a loaded machine) without
    a poll. A key too many makes the file corrupt right after its decode, so that
    the decode is all this load does (the check and the compile have their tests)."""
    store = FileStore(str(tmp_path / "routes.json"))
    lines = ",\n".join(f'  "h{n}.example": {{"action": "static", "body": "host {n}"}}'
                       for n in range(BIG_FILE))
    Path(store.path).write_text(f'{{"version": 1, "hosts": {{\n{lines}\n}}, "x": 1}}\n')

    def load() -> None:
        with pytest.raises(CorruptStore, match="with exactly those keys"):
            store.load()

    assert longest_gap_without_gc(load) < BIG_GAP


def test_the_management_process_compares_a_big_table_with_the_loop_polling(
        tmp_path: Path) -> None:
    """The management process logs what a new table added, changed and removed:
    100,000 hosts compared at once held its API up 0.4 s (the same hub) at every
    reload of a big file. Now a turn every `PAUSE_EVERY` hosts."""
    mirror = Mirror(FileStore(str(tmp_path / "routes.json")))
    mirror.on_table(TableData(1, {f"h{n}.example": {"action": "empty"} for n in range(BIG_FILE)}))
    changed = TableData(2, {f"h{n}.example": {"action": "empty", "status": 204}
                            for n in range(BIG_FILE)})
    assert longest_gap_without_gc(lambda: mirror.on_table(changed)) < BIG_GAP
    assert mirror.version == 2


def big_redis_table(server: RedisServer, namespace: str) -> RedisStore:
    """`big_table()` at version 1 under `namespace`, and a store reading it."""
    raw = server.client()
    raw.delete(f"{namespace}:hosts")
    raw.hset(f"{namespace}:hosts", mapping={h: json.dumps(r) for h, r in big_table().items()})
    raw.set(f"{namespace}:version", 1)
    return RedisStore(server.url, namespace)


def test_a_big_redis_table_is_read_parsed_and_checked_with_the_loop_polling_between_slices(
        redis_server: RedisServer) -> None:
    """Read `SCAN_COUNT` fields at a time (``HSCAN``): the reply of one ``HGETALL``
    of 100,000 fields was parsed in one call (110-180 ms without a poll)."""
    store = big_redis_table(redis_server, "load-turns")
    loaded: list[Any] = []
    try:
        rounds = polls_during(lambda: loaded.append(store.load()))
    finally:
        store.close()
        redis_server.client().delete("load-turns:hosts", "load-turns:version")
    assert loaded[0].version == 1 and loaded[0].hosts == big_table()
    # read, parsed, then checked
    assert rounds >= HOSTS // SCAN_COUNT - 1 + HOSTS // REDIS_PAUSE_EVERY + HOSTS // PAUSE_EVERY


@pytest.mark.parametrize("writes", [1, HOSTS])
def test_a_big_redis_table_written_during_its_read_is_read_as_one_version(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, writes: int) -> None:
    """Another balancer writes a host between two slices of the read: the table read
    is one version's, the write's (read again), never the older version with the
    newer host; writes between every two slices leave it to one ``HGETALL``."""
    namespace = f"load-turns-{writes}"
    store = big_redis_table(redis_server, namespace)
    writer = RedisStore(redis_server.url, namespace)
    written: list[int] = []

    def write_between_slices() -> None:
        if len(written) < writes:
            written.append(writer.put_host(f"new{len(written)}.example", NEW))

    monkeypatch.setattr(redis_reads, "turn", write_between_slices)
    try:
        data = store.load()
    finally:
        store.close()
        writer.close()
        redis_server.client().delete(f"{namespace}:hosts", f"{namespace}:version")
    # version 1 + n holds the first n new hosts
    assert data.hosts.keys() == big_table().keys() | {f"new{n}.example"
                                                      for n in range(data.version - 1)}
    assert data.version == 2 if writes == 1 else data.version > SCAN_ATTEMPTS


def test_a_big_load_in_a_worker_runs_no_garbage_collection_and_is_frozen(
        redis_server: RedisServer) -> None:
    """Read, decoded, checked and compiled (`balancer.big_loads`, enabled in proxy
    workers): the collector walked the new objects again and again meanwhile, and
    full collections walked all the process held (0.1-0.4 s each at 100,000 hosts,
    the worker serving nothing); the table is frozen with the start-up objects."""
    store = big_redis_table(redis_server, "load-gc")
    worker = a_worker(store)
    started: list[int] = []

    def note(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started.append(info["generation"])

    frozen = gc.get_freeze_count()
    big_loads.enable()
    gc.callbacks.append(note)
    try:
        assert worker.apply(store.load())
        assert worker.holder.table.size == HOSTS
        # one collection before each load block (the read, the compile), over
        # what is not frozen; none while the new table is made
        assert set(started) <= {2} and len(started) <= 2, started
        assert gc.get_freeze_count() >= frozen + HOSTS
    finally:
        gc.callbacks.remove(note)
        big_loads.enable(False)
        gc.unfreeze()
        worker.stopping = True
        store.close()
        redis_server.client().delete("load-gc:hosts", "load-gc:version")


def test_garbage_pending_at_a_load_is_collected_not_frozen() -> None:
    """Bug: a garbage cycle pending when a load started (a request's error kept
    its traceback) was frozen with the table, for the process's life."""

    class Node:
        pass

    cycle = Node()
    cycle.self = cycle  # type: ignore[attr-defined]
    alive = weakref.ref(cycle)
    del cycle
    big_loads.enable()
    try:
        with big_loads.loading():
            pass
        assert alive() is None
    finally:
        big_loads.enable(False)
        gc.unfreeze()


def test_new_certificates_are_loaded_with_the_loop_polling_between_them(
        tmp_path: Path) -> None:
    ca = TestCA()
    records = {f"c{n}.test": make_record(f"c{n}.test", *ca.issue(f"c{n}.test"))
               for n in range(CERTS)}
    worker = a_worker(FileStore(str(tmp_path / "routes.json")))
    try:
        front = worker.front()
        rounds = polls_during(lambda: front.update(records))
        assert all(front.find(host) is not None for host in records)
        assert rounds >= CERTS
    finally:
        worker.stopping = True


def test_a_big_table_is_compiled_with_the_loop_polling_between_slices(
        tmp_path: Path) -> None:
    """Compiled, its backends counted, the counters of the hosts it changed or
    removed forgotten (`TableFollower.apply`): a turn every `COMPILE_EVERY` hosts
    of each pass (was a 0.1 ms sleep in two of them: a timer, so a poll, but an
    epoll wait of 1 ms, libev's shortest, when nothing was ready)."""
    worker = a_worker(FileStore(str(tmp_path / "routes.json")))
    try:
        rounds = polls_during(lambda: worker.apply(TableData(1, big_table())))
        assert worker.holder.table.version == 1 and worker.holder.table.size == HOSTS
        assert rounds >= 3 * (HOSTS // COMPILE_EVERY)
    finally:
        worker.stopping = True


def test_a_thread_without_a_hub_loads_a_big_table_and_makes_none(tmp_path: Path) -> None:
    """The threaded baseline's store watcher (an OS thread, nothing patched), as the
    start-up check's unpatched child: no loop to let go round, none is made."""
    store = big_file(tmp_path)
    found: list[Any] = []

    def load() -> None:
        found.append(len(store.load().hosts))
        found.append(get_hub_if_exists())

    reader = threading.Thread(target=load)
    reader.start()
    reader.join(30)
    assert found == [HOSTS, None]
