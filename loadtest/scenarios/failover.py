"""`failover`: two backends behind each proxy target; one is killed (SIGKILL)
a third of the way into a closed-loop load. Connect failures must be retried
on the surviving backend: the errors the clients saw are the figure."""

from __future__ import annotations

import threading

from loadtest.scenarios.common import RunEnv, guarded, step_estimate, with_target

NAME = "failover"


def targets(env: RunEnv) -> list[str]:
    return [name for name in env.targets if name != "direct"]


def connections(env: RunEnv) -> int:
    return 10 if env.quick else 100


def estimate(env: RunEnv) -> float:
    return (step_estimate(env) + 2) * len(targets(env))


def run(env: RunEnv) -> None:
    for name in targets(env):
        with guarded(env, NAME, name):
            with_target(env, name, 2, lambda target, backends: _kill_one(env, target, backends))


def _kill_one(env: RunEnv, target, backends) -> None:
    box: dict = {}

    def load() -> None:
        try:
            box["row"] = env.load(target, connections(env))
        except Exception as exc:  # re-raised in the scenario's thread
            box["error"] = exc

    with env.step(f"failover {target.name}", step_estimate(env) + 2):
        loader = threading.Thread(target=load, daemon=True)
        loader.start()
        loader.join(timeout=env.duration / 3)
        env.procs.kill(backends[1].proc)
        loader.join(timeout=env.duration + 30)
    if "error" in box:
        raise box["error"]
    row = box["row"]
    row["killed_after_s"] = round(env.duration / 3, 2)
    env.results.add_row(NAME, row)
