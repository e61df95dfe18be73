"""File descriptors: the soft RLIMIT_NOFILE raised to the hard one at start, the
connection cap that fits under it, and what accept does when they run out.

Invariants:

* `raise_limit` runs in the arbiter before any child is forked, so every
  process of a balancer runs with the same limit.
* A worker never admits more clients than its descriptors allow: each client
  connection may hold a backend connection (two descriptors), and `RESERVED`
  stay free for the listeners, the store, the logs, control sockets and the
  event loop. `server.max_connections` is lowered to fit (`connection_cap`);
  the arbiter logs it once.
* Idle pooled backend connections hold descriptors too: they get only what
  the open clients leave of `connection_budget` (`balancer.pool.IdleBudget`),
  and yield it back (the oldest closed) when a client needs a new backend
  connection.
* Accept failing for want of descriptors or memory (EMFILE, ENFILE, ENOBUFS,
  ENOMEM) pauses accepting for `ACCEPT_PAUSE` seconds (nginx does the same)
  and logs one line per episode, never a traceback; an aborted connection is
  skipped.
"""

from __future__ import annotations

import errno
import logging
import resource

log = logging.getLogger("balancer")

RESERVED = 64  # descriptors kept for everything but client and backend connections
PER_CONNECTION = 2  # a client connection and its backend connection
ACCEPT_PAUSE = 0.5  # seconds accept rests after running out (nginx: 500 ms)
EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
SKIPPED = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.EINTR})
NR_OPEN = "/proc/sys/fs/nr_open"


def soft_limit() -> int:
    """The current soft RLIMIT_NOFILE."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _kernel_maximum()
    if soft != resource.RLIM_INFINITY and target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", soft, target, exc)
            return soft, soft
        return soft, target
    return soft, soft


def connection_budget(limit: int) -> int:
    """The descriptors `limit` leaves for client and backend connections."""
    return max(PER_CONNECTION, limit - RESERVED)


def connection_cap(configured: int, limit: int) -> int:
    """Client connections per worker that `limit` descriptors allow, at most `configured`."""
    return max(1, min(configured, connection_budget(limit) // PER_CONNECTION))


def log_limits(configured: int, before: int, after: int) -> None:
    """The start-up lines about the descriptor limit and the connection cap."""
    if after > before:
        log.info("file descriptor limit raised from %d to %d (the hard limit)", before, after)
    cap = connection_cap(configured, after)
    if cap < configured:
        log.warning("server.max_connections lowered from %d to %d per worker: the file "
                    "descriptor limit is %d (%d per connection for client and backend, %d kept "
                    "for listeners, store and logs); raise the hard limit (ulimit -Hn, "
                    "systemd LimitNOFILE=) to allow more", configured, cap, after,
                    PER_CONNECTION, RESERVED)


def is_exhausted(exc: OSError) -> bool:
    """True when accept failed for want of descriptors or memory."""
    return exc.errno in EXHAUSTED


def exhaustion(exc: BaseException) -> OSError | MemoryError | None:
    """`exc` if it is running out of descriptors or memory (`is_exhausted`, or
    Python's `MemoryError`); None otherwise. Only `exc` itself counts: bug: a bug
    raised while handling EMFILE (its context) was taken for the EMFILE, and
    answered 503 without its traceback."""
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and is_exhausted(exc)):
        return exc
    return None


def shortage(exc: OSError | MemoryError) -> str:
    """What ran out, in a few words ("Too many open files", "out of memory")."""
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return "out of memory"


def is_skipped(exc: OSError) -> bool:
    """True when accept failed for that one connection only (it was aborted)."""
    return exc.errno in SKIPPED


def _kernel_maximum() -> int:
    try:
        with open(NR_OPEN) as file:
            return int(file.read())
    except (OSError, ValueError):
        return 1048576
