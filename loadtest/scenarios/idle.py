"""`idle`: one target process holds N idle keep-alive connections (each made
one request first, then went quiet) while a few live connections keep
requesting. Reports memory per idle connection (RSS growth / connections
held), live latency meanwhile, and how many idle connections still answer
one more request at the end.

The connections are spread over several generator processes (at most
``PER_PROCESS`` each) so no single process nears the descriptor limit.
"""

from __future__ import annotations

import math
import time

from loadtest.gen import GeneratorRun, LoadSpec
from loadtest.measure import process_tree, rss_kb
from loadtest.scenarios.common import REQUEST_TIMEOUT, RunEnv, guarded, step_estimate, with_target
from loadtest.targets import HOST

NAME = "idle"
PER_PROCESS = 4000
LIVE_CONNECTIONS = 10
SETTLE = 1.0  # seconds for the target to finish reacting to the connect storm


def targets(env: RunEnv) -> list[str]:
    return [name for name in env.targets if name != "direct"]


def estimate(env: RunEnv) -> float:
    per = step_estimate(env) + 4 + env.idle_connections / 1000
    return per * len(targets(env))


def run(env: RunEnv) -> None:
    for name in targets(env):
        with guarded(env, NAME, name):
            with_target(env, name, 1, lambda target, _b: _hold(env, target))


def _spec(env: RunEnv, target) -> LoadSpec:
    count = env.idle_connections
    return LoadSpec(HOST, target.port, count, mode="idle", timeout=REQUEST_TIMEOUT,
                    connect_timeout=15.0, processes=max(2, math.ceil(count / PER_PROCESS)),
                    verify_held=True)


def _hold(env: RunEnv, target) -> None:
    count = env.idle_connections
    with env.step(f"idle {target.name}: {count} idle + {LIVE_CONNECTIONS} live",
                           step_estimate(env) + 4 + count / 1000):
        pids = process_tree(target.proc.pid)
        base_kb = rss_kb(pids)
        with GeneratorRun(_spec(env, target)) as idle:
            idle.wait_ready(timeout=60 + count / 200)
            time.sleep(0.3 if env.quick else SETTLE)
            held = idle.total_held()
            held_kb = rss_kb(process_tree(target.proc.pid))
            live = env.load(target, LIVE_CONNECTIONS)
            idle.go()
            idle.stop()
            result = idle.result()
        env.results.add_row(NAME, _row(target.name, count, held, base_kb, held_kb, live, result))
    if target.name == "haproxy" and held < count:
        env.results.add_note(NAME, "haproxy reserves two descriptors per connection, so under "
                                   "the same descriptor limit as the other targets its maxconn "
                                   f"stops at {held}; connections past it wait unaccepted")


def _row(name: str, wanted: int, held: int, base_kb: int, held_kb: int, live: dict,
         idle: dict) -> dict:
    growth = max(0, held_kb - base_kb)
    return {
        "target": name, "idle_connections": wanted, "held": held,
        "alive_after": idle["alive_after"], "idle_errors": idle["errors"],
        "rss_before_kb": base_kb, "rss_held_kb": held_kb,
        "bytes_per_connection": round(growth * 1024 / held) if held else None,
        "live": {key: live[key] for key in ("connections", "rps", "latency_ms", "errors",
                                            "error_total", "generator", "cpu_percent",
                                            "peak_rss_kb", "machine_busy_cores",
                                            "loadavg_1m") if key in live},
    }
