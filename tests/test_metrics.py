"""Prometheus metrics (SPEC §7): names, labels and values, parsed back with the client's parser."""

from __future__ import annotations

import json
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from balancer.stats import Stats, merge_snapshots
from management.metrics import Metrics
from tests.support import ScriptedHealth, samples

SPEC_NAMES = {
    "balancer_requests": "counter",
    "balancer_request_duration_seconds": "histogram",
    "balancer_bytes_received": "counter",
    "balancer_bytes_sent": "counter",
    "balancer_open_connections": "gauge",
    "balancer_lingering_connections": "gauge",
    "balancer_open_requests": "gauge",
    "balancer_backend_requests": "counter",
    "balancer_backend_up": "gauge",
    "balancer_spinning_requests": "gauge",
    "balancer_limited_requests": "counter",
    "balancer_routing_version": "gauge",
    "balancer_config_reloads": "counter",
    "balancer_store_up": "gauge",
    "balancer_access_log_dropped_records": "counter",
    "balancer_process_log_dropped_lines": "counter",
    "balancer_tls_handshakes": "counter",
    "balancer_certificate_expiry_seconds": "gauge",
    "balancer_acme_issuances": "counter",
    "balancer_acme_hosts": "gauge",
    "balancer_acme_next_attempt_seconds": "gauge",
}


def render(snapshot: dict[str, Any]) -> str:
    return text(Metrics(lambda: snapshot))


def text(metrics: Metrics) -> str:
    return b"".join(metrics.render()).decode()


def worker_with_traffic() -> Stats:
    stats = Stats()
    stats.open_connections = 2
    stats.routing_version = 7
    stats.config_reloads = 3
    host = stats.host("web.example.com")
    host.open_requests = 5
    for seconds in (0.001, 0.02, 0.3):
        host.finish(200, 100, 1000, seconds)
    host.finish(503, 10, 20, 2.0)
    host.spinning = 1
    backend = host.backend("127.0.0.1:9001")
    backend.successes = 3
    backend.outcomes["connect_error"] = 1
    return stats


def test_every_spec_metric_is_exposed_even_without_traffic() -> None:
    families = {f.name: f.type for f in text_string_to_metric_families(render(
        Stats().snapshot()))}
    assert families == SPEC_NAMES


def test_values_match_the_traffic_counted() -> None:
    got = samples(render(worker_with_traffic().snapshot()))
    host = (("host", "web.example.com"),)
    assert got[("balancer_requests_total", (("code", "200"), *host))] == 3
    assert got[("balancer_requests_total", (("code", "503"), *host))] == 1
    assert got[("balancer_bytes_received_total", host)] == 310
    assert got[("balancer_bytes_sent_total", host)] == 3020
    assert got[("balancer_open_requests", host)] == 1
    assert got[("balancer_spinning_requests", host)] == 1
    assert got[("balancer_open_connections", ())] == 2
    assert got[("balancer_routing_version", ())] == 7
    assert got[("balancer_config_reloads_total", ())] == 3
    assert got[("balancer_store_up", ())] == 1
    assert got[("balancer_request_duration_seconds_count", host)] == 4
    assert abs(got[("balancer_request_duration_seconds_sum", host)] - 2.321) < 1e-9
    assert got[("balancer_request_duration_seconds_bucket", (*host, ("le", "0.005")))] == 1
    assert got[("balancer_request_duration_seconds_bucket", (*host, ("le", "0.025")))] == 2
    assert got[("balancer_request_duration_seconds_bucket", (*host, ("le", "0.5")))] == 3
    assert got[("balancer_request_duration_seconds_bucket", (*host, ("le", "+Inf")))] == 4
    backend = (("backend", "127.0.0.1:9001"), *host)
    assert got[("balancer_backend_requests_total", (*backend, ("outcome", "success")))] == 3
    assert got[("balancer_backend_requests_total",
                (*backend, ("outcome", "connect_error")))] == 1
    assert got[("balancer_backend_up", backend)] == 1


def test_workers_are_aggregated_and_survive_a_json_round_trip() -> None:
    one, two = worker_with_traffic(), worker_with_traffic()
    two.routing_version = 8
    two.store_up = 0
    merged = json.loads(json.dumps(merge_snapshots([one.snapshot(), two.snapshot()])))
    got = samples(render(merged))
    host = (("host", "web.example.com"),)
    assert got[("balancer_requests_total", (("code", "200"), *host))] == 6
    assert got[("balancer_request_duration_seconds_bucket", (*host, ("le", "+Inf")))] == 8
    assert got[("balancer_routing_version", ())] == 8
    assert got[("balancer_store_up", ())] == 0
    assert got[("balancer_open_connections", ())] == 4


def test_a_backend_marked_down_reads_zero() -> None:
    stats = Stats()
    stats.host("web.example.com").backend("127.0.0.1:9001").source = ScriptedHealth("down")
    got = samples(render(stats.snapshot()))
    assert got[("balancer_backend_up", (("backend", "127.0.0.1:9001"),
                                        ("host", "web.example.com")))] == 0


def test_label_values_are_escaped() -> None:
    stats = Stats()
    stats.host('we"ird\\host').finish(200, 1, 1, 0.1)
    got = samples(render(stats.snapshot()))
    assert got[("balancer_requests_total", (("code", "200"), ("host", 'we"ird\\host')))] == 1


class Issued:
    outcomes = {"ok": 3, "failed": 2}


def test_acme_figures_come_from_the_stored_states(tmp_path) -> None:
    from balancer.stores.file import FileStore
    from management.acme_api import figures

    store = FileStore(str(tmp_path / "routes.json"))
    acme = {"action": "empty", "status": 204, "tls": "acme"}
    hosts = {f"{n}.test": acme for n in ("ok", "bad", "new", "junk")}
    hosts["plain.test"] = {"action": "empty", "status": 204}
    now = 1_000_000.0
    store.acme().put_state("ok.test", {"state": "issued", "renew_at": now + 86400})
    store.acme().put_state("bad.test", {"state": "failed", "next_retry": now + 300})
    store.acme().put_state("junk.test", {"state": "weird", "next_retry": "x"})
    store.acme().put_state("gone.test", {"state": "issued", "renew_at": now})  # no rule now
    found = figures(store, hosts, Issued(), now)
    assert found == {"issuances": {"ok": 3, "failed": 2},
                     "hosts": {"pending": 2, "issued": 1, "failed": 1},
                     "next_attempt": {"ok.test": 86400, "bad.test": 300, "new.test": 0,
                                      "junk.test": 0}}
    got = samples(text(Metrics(lambda: Stats().snapshot(), None,
                               lambda: figures(store, hosts, Issued(), now))))
    assert got[("balancer_acme_issuances_total", (("outcome", "failed"),))] == 2
    assert got[("balancer_acme_hosts", (("state", "pending"),))] == 2
    assert got[("balancer_acme_next_attempt_seconds", (("host", "bad.test"),))] == 300
    assert figures(store, hosts, None, now)["issuances"] == {"ok": 0, "failed": 0}


def test_acme_metrics_are_zero_when_the_store_cannot_be_read() -> None:
    def broken() -> dict:
        raise OSError("store down")
    got = samples(text(Metrics(lambda: Stats().snapshot(), None, broken)))
    assert got[("balancer_acme_hosts", (("state", "issued"),))] == 0
    assert got[("balancer_open_connections", ())] == 0  # the rest still answers


def test_the_few_families_are_written_as_prometheus_clients_generate_latest() -> None:
    """`families_text` writes byte for byte what `generate_latest` wrote for the
    snapshot's families (its module imports prometheus-client's HTTP servers:
    `management.process.parts_only`): escaped label values, unicode, floats,
    NaN and both infinities, big and negative numbers, booleans, counters named
    with `_total` (the help texts have nothing to escape: compared too)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from management.metrics import SnapshotCollector
    from management.metrics_text import families_text

    snap = worker_with_traffic().snapshot()
    snap.update(open_connections=10**7, lingering_connections=-3, store_up=True,
                access_log_dropped=2.5, routing_version=2**63 + 1, config_reloads=float("nan"),
                process_log_dropped=-0.0,
                tls_handshakes={'re"used\\': 4, "full\nnew": 1e21, "ünï 😀\t\r": 999_999})
    sources = (lambda: {'a"b\\c.test': -12.25, "z.test": 86400.0, "\n": float("inf"),
                        "é.test": float("-inf"), "": 5e-324},
               lambda: {"issuances": {"ok": 3}, "hosts": {"failed": 1},
                        "next_attempt": {"x.test": 0.1 + 0.2}},
               lambda: {"management": 7, "arbiter": 1_000_000})
    collector = SnapshotCollector(snap, *sources)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = families_text(collector.collect())
    assert text == generate_latest(registry)
    assert b'balancer_tls_handshakes_total{outcome="re\\"used\\\\"} 4.0\n' in text
    assert b"# HELP balancer_config_reloads_total " in text
