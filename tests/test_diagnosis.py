"""What is piling up (SPEC §11): heavy hitters, requests in flight, latency, limits.

Real balancers with 2 workers; clients are told apart by the X-Forwarded-For
their front proxy sends on the internal listener. Load is bounded and short.
"""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from balancer.limits import SharedBuckets, default_burst
from balancer.rules import validate_rule
from balancer.sketch import CAPACITY, SpaceSaving, path_key
from management.latency import percentiles, quantile
from tests.support import Backend, Balancer, constants_prefix, metric, request, wait_for


class Pipeline:
    """One client connection that sends requests back to back while a thread
    reads the responses (Content-Length framed) as they come."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.statuses: list[int] = []
        self.reader = threading.Thread(target=self.read_loop)
        self.reader.start()

    def read_loop(self) -> None:
        received = bytearray()
        while True:
            try:
                chunk = self.sock.recv(1 << 16)
            except OSError:
                return
            if not chunk:
                return
            received.extend(chunk)
            while (end := received.find(b"\r\n\r\n")) >= 0:
                head = bytes(received[:end]).decode("latin-1")
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                if len(received) < end + 4 + length:
                    break
                self.statuses.append(int(head.split()[1]))
                del received[:end + 4 + length]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def finish(self, expected: int, timeout: float = 60.0) -> list[int]:
        """Wait for `expected` responses (bounded), close, return the statuses."""
        deadline = time.monotonic() + timeout
        while len(self.statuses) < expected and time.monotonic() < deadline \
                and self.reader.is_alive():
            time.sleep(0.01)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader
        self.reader.join(5)
        self.sock.close()
        return self.statuses


def pipelined(port: int, requests: list[bytes], timeout: float = 60.0) -> list[int]:
    """Send `requests` on one connection (pipelined), return the statuses in order."""
    conn = Pipeline(port)
    for start in range(0, len(requests), 200):
        conn.send(b"".join(requests[start:start + 200]))
    return conn.finish(len(requests), timeout)


def from_client(address: str, host: str = "app.test", path: str = "/") -> bytes:
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\n"
            f"X-Forwarded-For: {address}\r\n\r\n").encode()


def top(bal: Balancer, by: str, group: str, window: int = 60) -> dict:
    status, body = bal.api("GET", f"/api/v1/top?by={by}&group={group}&window={window}")
    assert status == 200, body
    return body


def start_empty(where: Path) -> Balancer:
    return Balancer(where, {"app.test": {"action": "empty", "status": 204}},
                    args=["--workers", "2"], internal=True)


@pytest.fixture(scope="module")
def shared_empty(tmp_path_factory: pytest.TempPathFactory):
    """One balancer for the tests that only read it or count one window's requests
    (the abusive client; the refused queries change nothing)."""
    bal = start_empty(tmp_path_factory.mktemp("empty"))
    yield bal
    bal.stop()


@pytest.fixture
def empty_balancer(tmp_path: Path):
    bal = start_empty(tmp_path)
    yield bal
    bal.stop()


def ctl(bal: Balancer, *argv: str) -> str:
    """`balancerctl` against `bal`: its output (it must succeed)."""
    import io
    from contextlib import redirect_stdout

    from management.ctl import main

    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["--url", f"http://127.0.0.1:{bal.mport}", *argv]) == 0
    return out.getvalue()


def fails(bal: Balancer, *argv: str) -> str:
    """`balancerctl` against `bal`, refused by the API (exit 1): its stderr."""
    import io
    from contextlib import redirect_stderr

    from management.ctl import main

    err = io.StringIO()
    with redirect_stderr(err):
        assert main(["--url", f"http://127.0.0.1:{bal.mport}", *argv]) == 1
    return err.getvalue()


def test_an_abusive_client_is_the_top_client_within_one_window(shared_empty) -> None:
    bal = shared_empty
    normal = [from_client(f"10.0.{i // 250}.{i % 250}") for i in range(200) for _ in range(3)]
    abusive = [from_client("203.0.113.9")] * 150
    # interleaved over several connections, so both workers see both kinds
    batches = [normal[i::4] + abusive[i::4] for i in range(4)]
    threads = [threading.Thread(target=pipelined, args=(bal.ports["internal"], b))
               for b in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    body = wait_for(lambda: (b := top(bal, "requests", "client"))["top"]
                    and b["top"][0]["count"] >= 150 and b, what="the abuser's 150 requests")
    first, second = body["top"][0], body["top"][1]
    assert first["key"] == "203.0.113.9"
    assert first["count"] - first["error"] <= 150 <= first["count"]
    assert second["count"] <= 3 + second["error"]
    assert body["workers"] == 2
    hosts = top(bal, "requests", "host")["top"]
    assert hosts[0] == {"key": "app.test", "count": 750, "error": 0}
    lines = ctl(bal, "top", "--by", "requests", "--group", "client").splitlines()
    assert lines[0].split()[:3] == ["#", "CLIENT", "REQUESTS"]
    assert lines[1].split()[1] == "203.0.113.9"


def test_a_connection_dropped_from_the_sketch_is_counted_again(tmp_path: Path) -> None:
    """A keep-alive connection's next request with the same client and target
    is counted into the entries its last one took (`balancer.sketch.Tally`):
    once other clients and paths pushed those out of the sketches, its
    requests are counted under their keys again, not into the dropped entries."""
    bal = Balancer(tmp_path, {"app.test": {"action": "empty", "status": 204}},
                   args=["--workers", "1"], internal=True)
    try:
        port = bal.ports["internal"]
        kept = Pipeline(port)
        kept.send(from_client("203.0.113.7", path="/kept"))
        wait_for(lambda: kept.statuses, what="the kept connection's first answer")
        # 3 x CAPACITY other clients and paths, once each: every key counted once is replaced
        others = [from_client(f"10.0.{n // 250}.{n % 250}", path=f"/p{n}")
                  for n in range(3 * CAPACITY)]
        assert pipelined(port, others) == [204] * len(others)
        kept.send(from_client("203.0.113.7", path="/kept") * 40)
        assert kept.finish(41) == [204] * 41
        for group, key in (("client", "203.0.113.7"), ("path", "app.test/kept")):
            found = {e["key"]: e for e in top(bal, "requests", group)["top"]}
            assert found[key]["count"] - found[key]["error"] <= 41 <= found[key]["count"]
    finally:
        bal.stop()


def test_distinct_clients_keep_the_sketch_memory_flat(empty_balancer) -> None:
    bal = empty_balancer
    port = bal.ports["internal"]

    def send(first: int, count: int) -> None:
        addresses = [f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"
                     for n in range(first, first + count)]
        threads = [threading.Thread(target=pipelined,
                                    args=(port, [from_client(a) for a in addresses[i::2]]))
                   for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)

    # 150 times the sketches' capacity: sketches without a bound fail the growth check
    send(0, 2_000)
    after_first = top(bal, "requests", "client")["sketch"]
    send(2_000, 8_000)
    body = top(bal, "requests", "client")
    after_all = body["sketch"]
    total = sum(h["completed_requests"]
                for h in bal.api("GET", "/api/v1/stats")[1]["hosts"].values())
    assert total == 10_000
    # one interval's client sketches hold at most CAPACITY keys per worker, whatever came
    assert after_all["entries"] <= after_all["bound"]
    assert after_all["entries"] - after_first["entries"] <= 2 * 16 * CAPACITY  # a new interval
    assert len(body["top"]) == 10


def test_a_large_slow_download_shows_in_flight(tmp_path: Path) -> None:
    backend = Backend()
    bal = Balancer(tmp_path, {"app.test": {"action": "proxy", "backends": [backend.address]}},
                   args=["--workers", "2"])
    sock = socket.create_connection(("127.0.0.1", bal.port), timeout=10)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /big?n=1000000000 HTTP/1.1\r\nHost: app.test\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")  # then reads nothing more

        def slow() -> list:
            return bal.api("GET", "/api/v1/inflight?min_age=0.5")[1]["requests"]

        found = wait_for(slow, what="the download in /api/v1/inflight")
        (download,) = found
        assert download["host"] == "app.test" and download["method"] == "GET"
        assert download["path"] == "/big" and download["client"] == "127.0.0.1"
        assert download["backend"] == backend.address
        assert download["bytes_sent"] > 0 and download["age"] >= 0.5
        assert bal.api("GET", "/api/v1/inflight?min_age=3600")[1]["requests"] == []
        by_path = top(bal, "in_flight", "path")["top"]
        assert by_path == [{"key": "app.test/big", "count": 1, "error": 0}]
        listed = ctl(bal, "inflight", "--min-age", "0.5")
        assert "/big" in listed and backend.address in listed
    finally:
        sock.close()
        bal.stop()
        backend.stop()


def test_latency_percentiles_per_host_and_backend(tmp_path: Path) -> None:
    backend = Backend()
    bal = Balancer(tmp_path, {"app.test": {"action": "proxy", "backends": [backend.address]}})
    try:
        for _ in range(4):
            assert request(bal.port, path="/slow?s=0.3")[0] == 200
        stats = bal.host_stats("app.test")
        assert 0.25 <= stats["latency"]["p50"] <= 0.5
        assert stats["latency"]["p50"] <= stats["latency"]["p95"] <= stats["latency"]["p99"]
        backend_latency = stats["backends"][backend.address]["latency"]
        assert 0.25 <= backend_latency["p99"] <= 0.5
    finally:
        bal.stop()
        backend.stop()


def test_bad_queries_are_refused_with_every_problem(shared_empty) -> None:
    bal = shared_empty
    status, body = bal.api("GET", "/api/v1/top?by=cpu&group=planet&window=9999&limit=0")
    assert status == 400 and body["error"] == "bad_request"
    assert body["message"] == "the query is invalid (4 problems)"
    assert [d.split(":")[0] for d in body["details"]] == ["by", "group", "window", "limit"]
    for query, named in (("top?window=nan&limit=x", ["window", "limit"]),
                         ("inflight?min_age=-1", ["min_age"]),
                         ("history?since=0", ["since"]), ("stats?limit=0", ["limit"])):
        status, body = bal.api("GET", f"/api/v1/{query}")
        assert status == 400 and body["error"] == "bad_request", (query, body)
        assert body["message"].startswith("the query is invalid"), body
        assert [d.split(":")[0] for d in body["details"]] == named, body
    assert "400 bad_request: the query is invalid (1 problem) (min_age: must be >= 0" in (
        fails(bal, "inflight", "--min-age", "-1"))


# limits ------------------------------------------------------------------------------
def test_a_limit_holds_for_the_whole_balancer(tmp_path: Path) -> None:
    bal = Balancer(tmp_path, {"app.test": {"action": "empty", "status": 204,
                                           "limits": {"rate": 100, "per": "client"}}},
                   args=["--workers", "2"], internal=True)
    port = bal.ports["internal"]
    seconds, rate = 3.0, 1000
    results: dict[str, list[int]] = {"abuser": [], "other": []}

    def client(name: str, address: str, per_second: int, connections: int) -> None:
        conns = [Pipeline(port) for _ in range(connections)]
        batch = max(1, per_second // 20 // connections)
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < seconds:
            for conn in conns:
                conn.send(from_client(address) * batch)
            sent += batch * connections
            lag = sent / per_second - (time.monotonic() - start)
            if lag > 0:
                time.sleep(lag)
        for conn in conns:
            results[name] += conn.finish(sent // connections)

    threads = [threading.Thread(target=client, args=("abuser", "198.51.100.7", rate, 4)),
               threading.Thread(target=client, args=("other", "198.51.100.8", 20, 1))]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    took = time.monotonic() - began  # the balancer's decisions all fall within (its clock)
    try:
        passed = results["abuser"].count(204)
        assert len(results["abuser"]) >= 0.8 * rate * seconds  # the load was really sent
        # at most `rate` a second and the burst over the time the balancer had the
        # requests (bug (test): bounded by the 3 s of sending, while a loaded machine
        # admits the last ones queued after that: 339 passed of at most 331)
        assert 0.9 * 100 * seconds <= passed <= 100 * took + default_burst(100)
        assert set(results["abuser"]) == {204, 429}
        assert results["other"] and set(results["other"]) == {204}
        limited = bal.host_stats("app.test")["limited"]
        assert limited == results["abuser"].count(429)
        assert metric(bal.metrics(), "balancer_limited_requests_total",
                      host="app.test") == limited
        assert top(bal, "limited", "client")["top"][0]["key"] == "198.51.100.7"
    finally:
        bal.stop()


def clients(bal: Balancer, by: str) -> dict[str, int]:
    """The top clients by `by`: KEY → count."""
    return {row["key"]: row["count"] for row in top(bal, by, "client")["top"]}


def test_ipv6_clients_are_counted_by_their_64_as_the_limits_hold_them(tmp_path: Path) -> None:
    """Bug: the heavy hitters counted an IPv6 client per address while the limits
    hold it by its /64: a host rotating its addresses within its /64, limited as
    one client, was spread thin over the top clients. Both key it the same
    (`balancer.clients`): the /64, an IPv4-mapped address as its IPv4 address.
    Forwarded addresses on the internal listener, and the IPv6 peer itself."""
    bal = Balancer(tmp_path, {"app.test": {"action": "empty", "status": 204,
                                           "limits": {"rate": 0.01, "burst": 1}}},
                   listen="[::1]:0", internal=True)
    try:
        rotating = [from_client(f"2001:db8:1:2::{n:x}") for n in range(1, 6)]
        mapped = [from_client("::ffff:192.0.2.7"), from_client("192.0.2.7")]
        assert pipelined(bal.ports["internal"], rotating + mapped) == [204] + [429] * 4 + [204, 429]
        with socket.create_connection(("::1", bal.port), timeout=10) as sock:  # the peer: ::1
            sock.sendall(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n")
            assert sock.recv(100).startswith(b"HTTP/1.1 204 ")
        expected = {"2001:db8:1:2::/64": 5, "192.0.2.7": 2, "::/64": 1}
        wait_for(lambda: clients(bal, "requests") == expected, timeout=10,
                 what=f"the requests counted by client as {expected}")
        assert clients(bal, "limited") == {"2001:db8:1:2::/64": 4, "192.0.2.7": 1}
        assert clients(bal, "errors") == {"2001:db8:1:2::/64": 4, "192.0.2.7": 1}
    finally:
        bal.stop()


def test_a_refused_request_gets_the_busy_page_with_429_and_retry_after(tmp_path: Path) -> None:
    bal = Balancer(tmp_path, {"app.test": {"action": "empty", "status": 204,
                                           "limits": {"rate": 0.5, "burst": 2}}})
    try:
        statuses = [request(bal.port)[0] for _ in range(2)]
        status, headers, body = request(bal.port)
        assert statuses == [204, 204]
        assert status == 429 and 1 <= int(headers["retry-after"]) <= 2
        assert b"<title>429 Too Many Requests</title>" in body
        assert headers["content-length"] == str(len(body))
        # on an external listener X-Forwarded-For is the client's word: not a new client
        spoofed = request(bal.port, headers={"X-Forwarded-For": "192.0.2.1"})
        assert spoofed[0] == 429
    finally:
        bal.stop()


def test_max_connections_per_client(tmp_path: Path) -> None:
    backend = Backend()
    bal = Balancer(tmp_path, {"app.test": {"action": "proxy", "backends": [backend.address],
                                           "limits": {"max_connections_per_client": 1}}},
                   args=["--workers", "2"])
    slow = threading.Thread(target=request, args=(bal.port,), kwargs={"path": "/slow?s=1.5"})
    try:
        slow.start()
        wait_for(lambda: bal.api("GET", "/api/v1/inflight")[1]["requests"], what="slow request")
        assert request(bal.port)[0] == 429
        slow.join(10)
        assert request(bal.port)[0] == 200
    finally:
        bal.stop()
        backend.stop()


def test_limits_are_validated_with_every_problem() -> None:
    problems = validate_rule({"action": "empty", "status": 204,
                              "limits": {"rate": -1, "burst": 1.5, "per": "ip", "x": 1}})
    assert len(problems) == 4
    assert all(p.startswith("limits.") for p in problems)
    assert validate_rule({"action": "empty", "status": 204, "limits": {}})
    assert validate_rule({"action": "empty", "status": 204, "limits": {"burst": 3}})
    assert not validate_rule({"action": "proxy", "backends": ["127.0.0.1:1"],
                              "limits": {"rate": 10, "burst": 20, "per": "host",
                                         "max_connections_per_client": 4}})


def test_shared_buckets_are_one_table_across_maps(tmp_path: Path) -> None:
    path = str(tmp_path / "limits.shm")
    one, two = SharedBuckets(path), SharedBuckets(path)  # as two workers map it
    now = 1000.0
    a, b = one.slot(b"k", now), two.slot(b"k", now)
    assert a == b
    assert one.take(a, now, 0.1, 0.0) == 0.0
    assert two.take(b, now, 0.1, 0.0) == pytest.approx(0.1)
    assert one.take(a, now + 0.1, 0.1, 0.0) == 0.0


HAMMER = """
import sys, time
from balancer.limits import SharedBuckets
buckets, admitted = SharedBuckets(sys.argv[1]), 0
print("ready", flush=True)
start = float(sys.stdin.readline())
while time.monotonic() < start:
    pass
while time.monotonic() < start + 1.0:
    now = time.monotonic()
    with buckets.locked(b"k"):
        admitted += buckets.take(buckets.slot(b"k", now), now, 0.01, 0.0) == 0.0
print(admitted)
"""


def test_two_processes_deciding_on_one_key_admit_no_more_than_the_limit(
        tmp_path: Path) -> None:
    """100/s for 1 s, decided back to back by two processes: at most 100 + 1 go
    (unlocked, the read-modify-write race admitted ~13 % more)."""
    import subprocess
    import sys

    path = str(tmp_path / "limits.shm")
    procs = [subprocess.Popen([sys.executable, "-c", HAMMER, path], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    for proc in procs:  # both started (a loaded machine took > 1.5 s to start one)
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    start = time.monotonic() + 0.2  # both spinning before the second begins
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write(f"{start!r}\n")
        proc.stdin.flush()
    counts = [int(proc.communicate(timeout=30)[0]) for proc in procs]
    assert all(counts) and sum(counts) <= 101, counts


# units -------------------------------------------------------------------------------
def test_space_saving_keeps_the_heavy_keys_in_bounded_memory() -> None:
    sketch = SpaceSaving(16)
    for n in range(20_000):
        sketch.add(f"c{n}", 1)
        if n % 10 == 0:
            sketch.add("heavy", 1)
    assert len(sketch) == 16
    count, error = sketch.counts()["heavy"]
    assert count - error <= 2000 <= count


def test_path_keys_are_the_host_and_a_bounded_first_segment() -> None:
    assert path_key("a.test", b"/api/v1/users?x=1") == "a.test/api"
    assert path_key("a.test", b"/?q") == "a.test/"
    assert path_key("a.test", b"/" + b"x" * 500) == "a.test/" + "x" * 47
    assert path_key("a.test", b"*") == "a.test *"


def test_path_keys_are_those_of_the_first_stop_found_by_find() -> None:
    """`path_key` scans natively; `find` for "/" then "?" says the same."""
    def by_find(host: str, target: bytes) -> str:
        end = min(len(target), 48)
        for stop in (b"/", b"?"):
            at = target.find(stop, 1, end)
            if at > 0:
                end = at
        sep = "" if target[:1] == b"/" else " "
        return host + sep + target[:end].decode("latin-1")

    rng = random.Random(21)
    targets = [b"/", b"//", b"/?", b"/a?b/c", b"/a/b?c", b"*", b"/" + b"y" * 47 + b"/z",
               b"/" + b"y" * 46 + b"?z", b"/" + b"y" * 47 + b"?z", b"http://h/x?y"]
    targets += [b"/" + bytes(rng.choice(b"ab/?") for _ in range(rng.randrange(60)))
                for _ in range(500)]
    for target in targets:
        assert path_key("a.test", target) == by_find("a.test", target), target


def test_quantiles_interpolate_inside_a_bucket() -> None:
    assert quantile([0, 100, 100], 0.5, (0.01, 0.1)) == pytest.approx(0.055)
    assert quantile([0, 0], 0.5, (0.01,)) is None
    assert quantile([5, 10], 0.99, (0.01,)) == 0.01  # in +Inf: the largest finite bound
    assert percentiles({"counts": [5, *[6] * 12, 10]})["p99"] == 60.0


# history -----------------------------------------------------------------------------
def test_history_survives_a_reload(tmp_path: Path) -> None:
    # samples every second, not every 5 s (its adoption window: 4 s, not 20 s)
    bal = Balancer(tmp_path, {"app.test": {"action": "empty", "status": 204}},
                   prefix=constants_prefix({"management.history.INTERVAL": 1.0}))
    try:
        def times() -> list[float]:
            return bal.api("GET", "/api/v1/history?since=600")[1]["times"]

        wait_for(times, timeout=20, what="a first history sample")
        for _ in range(20):
            request(bal.port)
        before = wait_for(lambda: len(t := times()) >= 2 and t, timeout=20,
                          what="a second history sample")
        history = bal.api("GET", "/api/v1/history?host=app.test")[1]
        assert any(r is not None and r > 0 for r in history["hosts"]["app.test"]["rps"])
        bal.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: bal.api("GET", "/api/v1/info")[1]["arbiter"].get("generation") == 2,
                 timeout=20, what="the reload")
        after = wait_for(lambda: len(t := times()) > len(before) and t, timeout=20,
                         what="a sample by the new management process")
        assert after[:len(before)] == before
        assert bal.api("GET", "/api/v1/history")[1]["interval"] == 1.0  # the clock it ran on
    finally:
        bal.stop()


def test_history_rates_gaps_and_a_saved_copy(tmp_path: Path) -> None:
    from balancer.stats import Stats
    from management.history import History

    stats = Stats()
    host = stats.host("a.test")
    path = str(tmp_path / "history.json")
    history = History(path)
    history.sample(stats.snapshot(), 1000.0)
    for _ in range(10):
        host.open_requests += 1
        host.finish(200, 0, 10, 0.02)
    host.open_requests += 1
    host.finish(502, 0, 10, 0.02)
    history.sample(stats.snapshot(), 1005.0)
    stats.hosts.clear()  # counters that went back (a host re-added): a gap, never negative
    stats.host("a.test")
    history.sample(stats.snapshot(), 1010.0)
    view = history.view(3600, 1010.0)
    series = view["hosts"]["a.test"]
    assert view["times"] == [1000.0, 1005.0, 1010.0]
    assert series["rps"] == [None, 2.2, None]
    assert series["error_rate"][1] == pytest.approx(1 / 11, abs=1e-3)
    assert 0.01 < series["p50"][1] < 0.025
    assert view["total"]["rps"] == series["rps"]
    history.save()
    copy = History(path)
    assert copy.load() and copy.view(3600, 1010.0) == view
    (tmp_path / "history.json").write_text("{not json")
    assert not History(path).load()


def test_hosts_and_backends_are_counted_exactly_per_interval() -> None:
    from balancer.sketch import TopTalkers
    from balancer.stats import Stats

    stats = Stats()
    host = stats.host("a.test")
    backend = host.backend("10.0.0.1:80")

    def serve(n: int, status: int = 200) -> None:
        for _ in range(n):
            host.open_requests += 1
            if not host.marked:  # as ClientConnection.handle does
                stats.mark("a.test", host)
            host.finish(status, 0, 100, 0.01)
            backend.successes += 1
            backend.bytes += 100

    top = TopTalkers(0.0)
    serve(3)
    assert top.export("requests", "host", 60, 5.0, stats) == {"a.test": [3, 0]}
    top.rotate(10.0, stats)  # the first interval ends
    serve(2, 503)
    assert top.export("requests", "host", 60, 12.0, stats) == {"a.test": [5, 0]}
    assert top.export("requests", "host", 1, 12.0, stats) == {"a.test": [2, 0]}
    assert top.export("errors", "host", 60, 12.0, stats) == {"a.test": [2, 0]}
    assert top.export("bytes", "backend", 60, 12.0, stats) == {"10.0.0.1:80": [500, 0]}
    for n in range(40):  # a full window later only the last intervals count
        top.rotate(20.0 + 10 * n, stats)
    assert top.export("requests", "host", 300, 420.0, stats) == {}
    assert len(top.slots) <= 31


def test_rotation_visits_only_the_hosts_with_traffic() -> None:
    """A rotation costs the hosts a request began on in the interval, not the
    table: with 20,000 idle hosts, counters that moved on hosts no request was
    marked on (a walk of the table would find them) are not looked at, and a
    request still open at the rotation keeps its host in the next interval's
    set. (Observed through what the rotation records: HostStats is compiled in
    CI, so it cannot be subclassed to count attribute reads.)"""
    from balancer.sketch import TopTalkers
    from balancer.stats import Stats

    stats = Stats()
    for n in range(20000):
        stats.host(f"h{n}.test")
    top = TopTalkers(0.0)
    busy, open_one = stats.hosts["h7.test"], stats.hosts["h9.test"]
    for key, host in (("h7.test", busy), ("h9.test", open_one)):
        host.open_requests += 1
        stats.mark(key, host)
    busy.finish(200, 10, 10, 0.01)  # h9's request stays open
    unvisited = stats.hosts["h5.test"]  # moved, never marked: only a walk sees it
    unvisited.open_requests += 1
    unvisited.finish(200, 10, 10, 0.01)
    top.rotate(10.0, stats)
    assert top.slots[0].exact["requests host"] == {"h7.test": 1}
    assert set(stats.dirty) == {"h9.test"} and open_one.marked and not busy.marked
    assert sorted(stats.active_keys()) == ["h7.test", "h9.test"]
    open_one.finish(200, 0, 0, 0.01)  # finishes in the next interval: counted there
    unvisited.open_requests += 1
    unvisited.finish(200, 10, 10, 0.01)
    top.rotate(20.0, stats)
    assert top.slots[1].exact["requests host"] == {"h9.test": 1}
    assert stats.dirty == {}
    top.rotate(30.0, stats)
    assert top.slots[2].exact["requests host"] == {}


def test_a_deleted_host_is_neither_dirty_nor_active_again() -> None:
    from balancer.stats import Stats

    stats = Stats()
    host = stats.host("gone.test")
    stats.mark("gone.test", host)
    stats.forget_hosts({"gone.test"})
    stats.mark("gone.test", host)  # a request that began before the deletion
    assert stats.active_keys() == [] and stats.dirty == {}
    again = stats.host("gone.test")
    assert not again.marked and again.seen == (0, 0, 0, 0)


def test_histogram_buckets_are_found_as_bisect_finds_them() -> None:
    from bisect import bisect_left

    from balancer.stats import BOUNDS, BUCKETS, bucket_of

    assert tuple(BOUNDS) == BUCKETS
    for seconds in (0.0, 0.005, 0.0051, 0.3, 60.0, 60.5, 1e9):
        assert bucket_of(seconds) == bisect_left(BUCKETS, seconds)


def test_durations_are_counted_in_their_buckets_across_runs() -> None:
    """`Timed` counts a run of durations in one bucket apart from the list: every
    bucket's count is exact whenever read, mid-run or after a change of bucket."""
    from bisect import bisect_left
    from itertools import accumulate

    from balancer.stats import BUCKETS, HostStats

    timed = HostStats()
    expected = [0] * (len(BUCKETS) + 1)
    for seconds in [0.001] * 300 + [0.2] * 3 + [0.001] * 2 + [70.0] + [0.02] * 400 + [0.2]:
        timed.observe(seconds)
        expected[bisect_left(BUCKETS, seconds)] += 1
        snapshot = timed.durations()
        assert snapshot["counts"] == list(accumulate(expected))
    assert snapshot["count"] == 707
    assert snapshot["sum"] == pytest.approx(0.302 + 0.8 + 70.0 + 8.0)


def test_a_history_file_of_another_format_continues_with_a_gap(tmp_path: Path) -> None:
    """A history file saved in format 1 (each histogram's counts with their
    bounds) keeps its points, and the next sample, which has no counters of its
    own format to subtract, is a gap (bug: subtracted from zero, every host's
    requests since the balancer started, over one interval, drawn as a spike)."""
    import json

    from balancer.stats import Stats
    from management.history import History

    stats = Stats()
    host = stats.host("a.test")
    for _ in range(1000):
        host.open_requests += 1
        host.finish(200, 0, 10, 0.02)
    path = tmp_path / "history.json"
    older = History(str(path))
    older.sample(stats.snapshot(), 1000.0)
    older.save()
    doc = json.loads(path.read_text())
    doc["format"] = 1  # as a format-1 process wrote it: its counters' buckets
    doc["last"] = {key: {"completed": c["completed"], "errors": c["errors"],
                         "buckets": [[0.1, 1000]]} for key, c in doc["last"].items()}
    path.write_text(json.dumps(doc))
    history = History(str(path))
    assert history.load()
    host.open_requests += 1
    host.finish(200, 0, 10, 0.02)
    history.sample(stats.snapshot(), 1005.0)
    view = history.view(3600, 1005.0)
    assert view["times"] == [1000.0, 1005.0]
    assert view["hosts"]["a.test"]["rps"] == [None, None]
    assert view["total"]["rps"] == [None, None]
