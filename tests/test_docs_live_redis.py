"""The references hold on a Redis store too: `/metrics` exports the families of
docs/metrics.md, and what the balancer keeps in Redis (keys and their types,
pub/sub channels) is what docs/stores.md's table of keys lists. One `balancer
serve` on the session's redis-server, in a namespace of its own."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.docs_live import (
    CERT_HOSTS,
    Live,
    documented_families_exported,
    traffic_hosts,
)
from tests.support import ROOT, Backend, Balancer, dead_address, wait_for
from tests.test_tls import CA

pytestmark = pytest.mark.xdist_group("docs_live_redis")  # one balancer: one worker


@pytest.fixture(scope="module")
def namespace() -> str:
    return f"docs-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, redis_server: Any,
         namespace: str) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("docs_live_redis")
    backend = Backend("docs-redis")
    config = (f'[store]\nnamespace = "{namespace}"\n[timeouts]\nclient_header = 0.5\n'
              '[acme]\ndirectory = "http://127.0.0.1:1/directory"\n')
    bal = Balancer(tmp, store=redis_server.url, config=config,
                   args=["--tls-listen", "127.0.0.1:0"])
    live = Live(bal, token=None)
    try:
        hosts = traffic_hosts(backend.address)
        assert live.call("PUT", "/api/v1/hosts", {"hosts": hosts})[0] == 200
        for host in CERT_HOSTS:
            chain, key = CA.issue(host)
            assert live.call("PUT", f"/api/v1/certs/{host}", {"chain": chain, "key": key})[0] == 200
        yield live
    finally:
        bal.stop()
        backend.stop()


def test_metrics_reference_holds_on_redis(live: Live) -> None:
    documented_families_exported(live)


def documented_keys() -> dict[str, str]:
    """docs/stores.md's Redis keys: name after `NS:` -> type (hash, string, pub/sub)."""
    doc = (ROOT / "docs" / "stores.md").read_text().split("## Redis store")[1]
    rows = re.findall(r"^\| `NS:([a-z-]+)` \| ([a-z/]+)", doc, re.M)
    assert len(rows) >= 10
    return dict(rows)


def test_redis_keys_are_the_documented_ones(live: Live, redis_server: Any,
                                            namespace: str) -> None:
    """Keys seen while a deploy runs (its claim and in-flight counts) and after
    ACME issuance was tried: each is in the table, with its type."""
    status, _, answer = live.call("POST", "/api/v1/hosts/deploy.test/deploy",
                                  {"backends": [dead_address()], "ready_timeout": 60})
    assert status == 202, answer
    client = redis_server.client()
    prefix = f"{namespace}:"
    wanted = {"hosts", "version", "deploys", "deploy-claims", "deploy-inflight", "certs",
              "certs-version", "acme-state"}

    def keys() -> dict[str, str]:
        return {key[len(prefix):]: client.type(key)
                for key in client.scan_iter(match=f"{prefix}*", count=1000)}
    wait_for(lambda: wanted <= set(keys()), timeout=10, what=f"the keys {sorted(wanted)}")
    documented = documented_keys()
    found = keys()
    channels = {channel[len(prefix):]: "pub/sub"
                for channel in client.pubsub_channels(f"{prefix}*")}
    assert channels, "no balancer subscribed to a channel of the namespace"
    for name, kind in {**found, **channels}.items():
        assert name in documented, f"docs/stores.md does not list the key NS:{name} ({kind})"
        assert documented[name].startswith(kind), (
            f"docs/stores.md: NS:{name} is a {documented[name]}, Redis says {kind}")
    assert json.loads(client.hget(f"{prefix}deploy-claims", "deploy.test"))["id"]
