"""Making the redis-py clients of a Redis store, from its URL (`balancer.stores.redis`).

Invariants:
* Every client has socket and connect timeouts and no retries of its own: a
  dead or stalled Redis fails a command in about the timeout, never hangs it
  (nor does one that trickles its answer, a sentinel's included:
  `balancer.stores.redis_deadline`),
  and the store decides what is tried again.
* Answers are decoded as UTF-8 with ``surrogateescape``: bytes that are not
  UTF-8 (only another program writes them) reach the store's checks, which
  name them, instead of failing inside redis-py.
* An answer of Redis (not a sentinel's) brings in at most
  `balancer.stores.redis_bounds.MAX_ANSWER` bytes; without hiredis (which counts
  them) no client is made: `StoreUrlError`, naming it, as for a URL's problem.
* A URL whose query redis-py would refuse (a value it cannot read, an option
  its connections do not take), or would fail every command with, or that would
  replace the options above (`OWN_OPTIONS`), makes no client: `StoreUrlError`,
  naming it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.retry import Retry
from redis.sentinel import Sentinel

from balancer.stores.redis_bounds import BoundedParser, parser_problem
from balancer.stores.redis_deadline import whole_answers
from balancer.stores.urls import SENTINEL_SCHEME, StoreUrlError, parse_sentinel_url, redact_url

DEFAULT_TIMEOUT = 2.0  # seconds a Redis command (and a connect) may take: `RedisStore`
POOL_OPTIONS = {"db", "max_connections"}  # what redis-py's URL gives its pool, not connections
_UTF8 = "answers are read as UTF-8, and bytes that are not reach the store's checks"
# What every client is given by the balancer (`Connector`), which a URL's option would
# replace (redis-py lets the query win), with why it is the balancer's. Bug:
# ``?socket_timeout=-1`` was taken, and every worker died at its first read (a crash
# loop); ``?socket_timeout=1e300`` let a stalled Redis hang each command for good;
# ``?encoding_errors=bogus``, ``?encoding=utf-16`` or ``?retry=x`` failed every command
# with an error that is not Redis's (``LookupError``, ``AttributeError``), and
# ``?encoding_errors=strict`` failed every read of a table holding bytes not UTF-8.
OWN_OPTIONS = {
    "socket_timeout": f"every Redis command times out after {DEFAULT_TIMEOUT:g} s",
    "socket_connect_timeout": f"every connect times out after {DEFAULT_TIMEOUT:g} s",
    "retry": "the store decides what is tried again",
    "decode_responses": _UTF8, "encoding": _UTF8, "encoding_errors": _UTF8,
    "parser_class": "an answer is bounded by the balancer's parser"}
# What redis-py's connections take as text from a URL, besides what it reads itself
# (`URL_QUERY_ARGUMENT_PARSERS`): any other is an object (a callable, a provider, a
# config), which every command failed with (bug: ``?socket_keepalive_options=x``,
# ``?credential_provider=x``, ``?parser_class=x``: a TypeError or AttributeError at
# the first read, ``?maint_notifications_config=x`` one in the URL's check itself).
TEXT_OPTIONS = {"username", "password", "client_name", "lib_name", "lib_version",
                "ssl_ca_certs", "ssl_ca_data", "ssl_ca_path", "ssl_cert_reqs",
                "ssl_certfile", "ssl_keyfile", "ssl_ciphers", "ssl_password"}
CONNECTIONS: dict[str, type] = {"redis": redis.Connection, "rediss": redis.SSLConnection,
                                "unix": redis.UnixDomainSocketConnection}
# Values redis-py takes from a URL but fails with at the first command (``protocol=9``
# failed every command; ``socket_read_size=0`` read nothing: "Connection closed").
VALUE_CHECKS: tuple[tuple[str, Callable[[int], bool], str], ...] = (
    ("protocol", lambda value: value in (2, 3), "2 or 3"),
    ("socket_read_size", lambda value: value >= 1, "a whole number of bytes >= 1"),
    ("health_check_interval", lambda value: value >= 0, "a whole number of seconds >= 0"))


class Connector:
    """Clients for ``redis://``, ``rediss://``, ``unix://`` or ``redis+sentinel://``
    (`url` without the balancer's own options: `split_replication`), made on
    demand (with one connection each when `max_connections` is 1); their
    commands time out after `timeout` +
    `wait` seconds (connecting, and the sentinels, after `timeout`). Through
    Sentinel every client it makes shares one `Sentinel`: one set of sentinel
    connections, closed by `close`. A URL redis-py would refuse raises
    `StoreUrlError` here, before any client."""

    def __init__(self, url: str, timeout: float, wait: float = 0.0,
                 max_connections: int | None = None) -> None:
        self.url = url
        problem = parser_problem()
        if problem:
            raise StoreUrlError(f"{redact_url(url)}: {problem}")
        self.options: dict[str, Any] = {
            "socket_timeout": timeout + wait, "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0), "decode_responses": True,
            "encoding_errors": "surrogateescape", "parser_class": BoundedParser}
        if max_connections is not None:
            self.options["max_connections"] = max_connections
        self.sentinel: Sentinel | None = None
        if url.startswith(SENTINEL_SCHEME):
            self.target = parse_sentinel_url(url)
            self.sentinel = Sentinel(list(self.target.sentinels),
                                     sentinel_kwargs={"socket_timeout": timeout,
                                                      "socket_connect_timeout": timeout},
                                     **self.options)
            for client in self.sentinel.sentinels:  # (bug: a trickling sentinel held
                _whole(client)                     # every master lookup for good)
            return
        problem = options_problem(url)
        if problem:
            raise StoreUrlError(f"{redact_url(url)}: {problem}")

    def __call__(self) -> redis.Redis:
        if self.sentinel is not None:
            target = self.target
            client = self.sentinel.master_for(target.service_name, db=target.db,
                                              username=target.username,
                                              password=target.password)
        else:
            client = redis.Redis.from_url(self.url, **self.options)
        return _whole(client)

    def close(self) -> None:
        """Close the sentinel connections (the clients made are their owners' to close)."""
        for client in self.sentinel.sentinels if self.sentinel is not None else ():
            client.close()


def _whole(client: redis.Redis) -> redis.Redis:
    """`client`, whose connections (none made yet) read each answer whole in time."""
    pool = client.connection_pool
    pool.connection_class = whole_answers(pool.connection_class)
    return client


def options_problem(url: str) -> str | None:
    """What redis-py would refuse in the query of a ``redis://``, ``rediss://`` or
    ``unix://`` URL (without the balancer's own options), or None: a value it
    cannot read, or a name its connections do not take (bug: ``?replica=1``, a
    typo of ``replicas``, passed every check, and each command then raised a
    TypeError: the workers died at their first read), or take as an object that
    text from a URL cannot be (`TEXT_OPTIONS`). Makes no connection."""
    missing = parser_problem()  # (not the URL's, but it makes no client either: `Connector`)
    if missing:
        return missing
    names = {name for name, _ in parse_qsl(urlsplit(url).query, keep_blank_values=True)}
    kind = CONNECTIONS.get(urlsplit(url).scheme.lower(), redis.Connection)
    takes = {name for each in type.mro(kind) if "__init__" in vars(each)
             for name in inspect.signature(vars(each)["__init__"]).parameters}
    unknown = sorted(names - takes - POOL_OPTIONS)
    if unknown:
        return (f"unknown option{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(unknown)} (the balancer's own are replicas= and wait=)")
    objects = sorted(names - TEXT_OPTIONS - URL_QUERY_ARGUMENT_PARSERS.keys()
                     - POOL_OPTIONS - OWN_OPTIONS.keys())
    if objects:
        return (f"{', '.join(objects)} cannot be given in a URL's query (redis-py takes "
                f"{'them' if len(objects) > 1 else 'it'} from code or from the URL "
                "itself, not as text)")
    try:
        pool = redis.ConnectionPool.from_url(url)
    except ValueError as exc:
        return str(exc)
    return own_problem(pool.connection_kwargs)


def own_problem(options: dict[str, Any]) -> str | None:
    """What is wrong with redis-py `options` read from a URL: one the balancer sets
    itself (`OWN_OPTIONS`), or a value outside what redis-py works with."""
    own = sorted(OWN_OPTIONS.keys() & options.keys())
    if own:
        reasons = "; ".join(dict.fromkeys(OWN_OPTIONS[name] for name in own))
        return (f"{', '.join(own)} cannot be given: the balancer sets its own "
                f"({reasons}: docs/stores.md)")
    for name, fits, expected in VALUE_CHECKS:
        if name in options and not fits(options[name]):
            return f"{name} must be {expected}, got {options[name]!r}"
    return None
