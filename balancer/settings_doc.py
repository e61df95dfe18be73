"""The settings reference, docs/settings.md, generated from the table in `balancer.settings`.

``python -m balancer.settings_doc`` prints it; ``--write`` replaces
docs/settings.md; ``--check`` exits 1 when the file differs from the table
(tests/test_docs.py runs the same comparison).

Invariants:
* Everything in the reference comes from ``SETTINGS``: a setting added to the
  table appears here with no other edit, and the test fails until the file
  is regenerated.
* The output is deterministic (table order, no dates).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from balancer.settings import CONFIG_ENV, SECTIONS, SETTINGS, Setting

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "settings.md"
REGENERATE = "python -m balancer.settings_doc --write"

HEADER = f"""# Settings reference

<!-- Generated from the SETTINGS table in balancer/settings.py by
     `{REGENERATE}`; do not edit by hand
     (tests/test_docs.py fails when this file and the table disagree). -->

Every setting can be given in three places; the first one found wins:

1. a `balancer serve` flag, for the settings that have one;
2. an environment variable `BALANCER_<SECTION>_<KEY>`;
3. the TOML config file named by `--config FILE` or `${CONFIG_ENV}`, key `KEY`
   in table `[SECTION]`;

and otherwise the default below. Every value given anywhere is checked, even
one a higher source overrides; a bad or unknown setting stops `balancer serve`
with status 2 and one line per problem naming the setting and where it came
from, e.g.
`balancer: timeouts.backend_read (BALANCER_TIMEOUTS_BACKEND_READ): must be a number > 0, got 'abc'`.
Settings are read once at start and again on `SIGHUP`
([operations.md](operations.md#signals)); every listen address,
`server.reuseport`, `server.user` and `server.group` need a restart (a reload
that changes one logs a warning and keeps the running value). The config file
is a regular file of at most 1 MiB: a FIFO, a socket, a device (`/dev/zero`)
or a larger file in its place is a bad setting, at start and on a reload,
never waited on or read whole. A reload that finds the file empty (an editor
or `cat >` caught between truncating and writing it) keeps the running
settings; a file of only a comment gives every default. So does a reload that
would leave the management API on a non-loopback address (kept until a
restart) without `management.token`.

Value forms: an `ADDR` is `host:port`, `[v6]:port` or `:port` (every IPv4
interface, as `0.0.0.0:port`; an IPv6 address listens for IPv6 alone, so
`[":80", "[::]:80"]` takes both). A list is a TOML array (`["127.0.0.1:8080", "[::1]:8080"]`),
a repeated flag, or commas in the environment variable
(`BALANCER_SERVER_LISTEN=127.0.0.1:8080,[::1]:8080`). Seconds may be
fractional. An annotated example file is
[examples/balancer.toml](../examples/balancer.toml).
"""


def render() -> str:
    """The whole reference as Markdown."""
    parts = [HEADER]
    for section in SECTIONS:
        rows = [s for s in SETTINGS if s.section == section]
        parts.append(f"\n## [{section}]\n\n"
                     "| key | default | value | environment variable | flag | what |\n"
                     "|---|---|---|---|---|---|\n")
        parts.extend(_row(s) for s in rows)
    return "".join(parts)


def _row(setting: Setting) -> str:
    flag = _escape(f"`{setting.flag} {setting.metavar}`") if setting.flag else ""
    cells = (f"`{setting.key}`", f"`{_toml(setting.default)}`", _escape(setting.kind.expected),
             f"`{setting.env}`", flag, _escape(setting.help))
    return "| " + " | ".join(cells) + " |\n"


def _toml(value: object) -> str:
    """A default as it would be written in the config file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    return str(value)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m balancer.settings_doc",
                                     description="Print, write or check docs/settings.md.")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"replace {DOC_PATH}")
    mode.add_argument("--check", action="store_true",
                      help="exit 1 when the file differs from the settings table")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DOC_PATH.write_text(text)
    elif args.check:
        current = DOC_PATH.read_text() if DOC_PATH.is_file() else ""
        if current != text:
            print(f"{DOC_PATH} is out of date; run: {REGENERATE}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
