"""The `balancer` command line: `balancer serve`."""

from __future__ import annotations

import argparse
import sys

from balancer.settings import Settings, SettingsError, add_flags, flag_values, load_settings


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="balancer",
        description="A gevent reverse proxy and HTTP load balancer with routes in Redis "
                    "or a local file, changed at runtime through a management API.")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = commands.add_parser(
        "serve", help="run the proxy and the management API",
        description="Run the proxy and the management API. Every setting also reads from "
                    "the TOML config file and BALANCER_<SECTION>_<KEY> environment variables "
                    "(flag > env > file > default).",
        epilog="Every setting, with its config key, environment variable and default: "
               "docs/settings.md in the source tree (an annotated config file: "
               "examples/balancer.toml). Signals: SIGHUP re-reads the settings, SIGTERM "
               "stops gracefully, SIGUSR1 reopens the access log.")
    serve.add_argument("--config", metavar="FILE", default=None,
                       help="TOML config file [env BALANCER_CONFIG]")
    add_flags(serve)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load_settings(flag_values(args), config_path=args.config)
    except SettingsError as exc:
        for problem in exc.problems:
            print(f"balancer: {problem}", file=sys.stderr)
        return 2
    from balancer.serve import serve

    def reload_settings() -> Settings:  # SIGHUP: the same flags, env and config file
        return load_settings(flag_values(args), config_path=args.config)

    return serve(settings, reload_settings)
