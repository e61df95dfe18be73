"""Outside probe of routing rules and actions (SPEC §3), through a real balancer
(a file store, and Redis where the store matters): host matching, actions,
rule writes. Each case a defect found and fixed (each test fails without its fix):

* A Host of thousands of labels (``x.x.x...x.a.test``, 60 KB: within
  `limits.max_header_bytes`) cost a second of the worker's CPU per request,
  every request on the worker waiting meanwhile: the walk over the name's
  parents copied and hashed each suffix (quadratic). The walk starts at the
  longest suffix that can be a key now (253 bytes); the name is still routed
  by its parents (``*.a.test``).
* ``ip_hash`` on an internal (trusted) listener hashed the front proxy's
  address: every client behind it went to one backend (the limits and the
  heavy hitters named each client by its X-Forwarded-For entry). It hashes
  that client now, as nginx's ``ip_hash`` behind ``real_ip_header`` does.
* A host key written with more than one trailing dot (``app.test..``) was
  stored as ``app.test``, and ``*.`` as ``*``, the catch-all: every unknown
  host then got that rule. The Host field refuses both spellings (a 400), and
  so does the API now.
* One backend spelt two ways (``localhost:P`` and ``LOCALHOST:P``,
  ``[::1]:P`` and ``[0:0::1]:P``) passed the duplicate check: the one server
  got two shares of the requests.
* A redirect whose ``to`` is a path of slashes (``/``) with ``keep_path``
  answered ``GET /\\evil.example/x`` with ``Location: /\\evil.example/x``,
  which browsers read as ``//evil.example/x``, another host (WHATWG URL: a
  backslash is a slash in http(s) URLs); the ``//evil.example`` form was
  already guarded.
* A page override in ``server.pages_dir`` that is a FIFO (a device, a socket)
  blocked its open: the start-up check was killed after 30 s and the balancer
  exited saying only "the start-up check failed (1)". It is refused at once
  now, naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.pages import MAX_PAGE_BYTES
from tests.support import ROOT, Backend, Balancer, raw_exchange, request, split_responses

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)


def static(body: str) -> dict[str, Any]:
    return {"action": "static", "status": 200, "body": body}


HOSTS = {"*.a.test": static("wild"), "*": static("star"),
         "a.test": {**static("parent"), "subdomains": True},
         "b.test": {**static("b"), "subdomains": True}, "*.c.b.test": static("c"),
         "go.test": {"action": "redirect", "to": "/", "keep_path": True}}


@pytest.fixture(scope="module")
def bal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    balancer = Balancer(tmp_path_factory.mktemp("rules"), HOSTS)
    yield balancer
    balancer.stop()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_host_of_thousands_of_labels_costs_its_length(bal: Balancer) -> None:
    """8 requests with a 60 KB Host of 30,000 labels: routed by the wildcard, in
    well under a second of the worker's CPU (each took a second before)."""
    (worker,) = [p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]]
    host = b"x." * 30000 + b"a.test"
    count = 8
    data = b"".join(b"GET / HTTP/1.1\r\nHost: %s\r\n%s\r\n"
                    % (host, b"Connection: close\r\n" if n == count - 1 else b"")
                    for n in range(count))
    before = cpu_seconds(worker)
    answers = split_responses(raw_exchange(bal.port, data, timeout=60))
    spent = cpu_seconds(worker) - before
    assert [(status, body) for status, _, body in answers] == [(200, b"wild")] * count
    assert spent < 2.0, f"{spent:.2f} s of CPU for {count} requests"


@pytest.mark.parametrize(("host", "body"), [
    (b"x." * 124 + b"y.a.test", b"wild"),  # 256 bytes: its parent y.a.test is a key's
    (b"q" * 300 + b".a.test", b"wild"),    # a label too long for a key: its parent is one
    (b"x." * 200 + b"other", b"star"),
])
def test_a_name_longer_than_any_key_is_routed_by_its_parents(bal: Balancer, host: bytes,
                                                             body: bytes) -> None:
    status, _, got = request(bal.port, host=host.decode())
    assert (status, got) == (200, body)


@pytest.mark.parametrize(("host", "body"), [
    (b"a.test", b"parent"), (b"x.a.test", b"wild"),  # one suffix: the *.suffix key first
    (b"x.c.b.test", b"c"), (b"x.y.b.test", b"b"), (b"c.b.test", b"b"),  # the longest
])
def test_a_wildcard_and_a_parent_with_subdomains(bal: Balancer, host: bytes,
                                                 body: bytes) -> None:
    assert request(bal.port, host=host.decode())[2] == body


def test_ip_hash_behind_a_trusted_listener_hashes_the_forwarded_client(
        tmp_path: Path) -> None:
    backends = [Backend(f"b{n}") for n in range(3)]
    rule = {"action": "proxy", "algorithm": "ip_hash",
            "backends": [b.address for b in backends]}
    bal = Balancer(tmp_path, {"ip.test": rule}, internal=True)
    try:
        def picked(port: int, client: str) -> str:
            status, _, body = request(port, host="ip.test", headers={"X-Forwarded-For": client})
            assert status == 200
            return str(json.loads(body)["backend"])

        internal = bal.ports["internal"]
        trusted = {n: picked(internal, f"198.51.100.{n}") for n in range(30)}
        assert len(set(trusted.values())) == 3  # the clients spread
        # each sticks, however its address is written (bug: each spelling was hashed
        # apart, though the limits took them as one; hashed apart, 3 spellings
        # pick one of 3 backends by a 1/9 chance)
        for n in range(4):
            spellings = [f"198.51.100.{n}", f"::ffff:198.51.100.{n}",
                         f"[::FFFF:198.51.100.{n}]:80"]
            assert {picked(internal, address) for address in spellings} == {trusted[n]}, n
            spellings = [f"2001:db8::{n}", f"2001:DB8:0:0::{n}", f"[2001:db8:0::{n}]:443"]
            assert len({picked(internal, address) for address in spellings}) == 1, n
        # an external listener's X-Forwarded-For is the client's word: not hashed
        assert len({picked(bal.port, f"198.51.100.{n}") for n in range(10)}) == 1
    finally:
        bal.stop()
        for backend in backends:
            backend.stop()


@pytest.fixture(params=["file", "redis"])
def store_bal(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Balancer]:
    if request.param == "file":
        balancer = Balancer(tmp_path, {})
    else:  # a namespace of its own in the session's Redis
        balancer = Balancer(tmp_path, store=request.getfixturevalue("redis_server").url,
                            config=f'[store]\nnamespace = "probe-rules-{uuid.uuid4().hex}"\n')
    yield balancer
    balancer.stop()


@pytest.mark.parametrize("key", ["app.test..", "*.", "*.a.test..", "*.."])
def test_a_host_key_with_two_trailing_dots_is_refused(store_bal: Balancer, key: str) -> None:
    status, body = store_bal.api("PUT", f"/api/v1/hosts/{key}", static("x"))
    assert status == 400 and body["details"] == [
        f"host {key!r}: not a valid host name, IPv6 literal ('[::1]'), '*.suffix' or '*'"]
    status, body = store_bal.api("PUT", "/api/v1/hosts", {"hosts": {key: static("x")}})
    assert status == 400
    assert store_bal.api("GET", "/api/v1/hosts")[1]["hosts"] == {}
    assert request(store_bal.port, host="unknown.test")[0] == 503  # no catch-all made


def test_one_trailing_dot_is_the_same_host(store_bal: Balancer) -> None:
    assert store_bal.api("PUT", "/api/v1/hosts/App.Test.", static("x"))[0] == 200
    assert list(store_bal.api("GET", "/api/v1/hosts")[1]["hosts"]) == ["app.test"]
    assert request(store_bal.port, host="APP.test.")[2] == b"x"


@pytest.mark.parametrize("key", ["192.0.2.1", "192.0.2.1.", "127.1", "[::1]", "*.acme.test"])
def test_tls_acme_on_an_ip_or_wildcard_key_is_refused(bal: Balancer, key: str) -> None:
    """One error for each (bug: an IPv4 key was taken, and the issuer asked a CA
    for a certificate it cannot issue over HTTP-01 or TLS-ALPN-01)."""
    rule = static("x") | {"tls": "acme"}
    for path, body in ((f"/api/v1/hosts/{key}", rule), ("/api/v1/hosts", {"hosts": {key: rule}})):
        status, answer = bal.api("PUT", path, body)
        assert (status, answer["error"]) == (400, "invalid_rule"), answer
        assert 'tls: "acme" needs an exact host name' in answer["details"][0]
    assert bal.api("PUT", "/api/v1/hosts/acme1.test", rule)[0] == 200  # a name: taken
    assert bal.api("DELETE", "/api/v1/hosts/acme1.test")[0] == 200


@pytest.mark.parametrize(("first", "second"), [
    ("localhost:{port}", "LOCALHOST:{port}"),
    ("[::1]:{port}", "[0:0::1]:{port}"),
    ("https://App.test", "https://app.TEST:443"),
])
def test_one_backend_spelt_two_ways_is_a_duplicate(bal: Balancer, first: str,
                                                   second: str) -> None:
    rule = {"action": "proxy", "backends": [first.format(port=9), second.format(port=9)]}
    status, body = bal.api("PUT", "/api/v1/hosts/dup.test", rule)
    assert status == 400, body
    assert len(body["details"]) == 1 and "backends[1]: duplicate backend" in body["details"][0]
    # `balancerctl add-backend` of the other spelling sets the weight of the one there
    one = {**rule, "backends": [rule["backends"][0]]}
    assert bal.api("PUT", "/api/v1/hosts/dup.test", one)[0] == 200
    added = {"address": second.format(port=9), "weight": 5}
    assert bal.api("POST", "/api/v1/hosts/dup.test/backends", added)[0] == 200
    assert bal.api("GET", "/api/v1/hosts/dup.test")[1]["rule"]["backends"] == [added]
    assert bal.api("DELETE", f"/api/v1/hosts/dup.test/backends/{first.format(port=9)}"
                   )[0] == 400  # the last one: found under either spelling
    assert bal.api("DELETE", "/api/v1/hosts/dup.test")[0] == 200


@pytest.mark.parametrize("target", [b"/\\evil.example/x", b"/\\/evil.example", b"//\\evil.example",
                                    b"/\\\\evil.example"])
def test_a_redirect_to_a_path_never_names_another_host(bal: Balancer, target: bytes) -> None:
    raw = raw_exchange(bal.port, b"GET %s HTTP/1.1\r\nHost: go.test\r\nConnection: close\r\n\r\n"
                       % target)
    [(status, headers, _)] = split_responses(raw)
    location = headers["location"]
    assert status == 302 and location.startswith("/") and location[1:2] not in ("/", "\\")
    assert location == "/" + target.decode().lstrip("/\\")



@pytest.mark.parametrize("kind", ["fifo", "large"])
def test_a_page_override_that_is_a_fifo_or_too_large_is_refused_at_once(
        tmp_path: Path, kind: str) -> None:
    """A FIFO (bug: its open waited for a writer); a file over 1 MiB (bug: read
    whole, by every worker): the start fails with a message naming the file."""
    pages = tmp_path / "pages"
    pages.mkdir()
    if kind == "fifo":
        os.mkfifo(pages / "maintenance.html")
        problem = "cannot read: not a regular file"
    else:
        (pages / "maintenance.html").write_bytes(b"<p>" + b"x" * MAX_PAGE_BYTES)
        problem = f"larger than {MAX_PAGE_BYTES} bytes"
    (tmp_path / "balancer.toml").write_text(f'[server]\npages_dir = "{pages}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("BALANCER_")}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "balancer", "serve", "--listen", "127.0.0.1:0",
             "--management", "127.0.0.1:0", "--store", f"file:{tmp_path / 'routes.json'}",
             "--config", str(tmp_path / "balancer.toml")],
            env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=20)
    finally:  # a reader still blocked in its open (the bug) reads an end and goes
        with contextlib.suppress(OSError):
            if kind == "fifo":
                os.close(os.open(pages / "maintenance.html", os.O_WRONLY | os.O_NONBLOCK))
    assert done.returncode != 0
    assert f"{pages / 'maintenance.html'}: {problem}" in done.stderr
