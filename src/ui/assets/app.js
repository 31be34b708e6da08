// cairn ui: a small hash-routed page over the JSON API (/api/...). No build step, no
// dependencies; graphs and charts are plain SVG.
"use strict";

const $main = document.getElementById("main");
const api = async (path) => {
  const r = await fetch(path);
  const body = await r.json().catch(() => ({ error: r.statusText }));
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
};
function el(tag, attrs, ...children) {
  const e = tag.startsWith("svg:") ? document.createElementNS("http://www.w3.org/2000/svg", tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}
const short = (d) => (d || "").slice(0, 12);
const fmtMs = (ms) => ms == null ? "" : ms < 1000 ? `${ms} ms` : ms < 60000 ? `${(ms / 1000).toFixed(1)} s` : `${Math.floor(ms / 60000)} min ${Math.round(ms % 60000 / 1000)} s`;
const fmtBytes = (n) => n < 1024 ? `${n} B` : n < 1048576 ? `${(n / 1024).toFixed(1)} KB` : `${(n / 1048576).toFixed(1)} MB`;
const status = (s) => el("span", { class: `status ${s}` }, s);
const artLink = (d) => el("a", { href: `#/artifacts/${d}`, class: "mono" }, short(d));
const params = () => new URLSearchParams(location.hash.split("?")[1] || "");
const color = { ran: "#2f7ed8", cached: "#3aa757", failed: "#d9453d", skipped: "#9aa0a6", will_run: "#e8a33d" };

function table(headers, rows, onclick) {
  return el("table", {}, el("tr", {}, headers.map((h) => el("th", {}, h))),
    rows.map((r, i) => el("tr", onclick ? { class: "clickable", onclick: () => onclick(i) } : {}, r.map((c) => el("td", {}, c)))));
}

// Metadata as tables: scalars inline, objects as nested key/value tables, arrays of
// objects as tables with a column per key.
function valueView(v, depth = 0) {
  if (v === null || typeof v !== "object") return el("span", { class: "mono" }, typeof v === "string" ? v : JSON.stringify(v));
  if (Array.isArray(v)) {
    if (v.length && v.every((x) => x && typeof x === "object" && !Array.isArray(x))) {
      const keys = [...new Set(v.slice(0, 50).flatMap(Object.keys))];
      return el("div", {}, table(keys, v.slice(0, 50).map((x) => keys.map((k) => valueView(x[k], depth + 1)))), v.length > 50 ? el("p", { class: "muted" }, `${v.length - 50} more`) : null);
    }
    return el("span", { class: "mono" }, JSON.stringify(v.slice(0, 100)) + (v.length > 100 ? ` … (${v.length})` : ""));
  }
  if (depth > 3) return el("pre", {}, JSON.stringify(v, null, 1));
  return el("table", { class: "kv" }, Object.entries(v).map(([k, x]) => el("tr", {}, el("th", {}, k), el("td", {}, valueView(x, depth + 1)))));
}

// Layered graph: nodes [{id, label, sub, fill, href}], edges [{from, to, label}].
function graph(nodes, edges, selected) {
  const level = {}; const byId = Object.fromEntries(nodes.map((n) => [n.id, n]));
  edges = edges.filter((e) => e.from !== e.to);
  const deps = {}; edges.forEach((e) => (deps[e.to] = deps[e.to] || []).push(e.from));
  const lv = (id, seen = new Set()) => {
    if (level[id] !== undefined) return level[id];
    if (seen.has(id)) return 0; seen.add(id);
    level[id] = Math.max(-1, ...(deps[id] || []).filter((d) => byId[d]).map((d) => lv(d, seen))) + 1;
    return level[id];
  };
  nodes.forEach((n) => lv(n.id));
  const cols = {}; nodes.forEach((n) => (cols[level[n.id]] = cols[level[n.id]] || []).push(n));
  const W = 170, H = 44, GX = 70, GY = 22, pos = {};
  Object.entries(cols).forEach(([c, ns]) => ns.forEach((n, i) => (pos[n.id] = { x: 10 + c * (W + GX), y: 10 + i * (H + GY) })));
  const width = 20 + (Math.max(...Object.keys(cols).map(Number)) + 1) * (W + GX);
  const height = 20 + Math.max(...Object.values(cols).map((c) => c.length)) * (H + GY);
  const svg = el("svg:svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "graph" },
    el("svg:defs", {}, el("svg:marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" }, el("svg:path", { d: "M0,0 L10,5 L0,10 z", fill: "#888" }))));
  for (const e of edges) {
    const a = pos[e.from], b = pos[e.to]; if (!a || !b) continue;
    const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
    svg.append(el("svg:path", { class: "edge", d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}` }));
    if (e.label) svg.append(el("svg:text", { x: mx, y: (y1 + y2) / 2 - 4, "text-anchor": "middle", fill: "#555" }, e.label));
  }
  for (const n of nodes) {
    const p = pos[n.id];
    const g = el("svg:g", { class: `node${n.id === selected ? " selected" : ""}`, transform: `translate(${p.x},${p.y})`, "data-id": n.id, onclick: () => n.onclick ? n.onclick() : (location.hash = n.href) },
      el("svg:rect", { width: W, height: H, fill: n.fill || "#fff" }),
      el("svg:text", { x: 8, y: 18, fill: n.textFill || "#fff", "font-weight": 600 }, n.label),
      el("svg:text", { x: 8, y: 35, fill: n.textFill || "#fff" }, n.sub || ""));
    svg.append(g);
  }
  return svg;
}

function gantt(steps) {
  const starts = steps.map((s) => Date.parse(s.started_at)).filter((t) => !isNaN(t));
  if (!starts.length) return el("p", { class: "muted" }, "no timings");
  const t0 = Math.min(...starts);
  const end = Math.max(...steps.map((s) => Date.parse(s.started_at) - t0 + s.duration_ms), 1);
  const W = 900, L = 160, row = 22;
  const svg = el("svg:svg", { width: W + L + 80, height: steps.length * row + 24, class: "gantt" });
  steps.forEach((s, i) => {
    const x = L + (Date.parse(s.started_at) - t0) / end * W, w = Math.max(2, s.duration_ms / end * W);
    svg.append(el("svg:text", { x: 4, y: i * row + 15 }, s.name),
      el("svg:rect", { x, y: i * row + 4, width: w, height: row - 8, fill: color[s.status] || "#999" }),
      el("svg:text", { x: x + w + 4, y: i * row + 15, fill: "#555" }, fmtMs(s.duration_ms)));
  });
  svg.append(el("svg:text", { x: L, y: steps.length * row + 18, fill: "#777" }, `0 — ${fmtMs(end)}`));
  return svg;
}

function pager(offset, limit, more, go) {
  return el("div", { class: "pager" },
    el("button", { disabled: offset === 0 ? "" : null, onclick: () => go(Math.max(0, offset - limit)) }, "← newer"),
    el("span", { class: "muted" }, `${offset + 1}–${offset + limit}`),
    el("button", { disabled: more ? null : "", onclick: () => go(offset + limit) }, "older →"));
}

async function runsPage() {
  const q = params(); const limit = 50, offset = +(q.get("offset") || 0);
  const qs = new URLSearchParams({ limit, offset }); for (const k of ["pipeline", "status"]) if (q.get(k)) qs.set(k, q.get(k));
  const data = await api(`/api/runs?${qs}`);
  const go = (o) => { qs.set("offset", o); qs.delete("limit"); location.hash = `#/runs?${qs}`; };
  const form = el("form", { class: "filters", onsubmit: (ev) => { ev.preventDefault(); const f = new FormData(ev.target); const n = new URLSearchParams(); for (const [k, v] of f) if (v) n.set(k, v); location.hash = `#/runs?${n}`; } },
    el("select", { name: "pipeline" }, el("option", { value: "" }, "all pipelines"), data.pipelines.map((p) => el("option", p === q.get("pipeline") ? { value: p, selected: "" } : { value: p }, p))),
    el("select", { name: "status" }, ["", "succeeded", "failed", "running", "interrupted"].map((s) => el("option", s === (q.get("status") || "") ? { value: s, selected: "" } : { value: s }, s || "any status"))),
    el("button", { type: "submit" }, "Filter"));
  const pick = (id) => el("input", { type: "checkbox", class: "pick", "data-run": id, onclick: (ev) => ev.stopPropagation() });
  const compareButton = el("button", { id: "compare-selected", onclick: () => {
    const picked = [...document.querySelectorAll("input.pick:checked")].map((b) => b.dataset.run);
    if (picked.length) location.hash = `#/compare?runs=${picked.join(",")}`;
  } }, "Compare selected");
  $main.replaceChildren(el("h1", {}, "Runs"), form,
    el("p", {}, compareButton, q.get("pipeline") ? el("a", { href: `#/compare?pipeline=${encodeURIComponent(q.get("pipeline"))}&last=10`, style: "margin-left:1em" }, `compare the last 10 runs of ${q.get("pipeline")}`) : null),
    table(["", "run", "pipeline", "started", "duration", "status", "ran", "cached", "failed"],
      data.runs.map((r) => [pick(r.id), el("a", { href: `#/runs/${r.id}`, class: "mono" }, r.id), r.pipeline, r.started_at.replace("T", " ").slice(0, 19), fmtMs(r.duration_ms), status(r.status),
        r.counts.ran || 0, r.counts.cached || 0, r.counts.failed || 0]),
      (i) => (location.hash = `#/runs/${data.runs[i].id}`)),
    pager(offset, limit, data.runs.length === limit, go));
}

// Runs or sweep variants side by side: the table `cairn runs compare` prints, every
// training curve overlaid (one line per row), and a param plotted against a metric.
const palette = ["#2f7ed8", "#d9453d", "#3aa757", "#e8a33d", "#8e44ad", "#16a085", "#c0392b", "#7f8c8d", "#2c3e50", "#f39c12"];
async function comparePage() {
  const q = params(); const qs = new URLSearchParams();
  for (const k of ["runs", "pipeline", "last", "metrics"]) if (q.get(k)) qs.set(k, q.get(k));
  const data = await api(`/api/compare?${qs}`);
  const label = (r) => r.variant ? `${r.variant}` : r.run;
  const rowColor = (i) => palette[i % palette.length];
  const fmt = (v) => v === undefined || v === null ? "" : typeof v === "number" && !Number.isInteger(v) ? num(v) : String(v);
  const tbl = table(["", "run", "variant", ...data.params, ...data.metrics, "duration", "status"],
    data.rows.map((r, i) => [el("span", { class: "swatch", style: `background:${rowColor(i)}` }, " "), el("a", { href: `#/runs/${r.run}`, class: "mono" }, r.run), r.variant || "",
      ...data.params.map((p) => fmt(r.params[p])), ...data.metrics.map((m) => fmt(r.metrics[m])), fmtMs(r.duration_ms), status(r.status)]));
  tbl.id = "compare-table";
  const charts = [];
  for (const series of data.series) {
    const lines = data.rows.map((r, i) => [i, (r.curves || {})[series]]).filter(([, pts]) => pts && pts.length);
    if (!lines.length) continue;
    const all = lines.flatMap(([, pts]) => pts);
    const W = 460, H = 220, xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const sx = (x) => 48 + (x - x0) / ((x1 - x0) || 1) * (W - 58), sy = (y) => H - 20 - (y - y0) / ((y1 - y0) || 1) * (H - 35);
    charts.push(el("svg:svg", { width: W, height: H, class: "chart overlay", "data-series": series, style: "background:#fff;border:1px solid #e3e3e3;margin:0 10px 10px 0" },
      el("svg:text", { x: W / 2, y: 13, "font-weight": 600, "text-anchor": "middle" }, series),
      el("svg:text", { x: 2, y: sy(y1) + 4, fill: "#777" }, num(y1)), el("svg:text", { x: 2, y: sy(y0) + 4, fill: "#777" }, num(y0)),
      el("svg:text", { x: W - 10, y: H - 4, fill: "#777", "text-anchor": "end" }, `step ${x1}`),
      lines.map(([i, pts]) => el("svg:polyline", { fill: "none", stroke: rowColor(i), "stroke-width": 1.5, "data-row": label(data.rows[i]), points: pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ") }))));
  }
  // A param against a metric: how a knob moves the result.
  const numericParams = data.params.filter((p) => data.rows.some((r) => typeof r.params[p] === "number"));
  const plot = el("div", { id: "param-plot" });
  const draw = (p, m) => {
    const pts = data.rows.map((r, i) => [r.params[p], r.metrics[m], i]).filter(([x, y]) => typeof x === "number" && typeof y === "number");
    if (!pts.length) { plot.replaceChildren(el("p", { class: "muted" }, "no rows have both")); return; }
    const W = 460, H = 260, xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
    const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const sx = (x) => 48 + (x - x0) / ((x1 - x0) || 1) * (W - 68), sy = (y) => H - 24 - (y - y0) / ((y1 - y0) || 1) * (H - 40);
    plot.replaceChildren(el("svg:svg", { width: W, height: H, class: "scatter", style: "background:#fff;border:1px solid #e3e3e3" },
      el("svg:text", { x: W / 2, y: H - 6, "text-anchor": "middle", fill: "#555" }, `${p} (${num(x0)} – ${num(x1)})`),
      el("svg:text", { x: 2, y: 12, fill: "#555" }, `${m} (${num(y0)} – ${num(y1)})`),
      pts.map(([x, y, i]) => el("svg:circle", { cx: sx(x).toFixed(1), cy: sy(y).toFixed(1), r: 4, fill: rowColor(i) }))));
  };
  const selects = numericParams.length && data.metrics.length ? el("form", { class: "filters", onchange: (ev) => { const f = new FormData(ev.currentTarget); draw(f.get("x"), f.get("y")); } },
    el("select", { name: "x" }, numericParams.map((p) => el("option", { value: p }, p))),
    el("select", { name: "y" }, data.metrics.map((m) => el("option", { value: m }, m)))) : null;
  $main.replaceChildren(...[el("h1", {}, `Compare ${data.rows.length} rows`),
    data.params.length ? null : el("p", { class: "muted" }, "no param differs between these rows"),
    el("p", { class: "muted" }, "Colors match the curves below; a cached variant shows the time it took when it ran."),
    tbl,
    charts.length ? el("h2", {}, "Curves") : null, el("div", { id: "overlays" }, charts),
    selects ? el("h2", {}, "Param against metric") : null, selects, plot].filter(Boolean));
  if (selects) draw(numericParams[0], data.metrics[0]);
}

async function runPage(id, stepName) {
  const data = await api(`/api/runs/${encodeURIComponent(id)}`);
  const steps = data.steps; const names = new Set(steps.map((s) => s.name));
  const edges = [];
  for (const s of steps) for (const [input, ref] of Object.entries(s.inputs || {})) {
    // A variant's name may hold dots (`train[lr=0.5]`): the output follows the last one.
    const dot = ref.from.lastIndexOf("."), from = ref.from.slice(0, dot), output = ref.from.slice(dot + 1);
    if (names.has(from)) edges.push({ from, to: s.name, label: output || input });
  }
  const detail = el("div", { class: "panel", id: "step-detail" }, el("p", { class: "muted" }, "Click a step for its parameters, cache key, reason and log."));
  const show = (s) => {
    history.replaceState(null, "", `#/runs/${data.run.id}/${s.name}`);
    document.querySelectorAll("svg .node").forEach((n) => n.classList.toggle("selected", n.dataset.id === s.name));
    const log = el("pre", { id: "step-log" }, s.has_log ? "loading…" : "(no log)");
    detail.replaceChildren(el("h2", {}, `${s.name} `, status(s.status), el("span", { class: "muted" }, ` ${s.kind} v${s.version}`)),
      el("table", { class: "kv" },
        el("tr", {}, el("th", {}, "reason"), el("td", { id: "step-reason" }, s.reason)),
        el("tr", {}, el("th", {}, "cache key"), el("td", { class: "mono" }, s.cache_key || "")),
        el("tr", {}, el("th", {}, "duration"), el("td", {}, fmtMs(s.duration_ms))),
        s.error ? el("tr", {}, el("th", {}, "error"), el("td", {}, el("pre", { class: "error" }, s.error))) : null,
        el("tr", {}, el("th", {}, "inputs"), el("td", {}, Object.entries(s.inputs || {}).map(([k, r]) => el("div", {}, `${k} ← ${r.from} `, artLink(r.digest))))),
        el("tr", {}, el("th", {}, "outputs"), el("td", {}, Object.entries(s.outputs || {}).map(([k, r]) => el("div", {}, `${k}: `, artLink(r.digest), ` ${r.kind}`))))),
      el("h2", {}, "Effective parameters"), el("pre", { id: "step-params" }, JSON.stringify(s.params, null, 2)),
      el("h2", {}, "Log"), log);
    if (s.has_log) fetch(`/api/runs/${data.run.id}/steps/${encodeURIComponent(s.name)}/log`).then((r) => r.text()).then((t) => (log.textContent = t || "(empty)"));
  };
  const nodes = steps.map((s) => ({ id: s.name, label: s.name, sub: `${s.status} · ${fmtMs(s.duration_ms)}`, fill: color[s.status] || "#999", onclick: () => show(s) }));
  const r = data.run;
  $main.replaceChildren(el("h1", {}, `Run ${r.id} `, status(r.status)),
    el("p", {}, `${r.pipeline} · ${r.pipeline_file} · started ${r.started_at} · ${fmtMs(r.duration_ms)} · `,
      Object.entries(data.counts).map(([k, v]) => `${v} ${k}`).join(", ")),
    el("h2", {}, "Graph"), el("div", { id: "dag" }, graph(nodes, edges)),
    el("h2", {}, "Timeline"), gantt(steps),
    el("h2", {}, "Steps"),
    table(["step", "kind", "status", "reason", "duration"], steps.map((s) => [s.name, s.kind, status(s.status), s.reason, fmtMs(s.duration_ms)]), (i) => show(steps[i])),
    detail, planPanel(r));
  const pick = steps.find((s) => s.name === stepName); if (pick) show(pick);
}

// What a rerun of this run's pipeline file would do now (the engine's plan, nothing runs).
function planPanel(r) {
  const out = el("div", { id: "plan" });
  const button = el("button", { id: "plan-now", onclick: async () => {
    out.replaceChildren(el("p", { class: "muted" }, "planning…"));
    try {
      const p = await api(`/api/runs/${encodeURIComponent(r.id)}/plan`);
      out.replaceChildren(table(["step", "would", "reason"], p.steps.map((s) => [s.name, status(s.status), s.reason])));
    } catch (e) { out.replaceChildren(el("pre", { class: "error" }, String(e.message || e))); }
  } }, "What would run now?");
  return el("div", { class: "panel" }, el("h2", {}, "Plan"), el("p", { class: "muted" }, `Decides, for ${r.pipeline_file} as it is now (same --set values), which steps a rerun would execute and why.`), button, out);
}

async function artifactsPage() {
  const q = params(); const limit = 50, offset = +(q.get("offset") || 0);
  const qs = new URLSearchParams({ limit, offset }); for (const k of ["step", "kind", "pipeline", "digest"]) if (q.get(k)) qs.set(k, q.get(k));
  const data = await api(`/api/artifacts?${qs}`);
  const form = el("form", { class: "filters", onsubmit: (ev) => { ev.preventDefault(); const n = new URLSearchParams(); for (const [k, v] of new FormData(ev.target)) if (v) n.set(k, v); location.hash = `#/artifacts?${n}`; } },
    ["step", "kind", "pipeline", "digest"].map((k) => el("input", { name: k, placeholder: k === "digest" ? "digest prefix" : k, value: q.get(k) || "" })),
    el("button", { type: "submit" }, "Search"));
  $main.replaceChildren(el("h1", {}, "Artifacts"), form,
    table(["digest", "kind", "size", "step.output", "pipeline", "run", "created"],
      data.artifacts.map((a) => [artLink(a.digest), a.kind, fmtBytes(a.size), `${a.producer_step}.${a.output}`, a.pipeline, el("a", { href: `#/runs/${a.producer_run}` }, a.producer_run), a.created_at.replace("T", " ").slice(0, 19)]),
      (i) => (location.hash = `#/artifacts/${data.artifacts[i].digest}`)),
    pager(offset, limit, data.artifacts.length === limit, (o) => { qs.set("offset", o); qs.delete("limit"); location.hash = `#/artifacts?${qs}`; }));
}

function scatter(points) {
  const W = 420, H = 320, xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => 10 + (x - x0) / ((x1 - x0) || 1) * (W - 20), sy = (y) => H - 10 - (y - y0) / ((y1 - y0) || 1) * (H - 20);
  return el("svg:svg", { width: W, height: H, class: "scatter", style: "background:#fff;border:1px solid #e3e3e3" },
    points.map((p) => el("svg:circle", { cx: sx(p[0]).toFixed(1), cy: sy(p[1]).toFixed(1), r: 2.5, fill: "#2f7ed8", "fill-opacity": 0.6 })));
}

// Line charts for every metadata array of points with a numeric `step` (training curves:
// loss, eval_loss, lr, grad_norm, tokens_per_second ..., and one level of nested groups
// such as DPO's `preference.rewards/margins`), one chart per series.
const num = (y) => (y !== 0 && Math.abs(y) < 1e-2 ? y.toExponential(1) : y.toPrecision(3));
const flatPoint = (p) => Object.fromEntries(Object.entries(p).flatMap(([k, x]) =>
  x && typeof x === "object" && !Array.isArray(x) ? Object.entries(x).map(([j, y]) => [`${k}.${j}`, y]) : [[k, x]]));
function curveCharts(meta) {
  const out = [];
  for (const [name, raw] of Object.entries(meta || {})) {
    if (!Array.isArray(raw) || raw.length < 2 || !raw.every((p) => p && typeof p.step === "number")) continue;
    const v = raw.map(flatPoint);
    const series = [...new Set(v.flatMap((p) => Object.keys(p).filter((k) => k !== "step" && typeof p[k] === "number")))];
    for (const key of series) {
      const pts = v.filter((p) => typeof p[key] === "number").map((p) => [p.step, p[key]]);
      if (pts.length < 2) continue;
      const W = 420, H = 200, xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
      const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
      const sx = (x) => 48 + (x - x0) / ((x1 - x0) || 1) * (W - 58), sy = (y) => H - 20 - (y - y0) / ((y1 - y0) || 1) * (H - 35);
      out.push(el("svg:svg", { width: W, height: H, class: "chart", "data-series": `${name}.${key}`, style: "background:#fff;border:1px solid #e3e3e3;margin:0 10px 10px 0" },
        el("svg:text", { x: W / 2, y: 13, "font-weight": 600, "text-anchor": "middle" }, `${name}: ${key}`),
        el("svg:text", { x: 2, y: sy(y1) + 4, fill: "#777" }, num(y1)),
        el("svg:text", { x: 2, y: sy(y0) + 4, fill: "#777" }, num(y0)),
        el("svg:text", { x: W - 10, y: H - 4, fill: "#777", "text-anchor": "end" }, `step ${x1}`),
        el("svg:polyline", { fill: "none", stroke: "#2f7ed8", "stroke-width": 1.5, points: pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ") })));
    }
  }
  return out;
}

async function recordsView(id, offset) {
  const box = el("div", { id: "records" });
  const load = async (o) => {
    const p = await api(`/api/artifacts/${id}/preview?offset=${o}&limit=20`);
    if (!p.records) { box.replaceChildren(); return; }
    const items = p.records.items; const keys = [...new Set(items.flatMap((i) => Object.keys(i.record || {})))].slice(0, 8);
    box.replaceChildren(el("h2", {}, "Records"),
      table(["#", "part", ...keys], items.map((i) => [i.index, i.part, ...keys.map((k) => valueView(i.record[k], 3))])),
      pager(o, 20, p.records.more, load));
  };
  await load(offset);
  return box;
}

async function artifactPage(id) {
  const [a, lin, files, prev] = await Promise.all([api(`/api/artifacts/${id}`), api(`/api/artifacts/${id}/lineage`), api(`/api/artifacts/${id}/files`), api(`/api/artifacts/${id}/preview?limit=1`)]);
  const nodes = lin.nodes.map((n) => ({ id: n.digest, label: `${n.step}.${n.output}`, sub: `${n.kind} ${short(n.digest)}`, fill: n.digest === a.digest ? "#1f2933" : "#fff", textFill: n.digest === a.digest ? "#fff" : "#222", href: `#/artifacts/${n.digest}` }));
  const edges = lin.edges.map((e) => ({ from: e.from, to: e.to, label: e.step }));
  const compare = el("form", { class: "filters", onsubmit: (ev) => { ev.preventDefault(); const other = new FormData(ev.target).get("other"); if (other) location.hash = `#/diff/${a.digest}/${other}`; } },
    el("input", { name: "other", placeholder: "compare with digest prefix" }), el("button", { type: "submit" }, "Diff"));
  const parts = [el("h1", {}, `Artifact ${short(a.digest)} `, el("span", { class: "muted" }, a.kind)),
    el("table", { class: "kv", id: "record" },
      [["digest", el("span", { class: "mono" }, a.digest)], ["kind", a.kind], ["size", fmtBytes(a.size)], ["producer", `${a.producer_step}.${a.output}`],
       ["run", el("a", { href: `#/runs/${a.producer_run}/${a.producer_step}` }, a.producer_run)], ["pipeline", a.pipeline], ["created", a.created_at]]
        .map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v)))),
    compare,
    el("h2", {}, "Lineage"), el("div", { id: "lineage" }, nodes.length ? graph(nodes, edges, a.digest) : el("p", { class: "muted" }, "none recorded")),
    el("h2", {}, "Metadata"), el("div", { id: "metadata" }, valueView(a.metadata))];
  const charts = curveCharts(a.metadata);
  // Curves go above the (long) metadata tables.
  if (charts.length) parts.splice(parts.length - 2, 0, el("h2", {}, "Curves"), el("div", { id: "curves" }, charts));
  if (prev.config) parts.push(el("h2", {}, "Config"), el("div", { id: "config" }, valueView(prev.config)));
  if (prev.metrics) parts.push(el("h2", {}, "Metrics"), el("div", { id: "metrics" }, valueView(prev.metrics)));
  if (prev.embeddings) {
    const e = prev.embeddings;
    parts.push(el("h2", {}, "Embeddings"), el("p", {}, `${e.count} vectors × ${e.dim} dims · model ${e.model || "?"} · ${e.projection.method}, ${e.projection.sampled} points`), scatter(e.projection.points));
  }
  if (prev.records) parts.push(await recordsView(a.digest, 0));
  parts.push(el("h2", {}, "Files"), table(["file", "size"], files.files.map((f) => [el("a", { href: `/api/artifacts/${a.digest}/files/${f.path || "content"}` }, f.path || "(content)"), fmtBytes(f.size)])));
  $main.replaceChildren(...parts);
}

async function diffPage(x, y) {
  const d = await api(`/api/diff/${x}/${y}`);
  const rows = (o) => Object.entries(o).map(([k, v]) => [k, valueView(v.a), valueView(v.b)]);
  $main.replaceChildren(el("h1", {}, "Diff ", artLink(d.a), " → ", artLink(d.b)),
    d.identical ? el("p", {}, "identical content") : null,
    d.same_kind ? null : el("p", { class: "error" }, "different kinds"),
    el("h2", {}, "Record"), table(["field", "a", "b"], rows(d.fields)),
    el("h2", {}, "Metadata"), table(["key", "a", "b"], rows(d.metadata)),
    el("h2", {}, "Content"), table(["path", "change", "lines", "sample"], d.content.map((c) => [c.path || "(file)", c.change,
      c.lines_added === undefined ? "" : `+${c.lines_added} −${c.lines_removed}`, c.sample ? el("pre", {}, c.sample.join("\n")) : ""])));
}

// Chat with `cairn serve` (its address from `cairn ui --serve-url`, or ?server=): one
// model or two side by side (base vs tuned), each answer streamed over server-sent
// events, the retrieved sources and stage times under it.
async function chatPage() {
  const cfg = await api("/api/config");
  const url = (params().get("server") || cfg.serve_url).replace(/\/$/, "");
  let models;
  try {
    const r = await fetch(`${url}/v1/models`);
    models = (await r.json()).data.filter((m) => !(m.cairn && m.cairn.embedding_dim)).map((m) => m.id);
  } catch (e) {
    $main.replaceChildren(el("h1", {}, "Chat"), el("p", { class: "error", id: "chat-error" },
      `cairn serve does not answer at ${url}: start it with \`cairn serve --model ...\`, or give its address to \`cairn ui --serve-url\``));
    return;
  }
  const pick = (id, none) => el("select", { id }, none ? el("option", { value: "" }, "(none)") : null, models.map((m) => el("option", { value: m }, m)));
  const a = pick("chat-model-a", false), b = pick("chat-model-b", true);
  const rag = el("input", { type: "checkbox", id: "chat-rag", checked: "" });
  const temperature = el("input", { type: "number", id: "chat-temperature", value: "0.7", min: "0", max: "2", step: "0.1", style: "width:5em" });
  const maxTokens = el("input", { type: "number", id: "chat-max-tokens", value: "256", min: "1", style: "width:6em" });
  const question = el("textarea", { id: "chat-question", rows: 3, cols: 80, placeholder: "Ask the twin…" });
  const answers = el("div", { class: "cols", id: "chat-answers" });
  const sources = (list) => el("ol", { class: "sources" }, list.map((s) => el("li", {},
    s.url ? el("a", { href: s.url, target: "_blank", rel: "noopener" }, s.title || s.url) : (s.title || s.id),
    el("span", { class: "muted" }, ` ${s.collection} · score ${Number(s.score).toFixed(4)}`),
    el("div", { class: "muted snippet" }, (s.text || "").slice(0, 200)))));
  async function stream(model, i) {
    const out = document.getElementById(`chat-answer-${i}`), meta = document.getElementById(`chat-meta-${i}`);
    const box = document.getElementById(`chat-sources-${i}`);
    const body = { model, messages: [{ role: "user", content: question.value }], stream: true, rag: rag.checked,
      temperature: Number(temperature.value), max_tokens: Number(maxTokens.value) };
    const r = await fetch(`${url}/v1/chat/completions`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
    if (!r.ok) {
      const e = await r.json().catch(() => ({}));
      meta.textContent = (e.error && e.error.message) || r.statusText; meta.className = "error";
      out.dataset.done = "error";
      return;
    }
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
          const chunk = JSON.parse(line.slice(6));
          if (chunk.error) { meta.textContent = chunk.error.message; meta.className = "error"; continue; }
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) out.textContent += delta.content;
          if (chunk.cairn) {
            const t = chunk.cairn.timings_ms || {}, rt = chunk.cairn.retrieval_ms;
            meta.textContent = `${Math.round(t.total || 0)} ms` + (rt ? `, retrieval ${Math.round(rt.total)} ms` : "");
            if (chunk.cairn.sources) box.replaceChildren(el("h3", {}, "Sources"), sources(chunk.cairn.sources));
          }
        }
      }
    }
    out.dataset.done = "true";
  }
  async function ask(ev) {
    ev.preventDefault();
    const chosen = [a.value, b.value].filter(Boolean);
    answers.replaceChildren(...chosen.map((m, i) => el("div", { class: "panel", id: `chat-panel-${i}` },
      el("h2", {}, m), el("div", { class: "answer", id: `chat-answer-${i}` }), el("p", { class: "muted", id: `chat-meta-${i}` }),
      el("div", { id: `chat-sources-${i}` }))));
    await Promise.all(chosen.map((m, i) => stream(m, i)));
  }
  $main.replaceChildren(el("h1", {}, "Chat"), el("p", { class: "muted" }, `cairn serve at ${url}`),
    el("form", { class: "filters", id: "chat-form", onsubmit: ask }, el("label", {}, "model ", a), el("label", {}, "beside ", b),
      el("label", {}, "temperature ", temperature), el("label", {}, "max tokens ", maxTokens),
      el("label", {}, rag, " retrieval (with --rag)")),
    el("form", { onsubmit: ask }, question, el("p", {}, el("button", { id: "chat-send", type: "submit" }, "Send"))),
    answers);
}

async function route() {
  const [path] = location.hash.slice(1).split("?");
  const parts = path.split("/").filter(Boolean);
  document.getElementById("nav-runs").classList.toggle("active", !["artifacts", "chat"].includes(parts[0]));
  document.getElementById("nav-artifacts").classList.toggle("active", parts[0] === "artifacts");
  document.getElementById("nav-chat").classList.toggle("active", parts[0] === "chat");
  try {
    if (parts[0] === "runs" && parts[1]) await runPage(decodeURIComponent(parts[1]), parts[2] && decodeURIComponent(parts[2]));
    else if (parts[0] === "artifacts" && parts[1]) await artifactPage(parts[1]);
    else if (parts[0] === "artifacts") await artifactsPage();
    else if (parts[0] === "diff" && parts[2]) await diffPage(parts[1], parts[2]);
    else if (parts[0] === "compare") await comparePage();
    else if (parts[0] === "chat") await chatPage();
    else await runsPage();
  } catch (e) {
    $main.replaceChildren(el("h1", {}, "Error"), el("p", { class: "error" }, e.message));
  }
}
window.addEventListener("hashchange", route);
route();
