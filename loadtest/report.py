"""report.md and the end-of-run summary, from the results dict alone."""

from __future__ import annotations

from pathlib import Path

from loadtest.scenarios import deploy as deploy_scenario
from loadtest.verdict import ratio, verdict


def _ms(value: float | None) -> str:
    return "–" if value is None else (f"{value:.1f}" if value >= 10 else f"{value:.2f}")


def _mb(kb: int | None) -> str:
    return "–" if not kb else f"{kb / 1024:.0f}"


def _errors(row: dict) -> str:
    e = row["errors"]
    return f"{e['connect']} / {e['read']} / {e['timeout']} / {e['non2xx']}"


def table(header: list[str], lines: list[list[str]]) -> str:
    """A Markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def sweep_table(rows: list[dict]) -> str:
    header = ["target", "conns", "keep-alive", "req/s", "p50 ms", "p90 ms", "p99 ms", "max ms",
              "errors conn/read/timeout/non-2xx", "CPU %", "peak RSS MB", "peak Pss MB",
              "busy cores", "generator"]
    lines = [[r["target"] + (" (ceiling)" if r.get("ceiling") else ""), r["connections"],
              "yes" if r["keepalive"] else "no", f"{r['rps']:.0f}",
              _ms(r["latency_ms"]["p50"]), _ms(r["latency_ms"]["p90"]),
              _ms(r["latency_ms"]["p99"]), _ms(r["latency_ms"]["max"]), _errors(r),
              r.get("cpu_percent", "–"), _mb(r.get("peak_rss_kb")),
              _mb(r.get("peak_pss_kb")), r.get("machine_busy_cores", "–"), r["generator"]]
             for r in rows]
    return table(header, lines)


def ratio_table(rows: list[dict]) -> str:
    levels = sorted({r["connections"] for r in rows if r["target"] in ("gevent", "threaded")})
    lines = []
    for connections in levels:
        value = ratio(rows, connections)
        lines.append([connections, "–" if value is None else f"{value:.2f}x"])
    return table(["keep-alive connections", "gevent / threaded req/s"], lines)


def idle_table(rows: list[dict]) -> str:
    header = ["target", "idle wanted", "held", "answered at end", "RSS before MB",
              "RSS held MB", "bytes per idle conn", "live req/s", "live p50 / p99 ms",
              "live errors", "idle errors conn/read/timeout/non-2xx"]
    lines = []
    for r in rows:
        live = r["live"]
        lat = live.get("latency_ms", {})
        lines.append([r["target"], r["idle_connections"], r["held"], r["alive_after"],
                      _mb(r["rss_before_kb"]), _mb(r["rss_held_kb"]),
                      r["bytes_per_connection"], f"{live.get('rps', 0):.0f}",
                      f"{_ms(lat.get('p50'))} / {_ms(lat.get('p99'))}",
                      live.get("error_total"), _errors({"errors": r["idle_errors"]})])
    return table(header, lines)


def spin_table(rows: list[dict]) -> str:
    header = ["target", "held", "answered before flip", "ok after flip", "errors",
              "first release ms", "last release ms", "last after the answer ms",
              "rule changed via"]
    return table(header, [[r["target"], r["held"], r["answered_before_flip"], r["ok"],
                           r["error_total"], _ms(r["first_release_ms"]),
                           _ms(r["last_release_ms"]), _ms(r.get("last_after_answer_ms")),
                           r["rule_change_via"]] for r in rows])


def churn_table(rows: list[dict], extra: str, label: str) -> str:
    header = ["target", "conns", "req/s", "p99 ms", "errors conn/read/timeout/non-2xx",
              label]
    return table(header, [[r["target"], r["connections"], f"{r['rps']:.0f}",
                           _ms(r["latency_ms"]["p99"]), _errors(r), r.get(extra, "–")]
                          for r in rows])


SECTIONS = {
    "proxy": ("Proxy sweep", sweep_table),
    "wsgi": ("WSGI servers", sweep_table),
    "idle": ("Idle connections", idle_table),
    "spin": ("Spin (requests held during a deploy)", spin_table),
    "reconfig": ("Rules changed under load",
                 lambda rows: churn_table(rows, "rule_changes", "rule changes")),
    "failover": ("A backend killed under load",
                 lambda rows: churn_table(rows, "killed_after_s", "killed after s")),
    "deploy": ("A deploy and a rollback under load (and the old way)", deploy_scenario.table),
}


TARGETS = {
    "direct": "the load generator against the backend alone, no proxy in between: the "
              "ceiling every proxy is measured against",
    "direct (ceiling)": "the backend alone driven by the other load generator ({other}, "
                        "at most 100 connections): how fast that generator itself can go, "
                        "so a target close to it is limited by the generator",
    "gevent": "the balancer (`balancer serve`): one gevent worker process, file store, "
              "access log off",
    "threaded": "the same proxy code (parser, routing table, pools, relay) run with one OS "
                "thread per client connection on blocking sockets: the baseline the "
                "gevent balancer is compared with",
    "haproxy": "HAProxy with one thread, backend connections reused",
    "nginx": "nginx with one worker as a reverse proxy, upstream keep-alive",
    "gevent-wsgi": "gevent's own WSGI server (pywsgi) serving the page",
    "threaded-wsgi": "Python's wsgiref WSGI server with one thread per connection serving "
                     "the page",
}
NOT_MEASURED = ("measured only at the full levels (1,000 and 5,000 connections, 10,000 idle): "
                "`loadtest run` without `--quick` or `--concurrency`")
FULL_LEVELS_ONLY = ("Measured only at the full levels (`loadtest run` without `--quick` or "
                    "`--concurrency`)")


def compared(results: dict) -> list[str]:
    """One sentence per target that has rows in this run, in the order of TARGETS."""
    seen = set()
    for section in results.get("scenarios", {}).values():
        for row in section.get("rows", []):
            seen.add(row["target"] + (" (ceiling)" if row.get("ceiling") else ""))
    generator = results.get("meta", {}).get("generator")
    other = "the built-in generator" if generator == "wrk" else "wrk"
    return [f"- `{name}`: {text.format(other=other)}" for name, text in TARGETS.items()
            if name in seen]


def goals(results: dict) -> list[str]:
    """The goals this run measured, met or missed; the unmeasured ones in one line."""
    lines = verdict(results)
    out = [f"- **{status}** — {text}" for status, text in lines if status != "not measured"]
    unmeasured = [text for status, text in lines if status == "not measured"]
    if unmeasured:
        out.append(f"- {FULL_LEVELS_ONLY}: {'; '.join(unmeasured)}.")
    return out


def render(results: dict, plots: list[Path]) -> str:
    """The whole report.md text."""
    meta = results["meta"]
    out = ["# Load test report", "",
           f"Command: `{meta.get('command', '')}`  ", f"Started: {meta.get('started', '')}  ",
           f"Machine: {meta.get('machine', '')}  ", f"Generator: {meta.get('generator', '')}, "
           f"{meta.get('duration_s', '')} s per level, a response slower than "
           f"{meta.get('request_timeout_s', '')} s counts as a timeout  ",
           f"Backend: {meta.get('backend', '')}", "",
           "CPU % is the target's processes (100 = one core); busy cores is the whole "
           "machine during the level (target + generator + anything else running).", "",
           "## What is compared", ""]
    out += compared(results) + ["", "## Goals", ""] + goals(results)
    out += [f"- note: {note}" for note in meta.get("notes", [])]
    for name, (title, render_table) in SECTIONS.items():
        section = results["scenarios"].get(name)
        if not section:
            continue
        out += ["", f"## {title}", ""]
        if section["rows"]:
            out.append(render_table(section["rows"]))
        if name == "proxy" and section["rows"]:
            out += ["", ratio_table(section["rows"])]
        out += [f"- **{f['target']} failed**: {f['error']}" for f in section["failures"]]
        out += [f"- {note}" for note in section["notes"]]
    if plots:
        out += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join(out) + "\n"


def write_report(results: dict, out: Path, plots: list[Path]) -> Path:
    path = out / "report.md"
    path.write_text(render(results, plots))
    return path


def summary(results: dict) -> str:
    """A one-screen summary for the terminal."""
    measured = [(s, t) for s, t in verdict(results) if s != "not measured"]
    lines = ["", "Goals:"]
    lines += [f"  {status:>6}  {text}" for status, text in measured]
    if len(measured) < len(verdict(results)):
        lines.append(f"  {'the others are' if measured else 'none here: the goals are'} "
                     f"{NOT_MEASURED}")
    proxy = results["scenarios"].get("proxy", {}).get("rows", [])
    if proxy:
        lines += ["", "Proxy, keep-alive (req/s, p99 ms, errors):"]
        for row in proxy:
            if row["keepalive"]:
                tag = " (ceiling)" if row.get("ceiling") else ""
                lines.append(f"  {row['target'] + tag:<20} c={row['connections']:<6} "
                             f"{row['rps']:>9.0f}  {_ms(row['latency_ms']['p99']):>8}  "
                             f"{row['error_total']}")
    for name, section in results["scenarios"].items():
        for failure in section["failures"]:
            lines.append(f"  {name}: {failure['target']} failed: {failure['error'][:150]}")
    return "\n".join(lines)
