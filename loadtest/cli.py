"""The `loadtest` command: ``loadtest run ...`` and ``loadtest preflight``.

`run` is a short list of named steps: parse options → prepare the run dir and
process registry → run each scenario (every failure recorded, none fatal) →
write report.md, results.json and plots → print the summary. An interrupt
(Ctrl-C, SIGTERM) stops every process, keeps the partial results and still
writes the report.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from loadtest import plots, report
from loadtest.limits import raise_nofile
from loadtest.preflight import preflight
from loadtest.procs import Interrupts, Processes
from loadtest.progress import Progress
from loadtest.scenarios import SCENARIOS
from loadtest.scenarios.common import REQUEST_TIMEOUT, RunEnv
from loadtest.store import Results
from loadtest.targets import PROXY_TARGETS, Lab, missing_tool
from loadtest.wrk import wrk_path

QUICK_DURATION = 1.0
QUICK_IDLE = 200
DEFAULT_DURATION = 10.0
DEFAULT_IDLE = 10000


def _csv(kind: str, choices: tuple[str, ...] | None = None):
    def parse(text: str) -> list:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {kind} list")
        if choices is None:
            try:
                values = [int(item) for item in items]
            except ValueError as exc:
                raise argparse.ArgumentTypeError(f"{kind}: not a number in {text!r}") from exc
            if min(values) < 1:
                raise argparse.ArgumentTypeError(f"{kind}: every level must be >= 1")
            return values
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(unknown)}; expected some of {', '.join(choices)}")
        return items
    return parse


def _checked(convert: Callable[[str], Any], valid: Callable[[Any], bool], expected: str
             ) -> Callable[[str], Any]:
    """An argparse type: `convert`ed text that is `valid`, else a usage error."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"not {expected}: {text!r}") from exc
        if not valid(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text}")
        return value
    return parse


# seconds (bug: "nan" and "inf" were taken) and a count (bug: -5 and 0 were taken)
_positive = _checked(float, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")
_count = _checked(int, lambda v: v >= 1, "an integer >= 1")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="loadtest", description="Benchmark the balancer "
                                  "against a threaded baseline, HAProxy and nginx on loopback.")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = commands.add_parser(
        "run", help="run scenarios and write a report",
        description="Start the backends, the targets and the load generator on 127.0.0.1, "
                    "run the scenarios and write report.md, results.json and PNG plots "
                    "into --out. Targets: direct (the backend alone: the ceiling), gevent "
                    "(the balancer), threaded (the same code, one OS thread per "
                    "connection), haproxy and nginx (when installed). Run `loadtest "
                    "preflight` first; docs/loadtest.md explains the scenarios and the "
                    "report.")
    run.add_argument("--scenario", action="append", choices=list(SCENARIOS), metavar="NAME",
                     help=f"scenario to run: {', '.join(SCENARIOS)} "
                          "(repeatable; default: all)")
    run.add_argument("--targets", type=_csv("target", PROXY_TARGETS), metavar="LIST",
                     help=f"comma-separated targets (default: {','.join(PROXY_TARGETS)})")
    run.add_argument("--concurrency", type=_csv("concurrency"), metavar="LIST",
                     help="comma-separated connection levels for proxy and wsgi "
                          "(default: proxy 100,1000,5000; wsgi 100,1000,5000,10000)")
    run.add_argument("--duration", type=_positive, metavar="SECONDS",
                     help="seconds per level (default 10)")
    run.add_argument("--out", type=Path, metavar="DIR", help="output dir "
                                              "(default: loadtest-results/<timestamp>/)")
    run.add_argument("--quick", action="store_true",
                     help="tiny levels, 1 s each: about 1.5 minutes with every target")
    run.add_argument("--idle-connections", type=_count, metavar="N",
                     help=f"idle connections in the idle scenario (default {DEFAULT_IDLE})")
    run.add_argument("--generator", choices=("auto", "wrk", "builtin"), default="auto",
                     help="load generator for closed-loop levels (default: wrk if installed)")
    commands.add_parser("preflight", help="check kernel settings and descriptor limits")
    return top


def choose_generator(wanted: str) -> str:
    if wanted == "wrk" and not wrk_path():
        raise SystemExit("loadtest: --generator wrk: wrk is not installed")
    if wanted == "auto":
        return "wrk" if wrk_path() else "builtin"
    return wanted


def available_targets(wanted: list[str], notes: list[str]) -> list[str]:
    """The wanted targets whose tools are installed; a missing tool is noted once."""
    found = []
    for name in wanted:
        problem = missing_tool(name)
        if problem:
            notes.append(f"{name} skipped: {problem}")
        else:
            found.append(name)
    return found


def build_env(args: argparse.Namespace, out: Path, procs: Processes,
              interrupts: Interrupts) -> RunEnv:
    notes: list[str] = []
    nofile, _ = raise_nofile()
    generator = choose_generator(args.generator)
    if generator == "builtin" and args.generator == "auto":
        notes.append("wrk is not installed: the built-in generator drives every level")
    targets = available_targets(args.targets or list(PROXY_TARGETS), notes)
    duration = args.duration or (QUICK_DURATION if args.quick else DEFAULT_DURATION)
    idle = args.idle_connections or (QUICK_IDLE if args.quick else DEFAULT_IDLE)
    if idle > nofile - 200:
        notes.append(f"idle connections cut from {idle} to {nofile - 200}: descriptor limit "
                     f"{nofile} (see loadtest preflight)")
        idle = nofile - 200
    lab = Lab(out, procs, nofile)
    if not plots.have_matplotlib():
        notes.append("matplotlib is not installed: plots skipped (install it with "
                     "pip install matplotlib, or the package with its loadtest extra)")
    meta = {"command": "loadtest " + shlex.join(sys.argv[1:]) if sys.argv else "loadtest run",
            "started": datetime.now().isoformat(timespec="seconds"),
            "machine": f"{os.cpu_count()} CPUs, {platform.platform()}, Python "
                       f"{platform.python_version()}, RLIMIT_NOFILE {nofile}",
            "generator": generator, "duration_s": duration,
            "request_timeout_s": REQUEST_TIMEOUT, "backend": lab.backend_kind,
            "targets": targets, "notes": notes}
    results = Results(out / "results.json", meta)
    return RunEnv(out=out, procs=procs, lab=lab, results=results, progress=Progress(1),
                  interrupts=interrupts,
                  targets=targets, levels=args.concurrency, duration=duration,
                  quick=args.quick, generator=generator, idle_connections=idle, notes=notes)


def run_scenarios(env: RunEnv, names: list[str]) -> None:
    modules = [SCENARIOS[name] for name in names]
    env.progress = Progress(sum(m.estimate(env) for m in modules))
    env.progress.start()
    try:
        for module in modules:
            module.run(env)
    finally:
        env.progress.close()


def finish(env: RunEnv, interrupted: bool) -> None:
    """Write plots and report.md from whatever was measured; print the summary."""
    data = env.results.data
    if interrupted:
        data["meta"]["notes"].append("interrupted: partial results")
    data["meta"]["finished"] = datetime.now().isoformat(timespec="seconds")
    env.results.save()
    written = plots.make_plots(data, env.out) if plots.have_matplotlib() else []
    path = report.write_report(data, env.out, written)
    print(report.summary(data))
    print(f"\nreport: {path}\nresults: {env.results.path}")


def out_problem(out: Path) -> str | None:
    """Make the output directory; why it cannot be written, or None. Bug: a file,
    or a directory that cannot be made, ended the run in a traceback."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot make the directory: {exc.strerror or exc}"
    if not os.access(out, os.W_OK | os.X_OK):
        return "cannot write in the directory"
    return None


def cmd_run(args: argparse.Namespace) -> int:
    # absolute: nginx and haproxy run with paths under it from their own prefixes
    # (bug: a relative --out made every nginx fail to open its error log)
    out = (args.out or Path("loadtest-results") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    problem = out_problem(out)
    if problem is not None:
        print(f"loadtest run: error: --out {out}: {problem}", file=sys.stderr)
        return 2
    interrupts = Interrupts()
    interrupts.install()
    procs = Processes(out / "logs")
    env = build_env(args, out, procs, interrupts)
    for note in env.notes:
        print(f"loadtest: {note}", file=sys.stderr)
    interrupted = False
    try:
        run_scenarios(env, args.scenario or list(SCENARIOS))
    except KeyboardInterrupt:
        interrupted = True
        print("\nloadtest: interrupted; stopping every process", file=sys.stderr)
    finally:
        procs.stop_all()
    interrupted = interrupted or bool(interrupts.received)
    finish(env, interrupted)
    return 130 if interrupted else 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `loadtest` console script."""
    args = parser().parse_args(argv)
    if args.command == "preflight":
        return preflight()
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
