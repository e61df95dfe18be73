"""Changing a balancer target's routing table while it runs.

`RouteFile` rewrites the store file atomically (temp file, fsync, rename) with
a new version; both balancer targets' watchers see it within a second.
`RouteApi` uses the management API (``PUT /api/v1/hosts/HOST``), the path a
user takes with the gevent balancer.
"""

from __future__ import annotations

import http.client
import json
import os
from pathlib import Path


def proxy_rule(backends: list[str]) -> dict:
    """A proxy rule over `backends` with the default algorithm."""
    return {"action": "proxy", "backends": list(backends)}


class RouteFile:
    """A file store written by the suite (the threaded baseline's only way in)."""

    def __init__(self, path: Path, hosts: dict[str, dict]) -> None:
        self.path = path
        self.hosts = dict(hosts)
        self.version = 0
        self._write()

    def set_rule(self, host: str, rule: dict) -> int:
        """Set one host's rule; returns the new version."""
        self.hosts[host] = rule
        return self._write()

    def _write(self) -> int:
        self.version += 1
        tmp = self.path.with_suffix(".tmp")
        data = json.dumps({"version": self.version, "hosts": self.hosts}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        return self.version


class RouteApi:
    """The management API of a running balancer."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port

    def set_rule(self, host: str, rule: dict) -> int:
        """PUT the rule; returns the new version (RuntimeError on any refusal)."""
        conn = http.client.HTTPConnection(self.host, self.port, timeout=5)
        try:
            conn.request("PUT", f"/api/v1/hosts/{host}", body=json.dumps(rule),
                         headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise RuntimeError(f"PUT /api/v1/hosts/{host}: {response.status} {body[:200]!r}")
        return int(json.loads(body)["version"])
