"""What every scenario shares: the run environment and the measured load.

Invariants: a scenario never lets one target's failure stop the run (it is
recorded by name in results.json and the next target goes on); every target
it starts is stopped in a ``finally``; every row carries the target's CPU and
peak RSS over the measured window.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loadtest.gen import GeneratorError, LoadSpec, run_load
from loadtest.measure import UsageWindow
from loadtest.procs import Interrupts, Processes, StartError
from loadtest.progress import Progress
from loadtest.store import Results
from loadtest.targets import HOST, Lab, Target, TargetError, check
from loadtest.wrk import WrkError, run_wrk

REQUEST_TIMEOUT = 5.0  # seconds: a slower response counts as a timeout error
EXPECTED_ERRORS = (TargetError, StartError, WrkError, GeneratorError, OSError, RuntimeError)


@dataclass
class RunEnv:
    """The options and shared machinery of one `loadtest run`."""

    out: Path
    procs: Processes
    lab: Lab
    results: Results
    progress: Progress
    interrupts: Interrupts
    targets: list[str]
    levels: list[int] | None
    duration: float
    quick: bool
    generator: str
    idle_connections: int
    notes: list[str] = field(default_factory=list)

    def step(self, label: str, estimate: float) -> contextlib.AbstractContextManager[None]:
        """One step of the run (`Progress.step`), begun only if no stop signal came."""
        self.interrupts.check()
        return self.progress.step(label, estimate)

    def load(self, target: Target, connections: int, *, keepalive: bool = True,
             duration: float | None = None, host_header: str | None = None,
             generator: str | None = None) -> dict:
        """Closed-loop load on `target`; the level's figures plus the target's usage."""
        duration = self.duration if duration is None else duration
        generator = generator or self.generator
        window = UsageWindow(target.proc.pid) if target.proc else None
        if window:
            window.begin()
        if generator == "wrk":
            row = run_wrk(self.procs, target.url(), connections, duration, keepalive=keepalive,
                          timeout=REQUEST_TIMEOUT, host_header=host_header)
        else:
            spec = LoadSpec(HOST, target.port, connections, duration, keepalive=keepalive,
                            timeout=REQUEST_TIMEOUT, host_header=host_header or "loadtest")
            row = run_load(spec)
        if window:
            row.update(window.end())
        row["target"] = target.name
        return row


def step_estimate(env: RunEnv, connections: int = 0) -> float:
    """Rough seconds for one measured level (for the progress bar)."""
    return env.duration + 0.5 + connections / 4000


@contextlib.contextmanager
def guarded(env: RunEnv, scenario: str, target: str) -> Iterator[None]:
    """Record an expected failure of one target and carry on with the next."""
    try:
        yield
    except EXPECTED_ERRORS as exc:
        env.results.add_failure(scenario, target, str(exc))


def with_target(env: RunEnv, name: str, backends: int,
                body: Callable[[Target, list[Target]], None]) -> None:
    """Start `backends` backends and proxy target `name`, check it, run `body`, stop all."""
    lab = env.lab
    started: list[Target] = []
    try:
        for index in range(backends):
            started.append(lab.start_backend(f"backend{index}"))
        target = lab.start_proxy(name, started)
        if name != "direct":
            started.append(target)
        check(target)
        body(target, started[:backends])
    finally:
        for item in reversed(started):
            lab.stop(item)
