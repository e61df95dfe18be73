// Deploys on the dashboard: the running deploy on its host card and the recent deploys.
// Pure functions of their arguments (records from GET /api/v1/deploys); no state.

import {el} from "./render.js";

const RECENT = 10; // deploys listed under "Recent deploys"

function names(entries) {
  return (entries || []).map((e) => (typeof e === "string" ? e : e.address)).join(", ") || "—";
}

function seconds(from, to) {
  return `${Math.max(0, to - from).toFixed(1)} s`;
}

/** The running deploy of each host: host -> record. */
export function runningByHost(records) {
  const running = new Map();
  for (const record of records || []) {
    if (record.state === "running" && !running.has(record.host)) running.set(record.host, record);
  }
  return running;
}

/** The line a host card shows while a deploy runs: step, time, new and draining backends,
 * and its Abort button (dashboard.js sends the abort; disabled once one is under way). */
export function deployLine(record, now) {
  const step = record.step || "ready";
  const aborting = Boolean(record.abort); // (its own step, "abort", follows the one it stopped)
  const current = (record.steps || []).find((s) => s.name === (aborting ? "abort" : step) && !s.ended);
  const since = current ? current.started : record.started;
  const problem = aborting && record.abort.problem;
  return el("p", {class: "deploy-line", "data-deploy": record.id},
    el("span", {class: "deploy-step"},
      `${record.kind || "deploy"}: ${step}${aborting ? " (aborting)" : ""}`),
    ` for ${seconds(since, now / 1000)} (started ${seconds(record.started, now / 1000)} ago)`,
    " · new ", el("span", {class: "deploy-backends"}, names(record.to)),
    step === "ready" || step === "switch" ? " · old " : " · draining ",
    el("span", {class: "deploy-backends"}, names(record.from)),
    current && current.detail ? ` · ${current.detail}` : "",
    problem ? el("span", {class: "deploy-problem"}, ` · not carried out yet: ${problem}`) : "",
    " ",
    el("button", {type: "button", class: "deploy-abort", "data-host": record.host,
      "data-deploy": record.id, disabled: aborting,
      title: "Stop this deploy: the host goes back to the backends it "
        + "started from (DELETE /api/v1/deploys/ID: this deploy, never a later one)"},
    aborting ? "Aborting…" : "Abort"));
}

/** What the dashboard says after an abort's answer (status, body). */
export function abortNote(host, status, body) {
  const record = body && body.deploy;
  if (status === 200 && record) {
    const last = (record.steps || [])[record.steps.length - 1] || {};
    return `Deploy of ${host} aborted: ${last.name === "abort" ? last.detail : "nothing was switched"}`;
  }
  if (status === 202 && record) return `Deploy of ${host}: abort asked; it is stopping`;
  const message = (body && (body.message || body.error)) || `HTTP ${status}`;
  return `Abort of the deploy of ${host} refused (${status}): ${message}`;
}

function row(record) {
  const last = (record.steps || [])[record.steps.length - 1] || {};
  const ended = record.ended ? seconds(record.started, record.ended) : "…";
  const outcome = record.state === "failed" ? record.error
    : record.state === "aborted" ? `aborted: ${last.name === "abort" ? last.detail : "nothing was switched"}`
      : (record.warning || last.outcome || "");
  const when = new Date(record.started * 1000).toLocaleTimeString();
  return el("tr", {class: `deploy deploy-${record.state}`, "data-deploy": record.id},
    el("td", {}, when), el("td", {class: "deploy-host"}, record.host),
    el("td", {}, record.kind), el("td", {}, record.state), el("td", {}, record.step || ""),
    el("td", {class: "deploy-backends"}, `${names(record.from)} → ${names(record.to)}`),
    el("td", {}, ended), el("td", {class: "deploy-outcome"}, outcome || ""));
}

/** The "Recent deploys" table, or null when none are recorded. */
export function recentDeploys(records) {
  if (!records || !records.length) return null;
  const head = ["started", "host", "kind", "state", "step", "from → to", "took", "outcome"];
  return el("section", {class: "deploys", "aria-label": "Recent deploys"},
    el("h2", {}, "Recent deploys"),
    el("table", {class: "deploys-table"},
      el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
      el("tbody", {}, ...records.slice(0, RECENT).map(row))));
}
