"""ACME end to end (SPEC §9): real balancers issue and renew certificates from a
real ACME server, Debian's pebble, which validates every challenge for real
over loopback (tests/pebble.py): HTTP-01 on the plain listener, TLS-ALPN-01 on
the TLS listener, renewal, failure with backoff, one issuer per cluster."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.certificates import make_record
from balancer.stores.file import FileStore
from tests.pebble import Pebble, served_certificate
from tests.support import ROOT, Backend, Balancer, wait_for
from tests.test_ctl import ctl
from tests.test_tls import CA

ISSUED_WITHIN = 40.0  # seconds: an issuance takes ~3 s; the issuer looks every 10 s


@pytest.fixture(scope="module")
def pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pebble]:
    server = Pebble(tmp_path_factory.mktemp("pebble"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    b = Backend("acme-app")
    yield b
    b.stop()


@pytest.fixture
def pebble_root(pebble: Pebble, tmp_path: Path) -> str:
    path = tmp_path / "pebble-root.pem"
    path.write_text(pebble.roots())
    return str(path)


def acme_rule(backend: Backend, **extra: Any) -> dict[str, Any]:
    return {"action": "proxy", "backends": [backend.address], "tls": "acme", **extra}


def front(tmp: Path, pebble: Pebble, hosts: dict[str, Any], *, store: str | None = None,
          on_pebble_ports: bool = True, **config: Any) -> Balancer:
    """A balancer whose listeners are where pebble validates (or free ports)."""
    listen = f"127.0.0.1:{pebble.http_port}" if on_pebble_ports else "127.0.0.1:0"
    tls = f"127.0.0.1:{pebble.tls_port}" if on_pebble_ports else "127.0.0.1:0"
    return Balancer(tmp, hosts, listen=listen, store=store, args=["--tls-listen", tls],
                    config=pebble.config(**config))


def state_of(bal: Balancer, host: str) -> dict[str, Any]:
    return bal.api("GET", "/api/v1/acme")[1]["hosts"].get(host, {})


def wait_state(bal: Balancer, host: str, state: str, timeout: float = ISSUED_WITHIN,
               since: float = 0.0) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        found = state_of(bal, host)
        stamp = found.get("issued_at") or found.get("failed_at") or 0
        return found if found.get("state") == state and stamp >= since else None
    return wait_for(reached, timeout, what=f"{host} {state}:\n{bal.output()[-3000:]}")


def wait_pass(bal: Balancer, version: int = 0) -> dict[str, Any]:
    """The issuer's passes once it finished one that began on table `version` or a
    later one (any pass for 0): what was due then was issued or failed in it."""
    def passed() -> dict[str, Any] | None:
        found = bal.api("GET", "/api/v1/acme")[1]["passes"]
        done = found["count"] and (found["table_version"] or 0) >= version
        return found if done else None
    return wait_for(passed, 15, what=f"an issuer pass on version {version}")


def wait_served(port: int, name: str, root: str, issuer: str) -> dict[str, Any]:
    """The certificate served for `name` once it is `issuer`'s (workers follow the
    store's certificates within a second)."""
    def served() -> dict[str, Any] | None:
        try:
            found = served_certificate(port, name, root)
        except OSError:  # ssl.SSLError: not served yet (unknown name, or not verified)
            return None
        return found if found["issuer"] == issuer else None
    return wait_for(served, 10, what=f"{name}'s certificate from {issuer}")


def acme_metrics(bal: Balancer) -> dict[str, float]:
    """The ``balancer_acme_*`` samples of `bal`'s /metrics, as {'NAME{LABEL}': value}."""
    return {f"{name}{{{','.join(v for _, v in labels)}}}": value
            for (name, labels), value in bal.metrics().items()
            if name.startswith("balancer_acme_")}


def test_http01_issues_a_certificate_every_worker_serves(
        tmp_path: Path, pebble: Pebble, backend: Backend, pebble_root: str) -> None:
    bal = front(tmp_path, pebble, {"app.test": acme_rule(backend, https_redirect=True),
                                   "plain.test": {"action": "empty", "status": 204}})
    try:
        state = wait_state(bal, "app.test", "issued")
        assert state["issuer"].startswith("CN=Pebble Intermediate CA")
        served = served_certificate(pebble.tls_port, "app.test", pebble_root)  # at once
        assert served["issuer"] == state["issuer"]
        assert abs(served["not_after"] - state["not_after"]) < 1
        view = bal.api("GET", "/api/v1/acme")[1]
        assert view["account"]["registered"] and view["issuer"]["this_balancer"]
        assert list(view["hosts"]) == ["app.test"]  # plain.test asks for no certificate
        assert (view["directory"], view["challenge"]) == (pebble.directory_url, "http-01")
        certs = bal.api("GET", "/api/v1/certs")[1]
        entry = next(c for c in certs["certs"] if c["host"] == "app.test")
        assert entry["source"] == "acme" and entry["acme"]["state"] == "issued"
        text = json.dumps([view, certs])
        assert "PRIVATE KEY" not in text and '"d"' not in text  # no key, not the account's
        listed = ctl("--url", f"http://127.0.0.1:{bal.mport}", "cert", "list")
        assert listed.returncode == 0 and "app.test: issued, renewal in" in listed.stdout
        metrics = acme_metrics(bal)
        assert metrics["balancer_acme_issuances_total{ok}"] == 1
        assert metrics["balancer_acme_issuances_total{failed}"] == 0
        assert (metrics["balancer_acme_hosts{issued}"], metrics["balancer_acme_hosts{pending}"]) \
            == (1, 0)
        to_renewal = state["renew_at"] - time.time()
        assert metrics["balancer_acme_next_attempt_seconds{app.test}"] \
            == pytest.approx(to_renewal, abs=30)
        log = bal.output()
        assert "acme: issuing a certificate for app.test (no certificate)" in log
        assert "acme: certificate for app.test issued by CN=Pebble" in log
        # one balancer alone waits for no acknowledgement but its own: it looks at
        # them once (counted, not timed: telling its own workers took 0.77 s under
        # load 16, while a wait of one 0.05 s step would have passed a time bound)
        assert re.search(r"challenge for app\.test is served by 1 balancer \([\d.]+ s, "
                         r"1 look at the acknowledgements\)", log), log
        thumbprint = view["account"]["key_thumbprint"]
    finally:
        bal.stop()
    # a restarted balancer keeps the certificate and the account, issuing nothing
    again = front(tmp_path, pebble, None)
    try:
        wait_pass(again)  # what it would issue, it issues in its first pass
        assert "took the lock" in again.output() and "acme: issuing" not in again.output()
        assert state_of(again, "app.test")["state"] == "issued"
        assert again.api("GET", "/api/v1/acme")[1]["account"]["key_thumbprint"] == thumbprint
        served_certificate(pebble.tls_port, "app.test", pebble_root)
    finally:
        again.stop()


def test_tls_alpn01_issues_on_the_tls_listener(
        tmp_path: Path, pebble: Pebble, backend: Backend, pebble_root: str) -> None:
    bal = front(tmp_path, pebble, {"alpn.test": acme_rule(backend)}, challenge="tls-alpn-01")
    try:
        state = wait_state(bal, "alpn.test", "issued")
        wait_served(pebble.tls_port, "alpn.test", pebble_root, state["issuer"])
        assert "from " + pebble.directory_url + ", tls-alpn-01" in bal.output()
    finally:
        bal.stop()


@pytest.mark.slow
def test_a_certificate_inside_renew_before_is_renewed_once(
        tmp_path: Path, pebble: Pebble, backend: Backend, pebble_root: str) -> None:
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({"version": 1, "hosts": {"renew.test": acme_rule(backend)}}))
    chain, key = CA.issue("renew.test", days=3)  # issued earlier, expiring in 2 days
    FileStore(str(routes)).certs().put("renew.test", make_record("renew.test", chain, key,
                                                                 "acme"))
    # renew_before longer than pebble's 5-year certificates: renewed once, not in a loop
    bal = front(tmp_path, pebble, None, renew_before=3650)
    try:
        first = wait_state(bal, "renew.test", "issued")
        assert "(expires " in bal.output() and "within renew_before (3650 days)" in bal.output()
        served = wait_served(pebble.tls_port, "renew.test", pebble_root, first["issuer"])
        # the table changes (the issuer looks again at once): nothing is due yet
        changed = bal.api("PUT", "/api/v1/hosts/other.test", {"action": "empty", "status": 204})
        wait_pass(bal, changed[1]["version"])
        assert state_of(bal, "renew.test")["issued_at"] == first["issued_at"]
        assert bal.output().count("acme: issuing a certificate for renew.test") == 1
        # an operator asks: renewed now
        asked = ctl("--url", f"http://127.0.0.1:{bal.mport}", "cert", "issue", "renew.test")
        assert asked.returncode == 0 and "issuance requested" in asked.stdout
        second = wait_state(bal, "renew.test", "issued", since=first["issued_at"] + 0.001)
        assert second["not_after"] >= first["not_after"]
        # this balancer's workers were told before the state says issued: served at once
        assert served_certificate(pebble.tls_port, "renew.test", pebble_root)["serial"] \
            != served["serial"]
    finally:
        bal.stop()


def test_a_failing_host_backs_off_and_the_others_are_issued(
        tmp_path: Path, pebble: Pebble, backend: Backend) -> None:
    pebble.point("down.test", "127.0.0.2")  # the CA cannot reach this name's balancer
    bal = front(tmp_path, pebble, {"down.test": acme_rule(backend), "up.test": acme_rule(backend)})
    try:
        failed = wait_state(bal, "down.test", "failed")
        assert failed["attempts"] == 1
        assert failed["next_retry"] - failed["failed_at"] == pytest.approx(300, abs=1)
        assert failed["reason"].startswith("validation failed: down.test: connection")
        wait_state(bal, "up.test", "issued")
        assert "acme: issuing a certificate for down.test failed (attempt 1)" in bal.output()
        metrics = acme_metrics(bal)
        assert metrics["balancer_acme_issuances_total{failed}"] == 1
        assert metrics["balancer_acme_issuances_total{ok}"] == 1
        assert (metrics["balancer_acme_hosts{failed}"], metrics["balancer_acme_hosts{issued}"]) \
            == (1, 1)
        assert 200 < metrics["balancer_acme_next_attempt_seconds{down.test}"] <= 300
        certs = {c["host"] for c in bal.api("GET", "/api/v1/certs")[1]["certs"]}
        assert certs == {"up.test"}
        # the backoff holds: a change to the table makes the issuer look, not retry
        changed = bal.api("PUT", "/api/v1/hosts/other.test", {"action": "empty", "status": 204})
        wait_pass(bal, changed[1]["version"])
        assert state_of(bal, "down.test")["attempts"] == 1
        # an operator's request retries at once; the next wait doubles
        status, body = bal.api("POST", "/api/v1/certs/down.test/issue")
        assert status == 202 and body["acme"]["state"] == "pending"
        again = wait_state(bal, "down.test", "failed", since=failed["failed_at"] + 0.001)
        assert again["attempts"] == 2
        assert again["next_retry"] - again["failed_at"] == pytest.approx(600, abs=1)
        listed = ctl("--url", f"http://127.0.0.1:{bal.mport}", "cert", "list").stdout
        assert "down.test: failed (attempt 2, next try in 10 min): validation failed" in listed
    finally:
        bal.stop()


def test_issue_requests_are_checked(tmp_path: Path, pebble: Pebble, backend: Backend) -> None:
    bal = front(tmp_path, pebble, {"plain.test": {"action": "empty", "status": 204}},
                on_pebble_ports=False)
    try:
        status, body = bal.api("POST", "/api/v1/certs/plain.test/issue")
        assert (status, body["error"]) == (409, "not_acme")
        status, body = bal.api("POST", "/api/v1/certs/nowhere.test/issue")
        assert (status, body["error"]) == (404, "not_found")
        status, body = bal.api("PUT", "/api/v1/hosts/*.wild.test", acme_rule(backend))
        assert (status, body["error"]) == (400, "invalid_rule")
        assert "exact host name" in body["details"][0]
        done = ctl("--url", f"http://127.0.0.1:{bal.mport}", "cert", "issue", "plain.test")
        assert done.returncode == 1 and 'has no "tls": "acme"' in done.stderr
        assert bal.api("GET", "/api/v1/acme")[1]["issuer"] is None  # no work: no lock taken
    finally:
        bal.stop()


def test_one_issuer_per_cluster(tmp_path: Path, pebble: Pebble, backend: Backend,
                                redis_server: Any, pebble_root: str) -> None:
    cluster = f'[store]\nnamespace = "acme-{uuid.uuid4().hex[:8]}"\n' + pebble.config()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = Balancer(tmp_path / "a", None, listen=f"127.0.0.1:{pebble.http_port}",
                 store=redis_server.url, config=cluster,
                 args=["--tls-listen", f"127.0.0.1:{pebble.tls_port}"])
    b = Balancer(tmp_path / "b", None, store=redis_server.url, config=cluster,
                 args=["--tls-listen", "127.0.0.1:0"])
    try:
        status, _ = a.api("PUT", "/api/v1/hosts/cluster.test", acme_rule(backend))
        assert status == 200
        issued = wait_state(a, "cluster.test", "issued")
        assert wait_state(b, "cluster.test", "issued") == issued  # one state, in the store
        issuers = [bal.api("GET", "/api/v1/acme")[1]["issuer"] for bal in (a, b)]
        assert issuers[0]["owner"] == issuers[1]["owner"]
        assert sorted(i["this_balancer"] for i in issuers) == [False, True]
        logs = [bal.output() for bal in (a, b)]
        assert sum("acme: issuing a certificate for cluster.test" in log for log in logs) == 1
        assert sum("took the lock" in log for log in logs) == 1
        # the issuer asked the CA once the other balancer acknowledged the challenge
        assert sum("the challenge for cluster.test is served by 2 balancers" in log
                   for log in logs) == 1
        # both balancers serve the certificate, whichever issued it
        for port in (pebble.tls_port, b.ports["tls"]):
            wait_served(port, "cluster.test", pebble_root, issued["issuer"])
        # the issuer stops: it hands the lock over, and the other one takes it
        holder, other = (a, b) if issuers[0]["this_balancer"] else (b, a)
        holder.stop()
        assert other.api("POST", "/api/v1/certs/cluster.test/issue")[0] == 202
        wait_for(lambda: "took the lock" in other.output(), 15, what="the lock taken over")
    finally:
        a.stop()
        b.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")
def test_issuance_as_a_dropped_user(pebble: Pebble, backend: Backend, pebble_root: str) -> None:
    """`server.user = "nobody"`: the issuer runs after the drop, where the Python
    installation may be unreadable (here under /root, mode 0700): every module
    it uses is imported before, the CA bundle is read as the run user, the
    store written as it."""
    nobody = pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="balancer-acme-priv-"))
    try:
        base.chmod(0o777)  # the run user writes the routes file and ACME's beside it
        bundle = base / "pebble-api-ca.pem"
        shutil.copy(pebble.ca_bundle, bundle)
        bundle.chmod(0o644)
        config = '[server]\nuser = "nobody"\n' + pebble.config().replace(
            str(pebble.ca_bundle), str(bundle))
        audit = base / "imports"
        audit.mkdir(mode=0o777)
        audit.chmod(0o777)
        bal = Balancer(base, {"nobody.test": acme_rule(backend)},
                       listen=f"127.0.0.1:{pebble.http_port}", config=config,
                       args=["--tls-listen", f"127.0.0.1:{pebble.tls_port}"],
                       prefix=["env", f"PYTHONPATH={ROOT}:{ROOT / 'tests' / 'import_audit'}",
                               f"IMPORT_AUDIT_DIR={audit}"])
        try:
            state = wait_state(bal, "nobody.test", "issued")
            wait_served(pebble.tls_port, "nobody.test", pebble_root, state["issuer"])
            assert "running as nobody" in bal.output()
            for name in ("routes.json.certs.json", "routes.json.acme.json"):
                assert (base / name).stat().st_uid == nobody.pw_uid
            assert "Traceback" not in bal.output()
            for path in ("/api/v1/acme", "/metrics", "/api/v1/certs"):
                assert bal.api("GET", path)[0] == 200
            # nothing was imported after the drop (what the arbiter imports is
            # preloading, the entry points read in it too: the children import nothing)
            late = {p.name: p.read_text().split() for p in audit.glob("dropped-*.txt")}
            assert late == {}, late
            assert list(audit.glob("imports-*.txt")), "the audit did not run"  # the arbiter's
        finally:
            bal.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="privilege drop needs root")
def test_a_ca_bundle_the_run_user_cannot_read_stops_the_start(pebble: Pebble) -> None:
    tmp_path = Path(tempfile.mkdtemp(prefix="balancer-acme-priv-"))
    tmp_path.chmod(0o777)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    bundle = private / "ca.pem"
    shutil.copy(pebble.ca_bundle, bundle)
    config = tmp_path / "b.toml"
    config.write_text('[server]\nuser = "nobody"\n' + pebble.config().replace(
        str(pebble.ca_bundle), str(bundle)))
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-m", "balancer", "serve", "--store",
                           f"file:{tmp_path}/r.json", "--listen", "127.0.0.1:0",
                           "--management", "127.0.0.1:0", "--config", str(config)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
    shutil.rmtree(tmp_path, ignore_errors=True)
    assert done.returncode == 1, done.stderr
    assert f"acme.ca_bundle: '{bundle}': cannot read as the run user" in done.stderr
    assert "Permission denied" in done.stderr


def test_challtestsrv_starts_on_a_fresh_dns_port_when_its_udp_side_is_taken(
        tmp_path: Path) -> None:
    server = Pebble(tmp_path)
    taken = server.dns_port  # held on TCP only: anyone may bind it on UDP
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind(("127.0.0.1", taken))
        try:
            server.start()
            assert server.dns_port != taken and server.answers_dns()
        finally:
            server.stop()
