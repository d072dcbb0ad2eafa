// A job's report as SVG charts drawn here from its metrics: size, latency and fidelity of the original, of the
// model after each measured step and of the delivered model; a tune job's trials with their Pareto front and the
// tolerance line. Labels are set as text nodes (a step's op comes from the API).

import {formatBytes, formatNumber, h, s} from "./dom.js";

const WIDTH = 480;
const HEIGHT = 250;
const MARGIN = {left: 70, right: 14, top: 18, bottom: 40};

function cosineOf(figures) {
  return figures && typeof figures.cosine_mean === "number" ? figures.cosine_mean : null;
}

function number(value) {
  return typeof value === "number" && Number.isFinite(value) ? value : null;
}

/** The model at each moment of the job: the original, after each measured step, delivered. */
export function reportPoints(metrics) {
  const baseline = metrics.baseline || {};
  const compressed = metrics.compressed || {};
  // A job on a model derived from another (a student) measures the original against that other model.
  const source = metrics.source?.baseline_fidelity_to_original;
  const points = [{label: "original", kind: "original", size: number(baseline.size_bytes),
    latency: number(baseline.latency_ms?.p50), fidelity: source ? cosineOf(source) : 1,
    accuracy: number(baseline.accuracy)}];
  (Array.isArray(metrics.steps) ? metrics.steps : []).forEach((step, index) => {
    if (step && typeof step === "object" && "size_bytes" in step && "latency_ms" in step) {
      points.push({label: `${index + 1}. ${String(step.op ?? "?")}`, kind: "step", size: number(step.size_bytes),
        latency: number(step.latency_ms?.p50), fidelity: cosineOf(step.fidelity), accuracy: number(step.accuracy)});
    }
  });
  points.push({label: "delivered", kind: "delivered", size: number(compressed.size_bytes),
    latency: number(compressed.latency_ms?.p50), fidelity: cosineOf(metrics.fidelity),
    accuracy: number(compressed.accuracy)});
  return points;
}

function niceTicks(low, high, count = 4) {
  if (!(high > low)) high = low + 1;
  const raw = (high - low) / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * magnitude).find((m) => m >= raw);
  const ticks = [];
  for (let value = Math.ceil(low / step) * step; value <= high + step * 1e-9; value += step) {
    ticks.push(Number(value.toPrecision(12)));
  }
  return ticks;
}

/** An <svg> with a title and axes; `y(value)` and `x(value)` map data to the plot area. The values carry their
 * unit and the caption names the measure, so the y axis needs no rotated label (which a phone would crowd). */
function frame(title, description, {yLow, yHigh, yFormat, xLow = 0, xHigh = 1}) {
  const plotW = WIDTH - MARGIN.left - MARGIN.right;
  const plotH = HEIGHT - MARGIN.top - MARGIN.bottom;
  const y = (value) => MARGIN.top + plotH * (1 - (value - yLow) / (yHigh - yLow || 1));
  const x = (value) => MARGIN.left + plotW * ((value - xLow) / (xHigh - xLow || 1));
  const svg = s("svg", {viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", class: "chart",
    "aria-label": `${title}. ${description}`}, s("title", {}, title));
  for (const tick of niceTicks(yLow, yHigh)) {
    if (tick < yLow || tick > yHigh) continue;
    svg.append(s("line", {x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: y(tick), y2: y(tick), class: "grid"}),
      s("text", {x: MARGIN.left - 6, y: y(tick) + 4, class: "tick", "text-anchor": "end"}, yFormat(tick)));
  }
  svg.append(s("line", {x1: MARGIN.left, x2: MARGIN.left, y1: MARGIN.top, y2: MARGIN.top + plotH, class: "axis"}),
    s("line", {x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: MARGIN.top + plotH, y2: MARGIN.top + plotH,
      class: "axis"}));
  return {svg, x, y, plotW, plotH};
}

function figure(title, svg, legend) {
  return h("figure", {class: "chart-figure"}, h("figcaption", {}, title), svg,
    legend ? h("ul", {class: "legend"}, legend.map(([cls, text]) => h("li", {},
      h("span", {class: `swatch ${cls}`, "aria-hidden": "true"}), text))) : null);
}

function categoryLabels(frameParts, labels) {
  const {svg, plotH} = frameParts;
  const band = frameParts.plotW / labels.length;
  labels.forEach((label, i) => {
    const cx = MARGIN.left + band * (i + 0.5);
    const text = label.length > 14 ? `${label.slice(0, 13)}…` : label;
    svg.append(s("text", {x: cx, y: MARGIN.top + plotH + 16, class: "tick", "text-anchor": "middle"}, text));
  });
  return band;
}

/** Bars, one per point; the value written above each. */
function barChart(title, points, value, format) {
  const values = points.map(value);
  const top = Math.max(...values.filter((v) => v !== null), 0) * 1.15 || 1;
  const parts = frame(title, points.map((p, i) => `${p.label}: ${values[i] === null ? "not measured"
    : format(values[i])}`).join("; "), {yLow: 0, yHigh: top, yFormat: format});
  const band = categoryLabels(parts, points.map((p) => p.label));
  points.forEach((point, i) => {
    if (values[i] === null) return;
    const width = Math.min(band * 0.6, 70);
    const cx = MARGIN.left + band * (i + 0.5);
    const yTop = parts.y(values[i]);
    parts.svg.append(s("rect", {x: cx - width / 2, y: yTop, width, height: parts.y(0) - yTop,
      class: `bar bar-${point.kind}`}),
    s("text", {x: cx, y: yTop - 4, class: "value", "text-anchor": "middle"}, format(values[i])));
  });
  const kinds = new Set(points.map((p) => p.kind));
  return figure(title, parts.svg, [["original", "original"], ["step", "after a step"], ["delivered", "delivered"]]
    .filter(([kind]) => kinds.has(kind)).map(([kind, text]) => [`bar-${kind}`, text]));
}

/** Fidelity (output cosine to the original) and accuracy, when measured, at each point. */
function qualityChart(points) {
  const series = [["fidelity", "output cosine to the original (mean)", "dot-fidelity"],
    ["accuracy", "accuracy", "dot-accuracy"]].filter(([key]) => points.some((p) => p[key] !== null));
  const values = series.flatMap(([key]) => points.map((p) => p[key]).filter((v) => v !== null));
  const low = Math.min(...values);
  const high = Math.max(...values, 1);
  const pad = Math.max((high - low) * 0.15, 0.002);
  const title = "Fidelity and accuracy: higher is better";
  const description = series.map(([key, label]) => `${label}: ${points.map((p) => `${p.label} ${
    p[key] === null ? "-" : formatNumber(p[key], 6)}`).join(", ")}`).join("; ");
  const parts = frame(title, description, {yLow: Math.max(0, low - pad), yHigh: Math.min(high + pad, 1.0001),
    yFormat: (v) => formatNumber(v, 4)});
  const band = categoryLabels(parts, points.map((p) => p.label));
  for (const [key, , cls] of series) {
    const located = points.map((p, i) => [MARGIN.left + band * (i + 0.5), p[key]]).filter(([, v]) => v !== null);
    parts.svg.append(s("polyline", {points: located.map(([cx, v]) => `${cx},${parts.y(v)}`).join(" "),
      class: `series ${cls}`}));
    for (const [cx, v] of located) {
      parts.svg.append(s("circle", {cx, cy: parts.y(v), r: 4, class: `dot ${cls}`}),
        s("text", {x: cx, y: parts.y(v) - 8, class: "value", "text-anchor": "middle"}, formatNumber(v, 6)));
    }
  }
  return figure(title, parts.svg, series.map(([, label, cls]) => [cls, label]));
}

/** The worst metric a trial may have and still meet the tolerance (lower is better for perplexity). */
export function toleranceLine(tuning, metric) {
  const base = number(tuning.baseline_metric);
  const maxLoss = number(tuning.max_loss);
  if (base === null || maxLoss === null) return null;
  const allowed = maxLoss * Math.max(Math.abs(base), 1e-12);
  return metric === "perplexity" ? base + allowed : base - allowed;
}

/** Each finished trial by the objective (size or latency) against its metric. */
function trialsChart(tuning, metricName) {
  const axis = tuning.objective === "latency" ? "latency_ms" : "size_bytes";
  const trials = (Array.isArray(tuning.trials) ? tuning.trials : [])
    .map((trial, index) => ({...trial, index}))
    .filter((t) => !t.error && number(t.metric) !== null && number(t[axis]) !== null);
  if (!trials.length) return null;
  const metric = String(tuning.metric || metricName || "metric");
  const direction = metric === "perplexity" ? "lower is better" : "higher is better";
  const tolerance = toleranceLine(tuning, metric);
  const base = number(tuning.baseline_metric);
  const ys = [...trials.map((t) => t.metric), ...[tolerance, base].filter((v) => v !== null)];
  const yPad = Math.max((Math.max(...ys) - Math.min(...ys)) * 0.15, 0.002);
  const xs = trials.map((t) => t[axis]);
  const xPad = Math.max((Math.max(...xs) - Math.min(...xs)) * 0.1, Math.max(...xs) * 0.05, 1e-9);
  const xFormat = axis === "size_bytes" ? formatBytes : (v) => `${formatNumber(v, 3)} ms`;
  const title = `Tuning trials: ${metric} (${direction}) against ${axis === "size_bytes" ? "size" : "latency p50"}`;
  const description = trials.map((t) => `trial ${t.index}: ${xFormat(t[axis])}, ${metric} ${formatNumber(t.metric)}${
    t.meets_tolerance ? " (within tolerance)" : " (outside it)"}`).join("; ");
  const xLow = Math.max(0, Math.min(...xs) - xPad);
  const xHigh = Math.max(...xs) + xPad;
  const parts = frame(title, description, {yLow: Math.min(...ys) - yPad, yHigh: Math.max(...ys) + yPad,
    yFormat: (v) => formatNumber(v, 4), xLow, xHigh});
  for (const tick of niceTicks(xLow, xHigh, 4)) {
    if (tick < xLow || tick > xHigh) continue;
    parts.svg.append(s("text", {x: parts.x(tick), y: MARGIN.top + parts.plotH + 16, class: "tick",
      "text-anchor": "middle"}, xFormat(tick)));
  }
  const horizontal = (value, cls) => s("line", {x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: parts.y(value),
    y2: parts.y(value), class: cls});
  if (tolerance !== null) parts.svg.append(horizontal(tolerance, "tolerance-line"));
  if (base !== null) parts.svg.append(horizontal(base, "baseline-line"));
  const byIndex = new Map(trials.map((t) => [t.index, t]));
  const front = (Array.isArray(tuning.pareto_front) ? tuning.pareto_front : []).map((i) => byIndex.get(i))
    .filter(Boolean).sort((a, b) => a[axis] - b[axis]);
  if (front.length) {
    parts.svg.append(s("polyline", {class: "pareto-line",
      points: front.map((t) => `${parts.x(t[axis])},${parts.y(t.metric)}`).join(" ")}));
  }
  for (const trial of trials) {
    const cx = parts.x(trial[axis]);
    const cy = parts.y(trial.metric);
    parts.svg.append(s("circle", {cx, cy, r: 5, class: trial.meets_tolerance ? "dot dot-within" : "dot dot-outside"},
      s("title", {}, `trial ${trial.index}`)),
    s("text", {x: cx + 7, y: cy - 6, class: "tick"}, String(trial.index)));
    if (trial.index === tuning.best) parts.svg.append(s("circle", {cx, cy, r: 10, class: "chosen-ring"}));
  }
  return figure(title, parts.svg, [["dot-within", "within the tolerance"], ["dot-outside", "outside it"],
    ["pareto-line", "Pareto front"], ["tolerance-line", `tolerance (${metric})`],
    ["baseline-line", "original model"], ["chosen-ring", `chosen (trial ${tuning.best ?? "-"})`]]);
}

/** The report's charts, in a container. `metricName`: a tune job's metric, as its request named it. */
export function reportCharts(metrics, metricName) {
  const points = reportPoints(metrics);
  const charts = [
    barChart("Size: original, after each measured step, delivered", points, (p) => p.size, formatBytes),
    barChart("Latency p50 per batch", points, (p) => p.latency, (v) => `${formatNumber(v, 3)} ms`),
  ];
  if (points.some((p) => p.fidelity !== null || p.accuracy !== null)) charts.push(qualityChart(points));
  if (metrics.tuning) {
    const trials = trialsChart(metrics.tuning, metricName);
    if (trials) charts.push(trials);
  }
  return h("div", {class: "charts"}, charts);
}
