// NVIZ: the nmoe dashboard. Plain JavaScript and Plotly (served from the installed plotly wheel).
// Views: #/ (runs), #/run/ID, #/compare/ID1,ID2, #/leaderboard. Every view polls the JSON API every
// poll_s seconds and appends the new points, so a run that is being written updates by itself.
"use strict";

const NVIZ = { status: null, generation: 0, lastPoll: null, runsState: { sort: "started_at", desc: true, filter: "", status: "", selected: new Set() } };
window.NVIZ = NVIZ;

const PLOT_CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["select2d", "lasso2d", "autoScale2d"] };
const PALETTE = ["#2f6fdb", "#e8590c", "#2b8a3e", "#c2255c", "#7048e8", "#0b7285", "#5c940d", "#d9480f", "#862e9c", "#364fc7", "#a61e4d", "#087f5b"];

// ------------------------------------------------------------------ small helpers

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

async function api(path) {
  const resp = await fetch(path, { cache: "no-store" });
  let body = null;
  try { body = await resp.json(); } catch (e) { /* not JSON: reported below */ }
  if (!resp.ok || body === null) throw new ApiError((body && body.error) || `${path}: HTTP ${resp.status}`, resp.status);
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fmt(v, digits = 4) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "string") return v;  // 'nan', 'inf', '-inf' from the server
  if (typeof v === "boolean") return v ? "yes" : "no";
  const a = Math.abs(v);
  if (a >= 1e4) return Math.round(v).toLocaleString("en-US");
  if (a >= 1e-3 || v === 0) return Number(v.toPrecision(digits)).toString();
  return v.toExponential(2);
}
const fmtPct = (v) => (typeof v === "number" ? (100 * v).toFixed(1) + "%" : fmt(v));
const short = (s, n = 8) => (s ? String(s).slice(0, n) : "–");
function fmtDuration(s) {
  if (typeof s !== "number") return fmt(s);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = Math.round(s % 60);
  return h ? `${h}h ${String(m).padStart(2, "0")}m` : m ? `${m}m ${String(sec).padStart(2, "0")}s` : `${sec}s`;
}
const layerName = (n) => `layer${String(n).padStart(2, "0")}`;

function setBanner(message, kind = "error") {
  const banner = document.getElementById("banner");
  if (!message) { banner.hidden = true; banner.textContent = ""; return; }
  banner.hidden = false;
  banner.className = kind;
  banner.textContent = message;
}

function markUpdated() {
  NVIZ.lastPoll = Date.now();
  document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()} · every ${NVIZ.status.poll_s}s`;
}

// Repeats `fn` every poll_s seconds until the view changes (one request chain at a time, never overlapping).
function poll(generation, fn) {
  const tick = async () => {
    if (generation !== NVIZ.generation) return;
    try {
      await fn();
      markUpdated();
    } catch (e) {
      if (generation === NVIZ.generation) setBanner(e.message);
    }
    if (generation === NVIZ.generation) setTimeout(tick, NVIZ.status.poll_s * 1000);
  };
  return tick();
}

// ------------------------------------------------------------------ series store and charts

// Points per (tag, rank) of one run, appended from the API's cursor-based answers.
class SeriesStore {
  constructor(runId) { this.runId = runId; this.series = new Map(); this.cursors = {}; }

  key(tag, rank) { return `${tag}@${rank}`; }

  merge(answer) {
    for (const s of answer.series) {
      const k = this.key(s.tag, s.rank);
      let have = this.series.get(k);
      if (!have) { have = { tag: s.tag, rank: s.rank, steps: [], values: [], nonfinite: [] }; this.series.set(k, have); }
      const last = have.steps.length ? have.steps[have.steps.length - 1] : -Infinity;
      for (let i = 0; i < s.steps.length; i++) {
        if (s.steps[i] <= last) continue;
        have.steps.push(s.steps[i]);
        have.values.push(s.values[i]);
      }
      for (const nf of s.nonfinite) if (nf[0] > last) have.nonfinite.push(nf);
    }
  }

  async fetch(mode, prefixes) {
    const params = new URLSearchParams({ ranks: mode });
    for (const p of prefixes) params.append("prefix", p);
    if (this.cursors[mode]) params.set("cursor", this.cursors[mode]);
    const answer = await api(`/api/runs/${encodeURIComponent(this.runId)}/series?${params}`);
    this.merge(answer);
    this.cursors[mode] = answer.cursor;
  }

  get(tag, rank) { return this.series.get(this.key(tag, rank)); }
  ranksOf(tag) { return [...this.series.values()].filter((s) => s.tag === tag).map((s) => s.rank).sort((a, b) => a - b); }
  tags() { return new Set([...this.series.values()].map((s) => s.tag)); }
}

function chartLayout(spec) {
  const layout = {
    title: { text: spec.title, font: { size: 13 }, x: 0.02 },
    margin: { l: 60, r: 16, t: 34, b: 30 },
    height: spec.height || 270,
    xaxis: { zeroline: false, hoverformat: "d" },  // x is the step everywhere
    yaxis: { type: spec.logy ? "log" : "linear", tickformat: spec.percent ? ".1%" : spec.tickformat || "", zeroline: false, exponentformat: "e" },
    yaxis2: { overlaying: "y", range: [0, 1], visible: false, fixedrange: true },
    legend: { orientation: "h", y: -0.12, yanchor: "top", font: { size: 10 } },
    hovermode: "closest",
    paper_bgcolor: "#fff", plot_bgcolor: "#fff",
    shapes: [], annotations: [],
    uirevision: spec.id,  // keep the user's zoom across live updates
  };
  if (spec.threshold) {
    const t = spec.threshold;
    layout.shapes.push({ type: "line", xref: "paper", x0: 0, x1: 1, y0: t.value, y1: t.value, line: { color: "#c0392b", dash: "dash", width: 1.5 } });
    layout.annotations.push({ xref: "paper", x: 1, y: t.value, text: `runbook: ${t.label}`, showarrow: false, xanchor: "right", yanchor: "bottom", font: { size: 10, color: "#c0392b" } });
  }
  return layout;
}

// One Plotly line chart fed from SeriesStores: `lines` is [{store, tag, rank, name, scale}].
function drawLines(div, spec, lines) {
  const traces = [];
  const nonfinite = { x: [], text: [] };
  lines.forEach((line, i) => {
    const s = line.store.get(line.tag, line.rank);
    if (!s || !s.steps.length) return;
    const scale = line.scale || 1;
    traces.push({
      type: "scatter", mode: s.steps.length > 1 ? "lines" : "markers", name: line.name,
      x: s.steps, y: scale === 1 ? s.values : s.values.map((v) => (v === null ? null : v * scale)),
      line: { width: line.width || 1.6, color: line.color || PALETTE[i % PALETTE.length], dash: line.dash },
      connectgaps: false,
    });
    for (const [step, what] of s.nonfinite) { nonfinite.x.push(step); nonfinite.text.push(`${line.name}: ${what} at step ${step}`); }
  });
  if (nonfinite.x.length) {
    traces.push({ type: "scatter", mode: "markers", name: "non-finite", x: nonfinite.x, y: nonfinite.x.map(() => 0.97), yaxis: "y2", text: nonfinite.text, hoverinfo: "text", marker: { symbol: "x", size: 9, color: "#c0392b" } });
  }
  const layout = chartLayout(spec);
  if (!traces.length) layout.annotations.push({ text: "no data yet", xref: "paper", yref: "paper", x: 0.5, y: 0.5, showarrow: false, font: { color: "#6b7385" } });
  Plotly.react(div, traces, layout, PLOT_CONFIG);
}

function chartDiv(id, wide = false) { return el("div", { id: `chart-${id}`, class: wide ? "chart wide" : "chart" }); }

// ------------------------------------------------------------------ router

const ROUTER_CHARTS = [
  { metric: "entropy_mean", title: "Router entropy (mean over tokens, nats)" },
  { metric: "max_gate_mean", title: "Max gate (mean over tokens)" },
  { metric: "collapse_frac", title: "Collapsed experts (fraction)" },
  { metric: "dropped_frac", title: "Dropped (token, k) pairs (fraction)" },
  { metric: "load_cv", title: "Expert load CV (std / mean)" },
];

function routerTable(answer) {
  const th = NVIZ.status.thresholds;
  const cols = ["entropy_mean", "max_gate_mean", "collapse_frac", "dropped_tokens", "dropped_frac", "load_cv"];
  const head = el("tr", {}, el("th", {}, "layer"), cols.map((c) => el("th", { class: "num", title: th[c] ? `runbook: ${th[c].label}` : "" }, th[c] ? `${c} (${th[c].label.replace(/^.* ([<>≈])/, "$1")})` : c)));
  const rows = answer.layers.map((layer) => el("tr", {}, el("td", { class: "mono" }, layerName(layer.layer)), cols.map((c) => {
    const cell = layer[c];
    if (!cell) return el("td", { class: "num muted" }, "–");
    const cls = cell.ok === true ? "num ok" : cell.ok === false ? "num bad" : "num";
    return el("td", { class: cls, title: cell.ok === false ? `outside runbook range: ${th[c].label}` : "" }, fmt(cell.value));
  })));
  const caption = `latest values, rank ${answer.rank}, step ${fmt(answer.step)} — red: outside the runbook's range`;
  return el("div", {}, el("p", { class: "muted" }, caption), el("table", { id: "router-table" }, el("thead", {}, head), el("tbody", {}, rows)));
}

// ------------------------------------------------------------------ expert-load heatmaps

const LOG2_CAP = 3;  // colour saturates at 8x above / below the mean load

function relativeLog2(load) {
  const finite = load.filter((v) => typeof v === "number");
  const mean = finite.reduce((a, b) => a + b, 0) / Math.max(finite.length, 1);
  return load.map((v) => (typeof v !== "number" || mean <= 0 ? null : Math.max(-LOG2_CAP, Math.min(LOG2_CAP, Math.log2(Math.max(v, 1e-12) / mean)))));
}

function heatmapLayout(title, ytitle, xtitle, height) {
  return {
    title: { text: title, font: { size: 13 }, x: 0.02 }, height, margin: { l: 70, r: 20, t: 34, b: 44 },
    xaxis: { title: { text: xtitle, font: { size: 11 } } }, yaxis: { title: { text: ytitle, font: { size: 11 } }, autorange: "reversed" },
    paper_bgcolor: "#fff", uirevision: title.split(" ")[0],
  };
}
const HEAT_STYLE = {
  type: "heatmap", colorscale: [[0, "#2166ac"], [0.25, "#92c5de"], [0.5, "#f7f7f7"], [0.75, "#f4a582"], [1, "#b2182b"]], zmin: -LOG2_CAP, zmax: LOG2_CAP, zmid: 0,
  colorbar: { title: { text: "load / mean", side: "right" }, tickvals: [-3, -2, -1, 0, 1, 2, 3], ticktext: ["≤⅛", "¼", "½", "1", "2", "4", "≥8"], thickness: 12 },
};

class ExpertLoad {
  constructor(runId, container) {
    this.runId = runId; this.layers = new Map(); this.after = null; this.follow = true; this.selectedLayer = null;
    this.slider = el("input", { type: "range", min: 0, max: 0, value: 0, oninput: () => { this.follow = +this.slider.value === +this.slider.max; this.draw(); } });
    this.stepLabel = el("span", { class: "mono" }, "");
    this.layerSelect = el("select", { onchange: () => { this.selectedLayer = +this.layerSelect.value; this.draw(); } });
    this.byLayer = chartDiv("expert-load-layers", true);
    this.overSteps = chartDiv("expert-load-steps", true);
    this.windowNote = el("span", { class: "muted" }, "");
    container.append(
      el("div", { class: "slider" }, el("span", {}, "step"), this.slider, this.stepLabel, this.windowNote),
      el("div", { class: "grid" }, this.byLayer),
      el("div", { class: "slider" }, el("span", {}, "layer"), this.layerSelect),
      el("div", { class: "grid" }, this.overSteps),
    );
  }

  async fetch() {
    const params = new URLSearchParams();
    if (this.after !== null) params.set("after", this.after);
    const answer = await api(`/api/runs/${encodeURIComponent(this.runId)}/expert_load?${params}`);
    if (this.after === null && answer.window > 1) this.windowNote.textContent = `(history summed over windows of ${answer.window} steps)`;
    for (const l of answer.layers) {
      const have = this.layers.get(l.layer) || { steps: [], load: [] };
      l.steps.forEach((s, i) => { if (!have.steps.length || s > have.steps[have.steps.length - 1]) { have.steps.push(s); have.load.push(l.load[i]); } });
      this.layers.set(l.layer, have);
    }
    if (answer.last_step !== null && answer.last_step !== undefined) this.after = answer.last_step;
    this.draw();
  }

  allSteps() { return [...new Set([...this.layers.values()].flatMap((l) => l.steps))].sort((a, b) => a - b); }

  draw() {
    const layers = [...this.layers.keys()].sort((a, b) => a - b);
    if (!layers.length) return;
    if (this.layerSelect.options.length !== layers.length) {
      this.layerSelect.replaceChildren(...layers.map((l) => el("option", { value: l }, layerName(l))));
      if (this.selectedLayer === null || !layers.includes(this.selectedLayer)) this.selectedLayer = layers[layers.length - 1];
      this.layerSelect.value = this.selectedLayer;
    }
    const steps = this.allSteps();
    this.slider.max = steps.length - 1;
    if (this.follow) this.slider.value = steps.length - 1;
    const step = steps[+this.slider.value];
    this.stepLabel.textContent = String(step);
    // layer x expert at the chosen step (each layer's latest logged step <= it)
    const z = [], text = [];
    for (const l of layers) {
      const d = this.layers.get(l);
      let i = d.steps.length - 1;
      while (i > 0 && d.steps[i] > step) i--;
      z.push(relativeLog2(d.load[i]));
      text.push(d.load[i].map((v, e) => `${layerName(l)} expert ${e}<br>step ${d.steps[i]}: ${fmt(v)} slots`));
    }
    const nExperts = Math.max(...z.map((r) => r.length));
    Plotly.react(this.byLayer, [{ ...HEAT_STYLE, z, text, hoverinfo: "text", x: [...Array(nExperts).keys()], y: layers.map(layerName) }],
      heatmapLayout(`Expert load by layer at step ${step}`, "layer", "expert", Math.max(220, 60 + 22 * layers.length)), PLOT_CONFIG);
    // expert x step for the chosen layer
    const d = this.layers.get(this.selectedLayer);
    const rel = d.load.map(relativeLog2);
    const zT = [], textT = [];
    for (let e = 0; e < nExperts; e++) {
      zT.push(rel.map((row) => (e < row.length ? row[e] : null)));
      textT.push(d.steps.map((s, i) => `expert ${e} step ${s}: ${fmt(d.load[i][e])} slots`));
    }
    Plotly.react(this.overSteps, [{ ...HEAT_STYLE, z: zT, text: textT, hoverinfo: "text", x: d.steps, y: [...Array(nExperts).keys()] }],
      heatmapLayout(`Expert load over steps, ${layerName(this.selectedLayer)}`, "expert", "step", Math.max(240, 70 + 12 * nExperts)), PLOT_CONFIG);
  }
}

// ------------------------------------------------------------------ runs view

const RUN_COLUMNS = [
  { key: "run_id", label: "run" }, { key: "status", label: "status" }, { key: "name", label: "config" },
  { key: "fingerprint", label: "fingerprint" }, { key: "git_rev", label: "git" }, { key: "device", label: "device" },
  { key: "gpu_count", label: "GPUs", num: true }, { key: "steps", label: "steps", num: true },
  { key: "val_loss", label: "val loss", num: true }, { key: "train_loss", label: "train loss", num: true },
  { key: "tokens_per_s", label: "tokens/s", num: true }, { key: "mfu", label: "MFU", num: true },
  { key: "target_reached", label: "target", num: true }, { key: "started_at", label: "started" },
];

function runCell(run, key) {
  const v = run[key];
  switch (key) {
    case "run_id": return el("td", { class: "mono" }, el("a", { href: `#/run/${encodeURIComponent(v)}` }, v));
    case "status": return el("td", {}, el("span", { class: `badge ${run.error ? "damaged" : v}`, title: run.error || "" }, run.error ? "damaged" : v), run.live ? [" ", el("span", { class: "badge live" }, "live")] : null);
    case "fingerprint": case "git_rev": return el("td", { class: "mono", title: v || "" }, short(v));
    case "device": return el("td", { title: v || "" }, v ? String(v).replace(/^cpu \(.*$/, "cpu") : "–");
    case "mfu": return el("td", { class: "num" }, fmtPct(v));
    case "target_reached": return el("td", { class: v === true ? "num ok" : "num" }, v === true ? "✓" : v === false ? "✗" : "–");
    case "started_at": return el("td", { class: "muted" }, v ? v.replace("T", " ").slice(0, 16) : "–");
    default: return el("td", { class: RUN_COLUMNS.find((c) => c.key === key).num ? "num" : "" }, fmt(v));
  }
}

function compareValues(a, b) {
  const na = a === null || a === undefined, nb = b === null || b === undefined;
  if (na || nb) return na === nb ? 0 : na ? 1 : -1;
  if (typeof a === "number" && typeof b === "number") return a - b;
  return String(a).localeCompare(String(b));
}

async function runsView(main, generation) {
  const st = NVIZ.runsState;
  const tbody = el("tbody");
  const count = el("span", { class: "muted" });
  const compare = el("button", { disabled: true, onclick: () => { location.hash = `#/compare/${[...st.selected].map(encodeURIComponent).join(",")}`; } }, "Overlay selected");
  const statuses = ["", "running", "completed", "failed", "interrupted", "unregistered"];
  let runs = [];
  const render = () => {
    const q = st.filter.toLowerCase();
    const shown = runs.filter((r) => (!st.status || r.status === st.status) &&
      (!q || [r.run_id, r.name, r.status, r.device, r.fingerprint, r.git_rev].some((f) => f && String(f).toLowerCase().includes(q))));
    shown.sort((a, b) => compareValues(a[st.sort], b[st.sort]) * (st.desc ? -1 : 1));
    tbody.replaceChildren(...shown.map((run) => el("tr", {},
      el("td", {}, el("input", { type: "checkbox", checked: st.selected.has(run.run_id), onchange: (e) => { e.target.checked ? st.selected.add(run.run_id) : st.selected.delete(run.run_id); updateCompare(); } })),
      RUN_COLUMNS.map((c) => runCell(run, c.key)))));
    count.textContent = `${shown.length} of ${runs.length} runs`;
    for (const th of headRow.querySelectorAll("th.sortable")) th.className = `sortable ${th.dataset.num ? "num" : ""} ${th.dataset.key === st.sort ? (st.desc ? "sorted-desc" : "sorted-asc") : ""}`;
  };
  const updateCompare = () => { compare.disabled = st.selected.size < 2; compare.textContent = `Overlay selected (${st.selected.size})`; };
  const headRow = el("tr", {}, el("th", {}, ""), RUN_COLUMNS.map((c) => el("th", {
    class: "sortable", "data-key": c.key, "data-num": c.num ? "1" : null,
    onclick: () => { st.desc = st.sort === c.key ? !st.desc : !!c.num; st.sort = c.key; render(); },
  }, c.label)));
  main.replaceChildren(
    el("h1", {}, "Runs"),
    el("div", { class: "controls" },
      el("input", { type: "search", placeholder: "filter: id, config, device, fingerprint…", value: st.filter, oninput: (e) => { st.filter = e.target.value; render(); } }),
      el("select", { onchange: (e) => { st.status = e.target.value; render(); } }, statuses.map((s) => el("option", { value: s, selected: s === st.status }, s || "any status"))),
      compare, count),
    el("table", { id: "runs-table" }, el("thead", {}, headRow), tbody),
  );
  updateCompare();
  await poll(generation, async () => {
    const answer = await api("/api/runs");
    runs = answer.runs;
    const problems = [...answer.problems, ...NVIZ.status.problems.filter((p) => !answer.problems.includes(p))];
    setBanner(problems.join("\n"), answer.problems.length ? "error" : "info");
    if (!runs.length && !problems.length) setBanner(`no runs yet in ${NVIZ.status.registry} or ${NVIZ.status.metrics_dir}`, "info");
    render();
  });
}

// ------------------------------------------------------------------ run view

const TRAIN_CHARTS = [
  { id: "loss", title: "Loss", lines: [{ tag: "train/loss", name: "train" }, { tag: "val/loss", name: "val", width: 2.4 }] },
  { id: "lr", title: "Learning rate", lines: [{ tag: "train/lr", name: "lr" }] },
  { id: "grad_norm", title: "Grad norm", lines: [{ tag: "train/grad_norm", name: "grad norm" }] },
];
const PERF_CHARTS = [
  { id: "tokens_per_s", title: "Tokens/s", tickformat: "~s", perRank: ["perf/tokens_per_s"] },
  { id: "mfu", title: "MFU", percent: true, perRank: ["perf/mfu"] },
  { id: "memory", title: "Memory (GiB)", perRank: ["perf/peak_mem_gib", "perf/mem_allocated_mib", "perf/mem_reserved_mib"] },
];
const MIB_TO_GIB = 1 / 1024;
const KNOWN_PREFIXES = ["train/loss", "val/loss", "train/lr", "train/grad_norm", "train/tokens_seen", "perf/", "router/", "precision/"];

function metaGrid(run) {
  const item = (label, value, title) => el("div", { title: title || "" }, el("span", {}, label), value);
  return el("div", { class: "meta" },
    item("status", el("span", {}, el("span", { class: `badge ${run.status}` }, run.status), run.live ? [" ", el("span", { class: "badge live" }, "live")] : null)),
    item("config", run.name || "–"), item("fingerprint", el("span", { class: "mono" }, short(run.fingerprint, 16)), run.fingerprint),
    item("git", el("span", { class: "mono" }, short(run.git_rev, 12)), run.git_rev), item("device", run.device || "–"),
    item("GPUs", fmt(run.gpu_count)), item("ranks", run.ranks.length ? run.ranks.join(", ") : "–"), item("steps", fmt(run.steps)),
    item("val loss", fmt(run.val_loss)), item("tokens/s", fmt(run.tokens_per_s)), item("MFU", fmtPct(run.mfu)),
    item("target reached", run.target_reached === null ? "–" : fmt(run.target_reached)),
    item("started", run.started_at ? run.started_at.replace("T", " ").slice(0, 19) : "–"),
    item("ended", run.ended_at ? run.ended_at.replace("T", " ").slice(0, 19) : "–"));
}

function perRankLines(store, tags) {
  const lines = [];
  for (const tag of tags) {
    for (const rank of store.ranksOf(tag)) {
      const label = tag.replace(/^perf\//, "");
      lines.push({ store, tag, rank, name: store.ranksOf(tag).length > 1 ? `${label} r${rank}` : label, scale: tag.endsWith("_mib") ? MIB_TO_GIB : 1 });
    }
  }
  return lines;
}

function layerLines(store, prefix, layers, metric, meanTag) {
  const lines = layers.map((l, i) => ({ store, tag: `${prefix}/${layerName(l)}/${metric}`, rank: store.lead, name: layerName(l), width: 1.2, color: PALETTE[i % PALETTE.length] }));
  if (meanTag) lines.push({ store, tag: meanTag, rank: store.lead, name: "mean", width: 3, color: "#1d2330" });
  return lines;
}

async function runView(main, generation, runId) {
  let run;
  try {
    run = await api(`/api/runs/${encodeURIComponent(runId)}`);
  } catch (e) {
    main.replaceChildren(el("h1", { class: "mono" }, runId), el("p", { id: "run-error", class: "bad" }, e.message), el("p", {}, el("a", { href: "#/" }, "← all runs")));
    return;
  }
  const store = new SeriesStore(runId);
  store.lead = run.ranks.length ? run.ranks[0] : 0;
  const header = el("div", { class: "card", id: "run-header" });
  const sections = el("div");
  main.replaceChildren(el("h1", { class: "mono" }, runId), header, sections);
  const charts = [];  // [{div, spec, lines: () => [...]}]
  const built = new Set();
  let expertLoad = null;
  let routerBox = null;

  const section = (id, title) => { const s = el("section", { id: `section-${id}` }, el("h2", {}, title)); sections.append(s); return s; };
  const addGrid = (sec, specs) => {
    const grid = el("div", { class: "grid" });
    for (const spec of specs) { const div = chartDiv(spec.id, spec.wide); grid.append(div); charts.push({ div, spec }); }
    sec.append(grid);
  };

  // Sections appear as soon as their tags exist (a live run gains val loss, router and arrays over time).
  const build = () => {
    if (!built.has("train")) {
      built.add("train");
      addGrid(section("train", "Training"), TRAIN_CHARTS.map((c) => ({ ...c, lines: () => c.lines.map((l) => ({ ...l, store, rank: store.lead })) })));
    }
    if (!built.has("perf")) {
      built.add("perf");
      addGrid(section("perf", "Throughput and memory"), PERF_CHARTS.map((c) => ({ ...c, lines: () => perRankLines(store, c.perRank) })));
    }
    if (!built.has("steptime") && run.ranks.length > 1) {
      built.add("steptime");
      addGrid(document.getElementById("section-perf"), [{ id: "step_time", title: "Step time per rank (s)", wide: true, lines: () => perRankLines(store, ["perf/step_time_s"]) }]);
    }
    if (!built.has("router") && run.router_layers.length) {
      built.add("router");
      const sec = section("router", "Router health");
      routerBox = el("div", { class: "card" });
      sec.append(routerBox);
      const th = NVIZ.status.thresholds;
      addGrid(sec, ROUTER_CHARTS.map((c) => ({
        id: `router_${c.metric}`, title: c.title, threshold: th[c.metric],
        lines: () => layerLines(store, "router", run.router_layers, c.metric, run.tags.includes(`router/mean/${c.metric}`) ? `router/mean/${c.metric}` : null),
      })));
    }
    if (!built.has("experts") && run.expert_load_layers.length) {
      built.add("experts");
      const sec = section("experts", "Expert load (routed slots per expert, relative to the layer's mean)");
      expertLoad = new ExpertLoad(runId, sec);
    }
    if (!built.has("precision") && run.precision_layers.length) {
      built.add("precision");
      addGrid(section("precision", "Precision"), [
        { id: "precision_flip_frac", title: "Flip rate (fraction of flipped values)", lines: () => layerLines(store, "precision", run.precision_layers, "flip_frac") },
        { id: "precision_quant_err", title: "Quantisation error", lines: () => layerLines(store, "precision", run.precision_layers, "quant_err") },
      ]);
    }
    const others = run.tags.filter((t) => !KNOWN_PREFIXES.some((p) => t.startsWith(p)) && !built.has(`other:${t}`)).slice(0, 40);
    if (others.length) {
      const sec = document.getElementById("section-other") || section("other", "Other metrics");
      for (const t of others) built.add(`other:${t}`);
      addGrid(sec, others.map((t) => ({ id: `other_${t.replace(/[^a-zA-Z0-9]+/g, "_")}`, title: t, lines: () => [{ store, tag: t, rank: store.lead, name: t }] })));
    }
    if (!run.ranks.length && !document.getElementById("no-metrics")) {
      sections.prepend(el("p", { id: "no-metrics", class: "muted" }, "This run has no metrics files yet."));
    }
  };

  const config = run.config_toml ? el("details", {}, el("summary", {}, "config (TOML)"), el("pre", { class: "mono" }, run.config_toml)) : null;
  let first = true;
  await poll(generation, async () => {
    if (!first) run = await api(`/api/runs/${encodeURIComponent(runId)}`);
    first = false;
    header.replaceChildren(metaGrid(run), config || "");
    setBanner(run.error || "");
    build();
    if (run.ranks.length) {
      await store.fetch("lead", [""]);
      if (run.ranks.length > 1) await store.fetch("all", ["perf/"]);
      if (routerBox) routerBox.replaceChildren(routerTable(await api(`/api/runs/${encodeURIComponent(runId)}/router`)));
      if (expertLoad) await expertLoad.fetch();
    }
    for (const c of charts) drawLines(c.div, c.spec, c.spec.lines());
  });
}

// ------------------------------------------------------------------ overlay view

const COMPARE_CHARTS = [
  { id: "cmp_loss", title: "Train loss", tag: "train/loss" },
  { id: "cmp_val_loss", title: "Val loss", tag: "val/loss" },
  { id: "cmp_lr", title: "Learning rate", tag: "train/lr" },
  { id: "cmp_grad_norm", title: "Grad norm", tag: "train/grad_norm" },
  { id: "cmp_tokens_per_s", title: "Tokens/s (lead rank)", tag: "perf/tokens_per_s", tickformat: "~s" },
  { id: "cmp_mfu", title: "MFU (lead rank)", tag: "perf/mfu", percent: true },
  { id: "cmp_load_cv", title: "Router load CV (mean over layers)", tag: "router/mean/load_cv" },
  { id: "cmp_entropy", title: "Router entropy (mean over layers)", tag: "router/mean/entropy_mean", thresholdKey: "entropy_mean" },
];

async function compareView(main, generation, ids) {
  const stores = ids.map((id) => new SeriesStore(id));
  const grid = el("div", { class: "grid" });
  main.replaceChildren(el("h1", {}, "Overlay"), el("p", {}, ids.map((id, i) => [i ? " · " : "", el("a", { class: "mono", href: `#/run/${encodeURIComponent(id)}`, style: `color:${PALETTE[i % PALETTE.length]}` }, id)])), grid);
  const divs = COMPARE_CHARTS.map((c) => { const d = chartDiv(c.id); grid.append(d); return d; });
  const details = await Promise.all(ids.map((id) => api(`/api/runs/${encodeURIComponent(id)}`)));
  details.forEach((d, i) => { stores[i].lead = d.ranks.length ? d.ranks[0] : 0; });
  await poll(generation, async () => {
    await Promise.all(stores.map((s, i) => (details[i].ranks.length ? s.fetch("lead", ["train/", "val/", "perf/", "router/mean/"]) : null)));
    COMPARE_CHARTS.forEach((c, k) => {
      const spec = { ...c, threshold: c.thresholdKey ? NVIZ.status.thresholds[c.thresholdKey] : null };
      drawLines(divs[k], spec, stores.map((s, i) => ({ store: s, tag: c.tag, rank: s.lead, name: ids[i], color: PALETTE[i % PALETTE.length] })));
    });
  });
}

// ------------------------------------------------------------------ leaderboard view

async function leaderboardView(main, generation) {
  const box = el("div");
  main.replaceChildren(el("h1", {}, "Leaderboard"), box);
  const known = new Set((await api("/api/runs")).runs.map((r) => r.run_id));
  await poll(generation, async () => {
    const answer = await api("/api/leaderboard");
    if (!answer.entries.length) {
      box.replaceChildren(el("p", { class: "muted", id: "leaderboard-empty" }, answer.message || `no entries in ${answer.path}`));
      return;
    }
    const head = ["#", "run", "config", "GPU", "steps", "tokens", "wall clock to target", "val loss", "target", "reached", "CORE", "git", "fingerprint", "date"];
    const rows = answer.entries.map((e, i) => {
      const core = e.core && typeof e.core === "object" ? e.core : null;
      const coreTitle = core && core.tasks ? Object.entries(core.tasks).map(([k, v]) => `${k}: ${fmt(v)}`).join("\n") : "";
      return el("tr", {},
        el("td", { class: "num" }, i + 1),
        el("td", { class: "mono" }, known.has(e.run_id) ? el("a", { href: `#/run/${encodeURIComponent(e.run_id)}` }, e.run_id) : e.run_id || "–"),
        el("td", {}, e.config || "–"), el("td", {}, `${e.gpu || "–"} × ${fmt(e.gpu_count)}`),
        el("td", { class: "num" }, fmt(e.steps)), el("td", { class: "num" }, fmt(e.tokens)),
        el("td", { class: "num" }, fmtDuration(e.wall_clock_s)), el("td", { class: "num" }, fmt(e.val_loss)),
        el("td", { class: "num" }, fmt(e.target_loss)), el("td", { class: e.target_reached ? "ok" : "bad" }, e.target_reached ? "✓" : "✗"),
        el("td", { class: "num", title: coreTitle }, core ? `${fmt(core.score)} (${fmt(core.n_tasks)} tasks)` : "–"),
        el("td", { class: "mono" }, short(e.git_rev)), el("td", { class: "mono" }, short(e.fingerprint)), el("td", {}, e.date || "–"));
    });
    box.replaceChildren(el("p", { class: "muted" }, `${answer.path} — sorted by wall clock to the target loss (runs that reached it first)`),
      el("table", { id: "leaderboard-table" }, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))), el("tbody", {}, rows)));
  });
}

// ------------------------------------------------------------------ routing

async function route() {
  const generation = ++NVIZ.generation;
  setBanner("");
  const main = document.getElementById("view");
  const hash = decodeURIComponent(location.hash.replace(/^#/, "")) || "/";
  try {
    if (hash.startsWith("/run/")) await runView(main, generation, hash.slice(5));
    else if (hash.startsWith("/compare/")) await compareView(main, generation, hash.slice(9).split(",").filter(Boolean));
    else if (hash.startsWith("/leaderboard")) await leaderboardView(main, generation);
    else await runsView(main, generation);
  } catch (e) {
    if (generation === NVIZ.generation) setBanner(e.message);
  }
}

async function start() {
  if (typeof Plotly === "undefined") {
    setBanner("plotly.min.js did not load from /static/plotly.min.js: restart `nmoe-metrics serve` (reinstall plotly if this persists)");
    return;
  }
  try {
    NVIZ.status = await api("/api/status");
  } catch (e) {
    setBanner(`cannot reach the NVIZ server: ${e.message}`);
    return;
  }
  document.getElementById("sources").textContent = `${NVIZ.status.metrics_dir} · ${NVIZ.status.registry}`;
  window.addEventListener("hashchange", route);
  route();
}

start();
