"""The worker's own listening addresses, to refuse a backend connection that
would reach the balancer itself (`Backend._completed`): a rule whose backend
is one of its listeners forwarded each request to itself again, and one
request took every descriptor of the worker (about 10,000) before anything
answered, other hosts' clients included.

Invariants:
* The test runs once per new backend connection, never on a pooled one, and
  costs a set lookup of the backend's port unless the balancer listens on
  that port: only then it asks the socket for its addresses (one or two
  system calls).
* A connection is ours when its peer is a listening address exactly, or a
  wildcard listener's port (0.0.0.0 or ::, same family) reached on a local
  address: the peer is the connection's own local address (a connect to
  one of this machine's addresses goes out from it) or a loopback one.
* Nothing was sent on a refused connection (`SelfLoop`): it is not the
  backend's failure (a balancer elsewhere in a cluster may listen there).
"""

from __future__ import annotations

import ipaddress
import socket

INET = (socket.AF_INET, socket.AF_INET6)


class OwnListeners:
    """The worker's listening addresses (`add`), and the test of a connection."""

    __slots__ = ("ports", "exact", "wildcard")

    def __init__(self) -> None:
        self.ports: set[int] = set()  # every listening port: the cheap first test
        self.exact: set[tuple[str, int]] = set()  # (ip, port) of specific listeners
        self.wildcard: set[tuple[int, int]] = set()  # (family, port) of 0.0.0.0 / ::

    def add(self, sock: socket.socket) -> None:
        """Count listening `sock` (a TCP one; others are ignored)."""
        if sock.family not in INET:
            return
        host, port = sock.getsockname()[:2]
        self.ports.add(port)
        if ipaddress.ip_address(host).is_unspecified:
            self.wildcard.add((sock.family, port))
        else:
            self.exact.add((host, port))

    def reaches(self, sock: socket.socket) -> bool:
        """Whether connected `sock` reaches one of the listeners (the caller
        checked its port is in `ports`)."""
        try:
            peer_host, peer_port = sock.getpeername()[:2]
            if (peer_host, peer_port) in self.exact:
                return True
            if (sock.family, peer_port) not in self.wildcard:
                return False
            local: str = sock.getsockname()[0]
        except OSError:  # reset already: not ours to judge, the request's read fails
            return False
        return peer_host == local or ipaddress.ip_address(peer_host).is_loopback

    def __repr__(self) -> str:
        return f"<OwnListeners exact={sorted(self.exact)} wildcard={sorted(self.wildcard)}>"
