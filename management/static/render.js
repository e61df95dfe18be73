// Building the page's DOM from one consistent view of the API.
//
// Invariants:
// * Text from the API only ever reaches the page through textContent or
//   attributes, never as HTML.
// * Every state is told by a word and a symbol as well as a colour.
// * These functions read their arguments and return elements; they keep no state.

import {peak, sparkline} from "./charts.js";
import * as fmt from "./format.js";
import {WINDOW_MS} from "./history.js";

const MAX_GAP_MS = 10000;
const UNKNOWN_KEY = "(unknown)";
const STATES = {
  up: {symbol: "✓", text: "up"},
  down: {symbol: "✗", text: "down"},
  probing: {symbol: "…", text: "probing"},
  unknown: {symbol: "?", text: "no data"},
};

/** `el("td", {class: "x"}, "text", child)`: an element with attributes and children. */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value !== undefined && value !== null && value !== false) node.setAttribute(name, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function badge(kind, symbol, text) {
  return el("span", {class: `badge badge-${kind}`}, el("span", {"aria-hidden": "true"}, symbol),
    " ", text);
}

// ---- actions and backends --------------------------------------------------

function backendAddress(backend) {
  return typeof backend === "string" ? backend : backend.address;
}

function backendWeight(backend) {
  return typeof backend === "string" ? 1 : backend.weight ?? 1;
}

/** One line telling what a rule does, "round_robin · 2 retries · health /healthz". */
export function ruleSummary(rule) {
  const parts = [];
  if (rule.action === "proxy") {
    parts.push(rule.algorithm || "round_robin");
    if (rule.retries !== undefined) parts.push(fmt.count(rule.retries, "retry", "retries"));
    if (rule.health) parts.push(`health ${rule.health.path || "/"}`);
  } else if (rule.action === "spin") {
    parts.push(`holds requests up to ${rule.timeout ?? 120} s`);
  } else if (rule.action === "static") {
    parts.push(rule.page ? `page “${rule.page}”` : `status ${rule.status ?? 200}`);
  } else if (rule.action === "redirect") {
    parts.push(`${rule.status ?? 301} → ${rule.to}${rule.keep_path ? " + path" : ""}`);
  } else if (rule.action === "empty") {
    parts.push(`status ${rule.status}`);
  }
  if (rule.subdomains) parts.push("+ subdomains");
  return parts.join(" · ");
}

/** Configured backends of a proxy rule, each with its live stats (or none yet). */
export function backendRows(rule, hostStats) {
  if (!rule || rule.action !== "proxy") return [];
  const live = (hostStats && hostStats.backends) || {};
  return (rule.backends || []).map((backend) => {
    const address = backendAddress(backend);
    const stats = live[address];
    return {address, weight: backendWeight(backend), stats, state: backendState(stats)};
  });
}

/** "up" only when the balancer says so: a backend that failed stays "down" (or
 * "probing" while one request tries it) until a request or a check succeeds. */
function backendState(stats) {
  if (!stats) return "unknown";
  return STATES[stats.state] && stats.state !== "unknown" ? stats.state : "down";
}

/** Down or probing: a backend not known to answer. */
function isDown(state) {
  return state === "down" || state === "probing";
}

function backendTable(rows) {
  const head = el("tr", {}, ["backend", "weight", "state", "in flight", "failures", "p50 / p99"]
    .map((name) => el("th", {scope: "col"}, name)));
  const body = rows.map((row) => el("tr", {class: `backend backend-${row.state}`,
    "data-backend": row.address},
  el("td", {class: "backend-address", title: row.address}, row.address),
  el("td", {class: "num"}, `×${row.weight}`),
  el("td", {class: `backend-state state-${row.state}`},
    badge(row.state, STATES[row.state].symbol, STATES[row.state].text)),
  el("td", {class: "num"}, fmt.count(row.stats?.in_flight, "req", "req")),
  el("td", {class: "num"}, fmt.count(row.stats?.failures, "failure")),
  el("td", {class: "num backend-latency"}, latencyPair(row.stats?.latency))));
  return el("table", {class: "backends"}, el("thead", {}, head), el("tbody", {}, body));
}

// ---- host cards ---------------------------------------------------------------

/** The overall state of a host: {kind, symbol, text}. */
export function hostHealth(rule, rows, hostStats) {
  const down = rows.filter((r) => isDown(r.state)).length;
  const spinning = hostStats?.spinning || 0;
  if (rows.length && down === rows.length) {
    return {kind: "down", symbol: "✗", text: "all backends down"};
  }
  if (down) return {kind: "degraded", symbol: "!", text: `${down} of ${rows.length} backends down`};
  if (spinning) return {kind: "spinning", symbol: "↻", text: `${spinning} held (deploying)`};
  if (!rule) return {kind: "unknown", symbol: "·", text: "not in the table"};
  return {kind: "up", symbol: "✓", text: "serving"};
}

function latencyPair(latency) {
  return `${fmt.duration(latency?.p50)} / ${fmt.duration(latency?.p99)}`;
}

function figure(label, value, cls) {
  return el("div", {class: `figure ${cls || ""}`}, el("dt", {}, label), el("dd", {}, value));
}

function hostFigures(hostStats, latest) {
  const s = hostStats || {};
  return el("dl", {class: "figures"},
    figure("requests", fmt.rate(latest?.rps), "fig-rps"),
    figure("5xx", latest && latest.errorPct === null ? "no requests"
      : fmt.percent(latest?.errorPct), "fig-errors"),
    figure("open", fmt.count(s.open_requests, "req", "req"), "fig-open"),
    figure("spinning", fmt.count(s.spinning, "req", "req"), "fig-spinning"),
    figure("received", fmt.bytes(s.bytes_received), "fig-in"),
    figure("sent", fmt.bytes(s.bytes_sent), "fig-out"),
    figure("p50", fmt.duration(s.latency?.p50), "fig-p50"),
    figure("p99", fmt.duration(s.latency?.p99), "fig-p99"),
    s.limited ? figure("limited", fmt.count(s.limited, "req", "req"), "fig-limited") : null);
}

function chart(points, field, options) {
  const now = options.now;
  const top = peak(points, field);
  const caption = el("figcaption", {}, el("span", {}, `${options.title} · 5 min`),
    el("span", {class: "peak"}, `peak ${options.format(top)}`));
  const label = `${options.title} over the last 5 minutes, peak ${options.format(top)}`;
  return el("figure", {class: `chart chart-${field}`}, caption,
    sparkline(points, field, {now, windowMs: WINDOW_MS, maxGapMs: MAX_GAP_MS,
      floor: options.floor, label, tone: options.tone}));
}

function hostCharts(points, latencyPoints, now) {
  return el("div", {class: "charts"},
    chart(points, "rps", {now, title: "requests/s", format: fmt.rate, floor: 1, tone: "rps"}),
    chart(points, "errorPct", {now, title: "5xx rate", format: fmt.percent, floor: 5,
      tone: "errors"}),
    latencyPoints.length ? chart(latencyPoints, "p99", {now, title: "p99 latency",
      format: fmt.duration, floor: 0.01, tone: "latency"}) : null);
}

/** The p50/p99 points of `key` in a `/api/v1/history` answer (empty without one). */
export function latencyPoints(doc, key) {
  const series = doc?.hosts?.[key];
  if (!series) return [];
  return (doc.times || []).map((seconds, i) => ({t: seconds * 1000, p50: series.p50[i],
    p99: series.p99[i]}));
}

function hostTitle(key) {
  if (key === UNKNOWN_KEY) return "unmatched requests";
  return key;
}

/** The card of one host (or stats key) with its figures, charts and backends. */
export function hostCard(key, rule, hostStats, history, now, latencyHistory = null) {
  const rows = backendRows(rule, hostStats);
  const health = hostHealth(rule, rows, hostStats);
  const action = rule ? rule.action : "404";
  return el("article", {class: `host host-${health.kind}`, "data-host": key},
    el("header", {class: "host-head"},
      el("h3", {class: "host-name"}, hostTitle(key)),
      el("span", {class: `action action-${rule ? rule.action : "none"}`}, action),
      badge(health.kind, health.symbol, health.text)),
    rule ? el("p", {class: "rule"}, ruleSummary(rule)) : null,
    hostFigures(hostStats, history.latest(key)),
    hostCharts(history.points(key), latencyPoints(latencyHistory, key), now),
    rows.length ? backendTable(rows) : null);
}

/** The table's keys (alphabetical), then unmatched requests when there were any.
 * A host removed from the table has no card (see `removedLine`), even while
 * the stats still count its past traffic. */
export function hostKeys(hosts, statsHosts) {
  const unknown = statsHosts[UNKNOWN_KEY];
  const tail = unknown && hasTraffic(unknown) && !(UNKNOWN_KEY in hosts) ? [UNKNOWN_KEY] : [];
  return [...Object.keys(hosts).sort(), ...tail];
}

/** "Recently removed: a.example.com (2 min ago), ..." for `removed` (key -> ms), or null. */
export function removedLine(removed, now) {
  const entries = [...removed.entries()].sort((a, b) => b[1] - a[1]);
  if (!entries.length) return null;
  const items = entries.flatMap(([key, when], i) => [i ? ", " : "",
    el("span", {class: "removed-host", "data-removed": key}, key), ` (${fmt.ago(when, now)})`]);
  return el("p", {class: "removed"}, "Recently removed: ", ...items);
}

function hasTraffic(hostStats) {
  return (hostStats.completed_requests || 0) + (hostStats.open_requests || 0) > 0;
}

// ---- summary and banners --------------------------------------------------------

function tile(name, value, detail, kind) {
  return el("section", {class: `tile ${kind ? "tile-" + kind : ""}`, "data-tile": name},
    el("h2", {}, name), el("p", {class: "tile-value"}, value),
    el("p", {class: "tile-detail"}, detail));
}

function trafficTotals(keys, history) {
  let rps = 0;
  let errors = 0;
  let known = false;
  for (const key of keys) {
    const latest = history.latest(key);
    if (!latest || latest.rps === null) continue;
    known = true;
    rps += latest.rps;
    errors += latest.errorPct === null ? 0 : (latest.rps * latest.errorPct) / 100;
  }
  return known ? {rps, errorPct: rps > 0 ? (100 * errors) / rps : null} : null;
}

/** A long URL or path that may wrap after each "/" (not in the middle of a name). */
function breakable(text) {
  return text.split("/").flatMap((part, i) => (i ? ["/", el("wbr"), part] : [part]));
}

function storeTile(view) {
  const store = view.info?.store;
  const reachable = view.storeReachable;
  const state = reachable ? badge("up", "✓", "reachable") : badge("down", "✗", "unreachable");
  const kind = store?.kind || "store";
  return tile("store", el("span", {}, `${kind} `, state), breakable(store?.url || ""),
    reachable ? "" : "down");
}

function routingTile(view, now) {
  const serving = view.stats.routing_version;
  const stored = view.version;
  const lag = stored !== serving ? ` · store at v${stored}` : "";
  const reloaded = view.info?.store?.last_reload ?? view.stats.last_reload;
  const reloads = fmt.count(view.stats.config_reloads, "reload");
  return tile("routing", `v${serving}`,
    `reloaded ${fmt.moment(reloaded, now)} · ${reloads}${lag}`);
}

/** The row of summary tiles at the top of the page. */
export function summaryTiles(view, history, now) {
  const keys = Object.keys(view.stats.hosts || {});
  const totals = trafficTotals(keys, history);
  const hostsWithDown = Object.entries(view.hosts).filter(([key, rule]) =>
    backendRows(rule, view.stats.hosts?.[key]).some((r) => isDown(r.state))).length;
  const spinning = keys.reduce((n, k) => n + (view.stats.hosts[k].spinning || 0), 0);
  const workers = view.info ? fmt.count(view.info.workers, "worker") : fmt.NONE;
  const workersDetail = !view.info ? "not reported" : view.info.workers ? "processes"
    : "no data plane attached";
  return [
    tile("traffic", fmt.rate(totals?.rps), `5xx ${fmt.percent(totals?.errorPct)}`),
    tile("connections", fmt.count(view.stats.open_connections, "open", "open"),
      "client connections"),
    tile("spinning", fmt.count(spinning, "req", "req"), "held while deploying",
      spinning ? "warn" : ""),
    tile("hosts", fmt.count(Object.keys(view.hosts).length, "host"),
      hostsWithDown ? `${hostsWithDown} with backends down` : "all backends up",
      hostsWithDown ? "down" : ""),
    storeTile(view),
    routingTile(view, now),
    tile("workers", workers, workersDetail),
  ];
}

/** A banner: `kind` is "error" or "warn". */
export function banner(kind, title, text) {
  return el("div", {class: `banner banner-${kind}`, role: kind === "error" ? "alert" : "status"},
    el("span", {class: "banner-symbol", "aria-hidden": "true"}, kind === "error" ? "✗" : "!"),
    el("strong", {}, title), " ", text);
}
