"""The wrk generator: closed-loop load with a Lua report of exact figures.

Invariants: wrk runs as a registered child (stopped with the run), its run
time is bounded by ``duration + timeout + slack``, and a wrk that prints no
report is an error naming wrk, never a level of zeros.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

from loadtest.procs import Processes
from loadtest.results import level

SCRIPT = Path(__file__).with_name("wrk_report.lua")
MARK = "LOADTEST_JSON "


class WrkError(RuntimeError):
    """wrk failed or printed no report."""


def wrk_path() -> str | None:
    """The wrk binary, or None when it is not installed."""
    return shutil.which("wrk")


def wrk_argv(url: str, connections: int, duration: float, *, keepalive: bool,
             timeout: float, threads: int, host_header: str | None = None) -> list[str]:
    """The wrk command line for one level."""
    threads = max(1, min(threads, connections))
    argv = [wrk_path() or "wrk", "-t", str(threads), "-c", str(connections),
            "-d", f"{max(1, round(duration))}s", "--timeout", f"{timeout:g}s",
            "-s", str(SCRIPT)]
    if not keepalive:
        argv += ["-H", "Connection: close"]
    if host_header:
        argv += ["-H", f"Host: {host_header}"]
    return argv + [url]


def parse_report(output: str, *, connections: int, keepalive: bool) -> dict:
    """The level dict from wrk's output (WrkError if the report line is missing)."""
    for line in output.splitlines():
        if line.startswith(MARK):
            data = json.loads(line[len(MARK):])
            break
    else:
        raise WrkError(f"wrk printed no report: {output.strip()[-300:]}")
    errors = {"connect": data["connect"], "read": data["read"] + data["write"],
              "timeout": data["timeout"], "non2xx": data["status"]}
    latency = {"p50": data["p50_us"], "p90": data["p90_us"], "p99": data["p99_us"],
               "max": data["max_us"]}
    return level(generator="wrk", connections=connections, keepalive=keepalive,
                 duration_s=data["duration_us"] / 1e6, requests=data["requests"],
                 bytes_read=data["bytes"], latency_us=latency, errors=errors)


def run_wrk(procs: Processes, url: str, connections: int, duration: float, *,
            keepalive: bool = True, timeout: float = 5.0, threads: int | None = None,
            host_header: str | None = None) -> dict:
    """Run wrk once against `url` and return the level's figures."""
    threads = threads or os.cpu_count() or 1
    argv = wrk_argv(url, connections, duration, keepalive=keepalive, timeout=timeout,
                    threads=threads, host_header=host_header)
    name = f"wrk-c{connections}-{'ka' if keepalive else 'close'}"
    proc = procs.start(name, argv)
    try:
        proc.popen.wait(timeout=duration + timeout + 30)
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"wrk did not finish within {duration + timeout + 30:.0f}s") from exc
    finally:
        procs.stop(proc)
    output = proc.log_path.read_text(errors="replace")
    proc.log_path.unlink(missing_ok=True)
    return parse_report(output, connections=connections, keepalive=keepalive)
