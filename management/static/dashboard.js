// The live dashboard: polls the management API and draws what it answers.
//
// Invariants:
// * Figures on the page come from the last successful poll. Whenever the
//   latest poll failed, or none succeeded for STALE_MS, the page is marked
//   stale (dimmed, labelled, with a banner): old figures are never shown as live.
// * The token lives in sessionStorage and travels only in the Authorization
//   header; it is never put in a URL. A 401 forgets it and asks again.
// * Polls never overlap: the next one is scheduled when the last one ends,
//   and every request is bounded by REQUEST_TIMEOUT_MS.
// * The table is polled with If-None-Match naming the version last answered; a 304
//   keeps the table held, which is the table at that version.
// * At most MAX_CARDS host cards are drawn, whatever the size of the table: a
//   page of 100,000 hosts stays live (a line says how many the filter can find).

import * as fmt from "./format.js";
import {fetchHeavy, heavyPanel} from "./heavy.js";
import {History, WINDOW_MS} from "./history.js";
import {banner, el, hostCard, hostKeys, removedLine, summaryTiles} from "./render.js";
import {certificatesTable, withAcme} from "./certs.js";
import {abortNote, deployLine, recentDeploys, runningByHost} from "./deploys.js";

const POLL_MS = 2000;
const REQUEST_TIMEOUT_MS = 5000;
const WRITE_TIMEOUT_MS = 15000; // an abort's answer waits up to 5 s for the deploy to end
const STALE_MS = 2 * POLL_MS + REQUEST_TIMEOUT_MS;
const INFO_RETRY_MS = 60000;
const TOKEN_KEY = "balancer.token";
const REMOVED_MS = 10 * 60 * 1000; // a removed host is named for this long, then forgotten
const HISTORY_EVERY = 5; // polls between reads of the server's history (latency charts)
const MAX_CARDS = 100; // host cards drawn at most (in host order); the filter finds the others

const state = {
  history: new History(),
  view: null, // the last good answer: {version, hosts, stats, info, storeReachable}
  table: null, // the last /api/v1/hosts answer and its ETag: {etag, table}, for If-None-Match
  lastOk: 0, // when it arrived (ms since the epoch)
  failure: null, // {kind, title, text} of the latest poll, null after a success
  timer: null,
  inFlight: false, // a poll is under way
  needsToken: false, // the token form is up: no polling until it is submitted
  infoMissingSince: 0, // /api/v1/info answered 404 (an older management app)
  removed: new Map(), // host -> when it left the table (ms), for REMOVED_MS
  bannerKey: "",
  heavy: null, // the "what's heavy" panel's last answer (heavy.js), {missing} without the routes
  measure: "requests", // what the panel ranks by
  latency: null, // the last /api/v1/history answer (null: none, or an older app without it)
  polls: 0,
};

const $ = (id) => document.getElementById(id);

// ---- the API ------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function requestHeaders() {
  const headers = {Accept: "application/json"};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers.Authorization = `Bearer ${token}`;
  return headers;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    const details = Array.isArray(body.details)
      ? body.details.filter((d) => typeof d === "string") : [];
    const message = body.message || body.error || `HTTP ${response.status}`;
    return details.length ? `${message}: ${details.join("; ")}` : message;
  } catch {
    return `HTTP ${response.status} ${response.statusText}`.trim();
  }
}

/** GET a JSON document relative to the page; raises ApiError on any failure. */
async function getJSON(path) {
  return (await ask(path)).body;
}

/** GET `path` with `extra` headers: {status, etag, body}, body null on a 304 (which
 * only a request with If-None-Match gets: the browser's cache is not used). */
async function ask(path, extra = {}) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), REQUEST_TIMEOUT_MS);
  try {
    const response = await fetch(path, {headers: {...requestHeaders(), ...extra},
      signal: controller.signal, cache: "no-store"});
    const etag = response.headers.get("ETag");
    if (response.status === 304) return {status: 304, etag, body: null};
    if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
    return {status: response.status, etag, body: await response.json()};
  } catch (err) {
    if (err instanceof ApiError) throw err;
    if (controller.signal.aborted) {
      throw new ApiError(0, `${path}: no answer within ${REQUEST_TIMEOUT_MS / 1000} s`);
    }
    const reason = err instanceof SyntaxError ? "not JSON" : err.message;
    throw new ApiError(0, `${path}: ${reason}`);
  } finally {
    clearTimeout(timer);
  }
}

/** A write the management API guards (docs/api.md): same origin (the browser sends its
 * Origin), JSON, the token if any. {status, body}; never throws on an HTTP status. */
async function write(method, path) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), WRITE_TIMEOUT_MS);
  try {
    const response = await fetch(path, {method, signal: controller.signal, cache: "no-store",
      headers: {...requestHeaders(), "Content-Type": "application/json"}});
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    return {status: response.status, body};
  } catch (err) {
    const reason = controller.signal.aborted ? `no answer within ${WRITE_TIMEOUT_MS / 1000} s`
      : err.message;
    return {status: 0, body: {message: reason}};
  } finally {
    clearTimeout(timer);
  }
}

/** A click on a running deploy's Abort button (deploys.js): asked, then said. */
async function onAbortClick(event) {
  const button = event.target.closest("button.deploy-abort");
  if (!button || button.disabled) return;
  const host = button.dataset.host;
  if (!window.confirm(`Abort the deploy of ${host}? The host goes back to the backends `
    + "the deploy started from.")) return;
  button.disabled = true;
  button.textContent = "Aborting…";
  // the deploy shown, by its id: one that ended meanwhile is not followed by the next
  // deploy of the host (bug: a click on a page a poll behind stopped a later deploy)
  const answer = await write("DELETE", `api/v1/deploys/${encodeURIComponent(button.dataset.deploy)}`);
  if (answer.status === 401) return askForToken(true);
  const note = $("action-note");
  note.textContent = abortNote(host, answer.status, answer.body);
  note.className = answer.status === 200 || answer.status === 202 ? "action-note" : "action-note action-failed";
  note.hidden = false;
  if (!state.inFlight && !state.needsToken) schedule(0);
}

/** /api/v1/hosts, asked with If-None-Match naming the table kept: the table kept when
 * the API answers 304 Not Modified (an unchanged table costs no transfer nor parse). */
async function getTable() {
  const kept = state.table;
  const answer = await ask("api/v1/hosts", kept ? {"If-None-Match": kept.etag} : {});
  if (answer.status === 304) {
    if (!kept) throw new ApiError(0, "api/v1/hosts: 304 Not Modified to an unconditional GET");
    return kept.table;
  }
  state.table = answer.etag ? {etag: answer.etag, table: answer.body} : null;
  return answer.body;
}

/** /api/v1/info, or null when this management app does not have it. */
async function getInfo(now) {
  if (state.infoMissingSince && now - state.infoMissingSince < INFO_RETRY_MS) return null;
  try {
    const info = await getJSON("api/v1/info");
    state.infoMissingSince = 0;
    return info;
  } catch (err) {
    if (err.status !== 404) throw err;
    state.infoMissingSince = now;
    return null;
  }
}

/** The recent deploys, or [] when this management app does not have them. */
async function getDeploys() {
  try {
    return (await getJSON("api/v1/deploys")).deploys || [];
  } catch (err) {
    if (err.status !== 404) throw err;
    return [];
  }
}

function checkShape(table, stats) {
  if (!table || typeof table.hosts !== "object" || !stats || typeof stats.hosts !== "object") {
    throw new ApiError(0, "the API answered an unexpected document");
  }
}

/** The stored TLS certificates (with their ACME state), and a row for each ACME host
 * still without one; [] when this management app does not have them. */
async function getCerts() {
  try {
    return withAcme(await getJSON("api/v1/certs"));
  } catch (err) {
    if (err.status !== 404) throw err;
    return [];
  }
}

// ---- polling --------------------------------------------------------------------

function schedule(ms) {
  clearTimeout(state.timer);
  state.timer = setTimeout(poll, ms);
}

async function poll() {
  state.timer = null;
  if (state.inFlight || state.needsToken) return;
  state.inFlight = true;
  try {
    const [table, stats, info, deploys, heavy, latency, certs] = await Promise.all(
      [getTable(), getJSON("api/v1/stats"), getInfo(Date.now()), getDeploys(),
        fetchHeavy(getJSON, state.measure), getHistory(), getCerts()]);
    checkShape(table, stats);
    state.heavy = heavy;
    state.latency = latency;
    if (!state.needsToken) onData(table, stats, info, Date.now(), deploys, certs);
  } catch (err) {
    if (!state.needsToken) onFailure(err);
  } finally {
    state.inFlight = false;
  }
  if (!state.needsToken) schedule(POLL_MS);
}

/** The server's history every HISTORY_EVERY polls (the last one in between); null
 * when this management app has none. Its failure never fails the poll. */
async function getHistory() {
  state.polls += 1;
  if (state.polls % HISTORY_EVERY !== 1 && state.latency) return state.latency;
  try {
    return await getJSON(`api/v1/history?since=${WINDOW_MS / 1000}`);
  } catch (err) {
    if (err.status === 401) throw err;
    return state.latency;
  }
}

function isStoreReachable(stats, info) {
  if (stats.store_up === 0) return false;
  return !(info && info.store && info.store.reachable === false);
}

/** Note hosts that left the table since the last view; forget old and returning ones. */
function trackRemoved(previous, hosts, now) {
  for (const key of Object.keys(previous || {})) {
    if (!(key in hosts)) state.removed.set(key, now);
  }
  for (const [key, when] of [...state.removed]) {
    if (key in hosts || now - when > REMOVED_MS) state.removed.delete(key);
  }
}

function onData(table, stats, info, now, deploys = [], certs = []) {
  trackRemoved(state.view?.hosts, table.hosts, now);
  state.history.record(stats.hosts, now);
  state.view = {version: table.version, hosts: table.hosts, stats, info, deploys, certs,
    storeReachable: isStoreReachable(stats, info)};
  state.lastOk = now;
  state.failure = null;
  renderData(now);
  renderStatus(now);
}

function describeFailure(err) {
  if (err.status === 0) {
    return {kind: "error", title: "The management API is not answering.", text: err.message};
  }
  if (err.status === 403) {
    return {kind: "error", title: "Access refused.", text: err.message};
  }
  const title = `The management API failed (HTTP ${err.status}).`;
  return {kind: "error", title, text: err.message};
}

function onFailure(err) {
  if (err.status === 401) {
    askForToken(Boolean(sessionStorage.getItem(TOKEN_KEY)));
  } else {
    state.failure = describeFailure(err);
  }
  renderStatus(Date.now());
}

// ---- the token ------------------------------------------------------------------

function askForToken(rejected) {
  state.needsToken = true;
  sessionStorage.removeItem(TOKEN_KEY);
  state.failure = {kind: "token", title: "Sign-in needed.",
    text: rejected ? "The token was rejected." : "This management API needs a token."};
  $("token-message").textContent = rejected
    ? "The token was rejected. Enter it again."
    : "This balancer's management API needs a token.";
  $("token").hidden = false;
  $("forget-token").hidden = true;
  $("token-input").focus();
}

function onTokenSubmit(event) {
  event.preventDefault();
  const input = $("token-input");
  const token = input.value.trim();
  if (!token) {
    $("token-message").textContent = "Enter the management token.";
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  input.value = "";
  $("token").hidden = true;
  $("forget-token").hidden = false;
  state.failure = null;
  state.needsToken = false;
  if (!state.inFlight) schedule(0);
}

function onForgetToken() {
  clearTimeout(state.timer);
  askForToken(false);
  renderStatus(Date.now());
}

// ---- drawing ----------------------------------------------------------------------

function isLive(now) {
  return Boolean(state.view) && !state.failure && now - state.lastOk < STALE_MS;
}

function currentBanners(now) {
  const since = state.lastOk
    ? ` Figures below are from ${fmt.clock(state.lastOk)} and are not live.`
    : "";
  if (state.failure?.kind === "token") {
    // the token form says it all; a banner only warns that figures below are old
    if (!state.view) return [];
    return [["warn", state.failure.title, sentence(state.failure.text) + since]];
  }
  if (state.failure) {
    return [["error", state.failure.title, sentence(state.failure.text) + since]];
  }
  if (state.view && !isLive(now)) {
    const silence = `The management API has not answered for ${STALE_MS / 1000} s.`;
    return [["error", "No update.", silence + since]];
  }
  if (state.view && !state.view.storeReachable) {
    const store = state.view.info?.store;
    const where = store ? `${store.kind} store ${store.url || ""}`.trim() : "config store";
    const serving = `the balancer keeps serving routing version ` +
      `${state.view.stats.routing_version}`;
    if (store?.reachable !== false && store?.problem) {
      // reachable but not usable: lost its table (flushed, older copy, deleted file) or corrupt
      return [["error", "Store problem.", `${sentence(store.problem)} Meanwhile ${serving}.`]];
    }
    const problem = store?.problem ? ` (${store.problem})` : "";
    return [["warn", "Store unreachable.", `The ${where} cannot be reached${problem}: ` +
      `${serving}; route changes will not apply until it is back.`]];
  }
  const certsProblem = state.view?.info?.store?.certs_problem;
  if (certsProblem) {
    return [["error", "Certificate store problem.", sentence(certsProblem)]];
  }
  const raised = state.view?.info?.store?.raised;
  const spelled = raised?.filter((r) => r.field.includes("backends["));
  if (spelled?.length) {
    // stored by an earlier version as host names (served as the addresses they spell),
    // or one server spelt two ways in one list (served as one entry, weights added)
    const listed = spelled.slice(0, 3).map((r) => `${r.host} ${r.stored} → ${r.used}`);
    const more = spelled.length > 3 ? ` and ${spelled.length - 3} more` : "";
    return [["warn", "Stored backend addresses used otherwise.",
      "The stored table holds backend addresses an earlier version took (a short IPv4 " +
      `spelling, one server listed twice), used as: ${listed.join(", ")}${more}. ` +
      "Write these rules again with each server once, its address in full."]];
  }
  if (raised?.length) {
    // stored by an earlier version below today's floors: served raised to them
    // health.* are seconds, limits.rate requests per second
    const unit = (r) => (r.field.startsWith("health.") ? "s" : "/s");
    const listed = raised.slice(0, 3).map(
      (r) => `${r.host} ${r.field} ${r.stored} ${unit(r)} → ${r.used} ${unit(r)}`);
    const more = raised.length > 3 ? ` and ${raised.length - 3} more` : "";
    const health = raised.every((r) => r.field.startsWith("health."));
    return [["warn", health ? "Health check values raised." : "Stored rule values raised.",
      `The stored table holds ${health ? "health check " : ""}values below the floor, ` +
      `used raised to it: ${listed.join(", ")}${more}. ` +
      "Write these rules again at or above the floor."]];
  }
  return [];
}

function sentence(text) {
  return /[.!?]$/.test(text) ? text : `${text}.`;
}

function renderBanners(now) {
  const banners = currentBanners(now);
  const key = JSON.stringify(banners);
  if (key === state.bannerKey) return; // unchanged: do not re-announce an alert
  state.bannerKey = key;
  $("banners").replaceChildren(...banners.map(([kind, title, text]) => banner(kind, title, text)));
}

/** The always-visible line telling whether the figures are live, and from when. */
function renderStatus(now) {
  const live = isLive(now);
  const status = $("status");
  const kind = live ? "live" : state.view ? "stale" : "none";
  status.className = `status status-${kind}`;
  const when = state.lastOk
    ? `updated ${fmt.clock(state.lastOk)} (${fmt.ago(state.lastOk, now)})`
    : "no data yet";
  const word = live ? "● Live" : state.view ? "■ Stale" : "○ Waiting";
  status.replaceChildren(el("span", {class: "status-word"}, word), " ",
    el("span", {id: "last-update"}, when));
  document.body.classList.toggle("is-stale", Boolean(state.view) && !live);
  $("data").hidden = !state.view;
  renderBanners(now);
}

function currentFilter() {
  return $("filter").value.trim().toLowerCase();
}

function emptyHosts(view) {
  if (Object.keys(view.hosts).length) {
    return el("p", {class: "empty"}, `No host matches “${currentFilter()}”.`);
  }
  return el("p", {class: "empty"}, "No hosts in the routing table yet. Add one with ",
    el("code", {}, "balancerctl set HOST proxy --backend ADDR"), ".");
}

/** "100 of 20,000 hosts shown" when the cards were cut at MAX_CARDS, else null. */
function moreHosts(shown, matching) {
  if (shown >= matching) return null;
  return el("p", {class: "more-hosts", id: "more-hosts"},
    `${shown} of ${matching.toLocaleString("en")} hosts shown: type in the filter to find the others.`);
}

function renderData(now) {
  const view = state.view;
  if (!view) return;
  $("summary").replaceChildren(...summaryTiles(view, state.history, now));
  const filter = currentFilter();
  const keys = hostKeys(view.hosts, view.stats.hosts)
    .filter((key) => !filter || key.toLowerCase().includes(filter));
  const running = runningByHost(view.deploys);
  const cards = keys.slice(0, MAX_CARDS).map((key) => {
    const card = hostCard(key, view.hosts[key], view.stats.hosts[key], state.history, now,
      state.latency);
    if (running.has(key)) card.querySelector(".host-head").after(deployLine(running.get(key), now));
    return card;
  });
  $("hosts").replaceChildren(...(cards.length ? cards : [emptyHosts(view)]),
    ...[moreHosts(cards.length, keys.length)].filter(Boolean));
  $("deploys").replaceChildren(...[recentDeploys(view.deploys)].filter(Boolean));
  $("certs").replaceChildren(...[certificatesTable(view.certs, now)].filter(Boolean));
  $("removed-line").replaceChildren(...[removedLine(state.removed, now)].filter(Boolean));
  renderHeavy();
}

function renderHeavy() {
  $("heavy").hidden = Boolean(state.heavy?.missing);
  if (!state.heavy?.missing) $("heavy-body").replaceChildren(...heavyPanel(state.heavy));
}

function onMeasure() {
  state.measure = $("heavy-by").value;
  state.heavy = null;
  renderHeavy();
  if (!state.inFlight && !state.needsToken) schedule(0);
}

// ---- start ----------------------------------------------------------------------------

/** The state the server embedded in the page (see management/dashboard_page.py), or null. */
function embeddedState() {
  try {
    const embedded = JSON.parse($("initial-state")?.textContent || "null");
    if (!embedded) return null;
    checkShape(embedded.table, embedded.stats);
    return embedded;
  } catch {
    return null;
  }
}

function start() {
  $("token-form").addEventListener("submit", onTokenSubmit);
  $("forget-token").addEventListener("click", onForgetToken);
  $("filter").addEventListener("input", () => renderData(state.lastOk));
  $("heavy-by").addEventListener("change", onMeasure);
  $("hosts").addEventListener("click", onAbortClick);
  $("forget-token").hidden = !sessionStorage.getItem(TOKEN_KEY);
  setInterval(() => renderStatus(Date.now()), 1000);
  const embedded = embeddedState();
  if (embedded) {
    if (embedded.history) {
      state.history.seed(embedded.history, Date.now());
      state.latency = embedded.history;
      state.polls = 1;
    }
    if (embedded.heavy) state.heavy = embedded.heavy;
    // the embedded table is the API's at its version, whose ETag is "N" (docs/api.md)
    state.table = {etag: `"${embedded.table.version}"`, table: embedded.table};
    onData(embedded.table, embedded.stats, embedded.info, Date.now(), embedded.deploys || []);
    schedule(POLL_MS);
  } else {
    renderStatus(Date.now());
    poll();
  }
  document.documentElement.classList.remove("booting");
}

start();
