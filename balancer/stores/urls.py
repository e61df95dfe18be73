"""Store URLs: which store a URL names, parsing ``redis+sentinel://``, and
hiding passwords for display.

Invariants:
* The accepted schemes are declared here once (`FILE_SCHEME`,
  `REDIS_SCHEMES`): the settings check URLs with `store_kind`, and
  `balancer.stores.open_store` opens what it accepts.
* `redact_url` never returns a password; everything else of the URL stays.
* `parse_sentinel_url` either returns a complete `SentinelTarget` or raises
  `StoreUrlError` naming the URL and the part that is wrong.
* The replication options (``replicas``, ``wait``: `split_replication`) are
  the balancer's own: they are taken off a Redis URL before redis-py reads
  it, and are either whole integers within their bounds or refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from balancer.addr import AddrError, parse_backend_addr

FILE_SCHEME = "file:"
SENTINEL_SCHEME = "redis+sentinel://"
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", SENTINEL_SCHEME)
URL_FORMS = ("file:PATH, redis://[:password@]host:port/db, rediss://..., "
             "unix:///path/to/redis.sock, or redis+sentinel://host:port[,host:port]/service_name/db")
SENTINEL_PORT = 26379
SENTINEL_FORM = "redis+sentinel://[:password@]host:port[,host:port]/service_name/db"
REPLICAS = ("replicas", 1, 100, "")     # option, lowest, highest, unit
WAIT = ("wait", 1, 10_000, " milliseconds")  # 0 would be WAIT's "forever"
DEFAULT_WAIT_MS = 1000


class StoreUrlError(ValueError):
    """A store URL that cannot be used; the message names the URL and the problem."""


@dataclass(frozen=True)
class SentinelTarget:
    """Where the sentinels are and which monitored master to use."""

    sentinels: tuple[tuple[str, int], ...]
    service_name: str
    db: int
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class Replication:
    """``?replicas=N&wait=MS``: every write waits until N replicas acknowledged it,
    for up to MS milliseconds (Redis's ``WAIT``)."""

    replicas: int
    wait_ms: int = DEFAULT_WAIT_MS


def store_kind(url: object) -> str:
    """"file" or "redis": the store `url` names by its scheme. Raises
    `StoreUrlError` for an empty URL or any other scheme (the stores check the
    rest when they open it)."""
    if not isinstance(url, str) or not url.strip():
        raise StoreUrlError(f"empty store URL; expected {URL_FORMS}")
    if url.startswith(FILE_SCHEME):
        if url in (FILE_SCHEME, FILE_SCHEME + "//"):
            raise StoreUrlError(f"{url}: the file path is missing; expected file:PATH")
        return "file"
    if any(url.startswith(scheme) and len(url) > len(scheme) for scheme in REDIS_SCHEMES):
        return "redis"
    raise StoreUrlError(f"unsupported store URL {redact_url(url)!r}; expected {URL_FORMS}")


def redis_db_problem(url: str) -> str | None:
    """Why the database of a ``redis://`` or ``rediss://`` URL is not a number, or
    None. (redis-py would take ``redis://host/O`` silently as database 0.)"""
    if not url.startswith(("redis://", "rediss://")):
        return None
    db = url.split("://", 1)[1].partition("/")[2].split("?")[0].split("#")[0].strip("/")
    if db and not (db.isascii() and db.isdigit()):
        return f"the database after the host must be a number (redis://host:port/DB), got {db!r}"
    return None


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL's database or options, or None."""
    if not url.startswith(REDIS_SCHEMES):
        return None
    try:
        _replication(url.partition("?")[2].partition("#")[0])
    except ValueError as exc:
        return str(exc)
    if url.startswith(SENTINEL_SCHEME):  # takes no other option (`parse_sentinel_url`)
        return None
    try:  # imported here: it imports this module, and only a Redis URL needs redis-py
        from balancer.stores.redis_connect import options_problem
    except ImportError:  # the options are checked where redis-py can be imported
        # (bug: an arbiter dropped to a user that cannot read the installation
        # died of a reload onto Redis; `preload` refuses that reload, naming the module)
        return redis_db_problem(url)
    return redis_db_problem(url) or options_problem(split_replication(url)[0])


def split_replication(url: str) -> tuple[str, Replication | None]:
    """`url` without its ``replicas`` and ``wait`` options (the rest of the query
    kept as it was, for redis-py), and the `Replication` they ask for (None
    without ``replicas``). Raises `StoreUrlError` for a value that is not a whole
    number within its bounds (``NaN``, ``-1``, ``1.5``, ``1e3``, ``99999999``), an
    option given twice, or ``wait`` without ``replicas``."""
    base, mark, rest = url.partition("?")
    query, hashmark, fragment = rest.partition("#")
    try:
        kept, replication = _replication(query)
    except ValueError as exc:
        raise StoreUrlError(f"{redact_url(url)}: {exc}") from None
    if replication is None:
        return url, None
    return base + ("?" + kept if kept else "") + hashmark + fragment, replication


def _replication(query: str) -> tuple[str, Replication | None]:
    """The query without ``replicas`` and ``wait``, and what they ask for."""
    kept: list[str] = []
    found: dict[str, str] = {}
    for item in query.split("&") if query else ():
        name, _, value = item.partition("=")
        if name not in (REPLICAS[0], WAIT[0]):
            kept.append(item)
        elif name in found:
            raise ValueError(f"{name} is given twice")
        else:
            found[name] = value
    if not found:
        return query, None
    if REPLICAS[0] not in found:
        raise ValueError("wait needs replicas=N (how many replicas must acknowledge "
                         "each write)")
    return "&".join(item for item in kept if item), Replication(
        _bounded(REPLICAS, found[REPLICAS[0]]),
        _bounded(WAIT, found.get(WAIT[0], str(DEFAULT_WAIT_MS))))


def _bounded(option: tuple[str, int, int, str], text: str) -> int:
    """The whole number `text` of `option` (name, lowest, highest, unit), or
    ValueError; digits only, so no float, sign, exponent or NaN gets through, and
    a long one is refused before it is converted."""
    name, lowest, highest, unit = option
    if not (text.isascii() and text.isdigit() and len(text) <= len(str(highest))
            and lowest <= int(text) <= highest):
        raise ValueError(f"{name} must be a whole number from {lowest} to {highest}{unit}, "
                         f"got {text!r}")
    return int(text)


def redact_url(url: str) -> str:
    """`url` with the password (if any) replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return url
    netloc, slash, path = rest.partition("/")
    credentials, host = netloc.rsplit("@", 1)
    user = credentials.split(":", 1)[0] if ":" in credentials else ""
    return f"{scheme}://{user}:***@{host}{slash}{path}"


def parse_sentinel_url(url: str) -> SentinelTarget:
    """Parse ``redis+sentinel://[:password@]host:port[,host:port]/service_name/db``."""
    shown = redact_url(url)
    if not url.startswith(SENTINEL_SCHEME):
        raise StoreUrlError(f"{shown}: a sentinel URL starts with {SENTINEL_SCHEME}")
    rest = split_replication(url)[0][len(SENTINEL_SCHEME):]
    if "?" in rest or "#" in rest:
        raise StoreUrlError(f"{shown}: the only options are replicas= and wait=; use "
                            f"{SENTINEL_FORM}[?replicas=N[&wait=MS]]")
    netloc, _, path = rest.partition("/")
    username, password, hosts = _split_credentials(netloc)
    parts = path.split("/") if path else []
    if not parts or not parts[0]:
        raise StoreUrlError(f"{shown}: the service name is missing; use {SENTINEL_FORM}")
    if len(parts) > 2:
        raise StoreUrlError(f"{shown}: unexpected path after the db; use {SENTINEL_FORM}")
    db_text = parts[1] if len(parts) == 2 and parts[1] else "0"
    if not db_text.isdigit():
        raise StoreUrlError(f"{shown}: db must be a number >= 0, got {db_text!r}")
    return SentinelTarget(sentinels=_parse_sentinels(shown, hosts), service_name=parts[0],
                          db=int(db_text), username=username, password=password)


def _split_credentials(netloc: str) -> tuple[str | None, str | None, str]:
    if "@" not in netloc:
        return None, None, netloc
    credentials, hosts = netloc.rsplit("@", 1)
    user, sep, password = credentials.partition(":")
    if not sep:  # "secret@host" is taken as a password, like redis-cli -a
        return None, user or None, hosts
    return user or None, password or None, hosts


def _parse_sentinels(shown: str, hosts: str) -> tuple[tuple[str, int], ...]:
    if not hosts:
        raise StoreUrlError(f"{shown}: no sentinel host given; use {SENTINEL_FORM}")
    out = []
    for item in hosts.split(","):
        text = item if item.rsplit("]", 1)[-1].count(":") else f"{item}:{SENTINEL_PORT}"
        try:
            address = parse_backend_addr(text, allow_tls=False)
        except AddrError as exc:
            raise StoreUrlError(f"{shown}: sentinel {item!r}: {exc}") from None
        out.append((address.host, address.port))
    return tuple(out)
