"""PNG plots of a run (matplotlib): requests/s, error rate and latency
percentiles against concurrency, one line per target (keep-alive rows)."""

from __future__ import annotations

from pathlib import Path

from loadtest.results import error_rate


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _series(rows: list[dict], keepalive: bool) -> dict[str, list[dict]]:
    series: dict[str, list[dict]] = {}
    for row in rows:
        if row.get("keepalive") == keepalive and not row.get("ceiling"):
            series.setdefault(row["target"], []).append(row)
    for points in series.values():
        points.sort(key=lambda r: r["connections"])
    return series


def sweep_plot(rows: list[dict], title: str, path: Path) -> Path | None:
    """Three panels (req/s, error %, p50/p99 latency) for keep-alive rows; None if no rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _series(rows, True)
    if not series:
        return None
    fig, (rps, err, lat) = plt.subplots(1, 3, figsize=(15, 4.5))
    for target, points in series.items():
        xs = [p["connections"] for p in points]
        rps.plot(xs, [p["rps"] for p in points], marker="o", label=target)
        err.plot(xs, [100 * error_rate(p) for p in points], marker="o", label=target)
        line = lat.plot(xs, [p["latency_ms"]["p99"] for p in points], marker="o",
                        label=f"{target} p99")[0]
        lat.plot(xs, [p["latency_ms"]["p50"] for p in points], marker="x", linestyle="--",
                 color=line.get_color(), label=f"{target} p50")
    for axis, label in ((rps, "requests/s"), (err, "errors, % of requests"),
                        (lat, "latency, ms (log)")):
        axis.set_xscale("log")
        axis.set_xlabel("concurrent keep-alive connections")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    lat.set_yscale("log")
    rps.legend()
    lat.legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def make_plots(results: dict, out: Path) -> list[Path]:
    """Every plot the results allow; returns the files written."""
    written = []
    titles = {"proxy": "Proxy: 4.5 KB page through each target",
              "wsgi": "WSGI: gevent pywsgi vs threaded wsgiref"}
    for name, title in titles.items():
        rows = results.get("scenarios", {}).get(name, {}).get("rows", [])
        path = sweep_plot(rows, title, out / f"{name}.png")
        if path:
            written.append(path)
    return written
