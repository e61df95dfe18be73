"""The `balancer` command line: `balancer serve`.

Importing it imports little (argparse): `main` pauses the garbage collector
before the start-up's imports (the settings, the data plane: `balancer.preload`),
so it imports the rest itself. A collection during them visits every object
imported so far, again and again (the arbiter's collections: 37 M instructions
before, 26 M with its one collection, of ~700 M: docs/performance.md). The
first `balancer.preload.freeze`, before the first worker or management process
is forked (the start-up check's throwaway child runs with it off), collects
once and turns it on again; `main` turns it on again whatever happens before.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from typing import TYPE_CHECKING

from balancer.version import VersionAction

if TYPE_CHECKING:
    from balancer.settings import Settings


def parser() -> argparse.ArgumentParser:
    from balancer.settings import add_flags

    top = argparse.ArgumentParser(
        prog="balancer",
        description="A gevent reverse proxy and HTTP load balancer with routes in Redis "
                    "or a local file, changed at runtime through a management API.")
    top.add_argument("--version", action=VersionAction)
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve", help="run the proxy and the management API",
        description="Run the proxy and the management API. Every setting also reads from "
                    "the TOML config file and BALANCER_<SECTION>_<KEY> environment variables "
                    "(flag > env > file > default).",
        epilog="Every setting, with its config key, environment variable and default: "
               "docs/settings.md in the source tree (an annotated config file: "
               "examples/balancer.toml). Signals: SIGHUP re-reads the settings, SIGTERM "
               "and SIGINT stop gracefully (a second one, or SIGQUIT, stops now), "
               "SIGUSR1 reopens the access log (docs/operations.md#signals).")
    serve.add_argument("--config", metavar="FILE", default=None,
                       help="TOML config file [env BALANCER_CONFIG]")
    add_flags(serve)
    return top


STD_STREAMS = ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w"))


def keep_std_open() -> None:
    """Descriptors 0, 1 and 2 open, on /dev/null when they were closed, and
    `sys.stdin`/`stdout`/`stderr` set. Bug: started with stdout closed (``>&-``,
    a supervisor that closes it), `sys.stdout` was None and `balancer serve`
    died before serving; and with 1 or 2 closed the first file or socket the
    balancer opened took that number, so the operator log or the access log
    (``-``) would have been written into it."""
    for fd, name, mode in STD_STREAMS:
        try:
            os.fstat(fd)
        except OSError:  # closed: the lowest free number, since 0..fd-1 are open now
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 - for life


def main(argv: list[str] | None = None) -> int:
    gc.disable()  # until the first `freeze` (see the module's docstring)
    try:
        return run(argv)
    finally:
        gc.enable()


def run(argv: list[str] | None) -> int:
    keep_std_open()
    args = parser().parse_args(argv)
    from balancer.settings import SettingsError, flag_values, load_settings

    try:
        settings = load_settings(flag_values(args), config_path=args.config)
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"balancer: {problem}", file=sys.stderr)
        return 2
    from balancer.signal_queue import SignalQueue

    # before anything is made or anything slow runs: from here a signal waits for the
    # arbiter (until here, nothing to undo: its default action ends the process)
    signals = SignalQueue()
    from balancer.serve import serve

    def reload_settings() -> Settings:  # SIGHUP: the same flags, env and config file
        return load_settings(flag_values(args), config_path=args.config, reloading=True)

    return serve(settings, signals, reload_settings)
