"""One hour of traffic history at 5 s resolution, kept by the management process.

Every `INTERVAL` seconds `History.sample` takes the merged stats (every
worker's counters) and records, per host and for the whole balancer:
requests/s, the 5xx share of the requests completed in the interval, and
the p50/p99 latency of those requests (from the histograms' deltas).

Invariants:
* Memory is fixed per host: a ring of `POINTS` float32 values per series,
  at most `MAX_HOSTS` hosts (past that the busiest, by requests completed,
  a host kept staying until another completed `KEEP_MARGIN` times as many;
  the others are left out and counted); a host that leaves the stats leaves
  the history. The whole balancer's series count every host, those left out
  too (bug: only the hosts kept, so past `MAX_HOSTS` a part of the traffic
  was shown as the whole).
* A counter that went down (counters of a worker not yet folded, a host
  re-added) yields a gap (null), never a negative rate.
* It survives a reload of the workers and of the management process itself:
  `save` writes the rings to the run directory (every `SAVE_EVERY` samples
  and when the process stops; a periodic save that fails is logged once
  until one succeeds, its temporary file removed), `load` reads them at
  start, and a file the
  previous management process saved after this one loaded (it stops once
  the new one is ready) is read once more during the first samples.
* ``GET /api/v1/history`` costs one encoding per sample and query, not one
  per request (an hour of 1,000 hosts is ~13 MB of JSON): `encoded_view`
  keeps the bytes of each query answered since the last sample (at most
  `CACHE_BYTES` in all), and builds them `HOSTS_PER_PAUSE` hosts at a time
  from a copy of the rings, calling `pause` in between (the management
  process's loop runs other requests; concurrent askers of the same query
  wait for the one build). The bytes are those of the view's compact JSON.
* A sample reads, sums and ranks its hosts `SAMPLED_PER_PAUSE` at a time, and
  works out the points of those kept `POINTS_PER_PAUSE` at a time, calling
  `pause` in between (bug: 20,000 hosts summed in one go held the process
  0.12 s every 5 s; 50,000 ranked in one sort, 57 ms; 1,001 points in one
  go); it changes the rings only after, in one go.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import math
import os
from array import array
from collections.abc import Callable, Container
from typing import Any

from management.latency import delta, quantile

INTERVAL = 5.0
POINTS = 720  # one hour
MAX_HOSTS = 1000
KEEP_MARGIN = 1.25  # a kept host's requests count this much more when ranking (`_busiest`)
SERIES = ("rps", "error_rate", "p50", "p99")
SAVE_EVERY = 6  # samples between saves (30 s)
ADOPT_WITHIN = 4  # samples during which a newer saved file replaces this one's history
FILE_NAME = "history.json"
FORMAT = 2  # the saved file's; 2: histograms as counts (`balancer.stats.histogram`)
TOTAL = ""  # the ring key of the whole balancer
CACHE_BYTES = 32 * 1024 * 1024  # encoded views kept until the next sample
HOSTS_PER_PAUSE = 50  # hosts encoded between two calls of `pause`
SAMPLED_PER_PAUSE = 2000  # hosts a sample reads (sums, ranks) between two calls of `pause`
POINTS_PER_PAUSE = 200  # points (rates and quantiles) a sample works out between two


log = logging.getLogger("balancer.history")


def _ring() -> array:
    return array("f", [math.nan]) * (POINTS * len(SERIES))


class History:
    """The rings of every host and of the whole balancer (see the module doc)."""

    def __init__(self, path: str | None = None, pause: Callable[[], None] | None = None) -> None:
        self.path = path
        self.pause = pause  # lets other requests run during a big encoding (`balancer.turns.turn`)
        self.generation = 0  # changes with every sample and load: the cache's key
        self.cache: dict[Any, bytes] = {}  # (generation, picked, host) → bytes, till a sample
        self.building: dict[Any, Any] = {}  # the same → the `gevent.event.Event` of its build
        self.times = array("d", [0.0]) * POINTS  # unix time of each point, 0 = none
        self.head = 0  # the next point's index
        self.rings: dict[str, array] = {}
        self.last: dict[str, Any] = {}  # the previous sample's counters, per key
        self.last_time = 0.0
        self.samples = 0  # taken by this process
        self.loaded_mtime = 0.0
        self.left_out = 0  # hosts beyond MAX_HOSTS at the last sample
        self.save_problem: str | None = None  # why the last periodic save failed

    # recording -------------------------------------------------------------------
    def sample(self, snapshot: dict[str, Any], now: float) -> None:
        """Record one point from a merged stats snapshot taken at `now` (unix time)."""
        hosts = snapshot.get("hosts", {})
        every = self._every(hosts)
        total = _total(every.values(), self.pause)  # (the pauses before any change)
        # The snapshot holds the hosts that have seen a request (`Runtime.stats` with
        # "active"): one the previous sample lacked, when it left none out, was idle.
        idle = IDLE if not self.left_out else None
        counters = {key: every[key] for key in _busiest(every, self.rings, self.pause)}
        counters[TOTAL] = total
        seconds = now - self.last_time if self.last_time else 0.0
        points = self._points(counters, idle, seconds)
        self.left_out = max(0, len(hosts) - MAX_HOSTS)
        i = self.head
        for key in list(self.rings):
            if key not in counters:
                del self.rings[key]
        for key, values in points.items():
            ring = self.rings.get(key)
            if ring is None:
                ring = self.rings[key] = _ring()
            for s, value in enumerate(values):
                ring[s * POINTS + i] = math.nan if value is None else value
        self.times[i] = now
        self.head = (i + 1) % POINTS
        self.generation += 1
        self.cache = {}
        self.last, self.last_time = counters, now
        self.samples += 1
        if self.samples % SAVE_EVERY == 0:
            self.save_in_passing()
        elif self.samples <= ADOPT_WITHIN:
            self.adopt_newer()

    def _every(self, hosts: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Each host's counters, `SAMPLED_PER_PAUSE` hosts between two pauses."""
        every = {}
        for n, (key, h) in enumerate(list(hosts.items())):
            if n and n % SAMPLED_PER_PAUSE == 0 and self.pause is not None:
                self.pause()
            every[key] = _counters(h)
        return every

    def _points(self, counters: dict[str, Any], idle: dict[str, Any] | None,
                seconds: float) -> dict[str, tuple[float | None, ...]]:
        """Each key's point (`_point`), `POINTS_PER_PAUSE` keys between two pauses."""
        points = {}
        for n, (key, now_counters) in enumerate(counters.items()):
            if n and n % POINTS_PER_PAUSE == 0 and self.pause is not None:
                self.pause()
            points[key] = _point(now_counters, self.last.get(key, idle), seconds)
        return points

    # reading -----------------------------------------------------------------------
    def view(self, since: float, now: float, host: str | None = None) -> dict[str, Any]:
        """The points of the last `since` seconds, oldest first: ``{"interval",
        "times", "total": {SERIES: [...]}, "hosts": {HOST: {SERIES: [...]}}}``."""
        picked = self._picked(since, now)
        hosts = [host] if host is not None else [k for k in self.rings if k != TOTAL]
        return {"interval": INTERVAL, "times": [round(self.times[i], 3) for i in picked],
                "total": self._series(TOTAL, picked),
                "hosts": {k: self._series(k, picked) for k in sorted(hosts) if k in self.rings},
                "hosts_left_out": self.left_out}

    def _picked(self, since: float, now: float) -> list[int]:
        """The ring indexes of the points of the last `since` seconds, oldest first."""
        order = [(self.head + n) % POINTS for n in range(POINTS)]
        return [i for i in order if self.times[i] and self.times[i] >= now - since]

    def _series(self, key: str, picked: list[int]) -> dict[str, list[float | None]]:
        return _series_of(self.rings.get(key), picked)

    def encoded_view(self, since: float, now: float, host: str | None = None) -> bytes:
        """`view` as compact JSON (and a newline), built once per sample and query."""
        key = (self.generation, tuple(self._picked(since, now)), host)
        while key not in self.cache and key in self.building:
            self.building[key].wait()  # another request builds it: wait for its bytes
        body = self.cache.get(key)
        if body is not None:
            return body
        from gevent.event import Event

        self.building[key] = done = Event()
        try:
            body = self._encode(key[1], host)
        finally:
            del self.building[key]
            done.set()
        if key[0] == self.generation and \
                sum(map(len, self.cache.values())) + len(body) <= CACHE_BYTES:
            self.cache[key] = body
        return body

    def _encode(self, picked: tuple[int, ...], host: str | None) -> bytes:
        """`view`'s JSON for the points `picked`, from a copy of the rings taken first
        (a sample may come during a pause), `HOSTS_PER_PAUSE` hosts at a time."""
        keys = [host] if host is not None else sorted(k for k in self.rings if k != TOTAL)
        rings = {k: self.rings[k][:] for k in keys if k in self.rings}
        head = {"interval": INTERVAL, "times": [round(self.times[i], 3) for i in picked],
                "total": self._series(TOTAL, list(picked)), "hosts": {},
                "hosts_left_out": self.left_out}
        before, _, after = _dumps(head).partition('"hosts":{}')
        parts = [before, '"hosts":{']
        for n, key in enumerate(rings):
            if n and n % HOSTS_PER_PAUSE == 0 and self.pause is not None:
                self.pause()
            parts.append(("," if n else "") + _dumps(key) + ":"
                         + _dumps(_series_of(rings[key], picked)))
        parts += ["}", after, "\n"]
        return "".join(parts).encode()

    # keeping it across reloads ------------------------------------------------------
    def save(self) -> None:
        """Write the rings to `path` (atomically); a failure is logged by the caller's loop."""
        if self.path is None:
            return
        doc = {"format": FORMAT, "points": POINTS, "series": list(SERIES), "head": self.head,
               "times": _b64(self.times), "last_time": self.last_time, "last": self.last,
               "rings": {k: _b64(r) for k, r in self.rings.items()}}
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w") as out:
                json.dump(doc, out)
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):  # a full disk: its part is no use
                os.unlink(tmp)
            raise

    def save_in_passing(self) -> None:
        """The periodic save. Bug: a failed one (the run directory's file system
        full) logged its traceback every 30 s, and left its part written."""
        try:
            self.save()
        except OSError as exc:
            if self.save_problem is None:
                log.error("history: cannot save to %s: %s; trying again every %.0f s",
                          self.path, exc.strerror or exc, SAVE_EVERY * INTERVAL)
            self.save_problem = str(exc)
            return
        if self.save_problem is not None:
            log.info("history: saved to %s again", self.path)
            self.save_problem = None

    def load(self) -> bool:
        """Read what a previous management process saved; False if there is nothing usable."""
        if self.path is None:
            return False
        try:
            mtime = os.stat(self.path).st_mtime
            with open(self.path) as f:
                doc = json.load(f)
            if doc.get("points") != POINTS or doc.get("series") != list(SERIES):
                return False
            times = _unb64("d", doc["times"], POINTS)
            rings = {k: _unb64("f", v, POINTS * len(SERIES)) for k, v in doc["rings"].items()}
            head, last_time = int(doc["head"]) % POINTS, float(doc["last_time"])
            last = doc.get("last") if doc.get("format") == FORMAT else None
            if not isinstance(last, dict):  # (another format's: the next sample a gap;
                last, last_time = {}, 0.0  # bug: each host's counters from 0, a spike)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False  # (AttributeError: a JSON list or string, not the object saved)
        self.times, self.rings, self.head = times, rings, head
        self.generation += 1
        self.cache = {}
        self.last, self.last_time, self.loaded_mtime = last, last_time, mtime
        return True

    def adopt_newer(self) -> None:
        """Early on, take a file saved after ours was loaded (the previous process's last)."""
        with contextlib.suppress(OSError):
            if self.path and os.stat(self.path).st_mtime > self.loaded_mtime + 1e-6:
                samples = self.samples
                if self.load():
                    self.samples = samples


def _counters(h: dict[str, Any]) -> dict[str, Any]:
    return {"completed": h.get("completed_requests", 0),
            "errors": h.get("responses", {}).get("5xx", 0),
            "counts": h.get("duration", {}).get("counts") or []}


def _busiest(every: dict[str, dict[str, Any]], kept: Container[str],
             pause: Callable[[], None] | None = None) -> list[str]:
    """The hosts kept: all of them up to `MAX_HOSTS`, else the `MAX_HOSTS` that
    completed the most requests, those `kept` already counting `KEEP_MARGIN`
    times theirs (bug: the first in alphabetical order, so a busy host named
    late had no history while hosts with one request did; then, without the
    margin, two hosts as busy as each other at the cap overtook each other by
    turns, each dropping the other's ring: neither ever showed a rate).
    Ranked `SAMPLED_PER_PAUSE` hosts between two calls of `pause`, each slice
    with the best so far (bug: all in one sort, 57 ms at 50,000 hosts)."""
    if len(every) <= MAX_HOSTS:
        return list(every)
    keys = list(every)
    best: list[tuple[float, bool, str]] = []
    for start in range(0, len(keys), SAMPLED_PER_PAUSE):
        if start and pause is not None:
            pause()
        ranked = [(-every[key]["completed"] * (KEEP_MARGIN if key in kept else 1),
                   key not in kept, key) for key in keys[start:start + SAMPLED_PER_PAUSE]]
        best = sorted(best + ranked)[:MAX_HOSTS]
    return [key for *_, key in best]


def _total(all_counters: Any, pause: Callable[[], None] | None = None) -> dict[str, Any]:
    """The whole balancer's counters: every host's summed, `SAMPLED_PER_PAUSE` hosts
    between two calls of `pause`."""
    total: dict[str, Any] = {"completed": 0, "errors": 0, "counts": []}
    for n, c in enumerate(list(all_counters)):
        if n and n % SAMPLED_PER_PAUSE == 0 and pause is not None:
            pause()
        total["completed"] += c["completed"]
        total["errors"] += c["errors"]
        counts = total["counts"]
        if not counts:
            total["counts"] = list(c["counts"])
        elif len(c["counts"]) == len(counts):
            total["counts"] = [n + m for n, m in zip(counts, c["counts"], strict=True)]
    return total


IDLE: dict[str, Any] = {"completed": 0, "errors": 0, "counts": []}  # a host without requests


def _point(now: dict[str, Any], before: dict[str, Any] | None, seconds: float
           ) -> tuple[float | None, ...]:
    """(rps, error_rate, p50, p99) between two samples; None where unknown."""
    if before is None or seconds <= 0:
        return (None, None, None, None)
    done = now["completed"] - before["completed"]
    errors = now["errors"] - before["errors"]
    if done < 0 or errors < 0:
        return (None, None, None, None)
    counts = delta(now["counts"], before.get("counts"))
    return (done / seconds, errors / done if done else None,
            quantile(counts, 0.5) if done else None, quantile(counts, 0.99) if done else None)


def _series_of(ring: array | None, picked: Any) -> dict[str, list[float | None]]:
    """The series of one ring at the points `picked` (all null without a ring)."""
    if ring is None:
        return {name: [None] * len(picked) for name in SERIES}
    series = {}
    for s, name in enumerate(SERIES):
        values = ring[s * POINTS:(s + 1) * POINTS].tolist()
        series[name] = [None if v != v else round(v, 4) for v in map(values.__getitem__, picked)]
    return series


def _dumps(value: Any) -> str:
    """`value` as the API's compact JSON (`management.http.json_response`)."""
    return json.dumps(value, indent=None, separators=(",", ":"), allow_nan=False)


def _b64(values: array) -> str:
    return base64.b64encode(values.tobytes()).decode()


def _unb64(code: str, text: str, size: int) -> array:
    values = array(code)
    values.frombytes(base64.b64decode(text))
    if len(values) != size:
        raise ValueError("wrong size")
    return values
