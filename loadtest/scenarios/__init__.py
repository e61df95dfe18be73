"""The scenarios of `loadtest run`, in the order they run."""

from __future__ import annotations

from loadtest.scenarios import deploy, failover, idle, proxy, reconfig, spin, wsgi

SCENARIOS = {module.NAME: module for module in (proxy, wsgi, idle, spin, reconfig, failover,
                                                deploy)}
