"""The benchmark scripts that need no outside programs still run (they are how
speed changes are measured, so they must not rot)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)

ROOT = Path(__file__).resolve().parent.parent


def test_bench_hotpath_proxies_every_scripted_request() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_hotpath.py"),
                          "--requests", "300"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    match = re.fullmatch(r"([\d.]+) µs per request \(best of 5 passes\)\n", out.stdout)
    assert match and float(match.group(1)) > 0
