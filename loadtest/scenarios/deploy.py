"""`deploy`: a host moved from backend A to B and back under steady load.

Balancer only (`gevent`). One closed-loop load (100 connections; 10 with
--quick) runs through six phases, measured apart from the same generator's
counters: ``before`` (steady state), ``deploy`` (A → B with `POST
/api/v1/hosts/*/deploy`; B starts listening only `B_DELAY` seconds after the
deploy began, so the ready step waits for it; A is stopped the moment the
deploy reports drained), ``after``, ``A' starts`` (A′ started on A's
address), ``rollback`` (`POST .../rollback`, B stopped once drained) and
``after rollback``. Run with
and without keep-alive, then the old way for comparison: ``PUT`` the rule to
B and stop A at once. The backends are the built-in one taking `APP_TIME` per
answer, so requests are in flight on A when it goes. Goal: 0 failed requests
and 0 socket errors through a deploy, its p99 within 2x of the steady state's.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from typing import Any

from loadtest import gen_worker as W
from loadtest.gen import GeneratorRun, LoadSpec
from loadtest.procs import free_port
from loadtest.results import level, max_us, percentile_us
from loadtest.routes import proxy_rule
from loadtest.scenarios.common import REQUEST_TIMEOUT, RunEnv, guarded
from loadtest.targets import HOST, Target, TargetError, check

NAME = "deploy"
HOST_KEY = "*"          # the lab balancer's one rule
B_DELAY = 1.5           # seconds after the deploy starts before B listens (--quick: 0.5)
WARMUP = 2.0            # the deploy's warmup (--quick: 0.2)
QUICK_PHASE = 0.5       # seconds of each steady phase with --quick
DRAIN_TIMEOUT = 20.0
DEPLOY_LIMIT = 60.0     # seconds a deploy may take before the scenario gives up
APP_TIME = 0.02         # seconds each backend takes per answer: requests are in flight


def targets(env: RunEnv) -> list[str]:
    return ["gevent"] if "gevent" in env.targets else []


def connections(env: RunEnv) -> int:
    return 10 if env.quick else 100


def b_delay(env: RunEnv) -> float:
    return 0.5 if env.quick else B_DELAY


def warmup(env: RunEnv) -> float:
    return 0.2 if env.quick else WARMUP


def phase_seconds(env: RunEnv) -> float:
    return QUICK_PHASE if env.quick else max(1.0, min(env.duration / 2, 5.0))


def estimate(env: RunEnv) -> float:
    one = 3 * phase_seconds(env) + 2 * (b_delay(env) + warmup(env) + 2) + 5
    return (2 * one + 2 * phase_seconds(env) + 5) * len(targets(env))


def run(env: RunEnv) -> None:
    for name in targets(env):
        for keepalive in (True, False):
            with guarded(env, NAME, name):
                _with_a(env, name, lambda target, a, k=keepalive: _deploy_run(env, target, a, k))
        with guarded(env, NAME, name):
            _with_a(env, name, lambda target, a: _old_way(env, target, a))


def _with_a(env: RunEnv, name: str, body: Any) -> None:
    """Backend A and the balancer in front of it; everything started is stopped after."""
    lab, started = env.lab, []
    try:
        a = lab.start_backend("a", delay=APP_TIME)
        started.append(a)
        target = lab.start_proxy(name, [a])
        started.append(target)
        check(target)
        body(target, a)
    finally:
        for item in reversed(started):
            lab.stop(item)


class Phases:
    """Cuts one running generator's counters into named phases."""

    def __init__(self, run: GeneratorRun, spec: LoadSpec) -> None:
        self.run, self.spec = run, spec
        self.rows: list[dict] = []
        self.mark = (self._totals(), time.monotonic())

    def _totals(self) -> tuple[list[int], list[int]]:
        slots = [self.run.total(s) for s in (W.OK, W.NON2XX, W.CONNECT, W.READ,
                                             W.TIMEOUT, W.BYTES)]
        return slots, self.run.histogram()

    def end(self, name: str) -> dict:
        (old, old_hist), started = self.mark
        now_totals, now = self._totals(), time.monotonic()
        new, hist = now_totals
        diff = [n - o for n, o in zip(new, old, strict=True)]
        hist = [n - o for n, o in zip(hist, old_hist, strict=True)]
        errors = {"non2xx": diff[1], "connect": diff[2], "read": diff[3], "timeout": diff[4]}
        row = level(generator="builtin", connections=self.spec.connections,
                    keepalive=self.spec.keepalive, duration_s=now - started,
                    requests=diff[0] + diff[1], bytes_read=diff[5],
                    latency_us={"p50": percentile_us(hist, 0.5), "p90": percentile_us(hist, 0.9),
                                "p99": percentile_us(hist, 0.99), "max": max_us(hist)},
                    errors=errors)
        row["phase"] = name
        self.rows.append(row)
        self.mark = (now_totals, now)
        return row


def _api(target: Target, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    port = target.routes.port
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


def _deploy(target: Target, what: str, body: dict) -> dict:
    """Start a deploy or rollback and wait until it ends; its record."""
    status, answer = _api(target, "POST", f"/api/v1/hosts/{HOST_KEY}/{what}", body)
    if status != 202:
        raise TargetError(f"{what}: {status} {answer}")
    deploy_id = answer["deploy"]["id"]
    deadline = time.monotonic() + DEPLOY_LIMIT
    while time.monotonic() < deadline:
        record = _api(target, "GET", f"/api/v1/deploys/{deploy_id}")[1]["deploy"]
        if record["state"] != "running":
            if record["state"] != "done":
                raise TargetError(f"{what} failed: {record['error']}")
            return record
        time.sleep(0.05)
    raise TargetError(f"{what} {deploy_id} did not end within {DEPLOY_LIMIT:.0f}s")


def _later(seconds: float, start: Any) -> tuple[threading.Thread, dict]:
    """Call `start` after `seconds` in a thread (a backend slow to come up)."""
    box: dict = {}

    def body() -> None:
        time.sleep(seconds)
        try:
            box["target"] = start()
        except Exception as exc:  # re-raised by the scenario
            box["error"] = exc
    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, box


def _started(thread: threading.Thread, box: dict) -> Target:
    thread.join(30)
    if "error" in box or "target" not in box:
        raise TargetError(f"a backend did not start: {box.get('error')}")
    return box["target"]


def _steps(record: dict) -> dict:
    return {s["name"]: round(s["ended"] - s["started"], 2) for s in record["steps"]}


def _deploy_run(env: RunEnv, target: Target, a: Target, keepalive: bool) -> None:
    lab, phase = env.lab, phase_seconds(env)
    spec = LoadSpec(HOST, target.port, connections(env), duration=3600, keepalive=keepalive,
                    timeout=REQUEST_TIMEOUT)
    label = f"deploy {target.name} {'keep-alive' if keepalive else 'close'}"
    with env.step(label, 3 * phase + 2 * (b_delay(env) + warmup(env) + 2)), \
            GeneratorRun(spec) as load:
        load.wait_ready(timeout=30)
        load.go()
        phases = Phases(load, spec)
        time.sleep(phase)
        phases.end("before")
        b_port = free_port()
        thread, box = _later(b_delay(env), lambda: lab.start_backend("b", port=b_port,
                                                                       delay=APP_TIME))
        deployed = _deploy(target, "deploy", {"backends": [f"{HOST}:{b_port}"],
                                              "warmup": warmup(env),
                                              "drain_timeout": DRAIN_TIMEOUT})
        lab.stop(a)  # drained: A goes at once
        b = _started(thread, box)
        phases.end("deploy")
        time.sleep(phase)
        phases.end("after")
        a_again = lab.start_backend("a2", port=a.port, delay=APP_TIME)
        phases.end("A' starts")  # its process start, apart from the rollback's own cost
        try:
            rolled = _deploy(target, "rollback", {"warmup": warmup(env),
                                                  "drain_timeout": DRAIN_TIMEOUT})
            lab.stop(b)
            phases.end("rollback")
            time.sleep(phase)
            phases.end("after rollback")
        finally:
            load.stop()
            lab.stop(b)
            lab.stop(a_again)
    env.results.add_row(NAME, {"target": target.name, "way": "deploy", "keepalive": keepalive,
                               "connections": spec.connections, "phases": phases.rows,
                               "deploy_steps_s": _steps(deployed),
                               "rollback_steps_s": _steps(rolled)})


def _old_way(env: RunEnv, target: Target, a: Target) -> None:
    """The same move the old way: PUT the rule to B, stop A at once."""
    lab, phase = env.lab, phase_seconds(env)
    spec = LoadSpec(HOST, target.port, connections(env), duration=3600, keepalive=True,
                    timeout=REQUEST_TIMEOUT)
    b = lab.start_backend("b", delay=APP_TIME)
    try:
        with env.step(f"deploy {target.name}: the old way", 2 * phase + 1), \
                GeneratorRun(spec) as load:
            load.wait_ready(timeout=30)
            load.go()
            phases = Phases(load, spec)
            time.sleep(phase)
            phases.end("before")
            target.routes.set_rule(HOST_KEY, proxy_rule([f"{HOST}:{b.port}"]))
            env.procs.kill(a.proc)
            time.sleep(min(phase, 1.0))  # the dead backend's errors, measured
            phases.end("deploy")
            time.sleep(phase)
            phases.end("after")
            load.stop()
    finally:
        lab.stop(b)
    env.results.add_row(NAME, {"target": target.name, "way": "old (PUT, kill A)",
                               "keepalive": True, "connections": spec.connections,
                               "phases": phases.rows})


def table(rows: list[dict]) -> str:
    """The report's table: one line per phase of each run."""
    header = ["way", "keep-alive", "phase", "requests", "errors conn/read/timeout/non-2xx",
              "p50 ms", "p99 ms", "steps s"]
    lines = []
    for r in rows:
        for p in r["phases"]:
            e = p["errors"]
            steps = ""
            if p["phase"] in ("deploy", "rollback"):
                found = r.get(f"{p['phase']}_steps_s") or {}
                steps = " ".join(f"{k} {v}" for k, v in found.items())
            lines.append([r["way"], "yes" if r["keepalive"] else "no", p["phase"],
                          p["requests"],
                          f"{e['connect']}/{e['read']}/{e['timeout']}/{e['non2xx']}",
                          f"{p['latency_ms']['p50']:.2f}", f"{p['latency_ms']['p99']:.2f}",
                          steps or "–"])
    widths = "|".join(["---"] * len(header))
    out = [f"Load from the built-in generator, backends the built-in one answering after "
           f"{APP_TIME * 1000:.0f} ms, whatever the run's generator and backend above.", "",
           "| " + " | ".join(header) + " |", f"|{widths}|"]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def goal_line(rows: list[dict]) -> tuple[str, str] | None:
    """(status, text): 0 failed requests through every deploy, p99 within 2x."""
    runs = [r for r in rows if r["way"] == "deploy"]
    if not runs:
        return None
    failed, worst = 0, 0.0
    for r in runs:
        phases = {p["phase"]: p for p in r["phases"]}
        failed += sum(p["error_total"] for p in r["phases"])
        steady = phases["before"]["latency_ms"]["p99"] or 1e-9
        worst = max(worst, *(phases[n]["latency_ms"]["p99"] / steady
                             for n in ("deploy", "rollback")))
    ok = failed == 0 and worst <= 2.0
    return ("met" if ok else "missed",
            f"deploy and rollback under load: {failed} failed requests (goal 0), p99 "
            f"{worst:.2f}x the steady state's at worst (goal <= 2x)")
