import argparse
import dataclasses
import os
import pwd

import pytest

from balancer.addr import Address
from balancer.settings import (
    SECTION_CLASSES,
    SETTINGS,
    Settings,
    SettingsError,
    add_flags,
    flag_values,
    load_settings,
)


def load(flags=None, env=None, config_path=None):
    return load_settings(flags=flags, env=env or {}, config_path=config_path)


def problems_of(**kwargs):
    with pytest.raises(SettingsError) as info:
        load(**kwargs)
    return info.value.problems


def one_problem(**kwargs):
    problems = problems_of(**kwargs)
    assert len(problems) == 1, problems
    return problems[0]


@pytest.fixture
def config(tmp_path):
    """Write a TOML config file and return its path."""

    def write(text):
        path = tmp_path / "balancer.toml"
        path.write_text(text)
        return str(path)

    return write


# -- defaults and the table -------------------------------------------------


def test_defaults_are_the_spec_defaults():
    s = load()
    assert s.server.listen == (Address("127.0.0.1", 8080),)
    assert s.server.internal_listen == ()
    assert (s.server.workers, s.server.max_connections) == (1, 10000)
    assert (s.server.user, s.server.group, s.server.pages_dir) == ("", "", "")
    assert s.management.listen == Address("127.0.0.1", 8081)
    assert s.management.token == ""
    assert s.store.url == "file:balancer-routes.json"
    assert s.store.namespace == "balancer"
    assert s.store.resync_interval == 5.0
    assert dataclasses.astuple(s.timeouts) == (10.0, 75.0, 5.0, 60.0, 30.0, 3600.0, 30.0, 10.0,
                                               30.0, 5.0, 60.0)
    assert dataclasses.astuple(s.limits) == (8192, 65536, 100, 10000, 64 << 20)
    assert dataclasses.astuple(s.log) == ("", "combined", "info")
    assert s.dns.hold == 30.0
    assert dataclasses.astuple(s.acme) == (
        "https://acme-v02.api.letsencrypt.org/directory", "", "", 30, "http-01")
    assert s.config_path == ""


def test_acme_settings_from_the_file(config, tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
    path = config(f'[acme]\ndirectory = "http://127.0.0.1:14000/dir"\nemail = "ops@example.com"'
                  f'\nca_bundle = "{bundle}"\nrenew_before = 20\nchallenge = "tls-alpn-01"\n')
    acme = load(config_path=path).acme
    assert dataclasses.astuple(acme) == ("http://127.0.0.1:14000/dir", "ops@example.com",
                                         str(bundle), 20, "tls-alpn-01")


def test_every_dataclass_field_is_declared_once_in_the_table():
    declared = [s.name for s in SETTINGS]
    assert len(declared) == len(set(declared))
    fields = [f"{section}.{f.name}" for section, cls in SECTION_CLASSES.items()
              for f in dataclasses.fields(cls)]
    assert sorted(fields) == sorted(declared)
    assert [f.name for f in dataclasses.fields(Settings)][:-1] == list(SECTION_CLASSES)


def test_env_names_are_derived_from_the_setting_name():
    env = {s.name: s.env for s in SETTINGS}
    assert env["timeouts.backend_read"] == "BALANCER_TIMEOUTS_BACKEND_READ"
    assert env["server.internal_listen"] == "BALANCER_SERVER_INTERNAL_LISTEN"


def test_a_dns_hold_from_0_to_a_day():
    assert load(env={"BALANCER_DNS_HOLD": "0"}).dns.hold == 0.0
    assert load(env={"BALANCER_DNS_HOLD": "86400"}).dns.hold == 86400.0


def test_linger_zero_turns_lingering_close_off():
    assert load(env={"BALANCER_TIMEOUTS_LINGER": "0"}).timeouts.linger == 0.0
    assert load(env={"BALANCER_LIMITS_MAX_LINGER_BYTES": "0"}).limits.max_linger_bytes == 0


def test_settings_are_frozen():
    s = load()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.server.workers = 3  # type: ignore[misc]


def test_effective_workers(monkeypatch):
    s = load()
    assert s.effective_workers() == 1
    zero = load(flags={"server.workers": 0})
    assert zero.effective_workers() == (os.cpu_count() or 1)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert zero.effective_workers() == 1


# -- sources and precedence -------------------------------------------------


def test_file_values(config):
    path = config("""
[server]
listen = ["127.0.0.1:9000", "[::1]:9000"]
internal_listen = [":9100"]
workers = 4
[timeouts]
backend_read = 2
client_idle = 1.5
[log]
access_format = "json"
""")
    s = load(config_path=path)
    assert s.server.listen == (Address("127.0.0.1", 9000), Address("::1", 9000))
    assert s.server.internal_listen == (Address("0.0.0.0", 9100),)
    assert s.server.workers == 4
    assert s.timeouts.backend_read == 2.0 and isinstance(s.timeouts.backend_read, float)
    assert s.timeouts.client_idle == 1.5
    assert s.log.access_format == "json"
    assert s.config_path == path


def test_env_values():
    s = load(env={
        "BALANCER_TIMEOUTS_BACKEND_READ": "1.5",
        "BALANCER_SERVER_LISTEN": "127.0.0.1:8080, [::1]:8080",
        "BALANCER_SERVER_WORKERS": "3",
        "BALANCER_LIMITS_MAX_HEADERS": "50",
        "BALANCER_MANAGEMENT_TOKEN": "s3cret",
    })
    assert s.timeouts.backend_read == 1.5
    assert s.server.listen == (Address("127.0.0.1", 8080), Address("::1", 8080))
    assert s.server.workers == 3
    assert s.limits.max_headers == 50
    assert s.management.token == "s3cret"


def test_env_empty_list_means_no_addresses():
    s = load(env={"BALANCER_SERVER_INTERNAL_LISTEN": "", "BALANCER_SERVER_LISTEN": ":0"})
    assert s.server.internal_listen == ()


def test_flag_values_text_and_typed():
    s = load(flags={
        "server.listen": ["127.0.0.1:1", "127.0.0.1:2"],
        "server.workers": "2",
        "server.max_connections": 50,
        "timeouts.backend_read": 0.25,
        "log.access_log": "-",
        "store.url": None,
    })
    assert s.server.listen == (Address("127.0.0.1", 1), Address("127.0.0.1", 2))
    assert s.server.workers == 2
    assert s.server.max_connections == 50
    assert s.timeouts.backend_read == 0.25
    assert s.log.access_log == "-"
    assert s.store.url == "file:balancer-routes.json"


def test_precedence_flag_over_env_over_file_over_default(config):
    path = config("[timeouts]\nbackend_read = 3.0\n")
    env = {"BALANCER_TIMEOUTS_BACKEND_READ": "2.0"}
    flags = {"timeouts.backend_read": "1.0"}
    assert load(flags=flags, env=env, config_path=path).timeouts.backend_read == 1.0
    assert load(env=env, config_path=path).timeouts.backend_read == 2.0
    assert load(config_path=path).timeouts.backend_read == 3.0
    assert load().timeouts.backend_read == 60.0


def test_precedence_is_per_setting(config):
    path = config("[server]\nworkers = 5\nmax_connections = 7\n")
    s = load(flags={"server.workers": "6"}, config_path=path)
    assert (s.server.workers, s.server.max_connections) == (6, 7)


def test_config_path_from_env(config):
    path = config("[server]\nworkers = 9\n")
    s = load(env={"BALANCER_CONFIG": path})
    assert s.server.workers == 9 and s.config_path == path


def test_config_path_argument_wins_over_env(config, tmp_path):
    path = config("[server]\nworkers = 9\n")
    other = tmp_path / "other.toml"
    other.write_text("[server]\nworkers = 2\n")
    assert load(env={"BALANCER_CONFIG": str(other)}, config_path=path).server.workers == 9


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("BALANCER_LOG_LEVEL", "debug")
    assert load_settings().log.level == "debug"


def test_foreign_env_is_ignored():
    s = load(env={
        "BALANCER_URL": "http://x", "BALANCER_TOKEN": "t",
        "BALANCER_SERVICE_HOST": "10.0.0.1", "BALANCER_PORT": "tcp://10.0.0.1:80",
        "balancer_server_workers": "nonsense", "OTHER": "1",
    })
    assert s == load()


def test_argparse_flags_round_trip():
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_flags(parser)
    args = parser.parse_args(["--listen", "127.0.0.1:1", "--listen", "[::1]:2",
                              "--workers", "3", "--store", "redis://h:6379/0",
                              "--config", "x.toml"])
    flags = flag_values(args)
    assert flags == {"server.listen": ["127.0.0.1:1", "[::1]:2"], "server.workers": "3",
                     "store.url": "redis://h:6379/0"}
    s = load(flags=flags)
    assert s.server.listen == (Address("127.0.0.1", 1), Address("::1", 2))
    assert s.store.url == "redis://h:6379/0"
    assert "BALANCER_SERVER_WORKERS" in parser.format_help()


def test_spec_flags_exist():
    flags = {s.flag for s in SETTINGS if s.flag}
    assert flags == {"--listen", "--internal-listen", "--management", "--store",
                     "--workers", "--token", "--access-log", "--tls-listen"}


# -- the config file --------------------------------------------------------


def test_missing_explicit_config_file(tmp_path):
    path = str(tmp_path / "nope.toml")
    assert one_problem(config_path=path) == f"config file {path}: not found"
    assert one_problem(env={"BALANCER_CONFIG": path}) == f"config file {path}: not found"


def test_config_file_is_a_directory(tmp_path):
    assert "is a directory" in one_problem(config_path=str(tmp_path))


def test_config_file_that_is_a_device_is_refused_unread():
    """At start as at a reload (`balancer serve --config /dev/zero` read without end)."""
    assert "not a regular file" in one_problem(config_path="/dev/zero")


def test_invalid_toml(config):
    path = config("[server\nworkers = 1\n")
    problem = one_problem(config_path=path)
    assert problem.startswith(f"config file {path}: invalid TOML:")
    assert "line 1" in problem


def test_unknown_section_and_key(config):
    path = config("[servr]\nworkers = 1\n[timeouts]\nbackend_reed = 1.0\n")
    problems = problems_of(config_path=path)
    assert problems[0].startswith(f"[servr] ({path}): unknown section")
    assert problems[1] == (f"timeouts.backend_reed ({path}): unknown setting "
                           "(did you mean timeouts.backend_read?)")


def test_top_level_key_is_not_a_section(config):
    path = config('listen = "127.0.0.1:1"\n')
    assert one_problem(config_path=path) == (
        f"listen ({path}): a setting outside any section; "
        "write it under [server] or [management] or [tls]")
    path = config("workers = 2\n")
    assert one_problem(config_path=path) == (
        f"workers ({path}): a setting outside any section; write it under [server]")
    path = config("wrkers = 2\n")
    assert one_problem(config_path=path).startswith(
        f"wrkers ({path}): a setting outside any section; write it under its section "
        "(sections are server, ")
    path = config('server = 3\n')
    assert one_problem(config_path=path) == f"server ({path}): must be a table [server], got 3"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('[timeouts]\nbackend_read = "5"',
         "timeouts.backend_read ({}): must be a number > 0, got '5'"),
        ("[server]\nworkers = true",
         "server.workers ({}): must be an integer from 0 to 1024, got True"),
        ("[server]\nworkers = 1.5",
         "server.workers ({}): must be an integer from 0 to 1024, got 1.5"),
        ('[server]\nlisten = "127.0.0.1:1"',
         "server.listen ({}): must be a list of addresses, got '127.0.0.1:1': a TOML array, "
         '["127.0.0.1:1"]'),
        ("[server]\nlisten = [8080]",
         "server.listen ({}): must be a list of address strings, got [8080]"),
        ("[management]\ntoken = 1234", "management.token ({}): must be a string, got 1234"),
        ("[log]\nlevel = 1", "log.level ({}): must be one of debug, info, warning, error, got 1"),
    ],
)
def test_wrong_type_in_file(config, line, problem):
    path = config(line + "\n")
    assert one_problem(config_path=path) == problem.format(path)


# -- validation of every kind of value ----------------------------------------


@pytest.mark.parametrize(
    ("var", "text", "expected"),
    [
        ("BALANCER_TIMEOUTS_BACKEND_READ", "abc", "must be a number > 0, got 'abc'"),
        ("BALANCER_TIMEOUTS_CLIENT_HEADER", "0", "must be a number > 0, got '0'"),
        ("BALANCER_TIMEOUTS_CLIENT_IDLE", "-1", "must be a number > 0, got '-1'"),
        ("BALANCER_TIMEOUTS_GRACEFUL", "nan", "must be a number > 0, got 'nan'"),
        ("BALANCER_TIMEOUTS_TUNNEL_IDLE", "inf", "must be a number > 0, got 'inf'"),
        ("BALANCER_TIMEOUTS_BACKEND_CONNECT", "", "must be a number > 0, got ''"),
        ("BALANCER_TIMEOUTS_FAIL_TIMEOUT", "0.0", "must be a number > 0, got '0.0'"),
        ("BALANCER_STORE_RESYNC_INTERVAL", "0", "must be a number > 0, got '0'"),
        ("BALANCER_TIMEOUTS_LINGER", "-1", "must be a number >= 0, got '-1'"),
        ("BALANCER_TIMEOUTS_LINGER", "inf", "must be a number >= 0, got 'inf'"),
        ("BALANCER_TIMEOUTS_LINGER_IDLE", "0", "must be a number > 0, got '0'"),
        ("BALANCER_DNS_HOLD", "-1", "must be a number from 0 to 86400, got '-1'"),
        ("BALANCER_DNS_HOLD", "nan", "must be a number from 0 to 86400, got 'nan'"),
        ("BALANCER_DNS_HOLD", "inf", "must be a number from 0 to 86400, got 'inf'"),
        ("BALANCER_DNS_HOLD", "86400.5", "must be a number from 0 to 86400, got '86400.5'"),
        ("BALANCER_DNS_HOLD", "1e300", "must be a number from 0 to 86400, got '1e300'"),
        ("BALANCER_DNS_HOLD", "30s", "must be a number from 0 to 86400, got '30s'"),
        ("BALANCER_LIMITS_MAX_LINGER_BYTES", "-1",
         "must be an integer from 0 to 2147483647, got '-1'"),
        ("BALANCER_SERVER_WORKERS", "-1", "must be an integer from 0 to 1024, got '-1'"),
        ("BALANCER_SERVER_WORKERS", "two", "must be an integer from 0 to 1024, got 'two'"),
        ("BALANCER_SERVER_WORKERS", "100000", "must be an integer from 0 to 1024, got '100000'"),
        ("BALANCER_SERVER_MAX_CONNECTIONS", "0",
         "must be an integer from 1 to 2147483647, got '0'"),
        ("BALANCER_LIMITS_MAX_REQUEST_LINE", "63",
         "must be an integer from 64 to 2147483647, got '63'"),
        ("BALANCER_LIMITS_MAX_HEADER_BYTES", "1023",
         "must be an integer from 1024 to 2147483647, got '1023'"),
        ("BALANCER_LIMITS_MAX_HEADERS", "0", "must be an integer from 1 to 2147483647, got '0'"),
        ("BALANCER_LIMITS_MAX_HEADERS", "100000000000000000000",
         "must be an integer from 1 to 2147483647, got '100000000000000000000'"),
        ("BALANCER_LIMITS_SPIN_MAX_WAITING", "1.5",
         "must be an integer from 1 to 2147483647, got '1.5'"),
        ("BALANCER_LOG_ACCESS_FORMAT", "common", "must be one of combined, json, got 'common'"),
        ("BALANCER_LOG_LEVEL", "INFO", "must be one of debug, info, warning, error, got 'INFO'"),
        ("BALANCER_STORE_NAMESPACE", "", "must be a non-empty name without spaces, got ''"),
        ("BALANCER_STORE_NAMESPACE", "my ns", "must be a non-empty name without spaces"),
        ("BALANCER_STORE_URL", "http://x", "must be a store URL"),
        ("BALANCER_STORE_URL", "redis:x", "must be a store URL"),
        ("BALANCER_STORE_URL", "file:", "must be a store URL"),
        ("BALANCER_STORE_URL", "balancer-routes.json", "must be a store URL"),
        ("BALANCER_STORE_URL", "redis://:secret@127.0.0.1:6379/O",
         "the database after the host must be a number (redis://host:port/DB), got 'O', "
         "in 'redis://:***@127.0.0.1:6379/O'"),
        ("BALANCER_STORE_URL", "rediss://h:6380/one?ssl_cert_reqs=none",
         "must be a number (redis://host:port/DB), got 'one'"),
        ("BALANCER_STORE_URL", "redus://:secret@h:1/0", "got 'redus://:***@h:1/0'"),
        ("BALANCER_STORE_URL", "redis://:secret@h:1/0?replicas=nan",
         "replicas must be a whole number from 1 to 100, got 'nan', "
         "in 'redis://:***@h:1/0?replicas=nan'"),
        ("BALANCER_STORE_URL", "redis://:secret@h:1/0?replica=1",  # a typo of replicas
         "unknown option replica (the balancer's own are replicas= and wait=), "
         "in 'redis://:***@h:1/0?replica=1'"),
        ("BALANCER_STORE_URL", "unix:///r.sock?db=2&Replicas=1&foo=",
         "unknown options Replicas, foo"),
        ("BALANCER_STORE_URL", "redis://h:1/0?socket_timeout=soon",
         "Invalid value for 'socket_timeout' in connection URL"),
        # probe-control: redis-py lets a URL's option win over the balancer's own (a
        # timeout of -1 crash-looped every worker; 1e300 let a stalled Redis hang each
        # command), and takes values it then fails every command with
        ("BALANCER_STORE_URL", "redis://h:1/0?socket_timeout=-1",
         "socket_timeout cannot be given: the balancer sets its own (every Redis command "
         "times out after 2 s"),
        ("BALANCER_STORE_URL", "rediss://h:1/0?socket_connect_timeout=1e300",
         "socket_connect_timeout cannot be given"),
        # (review-control: as the decoding and the retries, which failed every command
        # with an error not Redis's: LookupError, AttributeError)
        ("BALANCER_STORE_URL", "redis://h:1/0?encoding_errors=bogus",
         "encoding_errors cannot be given: the balancer sets its own (answers are read as "
         "UTF-8, and bytes that are not reach the store's checks: docs/stores.md)"),
        ("BALANCER_STORE_URL", "unix:///r.sock?retry=x&encoding=utf-16&decode_responses=1",
         "decode_responses, encoding, retry cannot be given: the balancer sets its own "
         "(answers are read as UTF-8, and bytes that are not reach the store's checks; "
         "the store decides what is tried again: docs/stores.md)"),
        # (and the options redis-py takes as objects, not text: every command failed
        # with a TypeError or AttributeError, the last one the URL's check itself)
        ("BALANCER_STORE_URL", "redis://h:1/0?socket_keepalive=1&socket_keepalive_options=x",
         "socket_keepalive_options cannot be given in a URL's query (redis-py takes it "
         "from code or from the URL itself, not as text)"),
        ("BALANCER_STORE_URL", "rediss://h:1/0?maint_notifications_config=x&credential_provider=y",
         "credential_provider, maint_notifications_config cannot be given in a URL's query"),
        # (the parser, the balancer's: it bounds each answer, stores5)
        ("BALANCER_STORE_URL", "redis://h:1/0?parser_class=y",
         "parser_class cannot be given: the balancer sets its own (an answer is bounded"),
        ("BALANCER_STORE_URL", "unix:///r.sock?protocol=9", "protocol must be 2 or 3, got 9"),
        ("BALANCER_STORE_URL", "redis://h:1/0?socket_read_size=0",
         "socket_read_size must be a whole number of bytes >= 1, got 0"),
        ("BALANCER_STORE_URL", "redis://h:1/0?replicas=1&health_check_interval=-5",
         "health_check_interval must be a whole number of seconds >= 0, got -5"),
        ("BALANCER_STORE_URL", "redis+sentinel://h:1/mm/0?replicas=1&wait=99999",
         "wait must be a whole number from 1 to 10000 milliseconds, got '99999'"),
        ("BALANCER_SERVER_LISTEN", "127.0.0.1", "invalid address '127.0.0.1': missing ':port'"),
        ("BALANCER_SERVER_LISTEN", "127.0.0.1:1,", "invalid address '': missing ':port'"),
        ("BALANCER_SERVER_INTERNAL_LISTEN", "[::1]:99999", "port must be 0..65535, got 99999"),
        ("BALANCER_MANAGEMENT_LISTEN", "nohost", "invalid address 'nohost'"),
        # issue 17: a space-separated list used to say "IPv6 host must be in brackets"
        ("BALANCER_SERVER_LISTEN", "127.0.0.1:8080 127.0.0.1:8082",
         "holds several addresses separated by spaces; give one per list item (TOML) or "
         "per flag, or separate them with commas in the environment: "
         "127.0.0.1:8080,127.0.0.1:8082"),
        ("BALANCER_MANAGEMENT_LISTEN", "127.0.0.1:1 127.0.0.1:2",
         "must be one address, got '127.0.0.1:1 127.0.0.1:2' (several, separated by spaces)"),
        ("BALANCER_SERVER_PAGES_DIR", "/does/not/exist",
         "must be an existing directory, got '/does/not/exist'"),
        ("BALANCER_SERVER_USER", "no-such-user-xyz", "must be an existing user name"),
        ("BALANCER_SERVER_GROUP", "no-such-group-xyz", "must be an existing group name"),
        # [acme] (issue 18)
        ("BALANCER_ACME_DIRECTORY", "ftp://ca.example/dir", "must be an https:// URL"),
        ("BALANCER_ACME_DIRECTORY", "http://ca.example/dir", "(http:// only on loopback)"),
        ("BALANCER_ACME_DIRECTORY", "https://", "must be an https:// URL"),
        ("BALANCER_ACME_DIRECTORY", "https://ca.example:99999/dir", "must be an https:// URL"),
        ("BALANCER_ACME_EMAIL", "ops", "must be an e-mail address"),
        ("BALANCER_ACME_EMAIL", "ops@localhost", "must be an e-mail address"),
        ("BALANCER_ACME_EMAIL", "a b@example.com", "must be an e-mail address"),
        ("BALANCER_ACME_CA_BUNDLE", "/does/not/exist", "'/does/not/exist': cannot read"),
        ("BALANCER_ACME_CA_BUNDLE", "/etc/hostname", "holds no PEM certificate"),
        ("BALANCER_ACME_RENEW_BEFORE", "0", "must be an integer from 1 to 2147483647, got '0'"),
        ("BALANCER_ACME_RENEW_BEFORE", "1.5", "must be an integer from 1 to 2147483647, got '1.5'"),
        ("BALANCER_ACME_CHALLENGE", "dns-01",
         "must be one of http-01, tls-alpn-01, got 'dns-01'"),
    ],
)
def test_bad_values_name_setting_and_source(var, text, expected):
    name = var.removeprefix("BALANCER_").lower().replace("_", ".", 1)
    problem = one_problem(env={var: text})
    assert problem.startswith(f"{name} ({var}): "), problem
    assert expected in problem


def test_the_example_message_from_the_brief():
    assert one_problem(env={"BALANCER_TIMEOUTS_BACKEND_READ": "abc"}) == (
        "timeouts.backend_read (BALANCER_TIMEOUTS_BACKEND_READ): must be a number > 0, got 'abc'")


def test_good_store_urls_and_accounts(tmp_path):
    for url in ["file:/tmp/x.json", "redis://:pw@h:6379/0", "rediss://h:6380/1",
                "unix:///run/redis/redis.sock?db=2",  # the Redis store takes it: so do settings
                "redis+sentinel://a:26379,b:26379/mymaster/0",
                "redis://h:6379/0?replicas=1&wait=500", "redis+sentinel://a/mm/0?replicas=2",
                "rediss://h/0?ssl_cert_reqs=none&health_check_interval=5&replicas=1",
                "redis://h/0?max_connections=20&socket_keepalive=true"]:
        assert load(flags={"store.url": url}).store.url == url
    me = pwd.getpwuid(os.getuid()).pw_name
    s = load(flags={"server.user": me, "server.group": "0", "server.pages_dir": str(tmp_path)})
    assert (s.server.user, s.server.group, s.server.pages_dir) == (me, "0", str(tmp_path))


def test_unknown_env_setting_is_an_error():
    assert one_problem(env={"BALANCER_TIMEOUTS_BACKEND_REED": "1"}) == (
        "BALANCER_TIMEOUTS_BACKEND_REED: unknown setting "
        "(did you mean BALANCER_TIMEOUTS_BACKEND_READ?)")
    assert "unknown setting" in one_problem(env={"BALANCER_LOG_COLOR": "1"})


def test_unknown_flag_is_an_error():
    assert one_problem(flags={"server.listn": ["127.0.0.1:1"]}) == (
        "server.listn (flag): unknown setting (did you mean server.listen?)")


def test_flag_source_is_named_by_its_option():
    assert one_problem(flags={"server.workers": "x"}).startswith("server.workers (--workers): ")
    assert one_problem(flags={"server.max_connections": 0}).startswith(
        "server.max_connections (flag): ")


def test_overridden_bad_value_is_still_reported(config):
    path = config("[server]\nworkers = -3\n")
    problem = one_problem(flags={"server.workers": "2"}, config_path=path)
    assert problem.startswith(f"server.workers ({path}): ")


def test_all_problems_are_reported_together(config):
    path = config("[server]\nworkers = -3\nbogus = 1\n")
    problems = problems_of(env={"BALANCER_LOG_LEVEL": "loud"}, config_path=path)
    assert len(problems) == 3
    assert len(str(SettingsError(problems)).splitlines()) == 3


# -- rules across settings ----------------------------------------------------


def test_management_refuses_non_loopback_without_token():
    assert one_problem(flags={"management.listen": ":8081"}) == (
        "management.listen (--management): 0.0.0.0:8081 is not a loopback address; "
        "set management.token to expose the API there")
    problem = one_problem(env={"BALANCER_MANAGEMENT_LISTEN": "10.1.2.3:8081"})
    assert problem.startswith("management.listen (BALANCER_MANAGEMENT_LISTEN): ")


def test_management_accepts_loopback_or_a_token():
    assert load(flags={"management.listen": "[::1]:8081"}).management.listen.host == "::1"
    assert load(flags={"management.listen": "localhost:0"}).management.listen.port == 0
    s = load(flags={"management.listen": ":8081", "management.token": "t"})
    assert s.management.listen == Address("0.0.0.0", 8081)


def test_at_least_one_listener():
    problem = one_problem(env={"BALANCER_SERVER_LISTEN": ""})
    assert problem.startswith("server.listen (BALANCER_SERVER_LISTEN): no listener")
    s = load(env={"BALANCER_SERVER_LISTEN": "", "BALANCER_SERVER_INTERNAL_LISTEN": ":0"})
    assert s.server.listen == ()


def test_duplicate_addresses():
    problem = one_problem(flags={"server.internal_listen": ["127.0.0.1:8080"]})
    assert problem == ("server.internal_listen (--internal-listen): 127.0.0.1:8080 "
                       "is also used by server.listen")
    problem = one_problem(flags={"management.listen": "127.0.0.1:8080"})
    assert "is also used by server.listen" in problem
    s = load(flags={"server.listen": ["127.0.0.1:0", "127.0.0.1:0"]})
    assert len(s.server.listen) == 2


def test_management_allowed_hosts(config):
    assert load().management.allowed_hosts == ()
    env = {"BALANCER_MANAGEMENT_ALLOWED_HOSTS": "Ops.Example.com, [::1], .corp.lan,*, 10.0.0.1"}
    assert load(env=env).management.allowed_hosts == (
        "ops.example.com", "::1", ".corp.lan", "*", "10.0.0.1")
    path = config('[management]\nallowed_hosts = ["mgmt.internal"]\n')
    assert load(config_path=path).management.allowed_hosts == ("mgmt.internal",)
    for bad in ("a b", "http://x", "x:8081", ".", "[zz]"):
        problem = one_problem(env={"BALANCER_MANAGEMENT_ALLOWED_HOSTS": bad})
        assert problem.startswith("management.allowed_hosts (BALANCER_MANAGEMENT_ALLOWED_HOSTS): ")
    assert one_problem(config_path=config("[management]\nallowed_hosts = [1]\n")).endswith(
        "must be a list of host name strings, got [1]")
    assert "must be a list of host names" in one_problem(
        config_path=config('[management]\nallowed_hosts = "x"\n'))


def test_a_reload_keeps_every_address_bound_at_start(caplog):
    from balancer.startup import keep_bound

    old = load_settings(env={})
    new = load_settings(env={"BALANCER_TLS_LISTEN": "127.0.0.1:8443",
                             "BALANCER_MANAGEMENT_LISTEN": "127.0.0.1:9081",
                             "BALANCER_SERVER_REUSEPORT": "false",
                             "BALANCER_TIMEOUTS_BACKEND_READ": "7"})
    with caplog.at_level("WARNING", logger="balancer"):
        kept = keep_bound(old, new)
    assert kept.tls.listen == () and kept.management.listen == old.management.listen
    assert kept.server.reuseport is True
    assert kept.timeouts.backend_read == 7.0  # what a reload may change, changes
    assert ("SIGHUP: server.reuseport, management.listen, tls.listen changed; that needs a "
            "restart, keeping the running values") in caplog.text
