// Per-host traffic history: the API sends counters; rates are ours to compute.
//
// Invariants:
// * The series may start with the management process's own history (`seed`),
//   each point as the server computed it for its 5 s interval.
// * A point is made from two successful polls: requests/s is the delta of
//   `completed_requests` over the elapsed time, error rate the share of 5xx
//   among the requests completed in that interval (null when there were none).
// * A counter that goes down (a worker restarted, stats were reset) never
//   yields a negative rate: it records a gap and starts a new series.
// * Only the last WINDOW_MS are kept; a host that leaves the stats is dropped.

export const WINDOW_MS = 5 * 60 * 1000;

function counters(hostStats) {
  const responses = hostStats.responses || {};
  return {completed: hostStats.completed_requests || 0, errors: responses["5xx"] || 0};
}

function pointBetween(last, now, t) {
  const seconds = (t - last.t) / 1000;
  const requests = now.completed - last.completed;
  const errors = now.errors - last.errors;
  if (seconds <= 0 || requests < 0 || errors < 0) return {t, rps: null, errorPct: null};
  return {
    t,
    rps: requests / seconds,
    errorPct: requests > 0 ? (100 * errors) / requests : null,
  };
}

export class History {
  constructor() {
    /** key -> {last: {t, completed, errors}, points: [{t, rps, errorPct}]} */
    this.series = new Map();
  }

  /** Add one stats snapshot (`stats.hosts`) taken at `t` (ms since the epoch). */
  record(hosts, t) {
    for (const key of [...this.series.keys()]) {
      if (!(key in hosts)) this.series.delete(key);
    }
    for (const [key, hostStats] of Object.entries(hosts)) {
      this.recordHost(key, counters(hostStats), t);
    }
  }

  recordHost(key, now, t) {
    const series = this.series.get(key);
    if (!series) {
      this.series.set(key, {last: {t, ...now}, points: []});
      return;
    }
    if (!series.last) { // seeded from the server's history: rates start at the next poll
      series.last = {t, ...now};
      return;
    }
    series.points.push(pointBetween(series.last, now, t));
    series.last = {t, ...now};
    const oldest = t - WINDOW_MS;
    while (series.points.length && series.points[0].t < oldest) series.points.shift();
  }

  /** Start with the management process's history (`/api/v1/history`), so the
   * charts are full at once; hosts already followed keep their own points. */
  seed(doc, t) {
    const times = (doc && doc.times) || [];
    for (const [key, series] of Object.entries((doc && doc.hosts) || {})) {
      if (this.series.has(key)) continue;
      const points = times.map((seconds, i) => ({
        t: seconds * 1000,
        rps: series.rps[i],
        errorPct: series.error_rate[i] === null ? null : 100 * series.error_rate[i],
      })).filter((p) => p.t >= t - WINDOW_MS);
      this.series.set(key, {last: null, points});
    }
  }

  /** Points of the last five minutes, oldest first (empty if unknown). */
  points(key) {
    const series = this.series.get(key);
    return series ? series.points : [];
  }

  /** The most recent point, or null before the second poll. */
  latest(key) {
    const points = this.points(key);
    return points.length ? points[points.length - 1] : null;
  }
}
