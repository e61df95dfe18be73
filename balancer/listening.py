"""The proxy listening sockets: bound once by `balancer serve` (before privileges
drop) and held open by the arbiter until it stops.

Per listener address there is either one socket that every worker accepts
from, or, with `[server] reuseport` on Linux and more than one worker, one
socket per worker slot, all bound with SO_REUSEPORT: the kernel then spreads
new connections evenly over the slots (by a hash of each connection's
addresses). On one shared socket each connection goes to whichever worker
wakes first: a burst of 1,000 split up to 79 % / 21 % between 2 workers, and
the busier worker's share set the tail of releasing held requests.

Invariants:
* A slot's socket lives as long as the arbiter: a worker forked into the
  slot again (crash restart, SIGHUP reload) accepts from the same socket, and
  connections that arrived meanwhile wait in its queue. Closing a
  SO_REUSEPORT socket resets the connections queued on it, so none is closed
  while the balancer runs.
* Every slot's socket has a worker (`Listeners.slots_of`): with fewer workers
  than slots (a reload lowered `server.workers`) worker w also serves slots
  w + W, w + 2W...; with more, the workers beyond share slot w mod S.
* A child keeps open only the sockets it serves (`Listeners.keep`; the
  management process none): once the arbiter closes them to stop, no stray
  copy keeps a socket in its group, taking connections nobody accepts.
* A group is bound only after the address was bound once without
  SO_REUSEPORT and released (`claim`): a port another process listens on
  (a second balancer too) fails as it does without reuseport, instead of
  joining that process's group and taking a share of its connections.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from balancer.accepting import bind
from balancer.addr import Address

Pairs = list[tuple[socket.socket, str]]  # (socket, role: proxy, internal or tls)


def reuseport_supported() -> bool:
    """Whether SO_REUSEPORT spreads connections here (Linux; BSDs and macOS
    accept the option but give every connection to one socket)."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def slot_count(workers: int, reuseport: bool) -> int:
    """Sockets to bind per address: one per worker, or one shared."""
    if reuseport and workers > 1 and reuseport_supported():
        return workers
    return 1


@dataclass(frozen=True)
class Group:
    """One listener address: its role and a socket per slot (or one shared)."""

    role: str
    sockets: tuple[socket.socket, ...]


class Listeners:
    """Every proxy listener the arbiter bound, as slot groups of equal size."""

    def __init__(self, groups: list[Group]) -> None:
        self.groups = groups
        self.slots = len(groups[0].sockets) if groups else 1

    def first(self) -> Pairs:
        """One socket per address (what `announce` names)."""
        return [(g.sockets[0], g.role) for g in self.groups]

    def all(self) -> Iterator[socket.socket]:
        for group in self.groups:
            yield from group.sockets

    def slots_of(self, slot: int, workers: int) -> list[int]:
        """The slots worker `slot` of `workers` accepts from."""
        if self.slots == 1:
            return [0]
        mine = [s for s in range(self.slots) if s % workers == slot]
        return mine or [slot % self.slots]

    def keep(self, slot: int | None, workers: int) -> Pairs:
        """In a child: close every socket but those worker `slot` serves (all of
        them for None, the management process) and return those."""
        mine = set(self.slots_of(slot, workers)) if slot is not None else set()
        kept: Pairs = []
        for group in self.groups:
            for index, sock in enumerate(group.sockets):
                if index in mine:
                    kept.append((sock, group.role))
                else:
                    sock.close()  # this process's descriptor; the arbiter keeps its own
        return kept

    def close(self) -> None:
        """The arbiter stops: connections still queued are reset."""
        for sock in self.all():
            sock.close()


def claim(address: Address) -> Address:
    """Bind `address` once without SO_REUSEPORT and release it: raises OSError
    (EADDRINUSE) if anything listens there; the address with its port chosen."""
    probe = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if address.family == socket.AF_INET6:
            probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        probe.bind((address.host, address.port))
        return Address(address.host, probe.getsockname()[1])
    finally:
        probe.close()


def bind_group(address: Address, role: str, slots: int) -> Group:
    """`slots` sockets listening on `address` (SO_REUSEPORT when more than one)."""
    if slots == 1:
        return Group(role, (bind(address),))
    address = claim(address)
    sockets: list[socket.socket] = []
    try:
        for _ in range(slots):
            sockets.append(bind(address, reuseport=True))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return Group(role, tuple(sockets))
