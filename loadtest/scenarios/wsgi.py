"""`wsgi`: gevent's pywsgi against a threaded wsgiref server, same page,
keep-alive, concurrency up to 10,000."""

from __future__ import annotations

from loadtest.scenarios.common import RunEnv, guarded, step_estimate
from loadtest.targets import check

NAME = "wsgi"
FULL_LEVELS = [100, 1000, 5000, 10000]
QUICK_LEVELS = [20]


def targets(env: RunEnv) -> list[str]:
    """gevent-wsgi when 'gevent' is a target, threaded-wsgi when 'threaded' is."""
    return [f"{kind}-wsgi" for kind in ("gevent", "threaded") if kind in env.targets]


def levels(env: RunEnv) -> list[int]:
    return env.levels or (QUICK_LEVELS if env.quick else FULL_LEVELS)


def estimate(env: RunEnv) -> float:
    return (sum(step_estimate(env, c) for c in levels(env)) + 1.0) * len(targets(env))


def run(env: RunEnv) -> None:
    for name in targets(env):
        with guarded(env, NAME, name):
            target = env.lab.start_wsgi(name)
            try:
                check(target)
                for connections in levels(env):
                    with env.step(f"wsgi {name} c={connections}",
                                           step_estimate(env, connections)):
                        env.results.add_row(NAME, env.load(target, connections))
            finally:
                env.lab.stop(target)
