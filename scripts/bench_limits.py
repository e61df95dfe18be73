"""Benchmark: does a per-client limit protect the other clients from an abuser?

    python scripts/bench_limits.py [--rounds 3] [--duration 5] [--clients 20]
                                   [--client-rate 10] [--abuser-rate 1000]
                                   [--limit 100] [--workers 2]

A real `balancer serve --workers N` (file store, an internal listener) proxies
`app.test` to the load-test backend (`python -m loadtest.backend`) under the
rule limit `{"rate": LIMIT, "per": "client"}`. Clients are told apart by the
`X-Forwarded-For` the internal listener trusts.

Each round runs two phases of `--duration` seconds, in alternating order
(round 1: without then with, round 2: with then without, ...), so that a
drift of the machine's load does not favour one side:

* normal load (always): `--clients` clients (10.1.0.1, 10.1.0.2, ...), each
  one keep-alive connection sending `--client-rate` requests/s open-loop
  (on a fixed schedule; a late response delays nothing, and its latency is
  counted from the moment it was due, so queueing is not hidden). Reported:
  p50/p99/max latency and any status other than 200.
* the abuser (one phase of two): 198.51.100.7 sending `--abuser-rate`
  requests/s pipelined on 4 connections, in a separate process. Reported:
  requests answered 200 (let through) per whole second, and 429s.

Each load runs in its own process (gevent), so the abuser's client work does
not delay the normal clients' own timing; it still competes for the CPU with
the balancer, as a real abuser on another machine would not. Prints one JSON
line per phase, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HOST = "app.test"
ABUSER = "198.51.100.7"
ABUSER_CONNECTIONS = 4
TICK = 0.02  # seconds between the abuser's pipelined batches
WARMUP = 1.0  # seconds the abuser runs before the normal load is measured


def request_bytes(client: str) -> bytes:
    return (f"GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Forwarded-For: {client}\r\n\r\n").encode()


class Responses:
    """Content-Length framed responses read from one keep-alive connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()

    def next_status(self) -> int:
        """The status of the next whole response; raises EOFError if the peer closed."""
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buffer[:end]).decode("latin-1")
                length = 0
                for line in head.split("\r\n")[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                if len(self.buffer) >= end + 4 + length:
                    del self.buffer[:end + 4 + length]
                    return int(head.split()[1])
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise EOFError("the balancer closed the connection")
            self.buffer.extend(chunk)


# the loads (each in its own process) ---------------------------------------------
def normal_load(port: int, clients: int, rate: float, duration: float) -> dict[str, Any]:
    """`clients` open-loop clients at `rate` requests/s each for `duration` s."""
    import gevent

    latencies: list[float] = []
    statuses: dict[int, int] = {}

    def one(number: int) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        responses = Responses(sock)
        data = request_bytes(f"10.1.{number // 250}.{number % 250 + 1}")
        start = time.perf_counter() + number / clients / rate  # spread the clients out
        for k in range(int(duration * rate)):
            due = start + k / rate
            wait = due - time.perf_counter()
            if wait > 0:
                gevent.sleep(wait)
            sock.sendall(data)
            status = responses.next_status()
            latencies.append(time.perf_counter() - due)
            statuses[status] = statuses.get(status, 0) + 1
        sock.close()

    gevent.joinall([gevent.spawn(one, n) for n in range(clients)], raise_error=True,
                   timeout=duration * 3 + 30)
    ordered = sorted(latencies)

    def ms(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))] * 1000, 2)

    return {"requests": len(ordered), "statuses": statuses, "p50_ms": ms(0.5),
            "p99_ms": ms(0.99), "max_ms": ms(1.0)}


def abuser_load(port: int, rate: float, duration: float) -> dict[str, Any]:
    """`rate` requests/s pipelined on `ABUSER_CONNECTIONS` connections."""
    import gevent

    started = time.monotonic()
    passed: dict[int, int] = {}  # whole second since start → responses 200
    counts: dict[int, int] = {}
    batch = max(1, round(rate * TICK / ABUSER_CONNECTIONS))
    ticks = int(duration / TICK)

    def reader(responses: Responses, expected: int) -> None:
        for _ in range(expected):
            status = responses.next_status()
            counts[status] = counts.get(status, 0) + 1
            if status == 200:
                second = int(time.monotonic() - started)
                passed[second] = passed.get(second, 0) + 1

    socks = [socket.create_connection(("127.0.0.1", port), timeout=30)
             for _ in range(ABUSER_CONNECTIONS)]
    readers = [gevent.spawn(reader, Responses(s), batch * ticks) for s in socks]
    data = request_bytes(ABUSER) * batch
    for k in range(ticks):
        wait = started + k * TICK - time.monotonic()
        if wait > 0:
            gevent.sleep(wait)
        for sock in socks:
            sock.sendall(data)
    gevent.joinall(readers, raise_error=True, timeout=30)
    for sock in socks:
        sock.close()
    sent = batch * ticks * ABUSER_CONNECTIONS
    whole = [passed.get(s, 0) for s in range(int(duration))]
    return {"sent_per_s": round(sent / duration), "statuses": counts,
            "passed_per_s": whole}


def run_load(argv: list[str]) -> None:
    """`--load normal|abuser`: run one load and print its JSON (a child process)."""
    from gevent import monkey

    monkey.patch_all()
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", choices=["normal", "abuser"])
    parser.add_argument("--port", type=int)
    parser.add_argument("--clients", type=int)
    parser.add_argument("--rate", type=float)
    parser.add_argument("--duration", type=float)
    args = parser.parse_args(argv)
    if args.load == "normal":
        result = normal_load(args.port, args.clients, args.rate, args.duration)
    else:
        result = abuser_load(args.port, args.rate, args.duration)
    print(json.dumps(result))


# the orchestration -------------------------------------------------------------
def spawn_load(*args: Any) -> subprocess.Popen:
    from loadtest.reaper import guarded_popen

    return guarded_popen([sys.executable, __file__, *map(str, args)],
                         stdout=subprocess.PIPE, text=True)


def collect(proc: subprocess.Popen, timeout: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"a load process failed ({proc.returncode})")
    return json.loads(out)


def phase(port: int, opts: argparse.Namespace, abused: bool) -> dict[str, Any]:
    abuser = None
    if abused:
        abuser = spawn_load("--load", "abuser", "--port", port, "--rate", opts.abuser_rate,
                            "--duration", opts.duration + 2 * WARMUP)
        time.sleep(WARMUP)  # the abuser is at full rate before the measure starts
    normal = spawn_load("--load", "normal", "--port", port, "--clients", opts.clients,
                        "--rate", opts.client_rate, "--duration", opts.duration)
    result: dict[str, Any] = {"abuser": abused, "normal": collect(normal, opts.duration * 3 + 60)}
    if abuser is not None:
        result["abuser_load"] = collect(abuser, opts.duration * 3 + 60)
    return result


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        run_load(sys.argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per phase")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--client-rate", type=float, default=10.0)
    parser.add_argument("--abuser-rate", type=float, default=1000.0)
    parser.add_argument("--limit", type=float, default=100.0)
    parser.add_argument("--workers", type=int, default=2)
    opts = parser.parse_args()

    from loadtest.procs import free_port
    from loadtest.reaper import guarded_popen
    from tests.support import Balancer, request, wait_for

    backend_address = f"127.0.0.1:{free_port()}"  # held: the backend listens beside
    backend = guarded_popen([sys.executable, "-m", "loadtest.backend", "--listen",
                             backend_address], cwd=ROOT)
    rule = {"action": "proxy", "backends": [backend_address],
            "limits": {"rate": opts.limit, "per": "client"}}
    bal = Balancer(Path(tempfile.mkdtemp()), {HOST: rule},
                   args=["--workers", str(opts.workers)], internal=True)
    try:
        port = bal.ports["internal"]
        wait_for(lambda: _answers(request, port), timeout=20, what="the rule served")
        phases = []
        for n in range(opts.rounds):
            for abused in ((False, True) if n % 2 == 0 else (True, False)):
                result = phase(port, opts, abused)
                print(json.dumps(result), flush=True)
                phases.append(result)
        print(json.dumps(summary(phases, opts)))
    finally:
        bal.stop()
        backend.terminate()
        backend.wait(5)


def _answers(request: Any, port: int) -> bool:
    try:
        return request(port, host=HOST, timeout=5)[0] == 200
    except OSError:
        return False


def summary(phases: list[dict[str, Any]], opts: argparse.Namespace) -> dict[str, Any]:
    """Medians over the rounds of the normal clients' p50/p99, with and without."""
    def median(abused: bool, key: str) -> float:
        return round(statistics.median(p["normal"][key] for p in phases
                                       if p["abuser"] == abused), 2)

    passed = [s for p in phases if p["abuser"]
              for s in p["abuser_load"]["passed_per_s"][1:-1]]  # whole seconds at full rate
    without, with_ = median(False, "p99_ms"), median(True, "p99_ms")
    return {"summary": True, "workers": opts.workers, "limit": opts.limit,
            "normal_p50_ms": {"without": median(False, "p50_ms"), "with": median(True, "p50_ms")},
            "normal_p99_ms": {"without": without, "with": with_},
            "p99_change_pct": round((with_ - without) / without * 100, 1),
            "abuser_passed_per_s": {"min": min(passed), "max": max(passed),
                                    "mean": round(statistics.mean(passed), 1)}}


if __name__ == "__main__":
    main()
