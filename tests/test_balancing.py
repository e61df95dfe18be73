"""Balancing algorithms as units: weights, load awareness, stickiness, fallbacks.

Tolerances are stated per test: shares are compared with weight / sum(weights)
over enough picks that a correct algorithm misses the bound with negligible
probability (random draws are seeded).
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter

import pytest

from balancer import balancing
from balancer.balancing import ALGORITHMS, IpHash, make_balancer
from balancer.pool import DOWN, PROBING, UP, Backend, BackendRegistry
from balancer.rules import ALGORITHMS as VALID_ALGORITHMS

pytestmark = pytest.mark.data_plane  # run interpreted too (scripts/test.sh)


def make_backends(n: int, first_port: int = 9001) -> list[Backend]:
    registry = BackendRegistry(connect_timeout=1.0, fail_timeout=10.0)
    return [registry.get(f"10.0.0.{i + 1}:{first_port + i}") for i in range(n)]


def shares(counts: Counter, backends: list[Backend]) -> list[float]:
    total = sum(counts.values())
    return [counts[b] / total for b in backends]


def expected(weights: list[int]) -> list[float]:
    return [w / sum(weights) for w in weights]


@pytest.fixture(autouse=True)
def seeded():
    random.seed(12345)


def test_registry_and_validator_agree():
    assert set(ALGORITHMS) == set(VALID_ALGORITHMS)


# sequential picks (no request in flight): every algorithm follows the weights ---
@pytest.mark.parametrize("algorithm,tolerance", [
    ("round_robin", 0.0),          # exact: smooth weighted round robin
    ("least_connections", 0.0),    # exact: ties broken by smooth weighted round robin
    ("random_two", 0.02),          # random draws: within 2 points of share
])
def test_idle_picks_follow_weights(algorithm, tolerance):
    backends, weights = make_backends(3), [1, 2, 3]
    balancer = make_balancer(algorithm, backends, weights)
    counts = Counter(balancer.pick("1.2.3.4", []) for _ in range(6000))
    for got, want in zip(shares(counts, backends), expected(weights), strict=True):
        assert abs(got - want) <= tolerance + 1e-9, (algorithm, got, want)


def simulate_load(balancer, backends: list[Backend], picks: int, concurrency: int) -> Counter:
    """Keep `concurrency` requests in flight; equal service times (a random one ends)."""
    counts: Counter = Counter()
    active: list[Backend] = []
    for _ in range(picks):
        backend = balancer.pick("1.2.3.4", [])
        backend.in_flight += 1
        active.append(backend)
        counts[backend] += 1
        if len(active) >= concurrency:
            done = active.pop(random.randrange(len(active)))
            done.in_flight -= 1
    return counts


@pytest.mark.parametrize("algorithm", ["least_connections", "random_two"])
def test_load_aware_picks_follow_weights_under_load(algorithm):
    """Tolerance: each share within 3 points of weight / sum over 30000 picks."""
    backends, weights = make_backends(3), [1, 2, 3]
    balancer = make_balancer(algorithm, backends, weights)
    counts = simulate_load(balancer, backends, 30000, concurrency=24)
    for got, want in zip(shares(counts, backends), expected(weights), strict=True):
        assert abs(got - want) <= 0.03, (algorithm, got, want)


def test_least_connections_prefers_fewest_per_weight():
    a, b, c = make_backends(3)
    balancer = make_balancer("least_connections", [a, b, c], [1, 3, 1])
    a.in_flight, b.in_flight, c.in_flight = 2, 3, 2   # loads 2, 1, 2
    assert balancer.pick("x", []) is b
    b.in_flight = 9                                   # loads 2, 3, 2: a and c tie
    assert {balancer.pick("x", []) for _ in range(4)} == {a, c}
    assert balancer.pick("x", [a]) is c


def test_random_two_avoids_the_loaded_backend():
    backends = make_backends(2)
    balancer = make_balancer("random_two", backends, [1, 1])
    backends[0].in_flight = 50
    assert {balancer.pick("x", []) for _ in range(200)} == {backends[1]}


def test_random_two_draws_distinct_pairs_by_weight():
    backends = make_backends(3)
    balancer = make_balancer("random_two", backends, [1, 1000, 1])
    pairs = [balancer.draw_pair() for _ in range(2000)]
    assert all(i != j for i, j in pairs)
    # the heavy backend is nearly always one of the two; the other is 0 or 2
    assert sum(1 in p for p in pairs) / len(pairs) > 0.99


# ip_hash ---------------------------------------------------------------------
CLIENTS = [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}" for i in range(20000)]


def assignment(balancer) -> dict[str, Backend]:
    return {client: balancer.pick(client, []) for client in CLIENTS}


def test_ip_hash_is_sticky_and_weighted():
    """Tolerance: each share within 2 points of weight / sum over 20000 clients."""
    backends, weights = make_backends(3), [1, 2, 3]
    balancer = make_balancer("ip_hash", backends, weights)
    first = assignment(balancer)
    assert assignment(balancer) == first
    rebuilt = make_balancer("ip_hash", backends, weights)  # same rule compiled again
    assert assignment(rebuilt) == first
    counts = Counter(first.values())
    for got, want in zip(shares(counts, backends), expected(weights), strict=True):
        assert abs(got - want) <= 0.02, (got, want)


@pytest.mark.parametrize("new_weight", [1, 2])
def test_ip_hash_adding_a_backend_moves_only_its_share(new_weight):
    backends = make_backends(5)
    before = assignment(make_balancer("ip_hash", backends[:4], [1, 1, 1, 1]))
    after = assignment(make_balancer("ip_hash", backends, [1, 1, 1, 1, new_weight]))
    moved = [c for c in CLIENTS if before[c] is not after[c]]
    share = new_weight / (4 + new_weight)
    # the moved fraction is the new backend's share (within 2 points), and
    # every client that moved went to the new backend
    assert abs(len(moved) / len(CLIENTS) - share) <= 0.02, len(moved) / len(CLIENTS)
    assert all(after[c] is backends[4] for c in moved)


def test_ip_hash_removing_a_backend_moves_only_its_clients():
    backends = make_backends(4)
    before = assignment(make_balancer("ip_hash", backends, [1, 2, 1, 1]))
    after = assignment(make_balancer("ip_hash", [backends[0], backends[2], backends[3]],
                                     [1, 1, 1]))
    for client in CLIENTS:
        if before[client] is not backends[1]:
            assert after[client] is before[client]


def test_ip_hash_falls_back_in_the_clients_own_order():
    backends = make_backends(4)
    balancer = make_balancer("ip_hash", backends, [1, 1, 1, 1])
    order = balancer.candidates("192.0.2.7")
    assert sorted(b.key for b in order) == sorted(b.key for b in backends)
    order[0].checked_down = True
    assert balancer.pick("192.0.2.7", []) is order[1]
    assert balancer.pick("192.0.2.7", [order[1]]) is order[2]


def test_ip_hash_hashes_the_whole_address():
    """As nginx's ip_hash for IPv6 (all 16 bytes) and HAProxy's `balance source` for
    both families (docs/rules.md): the clients of one IPv6 /64, or of one IPv4 /24
    (which nginx's ip_hash sends to one backend), are spread over the backends."""
    backends = make_backends(3)
    balancer = make_balancer("ip_hash", backends, [1, 1, 1])
    for clients in ([f"2001:db8:1:2::{i:x}" for i in range(1, 61)],
                    [f"192.0.2.{i}" for i in range(1, 61)]):
        assert len({balancer.pick(client, []) for client in clients}) == 3, clients[0]


def test_ip_hash_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(balancing, "IP_HASH_CACHE", 100)
    balancer = IpHash(make_backends(3), [1, 1, 1])
    for client in CLIENTS[:1000]:
        balancer.pick(client, [])
    assert len(balancer.cache) <= 100


# what every algorithm guarantees -------------------------------------------------
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_never_repeats_a_tried_backend(algorithm):
    backends = make_backends(4)
    balancer = make_balancer(algorithm, backends, [1, 2, 1, 3])
    for _ in range(50):
        tried: list[Backend] = []
        while (backend := balancer.pick("198.51.100.1", tried)) is not None:
            assert backend not in tried
            tried.append(backend)
        assert sorted(b.key for b in tried) == sorted(b.key for b in backends)


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_down_backends_avoided_but_all_down_still_tried(algorithm):
    backends = make_backends(3)
    balancer = make_balancer(algorithm, backends, [1, 1, 1])
    backends[0].record_failure(fall=1)   # passive down mark
    backends[1].checked_down = True      # active check says down
    assert {balancer.pick("203.0.113.9", []) for _ in range(30)} == {backends[2]}
    backends[2].record_failure(fall=1)
    assert all(b.health_state() == "down" for b in backends)
    tried: list[Backend] = []
    while (backend := balancer.pick("203.0.113.9", tried)) is not None:
        tried.append(backend)
    assert len(tried) == 3


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_a_heavy_backend_down_is_avoided_and_its_weight_passed_over(algorithm):
    """Bug: weighted round robin walked its smooth order only as many steps as it
    has backends, and a backend down that weighs more than the others together
    filled them all: every request went to it anyway (a hung backend's
    `backend_read` each). The others share its requests by their weights, and
    it gets its share again at once when it recovers (nginx passes a down
    peer's weight over the same way)."""
    backends = make_backends(4)
    heavy = backends[0]
    balancer = make_balancer(algorithm, backends, [30, 1, 2, 1])
    heavy.record_failure(fall=1)
    counts = Counter(balancer.pick("203.0.113.11", []) for _ in range(400))
    assert counts[heavy] == 0
    if algorithm != "ip_hash":  # (one client: sticky to one backend)
        for got, want in zip(shares(counts, backends[1:]), expected([1, 2, 1]), strict=True):
            assert abs(got - want) <= 0.05, (algorithm, got, want)
    heavy.record_success()
    if algorithm in ("round_robin", "least_connections"):
        back = Counter(balancer.pick("203.0.113.11", []) for _ in range(34))
        assert back[heavy] == 30, back


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
@pytest.mark.parametrize("down", ["old", "new"])
def test_a_warmup_passes_over_a_side_that_is_down(algorithm, down):
    """A deploy's warmup (`SlowStart`) whose old backends died (stopped early,
    crashed), or whose new ones went down: the drawn side's share goes to the
    other side while none of its backends may take a request (bug: each went
    to a down backend first, a refused connect or a hung backend's
    `backend_read` each). With both sides down every backend is still tried."""
    backends = make_backends(4)
    sides = {"new": backends[:2], "old": backends[2:]}
    warmup = balancing.SlowStart(make_balancer(algorithm, sides["new"], [1, 1]),
                                 make_balancer(algorithm, sides["old"], [1, 1]),
                                 time.time(), 600.0)
    warmup.share, warmup.next_share = 0.5, math.inf  # half the draws go to each side
    for backend in sides[down]:
        backend.record_failure(fall=1)
    picked = {warmup.pick(f"198.51.100.{i}", []) for i in range(100)}
    assert picked and not picked & set(sides[down])
    for backend in backends:
        backend.record_failure(fall=1)
    tried: list[Backend] = []
    while (backend := warmup.pick("198.51.100.1", tried)) is not None:
        tried.append(backend)
    assert len(tried) == 4


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_expired_down_mark_gives_exactly_one_probe(algorithm):
    backends = make_backends(3)
    balancer = make_balancer(algorithm, backends, [1, 1, 1])
    sick = balancer.candidates("203.0.113.10")[0]  # this client's first choice (ip_hash)
    sick.record_failure(fall=1)
    sick.down_until = 0.0  # the fail_timeout has passed
    picks = Counter(balancer.pick("203.0.113.10", []) for _ in range(200))
    assert picks[sick] == 1 and sick.state == PROBING
    sick.record_failure(fall=3)          # the probe failed: down again at once
    assert sick.state == DOWN and not sick.is_available()
    sick.down_until = 0.0
    assert Counter(balancer.pick("203.0.113.10", []) for _ in range(200))[sick] == 1
    sick.record_success()                # the probe answered: fully back
    assert sick.state == UP and sick.is_available()


def test_silent_probe_is_replaced_after_fail_timeout():
    backend = make_backends(1)[0]
    backend.record_failure(fall=1)
    backend.down_until = 0.0
    assert backend.is_available() and backend.state == PROBING
    assert not backend.is_available()    # the probe is out: nobody else
    backend.down_until = 0.0             # ...and never reported back
    assert backend.is_available()


def test_recovery_wakes_waiters():
    backend = make_backends(1)[0]
    event = backend.recovered_event()
    backend.record_success()             # healthy and nothing failed: no news
    assert not event.is_set()
    backend.record_failure(fall=3)
    backend.record_success()
    assert event.is_set() and not backend.recovered_event().is_set()


def test_dead_marks_follow_the_address_not_the_position():
    registry = BackendRegistry(connect_timeout=1.0, fail_timeout=10.0)
    first = [registry.get("10.0.0.1:80"), registry.get("10.0.0.2:80")]
    first[1].record_failure(fall=1)
    second = [registry.get("10.0.0.2:80"), registry.get("10.0.0.3:80")]  # list changed
    assert second[0] is first[1] and second[0].health_state() == "down"
    assert second[1].health_state() == "up"
