"""Hostile probes of the certificate side (SPEC §9): a scripted ACME CA that
misbehaves where pebble cannot (tests/acmefake.py), hostile HTTP-01 clients,
and bad certificates through the API and `balancerctl`. Each must end in a
clear reason, store nothing wrong, and back off within bounds.

The ACME probes run the real issuer (management/acme_issuer.py) and ACME client
(management/acme_ca.py) in this process against the scripted CA over loopback,
on a real file store; only the workers' control sockets are stand-ins."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.acmefake import RETRY_AFTER, FakeAcme
from tests.test_acme_hostile import ACME, Workers


@pytest.fixture
def fake(request: pytest.FixtureRequest) -> Iterator[FakeAcme]:
    ca = FakeAcme(request.param)
    yield ca
    ca.stop()


@pytest.fixture
def quick_polls(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ACME client's 1 s waits between polls take 0.02 s (for the probes that
    do not measure how often the CA is polled)."""
    import types

    import acme.client

    monkeypatch.setattr(acme.client, "time",
                        types.SimpleNamespace(sleep=lambda seconds: time.sleep(seconds / 50)))


def make_issuer(tmp_path: Path, ca: FakeAcme, **settings: str) -> Any:
    from balancer.settings import load_settings
    from balancer.stores.base import TableData
    from balancer.stores.file import FileStore
    from management import acme_issuer

    store = FileStore(str(tmp_path / "routes.json"))
    data = TableData(1, {"a.test": ACME})
    made = acme_issuer.Issuer(load_settings({"acme.directory": ca.url, **settings}, env={}),
                              store, lambda: data, Workers())
    assert made.take()
    return made


def issue(tmp_path: Path, ca: FakeAcme, **settings: str) -> tuple[Any, dict[str, Any]]:
    """Issue a.test once against `ca`: (the issuer, the host's state after)."""
    issuer = make_issuer(tmp_path, ca, **settings)
    try:
        issuer.issue("a.test", "no certificate", {})
    finally:
        issuer.stopped = True
        issuer.acme.unlock(issuer.owner)
    return issuer, issuer.acme.states()["a.test"]


def failed(issuer: Any, state: dict[str, Any]) -> str:
    """The reason of a failure, after checking what every failure must be."""
    assert state["state"] == "failed", state
    assert issuer.outcomes == {"ok": 0, "failed": 1}
    assert issuer.store.certs().all() == {}  # nothing stored
    assert issuer.acme.challenges() == {}  # withdrawn
    assert "\n" not in state["reason"] and len(state["reason"]) < 400
    return str(state["reason"])


@pytest.mark.usefixtures("quick_polls")
@pytest.mark.parametrize("fake", ["ok", "redirect"], indirect=True)
def test_the_scripted_ca_issues(tmp_path: Path, fake: FakeAcme) -> None:
    issuer, state = issue(tmp_path, fake)
    assert state["state"] == "issued", state
    assert list(issuer.store.certs().all()) == ["a.test"]


@pytest.mark.usefixtures("quick_polls")
@pytest.mark.parametrize(("fake", "reason"), [
    ("mismatch", "the CA's certificate cannot be served: key: does not match"),
    ("other-name", "the CA's certificate cannot be served: chain: the certificate is for "
                   "other.test, not a.test"),
    ("root-first", "the CA's certificate cannot be served: chain: the certificate the key "
                   "matches is number 2 of 2; put it first"),
    ("not-pem", "the CA's certificate cannot be served: chain: not a PEM certificate chain"),
    ("foreign-authz", "the CA asks to validate victim.test, not a.test"),
    ("bad-token", "the CA's answer is not what RFC 8555 describes (DeserializationError: "),
    ("bad-nonce", "the CA refused: badNonce: "),
    ("redirect-loop", "cannot reach the CA at "),
], indirect=["fake"])
def test_a_ca_that_answers_wrong_ends_in_failed_with_the_reason(
        tmp_path: Path, fake: FakeAcme, reason: str) -> None:
    issuer, state = issue(tmp_path, fake)
    assert failed(issuer, state).startswith(reason), state["reason"]
    assert state["next_retry"] - state["failed_at"] == pytest.approx(300, abs=1)
    assert sum(fake.requests.values()) < 40, fake.requests  # no loop against the CA


@pytest.mark.usefixtures("quick_polls")
def test_a_ca_over_https_is_verified(tmp_path: Path) -> None:
    ca = FakeAcme("ok", tls=tmp_path)
    try:
        issuer, state = issue(tmp_path, ca)  # the system's CAs: not this one
        reason = failed(issuer, state)
        assert reason == ("cannot verify the CA's HTTPS certificate (self-signed certificate "
                          "in certificate chain); set [acme] ca_bundle for a private CA")
        assert sum(ca.requests.values()) == 0
        issuer, state = issue(tmp_path, ca, **{"acme.ca_bundle": str(ca.ca_bundle)})
        assert state["state"] == "issued", state
        issuer = make_issuer(tmp_path, ca, **{"acme.ca_bundle": str(ca.ca_bundle)})
        ca.ca_bundle.unlink()  # after the start
        issuer.issue("a.test", "renew", {})
        assert issuer.acme.states()["a.test"]["reason"] == (
            f"[acme] ca_bundle {ca.ca_bundle} cannot be read: No such file or directory")
    finally:
        ca.stop()


@pytest.mark.parametrize("fake", ["ok"], indirect=True)
def test_a_challenge_the_ca_does_not_offer_says_what_to_change(tmp_path: Path,
                                                                fake: FakeAcme) -> None:
    issuer, state = issue(tmp_path, fake, **{"acme.challenge": "tls-alpn-01"})
    assert failed(issuer, state) == ("the CA offers no tls-alpn-01 challenge for a.test "
                                     "(offered: http-01); change [acme] challenge")
    assert fake.requests["/chall/1"] == 0  # nothing asked to validate


@pytest.mark.parametrize("fake", ["ok"], indirect=True)
def test_a_damaged_account_key_fails_with_what_to_do(tmp_path: Path, fake: FakeAcme) -> None:
    (tmp_path / "routes.json.acme.json").write_text(
        json.dumps({"account": {"key": '{"kty": "RSA", "n": "garbage"}', "uri": ""}}))
    issuer, state = issue(tmp_path, fake)
    assert failed(issuer, state) == ("the stored ACME account key cannot be read; delete the "
                                     "store's ACME account to make a new one")
    assert sum(fake.requests.values()) == 0


@pytest.mark.parametrize(("fake", "reason", "wait"), [
    ("rate-limit", "the CA refused: rateLimited: too many certificates already issued",
     RETRY_AFTER),
    ("maintenance", "the CA answered HTTP 503 (text/html, not an ACME problem document) to "
                    "GET http://127.0.0.1:", 600),
], indirect=["fake"])
def test_a_ca_asking_to_wait_is_waited_for(tmp_path: Path, fake: FakeAcme, reason: str,
                                           wait: int) -> None:
    issuer, state = issue(tmp_path, fake)
    said = failed(issuer, state)
    assert said.startswith(reason) and said.endswith(f"; the CA asks to wait {wait} s"), said
    assert state["next_retry"] - state["failed_at"] == pytest.approx(wait, abs=1)
    assert sum(fake.requests.values()) <= 4, fake.requests


@pytest.mark.parametrize("fake", ["pending", "processing", "huge-wait"], indirect=True)
def test_an_order_that_never_becomes_valid_is_cut_and_polled_gently(
        tmp_path: Path, fake: FakeAcme, monkeypatch: pytest.MonkeyPatch) -> None:
    from management import acme_issuer

    monkeypatch.setattr(acme_issuer, "ISSUE_TIMEOUT", 1.5)
    issuer, state = issue(tmp_path, fake)
    # from the challenge's answer, where the timeout starts (not the issuer's own set-up
    # before it: its keys, the account; over 4 s in all on a loaded machine)
    assert time.monotonic() - fake.first["/chall/1"] < 4
    assert failed(issuer, state) == "the CA did not finish within 2s"
    polled = fake.requests["/authz/1" if fake.mode == "pending" else "/order/1"]
    assert 1 <= polled <= 3, fake.requests  # once a second, whatever Retry-After says


# the certificates API and balancerctl ---------------------------------------
@pytest.fixture(scope="module")
def bal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from tests.support import Balancer

    b = Balancer(tmp_path_factory.mktemp("probecerts"),
                 {"app.test": {"action": "empty", "status": 204}},
                 args=["--tls-listen", "127.0.0.1:0"])
    yield b
    b.stop()


def leaf_only(chain: str) -> str:
    end = "-----END CERTIFICATE-----\n"
    return chain[:chain.index(end) + len(end)]


def encrypted(key_pem: str) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(key_pem.encode(), password=None)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(b"secret")).decode()


def bad_uploads() -> list[tuple[str, str, str, str]]:
    """(what, chain, key, the reason expected) of uploads every one refused."""
    from tests.test_tls import CA
    from tests.tlsca import TestCA

    chain, key = CA.issue("app.test")
    leaf = leaf_only(chain)
    return [
        ("root first", CA.pem + leaf, key,
         "chain: the certificate the key matches is number 2 of 2; put it first"),
        ("a stranger's root", leaf + TestCA("stranger CA").pem, key,
         "chain: certificate 2 (CN=stranger CA) did not issue certificate 1 (CN=app.test)"),
        ("the leaf twice", leaf + chain, key,
         "chain: certificate 2 (CN=app.test) did not issue certificate 1"),
        ("encrypted key", chain, encrypted(key), "key: the private key is encrypted"),
        ("key inside the chain", chain + key, key, "chain: holds a private key"),
        ("key for the chain", key, key, "chain: holds a private key"),
        ("truncated chain", chain[:len(chain) * 3 // 4], key,
         "chain: 2 PEM blocks, of which 1 whole certificates (is the file cut short?)"),
        ("truncated leaf", chain[:len(chain) // 4], key, "chain: not a PEM certificate chain"),
        ("truncated key", chain, key[:len(key) // 2], "key: not an unencrypted PEM private key"),
        ("chain as the key", chain, chain, "key: not an unencrypted PEM private key"),
        ("a name in the subject's CN only (no subjectAltName)", *CA.issue("app.test", san=False),
         "chain: the certificate has no subjectAltName, only the subject's CN=app.test, which "
         "browsers and Go clients do not accept as a name; reissue it with app.test in "
         "subjectAltName (DNS:app.test)"),
        ("a subjectAltName cut short", *malformed_san(CA),
         "chain: the certificate's extensions cannot be read (error parsing asn1 value"),
    ]


def malformed_san(ca: Any) -> tuple[str, str]:
    """(chain, key) of an app.test leaf `ca` signed whose subjectAltName is cut
    short: `cryptography` reads it only when asked for the names (bug: a 500, and
    a traceback in the log)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtensionOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "app.test")]))
            .issuer_name(ca.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.UnrecognizedExtension(
                ExtensionOID.SUBJECT_ALTERNATIVE_NAME, b"\x30\x03cut"), False)
            .sign(ca.key, hashes.SHA256()))
    pem = leaf.public_bytes(serialization.Encoding.PEM).decode()
    return pem + ca.pem, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()


def test_bad_certificates_are_refused_naming_the_cause(bal: Any) -> None:
    from tests.test_certs_api import key_body

    for what, chain, key, reason in bad_uploads():
        status, answer = bal.api("PUT", "/api/v1/certs/app.test", {"chain": chain, "key": key})
        assert (status, answer["error"]) == (400, "invalid_certificate"), what
        assert reason in answer["message"], (what, answer)
        assert key_body(key) not in str(answer) or what == "key for the chain", what
    assert bal.api("GET", "/api/v1/certs") == (200, {"certs": [], "acme": {}})
    assert "Traceback" not in bal.output()



def test_a_pair_openssl_cannot_load_is_refused_and_the_served_one_stays(
        bal: Any, tmp_path: Path) -> None:
    """A key field holding another certificate before the key (a combined PEM file
    of an older certificate and the new key), or a NUL: `cryptography` takes both.
    Bug: they were stored and answered 200, then every worker refused to load them
    ("key values mismatch") and went on serving the certificate before, while the
    API listed the new one."""
    from cryptography import x509

    from tests.test_certs_api import served_serial
    from tests.test_tls import CA, client_context

    chain, key = CA.issue("app.test")
    assert bal.api("PUT", "/api/v1/certs/app.test", {"chain": chain, "key": key})[0] == 200
    listed = bal.api("GET", "/api/v1/certs")[1]["certs"]
    serial = x509.load_pem_x509_certificate(chain.encode()).serial_number
    new_chain, new_key = CA.issue("app.test")
    try:
        for bad_key, reason in [
                (leaf_only(chain) + new_key,
                 "OpenSSL cannot load the chain and key (KEY_VALUES_MISMATCH); key holds a "
                 "certificate: give the private key alone"),
                (new_key + "\0", "OpenSSL cannot load the chain and key ([SSL] PEM lib")]:
            status, answer = bal.api("PUT", "/api/v1/certs/app.test",
                                     {"chain": new_chain, "key": bad_key})
            assert (status, answer.get("error")) == (400, "invalid_certificate"), answer
            assert reason in answer["message"], answer
            assert new_key.splitlines()[1] not in str(answer)
        assert [c["not_after"] for c in bal.api("GET", "/api/v1/certs")[1]["certs"]] \
            == [c["not_after"] for c in listed]
        assert served_serial(bal.ports["tls"], "app.test", client_context(tmp_path)) == serial
        assert "not served" not in bal.output()
    finally:
        assert bal.api("DELETE", "/api/v1/certs/app.test")[0] == 200

def test_browser_huge_and_binary_uploads_are_refused(bal: Any) -> None:
    from tests.test_tls import CA

    chain, key = CA.issue("app.test")
    body = json.dumps({"chain": chain, "key": key}).encode()
    for headers, expected in [
        ({"Content-Type": "text/plain"}, (415, "unsupported_media_type")),  # a form's fetch
        ({"Content-Type": "application/json", "Origin": "https://evil.example"},
         (403, "cross_origin")),
        ({"Content-Type": "application/json", "Sec-Fetch-Site": "cross-site"},
         (403, "cross_origin")),
        ({"Content-Type": "application/json", "Host": "evil.example"},
         (403, "host_not_allowed")),  # DNS rebinding
    ]:
        status, answer = raw_api(bal, body, headers)
        assert (status, answer["error"]) == expected, headers
    huge = json.dumps({"chain": chain + "A" * 10_000_000, "key": key}).encode()
    status, answer = raw_api(bal, huge, {"Content-Type": "application/json"})
    assert (status, answer["error"]) == (413, "payload_too_large")
    latin = b'{"chain": "\xe9\xe9", "key": "\xff"}'
    status, answer = raw_api(bal, latin, {"Content-Type": "application/json"})
    assert (status, answer["error"]) == (400, "invalid_json"), answer
    assert bal.api("GET", "/api/v1/certs") == (200, {"certs": [], "acme": {}})


def raw_api(bal: Any, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    """PUT app.test's certificate with exactly `body` and `headers` (no Content-Type
    added); a refusal before the body is read may close the connection under it."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", bal.mport, timeout=10)
    try:
        conn.putrequest("PUT", "/api/v1/certs/app.test", skip_host="Host" in headers)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            conn.putheader(name, value)
        conn.endheaders()
        with contextlib.suppress(ConnectionError):
            conn.send(body)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def test_ctl_refuses_unreadable_files_with_the_reason(bal: Any, tmp_path: Path) -> None:
    from tests.test_ctl import ctl
    from tests.test_tls import CA

    chain, key = CA.issue("app.test")
    files = {"chain": tmp_path / "chain.pem", "key": tmp_path / "key.pem",
             "latin": tmp_path / "latin.pem", "huge": tmp_path / "huge.pem"}
    files["chain"].write_text(chain)
    files["key"].write_text(key)
    files["latin"].write_bytes(b"\xe9t\xe9 " + chain.encode())
    files["huge"].write_text(chain + "A" * 10_000_000)
    files["big"] = tmp_path / "big.pem"
    files["big"].write_text(chain + "#" * 900_000)
    url = f"http://127.0.0.1:{bal.mport}"
    for chain_file, key_file, reason in [
        ("latin", "key", f"cannot read {files['latin']}: not UTF-8 text"),
        ("chain", "latin", f"cannot read {files['latin']}: not UTF-8 text"),
        ("huge", "key", f"cannot read {files['huge']}: larger than 1024 KiB (a PEM"),
        ("/dev/zero", "key", "cannot read /dev/zero: larger than 1024 KiB"),
        ("big", "big", "the request is "),  # two files of 900 KB: too much together
        ("chain", str(tmp_path), f"cannot read {tmp_path}: Is a directory"),
    ]:
        done = ctl("cert", "set", "app.test", "--chain", str(files.get(chain_file, chain_file)),
                   "--key", str(files.get(key_file, key_file)), "--url", url)
        assert done.returncode == 1, done
        assert done.stderr.startswith(f"balancerctl: {reason}"), (reason, done.stderr)
        assert "Traceback" not in done.stderr
    assert bal.api("GET", "/api/v1/certs") == (200, {"certs": [], "acme": {}})


# the store's certificates replaced under the workers --------------------------
def test_a_record_openssl_refuses_keeps_the_certificate_served_before(tmp_path: Path) -> None:
    """Written straight into the store (a hand edit, a tool, a half-done migration):
    the chain of a.test with another key. Workers keep the a.test certificate they
    loaded before, and say why they do not serve the new one."""
    from tests.support import Balancer
    from tests.test_certs_damage import all_served_for, served
    from tests.test_tls import CA, client_context

    hosts = {h: {"action": "empty", "status": 204} for h in ("a.test", "b.test")}
    bal = Balancer(tmp_path, hosts, args=["--tls-listen", "127.0.0.1:0", "--workers", "2"])
    try:
        for host in hosts:
            chain, key = CA.issue(host)
            assert bal.api("PUT", f"/api/v1/certs/{host}", {"chain": chain, "key": key})[0] == 200
        context = client_context(tmp_path)
        path = tmp_path / "routes.json.certs.json"
        doc = json.loads(path.read_text())
        doc["certs"]["a.test"]["chain"] = CA.issue("a.test")[0]  # not for the stored key
        path.write_text(json.dumps(doc))
        wait_for_log(bal, "certificate of a.test not served: ", workers=2)
        all_served_for(bal, context, ("a.test", "b.test"), seconds=0.5)
        # each worker's line (the management process names the record too, now)
        lines = [ln for ln in bal.output().splitlines()
                 if "certificate of a.test not served: " in ln]
        assert lines and all(ln.endswith("; keeping the one loaded before")
                             for ln in lines), lines
        assert "PRIVATE KEY" not in bal.output()
        chain, key = CA.issue("a.test")  # repaired by hand: served at once
        doc["certs"]["a.test"] = {"chain": chain, "key": key, "source": "upload"}
        path.write_text(json.dumps(doc))
        wait_for_log(bal, "certificate of a.test is served again")
        assert served(bal, context, "a.test")
    finally:
        bal.stop()


def wait_for_log(bal: Any, text: str, workers: int = 1) -> None:
    """Until `text` is in the log `workers` times (each worker says it once)."""
    from tests.support import wait_for

    wait_for(lambda: bal.output().count(text) >= workers, timeout=10,
             what=f"the log to say {text!r} {workers} times")


@pytest.mark.parametrize("fake", ["rate-limit"], indirect=True)
def test_a_rate_limited_balancer_shows_the_wait_and_keeps_serving(tmp_path: Path,
                                                                  fake: FakeAcme) -> None:
    """The same through a running balancer: its API, metrics and log say why and
    when, and its certificate in place keeps being served."""
    from tests.support import Balancer, metric, wait_for
    from tests.test_certs_damage import served
    from tests.test_tls import client_context, put_cert

    put_cert(tmp_path / "routes.json", "a.test")  # uploaded before: not due
    bal = Balancer(tmp_path, {"a.test": ACME}, args=["--tls-listen", "127.0.0.1:0"],
                   config=f'[acme]\ndirectory = "{fake.url}"\n')
    try:
        status, _ = bal.api("POST", "/api/v1/certs/a.test/issue")
        assert status == 202
        state = wait_for(lambda: (s := bal.api("GET", "/api/v1/acme")[1]["hosts"]["a.test"])
                         ["state"] == "failed" and s, timeout=15, what="the failure")
        assert state["reason"].endswith("; the CA asks to wait 3600 s"), state
        wait = metric(bal.metrics(), "balancer_acme_next_attempt_seconds", host="a.test")
        assert 3500 < wait <= 3600, wait
        assert served(bal, client_context(tmp_path), "a.test")
        assert "rateLimited" in bal.output() and "Traceback" not in bal.output()
    finally:
        bal.stop()


def test_a_backend_ca_bundle_damaged_at_runtime(tmp_path: Path) -> None:
    """`tls.backend_ca_bundle` deleted or cut after the start: the CAs read at the
    start keep verifying https:// backends; nothing is read per request."""
    from tests.support import Balancer, request
    from tests.test_https_backends import CA as BACKEND_CA
    from tests.tlsbackend import TLSBackend

    backend = TLSBackend(BACKEND_CA, tmp_path, "app.test")
    bundle = tmp_path / "backend-cas.pem"
    bundle.write_text(BACKEND_CA.pem)
    bal = Balancer(tmp_path, {"app.test": {"action": "proxy", "backends": [backend.url]}},
                   config=f'[tls]\nbackend_ca_bundle = "{bundle}"\n', args=["--workers", "2"])
    try:
        bundle.write_text(BACKEND_CA.pem[:100])  # cut, then deleted
        for damage in (lambda: None, bundle.unlink):
            damage()
            for _ in range(6):  # both workers
                status, _, body = request(bal.port, path="/x")
                assert status == 200, (body, bal.output()[-2000:])
    finally:
        bal.stop()
        backend.stop()


def test_a_backend_ca_bundle_a_worker_cannot_load_names_the_file(tmp_path: Path) -> None:
    from balancer.backend_tls import BackendTLS
    from balancer.errors import BackendTLSError

    missing = BackendTLS(str(tmp_path / "gone.pem"))
    with pytest.raises(BackendTLSError, match=r"^TLS: tls.backend_ca_bundle \S+/gone.pem "
                                              r"cannot be read: No such file or directory$"):
        missing.context(True)
    assert missing.context(False)  # rules that verify nothing are not concerned
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    for _ in range(2):  # the reason stays
        with pytest.raises(BackendTLSError, match=r"bad.pem: OpenSSL cannot load it \("):
            BackendTLS(str(bad)).context(True)


def test_retry_after_is_read_and_bounded(tmp_path: Path) -> None:
    from email.utils import formatdate

    from management.acme_answers import retry_after
    from management.acme_issuer import BACKOFF_MAX

    now = time.time()
    assert retry_after("120", now) == 120
    assert retry_after(formatdate(now + 90, usegmt=True), now) in (90, 91)
    assert retry_after("Thu, 01 Jan 1970 00:00:00 GMT", now) < 0
    for junk in ("soon", "-5", "1.5", "", "Mon, 99 Foo 2026"):
        assert retry_after(junk, now) is None, junk
    assert retry_after("9" * 5000, now) == int("9" * 12)  # no int() of 5000 digits
    ca = FakeAcme("ok")
    try:
        issuer = make_issuer(tmp_path, ca)
        issuer.note_failed("a.test", {}, 1, "the CA refused", now, 10**9)
        assert issuer.acme.states()["a.test"]["next_retry"] == now + BACKOFF_MAX
    finally:
        ca.stop()


def test_balancerctl_knows_the_apis_body_limit() -> None:
    from management import ctl_client, http

    assert ctl_client.MAX_BODY == http.MAX_BODY
