"""The per-host and per-backend families of ``/metrics``, written as text a slice at a time.

Bug: these families went through prometheus-client's objects and
`generate_latest`, about 20 µs a sample and in one go: with 20,000 hosts that
had seen a request a scrape was 41 MB of text built in 25-35 s, and the
management process answered nothing meanwhile (``/healthz``, the API, the
dashboard, a deploy's claim unrenewed), while Prometheus gave up on the scrape
at its 10 s timeout.

Invariants:
* The text is byte for byte what `generate_latest` writes for the same
  families: ``# HELP`` and ``# TYPE`` once per family, labels in name order,
  label values escaped (``\\``, ``"``, newline), values as `floatToGoString`
  writes them (tests/test_probe_scrape.py compares the two).
* `pause` (`balancer.turns.turn`: one round of the management process's loop)
  is called every `HOSTS_PER_PAUSE` hosts, so other requests are answered
  during a big scrape.
* The text is yielded a slice at a time (encoded: 30 KB on average, at most
  ~0.2 MB) and never joined: the response streams it, so a scrape holds a
  slice, not the whole text (bug: the slices' list, their join, its join with
  the other families' text and the server's copy with the head: up to four
  copies of 30 MB at the end of a scrape of 20,000 hosts).
* A scrape's body holds its snapshot's hosts (`Rows`) until it is sent, so
  a slow scraper holds them as long as it reads: at most
  `management.metrics.MOST_HELD` snapshots are held by bodies being sent,
  a newer scrape cutting the oldest's bodies (`Rows.cut`: their rows are
  dropped at once, and their clients see a broken answer, never a shorter
  valid-looking one). Bug: up to 256 slow scrapers (the connection cap) each
  held a snapshot (~60 MB for 20,000 hosts).
* The balancer's few other families are prometheus-client's metric families
  (`management.metrics.SnapshotCollector`), written by `families_text` as
  its `generate_latest` writes them (counters and gauges, no timestamps, no
  `_created` samples; tests/test_metrics.py compares the two): that function's
  module imports prometheus-client's HTTP servers (1.3 MiB).
"""

from __future__ import annotations

import errno
import heapq
import itertools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from balancer.stats import BUCKETS

HOSTS_PER_PAUSE = 200
SORTED_PER_PAUSE = 2000  # host keys sorted between two calls of `Rows`' pause
Host = tuple[str, dict[str, Any]]  # the host's label value (escaped) and its stats

PER_HOST = (  # name, type, help, the stats field (the counters by code and the histogram aside)
    ("balancer_bytes_received_total", "counter", "Bytes received from clients.",
     "bytes_received"),
    ("balancer_bytes_sent_total", "counter", "Bytes sent to clients.", "bytes_sent"),
    ("balancer_open_requests", "gauge", "Requests in progress.", "open_requests"),
    ("balancer_spinning_requests", "gauge", "Requests held by a spin rule or spin_when_down.",
     "spinning"),
    ("balancer_limited_requests_total", "counter",
     "Requests refused 429 by the rule's limits.", "limited"),
)
REQUESTS = ("balancer_requests_total", "counter", "Completed requests.")
DURATION = ("balancer_request_duration_seconds", "histogram",
            "Time from request head to last response byte.")
BACKEND_REQUESTS = ("balancer_backend_requests_total", "counter",
                    "Requests sent to a backend, by outcome.")
BACKEND_UP = ("balancer_backend_up", "gauge", "1 when the backend is considered up.")


class Cut(ConnectionResetError):
    """A scrape's body cut short (`Rows.cut`): its client sees the body end
    without its last chunk, a broken answer; gevent closes the connection
    without a traceback, as for a client that hung up."""


class Rows:
    """A scrape's hosts as its body's writing reads them (label value escaped,
    sorted) and the snapshot they came from, `source`; `cut` drops both (the
    writing then raises `Cut` at its next slice).

    The keys are sorted `SORTED_PER_PAUSE` at a time, calling `pause` in
    between, and merged as the body's first family takes them (`taken`). Bug:
    sorted in one go at the scrape's start (57 ms at 50,000 hosts), with no
    other request answered meanwhile."""

    __slots__ = ("rows", "source", "hosts", "merging", "count", "le")

    def __init__(self, hosts: dict[str, Any], source: Any = None,
                 pause: Callable[[], None] | None = None) -> None:
        keys = list(hosts)
        runs = []
        for start in range(0, len(keys), SORTED_PER_PAUSE):
            if start and pause is not None:
                pause()
            runs.append(sorted(keys[start:start + SORTED_PER_PAUSE]))
        self.rows: list[Host] | None = []
        self.hosts: dict[str, Any] | None = hosts
        self.merging: Iterator[str] | None = heapq.merge(*runs)
        self.count = len(keys)
        self.source = source
        bounds = (source or {}).get("bounds", BUCKETS)
        self.le = [*(f'",le="{floatToGoString(b)}"}} ' for b in bounds), '",le="+Inf"} ']

    def taken(self, start: int) -> list[Host]:
        """The slice of rows from `start` (`HOSTS_PER_PAUSE`); `Cut` once cut."""
        rows, hosts = self.rows, self.hosts
        if rows is None or hosts is None:
            raise Cut(errno.ECONNRESET, "the scrape was cut to bound what scrapes hold")
        end = start + HOSTS_PER_PAUSE
        if len(rows) < end and self.merging is not None:
            rows.extend((escape(key), hosts[key])
                        for key in itertools.islice(self.merging, end - len(rows)))
        return rows[start:end]

    def cut(self) -> None:
        self.rows = self.source = self.hosts = self.merging = None


def per_host_text(hosts: dict[str, Any] | Rows, pause: Callable[[], None]) -> Iterator[bytes]:
    """The per-host then per-backend families of `hosts` (a stats snapshot's, or
    its `Rows`), a slice at a time, encoded (~60 B a line, not a str of ~110). No
    row is held across a pause, so a cut (`Rows.cut`) frees them at once."""
    rows = hosts if isinstance(hosts, Rows) else Rows(hosts)
    count = rows.count
    families: list[tuple[tuple[str, str, str], Callable[[list[str], Host], None]]] = [
        (REQUESTS, _codes), (DURATION, _durations(rows.le)),
        *(((name, kind, doc), _field(name, field)) for name, kind, doc, field in PER_HOST),
        (BACKEND_REQUESTS, _outcomes), (BACKEND_UP, _up)]
    for (name, kind, doc), write in families:
        out = [f"# HELP {name} {doc}\n# TYPE {name} {kind}\n"]
        for start in range(0, count, HOSTS_PER_PAUSE):
            for row in rows.taken(start):
                write(out, row)
            if start + HOSTS_PER_PAUSE <= count:
                yield "".join(out).encode()
                out = []
                pause()
        yield "".join(out).encode()


def families_text(families: Iterable[Metric]) -> bytes:
    """`families` (counters and gauges, their help text needing no escape) as
    the text format, each one's ``# HELP`` and ``# TYPE`` lines then its samples
    with their labels in name order: what `generate_latest` writes for them."""
    out = []
    for family in families:
        name = f"{family.name}_total" if family.type == "counter" else family.name
        out.append(f"# HELP {name} {family.documentation}\n# TYPE {name} {family.type}\n")
        for sample in family.samples:
            labels = ",".join(f'{key}="{escape(label)}"'
                              for key, label in sorted(sample.labels.items()))
            out.append(f"{sample.name}{{{labels}}} {value(sample.value)}\n" if labels
                       else f"{sample.name} {value(sample.value)}\n")
    return "".join(out).encode()


def _codes(out: list[str], row: Host) -> None:
    host, h = row
    for code, n in sorted(h.get("codes", {}).items()):
        out.append(f'balancer_requests_total{{code="{escape(str(code))}",host="{host}"}} '
                   f'{value(n)}\n')


def _durations(le: list[str]) -> Callable[[list[str], Host], None]:
    """The histogram's writer, `le` the end of each bucket's labels (`Rows.le`:
    the snapshot's bounds, then +Inf), one for each of a host's counts."""
    name = DURATION[0]

    def write(out: list[str], row: Host) -> None:
        host, h = row
        hist = h.get("duration", {})
        counts = hist.get("counts")
        if not counts or len(counts) != len(le):
            return
        for end, count in zip(le, counts, strict=True):
            out.append(f'{name}_bucket{{host="{host}{end}{value(count)}\n')
        out.append(f'{name}_count{{host="{host}"}} {value(counts[-1])}\n'
                   f'{name}_sum{{host="{host}"}} {value(hist.get("sum", 0.0))}\n')
    return write


def _field(name: str, field: str) -> Callable[[list[str], Host], None]:
    def write(out: list[str], row: Host) -> None:
        out.append(f'{name}{{host="{row[0]}"}} {value(row[1].get(field, 0))}\n')
    return write


def _outcomes(out: list[str], row: Host) -> None:
    host, h = row
    for backend, b in sorted(h.get("backends", {}).items()):
        label = escape(backend)
        for outcome, n in sorted(b.get("outcomes", {}).items()):
            out.append(f'balancer_backend_requests_total{{backend="{label}",host="{host}",'
                       f'outcome="{escape(outcome)}"}} {value(n)}\n')


def _up(out: list[str], row: Host) -> None:
    host, h = row
    for backend, b in sorted(h.get("backends", {}).items()):
        up = "1.0" if b.get("state") == "up" else "0.0"
        out.append(f'balancer_backend_up{{backend="{escape(backend)}",host="{host}"}} {up}\n')


def value(number: Any) -> str:
    """`floatToGoString(number)`, quicker for the usual small whole numbers."""
    if type(number) is int and -1_000_000 < number < 1_000_000:
        return f"{number}.0"
    return floatToGoString(number)


def escape(text: str) -> str:
    """A label value as the text format has it (backslash, double quote, newline escaped)."""
    if "\\" in text or '"' in text or "\n" in text:
        return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return text
