"""Hostile probes of the environment (not of peers), through real processes: a
disk that fills up or a file size limit (RLIMIT_FSIZE, lowered on one running
process with prlimit, so nothing else of the test run is limited) under the
access log and under the file store's writes, a routes file swapped for a huge
one, stdout and stderr closed or a closed pipe, the wall clock jumping. Each
case a defect found and fixed (each test fails without its fix):

* A failed access log write (ENOSPC, EFBIG, EPIPE) printed gevent's traceback
  for every batch (five a second per worker), and with stderr a closed pipe
  too the worker no longer stopped on SIGTERM until the arbiter killed it.
  Now: one line when it starts failing, one when it writes again, the
  records dropped meanwhile in ``balancer_access_log_dropped_records_total``.
* Started with stdout closed, `balancer serve` died before serving.
* A full disk or the file size limit made a store write a 503 like an
  unreachable store, and a file size limit said only "File too large": now
  507 `store_full` naming the cause (nothing changed, as before).
* A huge routes file (1 GiB sparse) was read whole by every process: GBs of
  memory each, the management API stuck. Now refused by its size, unread.
* Under a file size limit below 2 MiB every worker died at its start (the
  shared limits table), again and again, while the balancer said it listened.
  Now `balancer serve` refuses to start, naming the limit.
* A deploy's warmup and drain, and ACME's heartbeat, waited on the wall clock:
  set back an hour, they waited an hour more.
* With the run directory's file system full (a tmpfs /tmp): a request under a
  rule's `limits` killed its worker with SIGBUS (the shared table's file was
  sparse, mapped), again after each restart; the history's save raised a
  traceback every 30 s and left its part written; a stopping worker died with
  a traceback leaving its part written. Found on a real full tmpfs (tests
  cannot mount one); the tests check what prevents each.

What held, probed by hand (docs/operations.md): a read-only file system under
the routes file (503 naming EROFS, nothing changed), a directory in place of
the routes file ("not a regular file"), and SIGXFSZ, which Python ignores.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from balancer.stores.base import HostRule
from tests.support import ROOT, Balancer, metric, request, wait_for

WAIT = 10.0
STATIC = {"action": "static", "status": 200, "body": "hi"}
# `balancer serve 2>&1 | head`: run the rest of argv with stdout and stderr a pipe,
# copy what it writes until the management port is announced, then close the pipe
# (the balancer gets SIGTERM with this process: SIGTERM, or its death)
HEAD = [sys.executable, "-c", """
import ctypes, signal, subprocess, sys
def die_with_parent():
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         preexec_fn=die_with_parent)
signal.signal(signal.SIGTERM, lambda *_: child.terminate())
for line in child.stdout:
    sys.stdout.buffer.write(line)
    sys.stdout.flush()
    if b" for management" in line:
        break
child.stdout.close()
sys.exit(child.wait())
"""]
# exec the rest of argv with stdout (1) closed
CLOSED_STDOUT = [sys.executable, "-c", "import os, sys; os.close(1); "
                 "os.execvp(sys.argv[1], sys.argv[1:])"]


def child_pid(bal: Balancer, kind: str) -> int:
    """The pid of the balancer's (first) ready `kind`: "worker" or "management"."""
    return int(re.findall(rf"{kind} (\d+) ready", bal.output())[0])


def limit_file_size(pid: int, size: int | None) -> None:
    """Set process `pid`'s soft RLIMIT_FSIZE to `size` bytes (None: back to its
    hard limit). A write past it fails with EFBIG (Python ignores SIGXFSZ)."""
    hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard if size is None else size, hard))


def serve_some(bal: Balancer, count: int) -> None:
    for _ in range(count):
        assert request(bal.port)[0] == 200


# the access log -------------------------------------------------------------------
@pytest.mark.data_plane  # the access log's writer is compiled: run interpreted too
def test_an_access_log_past_the_file_size_limit_is_reported_once_and_resumes(
        tmp_path: Path) -> None:
    """The worker's file size limit lowered to 10 bytes past the log's end: the
    next write is cut short there (a record torn), then every write fails with
    EFBIG while requests are served; raised again, the log goes on, its next
    record on a line of its own (it was glued to the torn one)."""
    log = tmp_path / "access.log"
    bal = Balancer(tmp_path, {"app.test": STATIC}, args=["--access-log", str(log)])
    try:
        serve_some(bal, 1)
        wait_for(lambda: log.stat().st_size > 0, WAIT, what="the first line")
        # room for the operator log (stderr is a file here too); the access log is
        # grown (sparse) to 10 bytes short of the limit
        limit = bal.log_path.stat().st_size + (1 << 20)
        os.truncate(log, limit - 10)
        worker = child_pid(bal, "worker")
        limit_file_size(worker, limit)
        for dropped in (10, 20, 30):  # three batches, each failing on its own
            serve_some(bal, 10)
            wait_for(lambda n=dropped: metric(
                bal.metrics(), "balancer_access_log_dropped_records_total") >= n, WAIT,
                what=f"{dropped} records dropped")
        out = bal.output()
        assert out.count("write failed (File too large)") == 1, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        limit_file_size(worker, None)
        serve_some(bal, 1)
        wait_for(lambda: "writing again; 30 records were dropped" in bal.output(), WAIT,
                 what="the recovery line")
        with open(log, "rb") as f:
            f.seek(limit - 10)
            torn, *after = f.read().decode().split("\n")
        assert len(torn) == 10 and after[-1] == "", (torn, after)
        assert after[:-1] and all(line.startswith("app.test 127.0.0.1 ") for line in after[:-1])
        assert metric(bal.metrics(), "balancer_access_log_dropped_records_total") == 30
        assert child_pid(bal, "worker") == worker and "exited" not in bal.output()
    finally:
        bal.stop()


@pytest.mark.data_plane
def test_stdout_and_stderr_a_closed_pipe_serve_and_stop_at_once(tmp_path: Path) -> None:
    """``balancer serve --access-log - 2>&1 | head``: the reader gone, every write
    to stdout or stderr is EPIPE. Requests are served by the same worker, and
    SIGTERM stops the balancer at once (bug: printing the access log's failure
    failed inside gevent's loop, the log's writer never returned, and the worker
    waited for it at its stop: 5 s, or until the arbiter's kill)."""
    bal = Balancer(tmp_path, {"app.test": STATIC}, args=["--access-log", "-"], prefix=HEAD)
    try:
        worker = bal.api("GET", "/api/v1/info")[1]["processes"][0]["pid"]
        for dropped in (5, 10, 15):
            serve_some(bal, 5)
            wait_for(lambda n=dropped: metric(
                bal.metrics(), "balancer_access_log_dropped_records_total") >= n, WAIT,
                what=f"{dropped} records dropped")
        assert bal.api("GET", "/api/v1/info")[1]["processes"][0]["pid"] == worker
    finally:
        started = time.monotonic()
        assert bal.stop() == 0
    assert time.monotonic() - started < 3.0


def test_a_balancer_started_with_stdout_closed_serves(tmp_path: Path) -> None:
    """Descriptor 1 closed at start (``>&-``): it is opened on /dev/null, so the
    access log (``-``) goes nowhere and no file the balancer opens takes it."""
    bal = Balancer(tmp_path, {"app.test": STATIC}, args=["--access-log", "-"],
                   prefix=CLOSED_STDOUT)
    try:
        serve_some(bal, 3)
        for kind in ("worker", "management"):
            assert os.readlink(f"/proc/{child_pid(bal, kind)}/fd/1") == os.devnull
    finally:
        bal.stop()
    assert "Traceback" not in bal.output()


# the routes file ------------------------------------------------------------------
def peak_memory_kib(pid: int) -> int:
    """Process `pid`'s peak resident memory (VmHWM), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def test_a_huge_routes_file_is_refused_unread_and_a_whole_table_repairs_it(
        tmp_path: Path) -> None:
    """A 1 GiB sparse file in place of the routes file (a log or a dump written to
    the wrong path): reported corrupt at once, the last good table served, no
    process reads it (each read it whole before, and held it twice: 2 GB of
    memory apiece, the management API stuck, requests held up to 10 s)."""
    bal = Balancer(tmp_path, {"app.test": STATIC})
    try:
        huge = tmp_path / "huge.tmp"
        with open(huge, "wb") as f:
            f.write(b'{"version": 9, "hosts": {')
            f.truncate(1 << 30)
        os.replace(huge, bal.routes)
        wait_for(lambda: "more than the 256 MiB" in bal.store_problem(), WAIT,
                 what="the huge file reported")
        assert request(bal.port)[2] == b"hi"
        for kind in ("worker", "management"):
            assert peak_memory_kib(child_pid(bal, kind)) < 200 * 1024
        status, answer = bal.api("PUT", "/api/v1/hosts", {"hosts": {
            "app.test": {**STATIC, "body": "repaired"}}})
        assert status == 200, answer
        wait_for(lambda: request(bal.port)[2] == b"repaired" and bal.store_problem() == "",
                 WAIT, what="the repaired table served")
        assert bal.routes.stat().st_size < 4096
    finally:
        bal.stop()


# the file store's writes ----------------------------------------------------------
def leftovers(directory: Path) -> list[str]:
    """Temporary files of atomic writes left in `directory`."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_store_writes_past_the_file_size_limit_are_507_and_change_nothing(
        tmp_path: Path, backend: Any) -> None:
    """The management process's file size limit lowered below every file it would
    write (as a full disk, ENOSPC, would): a rule, a certificate and a deploy are
    each refused with 507 `store_full` naming the cause; the files stay as they
    were, no temporary file is left, the worker serves the old table; with room
    again the same write succeeds."""
    from tests.test_tls import CA

    bal = Balancer(tmp_path, {"app.test": STATIC})
    try:
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()
                  and p.name.startswith("routes.json")}
        management = child_pid(bal, "management")
        limit_file_size(management, 64)
        chain, key = CA.issue("app.test")
        for method, path, body in (
                ("PUT", "/api/v1/hosts/b.test", STATIC),
                ("PUT", "/api/v1/hosts", {"hosts": {"b.test": STATIC}}),
                ("PUT", "/api/v1/certs/app.test", {"chain": chain, "key": key}),
                ("POST", "/api/v1/hosts/app.test/deploy", {"backends": [backend.address]})):
            status, answer = bal.api(method, path, body)
            assert status == 507 and answer["error"] == "store_full", (path, answer)
            assert "file size limit" in answer["message"], answer
        after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()
                 and p.name.startswith("routes.json")}
        assert {n: b for n, b in after.items() if n in before} == before
        assert not set(after) - set(before) - {"routes.json.acme.json"}, after.keys()
        assert leftovers(tmp_path) == []
        assert request(bal.port, host="b.test")[0] == 404
        limit_file_size(management, None)
        status, answer = bal.api("PUT", "/api/v1/hosts/b.test", STATIC)
        assert status == 200, answer
        assert request(bal.port, host="b.test")[0] == 200
    finally:
        bal.stop()


def test_a_store_file_write_over_the_cap_is_refused_before_writing(
        tmp_path: Path, monkeypatch: Any) -> None:
    """A table that would make a routes file no reader takes (`MAX_FILE_BYTES`,
    lowered here) is refused whole: the file keeps the last table."""
    from balancer.stores import StoreFull, atomic
    from balancer.stores.file import FileStore

    store = FileStore(str(tmp_path / "routes.json"))
    store.put_host("a.test", STATIC)
    kept = (tmp_path / "routes.json").read_bytes()
    monkeypatch.setattr(atomic, "MAX_FILE_BYTES", 1000)
    try:
        store.replace({f"h{i}.test": STATIC for i in range(50)})
    except StoreFull as exc:
        assert "more than the" in str(exc) and "LimitFSIZE" not in str(exc), exc
    else:
        raise AssertionError("written")
    assert (tmp_path / "routes.json").read_bytes() == kept
    assert leftovers(tmp_path) == []


# the wall clock ---------------------------------------------------------------------
class FakeDeployer:
    """What a deploy's `Run` asks of its `Deployer` in the warmup and drain steps: no
    balancer reports in-flight counts, the table no longer names the host."""

    def __init__(self) -> None:
        self.records = SimpleNamespace(inflight=dict, abort_request=lambda deploy_id: None)
        self.store = SimpleNamespace(load=lambda: SimpleNamespace(version=2, hosts={}),
                                     host_rule=lambda host: HostRule(2, None))
        self.taken: set[str] = set()  # (no other process takes a deploy over)
        self.lost = lambda: None  # the store kept its table

    def patiently(self, record: dict[str, Any], what: str, call: Any) -> Any:
        return call()

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)

    def save(self, record: dict[str, Any]) -> None:
        pass


def deploy_step_seconds(monkeypatch: Any, step: str, jump: float) -> float:
    """How long a deploy's `step` ("warmup" or "drain", each set to 0.5 s) waits
    when the wall clock jumps by `jump` seconds 0.1 s after it began; at most WAIT."""
    from management import deploy_run

    now = time.time()
    record = {"id": "d1", "host": "app.test", "from": ["127.0.0.1:1"],
              "to": ["127.0.0.1:2"], "since": now, "started": now, "version": 2,
              "steps": [], "settings": {"warmup": 0.5, "drain_timeout": 0.5}}
    if step == "drain":
        record["since"] = record["started"] = now - 10  # the warmup is over
    started = time.monotonic()
    monkeypatch.setattr(deploy_run, "time", SimpleNamespace(
        time=lambda: time.time() + (jump if time.monotonic() > started + 0.1 else 0.0),
        monotonic=time.monotonic))
    run = deploy_run.Run(FakeDeployer(), record, resumed=False)  # type: ignore[arg-type]
    waiting = threading.Thread(target=getattr(run, step), daemon=True)
    waiting.start()
    waiting.join(WAIT)
    assert not waiting.is_alive(), f"the {step} waited past {WAIT} s"
    return time.monotonic() - started


@pytest.mark.parametrize("step", ["warmup", "drain"])
def test_a_deploy_step_waits_its_time_whatever_the_wall_clock_does(
        monkeypatch: Any, step: str) -> None:
    """Set back an hour while the step waits, it waited an hour more; set ahead,
    it ended there. Now each waits its 0.5 s on the monotonic clock."""
    for jump in (-3600.0, 3600.0):
        assert 0.4 < deploy_step_seconds(monkeypatch, step, jump) < 3.0, (step, jump)


# the file size limit at start -----------------------------------------------------
def test_a_file_size_limit_too_low_for_the_workers_is_refused_at_start(
        tmp_path: Path) -> None:
    """Under ``ulimit -f`` of 1 MiB no worker could make its shared limits table
    (2 MiB): each died at its start, again and again, while the balancer said it
    was listening. Now `balancer serve` exits at once, naming the limit."""
    def limited() -> None:
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, hard))

    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")},
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "balancer", "serve", "--listen", "127.0.0.1:0",
         "--management", "127.0.0.1:0", "--store", f"file:{tmp_path / 'routes.json'}"],
        cwd=tmp_path, env=env, preexec_fn=limited, capture_output=True, text=True,
        timeout=2 * WAIT)
    assert done.returncode == 1, done.stderr
    assert "the file size limit is 1048576 bytes" in done.stderr, done.stderr
    assert "listening on" not in done.stderr


def test_acme_heartbeats_keep_their_pace_when_the_wall_clock_is_set_back(
        tmp_path: Path, monkeypatch: Any) -> None:
    """A balancer acknowledges the challenges every HEARTBEAT seconds, so issuers
    know it is alive. Its wall clock set back an hour, it did not beat for an hour
    (issuers stopped waiting for it); the beat is due by the monotonic clock now."""
    from balancer.stores.file import FileStore
    from management import acme_spread
    from tests.test_acme_spread import Workers

    acme = FileStore(str(tmp_path / "routes.json")).acme()
    relay = acme_spread.ChallengeRelay(acme, Workers(), "lb-a", lambda: True)
    relay.look()
    first = acme.acknowledgements()["lb-a"]["at"]
    elapsed = acme_spread.HEARTBEAT  # the next beat is due
    monkeypatch.setattr(acme_spread, "time", SimpleNamespace(
        time=lambda: time.time() - 3600, monotonic=lambda: time.monotonic() + elapsed))
    relay.look()
    assert acme.acknowledgements()["lb-a"]["at"] < first - 3000  # acknowledged again


# the run directory's file system full ----------------------------------------------
def test_the_shared_limits_files_have_their_blocks_when_made(tmp_path: Path) -> None:
    """The shared table of `limits` and a worker's journal are mapped files in the
    run directory. They were sparse: with its file system full (/tmp or /run on a
    full tmpfs) the first request whose key touched a new page killed its worker
    with SIGBUS, again after each restart. Now every block is allocated when the
    file is made (found by hand on a full tmpfs: 300 limited clients, no crash)."""
    from balancer.limits import TABLE_BYTES, SharedBuckets, journal_path

    path = tmp_path / "limits.shm"
    buckets = SharedBuckets(str(path))
    try:
        for made, size in ((path, TABLE_BYTES),
                           (Path(journal_path(str(path), os.getpid())), TABLE_BYTES // 8)):
            assert made.stat().st_blocks * 512 >= size, made
    finally:
        buckets.close()


def test_shared_limits_that_cannot_be_made_hold_per_worker(
        tmp_path: Path, monkeypatch: Any, caplog: Any) -> None:
    """No room to make the shared table: the worker serves with limits of its own
    (logged), instead of failing to start."""
    import errno

    from balancer.limits import SharedBuckets

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    buckets = SharedBuckets(str(tmp_path / "limits.shm"))
    try:
        offset = buckets.slot(b"client", 1000.0)
        assert buckets.take(offset, 1000.0, 0.1, 0.0) == 0.0
        assert buckets.take(offset, 1000.0, 0.1, 0.0) == pytest.approx(0.1)
    finally:
        buckets.close()
    assert "cannot make the shared table" in caplog.text
    assert "No space left on device" in caplog.text


def test_a_history_save_that_finds_no_room_is_one_line_and_leaves_no_part(
        tmp_path: Path, monkeypatch: Any, caplog: Any) -> None:
    """The management process saves its history to the run directory every 30 s.
    With no room there, each failure raised out of the sampling loop (a traceback
    every 30 s) and left its part written (on the full file system)."""
    import errno
    import json

    from management import history

    def no_room(doc: Any, out: Any) -> None:
        out.write('{"format": 1, "points": ')
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    caplog.set_level("INFO", "balancer.history")
    kept = history.History(str(tmp_path / "history.json"))
    monkeypatch.setattr(json, "dump", no_room)
    for n in range(3 * history.SAVE_EVERY):  # three saves
        kept.sample({"hosts": {}}, 1000.0 + n * history.INTERVAL)
    assert caplog.text.count("history: cannot save") == 1, caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.undo()
    for n in range(history.SAVE_EVERY):
        kept.sample({"hosts": {}}, 2000.0 + n * history.INTERVAL)
    assert "saved to" in caplog.text and (tmp_path / "history.json").exists()
    assert caplog.text.count("history: cannot save") == 1


def test_a_retiring_worker_without_room_for_its_counters_says_so(
        tmp_path: Path, monkeypatch: Any, caplog: Any) -> None:
    """A worker that stops leaves its counters in the run directory for the
    management process. With no room there it died with a traceback (exit 1) and
    left its part written; now it logs what is lost and exits as usual."""
    import errno

    from balancer.control import write_retired
    from balancer.stats import Stats

    worker = SimpleNamespace(
        stats=Stats(), tables=SimpleNamespace(store_problem=None),
        store=SimpleNamespace(last_error=lambda: None, is_reachable=lambda: True),
        access_log=SimpleNamespace(dropped_total=0))

    def no_room(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", no_room)
    write_retired(str(tmp_path), worker, 1000.0)
    assert "cannot leave this worker's counters" in caplog.text
    assert list(tmp_path.iterdir()) == []


def test_a_small_store_file_is_read_without_a_cap_sized_buffer(tmp_path: Path) -> None:
    """Reading a small routes file allocates about its size. Bug: every read
    asked for `MAX_FILE_BYTES + 1` (256 MiB), so a store read failed outright
    under an address-space limit (`ulimit -v`)."""
    import tracemalloc

    from balancer.stores.atomic import read_regular

    path = tmp_path / "routes.json"
    path.write_bytes(b"{}" * 500)
    tracemalloc.start()
    try:
        data = read_regular(str(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert data == b"{}" * 500
    assert peak < 1 << 20, peak


def test_a_store_file_that_grows_while_read_is_read_whole_or_refused(
        monkeypatch: Any) -> None:
    """A file larger than its fstat said (a pipe's size is 0: a file that grew
    after the fstat) is read on past that size, up to the cap and no further."""
    from balancer.stores import atomic

    def read_pipe(payload: bytes) -> bytes:
        r, w = os.pipe()
        writer = threading.Thread(target=lambda: (os.write(w, payload), os.close(w)))
        writer.start()
        try:
            with open(r, "rb") as f:
                return atomic.read_capped(f)
        finally:
            writer.join(5)

    payload = bytes(range(256)) * 40
    assert read_pipe(payload) == payload
    monkeypatch.setattr(atomic, "MAX_FILE_BYTES", 5000)
    monkeypatch.setattr(atomic, "GROWTH_SLICE", 700)
    try:
        read_pipe(payload)
    except atomic.TooLarge as exc:
        assert str(exc).startswith("5001 bytes"), exc
    else:
        raise AssertionError("read past the cap")
