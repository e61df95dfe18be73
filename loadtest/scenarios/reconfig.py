"""`reconfig`: the catch-all rule changes every ``INTERVAL`` seconds (between
backend A, backend B, and both) while a closed-loop load runs. Every request
must still succeed. Balancer targets only (gevent and threaded)."""

from __future__ import annotations

import threading

from loadtest.routes import proxy_rule
from loadtest.scenarios.common import RunEnv, guarded, step_estimate, with_target
from loadtest.targets import HOST

NAME = "reconfig"
INTERVAL = 0.2


def targets(env: RunEnv) -> list[str]:
    return [name for name in env.targets if name in ("gevent", "threaded")]


def connections(env: RunEnv) -> int:
    return 10 if env.quick else 100


def estimate(env: RunEnv) -> float:
    return (step_estimate(env) + 2) * len(targets(env))


def run(env: RunEnv) -> None:
    for name in targets(env):
        with guarded(env, NAME, name):
            with_target(env, name, 2, lambda target, backends: _churn(env, target, backends))


def _churn(env: RunEnv, target, backends) -> None:
    a, b = (f"{HOST}:{x.port}" for x in backends)
    rules = [proxy_rule([b]), proxy_rule([a, b]), proxy_rule([a])]
    box: dict = {}
    with env.step(f"reconfig {target.name}", step_estimate(env) + 2):
        loader = threading.Thread(
            target=lambda: box.update(row=_safe_load(env, target, box)), daemon=True)
        loader.start()
        changes = 0
        while loader.is_alive():
            target.routes.set_rule("*", rules[changes % len(rules)])
            changes += 1
            loader.join(timeout=INTERVAL)
        loader.join(timeout=env.duration + 30)
    if "error" in box:
        raise box["error"]
    row = box["row"]
    row.update(rule_changes=changes, change_interval_s=INTERVAL,
               rule_change_via=type(target.routes).__name__)
    env.results.add_row(NAME, row)


def _safe_load(env: RunEnv, target, box: dict) -> dict | None:
    try:
        return env.load(target, connections(env))
    except Exception as exc:  # re-raised in the scenario's thread
        box["error"] = exc
        return None
