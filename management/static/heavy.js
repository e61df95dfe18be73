// "What's heavy": the top clients, paths and backends, and the slow requests in flight.
//
// Invariants:
// * Figures come from /api/v1/top and /api/v1/inflight as answered; text from
//   the API reaches the page through textContent and attributes only (`el`).
// * A management app without these routes (404) hides the panel; any other
//   failure shows its message in the panel and leaves the rest of the page live.
// * Lists are bounded: TOP_LIMIT keys per group, SLOW_ROWS slow requests.

import * as fmt from "./format.js";
import {el} from "./render.js";

export const MEASURES = ["requests", "bytes", "errors", "limited", "in_flight"];
const GROUPS = [["client", "clients"], ["path", "paths"], ["backend", "backends"]];
const WINDOW_S = 60;
const TOP_LIMIT = 5;
export const SLOW_AGE_S = 5;
const SLOW_ROWS = 20;

/** Fetch what the panel shows for `measure`: {tops: {group: answer}, slow}, or
 * {missing: true} when this management app has no such routes. */
export async function fetchHeavy(getJSON, measure) {
  try {
    const answers = await Promise.all(GROUPS.map(([group]) =>
      getJSON(`api/v1/top?by=${measure}&group=${group}&window=${WINDOW_S}&limit=${TOP_LIMIT}`)));
    const slow = await getJSON(`api/v1/inflight?min_age=${SLOW_AGE_S}`);
    const tops = {};
    GROUPS.forEach(([group], i) => { tops[group] = answers[i]; });
    return {measure, tops, slow};
  } catch (err) {
    if (err.status === 404) return {missing: true};
    if (err.status === 401) throw err;
    return {measure, error: err.message};
  }
}

function amount(measure, n) {
  if (measure === "bytes") return fmt.bytes(n);
  const unit = {requests: ["req", "req"], errors: ["error", "errors"],
    limited: ["limited", "limited"], in_flight: ["open", "open"]}[measure];
  return fmt.count(n, ...unit);
}

function label(measure) {
  return measure === "in_flight" ? "in flight now" : `${measure.replace("_", " ")}, last ${WINDOW_S} s`;
}

function bar(percent) {
  // its width set through the CSSOM: a style attribute is refused by the
  // dashboard's Content-Security-Policy (no inline styles)
  const node = el("span", {class: "heavy-bar", "aria-hidden": "true"});
  node.style.width = `${percent}%`;
  return node;
}

function topList(group, title, answer, measure) {
  const rows = answer?.top || [];
  const heaviest = rows.length ? rows[0].count : 0;
  const items = rows.map((row) => el("li", {class: "heavy-item", "data-key": row.key},
    el("span", {class: "heavy-key", title: row.key}, row.key),
    el("span", {class: "heavy-count"}, amount(measure, row.count)),
    bar(heaviest ? Math.max(2, (100 * row.count) / heaviest) : 0)));
  return el("section", {class: "heavy-group", "data-group": group},
    el("h3", {}, `Top ${title}`),
    items.length ? el("ol", {class: "heavy-list"}, items)
      : el("p", {class: "empty"}, "nothing yet"));
}

function slowTable(slow) {
  const rows = (slow?.requests || []).slice(0, SLOW_ROWS);
  if (!rows.length) {
    return el("p", {class: "empty"}, `No request open for more than ${SLOW_AGE_S} s.`);
  }
  const head = el("tr", {}, ["age", "host", "request", "client", "backend", "sent"]
    .map((name) => el("th", {scope: "col"}, name)));
  const body = rows.map((r) => el("tr", {class: "slow-request", "data-request": r.request_id},
    el("td", {class: "num"}, `${r.age.toFixed(1)} s`),
    el("td", {class: "slow-host", title: r.host}, r.host),
    el("td", {class: "slow-path", title: `${r.method} ${r.path}`}, `${r.method} ${r.path}`),
    el("td", {}, r.client),
    el("td", {}, r.backend || fmt.NONE),
    el("td", {class: "num"}, fmt.bytes(r.bytes_sent))));
  const more = rows.length < (slow.requests.length + (slow.left_out || 0))
    ? el("p", {class: "hint"}, `${slow.requests.length + (slow.left_out || 0)} in all`) : null;
  return el("div", {class: "slow-wrap"},
    el("table", {class: "slow"}, el("thead", {}, head), el("tbody", {}, body)), more);
}

/** The panel's content for a fetched `heavy` (see fetchHeavy). */
export function heavyPanel(heavy) {
  if (!heavy) return [el("p", {class: "empty"}, "Loading…")];
  if (heavy.error) return [el("p", {class: "empty"}, `Not available: ${heavy.error}`)];
  const measure = heavy.measure;
  return [
    el("p", {class: "heavy-note"}, `By ${label(measure)}, over every worker.`),
    el("div", {class: "heavy-groups"},
      GROUPS.map(([group, title]) => topList(group, title, heavy.tops[group], measure))),
    el("h3", {class: "slow-title"}, `Slow requests in flight (over ${SLOW_AGE_S} s)`),
    slowTable(heavy.slow),
  ];
}
