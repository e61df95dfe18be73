"""The ACME issuer's decisions without a CA (management/acme_issuer.py): what is
due, the backoff, the TLS-ALPN-01 certificate, the state shown to people.
Issuance against a real CA is tests/test_acme.py."""

from __future__ import annotations

import hashlib
import time

import josepy as jose
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from balancer.certificates import make_record
from management.acme_ca import ACME_IDENTIFIER, alpn_certificate, key_authorization
from management.acme_issuer import BACKOFF_FIRST, BACKOFF_MAX, AcmeHosts, acme_hosts, backoff, due
from management.ctl_cert import format_state
from tests.test_tls import CA

DAY = 86400


def record(host: str, days: float) -> dict:
    chain, key = CA.issue(host, days=days, start_days=-0.01)
    return make_record(host, chain, key, "acme")


def test_backoff_doubles_from_five_minutes_to_six_hours() -> None:
    assert [backoff(n) for n in (1, 2, 3, 4)] == [300, 600, 1200, 2400]
    assert backoff(1) == BACKOFF_FIRST and backoff(8) == BACKOFF_MAX == backoff(10**6)


def test_what_is_due() -> None:
    now = time.time()
    assert due("a.test", None, None, 30, now) == "no certificate"
    assert due("a.test", record("a.test", 90), None, 30, now) is None
    assert due("a.test", record("a.test", 10), None, 30, now).startswith("expires ")
    assert due("a.test", record("b.test", 90), None, 30, now) \
        == "the stored certificate does not name it"
    broken = {"chain": "junk", "key": "x", "not_after": 1, "source": "acme"}
    assert due("a.test", broken, None, 30, now) == "the stored certificate cannot be read"


def test_backoff_and_requests_decide_before_expiry() -> None:
    now = time.time()
    failed = {"state": "failed", "next_retry": now + 60, "attempted": now - 10}
    assert due("a.test", None, failed, 30, now) is None  # still backing off
    assert due("a.test", None, {**failed, "next_retry": now - 1}, 30, now) == "no certificate"
    asked = {**failed, "requested": now - 1}
    assert due("a.test", record("a.test", 90), asked, 30, now) == "requested by an operator"
    served = {**asked, "attempted": now}  # the request was acted on
    assert due("a.test", record("a.test", 90), served, 30, now) is None


def test_a_damaged_state_does_not_stop_issuing() -> None:
    now = time.time()
    for junk in ({"attempted": "x", "requested": "y"}, {"state": "failed", "next_retry": "z"},
                 {"issued_at": None, "attempts": [1]}):
        assert due("a.test", None, junk, 30, now) == "no certificate"


def test_a_state_with_impossible_times_neither_loops_nor_stops_issuing() -> None:
    """A damaged or hand-edited state: a retry further than the longest backoff
    (or infinite), an issuance or an operator's request in the future."""
    now = time.time()
    for retry in (now + BACKOFF_MAX + 3600, 1e18, float("inf"), float("nan")):
        failed = {"state": "failed", "next_retry": retry, "attempted": now - 10}
        assert due("a.test", None, failed, 30, now) == "no certificate", retry
    assert due("a.test", None, {"state": "failed", "next_retry": now + BACKOFF_MAX},
               30, now) is None  # the longest backoff itself is kept
    future = {"state": "issued", "issued_at": 1e18}
    assert due("a.test", record("a.test", 10), future, 30, now).startswith("expires ")
    asked = {"state": "issued", "requested": 1e18, "attempted": now}
    assert due("a.test", record("a.test", 90), asked, 30, now) is None


def test_a_fresh_certificate_is_not_renewed_in_a_loop() -> None:
    now = time.time()
    fresh = {"state": "issued", "issued_at": now - 60}
    # renew_before longer than the certificate's life: due, but issued a minute ago
    assert due("a.test", record("a.test", 90), fresh, 365, now) is None
    assert due("a.test", record("a.test", 90), {**fresh, "issued_at": now - 2 * 3600},
               365, now).startswith("expires ")


def test_only_exact_names_with_tls_acme_are_issued() -> None:
    hosts = {"b.test": {"action": "empty", "status": 204, "tls": "acme"},
             "a.test": {"action": "empty", "status": 204, "tls": "acme"},
             "*.w.test": {"action": "empty", "status": 204, "tls": "acme"},
             "plain.test": {"action": "empty", "status": 204}, "bad": "not a rule"}
    assert acme_hosts(hosts) == ["a.test", "b.test"]


def test_tls_alpn01_certificate_follows_rfc8737() -> None:
    account = jose.JWKRSA(key=rsa.generate_private_key(public_exponent=65537, key_size=2048))
    answer = key_authorization("tok", account)
    token, thumbprint = answer.split(".")
    assert token == "tok" and len(thumbprint) == 43  # base64url SHA-256, no padding
    chain, key = alpn_certificate("app.test", answer)
    cert = x509.load_pem_x509_certificate(chain.encode())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["app.test"]
    extension = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER)
    assert extension.critical
    assert extension.value.value == b"\x04\x20" + hashlib.sha256(answer.encode()).digest()
    assert "PRIVATE KEY" in key


def test_states_for_people() -> None:
    now = 1_000_000.0
    assert format_state({"state": "issued", "renew_at": now + 42 * DAY}, now) \
        == "issued, renewal in 42 d"
    assert format_state({"state": "pending", "reason": "no certificate"}, now) \
        == "pending: no certificate"
    failed = {"state": "failed", "attempts": 2, "next_retry": now + 600, "reason": "boom"}
    assert format_state(failed, now) == "failed (attempt 2, next try in 10 min): boom"


def test_the_acme_hosts_are_found_again_only_when_the_table_changes() -> None:
    """The issuer's look every CHECK_INTERVAL costs nothing while the table is
    the same object (the mirror replaces it on each change)."""
    from types import SimpleNamespace

    class Counted(dict):
        walks = 0

        def items(self):  # type: ignore[override]
            Counted.walks += 1
            return super().items()

    hosts = Counted({f"h{n}.test": {"action": "static"} for n in range(20000)})
    hosts["secure.test"] = {"action": "static", "tls": "acme"}
    table = SimpleNamespace(version=1, hosts=hosts)
    found = AcmeHosts()
    for _ in range(5):
        assert found.of(table) == ["secure.test"]
    assert Counted.walks == 1
    changed = SimpleNamespace(version=2, hosts=Counted({"other.test": {"tls": "acme"}}))
    assert found.of(changed) == ["other.test"] and Counted.walks == 2
    assert found.of(None) == []
