"""Active health checks: an HTTP GET to every checked backend address, on a timer.

Passive health lives with the backend itself (`balancer.pool.Backend`:
consecutive failures of real requests); this module adds the active checks
of rules that carry `health`.

Invariants:
* One checker (one greenlet) per backend address, however many hosts name
  it. When rules disagree on the settings for one address, the rule with
  the shortest `interval` wins (then the first host key in sorted order).
* Checkers follow the routing table: `HealthChecks.on_swap` (a
  `TableHolder.on_swap` hook) starts, retunes and stops them; a stopped
  checker leaves its backend not `checked_down`.
* A checker only sets `Backend.checked_down`: down after `fall` failed
  checks in a row, up again after `rise` good ones (which also clears the
  passive down mark and wakes requests held while the backend was down).
  A backend starts up; the first verdict needs `fall` failures.
* A check passes when the backend answers `path` with a 2xx or 3xx status
  within `timeout` seconds (connect included); interim 1xx answers before it
  are passed over, up to `MAX_INTERIM` of them as a request's relay takes
  (more fail the check at once), a 101 fails. An https:// backend is checked
  over TLS, its certificate verified for the rule's host as a request's would
  be (`check_tls_key`); a certificate that fails is a failed check.
* Each flip is logged once with its reason (the last failed check's problem:
  refused, timed out, status 503...).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from balancer.addr import Address
from balancer.backend_tls import UNVERIFIED, pool_key
from balancer.errors import BackendTLSError
from balancer.http11 import ProtocolError
from balancer.pool import Backend
from balancer.relay import MAX_INTERIM, interims
from balancer.response_parser import ResponseParser, final_head
from balancer.restarts import Restarts
from balancer.rules import backend_entries

log = logging.getLogger("balancer.health")
RECV_SIZE = 4096


@dataclass(frozen=True, slots=True)
class CheckConfig:
    """The `health` settings of a rule, with SPEC defaults filled in."""

    path: str = "/"
    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    tls_key: str = ""  # https:// backends: the pool key of the check's connection

    @classmethod
    def from_rule(cls, health: Mapping[str, Any], tls_key: str = "") -> CheckConfig:
        return cls(**{k: health[k] for k in ("path", "interval", "timeout", "rise", "fall")
                      if k in health}, tls_key=tls_key)


def check_tls_key(host: str, rule: Mapping[str, Any]) -> str:
    """The pool key a check of the rule's https:// backends connects with: the
    rule's host, verified as a request for it would be; a wildcard or
    catch-all rule names no host: its checks verify nothing."""
    if host.startswith("*"):
        return pool_key(b"", False)
    return pool_key(host.encode(), rule.get("backend_tls_verify", True))


def wanted_checks(table: Any) -> dict[str, CheckConfig]:
    """Backend address → check settings, for every proxy rule with `health`."""
    from balancer.addr import parse_backend_addr

    wanted: dict[str, CheckConfig] = {}
    routes = table.routes
    for key in sorted(routes):
        rule = routes[key].rule
        if rule.get("action") != "proxy" or "health" not in rule:
            continue
        for address, _ in backend_entries(rule):
            parsed = parse_backend_addr(address)
            config = CheckConfig.from_rule(rule["health"],
                                           check_tls_key(key, rule) if parsed.tls else "")
            address = str(parsed)
            known = wanted.get(address)
            if known is None or config.interval < known.interval:
                wanted[address] = config
    return wanted


class Checker:
    """Checks one backend address; `check_loop` runs in its own greenlet."""

    def __init__(self, backend: Backend, config: CheckConfig) -> None:
        self.backend = backend
        self.config = config  # replaced in place when the rules change
        self.successes = 0
        self.failures = 0
        self.problem = ""  # why the last check failed
        self.stopped = False
        self.task: Any = None

    def check_loop(self) -> None:
        """Check, record, sleep; until stopped. A check that raises what no branch
        expects is `balancer.restarts`': no verdict (a bug of ours says nothing of
        the backend's health), and checked again after `interval` or its pause
        (bug: the checker ended, its backend held up or down for good)."""
        import gevent

        restarts = Restarts(f"backend {self.backend.key}", log, quiet=False,
                            loop="its health check", then="keeping its last verdict and "
                            "checking again with backoff")
        while not self.stopped:
            try:
                healthy = self.check_once()
            except Exception as exc:  # shown as the backend's problem, up or down
                self.backend.check_problem = self.backend.check_failure = restarts.failed(exc)
                gevent.sleep(max(restarts.pause, self.config.interval))
                continue
            if self.stopped:
                return
            self.backend.check_failure = ""
            self.record(healthy)
            gevent.sleep(self.config.interval)

    def check_once(self) -> bool:
        """One GET of the check path; True for a 2xx/3xx answer in time."""
        config, address = self.config, self.backend.address
        deadline = time.monotonic() + config.timeout
        try:
            sock = self.connect(deadline)
        except OSError as exc:
            return self.failed(f"connect: {exc.strerror or exc}")
        except BackendTLSError as exc:
            return self.failed(str(exc))
        host = config.tls_key.lstrip(UNVERIFIED) or str(Address(address.host, address.port))
        try:
            sock.sendall(b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: balancer-health\r\n"
                         b"Connection: close\r\n\r\n" % (config.path.encode(), host.encode()))
            status = read_status(sock, deadline)
        except OSError as exc:
            return self.failed(str(exc.strerror or exc) or type(exc).__name__)
        except ProtocolError as exc:
            return self.failed(f"invalid response: {exc.reason}")
        finally:
            sock.close()
        return 200 <= status < 400 or self.failed(f"GET {config.path} answered {status}")

    def connect(self, deadline: float) -> Any:
        """A connection to the backend (TLS for https://, as requests get it)."""
        backend, config = self.backend, self.config
        sock = backend.dial(deadline)  # a name's lookup and addresses within `timeout` too
        if backend.tls is None:
            sock.settimeout(max(0.0, deadline - time.monotonic()))
            return sock
        return backend.tls.secure(sock, config.tls_key, backend.key, deadline,
                                  backend.io.bounded)

    def failed(self, problem: str) -> bool:
        """Keep why the check failed (for the log line of a flip); returns False."""
        self.problem = problem
        return False

    def record(self, healthy: bool) -> None:
        """Count one verdict; flip `checked_down` after `fall` / `rise` in a row."""
        backend, config = self.backend, self.config
        if healthy:
            self.failures = 0
            self.successes += 1
            if backend.checked_down and self.successes >= config.rise:
                backend.checked_down = False
                backend.mark_up()  # clears a passive mark too, and wakes held requests
                log.info("backend %s is up again: %d health check%s of %s passed",
                         backend.key, self.successes, "" if self.successes == 1 else "s",
                         config.path)
        else:
            self.successes = 0
            self.failures += 1
            backend.check_problem = self.problem or "no answer"
            if not backend.checked_down and self.failures >= config.fall:
                backend.checked_down = True
                log.warning("backend %s is down: %d health check%s of %s failed, the last: %s",
                            backend.key, self.failures, "" if self.failures == 1 else "s",
                            config.path, self.problem or "no answer")

    def stop(self) -> None:
        """End the checks: the backend, now nobody's check, keeps neither its
        verdict nor its check's failure (bug: an up backend's problem for good)."""
        self.stopped = True
        self.backend.checked_down = False
        self.backend.check_failure = ""
        if self.task is not None:
            self.task.kill(block=False)

    def __repr__(self) -> str:
        state = "down" if self.backend.checked_down else "up"
        return (f"<Checker {self.backend.key} {state} ok={self.successes} "
                f"failed={self.failures} every {self.config.interval}s>")


def read_status(sock: socket.socket, deadline: float) -> int:
    """The status of the final response on `sock` (or of a 101), read by
    `deadline` (raises OSError, ProtocolError). Interim 1xx answers (100, 103
    Early Hints) are passed over, as a request's relay passes them on (bug: a
    backend sending 103 before its 200 failed every check), up to
    `MAX_INTERIM` (bug: a backend sending them without end was read until
    `deadline`, and as its socket always had data the check never yielded: the
    worker served nothing else meanwhile)."""
    parser = ResponseParser()
    while (head := final_head(parser)) is None:
        if interims(parser) > MAX_INTERIM:
            raise ProtocolError(502, f"more than {MAX_INTERIM} interim (1xx) responses")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("health check timed out")
        sock.settimeout(remaining)
        data = sock.recv(RECV_SIZE)
        if not data:
            parser.feed_eof()
        else:
            parser.feed(data)
    return head.status


class HealthChecks:
    """Every checker of one worker, keyed by backend address."""

    def __init__(self, registry: Any, spawn: Callable[..., Any] | None = None) -> None:
        self.registry = registry
        self.spawn = spawn
        self.checkers: dict[str, Checker] = {}

    def on_swap(self, old: Any, new: Any) -> None:
        """`TableHolder.on_swap` hook: follow the new table."""
        self.update(wanted_checks(new))

    def update(self, wanted: Mapping[str, CheckConfig]) -> None:
        """Start, retune and stop checkers so exactly `wanted` are checked."""
        for address in list(self.checkers):
            checker = self.checkers[address]
            if address not in wanted or checker.backend is not self.registry.get(address):
                self.checkers.pop(address).stop()
        for address, config in wanted.items():
            checker = self.checkers.get(address)
            if checker is not None:
                checker.config = config
                continue
            checker = self.checkers[address] = Checker(self.registry.get(address), config)
            checker.task = self._spawn(checker.check_loop)

    def _spawn(self, body: Callable[[], None]) -> Any:
        if self.spawn is not None:
            return self.spawn(body)
        import gevent

        return gevent.spawn(body)

    def stop(self) -> None:
        """Stop every checker."""
        for checker in self.checkers.values():
            checker.stop()
        self.checkers.clear()

    def __repr__(self) -> str:
        return f"<HealthChecks {sorted(self.checkers)}>"
