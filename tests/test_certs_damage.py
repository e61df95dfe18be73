"""A damaged or lost certificate store never takes certificates down (SPEC §9, docs/tls.md).

Real balancers with TLS listeners: the certs file is corrupted or deleted under
them, or Redis gets a garbage record or is flushed; every host's handshake must
keep succeeding, on the workers that served them and on workers started since
(SIGKILLed and replaced: the management process hands them the certificates it
last read, or, restarted after its own crash, collected from the workers),
certificate writes are refused until the store is repaired or
restored, and no private key reaches the log or an API answer.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.control import ask
from tests.conftest import RedisServer, required_tool
from tests.support import Backend, Balancer, control_socket, replace_file, wait_for
from tests.test_ctl import ctl, ok
from tests.test_process import children_of, wait_workers
from tests.test_reuseport import management_pid
from tests.test_tls import CA, client_context, tls_connect
from tests.test_tls_first_use import hostile

HOSTS = ("a.test", "b.test", "c.test")
STEADY = 2.5  # seconds (over two of the workers' looks at the store) hosts must stay served
PACE = 0.05  # seconds between two rounds of handshakes while they must stay served
CERTS = "routes.json.certs.json"


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    b = Backend("certs-damage")
    yield b
    b.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory,
           backend: Backend) -> Iterator[tuple[Balancer, bytes]]:
    """One balancer for the tests that damage and repair the file store without
    killing a process (each its own start cost ~1.5 CPU-s): it and its certs
    file's good bytes (`HOSTS`' records)."""
    bal = start(tmp_path_factory.mktemp("certs-damage"), backend)
    yield bal, (bal.tmp / CERTS).read_bytes()
    bal.stop()


@pytest.fixture
def bal(shared: tuple[Balancer, bytes]) -> Balancer:
    """The shared balancer as a fresh one starts: the good file back (a test
    adds new.test, deletes or damages the file), no problem said, `HOSTS`
    listed without a problem, and served alone by both workers (each made to
    read the file: one that had not yet still served the last test's new.test,
    which then passed this test's check that its put of new.test is served)."""
    bal, good = shared
    path = bal.tmp / CERTS
    if not path.exists() or path.read_bytes() != good:
        replace_file(path, good)

    def as_started() -> bool:
        status, listed = bal.api("GET", "/api/v1/certs")
        return (status == 200 and certs_problem(bal) is None and "problem" not in listed
                and [(c["host"], c.get("problem")) for c in listed["certs"]]
                == [(host, None) for host in HOSTS])
    wait_for(as_started, timeout=10, interval=0.05, what="the good certs file read again")

    def workers_serve_it() -> bool:
        return all((ask(control_socket(pid), "certs") or {}).get("certs") == len(HOSTS)
                   for pid in wait_workers(bal, 2))
    wait_for(workers_serve_it, timeout=10, interval=0.05, what="the workers serving the file")
    return bal


def logged_since(bal: Balancer, mark: int) -> str:
    """The shared balancer's log after the `mark`-th character (this test's own)."""
    return bal.output()[mark:]


def start(tmp: Path, backend: Backend, args: list[str] | None = None) -> Balancer:
    hosts = {h: {"action": "proxy", "backends": [backend.address]} for h in (*HOSTS, "new.test")}
    bal = Balancer(tmp, hosts, args=["--tls-listen", "127.0.0.1:0", "--workers", "2",
                                     *(args or [])])
    for host in HOSTS:
        assert put(bal, host)[0] == 200
    return bal


def put(bal: Balancer, host: str) -> tuple[int, Any]:
    chain, key = CA.issue(host)
    return bal.api("PUT", f"/api/v1/certs/{host}", {"chain": chain, "key": key})


def served(bal: Balancer, context: ssl.SSLContext, host: str) -> bool:
    try:
        tls_connect(bal.ports["tls"], host, context).close()
    except ssl.SSLError:
        return False
    return True


def all_served_for(bal: Balancer, context: ssl.SSLContext, hosts: tuple[str, ...],
                   seconds: float = STEADY) -> None:
    """Every host handshakes, on many connections (both workers), for `seconds`:
    a round every `PACE` (back to back, the rounds cost ~1.5 CPU-s a second of
    handshakes between the test and the workers for no more coverage)."""
    deadline = time.monotonic() + seconds
    rounds = 0
    while rounds < 1000:
        rounds += 1
        for host in hosts:
            assert served(bal, context, host), f"{host} not served after {rounds} rounds"
        if time.monotonic() >= deadline:
            break
        time.sleep(min(PACE, max(0.0, deadline - time.monotonic())))


def replace_workers(bal: Balancer) -> list[int]:
    """SIGKILL every worker; the pids of their replacements once they serve."""
    victims = set(wait_workers(bal, 2))
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    return wait_workers(bal, 2, replacing=victims)


def all_served_soon(bal: Balancer, context: ssl.SSLContext, hosts: tuple[str, ...],
                    timeout: float = 10.0) -> None:
    """Within `timeout`, every host handshakes (its own certificate, verified) on 20
    connections in a row: both workers, whichever the kernel gives each one to."""
    def twenty_rounds() -> bool:
        return all(served(bal, context, host) for _ in range(20) for host in hosts)
    wait_for(twenty_rounds, timeout=timeout, interval=0.1, what=f"{hosts} served")


def certs_problem(bal: Balancer) -> str | None:
    return bal.api("GET", "/api/v1/info")[1]["store"]["certs_problem"]


def truncate(bal: Balancer, path: Path) -> bytes:
    """Cut the certs file at `path` in half; its good bytes, once `bal` says so."""
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    wait_for(lambda: certs_problem(bal), timeout=10, what="the certs problem")
    return good


def no_key_leaked(bal: Balancer, *answers: Any) -> None:
    for text in (bal.output(), *(json.dumps(a) for a in answers)):
        assert "PRIVATE KEY" not in text


def host_twice(raw: bytes) -> bytes:
    """The first host listed again with the second's record (json kept the last copy:
    the first host was served the second's certificate)."""
    certs = json.loads(raw)["certs"]
    first, second = list(certs)[:2]
    items = [*certs.items(), (first, certs[second])]
    listed = ", ".join(f"{json.dumps(h)}: {json.dumps(r)}" for h, r in items)
    return b'{"certs": {' + listed.encode() + b"}}"


DAMAGE = {
    "host twice": host_twice,
    "truncated": lambda raw: raw[: len(raw) // 2],
    "garbage": lambda raw: b"\x00\xffnot json at all",
    "wrong shape": lambda raw: b'[{"certs": {}}]',
    "certs not an object": lambda raw: b'{"certs": ["a.test"]}',
    "extra keys": lambda raw: b'{"certs": {}, "hosts": {}}',
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_certs_file_keeps_every_certificate_served(
        tmp_path: Path, bal: Balancer, damage: str) -> None:
    mark = len(bal.output())
    context = client_context(tmp_path)
    path = bal.tmp / CERTS
    good = path.read_bytes()
    replace_file(path, DAMAGE[damage](good))
    damaged = path.read_bytes()
    wait_for(lambda: certs_problem(bal), timeout=10, what="the certs problem in /api/v1/info")
    all_served_for(bal, context, HOSTS)
    status, answer = put(bal, "new.test")
    assert (status, answer["error"]) == (503, "certs_corrupt"), answer
    status, deleted = bal.api("DELETE", "/api/v1/certs/a.test")
    assert (status, deleted["error"]) == (503, "certs_corrupt")
    assert path.read_bytes() == damaged  # nothing written over it
    status, listed = bal.api("GET", "/api/v1/certs")
    assert status == 200 and [c["host"] for c in listed["certs"]] == list(HOSTS)
    assert "cannot be read" in listed["problem"]
    replace_file(path, good)  # the operator repairs it
    wait_for(lambda: certs_problem(bal) is None, timeout=10, what="the problem to clear")
    assert put(bal, "new.test")[0] == 200
    assert sorted(json.loads(path.read_bytes())["certs"]) == sorted((*HOSTS, "new.test"))
    all_served_for(bal, context, (*HOSTS, "new.test"), seconds=0)
    assert logged_since(bal, mark).count("the certificates file cannot be read") == 1  # once
    no_key_leaked(bal, answer, deleted, listed)


def test_workers_started_while_the_certs_file_is_damaged_serve_the_last_read(
        tmp_path: Path, backend: Backend) -> None:
    bal = start(tmp_path, backend)
    try:
        context = client_context(tmp_path)
        path = tmp_path / "routes.json.certs.json"
        good = truncate(bal, path)
        replace_workers(bal)
        all_served_soon(bal, context, HOSTS)
        assert "cannot be read" in (certs_problem(bal) or "")  # still damaged, still said
        assert "lacked 3 certificates the damaged store cannot give" in bal.output()
        status, answer = put(bal, "new.test")
        assert (status, answer["error"]) == (503, "certs_corrupt")
        # a reload replaces the management process too: the new one takes them over
        old = set(wait_workers(bal, 2))
        bal.proc.send_signal(signal.SIGHUP)
        wait_workers(bal, 2, replacing=old)
        all_served_soon(bal, context, HOSTS)
        assert "took 3 certificates the damaged store cannot give" in bal.output()
        assert "cannot be read" in (certs_problem(bal) or "")
        assert bal.api("POST", "/api/v1/certs/restore") == (200, {"restored": 3})
        wait_for(lambda: certs_problem(bal) is None, timeout=10, what="the problem to clear")
        doc = json.loads(good)  # then a.test is removed from the store by hand
        del doc["certs"]["a.test"]
        path.write_text(json.dumps(doc))
        wait_for(lambda: not served(bal, context, "a.test")
                 and not served(bal, context, "a.test"), timeout=10,
                 what="the repaired store's certificates alone to be served")
        all_served_for(bal, context, HOSTS[1:], seconds=0)
        no_key_leaked(bal, answer)
    finally:
        bal.stop()


def restart_management(bal: Balancer, collected: int) -> None:
    """SIGKILL the management process; return once the one the arbiter starts
    instead answers its API and says it took `collected` certificates from the
    workers."""
    killed = management_pid(bal)
    os.kill(killed, signal.SIGKILL)

    def restarted() -> int | None:
        try:
            pid = management_pid(bal)
        except (OSError, StopIteration, KeyError, ValueError):
            return None  # its API does not answer yet
        return pid if pid != killed and pid in children_of(bal.proc.pid) else None
    wait_for(restarted, timeout=20, interval=0.2, what="a new management process")
    took = f"took {collected} certificates the damaged store cannot give from the workers"
    wait_for(lambda: took in bal.output(), timeout=10, what="the certificates collected")


def test_a_management_process_restarted_after_its_crash_collects_them_from_the_workers(
        tmp_path: Path, backend: Backend) -> None:
    bal = start(tmp_path, backend)
    try:
        context = client_context(tmp_path)
        path = tmp_path / "routes.json.certs.json"
        good = truncate(bal, path)
        restart_management(bal, collected=3)  # it never read them, has no predecessor
        assert "cannot be read" in (certs_problem(bal) or "")
        worker = control_socket(wait_workers(bal, 2)[0])
        # keys leave a worker only while the store is as the asker judged it
        assert ask(worker, 'certs-collect {"signature": "stale"}')["certs"] == {}
        assert "bad query" in ask(worker, "certs-collect []")["error"]
        replace_workers(bal)  # new workers get them from the new management process
        all_served_soon(bal, context, HOSTS)
        url = f"--url=http://127.0.0.1:{bal.mport}"
        assert ok("cert", "restore", url) == "restored 3 certificates to the store\n"
        assert json.loads(path.read_bytes()) == json.loads(good)  # the very records
        wait_for(lambda: certs_problem(bal) is None, timeout=10, what="the problem to clear")
        assert put(bal, "new.test")[0] == 200
        no_key_leaked(bal)
    finally:
        bal.stop()


def test_after_a_crash_a_damaged_record_is_collected_from_the_workers(
        tmp_path: Path, backend: Backend) -> None:
    bal = start(tmp_path, backend)
    try:
        context = client_context(tmp_path)
        path = tmp_path / "routes.json.certs.json"
        doc = json.loads(path.read_bytes())
        doc["certs"]["b.test"] = ["not", "an object"]
        path.write_text(json.dumps(doc))
        wait_for(lambda: "certificate of b.test" in bal.output(), timeout=10,
                 what="the damaged record to be logged")
        restart_management(bal, collected=1)
        replace_workers(bal)
        all_served_soon(bal, context, HOSTS)
        no_key_leaked(bal)
    finally:
        bal.stop()


def test_restore_writes_back_the_certificates_last_read(tmp_path: Path, bal: Balancer) -> None:
    context = client_context(tmp_path)
    path = bal.tmp / CERTS
    status, answer = bal.api("POST", "/api/v1/certs/restore")
    assert (status, answer["error"]) == (409, "nothing_to_restore")  # nothing damaged
    wait_for(lambda: certs_problem(bal) is None, timeout=10, what="the watch to read")
    path.write_bytes(b'{"certs": {"a.test": ')
    wait_for(lambda: certs_problem(bal), timeout=10, what="the certs problem")
    status, answer = bal.api("POST", "/api/v1/certs/restore")
    assert (status, answer) == (200, {"restored": 3})
    assert sorted(json.loads(path.read_bytes())["certs"]) == list(HOSTS)
    assert path.stat().st_mode & 0o777 == 0o600
    wait_for(lambda: certs_problem(bal) is None, timeout=10, what="the problem to clear")
    assert put(bal, "new.test")[0] == 200
    all_served_for(bal, context, (*HOSTS, "new.test"), seconds=0)
    no_key_leaked(bal, answer)


def test_a_deleted_certs_file_is_lost_not_empty(tmp_path: Path, bal: Balancer) -> None:
    context = client_context(tmp_path)
    path = bal.tmp / CERTS
    path.unlink()
    wait_for(lambda: certs_problem(bal), timeout=10, what="the certs problem")
    assert "deleted" in (certs_problem(bal) or "")
    all_served_for(bal, context, HOSTS)
    status, answer = put(bal, "new.test")
    assert (status, answer["error"]) == (503, "certs_lost")
    assert not path.exists()  # not rewritten with one certificate
    url = f"--url=http://127.0.0.1:{bal.mport}"
    listed = ctl("cert", "list", url)
    assert listed.returncode == 0 and all(host in listed.stdout for host in HOSTS)
    assert listed.stderr.startswith("balancerctl: warning: ") and "deleted" in listed.stderr
    assert ok("cert", "restore", url) == "restored 3 certificates to the store\n"
    assert put(bal, "new.test")[0] == 200
    assert sorted(json.loads(path.read_bytes())["certs"]) == sorted((*HOSTS, "new.test"))
    no_key_leaked(bal, answer)


def test_one_damaged_record_never_takes_the_others_down(tmp_path: Path,
                                                        backend: Backend) -> None:
    bal = start(tmp_path, backend)
    try:
        context = client_context(tmp_path)
        path = tmp_path / "routes.json.certs.json"
        doc = json.loads(path.read_bytes())
        _, new_key = CA.issue("new.test")
        doc["certs"]["b.test"] = {"chain": 5}  # a record missing its text
        doc["certs"]["new.test"] = {"chain": "-----BEGIN CERTIFICATE-----\nbroken\n",
                                    "key": new_key}  # unparsable PEM, with a real key
        doc["certs"]["c.test"] = ["not", "an object"]
        path.write_text(json.dumps(doc))
        wait_for(lambda: "certificate of new.test" in bal.output(), timeout=10,
                 what="the damaged record to be logged")
        # a.test served; b.test and c.test keep the certificates workers loaded before
        all_served_for(bal, context, HOSTS)
        assert not served(bal, context, "new.test")
        status, listed = bal.api("GET", "/api/v1/certs")
        problems = {c["host"]: c.get("problem") for c in listed["certs"]}
        assert status == 200 and "problem" not in listed
        assert problems["b.test"] == 'the stored record has no "chain" or "key" text'
        assert problems["c.test"] == "the stored record is not a JSON object"
        assert problems["a.test"] is None
        assert put(bal, "d.test")[0] == 200  # writes work and keep the damaged records
        kept = json.loads(path.read_bytes())["certs"]
        assert kept["b.test"] == {"chain": 5} and kept["c.test"] == ["not", "an object"]
        replace_workers(bal)  # new workers get b.test and c.test from the management process
        all_served_soon(bal, context, HOSTS)
        assert not served(bal, context, "new.test")  # never read in good order
        assert put(bal, "b.test")[0] == 200  # an upload repairs a record
        no_key_leaked(bal, listed)
    finally:
        bal.stop()


@pytest.fixture
def redis_bal(tmp_path: Path, backend: Backend,
              redis_factory: Callable[[], RedisServer]) -> Iterator[tuple[Balancer, Any]]:
    redis = redis_factory()
    bal = start(tmp_path, backend, ["--store", redis.url])
    yield bal, redis.client()
    bal.stop()


@pytest.mark.slow  # ~8 s: runs first (scripts/test.sh)
def test_redis_garbage_record_and_flushdb(tmp_path: Path,
                                          redis_bal: tuple[Balancer, Any]) -> None:
    bal, client = redis_bal
    context = client_context(tmp_path)
    client.hset("balancer:certs", "b.test", "{garbage")
    client.incr("balancer:certs-version")
    wait_for(lambda: "certificate of b.test" in bal.output(), timeout=10,
             what="the garbage record to be logged")
    assert bal.output().count("certificate of b.test: the stored record is not JSON") == 1
    all_served_for(bal, context, HOSTS)
    version = int(client.get("balancer:certs-version"))
    client.flushdb()
    wait_for(lambda: certs_problem(bal), timeout=10, what="the certs problem")
    assert "Redis lost its certificates" in (certs_problem(bal) or "")
    all_served_for(bal, context, HOSTS)
    replace_workers(bal)
    all_served_soon(bal, context, HOSTS)
    status, answer = put(bal, "new.test")
    assert (status, answer["error"]) == (503, "certs_lost")
    assert client.hlen("balancer:certs") == 0  # refused: nothing written
    status, answer = bal.api("POST", "/api/v1/certs/restore")
    assert (status, answer) == (200, {"restored": 3})  # b.test as it was before the garbage
    assert int(client.get("balancer:certs-version")) > version
    wait_for(lambda: certs_problem(bal) is None, timeout=10, what="the problem to clear")
    assert put(bal, "new.test")[0] == 200
    all_served_for(bal, context, (*HOSTS, "new.test"), seconds=0)
    no_key_leaked(bal, answer)


def test_records_no_worker_can_serve_stored_before_the_start_are_reported_at_start(
        tmp_path: Path, backend: Backend) -> None:
    """Written straight into the store before the balancer starts: reported when it
    starts (as `nginx -t` and HAProxy refuse such a file at start), before any
    handshake names their hosts, and listed with why; the other hosts are
    served. Bug: each was reported only at its host's first handshake, by each
    worker; a key of another certificate (what only OpenSSL refuses) only there,
    and listed as served: the management process judges that too now (a
    worker's start still does not: OpenSSL's parsing, ~3 ms a record)."""
    good_chain, good_key = CA.issue("a.test")
    bad = {host: hostile(kind, host) for host, kind in (
        ("cut.test", "garbage"), ("locked.test", "encrypted key"), ("big.test", "1 MB"),
        ("other.test", "other key"))}
    bad["nocert.test"] = {"chain": good_key, "key": good_key}  # (a bundle may be either)
    path = tmp_path / "routes.json.certs.json"
    path.write_text(json.dumps({"certs": {
        "a.test": {"chain": good_chain, "key": good_key, "not_after": 0, "source": "upload"},
        **bad}}))
    path.chmod(0o600)
    hosts = {h: {"action": "proxy", "backends": [backend.address]} for h in ("a.test", *bad)}
    bal = Balancer(tmp_path, hosts, args=["--tls-listen", "127.0.0.1:0"])
    try:
        reasons = {
            "cut.test": "chain: cut short (no END line after its last BEGIN line)",
            "locked.test": "key: the private key is encrypted",
            "big.test": "chain: 100",
            "nocert.test": "chain: no PEM certificate",
            "other.test": "OpenSSL refused it (KEY_VALUES_MISMATCH)"}
        for host, reason in reasons.items():
            wait_for(lambda host=host, reason=reason: f"certificate of {host}: the stored "
                     f"certificate cannot be served: {reason}" in bal.output(),
                     what=f"{host} reported at start")
        status, listed = bal.api("GET", "/api/v1/certs")
        problems = {c["host"]: c.get("problem", "") for c in listed["certs"]}
        assert status == 200 and all(problems[h].startswith("the stored certificate cannot "
                                                            f"be served: {r}")
                                     for h, r in reasons.items())
        context = client_context(tmp_path)
        assert served(bal, context, "a.test")
        assert not any(served(bal, context, host) for host in bad)
        wait_for(lambda: "certificate of other.test not served: OpenSSL refused it "
                 "(KEY_VALUES_MISMATCH)" in bal.output(), what="other.test at its handshake")
        doc = json.loads(path.read_bytes())  # a.test's record cut short while it is served
        doc["certs"]["a.test"]["chain"] = good_chain[:len(good_chain) // 2]
        path.write_text(json.dumps(doc))
        wait_for(lambda: "certificate of a.test: the stored certificate cannot be served: "
                 "chain: cut short" in bal.output(), what="a.test's damage reported")
        all_served_for(bal, context, ("a.test",))  # the certificate loaded before
        no_key_leaked(bal, listed)
    finally:
        bal.stop()


OPENSSL_KEYS = {  # how `openssl` writes each kind of key (its PEM text is stored as is)
    "rsa-pkcs1": ["genrsa", "-traditional", "2048"],  # BEGIN RSA PRIVATE KEY
    "rsa-pkcs8": ["genpkey", "-algorithm", "RSA"],  # BEGIN PRIVATE KEY
    "ec-params": ["ecparam", "-name", "prime256v1", "-genkey"],  # EC PARAMETERS, EC PRIVATE KEY
    "ed25519": ["genpkey", "-algorithm", "ed25519"],
}


@functools.cache
def openssl_key(kind: str) -> str:
    """A key of `kind` as `openssl` writes it, made once (one per kind serves
    every layout: an RSA key took ~1 s to make on a loaded machine)."""
    openssl = required_tool("openssl", "openssl")
    return subprocess.run([openssl, *OPENSSL_KEYS[kind]], capture_output=True, check=True,
                          timeout=60).stdout.decode()


def openssl_pair(host: str, kind: str) -> tuple[str, str]:
    """(chain PEM, key PEM as `openssl` wrote it) of a leaf for `host` by the tests' CA."""
    from cryptography.hazmat.primitives import serialization

    key_pem = openssl_key(kind)
    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    chain, _ = CA.issue(host, key=key)
    return chain, key_pem


def test_stored_bundles_every_worker_loads_are_served_not_reported(
        tmp_path: Path, backend: Backend) -> None:
    """Records written straight into the store in the layouts a worker loads (its
    memory file is the key's text, then the chain's: `certificates.load_pem`): a
    HAProxy-style bundle (certificates then key) in `chain` with an empty `key`,
    the key then its certificates in `key` with an empty `chain`, the two fields
    swapped, and CRLF line ends; each kind of key `openssl` writes. Every one is
    served from the start and none is reported. Bug: `unservable` looked for the
    certificate only in `chain` and the key only in `key`, so each bundle was a
    damaged record: a site served until then lost its certificate at the next
    start of the balancer; then the listing read the facts of ``chain`` only
    and said "the stored chain cannot be read" of the bundles in ``key``."""
    layouts: dict[str, Callable[[str, str], dict[str, str]]] = {
        "chain-bundle": lambda chain, key: {"chain": chain + key, "key": ""},
        "key-bundle": lambda chain, key: {"chain": "", "key": key + chain},
        "swapped": lambda chain, key: {"chain": key, "key": chain},
        "crlf": lambda chain, key: {"chain": chain.replace("\n", "\r\n"),
                                    "key": key.replace("\n", "\r\n")},
    }
    records = {}
    for kind in OPENSSL_KEYS:
        for layout, made in layouts.items():
            host = f"{layout}.{kind}.test"
            records[host] = {**made(*openssl_pair(host, kind)), "not_after": 0,
                             "source": "upload"}
    path = tmp_path / "routes.json.certs.json"
    path.write_text(json.dumps({"certs": records}))
    path.chmod(0o600)
    bal = Balancer(tmp_path, {h: {"action": "proxy", "backends": [backend.address]}
                              for h in records}, args=["--tls-listen", "127.0.0.1:0"])
    try:
        status, listed = bal.api("GET", "/api/v1/certs")
        assert status == 200
        problems = {c["host"]: c.get("problem") or "" for c in listed["certs"]}
        assert problems.keys() == records.keys()
        assert {h: why for h, why in problems.items() if why} == {}
        assert all(c["names"] == [c["host"]] for c in listed["certs"])  # what is served
        context = client_context(tmp_path)
        assert [h for h in records if not served(bal, context, h)] == []
        assert "cannot be served" not in bal.output() and "not served" not in bal.output()
        no_key_leaked(bal, listed)
    finally:
        bal.stop()
