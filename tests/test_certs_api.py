"""Certificates through the management API and `balancerctl cert` (SPEC §9):
checked on upload, served by every worker without a restart, keys never shown."""

from __future__ import annotations

import json
import re
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from balancer.certificates import CertificateError, chain_facts, check, covers, keep_facts
from tests.support import Backend, Balancer, metric, replace_file, samples, wait_for
from tests.test_ctl import ctl, ok
from tests.test_tls import CA, _handshakes, client_context, https_get, tls_connect
from tests.tlsca import ec_key, rsa_key


def key_body(pem: str) -> str:
    """A line from the middle of a PEM key: what must never show anywhere."""
    return pem.strip().splitlines()[1]


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    b = Backend("certs")
    yield b
    b.stop()


@pytest.fixture(scope="module")
def bal(tmp_path_factory: pytest.TempPathFactory, backend: Backend) -> Iterator[Balancer]:
    tmp = tmp_path_factory.mktemp("certs")
    hosts = {"app.test": {"action": "proxy", "backends": [backend.address]},
             "*.wild.test": {"action": "proxy", "backends": [backend.address]}}
    b = Balancer(tmp, hosts, args=["--tls-listen", "127.0.0.1:0", "--workers", "2"])
    yield b
    b.stop()


def test_upload_serves_on_every_worker_and_never_shows_the_key(bal: Balancer,
                                                                tmp_path: Path) -> None:
    chain, key = CA.issue("app.test")
    status, answer = bal.api("PUT", "/api/v1/certs/app.test", {"chain": chain, "key": key})
    assert status == 200, answer
    assert answer["cert"]["host"] == "app.test" and answer["cert"]["names"] == ["app.test"]
    assert answer["cert"]["source"] == "upload" and answer["cert"]["expires_in"] > 86400 * 80
    assert "key" not in answer["cert"]
    context = client_context(tmp_path)
    port = bal.ports["tls"]
    # new connections spread over both workers; each picks the upload up within a second
    wait_for(lambda: all(_handshakes(port, "app.test", context) for _ in range(8)),
             what="the uploaded certificate on every worker")
    for _ in range(8):
        assert https_get(port, "app.test", context)[0] == 200
    status, listed = bal.api("GET", "/api/v1/certs")
    assert status == 200 and [c["host"] for c in listed["certs"]] == ["app.test"]
    metrics = bal.metrics_text()
    assert metric(samples(metrics), "balancer_tls_handshakes_total", outcome="ok") >= 1
    assert metric(samples(metrics), "balancer_certificate_expiry_seconds",
                  host="app.test") > 86400 * 80
    secret = key_body(key)
    for text in (str(listed), str(answer), metrics, bal.output(),
                 ok("cert", "list", "--url", f"http://127.0.0.1:{bal.mport}"),
                 ok("cert", "list", "--json", "--url", f"http://127.0.0.1:{bal.mport}")):
        assert secret not in text


SERVED_WITHIN = 0.3  # seconds from the API's answer: the workers' own look is once a second


def served_serial(port: int, name: str, context: ssl.SSLContext) -> int | None:
    """The serial of the certificate a new connection gets for `name`, or None."""
    from cryptography import x509

    try:
        with tls_connect(port, name, context) as tls:
            der = tls.getpeercert(binary_form=True)
    except ssl.SSLError:
        return None
    return x509.load_der_x509_certificate(der).serial_number


def serves_at_once(port: int, name: str, context: ssl.SSLContext, serial: int | None,
                   answered: float) -> None:
    """Every new connection (several, over every worker) gets `serial` for `name`
    within `SERVED_WITHIN` seconds of `answered`."""
    deadline = answered + SERVED_WITHIN
    while True:
        got = [served_serial(port, name, context) for _ in range(6)]
        if got == [serial] * 6:
            return
        assert time.monotonic() < deadline, (
            f"{name}: {got} {time.monotonic() - answered:.3f}s after the API answered, "
            f"expected {serial}")


def test_a_written_certificate_is_served_when_the_api_answers(bal: Balancer,
                                                               tmp_path: Path) -> None:
    from cryptography import x509

    context = client_context(tmp_path)
    port = bal.ports["tls"]
    for _ in range(2):  # a new host, then the same host's certificate replaced
        chain, key = CA.issue("fresh.test")
        status, _ = bal.api("PUT", "/api/v1/certs/fresh.test", {"chain": chain, "key": key})
        answered = time.monotonic()
        assert status == 200
        serial = x509.load_pem_x509_certificate(chain.encode()).serial_number
        serves_at_once(port, "fresh.test", context, serial, answered)
    assert bal.api("DELETE", "/api/v1/certs/fresh.test")[0] == 200
    serves_at_once(port, "fresh.test", context, None, time.monotonic())


def test_unknown_names_are_counted(bal: Balancer, tmp_path: Path) -> None:
    with pytest.raises(ssl.SSLError):
        https_get(bal.ports["tls"], "nobody.test", client_context(tmp_path))
    wait_for(lambda: metric(bal.metrics(), "balancer_tls_handshakes_total",
                            outcome="no_certificate") >= 1, what="the no_certificate count")


@pytest.mark.parametrize(("names", "key", "days", "start", "reason"), [
    (("other.test",), None, 90, -1, "not app.test"),
    (("app.test",), None, 1, -3, "expired"),
    (("app.test",), None, 90, 2, "not valid before"),
    (("app.test",), "rsa1024", 90, -1, "at least 2048"),
    (("app.test",), "p521", 90, -1, "P-256 or P-384"),
    (("app.test",), "mismatch", 90, -1, "does not match"),
])
def test_bad_uploads_are_refused_with_the_reason(bal: Balancer, names: tuple[str, ...],
                                                 key: str | None, days: int, start: int,
                                                 reason: str) -> None:
    before = bal.api("GET", "/api/v1/certs")[1]
    leaf_key = {"rsa1024": rsa_key(1024), "p521": ec_key(ec.SECP521R1())}.get(key or "")
    chain, key_pem = CA.issue(*names, key=leaf_key, days=days, start_days=start)
    if key == "mismatch":
        key_pem = CA.issue("app.test")[1]
    status, answer = bal.api("PUT", "/api/v1/certs/app.test", {"chain": chain, "key": key_pem})
    assert status == 400 and answer["error"] == "invalid_certificate"
    assert reason in answer["message"], answer
    assert key_body(key_pem) not in str(answer)
    assert stored(bal.api("GET", "/api/v1/certs")[1]) == stored(before)


def stored(view: dict[str, Any]) -> dict[str, Any]:
    """The certificates view without `expires_in`, which counts down while the
    test runs (generating an RSA key can cross a second)."""
    return {**view, "certs": [{k: v for k, v in cert.items() if k != "expires_in"}
                              for cert in view["certs"]]}


@pytest.mark.parametrize("body", [
    {"chain": "not pem", "key": "not pem"}, {"chain": 1, "key": 2}, [], {"chain": "x"}])
def test_malformed_uploads_are_refused(bal: Balancer, body: object) -> None:
    status, answer = bal.api("PUT", "/api/v1/certs/app.test", body)
    assert status == 400 and answer["error"] == "invalid_certificate", answer


def test_ctl_set_list_delete(bal: Balancer, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{bal.mport}"
    chain, key = CA.issue("*.wild.test")
    (tmp_path / "chain.pem").write_text(chain)
    (tmp_path / "key.pem").write_text(key)
    out = ok("cert", "set", "*.wild.test", "--chain", str(tmp_path / "chain.pem"),
             "--key", str(tmp_path / "key.pem"), "--url", url)
    assert "*.wild.test: certificate stored" in out and key_body(key) not in out
    listing = ok("cert", "list", "--url", url)
    assert re.search(r"^\*\.wild\.test\s+\d{4}-\d\d-\d\d \d\d:\d\d\s+\d+\s+upload\s+\*\.wild\.test",
                     listing, re.M), listing
    context = client_context(tmp_path)
    wait_for(lambda: _handshakes(bal.ports["tls"], "a.wild.test", context),
             what="the wildcard certificate")
    assert "certificate deleted" in ok("cert", "delete", "*.wild.test", "--url", url)
    done = ctl("cert", "delete", "*.wild.test", "--url", url)
    assert done.returncode == 1 and "no certificate" in done.stderr
    wait_for(lambda: not _handshakes(bal.ports["tls"], "a.wild.test", context),
             what="the deleted certificate to go")
    (tmp_path / "bad.pem").write_text("nonsense")
    done = ctl("cert", "set", "x.wild.test", "--chain", str(tmp_path / "bad.pem"),
               "--key", str(tmp_path / "bad.pem"), "--url", url)
    assert done.returncode == 1 and "not a PEM certificate chain" in done.stderr


@pytest.mark.parametrize(("host", "name"), [
    ("192.0.2.1", "192.0.2.1"), ("[2001:DB8:0::1]", "[2001:db8::1]"), ("127.1", "127.1")])
def test_a_certificate_for_an_ip_address_is_refused(bal: Balancer, host: str, name: str) -> None:
    """No client asks for an IP address by SNI: a certificate stored for one was
    never served (it was accepted, its chain naming the address as a DNS name)."""
    before = bal.api("GET", "/api/v1/certs")[1]
    chain, key = CA.issue(name)
    status, answer = bal.api("PUT", f"/api/v1/certs/{host}", {"chain": chain, "key": key})
    assert status == 400 and answer["error"] == "invalid_host", answer
    assert "IP address" in answer["message"] and "tls.default_host" in answer["message"]
    assert stored(bal.api("GET", "/api/v1/certs")[1]) == stored(before)


def test_ctl_refuses_a_certificate_for_an_ip_address(bal: Balancer, tmp_path: Path) -> None:
    chain, key = CA.issue("[::1]")
    (tmp_path / "chain.pem").write_text(chain)
    (tmp_path / "key.pem").write_text(key)
    done = ctl("cert", "set", "[::1]", "--chain", str(tmp_path / "chain.pem"),
               "--key", str(tmp_path / "key.pem"), "--url", f"http://127.0.0.1:{bal.mport}")
    assert done.returncode == 1 and "::1 is an IP address" in done.stderr, done.stderr
    assert "[::1]" not in {c["host"] for c in bal.api("GET", "/api/v1/certs")[1]["certs"]}


def test_a_stored_certificate_naming_its_host_in_the_cn_only_is_listed_with_why(
        tmp_path: Path) -> None:
    """One stored before such uploads were refused, or written straight into the
    store: listed (API and `balancerctl cert list`) with no name and the reason
    browsers and Go clients refuse it. Bug: its CN was listed as its name."""
    bal = Balancer(tmp_path, {"legacy.test": {"action": "empty", "status": 204}})
    try:
        chain, key = CA.issue("legacy.test", san=False)
        record = {"chain": chain, "key": key, "not_after": time.time() + 80 * 86400,
                  "source": "upload"}
        replace_file(tmp_path / "routes.json.certs.json",
                     json.dumps({"certs": {"legacy.test": record}}))
        why = ("the certificate has no subjectAltName, only the subject's CN=legacy.test, "
               "which browsers and Go clients do not accept as a name")
        listed = wait_for(lambda: bal.api("GET", "/api/v1/certs")[1]["certs"], 10,
                          what="the stored certificate listed")
        assert [(c["host"], c["names"], c["problem"]) for c in listed] \
            == [("legacy.test", [], why)]
        assert why in ok("cert", "list", "--url", f"http://127.0.0.1:{bal.mport}")
    finally:
        bal.stop()


def test_names_cover_hosts() -> None:
    assert covers(("*.example.com",), "a.example.com")
    assert not covers(("*.example.com",), "a.b.example.com")
    assert not covers(("*.example.com",), "example.com")
    assert covers(("*.example.com",), "*.example.com")
    assert not covers(("a.example.com",), "*.example.com")
    chain, key = CA.issue("a.test", "b.test")
    assert check("b.test", chain, key).names == ("a.test", "b.test")
    with pytest.raises(CertificateError, match="not c.test"):
        check("c.test", chain, key)


def test_the_control_socket_makes_a_worker_serve_the_stored_certificates(tmp_path: Path) -> None:
    """The management process's word after a certificate write (`certs` on the
    control socket): the worker's TLS front serves the store's certificates now."""
    from balancer.control import ControlServer
    from balancer.server import Worker
    from balancer.settings import load_settings
    from balancer.stores.file import FileStore
    from tests.test_tls import put_cert

    store = FileStore(str(tmp_path / "routes.json"))
    worker = Worker(load_settings(env={}), store)
    control = ControlServer(str(tmp_path), worker)
    try:
        assert control.answer("certs")["certs"] == 0  # no TLS listener: nothing to serve
        front = worker.front()
        put_cert(tmp_path / "routes.json", "a.test")
        assert front.find("a.test") is None
        assert control.answer("certs")["certs"] == 1
        assert front.find("a.test") is not None
        store.certs().delete("a.test")
        assert control.answer("certs")["certs"] == 0 and front.find("a.test") is None
    finally:
        worker.stopping = True
        control.close()


def test_certs_fill_adds_only_missing_hosts_while_the_store_is_as_judged(tmp_path: Path,
                                                                           ) -> None:
    """``certs-missing`` / ``certs-fill`` on the control socket (a worker started while
    the store is damaged): the records are served only while the store's signature is
    the one the management process judged, only for hosts the worker serves none of;
    a bad query is an error reply that quotes nothing of it."""
    from balancer.control import ControlServer
    from balancer.server import Worker
    from balancer.settings import load_settings
    from balancer.stores.file import FileStore
    from tests.test_tls import put_cert

    routes = tmp_path / "routes.json"
    store = FileStore(str(routes))
    worker = Worker(load_settings(env={}), store)
    control = ControlServer(str(tmp_path), worker)
    try:
        missing = "certs-missing " + json.dumps({"hosts": ["a.test", "b.test"]})
        assert control.answer(missing)["missing"] == []  # no TLS listener: needs none
        front = worker.front()
        put_cert(routes, "a.test")
        control.answer("certs")
        assert control.answer(missing)["missing"] == ["b.test"]
        served_a = front.find("a.test")
        chain, key = CA.issue("b.test")
        other_chain, other_key = CA.issue("a.test")
        records = {"a.test": {"chain": other_chain, "key": other_key},
                   "b.test": {"chain": chain, "key": key}}
        stale = "certs-fill " + json.dumps({"signature": "(1, 2)", "hosts": records})
        assert control.answer(stale)["added"] == 0 and front.find("b.test") is None
        signature = repr(store.certs().signature())
        fill = "certs-fill " + json.dumps({"signature": signature, "hosts": records})
        assert control.answer(fill)["added"] == 1
        assert front.find("b.test") is not None and front.find("a.test") is served_a
        assert control.answer(missing)["missing"] == []
        for bad in ("certs-fill {", "certs-fill []", 'certs-fill {"signature": 1, "hosts": {}}',
                    'certs-missing {"hosts": "a.test"}',
                    'certs-fill {"signature": "x", "hosts": {"a.test": "' + key[:40] + '"}}'):
            answer = control.answer(bad)
            assert "bad query" in answer["error"] and "PRIVATE" not in answer["error"], bad
        assert front.find("b.test") is not None
    finally:
        worker.stopping = True
        control.close()


def test_a_replaced_certificate_is_listed_with_its_new_facts(bal: Balancer) -> None:
    """What a chain says is parsed once and kept by its content
    (`chain_facts`): a certificate replaced (and replaced back) is listed and
    measured with the new one's names and expiry; a deleted one is gone."""
    first, first_key = CA.issue("facts.test", days=90)
    second, second_key = CA.issue("facts.test", "www.facts.test", days=30)
    try:
        for chain, key, names, days in ((first, first_key, ["facts.test"], 90),
                                        (second, second_key,
                                         ["facts.test", "www.facts.test"], 30),
                                        (first, first_key, ["facts.test"], 90)):
            status, answer = bal.api("PUT", "/api/v1/certs/facts.test",
                                     {"chain": chain, "key": key})
            assert status == 200, answer
            for _ in range(2):  # parsed, then kept
                listed = {c["host"]: c for c in bal.api("GET", "/api/v1/certs")[1]["certs"]}
                assert listed["facts.test"]["names"] == names
                assert abs(listed["facts.test"]["expires_in"] - (days - 1) * 86400) < 600
                assert abs(metric(bal.metrics(), "balancer_certificate_expiry_seconds",
                                  host="facts.test") - (days - 1) * 86400) < 600
    finally:
        assert bal.api("DELETE", "/api/v1/certs/facts.test")[0] == 200
    assert "facts.test" not in {c["host"] for c in bal.api("GET", "/api/v1/certs")[1]["certs"]}


def test_chain_facts_are_kept_by_content_and_dropped_when_no_longer_stored() -> None:
    chain, _ = CA.issue("kept.test")
    other, _ = CA.issue("other.test")
    facts = chain_facts(chain)
    assert facts["names"] == ("kept.test",)
    assert chain_facts(chain) is facts  # not parsed again
    assert chain_facts(other)["names"] == ("other.test",)
    keep_facts([other])
    assert chain_facts(chain) is not facts and chain_facts(chain) == facts
    assert chain_facts("garbage")["problem"] == "the stored chain cannot be read"
