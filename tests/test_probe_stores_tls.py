"""Outside probe of ``rediss://`` against a real redis-server speaking TLS
(2026-12-07; the earlier tests only parsed such URLs). Behaviour pinned:

* trusted through ``?ssl_ca_certs=CA``: writes, the watch and the workers
  follow the store as over plain TCP;
* a certificate the balancer does not trust (no ``ssl_ca_certs`` for a private
  CA), or ``redis://`` to the TLS port: the balancer starts and serves, the
  store is reported unreachable with the cause, a write answers 503
  ``store_unavailable`` naming it, the process keeps running. (Fixed: an
  untrusted certificate's cause now says to give the CA, ``?ssl_ca_certs=``.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.conftest import RedisServer, wait_until
from tests.support import Balancer, request, wait_for
from tests.tlsca import TestCA


def static(body: str) -> dict[str, Any]:
    return {"action": "static", "body": body}


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, Path]]:
    """A redis-server listening with TLS only, on its port; the CA file to trust."""
    ca = TestCA()
    chain, key = ca.issue("localhost", ips=("127.0.0.1",))
    directory = tmp_path / "redis"
    directory.mkdir()
    (directory / "cert.pem").write_text(chain)
    (directory / "key.pem").write_text(key)
    ca_file = ca.write(directory)
    server = RedisServer(directory)
    server.start("--port", "0", "--tls-port", str(server.port),
                 "--tls-cert-file", str(directory / "cert.pem"),
                 "--tls-key-file", str(directory / "key.pem"),
                 "--tls-ca-cert-file", str(ca_file), "--tls-auth-clients", "no", wait=False)
    client = redis.Redis(port=server.port, ssl=True, ssl_ca_certs=str(ca_file),
                         socket_timeout=2)

    def up() -> bool:
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
    try:
        wait_until(up, timeout=10, message="redis-server over TLS")
        yield server, ca_file
    finally:
        client.close()
        server.close()


def test_rediss_with_the_ca_is_a_store_like_any_other(
        tmp_path: Path, tls_redis: tuple[RedisServer, Path]) -> None:
    server, ca_file = tls_redis
    url = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={ca_file}"
    balancer = Balancer(tmp_path, args=["--workers", "2"], store=url)
    other = redis.Redis(port=server.port, ssl=True, ssl_ca_certs=str(ca_file))
    try:
        status, answer = balancer.api("PUT", "/api/v1/hosts/app.test", static("one"))
        assert status == 200, answer
        wait_for(lambda: request(balancer.port, host="app.test")[2] == b"one")
        # another writer's change reaches the workers through the TLS subscription
        other.execute_command("HSET", "balancer:hosts", "app.test",
                              '{"action": "static", "body": "two"}')
        version = other.incr("balancer:version")
        other.publish("balancer:changes", str(version))
        wait_for(lambda: all(request(balancer.port, host="app.test")[2] == b"two"
                             for _ in range(4)), what="the other write served")
        assert balancer.store_problem() == ""
    finally:
        other.close()
        balancer.stop()


@pytest.mark.parametrize("how", ["untrusted", "plain-to-tls"])
def test_a_tls_redis_that_cannot_be_talked_to_is_reported(
        tmp_path: Path, tls_redis: tuple[RedisServer, Path], how: str) -> None:
    server, _ = tls_redis
    scheme = "rediss" if how == "untrusted" else "redis"
    balancer = Balancer(tmp_path, args=["--workers", "2"],
                        store=f"{scheme}://127.0.0.1:{server.port}/0")
    try:
        wait_for(lambda: "unreachable" in balancer.store_problem(), what="reported")
        status, answer = balancer.api("PUT", "/api/v1/hosts/app.test", static("x"))
        assert status == 503 and answer["error"] == "store_unavailable", answer
        for told in (balancer.store_problem(), answer["message"]):
            assert ("CERTIFICATE_VERIFY_FAILED" in told and "ssl_ca_certs=" in told
                    if how == "untrusted" else "Connection reset by peer" in told), told
        assert balancer.proc.poll() is None
    finally:
        balancer.stop()
