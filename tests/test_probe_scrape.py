"""Hostile probe of ``/metrics`` under a big table (SPEC §7, §11): every host of
thousands has seen a request, Prometheus scrapes, and the operator (or an
orchestrator's liveness probe) asks ``/healthz`` meanwhile.

Found and fixed: the scrape's text was built by prometheus-client in one go
(~20 µs a sample): 20,000 active hosts made a 41 MB scrape of 25-35 s during
which the management process answered nothing (``/healthz`` waited 34 s).
The per-host families are written by `management.metrics_text` now, byte for
byte the same text, ~8x quicker and pausing every `HOSTS_PER_PAUSE` hosts.
"""

from __future__ import annotations

import http.client
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from balancer.stats import BUCKETS
from management.metrics_text import HOSTS_PER_PAUSE, per_host_text
from tests.support import Balancer, in_threads, samples
from tests.test_process import children_of

HOSTS = 3000  # before the fix their text held the management process ~75 % of a scrape
CLIENTS = 4  # connections the hosts' requests are pipelined on
ABORTED = 8  # scrapes whose client hangs up after the head


def get(port: int, path: str, timeout: float = 60) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body


def touch(port: int, names: list[str]) -> None:
    """One request to each of `names`, pipelined on one connection."""
    data = b"".join(f"GET / HTTP/1.1\r\nHost: {name}\r\n\r\n".encode() for name in names)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sender = threading.Thread(target=sock.sendall, args=(data,))
        sender.start()
        got, deadline = b"", time.monotonic() + 60
        while got.count(b"HTTP/1.1 200 ") < len(names) and time.monotonic() < deadline:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        sender.join(timeout=30)
    assert got.count(b"HTTP/1.1 200 ") == len(names)


@pytest.fixture(scope="module")
def busy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    """A balancer whose `HOSTS` static hosts have each answered a request."""
    names = [f"h{i}.test" for i in range(HOSTS)]
    bal = Balancer(tmp_path_factory.mktemp("scrape"),
                   {name: {"action": "static", "body": "x"} for name in names})
    bal.wait_version(1, timeout=30)
    parts = iter(range(CLIENTS))
    for done in in_threads(CLIENTS, lambda: touch(bal.port, names[next(parts)::CLIENTS])):
        done.result(timeout=120)
    yield bal
    bal.stop()


def test_a_scrape_of_thousands_of_hosts_leaves_the_management_api_answering(
        busy: Balancer) -> None:
    scraped: dict[str, Any] = {}

    def scrape() -> None:
        scraped["answer"] = get(busy.mport, "/metrics")

    scraper = threading.Thread(target=scrape)
    waits = []
    began = time.monotonic()
    scraper.start()
    while scraper.is_alive() and len(waits) < 10_000:
        start = time.monotonic()
        assert get(busy.mport, "/healthz", timeout=30)[0] == 200
        waits.append(time.monotonic() - start)
    scraper.join(timeout=60)
    took = time.monotonic() - began
    status, body = scraped["answer"]
    assert status == 200
    series = samples(body.decode())
    counted = {dict(labels)["host"] for name, labels in series
               if name == "balancer_requests_total"}
    assert len(counted) == HOSTS
    # answered all along: never held for most of the scrape (before: for all of its
    # text, 3.5 s of a 4 s scrape on a quiet machine); a share, not seconds, as a
    # machine busy with other work slows both alike
    assert max(waits) < 0.4 * took, (max(waits), took, len(waits))



def scrape_streamed(port: int) -> tuple[str | None, bytes]:
    """One scrape: (its Transfer-Encoding, or its Content-Length; its body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    response = conn.getresponse()
    assert response.status == 200
    body = response.read()
    conn.close()
    return response.getheader("Transfer-Encoding") or response.getheader("Content-Length"), body


def test_two_scrapes_at_once_each_stream_the_whole_text(busy: Balancer) -> None:
    """The body is sent as it is written, never joined (before: a Content-Length
    and the whole text, 3 copies of it alive at the end of each scrape)."""
    bodies = []
    for done in in_threads(2, lambda: scrape_streamed(busy.mport)):
        coding, body = done.result(timeout=120)
        assert coding == "chunked"
        assert body.endswith(b"\n") and b"# TYPE balancer_acme_next_attempt_seconds" in body
        bodies.append(body)
    for body in dict.fromkeys(bodies):  # each text read once (~2 CPU-s; both are the same)
        series = samples(body.decode())
        counted = {dict(labels)["host"] for name, labels in series
                   if name == "balancer_requests_total"}
        assert len(counted) == HOSTS


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_scrape_whose_client_goes_is_not_written_on(busy: Balancer) -> None:
    """A scraper that hangs up after the head (Prometheus at its timeout) costs
    its snapshot, not the text: the scrape ends at the next slice's write."""
    workers = {p["pid"] for p in busy.api("GET", "/api/v1/info")[1]["processes"]}
    (management,) = set(children_of(busy.proc.pid)) - workers
    whole = len(scrape_streamed(busy.mport)[1])  # (the first imports prometheus-client)
    start = cpu_seconds(management)
    assert len(scrape_streamed(busy.mport)[1]) == whole
    after = cpu_seconds(management)
    full = after - start
    for _ in range(ABORTED):
        with socket.create_connection(("127.0.0.1", busy.mport), timeout=60) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            head = sock.recv(100)
            assert head.startswith(b"HTTP/1.1 200 "), head
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert get(busy.mport, "/healthz")[0] == 200
    assert len(scrape_streamed(busy.mport)[1]) == whole  # (the aborted ones ended by now)
    aborted = cpu_seconds(management) - after - full
    # a snapshot and a slice or two each, ~0.45 of a scrape (before: a whole text each)
    assert aborted < 0.75 * ABORTED * full, (aborted, full)



def test_head_of_the_streamed_body_has_no_last_chunk(busy: Balancer) -> None:
    """HEAD /metrics then a request on the same connection: the second answer
    follows the first's head at once (bug: a last chunk, "0" CRLF CRLF, came
    in between, a body HEAD must not have)."""
    with socket.create_connection(("127.0.0.1", busy.mport), timeout=60) as sock:
        sock.sendall(b"HEAD /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                     b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        got, deadline = b"", time.monotonic() + 60
        while not got.endswith(b'{"status":"ok"}\n') and time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    head, rest = got.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in head
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b'{"status":"ok"}\n'), rest

# the text, against prometheus-client's ------------------------------------------------------
SNAPSHOT_HOSTS = {
    'a"b\\\nc': {"codes": {"200": 5, "404": 12345678, "500": 2.5},
                 "duration": {"counts": [1, *[3] * (len(BUCKETS) - 1), 4], "sum": 1.5},
                 "bytes_received": 10**7, "bytes_sent": -3, "open_requests": True,
                 "spinning": 999_999, "limited": 1_000_000,
                 "backends": {"1.2.3.4:5": {"outcomes": {"ok": 5, 'x"y': 1}, "state": "up"},
                              "https://b": {"state": "down"}}},
    "z": {"duration": {"counts": [0, 1, *[2] * len(BUCKETS)], "sum": 0.25}},
    "y": {"duration": {"counts": []}},  # none, and one of other bounds (not written):
    "n": {"duration": {"counts": [1, 2], "sum": 1}},
    **{f"h{i}": {"codes": {"200": i}, "bytes_sent": i * 1.5} for i in range(2 * HOSTS_PER_PAUSE)},
}


class Families(Collector):
    """The per-host families of `SNAPSHOT_HOSTS` as prometheus-client's objects."""

    def collect(self) -> Iterator[Any]:
        rows = sorted(SNAPSHOT_HOSTS.items())
        requests = CounterMetricFamily("balancer_requests_total", "Completed requests.",
                                       labels=["host", "code"])
        duration = HistogramMetricFamily("balancer_request_duration_seconds",
                                         "Time from request head to last response byte.",
                                         labels=["host"])
        for host, h in rows:
            for code, n in sorted(h.get("codes", {}).items()):
                requests.add_metric([host, code], n)
            counts = h.get("duration", {}).get("counts", [])
            if len(counts) == len(BUCKETS) + 1:
                duration.add_metric([host], list(zip([*map(str, BUCKETS), "+Inf"], counts,
                                                     strict=True)), h["duration"]["sum"])
        yield from (requests, duration)
        for name, kind, doc, field in (
                ("balancer_bytes_received", CounterMetricFamily, "Bytes received from clients.",
                 "bytes_received"),
                ("balancer_bytes_sent", CounterMetricFamily, "Bytes sent to clients.",
                 "bytes_sent"),
                ("balancer_open_requests", GaugeMetricFamily, "Requests in progress.",
                 "open_requests"),
                ("balancer_spinning_requests", GaugeMetricFamily,
                 "Requests held by a spin rule or spin_when_down.", "spinning"),
                ("balancer_limited_requests", CounterMetricFamily,
                 "Requests refused 429 by the rule's limits.", "limited")):
            family = kind(name, doc, labels=["host"])
            for host, h in rows:
                family.add_metric([host], h.get(field, 0))
            yield family
        outcomes = CounterMetricFamily("balancer_backend_requests",
                                       "Requests sent to a backend, by outcome.",
                                       labels=["host", "backend", "outcome"])
        up = GaugeMetricFamily("balancer_backend_up", "1 when the backend is considered up.",
                               labels=["host", "backend"])
        for host, h in rows:
            for backend, b in sorted(h.get("backends", {}).items()):
                for outcome, n in sorted(b.get("outcomes", {}).items()):
                    outcomes.add_metric([host, backend, outcome], n)
                up.add_metric([host, backend], 1 if b["state"] == "up" else 0)
        yield from (outcomes, up)


def test_the_text_is_prometheus_clients_and_pauses_every_slice() -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Families())
    pauses = []
    text = b"".join(per_host_text(SNAPSHOT_HOSTS, lambda: pauses.append(1)))
    assert text == generate_latest(registry)
    assert len(pauses) == 9 * (len(SNAPSHOT_HOSTS) // HOSTS_PER_PAUSE)  # 9 families


def test_with_no_active_host_every_family_has_its_help_and_type() -> None:
    text = b"".join(per_host_text({}, lambda: None)).decode()
    assert text.count("# HELP ") == text.count("# TYPE ") == 9
