"""`proxy`: throughput and latency over a concurrency sweep, with and without
keep-alive, for every proxy target; plus the generators' own ceiling (each
available generator against `direct`; not with --quick)."""

from __future__ import annotations

from loadtest.scenarios.common import RunEnv, guarded, step_estimate, with_target
from loadtest.wrk import wrk_path

NAME = "proxy"
FULL_LEVELS = [100, 1000, 5000]
QUICK_LEVELS = [20]
CEILING_LEVEL = 100


def levels(env: RunEnv) -> list[int]:
    return env.levels or (QUICK_LEVELS if env.quick else FULL_LEVELS)


def estimate(env: RunEnv) -> float:
    per_target = sum(2 * step_estimate(env, c) for c in levels(env)) + 1.5
    ceiling = "direct" in env.targets and not env.quick
    return per_target * len(env.targets) + (step_estimate(env) if ceiling else 0)


def run(env: RunEnv) -> None:
    for name in env.targets:
        with guarded(env, NAME, name):
            with_target(env, name, 1, lambda target, _b: _sweep(env, target))


def _sweep(env: RunEnv, target) -> None:
    for keepalive in (True, False):
        for connections in levels(env):
            mode = "keep-alive" if keepalive else "close"
            with env.step(f"proxy {target.name} c={connections} {mode}",
                                   step_estimate(env, connections)):
                row = env.load(target, connections, keepalive=keepalive)
                env.results.add_row(NAME, row)
    if target.name == "direct" and not env.quick:
        _ceiling(env, target)


def _ceiling(env: RunEnv, target) -> None:
    """The other generator against the backend alone: how fast can it drive?"""
    other = "builtin" if env.generator == "wrk" else ("wrk" if wrk_path() else None)
    if other is None:
        return
    connections = min(CEILING_LEVEL, max(levels(env)))
    with env.step(f"generator ceiling ({other}) against direct",
                           step_estimate(env)):
        row = env.load(target, connections, generator=other)
        row["ceiling"] = True
        env.results.add_row(NAME, row)
