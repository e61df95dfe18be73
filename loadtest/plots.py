"""PNG plots of a run (matplotlib): requests/s, errors and latency per target
and concurrency level, one row of panels per connection mode.

Invariants:
* Levels sit at evenly spaced positions labelled with their connection count.
  With fewer than `MIN_LINE_LEVELS` levels (a quick run has one) every panel
  is grouped bars, never single dots; with more, lines.
* No axis goes below zero; an error panel with no errors spans 0-1 %.
* Each target keeps one colour across panels and rows, and the legend sits
  outside the panels, so it never hides data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loadtest.results import error_rate

MIN_LINE_LEVELS = 3
MODES = ((True, "keep-alive"), (False, "a new connection per request"))
TITLES = {"proxy": "Proxy: a 4.5 KB page through each target",
          "wsgi": "WSGI: gevent pywsgi vs threaded wsgiref"}


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _series(rows: list[dict], keepalive: bool) -> dict[str, dict[int, dict]]:
    """target -> connections -> row, for one mode (generator ceiling rows left out)."""
    series: dict[str, dict[int, dict]] = {}
    for row in rows:
        if row.get("keepalive") == keepalive and not row.get("ceiling"):
            series.setdefault(row["target"], {})[row["connections"]] = row
    return series


def _panels(row: dict) -> tuple[float, float, float | None, float | None]:
    latency = row.get("latency_ms", {})
    return row["rps"], 100 * error_rate(row), latency.get("p50"), latency.get("p99")


def _draw_bars(axes: Any, series: dict[str, dict[int, dict]], levels: list[int],
               colors: dict[str, str]) -> None:
    rps, err, lat = axes
    width = 0.8 / len(series)
    for i, (target, points) in enumerate(series.items()):
        for j, level in enumerate(levels):
            if level not in points:
                continue
            x = j - 0.4 + width * (i + 0.5)
            value_rps, value_err, p50, p99 = _panels(points[level])
            rps.bar(x, value_rps, width, color=colors[target])
            err.bar(x, value_err, width, color=colors[target])
            if p99 is not None:
                lat.bar(x, p99, width, color=colors[target])
            if p50 is not None:
                lat.plot([x - width / 2, x + width / 2], [p50, p50], color="black", linewidth=1.5)


def _draw_lines(axes: Any, series: dict[str, dict[int, dict]], levels: list[int],
                colors: dict[str, str]) -> None:
    rps, err, lat = axes
    for target, points in series.items():
        xs = [j for j, level in enumerate(levels) if level in points]
        values = [_panels(points[levels[j]]) for j in xs]
        rps.plot(xs, [v[0] for v in values], marker="o", color=colors[target])
        err.plot(xs, [v[1] for v in values], marker="o", color=colors[target])
        lat.plot(xs, [v[3] for v in values], marker="o", color=colors[target])
        lat.plot(xs, [v[2] for v in values], marker="x", linestyle="--", color=colors[target])
    lat.set_yscale("log")


def _finish_axes(axes: Any, levels: list[int], mode: str, bars: bool) -> None:
    rps, err, lat = axes
    labels = ("requests/s", "errors, % of requests",
              "latency, ms: p99 " + ("bars, p50 black marks" if bars else "solid, p50 dashed"))
    for axis, label in zip(axes, labels, strict=True):
        axis.set_xticks(range(len(levels)), [f"{level:,}" for level in levels])
        axis.set_xlim(-0.6, len(levels) - 0.4)
        axis.set_xlabel(f"concurrent connections ({mode})")
        axis.set_ylabel(label)
        axis.grid(True, axis="y", alpha=0.3)
    rps.set_ylim(bottom=0)
    top = err.get_ylim()[1]
    err.set_ylim(0, max(1.0, top))
    if not any(line.get_ydata().any() for line in err.lines) and not any(
            patch.get_height() for patch in err.patches):
        err.text(0.5, 0.5, "no errors", transform=err.transAxes, ha="center", va="center",
                 color="gray")
    if bars:
        lat.set_ylim(bottom=0)


def sweep_plot(rows: list[dict], title: str, path: Path) -> Path | None:
    """Write `sweep_figure` to `path` (PNG); None if there are no rows."""
    import matplotlib.pyplot as plt

    fig = sweep_figure(rows, title)
    if fig is None:
        return None
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def sweep_figure(rows: list[dict], title: str) -> Any:
    """Requests/s, error % and latency per target and level; None if there are no rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    modes = [(keepalive, name) for keepalive, name in MODES if _series(rows, keepalive)]
    if not modes:
        return None
    targets = list(dict.fromkeys(r["target"] for r in rows if not r.get("ceiling")))
    colors = {target: f"C{i}" for i, target in enumerate(targets)}
    fig, grid = plt.subplots(len(modes), 3, figsize=(15, 4.2 * len(modes)), squeeze=False)
    styles = set()
    for axes, (keepalive, mode) in zip(grid, modes, strict=True):
        series = _series(rows, keepalive)
        levels = sorted({level for points in series.values() for level in points})
        bars = len(levels) < MIN_LINE_LEVELS
        (_draw_bars if bars else _draw_lines)(axes, series, levels, colors)
        _finish_axes(axes, levels, mode, bars)
        styles.add("bars" if bars else "lines")
    handles: list[Any] = [Patch(color=colors[t], label=t) for t in targets]
    if "bars" in styles:
        handles.append(Line2D([], [], color="black", linewidth=1.5, label="p50 latency"))
    if "lines" in styles:
        handles.append(Line2D([], [], color="gray", linestyle="--", marker="x",
                              label="p50 latency"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), title="target")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def make_plots(results: dict, out: Path) -> list[Path]:
    """Every plot the results allow; returns the files written."""
    written = []
    for name, title in TITLES.items():
        rows = results.get("scenarios", {}).get(name, {}).get("rows", [])
        path = sweep_plot(rows, title, out / f"{name}.png")
        if path:
            written.append(path)
    return written
