"""The management process answering while it takes a big snapshot (SPEC §7, §11).

Found (scripts/bench_scrape.py, 20,000 hosts with traffic): a worker's answer
(15 MB of JSON) was decoded in one call (0.3-0.5 s), several workers' answers
and a silent worker's held counters merged in one go (1-3.5 s), the history's
sample summed every host in one go, every scrape and every sample made its
own snapshot, and a slow scraper held its snapshot for as long as it read
(up to the 256 connections). Slicing is checked by the order of events, not
by wall time: a greenlet of the test process runs between two slices of a
real survey of real workers.
"""

from __future__ import annotations

import gc
import http.client
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest

from balancer.stats import BUCKETS, MERGE_SLICE, merge_snapshots
from balancer.stores import open_store
from management.cluster import ClusterRuntime
from management.history import MAX_HOSTS, POINTS_PER_PAUSE, SAMPLED_PER_PAUSE, TOTAL, History
from management.metrics_text import HOSTS_PER_PAUSE, SORTED_PER_PAUSE, Rows
from tests.support import Balancer, control_socket, in_threads, samples, wait_for
from tests.test_probe_scrape import touch

HOSTS = 4000  # a scrape's body ~6 MB: more than a socket's send buffer grows to (4 MiB)
CLIENTS = 8  # connections the requests go on: spread over both workers


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Balancer]:
    """A balancer with 2 workers whose `HOSTS` static hosts each answered a request."""
    names = [f"s{i}.test" for i in range(HOSTS)]
    bal = Balancer(tmp_path_factory.mktemp("slices"),
                   {name: {"action": "static", "body": "x"} for name in names},
                   args=["--workers", "2"])
    bal.wait_version(1, timeout=30)
    parts = iter(range(CLIENTS))
    for done in in_threads(CLIENTS, lambda: touch(bal.port, names[next(parts)::CLIENTS])):
        done.result(timeout=120)
    yield bal
    bal.stop()


def runtime_of(bal: Balancer) -> ClusterRuntime:
    """A `ClusterRuntime` of this test process over `bal`'s workers (as its
    management process has), pausing with a turn of this process's loop."""
    pids = wait_for(lambda: [p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]]
                    if len(bal.api("GET", "/api/v1/info")[1]["processes"]) == 2 else None,
                    30, what="both workers")
    directory = os.path.dirname(control_socket(pids[0]))
    return ClusterRuntime(directory, open_store(f"file:{bal.routes}"), 2)


def surveyed(runtime: ClusterRuntime, callers: int = 1) -> tuple[list[str], list[Any]]:
    """Events while `callers` greenlets take the active hosts' snapshot at once,
    a probe greenlet noting each turn it gets; and their snapshots."""
    events: list[str] = []
    done = gevent.event.Event()

    def probe() -> None:
        while not done.is_set():
            events.append("probe")
            gevent.sleep(0)

    def survey() -> Any:
        events.append("start")
        merged = runtime.active()
        events.append("end")
        return merged

    prober = gevent.spawn(probe)
    jobs = [gevent.spawn(survey) for _ in range(callers)]
    gevent.joinall(jobs, timeout=60, raise_error=True)
    done.set()
    prober.join(timeout=5)
    return events, [job.value for job in jobs]


def test_a_survey_decodes_and_merges_the_workers_answers_in_slices(
        two_workers: Balancer) -> None:
    """Between two slices (100 hosts decoded, 200 merged) the loop goes round: the
    probe runs during the survey (before: never, decoded and merged in one go)."""
    events, (merged,) = surveyed(runtime_of(two_workers))
    hosts = merged["hosts"]
    assert len(hosts) == HOSTS
    assert all(h["completed_requests"] == 1 for h in hosts.values())
    during = events[events.index("start"):events.index("end")].count("probe")
    assert during >= HOSTS // 100 - 2, events  # each answer's lines but its first


def test_surveys_at_once_share_one_snapshot(two_workers: Balancer) -> None:
    """Scrapes and the history's sample at the same time decode and merge once:
    each gets the snapshot of the survey under way (before: one survey each)."""
    events, snapshots = surveyed(runtime_of(two_workers), callers=3)
    assert snapshots[0] is snapshots[1] is snapshots[2]
    assert len(snapshots[0]["hosts"]) == HOSTS
    later = surveyed(runtime_of(two_workers))[1][0]
    assert later is not snapshots[0]  # shared only while under way, never kept


def test_a_snapshot_is_few_objects_for_the_garbage_collector(two_workers: Balancer) -> None:
    """A survey's snapshot is at most 3 objects a host that the garbage collector
    walks (the host's dict, its histogram's and that one's counts; counters and
    dicts of numbers only are not tracked). Bug: 17, each count in a list with
    its bound: a full collection with 4 snapshots of 20,000 hosts held took 0.9 s."""
    def tracked(value: Any) -> int:
        inner = value.values() if isinstance(value, dict) else \
            value if isinstance(value, list) else ()
        return int(gc.is_tracked(value)) + sum(map(tracked, inner))
    (merged,) = surveyed(runtime_of(two_workers))[1]
    assert len(merged["hosts"]) == HOSTS
    assert tracked(merged["hosts"]) <= 1 + 3 * HOSTS
    assert merged["bounds"] == list(BUCKETS)  # once a snapshot


def test_a_scrapes_rows_are_sorted_in_slices() -> None:
    """`Rows` sorts `SORTED_PER_PAUSE` keys between two pauses and merges them as
    they are taken: the order of one sort (bug: one sort, 57 ms at 50,000 hosts)."""
    hosts = {f"h{(n * 7919) % 10_007}": {} for n in range(5 * SORTED_PER_PAUSE + 3)}
    pauses: list[int] = []
    rows = Rows(hosts, None, lambda: pauses.append(1))
    assert len(pauses) == 5
    taken = [row for start in range(0, rows.count, HOSTS_PER_PAUSE) for row in rows.taken(start)]
    assert [key for key, _ in taken] == sorted(hosts)
    assert rows.taken(0) == taken[:HOSTS_PER_PAUSE]  # the next family reads them again


def test_a_merge_in_slices_sums_as_in_one_go() -> None:
    """`merge_snapshots` with a pause: the same sums, `MERGE_SLICE` hosts between
    two pauses, what is merged in so far at each."""
    def snapshot(n: int, offset: int) -> dict[str, Any]:
        return {"open_connections": n, "routing_version": n, "hosts": {
            f"h{i + offset}": {"completed_requests": i, "duration": {"counts": [i, i]},
                               "backends": {"b": {"state": "down" if n else "up"}}}
            for i in range(5 * MERGE_SLICE)}}

    whole = merge_snapshots([snapshot(1, 0), snapshot(2, 7)])
    seen: list[int] = []
    into = snapshot(1, 0)
    sliced = merge_snapshots([into, snapshot(2, 7)], True, lambda: seen.append(len(into["hosts"])))
    assert sliced == whole
    assert len(seen) == 4 and seen == sorted(seen) and seen[0] < len(sliced["hosts"])


def test_a_history_sample_reads_its_hosts_in_slices_and_changes_nothing_before(
        tmp_path: Path) -> None:
    """Before: 20,000 hosts read and summed in one go (0.12 s) every 5 s."""
    seen: list[tuple[int, int]] = []
    history = History(None, lambda: seen.append((history.samples, len(history.rings))))
    hosts = {f"h{i}": {"completed_requests": i, "responses": {"5xx": 0},
                       "duration": {"counts": [i, i]}}
             for i in range(3 * SAMPLED_PER_PAUSE)}
    history.sample({"hosts": hosts}, 1000.0)
    assert len(seen) == 3 * 2 + (MAX_HOSTS + 1) // POINTS_PER_PAUSE  # reading, summing,
    # ranking (bug: in one sort), then the points of those kept (bug: in one go)
    assert set(seen) == {(0, 0)}  # nothing recorded during the pauses
    assert history.samples == 1 and len(history.rings) == MAX_HOSTS + 1
    assert set(history.rings) == {TOTAL, *(f"h{i}" for i in range(len(hosts) - MAX_HOSTS,
                                                                   len(hosts)))}  # the busiest


# slow and vanishing scrapers (through the real management process) -------------------
def scrape_head(port: int) -> socket.socket:
    """A scraper that sends its request and reads the head, then reads nothing
    (its window kept small, so the body waits in the management process)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(60)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    got = b""
    while b"\r\n\r\n" not in got:
        chunk = sock.recv(1024)
        assert chunk, got
        got += chunk
    assert got.startswith(b"HTTP/1.1 200 ") and b"chunked" in got, got
    return sock


def read_all(sock: socket.socket) -> bytes:
    got = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        got.append(chunk)
    sock.close()
    return b"".join(got)


def test_slow_scrapers_hold_at_most_four_snapshots_the_oldest_cut(
        two_workers: Balancer) -> None:
    """Five scrapers that stop reading after the head, each with its own snapshot:
    the fifth cuts the first's body (its snapshot freed), whose client sees the
    body end without its last chunk: a broken answer, never a shorter valid one.
    Scrapers that hung up mid-body hold nothing (else they would count)."""
    for _ in range(3):  # hung up mid-body: their bodies end at the next write
        sock = scrape_head(two_workers.mport)
        sock.close()
    slow = []
    for _ in range(5):
        slow.append(scrape_head(two_workers.mport))
    bodies: list[bytes] = [b""] * 5
    readers = [threading.Thread(target=lambda n=n: bodies.__setitem__(n, read_all(slow[n])))
               for n in range(5)]
    for reader in readers:
        reader.start()
    for reader in readers:
        reader.join(timeout=90)
    whole = [body.endswith(b"\r\n0\r\n\r\n") for body in bodies]
    assert whole == [False, True, True, True, True], [len(b) for b in bodies]
    assert len(bodies[0]) < len(bodies[1])
    assert b"# TYPE balancer_backend_up gauge" in bodies[4]
    wait_for(lambda: "1 scrape(s) still being sent after" in two_workers.output(), 10,
             what="the cut's log line")


def test_an_answer_in_lines_cut_short_or_damaged_is_refused() -> None:
    """A worker's answer in lines decodes to what the one-object answer does; one
    cut at a line's end (it looks whole line by line), with a line too many, or
    with a line that is no object, is no usable answer (the worker is then taken
    for silent, its held counters counted), never fewer hosts."""
    from balancer.control import decoded, encode

    def reply() -> dict[str, Any]:
        return {"pid": 7, "stats": {"open_connections": 1, "hosts": {
            f"h{i}": {"completed_requests": i} for i in range(250)}}}
    whole = encode(reply(), lambda: None)
    lines = encode({**reply(), "lines": 0}, lambda: None)
    assert lines.count(b"\n") == 4  # the reply, then 3 lines of up to 100 hosts
    assert decoded(lines, "")[0] == decoded(whole, "")[0] == reply()
    cut = lines[:lines.rindex(b"\n", 0, -1) + 1]
    for damaged in (cut, lines + b'{"h9": {}}\n', lines.replace(b'{"h200"', b'[{"h200"', 1),
                    lines[:-1]):
        assert decoded(damaged, "")[0] is None, damaged[-60:]


def test_scrapes_while_workers_are_killed_and_replaced_count_every_request(
        two_workers: Balancer) -> None:
    """Scrapes at once, back to back, while each worker in turn is killed
    (`SIGKILL`) and replaced: every body is whole, and counts each host's one
    request once (histograms as counts: a killed worker's from its last
    answer, then retired). Last in the module: its workers are new after it."""
    bal = two_workers
    stop = threading.Event()
    bodies: list[str] = []

    failed: list[Exception] = []

    def scraper() -> None:
        while not stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", bal.mport, timeout=60)
            try:
                conn.request("GET", "/metrics")
                bodies.append(conn.getresponse().read().decode())  # (IncompleteRead: cut)
            except Exception as exc:  # noqa: BLE001 - each counts against the test
                failed.append(exc)
                return
            finally:
                conn.close()
    pids = [p["pid"] for p in bal.api("GET", "/api/v1/info")[1]["processes"]]
    threads = [threading.Thread(target=scraper) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for pid in pids:
            wait_for(lambda: len(bodies) >= 2, 60, what="scrapes before the kill")
            bodies_before = len(bodies)
            os.kill(pid, 9)
            wait_for(lambda p=pid: p not in [w["pid"] for w in bal.api(
                "GET", "/api/v1/info")[1]["processes"]] and len(bal.api(
                    "GET", "/api/v1/info")[1]["processes"]) == 2, 60, what="its replacement")
            wait_for(lambda n=bodies_before: len(bodies) >= n + 3, 120, what="scrapes after")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=120)
    assert failed == [] and len(bodies) >= 2 * 5
    series = samples(bodies[0])  # one read whole by prometheus_client: the fast read agrees
    counts = [v for (name, _), v in series.items()
              if name == "balancer_request_duration_seconds_count"]
    infs = [v for (name, labels), v in series.items()
            if name == "balancer_request_duration_seconds_bucket" and ("le", "+Inf") in labels]
    assert duration_counts(bodies[0]) == (len(counts), sum(counts), sum(infs))
    families = FAMILY.findall(bodies[0])
    for body in dict.fromkeys(bodies):  # each text once (~0.4 CPU-s; most are the same)
        assert duration_counts(body) == (HOSTS, HOSTS, HOSTS)
        assert body.endswith("\n") and FAMILY.findall(body) == families  # none cut off
        bad = MALFORMED.search(body)  # every line whole, as prometheus_client reads them
        assert bad is None, bad.group()[:200]


FAMILY = re.compile(r"^# TYPE .*$", re.M)
COUNT = re.compile(r"^balancer_request_duration_seconds_count\{.*\} (\S+)$", re.M)
INF = re.compile(r'^balancer_request_duration_seconds_bucket\{.*le="\+Inf".*\} (\S+)$', re.M)
# a line neither a comment nor `name{label="value",...} value` (a slice cut, or two
# spliced, mid-line): ~0.1 CPU-s a body, where prometheus_client's parser takes ~2
MALFORMED = re.compile(r'^(?!#|[a-zA-Z_:][\w:]*(?:\{(?:[a-zA-Z_]\w*="(?:[^"\\\n]|\\.)*",?)*\})? '
                       r'[-+]?(?:[0-9.]+(?:[eE][-+]?[0-9]+)?|Inf|NaN)(?: -?[0-9]+)?$).+$', re.M)


def duration_counts(body: str) -> tuple[int, float, float]:
    """(series, their sum, the +Inf buckets' sum) of the request duration histogram
    of a `/metrics` body, read by line (prometheus_client's parser took ~2 CPU-s
    a body of `HOSTS` hosts, ~10 bodies a run)."""
    counts = [float(v) for v in COUNT.findall(body)]
    return len(counts), sum(counts), sum(float(v) for v in INF.findall(body))
