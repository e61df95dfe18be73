"""What Redis's answers mean to the Redis store (`balancer.stores.redis`): damaged
data, a refusal, a connection lost while keys were watched, and the words to
report them in.

Invariants:
* ``WRONGTYPE`` is damaged data, never an outage; any other error Redis answers
  (``OOM``, ``READONLY``, ``MISCONF``, ``NOREPLICAS``...) is a refusal: Redis is
  reachable, and a refused command inside ``MULTI`` aborts the whole ``EXEC``.
* redis-py raises `WatchError` both for a watched key that changed (a race: retry)
  and for a connection lost while watching (not a race: never retried); only the
  exception it was raised from tells them apart.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import redis
from redis.exceptions import RedisError, WatchError
from redis.sentinel import MasterNotFoundError

# what redis-py's MasterNotFoundError says of each sentinel that failed: its client's
# repr (1.5 KB of pool internals), then the error's class and text
_SENTINEL_ERROR = re.compile(r"\)> - [\w:.]+?: (.*?)(?=, <redis\.|$)")


def is_wrong_type(exc: BaseException) -> bool:
    """Whether Redis refused a command for the type of the key it named (``WRONGTYPE``,
    also from inside a pipeline or a script): the data is damaged, not unreachable."""
    return isinstance(exc, redis.ResponseError) and "WRONGTYPE" in str(exc)


def lost_connection(exc: WatchError) -> BaseException | None:
    """The error of a connection lost (or timed out) while keys were watched, that
    redis-py raised `exc` for; None when `exc` is a watched key that changed (it
    raises `WatchError` for both)."""
    context = exc.__context__
    if isinstance(context, (RedisError, OSError)) and not isinstance(context, WatchError):
        return context
    return None


@contextlib.contextmanager
def nothing_sent_on_lost_connection() -> Iterator[None]:
    """A connection lost before ``EXEC`` was sent (while reading the version or
    checking the hash) is the error it was: nothing was written, nothing to retry."""
    try:
        yield
    except WatchError as exc:
        lost = lost_connection(exc)
        if lost is not None:
            raise lost from None
        raise


def is_refusal(exc: BaseException) -> bool:
    """Whether Redis answered with an error (``OOM`` under ``maxmemory``, ``READONLY``
    from a replica, ``MISCONF`` after a failed save...): it is reachable, and the
    command changed nothing (a refused command in ``MULTI`` aborts the ``EXEC``)."""
    return isinstance(exc, redis.ResponseError) and not is_wrong_type(exc)


def refusal(exc: BaseException) -> str:
    """Redis's reason, without redis-py's "Command # 1 (HSET ...) of pipeline caused
    error: " prefix (which would echo the rule)."""
    text = str(exc)
    _, sep, reason = text.partition(" of pipeline caused error: ")
    reason = reason if sep else text
    if "DB index is out of range" in reason or "'select' command" in reason:
        reason += (" (the /N of store.url names a database this Redis refuses: one past "
                   "its `databases` setting, or SELECT denied to this user)")
    return reason


def why(exc: BaseException) -> str:
    """What went wrong talking to Redis, with what to do when it is the password
    (Redis's own words, "HELLO must be called with the client already
    authenticated...", do not say that store.url lacks one)."""
    if isinstance(exc, redis.AuthenticationError):
        return (f"{exc} (Redis refused this client's password, or it has none: give it in "
                f"store.url, redis://[user]:PASSWORD@host:port/db)")
    if isinstance(exc, MasterNotFoundError):
        return _no_master(str(exc))
    if "CERTIFICATE_VERIFY_FAILED" in str(exc):
        return (f"{exc} (the balancer does not trust Redis's certificate: give the CA "
                f"that signed it in store.url, rediss://host:port/db?ssl_ca_certs=/path/ca.pem)")
    return str(exc)


def _no_master(text: str) -> str:
    """redis-py's "No master found for 'mm' : <client repr> - ConnectionError: Error
    111 ..., <client repr> - ..." in a line: the sentinels' errors alone, or what to
    check when every sentinel answered. Bug: with every sentinel down, the store's
    problem (log, /api/v1/info, each write's 503) was 1.5 KB of redis-py's pool
    internals per sentinel."""
    head, _, rest = text.partition(" : ")
    causes = list(dict.fromkeys(_SENTINEL_ERROR.findall(rest)))
    if causes:
        return f"{head} (the sentinels: {'; '.join(causes)})"
    if rest:
        return text
    return (f"{head}: no sentinel names a master of that service that is up (they monitor "
            f"no such service: check its name in store.url, "
            f"redis+sentinel://host:port/SERVICE/db; or its master is down)")


def utf8(text: str, host: str = "") -> str:
    """`text` as Redis holds it, or ValueError when it (or `host`, the field it is
    under) has bytes that are not UTF-8: the client decodes those as surrogates."""
    if text.isascii() and host.isascii():  # O(1), as most are: nothing to encode per load
        return text
    for what, value in (("the host name", host), ("the value", text)):
        try:
            value.encode()
        except UnicodeEncodeError as exc:
            byte = ord(value[exc.start]) - 0xDC00
            raise ValueError(f"{what} is not UTF-8 (byte 0x{byte:02x} at position "
                             f"{exc.start})") from None
    return text


def printable(text: str) -> str:
    """`text` printable whatever its bytes (``\\xff`` for a byte that is not UTF-8)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
