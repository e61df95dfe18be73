// Small inline SVG sparklines over a fixed time window.
//
// Invariants:
// * The x axis is always [now - windowMs, now]: an idle host shows a short
//   line at the right edge, not a line stretched over the whole chart.
// * A null value or a hole longer than maxGapMs (failed polls) breaks the
//   line; nothing is interpolated across missing data.

const SVG_NS = "http://www.w3.org/2000/svg";
const WIDTH = 300;
const HEIGHT = 48;
const PAD = 2;
const GRID_MS = 60 * 1000;

function svgElement(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

/** Runs of consecutive drawable points, split at nulls and long holes. */
function segments(points, field, maxGapMs) {
  const runs = [];
  let run = [];
  let previous = null;
  for (const point of points) {
    const value = point[field];
    const broken = value === null || (previous && point.t - previous.t > maxGapMs);
    if (broken && run.length) {
      runs.push(run);
      run = [];
    }
    if (value !== null) run.push(point);
    previous = point;
  }
  if (run.length) runs.push(run);
  return runs;
}

function pathData(run, field, x, y) {
  const line = run.map((p, i) => `${i ? "L" : "M"}${x(p.t).toFixed(1)},${y(p[field]).toFixed(1)}`);
  if (run.length === 1) {
    // one point: a short tick so it is visible at all
    line.push(`L${(x(run[0].t) - 3).toFixed(1)},${y(run[0][field]).toFixed(1)}`);
  }
  return line.join("");
}

function areaData(run, field, x, y) {
  const first = x(run[0].t).toFixed(1);
  const last = x(run[run.length - 1].t).toFixed(1);
  return `${pathData(run, field, x, y)}L${last},${HEIGHT}L${first},${HEIGHT}Z`;
}

/** The largest value of `field` in `points` (0 when there is none). */
export function peak(points, field) {
  return points.reduce((m, p) => (p[field] !== null && p[field] > m ? p[field] : m), 0);
}

/**
 * An <svg> sparkline of `field` over the last `windowMs` before `now`.
 * `floor` is the smallest top of the y axis (so a flat 0.1 req/s is not drawn
 * as a full-height line); `label` becomes the accessible description.
 */
export function sparkline(points, field, {now, windowMs, maxGapMs, floor, label, tone}) {
  const top = Math.max(floor, peak(points, field)) * 1.1;
  const x = (t) => WIDTH - ((now - t) / windowMs) * WIDTH;
  const y = (v) => HEIGHT - PAD - (v / top) * (HEIGHT - 2 * PAD);
  const svg = svgElement("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    preserveAspectRatio: "none",
    class: `spark spark-${tone}`,
    role: "img",
    "aria-label": label,
  });
  for (let age = GRID_MS; age < windowMs; age += GRID_MS) {
    svg.appendChild(svgElement("line", {x1: x(now - age), y1: 0, x2: x(now - age), y2: HEIGHT,
      class: "spark-grid", "vector-effect": "non-scaling-stroke"}));
  }
  svg.appendChild(svgElement("line", {x1: 0, y1: HEIGHT - 0.5, x2: WIDTH, y2: HEIGHT - 0.5,
    class: "spark-axis", "vector-effect": "non-scaling-stroke"}));
  for (const run of segments(points, field, maxGapMs)) {
    svg.appendChild(svgElement("path", {d: areaData(run, field, x, y), class: "spark-area"}));
    svg.appendChild(svgElement("path", {d: pathData(run, field, x, y), class: "spark-line",
      "vector-effect": "non-scaling-stroke"}));
  }
  const title = svgElement("title", {});
  title.textContent = label;
  svg.appendChild(title);
  return svg;
}
