"""The documentation stays true: the settings reference matches the table, every
command and flag the README and docs/ show exists (`--help` of each), every link
resolves, and the example config and systemd unit are usable."""

from __future__ import annotations

import contextlib
import functools
import io
import re
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from balancer import cli as balancer_cli
from balancer import settings_doc
from balancer.settings import SETTINGS, Setting, load_settings
from balancer.settings_kinds import POSITIVE
from loadtest import cli as loadtest_cli
from management import ctl
from tests.conftest import required_tool
from tests.support import ROOT

DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
COMMANDS: dict[str, Callable[[list[str]], object]] = {
    "balancer": balancer_cli.main, "balancerctl": ctl.main, "loadtest": loadtest_cli.main,
}
FENCE = re.compile(r"^```([a-z]*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)|<(https?://[^>\s]+)>")
FLAG = re.compile(r"--[a-z][a-z-]*")


# settings reference -------------------------------------------------------------

def test_settings_reference_matches_the_table():
    doc = settings_doc.DOC_PATH.read_text()
    assert doc == settings_doc.render(), (
        f"docs/settings.md differs from balancer/settings.py; run: {settings_doc.REGENERATE}")


def test_settings_reference_lists_every_setting_with_its_sources():
    doc = settings_doc.render()
    for setting in SETTINGS:
        section = doc.split(f"## [{setting.section}]")[1].split("\n## ")[0]
        row = next(line for line in section.splitlines() if line.startswith(f"| `{setting.key}` |"))
        assert f"`{setting.env}`" in row
        assert (setting.flag in row) if setting.flag else "--" not in row


def test_a_new_setting_reaches_the_reference_without_editing_it(monkeypatch):
    extra = Setting("timeouts.brand_new", POSITIVE, 2.5, "a setting added later", "--brand-new")
    monkeypatch.setattr(settings_doc, "SETTINGS", (*SETTINGS, extra))
    doc = settings_doc.render()
    assert ("| `brand_new` | `2.5` | a number > 0 | `BALANCER_TIMEOUTS_BRAND_NEW` | "
            "`--brand-new SECONDS` | a setting added later |") in doc
    assert doc != settings_doc.DOC_PATH.read_text()  # so the comparison above would fail


def test_settings_doc_check_mode(tmp_path, monkeypatch):
    assert settings_doc.main(["--check"]) == 0
    stale = tmp_path / "settings.md"
    stale.write_text("old\n")
    monkeypatch.setattr(settings_doc, "DOC_PATH", stale)
    assert settings_doc.main(["--check"]) == 1
    assert settings_doc.main(["--write"]) == 0
    assert stale.read_text() == settings_doc.render()


# examples -----------------------------------------------------------------------

def test_example_config_loads_with_its_values():
    settings = load_settings(env={}, config_path=str(ROOT / "examples" / "balancer.toml"))
    assert [str(a) for a in settings.server.listen] == ["0.0.0.0:80"]
    assert settings.store.url == "file:/var/lib/balancer/routes.json"
    assert settings.log.access_log == "/var/log/balancer/access.log"


def test_systemd_unit_runs_the_example_config(tmp_path):
    unit = (ROOT / "examples" / "balancer.service").read_text()
    start = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1).split()
    assert start[1:] == ["serve", "--config", "/etc/balancer/balancer.toml"]
    assert "--config" in _help("balancer", ["serve"])
    assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", unit, re.M)
    analyze = required_tool("systemd-analyze", "systemd")
    program = tmp_path / "balancer"
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    copy = tmp_path / "balancer-example.service"
    copy.write_text(unit.replace(start[0], str(program)))
    result = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True,
                            timeout=60)
    problems = [line for line in (result.stdout + result.stderr).splitlines()
                if copy.name in line]
    assert not problems and result.returncode == 0, result.stdout + result.stderr


def test_compose_services_reach_the_management_api_by_name():
    """A `balancerctl --url http://SERVICE:8081` of docker-compose.yml sends
    `Host: SERVICE`: the balancers must answer to that name (no Docker engine
    runs the file here, so its settings are checked as the balancer reads them)."""
    from management.guard import HostPolicy

    text = (ROOT / "docker-compose.yml").read_text()
    env = dict(re.findall(r"^ {4}(BALANCER_MANAGEMENT_[A-Z_]+): \"([^\"$]*)", text, re.M))
    env["BALANCER_MANAGEMENT_TOKEN"] = "a token"
    settings = load_settings(env=env)
    bound = settings.management.listen
    policy = HostPolicy(bound.host, settings.management.allowed_hosts)
    names = set(re.findall(r'"http://([a-z0-9-]+):8081"', text))
    assert names, "the compose file no longer calls the API by a service name"
    assert all(policy.allows(name) for name in names), (names, env)


# commands and flags ---------------------------------------------------------------

def _help(command: str, args: list[str]) -> str:
    """What ``COMMAND ARGS... --help`` prints (the console script's own main)."""
    return _help_of(command, tuple(args))


@functools.cache  # the docs show some commands dozens of times
def _help_of(command: str, args: tuple[str, ...]) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        COMMANDS[command]([*args, "--help"])
    assert exit_info.value.code == 0, f"{command} {' '.join(args)} --help failed"
    return out.getvalue()


def _blocks(path: Path) -> Iterator[tuple[str, str]]:
    for match in FENCE.finditer(path.read_text()):
        yield match.group(1), match.group(2)


def _shell_segments(block: str) -> Iterator[list[str]]:
    """Each simple command of a shell block, as words (comments and outputs dropped)."""
    text = block.replace("\\\n", " ")
    for line in text.splitlines():
        words = shlex.split(line, comments=True)
        segment: list[str] = []
        for word in [*words, ";"]:
            if word in ("&&", "||", ";", "|", "&"):
                if segment:
                    yield segment
                segment = []
            else:
                segment.append(word.rstrip(";&"))


def _program(words: list[str]) -> list[str]:
    """The words from the program on: leading ``VAR=value`` assignments dropped."""
    while words and re.match(r"^[A-Z_]+=", words[0]):
        words = words[1:]
    return words


def _commands_shown() -> Iterator[tuple[str, str, list[str]]]:
    """(where, command, words) for every balancer/balancerctl/loadtest/script call."""
    for path in DOCS:
        where = str(path.relative_to(ROOT))
        for lang, block in _blocks(path):
            if lang == "sh":
                for words in map(_program, _shell_segments(block)):
                    if words:
                        yield where, words[0], words[1:]
            elif lang == "" and block.lstrip().startswith("balancer serve"):
                yield from _synopsis(where, block)
        yield from _inline_commands(where, path)


def _inline_commands(where: str, path: Path) -> Iterator[tuple[str, str, list[str]]]:
    """Commands with flags in the prose's code spans (`loadtest run --scenario idle`)."""
    text = FENCE.sub("", path.read_text())
    for span in re.findall(r"`((?:balancer|balancerctl|loadtest) [^`]*)`", text):
        command, *words = span.split()
        if words[:1] != [] and words[0].islower() and any(FLAG.match(word) for word in words):
            yield where, command, words


def _synopsis(where: str, block: str) -> Iterator[tuple[str, str, list[str]]]:
    """The README's Commands block: each command with every word of its lines."""
    command, words = "", []
    for line in block.splitlines():
        if line[:1].strip():
            if command:
                yield where, command, words
            command, *words = line.split()
        else:
            words += line.split()
    if command:
        yield where, command, words


def test_readme_shows_the_set_up_and_the_new_commands():
    shown = {(command, tuple(words)) for where, command, words in _commands_shown()
             if where == "README.md"}
    assert ("sh", ("scripts/test.sh",)) in shown
    assert any(c == "pip" and "install" in w for c, w in shown)
    assert any(c == "balancer" and w[:1] == ("serve",) for c, w in shown)
    flags = {f for c, w in shown if c == "loadtest" for word in w for f in FLAG.findall(word)}
    assert {"--idle-connections", "--generator", "--quick"} <= flags


def test_serve_help_gives_each_flag_its_default_env_and_key():
    text = " ".join(_help("balancer", ["serve"]).split()).replace("- ", "-")  # wrapped at "-"
    for default, env, key in (("127.0.0.1:8080", "BALANCER_SERVER_LISTEN", "server.listen"),
                              ("127.0.0.1:8081", "BALANCER_MANAGEMENT_LISTEN",
                               "management.listen"),
                              ("file:balancer-routes.json", "BALANCER_STORE_URL", "store.url"),
                              ("1", "BALANCER_SERVER_WORKERS", "server.workers"),
                              ("none", "BALANCER_MANAGEMENT_TOKEN", "management.token")):
        assert f"[default {default}; env {env}, file {key}]" in text, key


def test_every_command_and_flag_shown_exists():
    shown = list(_commands_shown())
    helps = _scripts_help({words[0] for _, command, words in shown
                           if _script_flags(command, words)})
    checked = 0
    for where, command, words in shown:
        if command in COMMANDS:
            _check_command(where, command, words)
        elif _is_script_call(command, words):
            _check_script(where, words, helps)
        elif command == "sh" and words:
            assert (ROOT / words[0]).is_file(), f"{where}: {words[0]} does not exist"
        else:
            continue
        checked += 1
    assert checked >= 20


@functools.cache
def _is_subcommand(command: str, word: str) -> bool:
    """Whether ``COMMAND WORD --help`` works (argparse refuses an unknown command)."""
    if not re.fullmatch(r"[a-z][a-z-]*", word):
        return False
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            COMMANDS[command]([word, "--help"])
        except SystemExit as exit_info:
            return exit_info.code == 0
    return False


def _subcommands_of(command: str) -> list[str]:
    """The commands ``COMMAND --help`` lists (argparse's indented list)."""
    text = _help(command, [])
    return [w for w in re.findall(r"^    ([a-z][a-z-]*)", text, re.M) if _is_subcommand(command, w)]


def _check_command(where: str, command: str, words: list[str]) -> None:
    subcommands = [w for w in words if _is_subcommand(command, w)]
    top_level = words == ["--version"]  # the one option shown without a subcommand
    assert subcommands or top_level, f"{where}: {command} {' '.join(words)}: no known subcommand"
    helps = {sub: _help(command, [sub]) for sub in dict.fromkeys(subcommands)} or \
        {"": _help(command, [])}
    for word in words:
        for flag in FLAG.findall(word.split("=")[0]):
            assert any(re.search(rf"{flag}\b", text) for text in helps.values()), (
                f"{where}: {command} {' '.join(subcommands)} has no {flag} (see --help)")


def _is_script_call(command: str, words: list[str]) -> bool:
    return command in ("python", "python3") and words[:1] != [] and words[0].startswith("scripts/")


def _script_flags(command: str, words: list[str]) -> list[str]:
    """The flags a ``python scripts/NAME.py ...`` call shows (none for other commands)."""
    if not _is_script_call(command, words):
        return []
    return [f for w in words[1:] for f in FLAG.findall(w.split("=")[0])]


def _scripts_help(scripts: set[str]) -> dict[str, subprocess.CompletedProcess[str]]:
    """``python SCRIPT --help`` of each script that exists, all at once (each one
    imports what its benchmark needs: a second or two apiece, one after the other)."""
    started = {script: subprocess.Popen([sys.executable, str(ROOT / script), "--help"],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, cwd=ROOT)
               for script in sorted(scripts) if (ROOT / script).is_file()}
    helps = {}
    for script, proc in started.items():
        out, err = proc.communicate(timeout=60)
        helps[script] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return helps


def _check_script(where: str, words: list[str],
                  helps: dict[str, subprocess.CompletedProcess[str]]) -> None:
    script = ROOT / words[0]
    assert script.is_file(), f"{where}: {words[0]} does not exist"
    flags = _script_flags("python", words)
    if not flags:
        return
    result = helps[words[0]]
    assert result.returncode == 0, result.stderr
    for flag in flags:
        assert flag in result.stdout, f"{where}: {words[0]} has no {flag}"


def test_python_modules_shown_exist():
    for path in DOCS:
        for lang, block in _blocks(path):
            if lang != "sh":
                continue
            for words in map(_program, _shell_segments(block)):
                if words[:2] in (["python", "-m"], ["python3", "-m"]):
                    module = words[2]
                    where = ROOT / module.replace(".", "/")
                    assert module in ("pytest", "venv", "http.server") or (
                        where.with_suffix(".py").is_file()
                        or (where / "__main__.py").is_file()), f"{path.name}: no module {module}"


# links ------------------------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text as shown, lower-cased, without
    punctuation but `-` and `_`, spaces made `-`."""
    # a code span's text stays whole (`bench_proxy.py`: bench_proxypy); outside
    # one, emphasis marks go, a link's target goes, plain parentheses only lose
    # their brackets
    parts = re.split(r"(`[^`]*`)", heading.strip().lower())
    text = "".join(part[1:-1] if part.startswith("`") else
                   re.sub(r"\*|\]\(.*?\)|[\[\]]|(?<!\w)_+|_+(?!\w)", "", part) for part in parts)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_anchors_are_the_ones_github_makes():
    assert (_slug("2026-12-05: slow readers (`scripts/bench_slow_read.py`)")
            == "2026-12-05-slow-readers-scriptsbench_slow_readpy")
    assert _slug("In place: `spin` and `spin_when_down`") == "in-place-spin-and-spin_when_down"
    assert _slug("*Emphasis*, _too_ and [a link](x.md) (kept)") == "emphasis-too-and-a-link-kept"


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, re.M)}


def _links(path: Path) -> Iterator[str]:
    text = FENCE.sub("", path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)
    for match in LINK.finditer(text):
        yield match.group(1) or match.group(2)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(path):
    for link in _links(path):
        if re.match(r"^https?://", link):
            assert re.match(r"^https?://[\w.-]+(:\d+)?(/\S*)?$", link), link
            continue
        assert not link.startswith(("file:", "/")), f"{link}: use a relative link"
        target, _, anchor = link.partition("#")
        resolved = (path.parent / target).resolve() if target else path
        assert resolved.exists(), f"{path.name}: {link} does not exist"
        assert ROOT in resolved.parents or resolved == ROOT, f"{link} leaves the repository"
        if anchor:
            assert resolved.suffix == ".md", f"{path.name}: {link}: an anchor into a non-doc"
            assert anchor in _anchors(resolved), f"{path.name}: {link}: no such heading"


def test_docs_do_not_point_outside_the_repository():
    for path in DOCS:
        text = path.read_text()
        assert "shared/SPEC" not in text and "SPEC §" not in text, (
            f"{path.name} cites the internal spec, which users do not have")


def test_docs_are_all_linked_from_the_readme():
    readme = (ROOT / "README.md").read_text()
    for path in sorted((ROOT / "docs").glob("*.md")):
        assert f"(docs/{path.name})" in readme, f"README does not link docs/{path.name}"


# references complete -----------------------------------------------------------------

PLACEHOLDERS = {"host": "HOST", "address": "ADDR", "name": "FILE", "deploy_id": "ID"}


def test_api_reference_documents_every_route() -> None:
    from management.app import URL_MAP

    doc = (ROOT / "docs" / "api.md").read_text()
    for rule in URL_MAP.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", lambda m: PLACEHOLDERS[m.group(1)], rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            assert f"| `{method} {path}` |" in doc, f"docs/api.md has no row for {method} {path}"


def test_api_reference_documents_every_error_code() -> None:
    errors = (ROOT / "docs" / "api.md").read_text().split("## Errors")[1]
    found = set()
    for path in sorted((ROOT / "management").glob("*.py")):
        found |= set(re.findall(r'ApiError\(\s*(\d{3}),\s*"(\w+)"', path.read_text()))
    assert len(found) >= 10
    for status, code in sorted(found):
        assert f"| {status} | `{code}` |" in errors, f"docs/api.md: no error {status} {code}"


def test_every_balancerctl_command_is_documented() -> None:
    api = (ROOT / "docs" / "api.md").read_text().split("## balancerctl")[1]
    synopsis = next(block for lang, block in _blocks(ROOT / "README.md")
                    if lang == "" and block.startswith("balancer serve"))
    commands = _subcommands_of("balancerctl")
    assert {"list", "set", "reload"} <= set(commands)
    for command in commands:
        assert f"| `{command}" in api, f"docs/api.md: balancerctl {command} not in its table"
        assert re.search(rf"(\| | {{2}}){command}( |$)", synopsis, re.M), (
            f"README Commands block: no balancerctl {command}")


def test_every_metric_is_documented() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    source = (ROOT / "management" / "metrics.py").read_text()
    names = set(re.findall(r'"(balancer_[a-z_]+)"', source))
    assert len(names) >= 12
    for name in sorted(names):
        assert f"| `{name}` |" in doc, f"docs/metrics.md has no row for {name}"
