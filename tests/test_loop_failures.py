"""The long-lived loops of every process survive what their inputs can hold, and
say so (balancer/restarts.py, docs/operations.md "When a loop fails").

Each test damages an input at its edge: the store's files or keys as a hand edit
or a broken tool leaves them, a process answering garbage on a worker's control
socket. Where no input can reach a failure (the health check's parser takes any
bytes a backend sends: fuzzed in tests/test_health.py), a scripted failure
(`constants_prefix`'s ``fail``) stands for the bug. Defects found and fixed
(each test fails without its fix):

* A tls-alpn-01 challenge whose text is no UTF-8 raised out of the worker's
  challenge look, which swallowed it silently at every look: no challenge of
  the store was served any more, http-01 ones included.
* The certificates file replaced by a directory was reported nowhere
  (``store.certs_problem`` null, no log line); certificate writes answered 503.
* A health check that raised ended its checker: the backend stayed up or down
  for good, whatever it answered after.
* A deploy claim whose beat is no number raised in the deploy watch of every
  management process, a traceback logged every 0.25 s, for good.
* A worker's control answer that is not a JSON object made every statistics
  call answer 500 and logged a traceback at each history sample.
* ``POST /api/v1/reload`` after a hand repair left the store problem reported
  until the next write.
* A Redis database the server refuses was "unreachable" in the management
  process's log; a database with no table beside others was not told at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.certificates import make_record
from balancer.restarts import Restarts, every
from tests.acmefake import FakeAcme
from tests.conftest import RedisServer
from tests.rawpeer import Link, Relay, cut, serve_each
from tests.support import (
    Balancer,
    InProcessWorkers,
    TableStore,
    calls,
    constants_prefix,
    control_socket,
    more_calls,
    replace_file,
    request,
    wait_for,
)
from tests.test_certs_damage import put
from tests.test_health import FAST_CHECKS, HOST, scripted, state_of
from tests.test_process import wait_workers
from tests.test_tls import CA

WAIT = 10.0
STATIC = {"action": "static", "status": 200, "body": "hi"}
TOKEN = "evaGxfADs6pSRb2LAv9IZf17Dt3juxGJ-PCt92wr-oA"
ANSWER = TOKEN + ".9jg46WB3rR_AHD-EBXdN7cBkH1WOu0tA3M9fm21mqTI"


def tracebacks(bal: Balancer) -> int:
    return bal.output().count("Traceback")


def test_a_challenge_that_is_no_utf8_leaves_the_others_served(tmp_path: Path) -> None:
    """The store's challenges file holds a tls-alpn-01 record whose chain is a lone
    surrogate (valid JSON, no UTF-8) beside an http-01 challenge."""
    bal = Balancer(tmp_path, {"app.test": STATIC})
    try:
        expires = time.time() + 600
        bad = {"type": "tls-alpn-01", "host": "alpn.test", "chain": "\ud800", "key": "k",
               "expires": expires}
        good = {"type": "http-01", "host": "app.test", "token": TOKEN,
                "key_authorization": ANSWER, "expires": expires}
        Path(f"{bal.routes}.challenges.json").write_text(json.dumps(
            {"challenges": {"tls-alpn-01:alpn.test": bad, f"http-01:{TOKEN}": good}}))
        wait_for(lambda: request(bal.port, path=f"/.well-known/acme-challenge/{TOKEN}",
                                 host="app.test")[2] == ANSWER.encode(), WAIT,
                 what="the http-01 challenge served")
        wait_for(lambda: "TLS-ALPN-01 certificate of alpn.test cannot be loaded" in
                 bal.output(), WAIT, what="the record's line")  # (a process's log is
        # written by a thread of its own, `balancer.processlog`: after the answer, maybe)
    finally:
        bal.stop()


def test_a_certificates_file_replaced_by_a_directory_is_reported_until_repaired(
        tmp_path: Path) -> None:
    looks = tmp_path / "looks"
    bal = Balancer(tmp_path, {"a.test": STATIC}, args=["--tls-listen", "127.0.0.1:0"],
                   prefix=constants_prefix({}, count=(["management.certs_watch:CertsWatch.look"],
                                                      looks)))
    try:
        assert put(bal, "a.test")[0] == 200
        certs = Path(f"{bal.routes}.certs.json")
        saved = certs.read_bytes()
        certs.unlink()
        certs.mkdir()

        def problem() -> str:
            return bal.api("GET", "/api/v1/info")[1]["store"]["certs_problem"] or ""

        wait_for(lambda: "not a regular file" in problem(), WAIT, what="certs_problem")
        assert "cannot read the certificates file" in problem()
        more_calls(looks, 2, "the certificates watch's look")  # logged once
        assert bal.output().count("not a regular file") == 1
        certs.rmdir()
        tmp = certs.with_suffix(".tmp")
        tmp.write_bytes(saved)
        os.replace(tmp, certs)
        wait_for(lambda: problem() == "", WAIT, what="the problem cleared")
        assert put(bal, "a.test")[0] == 200
    finally:
        bal.stop()


def test_a_health_check_that_fails_unexpectedly_goes_on_checking(tmp_path: Path) -> None:
    """The check's read of the answer raises (scripted) while the flag exists: the
    checker keeps the backend's verdict, logs it once, and checks again after."""
    app = scripted("app")
    flag = tmp_path / "fail"
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [app.address],
                                     "health": FAST_CHECKS}}, args=["--workers", "1"],
                   prefix=constants_prefix({"balancer.restarts.RESTART_CAP": 1.0},
                                           fail=(["balancer.health:read_status"], flag)))
    try:
        app.sick = True  # type: ignore[attr-defined]
        wait_for(lambda: state_of(bal, app) == "down", WAIT, what="down")
        flag.touch()
        failed = "its health check failed unexpectedly (RuntimeError: scripted failure)"
        wait_for(lambda: failed in bal.output(), WAIT, what="the failure logged")
        wait_for(lambda: failed in bal.host_stats(HOST)["backends"][app.address]
                 .get("problem", ""), WAIT, what="the failure as the backend's problem")
        checks = len(app.checks)  # type: ignore[attr-defined]
        wait_for(lambda: len(app.checks) >= checks + 3, WAIT,  # type: ignore[attr-defined]
                 what="more checks failing")  # logged once, still down
        assert bal.output().count(failed) == 1 and tracebacks(bal) == 1
        assert state_of(bal, app) == "down"
        app.sick = False  # type: ignore[attr-defined]
        flag.unlink()
        wait_for(lambda: state_of(bal, app) == "up", WAIT, what="checked up again")
    finally:
        flag.unlink(missing_ok=True)
        bal.stop()
        app.stop()


@pytest.mark.parametrize("ended_by", ["a check that works", "the rule without health"])
def test_a_health_check_failing_unexpectedly_on_a_backend_up_is_its_problem(
        tmp_path: Path, ended_by: str) -> None:
    """The same failure while the backend is up: its verdict (up) is kept and the
    failure is the backend's ``problem`` in ``GET /api/v1/stats`` (bug: shown only
    while it was down: an operator saw an up backend nothing checked any more, the
    failure in one log line), until a check works again, or the rule drops
    ``health`` (bug: the stopped checker left its failure behind, the up backend's
    problem for good)."""
    app = scripted("app")
    flag = tmp_path / "fail"
    rule = {"action": "proxy", "backends": [app.address]}
    bal = Balancer(tmp_path, {HOST: {**rule, "health": FAST_CHECKS}}, args=["--workers", "1"],
                   prefix=constants_prefix({"balancer.restarts.RESTART_CAP": 1.0},
                                           fail=(["balancer.health:read_status"], flag)))

    def backend() -> dict[str, Any]:
        return bal.host_stats(HOST)["backends"].get(app.address, {})

    try:
        wait_for(lambda: len(app.checks) >= 1, WAIT, what="checked")  # type: ignore[attr-defined]
        flag.touch()
        failed = "its health check failed unexpectedly (RuntimeError: scripted failure)"
        wait_for(lambda: failed in backend().get("problem", ""), WAIT,
                 what="the failure as the backend's problem")
        assert backend()["state"] == "up"
        if ended_by == "a check that works":
            flag.unlink()
        else:
            assert bal.api("PUT", "/api/v1/hosts", {"hosts": {HOST: rule}})[0] == 200
        wait_for(lambda: "problem" not in backend(), WAIT, what="the problem ended")
        assert backend()["state"] == "up"
    finally:
        flag.unlink(missing_ok=True)
        bal.stop()
        app.stop()


@pytest.fixture(scope="module")
def claims_bal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    """One balancer for the claims below (each written once the last is released)."""
    bal = Balancer(tmp_path_factory.mktemp("claims"), {"app.test": STATIC})
    yield bal
    bal.stop()


@pytest.mark.parametrize("beat", ["soon", None, [1], 1e400])
def test_a_deploy_claim_whose_beat_is_no_number_is_stale(claims_bal: Balancer,
                                                         beat: Any) -> None:
    """A hand-edited claim on a host with no deploy record behind it: released as
    any stale claim is, with no traceback."""
    bal = claims_bal
    mark = len(bal.output())
    records = Path(f"{bal.routes}.deploys.json")
    claim = {"id": "20261207-000000-abcdef", "owner": "elsewhere", "beat": beat}
    replace_file(records, json.dumps({"deploys": {}, "claims": {"app.test": claim},
                                      "inflight": {}}))

    def claims() -> dict[str, Any]:
        return json.loads(records.read_text()).get("claims", {})

    wait_for(lambda: claims() == {}, WAIT, what="the claim released")
    assert bal.output()[mark:].count("Traceback") == 0, bal.output()[mark:]


@pytest.fixture
def garbage_worker(tmp_path: Path) -> Iterator[Callable[[Path, bytes, int], None]]:
    """``start(run_dir, answer, pid)``: a socket named as worker `pid`'s in the run
    directory that answers every command `answer` (removed after the test)."""
    listeners: list[tuple[socket.socket, Path]] = []

    def start(run_dir: Path, answer: bytes, pid: int) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        path = run_dir / f"worker-{pid}.sock"
        listener.bind(str(path))
        listener.listen(16)
        listeners.append((listener, path))

        def serve(conn: socket.socket) -> None:
            with conn, contextlib.suppress(OSError):
                conn.settimeout(2)
                conn.recv(65536)
                conn.sendall(answer)

        serve_each(listener, serve)

    yield start
    for listener, path in listeners:
        listener.close()
        path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    bal = Balancer(tmp_path_factory.mktemp("answers"), {"app.test": STATIC},
                   args=["--workers", "1"])
    yield bal
    bal.stop()


@pytest.mark.parametrize(("answer", "pid"), [(b"[]", 999997), (b'"x"', 999998),
                                             (b'{"no": "pid"}', 999999)])
def test_a_control_answer_that_is_not_a_workers_is_no_answer(
        one_worker: Balancer, garbage_worker: Callable[[Path, bytes, int], None],
        answer: bytes, pid: int) -> None:
    """One balancer for the three answers, each from a pid of its own (the last
    test's fake worker gone: it must no longer be listed)."""
    bal = one_worker
    mark = len(bal.output())
    run_dir = Path(control_socket(wait_workers(bal, 1)[0])).parent
    garbage_worker(run_dir, answer, pid)
    assert request(bal.port, host="app.test")[0] == 200
    status, stats = bal.api("GET", "/api/v1/stats")
    assert status == 200, stats
    assert [lag["pid"] for lag in stats["lagging"]] == [pid]
    assert "no usable answer" in stats["lagging"][0]["reason"]
    assert stats["hosts"]["app.test"]["completed_requests"] >= 1
    assert bal.output()[mark:].count("Traceback") == 0, bal.output()[mark:]


def exiting_worker(run_dir: Path, pid: int) -> Callable[[], None]:
    """A socket named as worker `pid`'s that answers ``version`` asks as a worker
    does, and at its first ``apply`` ends as a worker's at its exit: the listener
    closed, the ask unread (a reset), the file left; returns its clean-up."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    path = run_dir / f"worker-{pid}.sock"
    listener.bind(str(path))
    listener.listen(16)

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            conn.settimeout(2)
            command = conn.recv(65536, socket.MSG_PEEK)
            if command.startswith(b"apply"):
                cut(listener)  # (closed with the ask unread: the management process's reset)
                return
            conn.recv(65536)
            conn.sendall(json.dumps({"pid": pid, "version": 0, "highest": 0,
                                     "loaded": True}).encode())

    serve_each(listener, serve)

    def clean_up() -> None:
        listener.close()
        path.unlink(missing_ok=True)
    return clean_up


def test_a_write_is_applied_when_a_worker_exits_while_asked(one_worker: Balancer) -> None:
    """A worker that ends its drain (a reload's old one) while a write asks it serves
    nobody: the write is answered 200, not 202 naming it. Bug: 202 with it in
    `lagging`, "no usable answer: [Errno 104] Connection reset by peer", though
    every worker serving had the write."""
    bal = one_worker
    run_dir = Path(control_socket(wait_workers(bal, 1)[0])).parent
    clean_up = exiting_worker(run_dir, 999995)
    try:
        status, answer = bal.api("PUT", "/api/v1/hosts/exiting.test", STATIC)
    finally:
        clean_up()
    assert status == 200 and "lagging" not in answer, answer


def test_reload_ends_a_store_problem_a_hand_repair_fixed(
        redis_factory: Callable[[], RedisServer], tmp_path: Path) -> None:
    """A rule damaged by hand is reported; repaired by hand (no message, the version
    unmoved: the watch has nothing to read again), ``POST /api/v1/reload`` reads
    the table whole, and the problem ends with it, as an nginx reload would."""
    redis = redis_factory()
    looks = tmp_path / "looks"
    bal = Balancer(tmp_path, None, store=redis.url, args=["--workers", "1"],
                   config="[store]\nresync_interval = 0.2\n",
                   prefix=constants_prefix({}, count=(
                       ["balancer.stores.redis_watch:RedisWatching._resync"], looks)))
    raw = redis.client()
    try:
        assert bal.api("PUT", "/api/v1/hosts", {"hosts": {"app.test": STATIC}})[0] == 200
        good = raw.hget("balancer:hosts", "app.test")
        raw.hset("balancer:hosts", "app.test", "{not json")
        raw.publish("balancer:changes", raw.get("balancer:version"))
        wait_for(lambda: "not valid JSON" in bal.store_problem(), WAIT, what="the damage")
        raw.hset("balancer:hosts", "app.test", good)
        more_calls(looks, 2, "the watches' version checks", processes=2)  # find it served
        assert "not valid JSON" in bal.store_problem()
        assert bal.api("POST", "/api/v1/reload")[0] == 200
        assert bal.store_problem() == "" and bal.store_up() == 1
    finally:
        bal.stop()


def test_a_database_redis_refuses_is_not_called_unreachable(
        redis_server: RedisServer, tmp_path: Path) -> None:
    url = redis_server.url.rpartition("/")[0] + "/99"
    bal = Balancer(tmp_path, store=url)
    try:
        wait_for(lambda: "Redis refused to be followed" in bal.output(), WAIT,
                 what="the management process's line")
        assert "unreachable" not in bal.output()
        assert "the /N of store.url names a database this Redis refuses" in \
            bal.store_problem()
    finally:
        bal.stop()


def test_a_database_with_no_table_beside_others_is_told_once(
        redis_server: RedisServer, tmp_path: Path) -> None:
    base = redis_server.url.rpartition("/")[0]
    other = redis_server.client()
    other.set("loops-test:elsewhere", "1")  # db 0 holds keys
    bal = Balancer(tmp_path, store=f"{base}/7")
    try:
        told = "database 7 holds no routing table (no balancer:version)"
        wait_for(lambda: told in bal.output(), WAIT, what="the warning")
        assert "if the table is there, the /N of store.url is wrong" in bal.output()
        assert bal.output().count(told) == 1  # the management process's, not each worker's
    finally:
        bal.stop()
        other.delete("loops-test:elsewhere")


def test_an_acme_step_that_fails_unexpectedly_is_the_issuers_problem(tmp_path: Path) -> None:
    """What is due is judged by code that raises (scripted) while the flag exists:
    ``GET /api/v1/acme`` says so in ``problem``, logged once, until a step succeeds."""
    flag = tmp_path / "fail"
    prefix = constants_prefix({"management.acme_issuer.CHECK_INTERVAL": 0.3},
                              fail=(["management.acme_issuer:due"], flag))
    flag.touch()
    bal = Balancer(tmp_path, {"app.test": {**STATIC, "tls": "acme"}}, prefix=prefix,
                   config='[acme]\ndirectory = "http://127.0.0.1:9/dir"\n')  # never reached
    try:
        def problem() -> str:
            return bal.api("GET", "/api/v1/acme")[1]["problem"] or ""

        failed = "the issuer's step failed unexpectedly (RuntimeError: scripted failure)"
        wait_for(lambda: failed in problem(), WAIT, what="the failure as the issuer's problem")
        passes = bal.api("GET", "/api/v1/acme")[1]["passes"]["count"]
        wait_for(lambda: bal.api("GET", "/api/v1/acme")[1]["passes"]["count"] >= passes + 3,
                 WAIT, what="more steps")
        assert bal.output().count(failed) == 1 and tracebacks(bal) == 1
        flag.unlink()
        wait_for(lambda: problem() == "", WAIT, what="the problem cleared")
    finally:
        flag.unlink(missing_ok=True)
        bal.stop()


def test_an_issuer_whose_step_keeps_failing_hands_the_lock_to_another_balancer(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """Two balancers on one Redis store and a scripted ACME CA: the first takes
    the issuer lock, then its step fails unexpectedly at every look (scripted:
    what is due is judged by code that raises). After `STAND_ASIDE_AFTER` looks it
    releases the lock, and the second balancer's issuer takes it and issues (bug:
    the failing step extended the lock at every look: nothing was ever issued).
    Its first release fails with a store error (scripted): it is tried again while
    the first stands aside, and the second takes the lock then, the first never
    back in between (bug: not tried again, the first, back after its aside,
    extended the lock it still held, and released it only at its next stand-aside)."""
    ca = FakeAcme("ok")
    flag, refused = tmp_path / "fail", tmp_path / "refused"
    cluster = f'[store]\nnamespace = "loops-{uuid.uuid4().hex[:8]}"\n' \
              f'[acme]\ndirectory = "{ca.url}"\n'
    quick = {"management.acme_issuer.CHECK_INTERVAL": 0.3}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    flag.touch()
    refused.touch()
    unlock = ("balancer.stores.acme:RedisAcme.unlock"
              f"!balancer.stores.base:StoreUnavailable@{refused}")
    a = Balancer(tmp_path / "a", None, store=redis_server.url, config=cluster,
                 prefix=constants_prefix({**quick, "management.acme_issuer.TICK": 0.5},
                                         fail=(["management.acme_issuer:due", unlock], flag)))
    b: Balancer | None = None
    try:
        def issuer(bal: Balancer) -> dict[str, Any]:
            return bal.api("GET", "/api/v1/acme")[1]

        rule = {**STATIC, "tls": "acme"}
        assert a.api("PUT", "/api/v1/hosts", {"hosts": {"app.test": rule}})[0] == 200

        wait_for(lambda: "scripted failure" in (issuer(a)["problem"] or ""), WAIT,
                 what="the first balancer's step failing")
        assert issuer(a)["issuer"]["this_balancer"], "the lock taken first"
        b = Balancer(tmp_path / "b", None, store=redis_server.url, config=cluster,
                     prefix=constants_prefix(quick))
        wait_for(lambda: "releasing the issuer lock failed (scripted failure)" in a.output(),
                 WAIT, what="the first balancer's release refused")
        asides = a.output().count("steps in a row failed unexpectedly")
        refused.unlink()
        wait_for(lambda: issuer(b)["hosts"].get("app.test", {}).get("state") == "issued",
                 3 * WAIT, what="the certificate issued by the second balancer")
        assert "took the lock" in b.output()
        assert a.output().count("steps in a row failed unexpectedly") == asides
        assert "released the issuer lock (another balancer's issuer may take it)" in a.output()
        assert "acme: issuing a certificate" not in a.output()
    finally:
        flag.unlink(missing_ok=True)
        a.stop()
        if b is not None:
            b.stop()
        ca.stop()


def test_the_watchdog_goes_on_after_a_tick_that_fails(tmp_path: Path) -> None:
    """A tick of the worker's watchdog raises (scripted) while the flag exists;
    once it is gone, a client that sends half a head is cut at client_header again."""
    flag, ticks = tmp_path / "fail", tmp_path / "ticks"
    tick = ["balancer.server:Worker.expire_overdue"]
    bal = Balancer(tmp_path, {"app.test": STATIC}, args=["--workers", "1"],
                   config="[timeouts]\nclient_header = 0.5\n",
                   prefix=constants_prefix({}, fail=(tick, flag), count=(tick, ticks)))
    try:
        flag.touch()
        failed = "the watchdog failed unexpectedly (RuntimeError: scripted failure)"
        wait_for(lambda: failed in bal.output(), WAIT, what="the failure logged")
        more_calls(ticks, 3, "the watchdog's tick")  # failing: logged once
        assert bal.output().count(failed) == 1 and tracebacks(bal) == 1
        flag.unlink()
        with socket.create_connection(("127.0.0.1", bal.port), timeout=WAIT) as client:
            client.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\n")  # never ends
            answer = b""
            while chunk := client.recv(65536):  # until the balancer closes (or WAIT)
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 408"), answer
    finally:
        flag.unlink(missing_ok=True)
        bal.stop()


class Unexpirable:
    """A connection the watchdog cannot judge: its deadline raises (a bug's stand-in;
    no input is known to make a real one)."""

    @property
    def deadline(self) -> float:
        raise KeyError("scripted failure")

    def __hash__(self) -> int:
        return 0  # first in a set's order, before the real connections (made later, by id)


def test_one_connection_the_watchdog_cannot_expire_leaves_the_others_expired() -> None:
    """An in-process worker's clients each send half a head; a connection whose
    expiry raises sits among them, before some of them in the watchdog's order
    (bug: those after it were never expired: no 408, no close, for good)."""
    from tests.test_inline import connect, get, until
    from tests.test_parked_start import all_closed, closed_by_worker

    workers = InProcessWorkers()
    w = workers.start(TableStore({"app.test": STATIC}), {})
    clients, broken = [], []
    try:
        for _ in range(4):
            clients.append(connect(w))
            clients[-1].sendall(get("/")[:-2])  # the head's end never comes
        assert until(lambda: len(w.io.connections) == 4)
        real = set(w.io.connections)
        broken.append(Unexpirable())
        w.io.connections.add(broken[0])
        order = list(w.io.connections)  # the watchdog's: some real one after the broken
        assert real & set(order[order.index(broken[0]):]), "the test could not fail"
        for client in clients:
            client.sock.settimeout(WAIT)
            assert closed_by_worker(client).startswith(b"HTTP/1.1 408 "), "not expired"
        assert until(lambda: not real & w.io.connections)
    finally:
        w.io.connections.difference_update(broken)
        for client in clients:
            client.close()
        assert until(lambda: all_closed(w))
        workers.close()


def test_the_certificates_watches_go_on_after_an_unexpected_failure(tmp_path: Path) -> None:
    """The certificates file's signature raises (scripted) in the management
    process's watch and the worker's follow alike: each says so once, the first as
    ``store.certs_problem``, and both follow the file again after."""
    flag, looks = tmp_path / "fail", tmp_path / "looks"
    signature = ["balancer.stores.certs:FileCerts.signature"]
    # (the watch's failures come its 1 s period and its pause apart, the cap at most:
    # within twice the cap, the same failure again)
    bal = Balancer(tmp_path, {"a.test": STATIC}, args=["--tls-listen", "127.0.0.1:0",
                                                       "--workers", "1"],
                   prefix=constants_prefix({"balancer.restarts.RESTART_CAP": 2.0},
                                           fail=(signature, flag), count=(signature, looks)))
    try:
        assert put(bal, "a.test")[0] == 200
        flag.touch()

        def problem() -> str:
            return bal.api("GET", "/api/v1/info")[1]["store"]["certs_problem"] or ""

        watch = "the watch on the store's certificates failed unexpectedly (RuntimeError"
        follow = "following the store's certificates failed unexpectedly (RuntimeError"
        wait_for(lambda: watch in problem(), WAIT, what="certs_problem")
        wait_for(lambda: follow in bal.output(), WAIT, what="the worker's line")
        more_calls(looks, 2, "the certificates' signature", processes=2)  # each fails again
        assert bal.output().count(watch) == 1 and bal.output().count(follow) == 1
        flag.unlink()
        wait_for(lambda: problem() == "", WAIT, what="the problem cleared")
    finally:
        flag.unlink(missing_ok=True)
        bal.stop()


def test_the_challenges_follow_goes_on_after_an_unexpected_failure(tmp_path: Path) -> None:
    """The challenges file's signature raises (scripted) in the worker's follow and
    the management process's relay: each says so once (the worker's was swallowed
    at every look), and a challenge published meanwhile is served after."""
    flag, looks = tmp_path / "fail", tmp_path / "looks"
    signature = ["balancer.stores.acme:FileAcme.challenges_signature"]
    bal = Balancer(tmp_path, {"app.test": STATIC}, args=["--workers", "1"],
                   prefix=constants_prefix({"balancer.restarts.RESTART_CAP": 1.0},
                                           fail=(signature, flag), count=(signature, looks)))
    try:
        flag.touch()
        follow = "following the store's challenges failed unexpectedly (RuntimeError"
        wait_for(lambda: follow in bal.output(), WAIT, what="the worker's line")
        good = {"type": "http-01", "host": "app.test", "token": TOKEN,
                "key_authorization": ANSWER, "expires": time.time() + 600}
        Path(f"{bal.routes}.challenges.json").write_text(
            json.dumps({"challenges": {f"http-01:{TOKEN}": good}}))
        more_calls(looks, 2, "the challenges' signature")  # the follow fails again
        assert bal.output().count(follow) == 1
        wait_for(lambda: "relaying the challenges failed unexpectedly" in bal.output(), WAIT,
                 what="the management process's line")
        flag.unlink()
        wait_for(lambda: request(bal.port, path=f"/.well-known/acme-challenge/{TOKEN}",
                                 host="app.test")[2] == ANSWER.encode(), WAIT,
                 what="the challenge served")
    finally:
        flag.unlink(missing_ok=True)
        bal.stop()


def test_a_watch_failure_is_nothing_a_restore_writes_back(tmp_path: Path) -> None:
    """The management process's certificates watch fails unexpectedly (scripted:
    its look at the file's signature) while the file is whole, and a certificate
    is added to it meanwhile (by hand, or another balancer of the store): ``POST
    /api/v1/certs/restore`` (an operator reading ``store.certs_problem``) answers
    that there is nothing to restore (bug: it wrote the certificates last read
    over the store, the new one lost, and answered 500)."""
    flag = tmp_path / "fail"
    bal = Balancer(tmp_path, {"a.test": STATIC, "b.test": STATIC},
                   args=["--tls-listen", "127.0.0.1:0", "--workers", "1"],
                   prefix=constants_prefix({"balancer.restarts.RESTART_CAP": 1.0},
                                           fail=(["balancer.stores.certs:FileCerts.signature"],
                                                 flag)))
    certs = Path(f"{bal.routes}.certs.json")
    try:
        assert put(bal, "a.test")[0] == 200
        flag.touch()
        watch = "the watch on the store's certificates failed unexpectedly"
        wait_for(lambda: watch in (bal.api("GET", "/api/v1/info")[1]["store"]["certs_problem"]
                                   or ""), WAIT, what="certs_problem")
        doc = json.loads(certs.read_text())
        doc["certs"]["b.test"] = make_record("b.test", *CA.issue("b.test"))
        tmp = certs.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, certs)
        status, answer = bal.api("POST", "/api/v1/certs/restore")
        assert sorted(json.loads(certs.read_text())["certs"]) == ["a.test", "b.test"]
        assert (status, answer.get("error")) == (409, "nothing_to_restore"), answer
    finally:
        flag.unlink(missing_ok=True)
        bal.stop()


def _raise_at_one_line(turn: int) -> None:
    raise KeyError(turn)  # a count, a connection's id: new at every turn


def _raise_at_another(turn: int) -> None:
    raise KeyError(turn)


def test_a_failure_that_says_something_new_at_every_turn_is_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    """`balancer.restarts.every` on a step that keeps failing at the same line with
    a message of its own each time (bug: compared by its message, logged with its
    traceback at every turn: 4 a second in the watchdog); a failure at another line
    is another failure, logged too."""
    turns = 0

    def step() -> None:
        nonlocal turns
        turns += 1
        (_raise_at_one_line if turns < 30 else _raise_at_another)(turns)

    logger = logging.getLogger("balancer.test_restarts")
    restarts = Restarts("worker 1", logger, quiet=False, loop="the watchdog",
                        then="trying again at its next tick")
    with caplog.at_level(logging.ERROR, logger=logger.name):
        every(0.0, step, lambda: turns >= 40, restarts)
    logged = [r.getMessage() for r in caplog.records if r.name == logger.name]
    assert turns == 40 and len(logged) == 2, logged
    assert "(KeyError: 1)" in logged[0] and "(KeyError: 30)" in logged[1]
    assert "(KeyError: 40)" in restarts.problem  # the problem told is the last one


def test_a_periodic_loop_told_to_stop_while_it_waits_takes_no_further_turn() -> None:
    """`balancer.restarts.every`: told to stop during its wait (the step is over,
    the loop waits for its next tick when this greenlet runs again), it returns
    without another step (bug: one more, after the worker stopped: the
    certificates' and challenges' follows looked at a store already closed)."""
    import gevent
    from gevent.event import Event

    steps, first, stopped = [], Event(), Event()

    def step() -> None:
        steps.append(stopped.is_set())
        first.set()

    restarts = Restarts("worker 1", logging.getLogger("balancer.test_restarts"), quiet=False,
                        loop="a periodic loop", then="trying again at its next turn")
    loop = gevent.spawn(every, 0.01, step, stopped.is_set, restarts, at_once=True)
    assert first.wait(WAIT)
    stopped.set()
    loop.join(WAIT)
    assert loop.dead and steps == [False], steps


def test_reload_hands_the_table_it_read_to_the_management_process(
        redis_factory: Callable[[], RedisServer], tmp_path: Path) -> None:
    """A write whose rule is damaged moves the version; repaired by hand to another
    rule (the version unmoved), ``POST /api/v1/reload`` ends the problem, and the
    management process holds the table it read: its reads answer the repair at
    once (bug: its watcher, nothing left to read again, stayed behind until the
    next write, and every read waited `CATCH_UP` for it: here longer than the
    API client waits)."""
    redis = redis_factory()
    bal = Balancer(tmp_path, None, store=redis.url,
                   prefix=constants_prefix({"management.table_reads.CATCH_UP": 60.0}))
    raw = redis.client()
    try:
        assert bal.api("PUT", "/api/v1/hosts", {"hosts": {"app.test": STATIC}})[0] == 200
        good = json.loads(raw.hget("balancer:hosts", "app.test"))
        raw.hset("balancer:hosts", "app.test", "{not json")
        raw.publish("balancer:changes", raw.incr("balancer:version"))
        wait_for(lambda: "not valid JSON" in bal.store_problem(), WAIT, what="the damage")
        raw.hset("balancer:hosts", "app.test", json.dumps({**good, "body": "repaired"}))
        assert bal.api("POST", "/api/v1/reload") == (200, {"version": 2})
        assert bal.store_problem() == ""
        assert request(bal.port, host="app.test")[2] == b"repaired"
        status, answer = bal.api("GET", "/api/v1/hosts/app.test")
        assert (status, answer["rule"]["body"], answer["version"]) == (200, "repaired", 2)
    finally:
        bal.stop()


def test_a_worker_whose_statistics_fail_is_lagging_and_counted_as_it_last_answered(
        tmp_path: Path) -> None:
    """A worker's ``stats`` command raises (scripted: its snapshot) while the flag
    exists; the worker answers ``{"pid", "error"}`` (its control socket's one place
    for a command's failure). ``GET /api/v1/stats`` names it in ``lagging`` and
    counts it from its last answer, and the history goes on sampling (bug: every
    statistics call answered 500, and each history sample failed)."""
    flag = tmp_path / "fail"
    bal = Balancer(tmp_path, {"app.test": STATIC}, args=["--workers", "1"],
                   prefix=constants_prefix({"management.history.INTERVAL": 0.5},
                                           fail=(["balancer.control:worker_snapshot"], flag)))
    try:
        assert request(bal.port, host="app.test")[0] == 200
        wait_for(lambda: "app.test" in bal.api("GET", "/api/v1/history")[1]["hosts"], WAIT,
                 what="a history sample (its answer held)")
        flag.touch()
        status, stats = bal.api("GET", "/api/v1/stats")
        assert status == 200, stats
        (lag,) = stats["lagging"]
        assert "RuntimeError" in lag["reason"] and "scripted failure" in lag["reason"], lag
        assert stats["hosts"]["app.test"]["completed_requests"] >= 1
        wait_for(lambda: "control command 'stats' failed" in bal.output(), WAIT,
                 what="the worker's line")
        flag.unlink()
        wait_for(lambda: "lagging" not in bal.api("GET", "/api/v1/stats")[1], WAIT,
                 what="counted live again")
        assert "sampling the stats failed unexpectedly" not in bal.output()
    finally:
        flag.unlink(missing_ok=True)
        bal.stop()


class InfoAsNumber(Relay):
    """A TCP proxy to a real redis-server that answers ``INFO`` itself, with an
    integer (a proxy or a Redis-compatible server of its own kind): redis-py hands
    it over as it came, and its reading as INFO text raises AttributeError."""

    def to_upstream(self, link: Link, data: bytes) -> None:
        if b"\r\nINFO\r\n" in data.upper():
            link.client.sendall(b":1\r\n")
            return
        link.upstream.sendall(data)


def test_an_info_answer_nobody_foresaw_leaves_the_store_followed(
        redis_factory: Callable[[], RedisServer], tmp_path: Path) -> None:
    """The management process's watch asks, as it begins, which other databases
    of the store's Redis hold keys (the table's database is empty); that answer
    raising ended the watch before its guarded loop (bug): the management
    process's table (its ACME issuer's, its deploys') followed the store no
    more. Now it is the watch's failure, logged once, and the watch follows the
    table: the issuer's passes begin on the version written."""
    redis = redis_factory()
    relay = InfoAsNumber(("127.0.0.1", redis.port))
    bal = Balancer(tmp_path, None, store=f"redis://127.0.0.1:{relay.port}/0")
    raw = redis.client()
    try:
        failed = "the store's watcher failed unexpectedly (AttributeError"
        wait_for(lambda: failed in bal.output(), WAIT, what="the failure logged")
        wait_for(lambda: bal.store_problem() == "", WAIT, what="the watch's read ending it")
        raw.hset("balancer:hosts", "app.test", json.dumps(STATIC))
        raw.publish("balancer:changes", raw.incr("balancer:version"))
        wait_for(lambda: bal.api("GET", "/api/v1/acme")[1]["passes"]["table_version"] == 1,
                 WAIT, what="the management process's table at the version written")
        assert bal.output().count(failed) == 1 and tracebacks(bal) == 1, bal.output()
    finally:
        bal.stop()
        relay.close()


def test_a_killed_workers_kept_counters_show_no_problem_on_a_backend_up_again(
        tmp_path: Path) -> None:
    """A backend is down (its check answers 500: each worker's ``problem``); a
    worker is killed then, its counters retired from its last answer. The
    backend comes up again: its stats show no problem (bug: the retired
    counters kept the down backend's ``problem``, shown on the up backend for
    as long as the host existed, once a problem showed whatever the state)."""
    import signal

    app = scripted("app")
    bal = Balancer(tmp_path, {HOST: {"action": "proxy", "backends": [app.address],
                                     "health": FAST_CHECKS}}, args=["--workers", "2"])

    def backend() -> dict[str, Any]:
        return bal.host_stats(HOST)["backends"].get(app.address, {})

    try:
        pids = wait_workers(bal, 2)
        app.sick = True  # type: ignore[attr-defined]
        wait_for(lambda: "answered 500" in backend().get("problem", ""), WAIT,
                 what="the backend down, its problem")
        assert bal.api("GET", "/metrics")[0] == 200  # each worker's answer held
        os.kill(pids[0], signal.SIGKILL)
        wait_workers(bal, 2, replacing={pids[0]})
        app.sick = False  # type: ignore[attr-defined]
        wait_for(lambda: backend().get("state") == "up", WAIT, what="the backend up again")
        assert "problem" not in backend(), backend()
    finally:
        bal.stop()
        app.stop()


def test_an_issuer_standing_aside_counts_no_pass(tmp_path: Path) -> None:
    """An issuer whose step failed `STAND_ASIDE_AFTER` looks in a row stands aside:
    a table written meanwhile shows in ``passes.table_version`` only once the
    issuer has looked at it, after standing aside (bug: each pass it skipped was
    counted, on the version written: "the issuer has looked at that table", and
    nothing had)."""
    flag, dues = tmp_path / "fail", tmp_path / "dues"
    due = ["management.acme_issuer:due"]
    ca = FakeAcme("ok")
    # (no periodic look between the writes' looks, which come within a TICK; stands
    # aside 2 x (2.5 + 0.1) = 5.2 s)
    quick = {"management.acme_issuer.CHECK_INTERVAL": 2.5, "management.acme_issuer.TICK": 0.1}
    bal = Balancer(tmp_path, None, args=["--workers", "1"],
                   config=f'[acme]\ndirectory = "{ca.url}"\n',
                   prefix=constants_prefix(quick, fail=(due, flag), count=(due, dues)))

    def passes() -> dict[str, Any]:
        return bal.api("GET", "/api/v1/acme")[1]["passes"]

    try:
        flag.touch()
        hosts = {"app.test": {**STATIC, "tls": "acme"}}
        for n in range(3):  # each write a look, failing
            hosts[f"n{n}.test"] = STATIC
            version = bal.api("PUT", "/api/v1/hosts", {"hosts": hosts})[1]["version"]
            wait_for(lambda v=version: (passes()["table_version"] or 0) >= v, 3 * WAIT,
                     what=f"a look at version {version}")
        wait_for(lambda: "released the issuer lock, taking none for" in bal.output(), WAIT,
                 what="the issuer standing aside")
        looked = sum(calls(dues).values())
        hosts["late.test"] = STATIC
        version = bal.api("PUT", "/api/v1/hosts", {"hosts": hosts})[1]["version"]
        wait_for(lambda: passes()["table_version"] == version, 3 * WAIT,
                 what="a pass on the version written")
        assert sum(calls(dues).values()) > looked, "a pass counted, no look taken"
    finally:
        flag.unlink(missing_ok=True)
        bal.stop()
        ca.stop()
