// flowgate dashboard: reads the /v1/stats/stream server-sent events (one `stats` document
// a second, the document of /v1/stats). Counters in the document are cumulative since the
// engine started; rates are their differences between successive documents, latency
// percentiles come from the differences of histogram buckets over the last WINDOW docs.
"use strict";

const HISTORY = 300; // documents kept for the charts: 5 minutes at one a second
const WINDOW = 10; // documents over which latency percentiles are estimated

const $ = (id) => document.getElementById(id);
const history = []; // {t: seconds (client clock), doc}
let selected = null; // key of the component shown in the details panel
let charts = null;

// ---- formatting ----
function fmt(n, digits) {
  if (n === null || n === undefined || !isFinite(n)) return "–";
  const a = Math.abs(n);
  if (a >= 1e9) return (n / 1e9).toFixed(2) + " G";
  if (a >= 1e6) return (n / 1e6).toFixed(2) + " M";
  if (a >= 1e4) return (n / 1e3).toFixed(1) + " k";
  return n.toFixed(digits === undefined ? (Number.isInteger(n) ? 0 : 1) : digits);
}
function bytes(n) {
  if (n === null || n === undefined || !isFinite(n)) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + u[i];
}
function ms(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  const m = seconds * 1000;
  return (m >= 100 ? m.toFixed(0) : m >= 10 ? m.toFixed(1) : m.toFixed(2)) + " ms";
}
function duration(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return (d ? d + "d " : "") + (d || h ? h + "h " : "") + m + "m " + (s % 60) + "s";
}
function setNum(id, value, text) {
  const el = $(id);
  el.dataset.v = value === null || value === undefined || !isFinite(value) ? "" : String(value);
  el.textContent = text;
}
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null) continue;
    if (k === "class") e.className = v; else if (k.startsWith("data-")) e.setAttribute(k, v); else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c === null || c === undefined ? "–" : String(c)));
  return e;
}
function fillBody(table, rows, empty) {
  const body = table.tBodies[0] || table.appendChild(document.createElement("tbody"));
  body.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { class: "muted", colSpan: 20 }, empty))]));
}

// ---- reading the documents ----
const sum = (xs) => xs.reduce((a, b) => a + b, 0);
const userTopic = (name) => !name.startsWith("_");
const topicEvents = (t) => sum(t.partitions.map((p) => p.end_offset));
const pipelines = (doc) => (doc.flow && doc.flow.pipelines) || [];
const outEvents = (doc) => sum(pipelines(doc).flatMap((p) => p.sinks.map((s) => s.events)));
// Into the engine: what the ingest listeners accepted plus what the sources read.
const inEvents = (doc) => (doc.flow && doc.flow.ingest ? doc.flow.ingest.events : sum(doc.topics.filter((t) => userTopic(t.name)).map(topicEvents)))
  + sum((doc.sources || []).map((s) => sourceEvents(doc, s.name)));

// The rate of a counter between the last two documents, per second.
function rate(get) {
  if (history.length < 2) return null;
  const a = history[history.length - 2], b = history[history.length - 1];
  const va = get(a.doc), vb = get(b.doc);
  if (va === undefined || vb === undefined || va === null || vb === null) return null;
  const dt = b.t - a.t;
  return dt > 0 ? Math.max(0, (vb - va) / dt) : null;
}

// A quantile of a histogram's observations over the last WINDOW documents (the upper
// bound of the bucket holding it, as Prometheus' histogram_quantile interpolates).
function quantile(q, get) {
  if (history.length < 2) return null;
  const b = get(history[history.length - 1].doc);
  const a = get(history[Math.max(0, history.length - 1 - WINDOW)].doc);
  if (!a || !b) return null;
  const total = b.count - a.count;
  if (total <= 0) return null;
  const rank = q * total;
  let prevLe = 0, prevN = 0;
  for (let i = 0; i < b.buckets.length; i++) {
    const [le, nb] = b.buckets[i];
    const n = nb - (a.buckets[i] ? a.buckets[i][1] : 0);
    if (n >= rank) return prevLe + (le - prevLe) * (n === prevN ? 1 : (rank - prevN) / (n - prevN));
    prevLe = le; prevN = n;
  }
  return prevLe; // above the largest finite bound
}
// Quantiles over every pipeline's end-to-end histogram together.
function e2eAll(doc) {
  const hs = pipelines(doc).map((p) => p.end_to_end_seconds).filter(Boolean);
  if (!hs.length) return null;
  const buckets = hs[0].buckets.map(([le], i) => [le, sum(hs.map((h) => (h.buckets[i] ? h.buckets[i][1] : 0)))]);
  return { count: sum(hs.map((h) => h.count)), sum: sum(hs.map((h) => h.sum)), buckets };
}

function findPipeline(doc, name) { return pipelines(doc).find((p) => p.name === name); }
function findSink(doc, pipeline, sink) { const p = findPipeline(doc, pipeline); return p && p.sinks.find((s) => s.name === sink); }
function findProcessor(doc, pipeline, id) { const p = findPipeline(doc, pipeline); return p && p.processors.find((x) => x.id === id); }
function findTopic(doc, name) { return doc.topics.find((t) => t.name === name); }

// ---- charts ----
function cssVar(name) { return getComputedStyle(document.documentElement).getPropertyValue(name).trim(); }
function makeCharts() {
  const fg = cssVar("--fg"), line = cssVar("--line"), a = cssVar("--accent"), b = cssVar("--accent2"), w = cssVar("--warn");
  const axes = [
    { stroke: fg, grid: { stroke: line, width: 1 }, ticks: { stroke: line } },
    { stroke: fg, grid: { stroke: line, width: 1 }, ticks: { stroke: line }, size: 56, values: (u, vs) => vs.map((v) => fmt(v)) },
  ];
  const make = (id, series, max) => {
    const box = $(id);
    const opts = {
      width: Math.max(200, box.clientWidth), height: box.clientHeight - 24,
      cursor: { drag: { x: false, y: false } }, legend: { live: true },
      scales: { x: { time: true }, y: { range: (u, lo, hi) => [0, max || Math.max(1, hi * 1.1)] } },
      axes, series: [{}, ...series.map(([label, stroke, dash]) => ({ label, stroke, width: 1.5, dash, value: (u, v) => fmt(v) }))],
    };
    box.replaceChildren();
    return new uPlot(opts, [[], ...series.map(() => [])], box);
  };
  return {
    throughput: make("chart-throughput", [["in", a], ["out", b]]),
    lag: make("chart-lag", [["lag", a]]),
    latency: make("chart-latency", [["p50", a], ["p99", b]]),
    memory: make("chart-memory", [["used", a], ["soft limit", w, [4, 4]]], 100),
  };
}
const series = { t: [], in: [], out: [], lag: [], p50: [], p99: [], used: [], soft: [] };
function pushSeries(point) {
  for (const k of Object.keys(series)) {
    series[k].push(point[k]);
    if (series[k].length > HISTORY) series[k].shift();
  }
}
function drawCharts() {
  if (!charts) return;
  charts.throughput.setData([series.t, series.in, series.out]);
  charts.lag.setData([series.t, series.lag]);
  charts.latency.setData([series.t, series.p50, series.p99]);
  charts.memory.setData([series.t, series.used, series.soft]);
}
function resizeCharts() {
  if (!charts) return;
  for (const [k, id] of [["throughput", "chart-throughput"], ["lag", "chart-lag"], ["latency", "chart-latency"], ["memory", "chart-memory"]]) {
    const box = $(id);
    charts[k].setSize({ width: Math.max(200, box.clientWidth), height: box.clientHeight - 24 });
  }
}

// ---- the pipeline graph ----
const NS = "http://www.w3.org/2000/svg";
function svg(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}
function drawGraph(doc) {
  const box = $("graph");
  const ps = pipelines(doc);
  if (!ps.length) {
    box.replaceChildren(el("p", { class: "muted" }, "No pipelines are configured."));
    return;
  }
  const W = 150, H = 38, GX = 70, GY = 14, PAD = 18;
  const sources = (doc.flow && doc.flow.sources) || [];
  const status = (name) => (doc.sources || []).find((s) => s.name === name) || {};
  const root = svg("svg", {});
  let y0 = 4, width = 0;
  for (const p of ps) {
    // Columns: sources (connectors writing into the pipeline's topics), topics, processors, sinks.
    const cols = [];
    const srcs = sources.filter((s) => p.topics.some((t) => writes(s, t)));
    if (srcs.length) cols.push(srcs.map((s) => ({ key: "source:" + s.name, label: s.name, kind: "source · " + s.type, bad: ["reconnecting", "stopped"].includes(status(s.name).state) })));
    cols.push(p.topics.map((t) => ({ key: "topic:" + t, label: t, kind: "topic" })));
    for (const x of p.processors) cols.push([{ key: "processor:" + p.name + ":" + x.id, label: x.id, kind: x.type }]);
    cols.push(p.sinks.map((s) => {
      const c = (doc.sink_controllers || []).find((c) => c.pipeline === p.name && c.sink === s.name);
      return { key: "sink:" + p.name + ":" + s.name, label: s.name, kind: "sink · " + s.type, bad: c && c.breaker !== "closed" };
    }));
    const rows = Math.max(...cols.map((c) => c.length));
    root.append(svg("text", { x: 4, y: y0 + 10, class: "pipeline" }, "pipeline " + p.name));
    const top = y0 + PAD;
    const pos = cols.map((c, ci) => c.map((n, ri) => ({ n, x: 4 + ci * (W + GX), y: top + (ri + (rows - c.length) / 2) * (H + GY) })));
    // Edges, each labelled with its rate.
    const edge = (a, b, r) => {
      const x1 = a.x + W, y1 = a.y + H / 2, x2 = b.x, y2 = b.y + H / 2, mx = (x1 + x2) / 2;
      root.append(svg("path", { d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}` }));
      root.append(svg("text", { x: mx, y: (y1 + y2) / 2 - 4, "text-anchor": "middle", class: "rate", "data-edge": b.n.key }, r === null ? "–" : fmt(r) + "/s"));
    };
    for (let ci = 1; ci < pos.length; ci++) {
      const prev = pos[ci - 1], cur = pos[ci];
      for (const b of cur) {
        for (const a of prev) {
          let r = null;
          if (a.n.key.startsWith("source:")) {
            const src = sources.find((s) => "source:" + s.name === a.n.key);
            if (!writes(src, b.n.label)) continue;
            r = rate((d) => sourceEvents(d, src.name));
          } else if (a.n.key.startsWith("topic:")) {
            // Topic into the first processor or the sinks: what the pipeline reads.
            r = p.topics.length === 1 ? rate((d) => { const x = findPipeline(d, p.name); return x && x.events_read; }) : rate((d) => topicEventsOf(d, a.n.label));
          } else {
            const id = a.n.key.split(":").slice(2).join(":");
            if (b.n.key.startsWith("sink:")) {
              const sink = b.n.key.split(":").slice(2).join(":");
              r = rate((d) => { const s = findSink(d, p.name, sink); return s && s.events; });
            } else {
              r = rate((d) => { const x = findProcessor(d, p.name, id); return x && x.events_out; });
            }
          }
          edge(a, b, r);
        }
      }
    }
    for (const c of pos) {
      for (const { n, x, y } of c) {
        const g = svg("g", { class: "node" + (n.bad ? " bad" : "") + (selected === n.key ? " selected" : ""), transform: `translate(${x},${y})`, "data-key": n.key, tabindex: 0 });
        g.append(svg("rect", { width: W, height: H, rx: 5 }));
        g.append(svg("text", { x: 8, y: 15 }, n.label.length > 20 ? n.label.slice(0, 19) + "…" : n.label));
        g.append(svg("text", { x: 8, y: 30, class: "kind" }, n.kind));
        const title = svg("title", {}, n.label + " (" + n.kind + ")");
        g.append(title);
        g.addEventListener("click", () => { selected = n.key; render(); });
        g.addEventListener("keydown", (e) => { if (e.key === "Enter") { selected = n.key; render(); } });
        root.append(g);
      }
      width = Math.max(width, ...c.map((p) => p.x + W + 4));
    }
    y0 = top + rows * (H + GY) + 6;
  }
  root.setAttribute("width", width);
  root.setAttribute("height", y0);
  root.setAttribute("viewBox", `0 0 ${width} ${y0}`);
  box.replaceChildren(root);
}
// Whether a configured source writes `topic`: its one topic, or `<topic_prefix>.<schema>.<table>`.
function writes(source, topic) { return source.topic === topic || (!!source.topic_prefix && topic.startsWith(source.topic_prefix + ".")); }
// Rows a source has read by its snapshot plus the changes it has streamed.
function sourceEvents(doc, name) {
  const s = (doc.sources || []).find((x) => x.name === name);
  if (!s) return undefined;
  const changes = Object.values(s.changes || {}).flatMap((ops) => Object.values(ops));
  return ((s.snapshot && s.snapshot.rows) || 0) + sum(changes);
}
function topicEventsOf(doc, name) { const t = findTopic(doc, name); return t ? topicEvents(t) : undefined; }

// ---- details of the selected component ----
function details(doc) {
  const table = $("details-table");
  $("details-empty").hidden = !!selected;
  if (!selected) { table.replaceChildren(); return; }
  const [kind, a, ...rest] = selected.split(":");
  const b = rest.join(":");
  const rows = [["component", kind + " " + (b ? a + " / " + b : a)]];
  const add = (k, v) => rows.push([k, v]);
  if (kind === "topic") {
    const t = findTopic(doc, a);
    if (t) {
      add("events", fmt(topicEvents(t)));
      add("events/s", fmt(rate((d) => topicEventsOf(d, a))));
      add("size", bytes(sum(t.partitions.map((p) => p.size_bytes))));
      add("partitions", t.partitions.length);
      add("segments", sum(t.partitions.map((p) => p.segments)));
    }
  } else if (kind === "source") {
    const s = (doc.sources || []).find((s) => s.name === a);
    if (s) for (const [k, v] of Object.entries(s)) add(k, typeof v === "object" && v !== null ? JSON.stringify(v) : v);
  } else if (kind === "processor") {
    const x = findProcessor(doc, a, b);
    if (x) {
      add("type", x.type);
      add("events in/s", fmt(rate((d) => { const y = findProcessor(d, a, b); return y && y.events_in; })));
      add("events out/s", fmt(rate((d) => { const y = findProcessor(d, a, b); return y && y.events_out; })));
      add("events in", fmt(x.events_in)); add("events out", fmt(x.events_out));
      add("dropped", fmt(x.dropped)); add("failed", fmt(x.failed));
    }
  } else if (kind === "sink") {
    const s = findSink(doc, a, b);
    const c = (doc.sink_controllers || []).find((c) => c.pipeline === a && c.sink === b);
    if (s) {
      add("type", s.type);
      add("events/s", fmt(rate((d) => { const y = findSink(d, a, b); return y && y.events; })));
      add("events", fmt(s.events)); add("errors", fmt(s.errors)); add("dead letters", fmt(s.dead_letters));
      add("batch avg", fmt(s.batches ? s.batch_events / s.batches : null));
      add("write p50", ms(quantile(0.5, (d) => { const y = findSink(d, a, b); return y && y.write_seconds; })));
      add("write p99", ms(quantile(0.99, (d) => { const y = findSink(d, a, b); return y && y.write_seconds; })));
    }
    if (c) for (const [k, v] of Object.entries(c)) if (k !== "pipeline" && k !== "sink") add(k, v === null ? "–" : v);
    for (const st of (doc.pipeline_sinks || []).filter((x) => x.pipeline === a && x.sink === b)) {
      add(st.topic + "/" + st.partition, "breaker " + st.breaker + ", retrying " + st.retrying_events + (st.last_error ? ", last error: " + st.last_error : ""));
    }
  }
  table.replaceChildren(...rows.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v))));
}

// ---- one render from the latest document ----
function render() {
  if (!history.length) return;
  const doc = history[history.length - 1].doc;
  $("uptime").textContent = "up " + duration(doc.uptime_secs);
  const ready = $("ready");
  ready.textContent = doc.ready ? "ready" : "not ready: " + (doc.not_ready_reasons || []).join(", ");
  ready.className = "badge " + (doc.ready ? "ok" : "bad");

  const inRate = rate(inEvents), outRate = rate(outEvents);
  const lag = sum(pipelines(doc).map((p) => p.lag));
  const p50 = quantile(0.5, e2eAll), p99 = quantile(0.99, e2eAll);
  const mem = doc.memory || {};
  const dead = sum(pipelines(doc).map((p) => p.dead_letters));
  const alerts = Array.isArray(doc.alerts) ? doc.alerts : [];
  setNum("in-rate", inRate, fmt(inRate));
  setNum("out-rate", outRate, fmt(outRate));
  setNum("lag", lag, fmt(lag));
  setNum("e2e", p99, p50 === null ? "–" : ms(p50).replace(" ms", "") + " / " + ms(p99));
  setNum("mem-pressure", mem.pressure, mem.pressure === undefined ? "–" : (mem.pressure * 100).toFixed(1) + "% " + (mem.level || ""));
  setNum("dlq", dead, fmt(dead));
  setNum("alert-count", alerts.length, String(alerts.length));
  $("alert-count").className = "num " + (alerts.some((a) => a.state === "firing") ? "firing" : alerts.length ? "pending" : "");

  if (history.length >= 2) {
    pushSeries({ t: history[history.length - 1].t, in: inRate, out: outRate, lag, p50: p50 === null ? null : p50 * 1000, p99: p99 === null ? null : p99 * 1000,
      used: mem.limit_bytes ? (100 * mem.used_bytes) / mem.limit_bytes : null,
      soft: mem.limit_bytes ? (100 * mem.soft_limit_bytes) / mem.limit_bytes : null });
    drawCharts();
  }

  // Sinks.
  const sinkRows = [];
  for (const p of pipelines(doc)) {
    for (const s of p.sinks) {
      const c = (doc.sink_controllers || []).find((c) => c.pipeline === p.name && c.sink === s.name) || {};
      const r = rate((d) => { const y = findSink(d, p.name, s.name); return y && y.events; });
      const batches = rate((d) => { const y = findSink(d, p.name, s.name); return y && y.batches; });
      const evs = rate((d) => { const y = findSink(d, p.name, s.name); return y && y.batch_events; });
      const avg = batches ? evs / batches : (s.batches ? s.batch_events / s.batches : null);
      const w99 = quantile(0.99, (d) => { const y = findSink(d, p.name, s.name); return y && y.write_seconds; });
      sinkRows.push(el("tr", { "data-key": "sink:" + p.name + ":" + s.name },
        el("td", {}, p.name + " / " + s.name), el("td", {}, s.type),
        el("td", { class: "r", "data-v": r === null ? "" : r }, fmt(r)), el("td", { class: "r" }, fmt(avg)),
        el("td", { class: "r" }, fmt(c.batch_target)), el("td", { class: "r" }, c.concurrency_limit === null || c.concurrency_limit === undefined ? (c.concurrency || "–") : c.concurrency_limit),
        el("td", { class: "r" }, fmt(c.in_flight)), el("td", { class: c.breaker || "" }, c.breaker),
        el("td", { class: "r" }, ms(w99)), el("td", { class: "r" }, fmt(s.errors)), el("td", { class: "r" }, fmt(s.dead_letters))));
    }
  }
  fillBody($("sinks"), sinkRows, "No sinks.");

  // Topics.
  fillBody($("topics"), doc.topics.map((t) => {
    const n = topicEvents(t), r = rate((d) => topicEventsOf(d, t.name));
    return el("tr", { "data-topic": t.name }, el("td", {}, t.name), el("td", { class: "r", "data-k": "topic-events", "data-v": n }, fmt(n)),
      el("td", { class: "r", "data-v": r === null ? "" : r }, fmt(r)), el("td", { class: "r" }, bytes(sum(t.partitions.map((p) => p.size_bytes)))));
  }), "No topics.");

  // Memory.
  if (mem.limit_bytes) {
    $("mem-bar").style.width = Math.min(100, (100 * mem.used_bytes) / mem.limit_bytes) + "%";
    $("mem-soft").style.left = (100 * mem.soft_limit_bytes) / mem.limit_bytes + "%";
  }
  const memRows = [["used", bytes(mem.used_bytes), mem.used_bytes], ["peak", bytes(mem.peak_bytes), mem.peak_bytes],
    ["soft limit", bytes(mem.soft_limit_bytes), mem.soft_limit_bytes], ["limit", bytes(mem.limit_bytes), mem.limit_bytes],
    ["level", mem.level, null], ...Object.entries(mem.components || {}).map(([k, v]) => [k, bytes(v), v])];
  $("memory").replaceChildren(...memRows.map(([k, t, v]) => el("tr", { "data-k": "memory-" + k.replace(/ /g, "_") }, el("td", {}, k), el("td", { class: "r", "data-v": v === null ? "" : v }, t))));

  // Workers.
  fillBody($("workers"), (doc.pipeline_workers || []).map((w) => el("tr", {},
    el("td", {}, w.pipeline + " / " + w.topic + " / " + w.partition), el("td", { class: w.state, title: w.last_error || "" }, w.state),
    el("td", { class: "r" }, fmt(w.committed_offset)), el("td", { class: "r" }, w.restarts))), "No pipeline workers.");

  // Alerts (the `alerts` field of the stats document, when the engine has alert rules).
  fillBody($("alerts"), alerts.map((a) => el("tr", {},
    el("td", { class: a.state }, a.state), el("td", { class: a.severity }, a.severity), el("td", { title: a.description || "" }, a.name),
    el("td", { class: "r" }, a.value === null || a.value === undefined ? "–" : fmt(a.value, 2)))), "No active alerts.");

  // Dead letters.
  const dlqTopic = findTopic(doc, "_dlq");
  const dlqRows = pipelines(doc).map((p) => el("tr", {}, el("td", {}, p.name), el("td", { class: "r" }, fmt(p.dead_letters))));
  if (dlqTopic) dlqRows.push(el("tr", {}, el("td", {}, "_dlq topic (events held)"), el("td", { class: "r" }, fmt(topicEvents(dlqTopic)))));
  fillBody($("dlq-table"), dlqRows, "No dead letters.");

  // Caches (the `caches` field of the stats document, when a component reports one).
  const caches = Array.isArray(doc.caches) ? doc.caches : [];
  fillBody($("caches"), caches.map((c) => el("tr", {}, el("td", {}, c.name),
    el("td", { class: "r" }, c.hits + c.misses > 0 ? ((100 * c.hits) / (c.hits + c.misses)).toFixed(1) + "% hits" : "–"))), "No component reports a cache.");

  drawGraph(doc);
  details(doc);
}

// ---- feeding documents in (the stream sends its first document at once) ----
function accept(doc) {
  history.push({ t: Date.now() / 1000, doc });
  if (history.length > HISTORY) history.shift();
  render();
}
function connect() {
  const status = $("status");
  const es = new EventSource("/v1/stats/stream");
  es.addEventListener("stats", (e) => {
    status.textContent = "live";
    status.className = "badge ok";
    accept(JSON.parse(e.data));
  });
  es.onerror = () => {
    status.textContent = "reconnecting";
    status.className = "badge warn";
  };
}

// ---- theme: follows the system unless chosen ----
const THEMES = ["auto", "dark", "light"];
function applyTheme(t) {
  if (t === "auto") delete document.documentElement.dataset.theme; else document.documentElement.dataset.theme = t;
  $("theme").textContent = "theme: " + t;
  charts = makeCharts();
  drawCharts();
}
$("theme").addEventListener("click", () => {
  const cur = localStorage.getItem("flowgate-theme") || "auto";
  const next = THEMES[(THEMES.indexOf(cur) + 1) % THEMES.length];
  localStorage.setItem("flowgate-theme", next);
  applyTheme(next);
});
matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => applyTheme(localStorage.getItem("flowgate-theme") || "auto"));
window.addEventListener("resize", resizeCharts);

applyTheme(localStorage.getItem("flowgate-theme") || "auto");
connect();
