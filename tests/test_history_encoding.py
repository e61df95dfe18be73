"""``GET /api/v1/history`` is encoded once per sample and query
(`management.history.History.encoded_view`), with the bytes the view's JSON
always had, built a slice of hosts at a time."""

from __future__ import annotations

import json

import gevent

from balancer.turns import turn
from management.history import HOSTS_PER_PAUSE, History
from management.http import json_response
from tests.support import polls_during

HOSTS = HOSTS_PER_PAUSE * 2 + 7  # several slices, the last one short
START = 1_764_600_000.0


def snapshot(point: int) -> dict:
    return {"hosts": {f"h{n:03d}.test": {"completed_requests": point * (n % 5),
                                          "responses": {"5xx": point // 3 * (n % 2)},
                                          "duration": {"counts": [point, point]}}
                      for n in range(HOSTS)}}


def filled(points: int, pause=None) -> History:
    kept = History(pause=pause)
    for point in range(points):
        kept.sample(snapshot(point), START + 5 * point)
    return kept


def as_before(kept: History, since: float, now: float, host: str | None) -> bytes:
    """What the route answered before: the view through `json_response`."""
    return json_response(kept.view(since, now, host)).get_data()


def test_the_bytes_are_the_views_json():
    kept = filled(30)
    now = START + 5 * 30
    for since, host in ((3600, None), (60, None), (1, None), (3600, "h004.test"),
                        (3600, "missing.test")):
        body = kept.encoded_view(since, now, host)
        assert body == as_before(kept, since, now, host), (since, host)
        doc = json.loads(body)
        assert len(doc["times"]) == len(doc["total"]["rps"])
    assert len(json.loads(kept.encoded_view(3600, now))["hosts"]) == HOSTS


def test_a_query_is_encoded_once_per_sample_and_pauses_between_slices():
    pauses = []
    kept = filled(10, pause=lambda: pauses.append(1))
    now = START + 50
    first = kept.encoded_view(3600, now)
    assert len(pauses) == HOSTS // HOSTS_PER_PAUSE  # the hub runs between slices
    assert kept.encoded_view(3600, now) is first and len(pauses) == HOSTS // HOSTS_PER_PAUSE
    assert kept.encoded_view(20, now) is not first  # another query: its own bytes
    kept.sample(snapshot(10), now)
    again = kept.encoded_view(3600, now + 1)
    assert again != first and again == as_before(kept, 3600, now + 1, None)
    assert len(json.loads(again)["times"]) == 11


def test_a_sample_during_a_pause_leaves_the_answer_whole():
    kept = filled(10)
    now = START + 50
    expected = as_before(kept, 3600, now, None)
    samples = iter([11])
    kept.pause = lambda: [kept.sample(snapshot(p), now + 1) for p in samples]
    body = kept.encoded_view(3600, now)
    assert body == expected  # the points before the sample, for every host
    assert kept.encoded_view(3600, now) != body  # not kept: a sample came meanwhile


def test_concurrent_askers_share_one_encoding():
    kept = filled(10, pause=lambda: gevent.sleep(0))
    encoded = []
    real = kept._encode
    kept._encode = lambda *args: encoded.append(1) or real(*args)
    now = START + 50
    jobs = [gevent.spawn(kept.encoded_view, 3600, now) for _ in range(4)]
    gevent.joinall(jobs, timeout=10)
    assert all(job.successful() for job in jobs)
    assert len({id(job.value) for job in jobs}) == 1 and encoded == [1]


def test_the_management_process_serves_sockets_and_timers_between_slices():
    """Its pause lets the loop poll: a request that arrived and a timer that is
    due are served during the build (``gevent.sleep(0)`` served neither)."""
    kept = filled(10, pause=turn)
    polls_during(lambda: kept.encoded_view(3600, START + 50))
