// TLS certificates on the dashboard (records from GET /api/v1/certs, never a key).
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

function row(cert, now) {
  const known = typeof cert.not_after === "number";
  const kind = known ? expiryClass(cert.not_after, now) : "expired";
  const expires = known ? new Date(cert.not_after * 1000).toISOString().slice(0, 16).replace("T", " ") : "?";
  return el("tr", {class: `cert cert-${kind}`, "data-host": cert.host},
    el("td", {class: "cert-host"}, cert.host),
    el("td", {}, expires),
    el("td", {class: "cert-left"}, known ? left(cert.not_after, now) : "?"),
    el("td", {}, cert.source || ""),
    el("td", {class: "cert-names"}, (cert.names || []).join(", ") || cert.problem || ""));
}

/** The "Certificates" table, soonest expiry first, or null when none are stored. */
export function certificatesTable(certs, now) {
  if (!certs || !certs.length) return null;
  const sorted = [...certs].sort((a, b) => (a.not_after ?? 0) - (b.not_after ?? 0));
  const head = ["host", "expires (UTC)", "left", "source", "names"];
  return el("section", {class: "certs", "aria-label": "Certificates"},
    el("h2", {}, "Certificates"),
    el("table", {class: "certs-table"},
      el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))),
      el("tbody", {}, ...sorted.map((c) => row(c, now)))));
}
