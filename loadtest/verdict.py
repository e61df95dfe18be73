"""The issue's targets, checked against a run's results: met, missed, or not
measured (with the reason). The report and the end-of-run summary print these
lines as they are; a missed target is said plainly."""

from __future__ import annotations

from loadtest.scenarios.deploy import goal_line as deploy_goal

MAX_IDLE_BYTES = 15 * 1024


def _find(rows: list[dict], target: str, connections: int, keepalive: bool = True) -> dict | None:
    for row in rows:
        if (row.get("target") == target and row.get("connections") == connections
                and row.get("keepalive") == keepalive and not row.get("ceiling")):
            return row
    return None


def ratio(rows: list[dict], connections: int) -> float | None:
    """gevent requests/s divided by threaded requests/s at a keep-alive level."""
    gevent, threaded = _find(rows, "gevent", connections), _find(rows, "threaded", connections)
    if not gevent or not threaded or not threaded["rps"]:
        return None
    return gevent["rps"] / threaded["rps"]


def _ratio_line(rows: list[dict], connections: int, wanted: float) -> tuple[str, str]:
    value = ratio(rows, connections)
    name = f"gevent >= {wanted:g}x threaded requests/s at {connections} keep-alive connections"
    if value is None:
        return "not measured", name
    return ("met" if value >= wanted else "MISSED"), f"{name}: {value:.2f}x"


def _errors_line(rows: list[dict], connections: int) -> tuple[str, str]:
    row = _find(rows, "gevent", connections)
    name = f"gevent zero errors at {connections} connections"
    if row is None:
        return "not measured", name
    return ("met" if row["error_total"] == 0 else "MISSED"), \
        f"{name}: {row['error_total']} errors {row['errors']}"


def _idle_line(rows: list[dict], wanted: int) -> tuple[str, str]:
    row = next((r for r in rows if r.get("target") == "gevent"), None)
    name = f"one gevent balancer holds {wanted} idle connections, live requests served, " \
           f"< {MAX_IDLE_BYTES // 1024} KB each"
    if row is None or row["idle_connections"] < wanted:
        return "not measured", name
    live_ok = row["live"].get("rps", 0) > 0 and row["live"].get("error_total", 1) == 0
    per = row["bytes_per_connection"]
    held_ok = row["held"] >= wanted and row["alive_after"] >= wanted
    ok = held_ok and live_ok and per is not None and per < MAX_IDLE_BYTES
    per_text = f"{per / 1024:.1f} KB" if per is not None else "n/a"
    return ("met" if ok else "MISSED"), (
        f"{name}: held {row['held']}, {row['alive_after']} answered at the end, "
        f"live {row['live'].get('rps', 0):.0f} req/s with {row['live'].get('error_total')} "
        f"errors, {per_text} per connection")


def verdict(results: dict) -> list[tuple[str, str]]:
    """(status, text) for each of the issue's speed targets."""
    scenarios = results.get("scenarios", {})
    proxy = scenarios.get("proxy", {}).get("rows", [])
    idle = scenarios.get("idle", {}).get("rows", [])
    lines = [_ratio_line(proxy, 1000, 2), _ratio_line(proxy, 5000, 3),
             _errors_line(proxy, 5000), _idle_line(idle, 10000)]
    deployed = deploy_goal(scenarios.get("deploy", {}).get("rows", []))
    return lines + ([deployed] if deployed else [])
