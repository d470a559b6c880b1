// A small SVG line chart (no library): lineChart(svg, [{name, color, points: [[x, y], ...]}]).
// The number of points drawn is kept in svg.dataset.points, so tests and users can see it grow.
"use strict";

const CHART_COLORS = ["#2f6fde", "#e0730f", "#1a7f37", "#a33ea1", "#c62828", "#0f8a8a", "#6b7280"];

function lineChart(svg, series, labels = {}) {
  const NS = "http://www.w3.org/2000/svg";
  const W = 640, H = 260, L = 54, R = 12, T = 14, B = 30;
  while (svg.firstChild) svg.removeChild(svg.firstChild);
  const all = series.flatMap((s) => s.points.filter((p) => Number.isFinite(p[1])));
  svg.dataset.points = String(all.length);
  const el = (tag, attrs, text) => {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.appendChild(node);
    return node;
  };
  if (!all.length) {
    el("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, labels.empty || "no points yet");
    return;
  }
  let x0 = Math.min(...all.map((p) => p[0])), x1 = Math.max(...all.map((p) => p[0]));
  let y0 = Math.min(...all.map((p) => p[1])), y1 = Math.max(...all.map((p) => p[1]));
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  el("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#d9dde5" });
  el("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#d9dde5" });
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    el("text", { x: L - 6, y: sy(y) + 4, "text-anchor": "end" }, y.toPrecision(4));
    el("line", { x1: L, y1: sy(y), x2: W - R, y2: sy(y), stroke: "#f0f1f4" });
  }
  el("text", { x: L, y: H - 10 }, String(x0));
  el("text", { x: W - R, y: H - 10, "text-anchor": "end" }, String(x1));
  el("text", { x: (L + W - R) / 2, y: H - 10, "text-anchor": "middle" }, labels.x || "step");
  series.forEach((s, i) => {
    const color = s.color || CHART_COLORS[i % CHART_COLORS.length];
    const pts = s.points.filter((p) => Number.isFinite(p[1]));
    if (!pts.length) return;
    el("polyline", {
      points: pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "),
      fill: "none", stroke: color, "stroke-width": 1.8, class: "series", "data-name": s.name,
    });
    if (pts.length < 40) pts.forEach((p) => el("circle", { cx: sx(p[0]), cy: sy(p[1]), r: 2.2, fill: color }));
    el("text", { x: W - R - 4, y: T + 12 + 14 * i, "text-anchor": "end", fill: color, style: `fill:${color}` }, s.name);
  });
}
