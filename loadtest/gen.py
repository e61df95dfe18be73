"""The built-in generator: several processes of gevent greenlets, counting
into shared memory (`multiprocessing` arrays, one slice per process).

Modes: ``load`` (closed loop, like wrk; keep-alive or not), ``idle`` (open the
connections, make one request on each, then hold them idle until stopped) and
``once`` (one request per connection, e.g. requests held by spin).

Invariants: every process is a daemon child that also exits when its parent
dies; `GeneratorRun.stop` is idempotent and bounded, and the run is stopped
by the caller's ``with`` block whatever happens.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from loadtest import gen_worker as W
from loadtest.results import HIST_BUCKETS, level, max_us, percentile_us


@dataclass(frozen=True)
class LoadSpec:
    """What the built-in generator does (picklable: it is sent to each process)."""

    host: str
    port: int
    connections: int
    duration: float = 5.0
    keepalive: bool = True
    mode: str = "load"
    path: str = "/"
    host_header: str = "loadtest"
    timeout: float = 5.0
    connect_timeout: float = 10.0
    connect_batch: int = 200
    processes: int = 0
    verify_held: bool = False

    @property
    def slots(self) -> int:
        return W.HIST_BASE + HIST_BUCKETS

    def process_count(self) -> int:
        wanted = self.processes or os.cpu_count() or 1
        return max(1, min(wanted, self.connections))


class GeneratorError(RuntimeError):
    """The generator's processes did not get ready in time."""


class GeneratorRun:
    """A started generator: `wait_ready`, `go`, `snapshot`, `stop`, `result`."""

    def __init__(self, spec: LoadSpec) -> None:
        self.spec = spec
        self.count = spec.process_count()
        ctx = multiprocessing.get_context("spawn")
        self.counters = ctx.Array("q", self.count * spec.slots, lock=False)
        self.control = ctx.Array("q", 2, lock=False)
        self.procs = [ctx.Process(target=W.worker_main, daemon=True,
                                  args=(spec, i, self.count, self.counters, self.control,
                                        os.getpid()))
                      for i in range(self.count)]
        self.started = self.stopped = 0.0

    def __enter__(self) -> GeneratorRun:
        for proc in self.procs:
            proc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def total(self, slot: int) -> int:
        slots = self.spec.slots
        return sum(self.counters[i * slots + slot] for i in range(self.count))

    def wait_ready(self, timeout: float) -> None:
        """Wait until every process has set up (idle: opened its connections)."""
        deadline = time.monotonic() + timeout
        while self.total(W.READY) < self.count:
            if time.monotonic() > deadline:
                raise GeneratorError(f"generator not ready within {timeout:.0f}s")
            if not all(p.is_alive() for p in self.procs):
                raise GeneratorError("a generator process died while setting up")
            time.sleep(0.05)

    def total_done(self) -> int:
        """Requests answered (any status) or failed so far."""
        return sum(self.total(slot) for slot in (W.OK, W.NON2XX, W.CONNECT, W.READ,
                                                  W.TIMEOUT))

    def total_held(self) -> int:
        """Idle connections currently held (idle mode)."""
        return self.total(W.OPEN)

    def go(self) -> None:
        self.control[W.GO] = 1
        self.started = time.monotonic()

    def stop(self) -> None:
        """Flag stop, give the processes a bounded time to finish, then kill them."""
        if not self.stopped:
            self.stopped = time.monotonic()
        self.control[W.STOP] = 1
        grace = min(self.spec.timeout, 2.0) + 3.0
        if self.spec.verify_held:
            grace += self.spec.timeout + self.spec.connections / 500
        deadline = time.monotonic() + grace
        for proc in self.procs:
            if proc.pid is not None:
                proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=2)

    def histogram(self) -> list[int]:
        slots, base = self.spec.slots, W.HIST_BASE
        return [sum(self.counters[i * slots + base + b] for i in range(self.count))
                for b in range(HIST_BUCKETS)]

    def result(self) -> dict:
        """The level's figures for the window between `go` and `stop`."""
        hist = self.histogram()
        latency = {"p50": percentile_us(hist, 0.50), "p90": percentile_us(hist, 0.90),
                   "p99": percentile_us(hist, 0.99), "max": max_us(hist)}
        errors = {"connect": self.total(W.CONNECT), "read": self.total(W.READ),
                  "timeout": self.total(W.TIMEOUT), "non2xx": self.total(W.NON2XX)}
        row = level(generator="builtin", connections=self.spec.connections,
                    keepalive=self.spec.keepalive,
                    duration_s=(self.stopped or time.monotonic()) - self.started,
                    requests=self.total(W.OK) + errors["non2xx"],
                    bytes_read=self.total(W.BYTES), latency_us=latency, errors=errors)
        row["held"] = self.total(W.OPEN)
        row["alive_after"] = self.total(W.ALIVE)
        row["completions_us"] = self._completions()
        return row

    def _completions(self) -> list[int]:
        """[first, last] completion wall-clock time in µs since the epoch (0: none)."""
        slots = self.spec.slots
        firsts = [self.counters[i * slots + W.FIRST_DONE] for i in range(self.count)]
        lasts = [self.counters[i * slots + W.LAST_DONE] for i in range(self.count)]
        firsts = [f for f in firsts if f]
        return [min(firsts) if firsts else 0, max(lasts)]


def run_load(spec: LoadSpec, on_tick: Callable[[float], None] | None = None) -> dict:
    """Run a closed-loop (or once) load for `spec.duration` seconds; the level's figures."""
    with GeneratorRun(spec) as run:
        run.wait_ready(timeout=30.0)
        run.go()
        deadline = run.started + spec.duration
        while (now := time.monotonic()) < deadline:
            if on_tick:
                on_tick(now - run.started)
            time.sleep(min(0.25, deadline - now))
        run.stop()
        return run.result()
