"""`spin`: requests held during a deploy and released on the flip.

A host is switched to ``spin``; N clients each send one request to it and are
held; after ``HOLD`` seconds the rule flips to ``proxy``. Every held request
must then succeed; the report gives how long after the flip (the write sent)
the first and the last were answered, the last also after the write's
answer (read-your-writes: every worker serves the new rule by then), and how
many answered before the flip (should be 0).
Balancer targets only (gevent and threaded): HAProxy and nginx have no spin.
"""

from __future__ import annotations

import http.client
import time

from loadtest.gen import GeneratorRun, LoadSpec
from loadtest.routes import proxy_rule
from loadtest.scenarios.common import RunEnv, guarded, with_target
from loadtest.targets import HOST, TargetError, fetch

NAME = "spin"
SPIN_HOST = "spin.loadtest"
HOLD = 2.0
QUICK_HOLD = 1.0
SPIN_TIMEOUT = 60


def targets(env: RunEnv) -> list[str]:
    return [name for name in env.targets if name in ("gevent", "threaded")]


def held_count(env: RunEnv) -> int:
    return 50 if env.quick else 1000


def hold_seconds(env: RunEnv) -> float:
    return QUICK_HOLD if env.quick else HOLD


def estimate(env: RunEnv) -> float:
    return (hold_seconds(env) + 3 + held_count(env) / 1000) * len(targets(env))


def run(env: RunEnv) -> None:
    for name in targets(env):
        with guarded(env, NAME, name):
            with_target(env, name, 1, lambda target, backends: _flip(env, target, backends))


def wait_until_held(port: int, host: str, timeout: float = 10.0) -> None:
    """Poll until a request to `host` is held (times out) rather than answered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            fetch(port, host, timeout=0.5)
        except TimeoutError:
            return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.1)
    raise TargetError(f"the spin rule for {host} was not applied within {timeout:.0f}s")


def _flip(env: RunEnv, target, backends) -> None:
    count = held_count(env)
    addrs = [f"{HOST}:{b.port}" for b in backends]
    with env.step(f"spin {target.name}: {count} held requests",
                           hold_seconds(env) + 3):
        target.routes.set_rule(SPIN_HOST, {"action": "spin", "timeout": SPIN_TIMEOUT})
        wait_until_held(target.port, SPIN_HOST)
        spec = LoadSpec(HOST, target.port, count, mode="once", host_header=SPIN_HOST,
                        timeout=SPIN_TIMEOUT, duration=0)
        with GeneratorRun(spec) as run:
            run.wait_ready(timeout=30)
            run.go()
            time.sleep(hold_seconds(env))
            early = run.total_done()
            flipped = time.time()
            target.routes.set_rule(SPIN_HOST, proxy_rule(addrs))
            answered = time.time()  # the management API's answer (a file store: written)
            deadline = time.monotonic() + 30
            while run.total_done() < count and time.monotonic() < deadline:
                time.sleep(0.05)
            run.stop()
            result = run.result()
    first, last = result["completions_us"]
    env.results.add_row(NAME, {
        "target": target.name, "held": count, "answered_before_flip": early,
        "ok": result["requests"] - result["errors"]["non2xx"], "errors": result["errors"],
        "error_total": result["error_total"],
        "first_release_ms": round((first / 1e6 - flipped) * 1000, 1) if first else None,
        "last_release_ms": round((last / 1e6 - flipped) * 1000, 1) if last else None,
        "last_after_answer_ms": round((last / 1e6 - answered) * 1000, 1) if last else None,
        "rule_change_via": type(target.routes).__name__,
    })
