"""Outside probe of a store through Sentinel that cannot name a master
(2026-12-07): the service name unknown to the sentinels (a typo), every
sentinel down. Behaviour pinned: the balancer starts, serves, says why in
``store.problem`` and ``/readyz``, a write answers 503 ``store_unavailable``
naming the cause and changes nothing, and the process keeps running.

Bug fixed: with every sentinel down, that cause (the log, ``store.problem``,
each write's answer) was redis-py's repr of each sentinel's client, 1.5 KB of
pool internals, before the error; now one line: ``No master found for 'mm'
(the sentinels: Error 111 connecting to 127.0.0.1:26379. Connection
refused.)``; an unknown service says to check the name."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import RedisServer
from tests.support import Balancer, dead_address, request, wait_for


def static(body: str) -> dict[str, Any]:
    return {"action": "static", "body": body}


def status_of(balancer: Balancer, path: str) -> int:
    return balancer.api("GET", path)[0]


@pytest.mark.parametrize("case", ["unknown-service", "sentinels-down"])
def test_a_sentinel_url_that_names_no_master_is_reported_and_survived(
        tmp_path: Path, sentinel_pair: tuple[RedisServer, RedisServer, Any, str],
        case: str) -> None:
    _, _, _, url = sentinel_pair
    if case == "unknown-service":
        url = url.replace("/mm/0", "/mn/0")
        cause = "No master found for 'mn': no sentinel names a master of that service"
    else:
        url = f"redis+sentinel://{dead_address()}/mm/0"
        cause = "No master found for 'mm' (the sentinels: Error 111 connecting to"
    balancer = Balancer(tmp_path, args=["--workers", "2"], store=url)
    try:
        wait_for(lambda: cause in balancer.store_problem(), what="the problem reported")
        assert status_of(balancer, "/readyz") == 503
        assert request(balancer.port, host="app.test", timeout=5)[0] in (404, 421, 502, 503)
        status, answer = balancer.api("PUT", "/api/v1/hosts/app.test", static("x"))
        assert status == 503, answer
        assert answer["error"] == "store_unavailable" and cause in answer["message"], answer
        assert balancer.proc.poll() is None
        for told in (balancer.store_problem(), answer["message"]):
            assert len(told) < 300 and "<redis" not in told, told
    finally:
        balancer.stop()
