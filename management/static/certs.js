// TLS certificates on the dashboard (records from GET /api/v1/certs, never a key),
// with the ACME state of hosts whose rule has "tls": "acme".
// Pure functions of their arguments; no state.

import {el} from "./render.js";

const DAY = 86400;
export const SOON_DAYS = 14; // expiring within this many days: shown in the warning colour

/** "expired", "soon" or "ok" for a certificate expiring at `notAfter` (unix s). */
export function expiryClass(notAfter, now) {
  const left = notAfter - now / 1000;
  if (left <= 0) return "expired";
  return left < SOON_DAYS * DAY ? "soon" : "ok";
}

function left(notAfter, now) {
  const seconds = notAfter - now / 1000;
  if (seconds <= 0) return "expired";
  const days = seconds / DAY;
  return days >= 1 ? `${Math.floor(days)} d` : `${Math.max(1, Math.floor(seconds / 3600))} h`;
}

/** The certificates of a GET /api/v1/certs answer, plus a row for each ACME host
 * that has no certificate yet (no expiry: shown by its state). */
export function withAcme(answer) {
  const certs = (answer && answer.certs) || [];
  const stored = new Set(certs.map((c) => c.host));
  const waiting = Object.entries((answer && answer.acme) || {})
    .filter(([host]) => !stored.has(host))
    .map(([host, acme]) => ({host, acme, source: "acme", names: []}));
  return [...certs, ...waiting];
}

/** The ACME state in a few words: "issued", "pending: why", "failed: why, retry in 5 min". */
export function acmeText(acme, now) {
  if (!acme) return "";
  if (acme.state === "failed") {
    const wait = typeof acme.next_retry === "number"
      ? `, retry in ${Math.max(0, Math.ceil((acme.next_retry - now / 1000) / 60))} min` : "";
    return `failed (attempt ${acme.attempts ?? "?"}${wait}): ${acme.reason || ""}`;
  }
  if (acme.state === "pending") return `pending: ${acme.reason || ""}`;
  return acme.state || "";
}

function row(cert, now) {
  const known = typeof cert.not_after === "number";
  const kind = known ? expiryClass(cert.not_after, now) : (cert.acme ? "none" : "expired");
  const expires = known ? new Date(cert.not_after * 1000).toISOString().slice(0, 16).replace("T", " ") : "?";
  return el("tr", {class: `cert cert-${kind}`, "data-host": cert.host},
    el("td", {class: "cert-host"}, cert.host),
    el("td", {}, expires),
    el("td", {class: "cert-left"}, known ? left(cert.not_after, now) : "?"),
    el("td", {}, cert.source || ""),
    el("td", {class: `cert-acme acme-${cert.acme ? cert.acme.state : "none"}`},
      acmeText(cert.acme, now)),
    el("td", {class: "cert-names"}, (cert.names || []).join(", ") || cert.problem || ""));
}

/** The "Certificates" table, soonest expiry first, or null when none are stored. */
export function certificatesTable(certs, now) {
  if (!certs || !certs.length) return null;
  const sorted = [...certs].sort((a, b) => (a.not_after ?? 0) - (b.not_after ?? 0));
  const head = ["host", "expires (UTC)", "left", "source", "acme", "names"];
  return el("section", {class: "certs", "aria-label": "Certificates"},
    el("h2", {}, "Certificates"),
    el("table", {class: "certs-table"},
      el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
      el("tbody", {}, ...sorted.map((c) => row(c, now)))));
}
