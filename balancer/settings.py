"""Settings: declared once in ``SETTINGS``, filled from defaults, file, env and flags.

Every setting is one ``Setting`` row (dotted name, kind, default, help, CLI
flag). Everything else is derived from the table: the TOML section and key,
the ``BALANCER_<SECTION>_<KEY>`` environment variable, the ``balancer serve``
flag and its help text. The result is a tree of frozen dataclasses that the
rest of the program only reads.

Invariants:

* precedence is flag > env > file > default, per setting;
* every value given by any source is validated, even one a higher source
  overrides, so a broken config file never hides behind a flag;
* every problem names the setting and its source,
  ``timeouts.backend_read (BALANCER_TIMEOUTS_BACKEND_READ): must be a number > 0, got 'abc'``,
  and all problems are reported together in one ``SettingsError``;
* defaults pass through the same validation as every other value.

The user's reference, docs/settings.md, is generated from ``SETTINGS``
(`balancer.settings_doc`): after adding or changing a row, run
``python -m balancer.settings_doc --write`` (tests/test_docs.py fails until then).
"""

from __future__ import annotations

import argparse
import os
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields

from balancer.addr import Address
from balancer.http11 import DEFAULT_LIMITS
from balancer.settings_kinds import (
    ACME_URL,
    ADDRESS,
    ADDRESS_LIST,
    BOOLEAN,
    CIPHER_LIST,
    EMAIL,
    HOST_NAMES,
    LETS_ENCRYPT,
    MOZILLA_INTERMEDIATE,
    NAME,
    NON_NEGATIVE,
    PEM_FILE,
    POSITIVE,
    TEXT,
    TOKEN,
    Account,
    Choice,
    Directory,
    Integer,
    Kind,
    Number,
    Rejected,
    SnapshotPath,
    StoreUrl,
)

ENV_PREFIX = "BALANCER_"
CONFIG_ENV = "BALANCER_CONFIG"
# BALANCER_URL and BALANCER_TOKEN belong to balancerctl; BALANCER_CONFIG names the file.
FOREIGN_ENV = frozenset({"BALANCER_URL", "BALANCER_TOKEN", CONFIG_ENV})
# `server.workers`' most. Bug: 100000 (a typo) bound a listening socket per worker until
# the descriptors ran out, and the error blamed server.listen; a few thousand forked
# that many processes.
MAX_WORKERS = 1024
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few KiB
# `dns.hold`'s most: RFC 8767 suggests 1 to 3 days for a resolver's stale answers;
# a proxy that goes on connecting to a name the DNS no longer has wants far less
DAY = 86400.0


class SettingsError(ValueError):
    """One or more bad settings; ``problems`` lists each, naming setting and source."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its dotted name, kind, default (in config-file form) and CLI flag."""

    name: str
    kind: Kind
    default: object
    help: str
    flag: str = ""
    flag_metavar: str = ""  # the flag's value in --help, when the kind's is too vague

    @property
    def metavar(self) -> str:
        return self.flag_metavar or self.kind.metavar

    @property
    def section(self) -> str:
        return self.name.partition(".")[0]

    @property
    def key(self) -> str:
        return self.name.partition(".")[2]

    @property
    def env(self) -> str:
        """The environment variable, ``BALANCER_<SECTION>_<KEY>``."""
        return f"{ENV_PREFIX}{self.section.upper()}_{self.key.upper()}"


SETTINGS: tuple[Setting, ...] = (
    Setting("server.listen", ADDRESS_LIST, ["127.0.0.1:8080"],
            "external listener address (repeatable)", "--listen"),
    Setting("server.internal_listen", ADDRESS_LIST, [],
            "trusted listener: incoming X-Forwarded-* extended, not replaced (repeatable)",
            "--internal-listen"),
    Setting("server.workers", Integer(0, MAX_WORKERS), 1, "worker processes, 0 = one per core",
            "--workers"),
    Setting("server.max_connections", Integer(1), 10000, "open client connections per worker"),
    Setting("server.reuseport", BOOLEAN, True,
            "with several workers, one listening socket per worker (SO_REUSEPORT: the "
            "kernel spreads new connections evenly; Linux only, elsewhere the workers "
            "share one socket); false: every worker accepts from one shared socket"),
    Setting("server.user", Account("user"), "", "user to switch to after binding"),
    Setting("server.group", Account("group"), "", "group to switch to after binding"),
    Setting("server.pages_dir", Directory(), "",
            "directory of NAME.html built-in page overrides (each at most 1 MiB)"),
    Setting("server.merge_pages", BOOLEAN, False,
            "let the kernel store the pages the balancer's processes hold alike once (KSM, "
            "Linux 6.4; inert unless the host runs ksmd: /sys/kernel/mm/ksm/run = 1); off: a "
            "process on the same host that also asked for it could tell by timing whether "
            "ours hold a page with the same bytes as one of its own"),
    Setting("management.listen", ADDRESS, "127.0.0.1:8081",
            "management API address", "--management"),
    Setting("management.token", TOKEN, "",
            "bearer token for the management API (visible ASCII): every route but /healthz and the "
            "dashboard's page and files (/, /static/*) needs it, /metrics included", "--token",
            "TOKEN"),
    Setting("management.apply_timeout", POSITIVE, 2.0,
            "seconds a write waits for every worker to serve it (202 past it)"),
    Setting("management.allowed_hosts", HOST_NAMES, [],
            "names the management API answers to in the Host header, besides its address"),
    Setting("store.url", StoreUrl(), "file:balancer-routes.json",
            "routing store: file:PATH, redis://, rediss://, unix:// or redis+sentinel:// URL",
            "--store"),
    Setting("store.namespace", NAME, "balancer", "key prefix in the store"),
    Setting("store.resync_interval", POSITIVE, 5.0, "seconds between store version checks"),
    Setting("store.snapshot", SnapshotPath(), "",
            'local copy of the last good table, served when the store is unreachable or '
            'lost at start: a path, "" for beside the routes file (file store) or '
            'balancer-NAMESPACE.last-good.json in the working directory (Redis), or "off" '
            '(a copy in the run directory is kept whatever this says: docs/stores.md)'),
    Setting("timeouts.client_header", POSITIVE, 10.0, "seconds to receive a request head"),
    Setting("timeouts.client_idle", POSITIVE, 75.0, "seconds a keep-alive client may idle"),
    Setting("timeouts.backend_connect", POSITIVE, 5.0, "seconds to connect to a backend"),
    Setting("timeouts.backend_read", POSITIVE, 60.0,
            "seconds between backend reads, and for each write of a request body"),
    Setting("timeouts.backend_idle", POSITIVE, 30.0,
            "seconds an idle pooled backend connection is kept (closed after)"),
    Setting("timeouts.tunnel_idle", POSITIVE, 3600.0, "seconds an upgraded tunnel may idle"),
    Setting("timeouts.graceful", POSITIVE, 30.0, "seconds to finish requests on shutdown"),
    Setting("timeouts.fail_timeout", POSITIVE, 10.0, "seconds a failed backend stays down"),
    Setting("timeouts.linger", NON_NEGATIVE, 30.0,
            "seconds at most that a connection closed after its response, while the "
            "client may still be sending, reads and discards what it sends so that the "
            "client reads the response before the close (lingering close); 0: close at once"),
    Setting("timeouts.linger_idle", POSITIVE, 5.0,
            "seconds without a byte from the client that end a lingering close"),
    Setting("timeouts.start", POSITIVE, 60.0,
            "seconds a new worker or management process (at start, after a crash, at a "
            "reload) has to say it serves; then it is killed and another started, while "
            "the one it replaces at a reload keeps serving"),
    Setting("limits.max_request_line", Integer(64), DEFAULT_LIMITS.max_request_line,
            "request line bytes (414 above)"),
    Setting("limits.max_header_bytes", Integer(1024), DEFAULT_LIMITS.max_header_bytes,
            "request head bytes (431 above)"),
    Setting("limits.max_headers", Integer(1), DEFAULT_LIMITS.max_headers,
            "request header count (431 above)"),
    Setting("limits.spin_max_waiting", Integer(1), 10000,
            "requests held by spin rules per worker (busy page above)"),
    Setting("limits.max_linger_bytes", Integer(0), 64 << 20,
            "bytes a lingering close reads and discards at most (the connection is "
            "then closed whatever still comes)"),
    Setting("tls.listen", ADDRESS_LIST, [],
            "HTTPS listener address (repeatable); certificates come from the store",
            "--tls-listen"),
    Setting("tls.default_host", TEXT, "",
            "certificate served when the client sends no SNI name or one with no "
            "certificate (\"\": such handshakes fail with unrecognized_name)"),
    Setting("tls.min_version", Choice("1.2", "1.3"), "1.2", "lowest TLS version accepted"),
    Setting("tls.ciphers", CIPHER_LIST, MOZILLA_INTERMEDIATE,
            "OpenSSL cipher list for TLS 1.2 (TLS 1.3 suites are OpenSSL's defaults); "
            "the default is Mozilla's \"intermediate\" list"),
    Setting("tls.refuse_domain_fronting", BOOLEAN, False,
            "answer 421 Misdirected Request to a request on a TLS connection whose Host "
            "has another certificate than the one its SNI name got (off: served by Host, "
            "as nginx)"),
    Setting("tls.backend_ca_bundle", PEM_FILE, "",
            "PEM file of the CAs that https:// backends' certificates are verified "
            "against (\"\": the system's CAs; a file replaces them)"),
    Setting("acme.directory", ACME_URL, LETS_ENCRYPT,
            "ACME directory URL of the CA that issues certificates for rules with "
            "\"tls\": \"acme\" (the default is Let's Encrypt's production CA)"),
    Setting("acme.email", EMAIL, "",
            "contact address of the ACME account (the CA's expiry and policy mail); "
            "\"\" for none"),
    Setting("acme.ca_bundle", PEM_FILE, "",
            "PEM file of the CAs trusted for the ACME directory's HTTPS "
            "(\"\": the system's); for a private or test CA"),
    Setting("acme.renew_before", Integer(1), 30,
            "days before a certificate's expiry when it is renewed"),
    Setting("acme.challenge", Choice("http-01", "tls-alpn-01"), "http-01",
            "how the CA checks a name: http-01 on the plain listeners (port 80), "
            "tls-alpn-01 on the TLS listeners (port 443)"),
    Setting("dns.hold", Number(zero=True, maximum=DAY), 30.0,
            "seconds the last good answer of a backend's host name stands in while its "
            "lookups fail or are late (serve-stale, HAProxy's hold); 0: never, a failed "
            "lookup fails the connection at once"),
    Setting("log.access_log", TEXT, "", 'access log: "" off, "-" stdout, or a path',
            "--access-log", "PATH|-"),
    Setting("log.access_format", Choice("combined", "json"), "combined", "access log format"),
    Setting("log.level", Choice("debug", "info", "warning", "error"), "info", "log level"),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}
BY_ENV: dict[str, Setting] = {s.env: s for s in SETTINGS}
SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(s.section for s in SETTINGS))


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listen: tuple[Address, ...]
    internal_listen: tuple[Address, ...]
    workers: int
    max_connections: int
    reuseport: bool
    user: str
    group: str
    pages_dir: str
    merge_pages: bool


@dataclass(frozen=True, slots=True)
class ManagementSettings:
    listen: Address
    token: str
    apply_timeout: float
    allowed_hosts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StoreSettings:
    url: str
    namespace: str
    resync_interval: float
    snapshot: str


@dataclass(frozen=True, slots=True)
class TimeoutSettings:
    client_header: float
    client_idle: float
    backend_connect: float
    backend_read: float
    backend_idle: float
    tunnel_idle: float
    graceful: float
    fail_timeout: float
    linger: float
    linger_idle: float
    start: float


@dataclass(frozen=True, slots=True)
class LimitSettings:
    max_request_line: int
    max_header_bytes: int
    max_headers: int
    spin_max_waiting: int
    max_linger_bytes: int


@dataclass(frozen=True, slots=True)
class TlsSettings:
    listen: tuple[Address, ...]
    default_host: str
    min_version: str
    ciphers: str
    refuse_domain_fronting: bool
    backend_ca_bundle: str


@dataclass(frozen=True, slots=True)
class AcmeSettings:
    directory: str
    email: str
    ca_bundle: str
    renew_before: int
    challenge: str


@dataclass(frozen=True, slots=True)
class DnsSettings:
    hold: float


@dataclass(frozen=True, slots=True)
class LogSettings:
    access_log: str
    access_format: str
    level: str


@dataclass(frozen=True, slots=True)
class Settings:
    """All settings, read-only. ``config_path`` is the file read, or ""."""

    server: ServerSettings
    management: ManagementSettings
    store: StoreSettings
    timeouts: TimeoutSettings
    limits: LimitSettings
    tls: TlsSettings
    acme: AcmeSettings
    dns: DnsSettings
    log: LogSettings
    config_path: str

    def effective_workers(self) -> int:
        """Worker processes to run: ``server.workers``, or one per core when it is 0."""
        return self.server.workers or os.cpu_count() or 1


SECTION_CLASSES: dict[str, type] = {
    "server": ServerSettings, "management": ManagementSettings, "store": StoreSettings,
    "timeouts": TimeoutSettings, "limits": LimitSettings, "tls": TlsSettings,
    "acme": AcmeSettings, "dns": DnsSettings, "log": LogSettings,
}


@dataclass(frozen=True, slots=True)
class _Given:
    """A raw value for a setting from one source."""

    setting: Setting
    raw: object
    source: str      # "default", the config file path, the env var or the flag
    is_text: bool    # True for env (always a string): parse it, don't type-check it


def load_settings(
    flags: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    config_path: str | None = None,
    reloading: bool = False,
) -> Settings:
    """Build ``Settings`` with precedence flag > env > file > default.

    ``flags`` maps dotted names (``"server.listen"``) to values; ``None`` means
    not given. A string is parsed like an env value; other values must have the
    config-file type (a list of strings for address lists). ``env`` defaults to
    ``os.environ``. The config file is ``config_path``, else ``$BALANCER_CONFIG``,
    else none; a file named either way must exist. ``reloading`` (SIGHUP) refuses
    an empty file: one caught while it is being written. Raises ``SettingsError``.
    """
    env = os.environ if env is None else env
    path = config_path or env.get(CONFIG_ENV, "")
    problems: list[str] = []
    given = [*_from_defaults(), *_from_file(path, problems, reloading),
             *_from_env(env, problems),
             *_from_flags(flags or {}, problems)]
    chosen: dict[str, tuple[object, str]] = {}
    for item in given:  # later sources override earlier ones
        try:
            value = item.setting.kind.parse(item.raw, item.is_text)
        except Rejected as exc:
            problems.append(f"{item.setting.name} ({item.source}): {exc}")
        else:
            chosen[item.setting.name] = (value, item.source)
    if not problems:
        problems.extend(_cross_check(chosen))
    if problems:
        raise SettingsError(problems)
    return _build({name: value for name, (value, _) in chosen.items()}, path)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add the settings that have a ``balancer serve`` flag to ``parser``.

    Each option stores under its dotted name with default ``None``; pass
    ``flag_values(args)`` to ``load_settings``.
    """
    for setting in SETTINGS:
        if not setting.flag:
            continue
        repeat = setting.kind is ADDRESS_LIST
        parser.add_argument(
            setting.flag, dest=setting.name, default=None,
            action="append" if repeat else "store", metavar=setting.metavar,
            help=f"{setting.help} [default {_shown(setting.default)}; env {setting.env}, "
                 f"file {setting.name}]",
        )


def _shown(default: object) -> str:
    """A default as ``--help`` shows it: a list's items, "none" for nothing."""
    if isinstance(default, list | tuple):
        return ", ".join(str(item) for item in default) or "none"
    return str(default) if default != "" else "none"


def flag_values(args: argparse.Namespace) -> dict[str, object]:
    """The settings given on the command line, as ``load_settings(flags=...)`` takes them."""
    values = vars(args)
    return {s.name: values[s.name] for s in SETTINGS if values.get(s.name) is not None}


def _from_defaults() -> Iterator[_Given]:
    for setting in SETTINGS:
        yield _Given(setting, setting.default, "default", is_text=False)


def _from_file(path: str, problems: list[str], reloading: bool) -> Iterator[_Given]:
    if not path:
        return
    data = _read_toml(path, problems, reloading)
    for section, table in data.items():
        if section not in SECTIONS and not isinstance(table, dict):
            problems.append(_outside_sections(section, path))
        elif section not in SECTIONS:
            problems.append(f"[{section}] ({path}): unknown section; sections are "
                            + ", ".join(SECTIONS))
        elif not isinstance(table, dict):
            problems.append(f"{section} ({path}): must be a table [{section}], got {table!r}")
        else:
            for key, raw in table.items():
                setting = _known(f"{section}.{key}", path, problems)
                if setting:
                    yield _Given(setting, raw, path, is_text=False)


def _outside_sections(key: str, path: str) -> str:
    """The problem of a key written before any section (`workers = 2`)."""
    homes = [name.split(".", 1)[0] for name in BY_NAME if name.split(".", 1)[1] == key]
    where = (" or ".join(f"[{home}]" for home in homes) if homes
             else "its section (sections are " + ", ".join(SECTIONS) + ")")
    return f"{key} ({path}): a setting outside any section; write it under {where}"


def _read_toml(path: str, problems: list[str], reloading: bool) -> dict:
    # imported here: an arbiter started without a config file never holds the
    # TOML parser (its memory is mapped by every child; docs/performance.md)
    import tomllib

    text = _config_text(path, problems)
    if text is None:
        return {}
    if reloading and not text.strip():
        # Bug: a SIGHUP that came while an editor or `cat >` had just truncated
        # the file reloaded every default: the token dropped, the workers changed.
        problems.append(f"config file {path}: empty (caught while it is being written?); "
                        "a reload takes a whole file: a comment line alone to go back "
                        "to every default")
        return {}
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        problems.append(f"config file {path}: invalid TOML: {exc}")
    return {}


def _config_text(path: str, problems: list[str]) -> str | None:
    """The file's text, or None with the problem noted. Only a regular file of at
    most `MAX_CONFIG_BYTES` is read, opened without blocking. Bug: a FIFO held the
    arbiter's reload (and its stop) until something wrote to it, and `/dev/zero`
    grew it without bound: a SIGTERM then went unanswered."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        problems.append(f"config file {path}: not found")
        return None
    except OSError as exc:
        problems.append(f"config file {path}: cannot read: {exc.strerror or exc}")
        return None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            problems.append(f"config file {path}: " + (
                "is a directory" if stat.S_ISDIR(mode) else
                "not a regular file (a FIFO, a socket or a device); name the file itself"))
            return None
        with open(fd, "rb", closefd=False) as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        problems.append(f"config file {path}: cannot read: {exc.strerror or exc}")
        return None
    finally:
        os.close(fd)
    if len(data) > MAX_CONFIG_BYTES:
        problems.append(f"config file {path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; "
                        "not a config file")
        return None
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        problems.append(f"config file {path}: invalid TOML: {exc}")
        return None


def _from_env(env: Mapping[str, str], problems: list[str]) -> Iterator[_Given]:
    # Only BALANCER_<SECTION>_* is ours: a container platform may define other
    # BALANCER_* variables (Kubernetes: BALANCER_SERVICE_HOST, BALANCER_PORT).
    section_prefixes = tuple(f"{ENV_PREFIX}{s.upper()}_" for s in SECTIONS)
    for var, text in sorted(env.items()):
        if var in FOREIGN_ENV or not var.startswith(section_prefixes):
            continue
        setting = BY_ENV.get(var)
        if setting:
            yield _Given(setting, text, var, is_text=True)
        else:
            problems.append(f"{var}: unknown setting{_suggest(var, BY_ENV)}")


def _from_flags(flags: Mapping[str, object], problems: list[str]) -> Iterator[_Given]:
    for name, raw in flags.items():
        setting = _known(name, "flag", problems)
        if setting and raw is not None:
            source = setting.flag or "flag"
            yield _Given(setting, raw, source, is_text=isinstance(raw, str))


def _known(name: str, source: str, problems: list[str]) -> Setting | None:
    setting = BY_NAME.get(name)
    if setting is None:
        problems.append(f"{name} ({source}): unknown setting{_suggest(name, BY_NAME)}")
    return setting


def _suggest(name: str, known: Mapping[str, Setting]) -> str:
    import difflib  # only for a mistake: never held by a running arbiter

    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _cross_check(chosen: Mapping[str, tuple[object, str]]) -> list[str]:
    """Problems that involve more than one setting, named after the one to change."""
    problems = []
    listen, listen_source = chosen["server.listen"]
    internal, _ = chosen["server.internal_listen"]
    tls, _ = chosen["tls.listen"]
    if not listen and not internal and not tls:
        problems.append(f"server.listen ({listen_source}): no listener; give at least one "
                        "address in server.listen, server.internal_listen or tls.listen")
    management, management_source = chosen["management.listen"]
    token, _ = chosen["management.token"]
    if not management.is_loopback and not token:
        # SPEC §5: the management API never listens beyond loopback unprotected.
        problems.append(f"management.listen ({management_source}): {management} is not a "
                        "loopback address; set management.token to expose the API there")
    problems.extend(_duplicate_addresses(chosen))
    return problems


def _duplicate_addresses(chosen: Mapping[str, tuple[object, str]]) -> list[str]:
    problems = []
    seen: dict[Address, str] = {}
    for name in ("server.listen", "server.internal_listen", "tls.listen",
                 "management.listen"):
        value, source = chosen[name]
        for addr in value if isinstance(value, tuple) else (value,):
            if addr.port != 0 and addr in seen:  # port 0 is a fresh port each time
                problems.append(f"{name} ({source}): {addr} is also used by {seen[addr]}")
            seen.setdefault(addr, name)
    return problems


def _build(values: Mapping[str, object], config_path: str) -> Settings:
    sections = {}
    for section, cls in SECTION_CLASSES.items():
        sections[section] = cls(**{f.name: values[f"{section}.{f.name}"] for f in fields(cls)})
    return Settings(**sections, config_path=config_path)
