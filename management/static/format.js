// Formatting numbers and times for people: every figure carries its unit.
// Pure functions of their arguments; no DOM, no globals.

const BYTE_UNITS = ["B", "KiB", "MiB", "GiB", "TiB"];

/** "—" for a figure we do not have; the dash is never confused with zero. */
export const NONE = "—";

function isNumber(x) {
  return typeof x === "number" && Number.isFinite(x);
}

/** A count with a unit word, "3 req", "1 backend", "2 backends". */
export function count(n, singular, plural = singular + "s") {
  if (!isNumber(n)) return NONE;
  return `${n} ${n === 1 ? singular : plural}`;
}

/** A rate: one decimal below 10, whole numbers above. */
export function rate(x) {
  if (!isNumber(x)) return NONE;
  return `${x < 10 ? x.toFixed(1) : Math.round(x)} req/s`;
}

/** A latency in seconds for people: "850 µs", "12.5 ms", "1.20 s". */
export function duration(seconds) {
  if (!isNumber(seconds)) return NONE;
  if (seconds < 0.001) return `${Math.round(seconds * 1e6)} µs`;
  if (seconds < 1) return `${(seconds * 1000).toFixed(seconds < 0.01 ? 2 : 1)} ms`;
  return `${seconds.toFixed(2)} s`;
}

/** A percentage with one decimal. */
export function percent(x) {
  if (!isNumber(x)) return NONE;
  return `${x.toFixed(x > 0 && x < 0.1 ? 2 : 1)} %`;
}

/** Bytes in binary units, "1.5 MiB". */
export function bytes(n) {
  if (!isNumber(n)) return NONE;
  let unit = 0;
  while (n >= 1024 && unit < BYTE_UNITS.length - 1) {
    n /= 1024;
    unit += 1;
  }
  return `${unit === 0 ? n : n.toFixed(1)} ${BYTE_UNITS[unit]}`;
}

function pad(n) {
  return String(n).padStart(2, "0");
}

/** A local wall-clock time "14:03:09" from milliseconds since the epoch. */
export function clock(ms) {
  if (!isNumber(ms) || ms <= 0) return NONE;
  const d = new Date(ms);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** How long ago, "4 s ago", "3 min ago", "2 h ago", "5 d ago". */
export function ago(ms, now) {
  if (!isNumber(ms) || ms <= 0) return NONE;
  const s = Math.max(0, Math.round((now - ms) / 1000));
  if (s < 90) return `${s} s ago`;
  if (s < 90 * 60) return `${Math.round(s / 60)} min ago`;
  if (s < 36 * 3600) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

/** A Unix timestamp in seconds (as the API sends it) as "14:03:09 (3 min ago)". */
export function moment(unixSeconds, now) {
  if (!isNumber(unixSeconds) || unixSeconds <= 0) return "never";
  const ms = unixSeconds * 1000;
  return `${clock(ms)} (${ago(ms, now)})`;
}
