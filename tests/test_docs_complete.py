"""The references are complete: what the product has, they show. Every flag of
each command's `--help` is in the README and docs/api.md, every key the rule
validator takes is in docs/rules.md, every setting in the example config,
every scenario and target of the load test in docs/loadtest.md; and what they
name exists: routes, settings, defaults (the other way round from
tests/test_docs.py, whose helpers these use)."""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path

from balancer import settings_doc
from balancer.settings import SETTINGS, load_settings
from tests.support import ROOT
from tests.test_docs import (
    DOCS,
    FLAG,
    PLACEHOLDERS,
    _blocks,
    _help,
    _subcommands_of,
    _synopsis,
)


def test_example_config_shows_every_setting():
    """examples/balancer.toml, "annotated", has each key in its section, set or
    commented out."""
    shown, section = set(), ""
    for line in (ROOT / "examples" / "balancer.toml").read_text().splitlines():
        if match := re.match(r"^#? ?\[(\w+)\]$", line):
            section = match.group(1)
        elif match := re.match(r"^#? ?(\w+) = ", line):
            shown.add(f"{section}.{match.group(1)}")
    keys = {f"{s.section}.{s.key}" for s in SETTINGS}
    assert keys <= shown, f"examples/balancer.toml lacks {sorted(keys - shown)}"
    assert shown <= keys, f"examples/balancer.toml has unknown keys {sorted(shown - keys)}"



def _flags_of(command: str, args: list[str]) -> set[str]:
    """The options ``COMMAND ARGS... --help`` lists (but --help)."""
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", _help(command, args))) - {"--help"}


def _commands_block() -> dict[str, str]:
    """The README's Commands block: each command's lines, joined."""
    joined: dict[str, str] = {}
    for _, command, words in _synopsis("README.md", next(
            block for lang, block in _blocks(ROOT / "README.md")
            if lang == "" and block.startswith("balancer serve"))):
        joined[command] = joined.get(command, "") + " " + " ".join(words)
    return joined


def test_readme_commands_block_has_every_flag() -> None:
    block = _commands_block()
    shown = {command: set(FLAG.findall(text)) for command, text in block.items()}
    wanted = {"balancer": _flags_of("balancer", ["serve"]),
              "loadtest": _flags_of("loadtest", ["run"]) | _flags_of("loadtest", ["preflight"]),
              "balancerctl": _flags_of("balancerctl", []).union(
                  *(_flags_of("balancerctl", [sub]) for sub in _subcommands_of("balancerctl")))}
    for command, flags in wanted.items():
        assert flags <= shown[command], (
            f"README Commands block: {command} lacks {sorted(flags - shown[command])}")


def test_balancerctl_reference_has_every_option_of_each_command() -> None:
    api = (ROOT / "docs" / "api.md").read_text().split("## balancerctl")[1]
    common = _flags_of("balancerctl", [])
    for name in ["--url", "--token", "--timeout", "--json"]:
        assert name in common and f"`{name}" in api, f"docs/api.md: balancerctl {name}"
    for sub in _subcommands_of("balancerctl"):
        nested = re.findall(rf"^\| `{sub} ([a-z]+)\b", api, re.M)
        for words in [[sub, n] for n in nested] or [[sub]]:
            row = next(line for line in api.splitlines()
                       if line.startswith(f"| `{' '.join(words)}"))
            cell = row.split("|")[1]
            missing = _flags_of("balancerctl", words) - common - set(FLAG.findall(cell))
            assert not missing, f"docs/api.md: balancerctl {' '.join(words)} lacks {missing}"


def test_serve_flags_are_the_settings_flags() -> None:
    """Each `balancer serve` option is a setting's flag (docs/settings.md's flag
    column), but --config, which names the file they are read from."""
    assert _flags_of("balancer", ["serve"]) == {s.flag for s in SETTINGS if s.flag} | {"--config"}
    text = " ".join(_help("balancer", ["serve"]).split()).replace("- ", "-")  # wrapped at "-"
    for setting in SETTINGS:
        if setting.flag:
            assert f"env {setting.env}, file {setting.section}.{setting.key}]" in text, setting


def test_loadtest_reference_has_every_scenario_and_target() -> None:
    from loadtest.cli import PROXY_TARGETS
    from loadtest.scenarios import SCENARIOS

    doc = (ROOT / "docs" / "loadtest.md").read_text()
    targets, scenarios = doc.split("## Scenarios")[0], doc.split("## Scenarios")[1]
    assert set(re.findall(r"^\| `([a-z]+)` \|", scenarios, re.M)) == set(SCENARIOS)
    assert set(re.findall(r"^\| `([a-z]+)` \|", targets, re.M)) == set(PROXY_TARGETS)


def test_api_reference_routes_all_exist() -> None:
    """The other way round from test_api_reference_documents_every_route: no row
    for a route the app does not have."""
    from management.app import URL_MAP

    routes: set[tuple[str, str]] = set()
    for rule in URL_MAP.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: PLACEHOLDERS[m.group(1)], rule.rule)
        routes |= {(method, path) for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}}
    table = (ROOT / "docs" / "api.md").read_text().split("## Routes")[1].split("\n## ")[0]
    docs_routes = set(re.findall(r"^\| `([A-Z]+) (/\S*)` \|", table, re.M))
    assert len(docs_routes) >= 25
    assert docs_routes <= routes, f"docs/api.md rows with no route: {docs_routes - routes}"


def _rows(text: str) -> set[str]:
    """The first cells, `KEY`, of a Markdown table's rows."""
    return set(re.findall(r"^\| `([\w-]+)` \|", text, re.M))


def test_rules_reference_has_every_key_the_validator_takes() -> None:
    """docs/rules.md has a row for each key of each action (in its section),
    of `limits` and each built-in page; `balancerctl set --help` names them."""
    from balancer.rules import ACTION_KEYS, COMMON_KEYS, HEALTH_KEYS, LIMIT_KEYS

    doc = (ROOT / "docs" / "rules.md").read_text()
    sections = {part.split("\n", 1)[0]: part for part in re.split(r"^##+ ", doc, flags=re.M)}
    for action, keys in ACTION_KEYS.items():
        assert _rows(sections[action]) == keys, f"docs/rules.md ### {action}"
    assert _rows(sections["Limits"]) == LIMIT_KEYS
    assert {key for key in COMMON_KEYS if not re.search(f'[`"]{key}[`"]', doc)} == set()
    health = next(line for line in sections["proxy"].splitlines() if line.startswith("| `health`"))
    assert all(f"`{key}`" in health or f"`GET {key}`" in health for key in HEALTH_KEYS)
    pages = {path.stem for path in (ROOT / "balancer" / "pages").glob("*.html")}
    assert _rows(sections["Built-in pages"]) == pages
    text = _help("balancerctl", ["set"])
    nested = {f"health.{k}" for k in HEALTH_KEYS} | {f"limits.{k}" for k in LIMIT_KEYS}
    for key in set().union(*ACTION_KEYS.values()) | (COMMON_KEYS - {"action", "limits"}) | nested:
        assert re.search(rf"(?<![\w.]){re.escape(key)}\b", text), f"balancerctl set --help: {key}"


# dotted names in the docs that are not settings: /api/v1/info's store fields
# and a file of the run directory
NOT_SETTINGS = {"store.problem", "store.certs_problem", "store.raised", "limits.shm"}


def test_settings_named_in_the_docs_exist() -> None:
    """A `section.key` the docs name is a setting (or a rule's `limits.KEY`, a
    module such as `management.metrics`, a name in a module such as
    `limits.reclaim`, or one of `NOT_SETTINGS`): a renamed setting leaves no
    stale name. performance.md is a dated log, left as written."""
    from balancer.rules import LIMIT_KEYS

    settings = {s.name for s in SETTINGS}
    sections = "|".join(sorted({s.section for s in SETTINGS}))
    stale = set()
    for path in DOCS:
        if path.name == "performance.md":
            continue
        for section, key in re.findall(rf"`({sections})\.([a-z_]+)`", path.read_text()):
            name = f"{section}.{key}"
            if name in settings | NOT_SETTINGS or key == "py" or (
                    section == "limits" and key in LIMIT_KEYS):
                continue
            if (ROOT / section / f"{key}.py").is_file() or _defines(f"balancer.{section}", key):
                continue
            stale.add(f"{path.relative_to(ROOT)}: {name}")
    assert not stale, sorted(stale)


def _defines(module: str, name: str) -> bool:
    """Whether `module` (a module of balancer/) exists and defines `name`."""
    path = ROOT / (module.replace(".", "/") + ".py")
    return path.is_file() and hasattr(importlib.import_module(module), name)


def test_settings_reference_defaults_are_what_a_config_file_gets(tmp_path: Path) -> None:
    """docs/settings.md's default column, each value pasted into a config file
    under its section, loads as the settings without a file do."""
    lines = []
    for part in re.split(r"^## ", settings_doc.DOC_PATH.read_text(), flags=re.M):
        if section := re.match(r"\[(\w+)\]", part):
            lines.append(f"[{section.group(1)}]")
            lines += [f"{key} = {value}" for key, value in
                      re.findall(r"^\| `(\w+)` \| `(.*?)` \|", part, re.M)]
    assert len(lines) == len(SETTINGS) + len({s.section for s in SETTINGS})
    config = tmp_path / "defaults.toml"
    config.write_text("\n".join(lines) + "\n")
    loaded = load_settings(env={}, config_path=str(config))
    assert dataclasses.replace(loaded, config_path="") == load_settings(env={})
