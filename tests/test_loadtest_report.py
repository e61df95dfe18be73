"""The load-test report and plots (issue 17): readable for a quick run as for a full one.

Results come from the recorded full run in docs/loadtest/ and from that run cut
down to one level, the shape `loadtest run --quick` produces."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from loadtest import plots, report
from tests.support import ROOT

FULL = ROOT / "docs" / "loadtest" / "full-2026-12-01" / "results.json"


def full_results() -> dict:
    return json.loads(FULL.read_text())


def quick_results() -> dict:
    """One level per sweep, no 10,000 idle connections: what a quick run measures."""
    results = copy.deepcopy(full_results())
    for name in ("proxy", "wsgi"):
        rows = results["scenarios"][name]["rows"]
        results["scenarios"][name]["rows"] = [r for r in rows if r["connections"] == 100]
    for row in results["scenarios"]["idle"]["rows"]:
        row["idle_connections"] = row["held"] = row["alive_after"] = 200
    return results


def test_quick_report_has_no_not_measured_noise() -> None:
    text = report.render(quick_results(), [])
    goals = text.split("## Goals")[1].split("\n## ")[0]
    assert "not measured" not in text
    assert goals.count("\n- ") == 1 and "Measured only at the full levels" in goals
    assert "without `--quick`" in goals and goals.count("; ") == 3
    summary = report.summary(quick_results())
    assert "not measured" not in summary
    assert "none here: the goals are measured only at the full levels" in summary
    cut = quick_results()
    cut["scenarios"]["proxy"]["rows"] = full_results()["scenarios"]["proxy"]["rows"]
    assert "the others are measured only" in report.summary(cut)  # idle still quick


def test_full_report_lists_every_goal_met() -> None:
    goals = report.render(full_results(), []).split("## Goals")[1].split("\n## ")[0]
    assert goals.count("- **met** — ") == 4 and "measured only" not in goals


def test_every_target_in_the_report_is_explained() -> None:
    text = report.render(quick_results(), [])
    section = text.split("## What is compared")[1].split("\n## ")[0]
    names = [line.split("`")[1] for line in section.splitlines() if line.startswith("- `")]
    assert names == ["direct", "direct (ceiling)", "gevent", "threaded", "haproxy", "nginx",
                     "gevent-wsgi", "threaded-wsgi"]
    assert "the ceiling every proxy is measured against" in section
    ceiling = next(line for line in section.splitlines() if "(ceiling)" in line)
    assert "the built-in generator" in ceiling  # the run's generator was wrk
    for row in quick_results()["scenarios"]["proxy"]["rows"]:
        label = row["target"] + (" (ceiling)" if row.get("ceiling") else "")
        assert f"`{label}`" in section


def _check_figure(fig, want_bars: bool) -> None:
    fig.canvas.draw()
    legend = fig.legends[0].get_window_extent()
    for axis in fig.axes:
        assert axis.get_ylim()[0] >= 0, f"{axis.get_ylabel()} goes below zero"
        assert axis.get_legend() is None
        box = axis.get_window_extent()
        assert legend.x0 >= box.x1, "the legend overlaps a panel"
        if want_bars:
            assert len(axis.patches) > 0 and not any(len(line.get_xdata()) > 2
                                                   for line in axis.lines)
        else:
            assert not axis.patches
            assert max(len(line.get_xdata()) for line in axis.lines) >= 3
    labels = [text.get_text() for text in fig.legends[0].get_texts()]
    assert labels[:5] == ["direct", "gevent", "threaded", "haproxy", "nginx"]


def test_quick_run_plots_are_bars_with_the_legend_outside() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig = plots.sweep_figure(quick_results()["scenarios"]["proxy"]["rows"], "proxy")
    try:
        assert len(fig.axes) == 6  # keep-alive and new connections, 3 panels each
        _check_figure(fig, want_bars=True)
        errors = [a for a in fig.axes if a.get_ylabel().startswith("errors")]
        assert all(a.get_ylim() == (0, 1.0) for a in errors)
        assert all("no errors" in [t.get_text() for t in a.texts] for a in errors)
    finally:
        plt.close(fig)


def test_full_run_plots_are_lines() -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    fig = plots.sweep_figure(full_results()["scenarios"]["proxy"]["rows"], "proxy")
    try:
        _check_figure(fig, want_bars=False)
    finally:
        plt.close(fig)


def test_make_plots_writes_pngs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    written = plots.make_plots(quick_results(), tmp_path)
    assert [p.name for p in written] == ["proxy.png", "wsgi.png"]
    assert all(p.stat().st_size > 10_000 for p in written)
