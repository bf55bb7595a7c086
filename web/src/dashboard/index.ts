// The live latency dashboard: reads the timing feed `/v1/stats` (same origin) and draws, with
// uPlot, time to first revision and reply latency p50/p95/p99, queue wait, steps per reply,
// tokens per step, tokens/s, running/waiting replies, connections and errors, for all replicas
// or one. An admin key typed into the page is kept in localStorage and sent in the WebSocket
// subprotocol list (`dllm-stats`, `key.<key>`), never in the URL.

import uPlot from "uplot";
import uPlotCss from "uplot/dist/uPlot.min.css?inline";
import { mean, quantile, StatsRecord, Window } from "./window";

const KEY_STORAGE = "dllm-dashboard-key";
/** Points kept per chart: one a second. */
const HISTORY_S = 600;
/** Quantiles are over the replies that ended in this trailing window. */
const SPAN_MS = 30_000;
const PALETTE = ["#2563eb", "#f59e0b", "#dc2626", "#059669", "#7c3aed", "#db2777", "#0891b2", "#65a30d"];

const style = document.createElement("style");
style.textContent = uPlotCss;
document.head.append(style);

const $ = <T extends HTMLElement>(id: string) => document.getElementById(id) as T;
const statusEl = $("status");
const replicaSel = $<HTMLSelectElement>("replica");
const keyForm = $<HTMLDetailsElement>("key-form");
const keyFormEl = $<HTMLFormElement>("key-submit");
const keyInput = $<HTMLInputElement>("key");

const win = new Window(HISTORY_S * 1000 + SPAN_MS);

interface ChartSpec {
  id: string;
  title: string;
  unit: string;
  /** Series names and values at `now` for the selected replica (null: all). */
  series: (now: number, replica: string | null) => [string, number | null][];
}

const q3 = (values: number[]): [string, number | null][] => [
  ["p50", quantile(values, 0.5)],
  ["p95", quantile(values, 0.95)],
  ["p99", quantile(values, 0.99)],
];
const completed = (now: number, replica: string | null) =>
  win.recent(now, SPAN_MS, replica).filter((r) => r.status === "completed");
const perReplica = (now: number, replica: string | null, pick: (s: { running: number; waiting: number; connections: number; errors: Record<string, number> }) => number) =>
  (replica === null ? win.replicas() : [replica]).map((name): [string, number | null] => {
    const s = win.latest(name, now, 3000);
    return [short(name), s ? pick(s) : null];
  });

const specs: ChartSpec[] = [
  { id: "ttfr", title: "Time to first revision", unit: "ms", series: (n, r) => q3(completed(n, r).map((x) => x.first_revision_ms)) },
  { id: "latency", title: "Reply latency", unit: "ms", series: (n, r) => q3(completed(n, r).map((x) => x.total_ms)) },
  { id: "queue", title: "Queue wait", unit: "ms", series: (n, r) => q3(win.recent(n, SPAN_MS, r).map((x) => x.queue_ms)) },
  { id: "steps", title: "Steps per reply", unit: "steps", series: (n, r) => q3(completed(n, r).map((x) => x.steps)) },
  {
    id: "tps",
    title: "Tokens per step · tokens/s",
    unit: "",
    series: (n, r) => {
      const c = completed(n, r);
      return [
        ["tokens/step", mean(c.map((x) => x.tokens_per_step))],
        ["tokens/s", mean(c.filter((x) => x.total_ms > 0).map((x) => (x.completion_tokens * 1000) / x.total_ms))],
      ];
    },
  },
  { id: "running", title: "Running replies", unit: "", series: (n, r) => perReplica(n, r, (s) => s.running) },
  { id: "waiting", title: "Waiting replies", unit: "", series: (n, r) => perReplica(n, r, (s) => s.waiting) },
  { id: "connections", title: "Connections", unit: "", series: (n, r) => perReplica(n, r, (s) => s.connections) },
  {
    id: "errors",
    title: "Errors per second",
    unit: "",
    series: (n, r) => perReplica(n, r, (s) => Object.values(s.errors).reduce((a, b) => a + b, 0)),
  },
];

function short(replica: string): string {
  return replica.replace(/^replica_/, "").slice(0, 6);
}

interface Chart {
  spec: ChartSpec;
  el: HTMLElement;
  plot: uPlot | null;
  names: string[];
  xs: number[];
  ys: Map<string, (number | null)[]>;
}

const grid = $("charts");
const charts: Chart[] = specs.map((spec) => {
  const card = document.createElement("section");
  card.className = "card";
  card.dataset.chart = spec.id;
  const h = document.createElement("h2");
  h.textContent = spec.title + (spec.unit ? ` (${spec.unit})` : "");
  const body = document.createElement("div");
  body.className = "plot";
  card.append(h, body);
  grid.append(card);
  return { spec, el: body, plot: null, names: [], xs: [], ys: new Map() };
});

function build(c: Chart): void {
  c.plot?.destroy();
  const width = Math.max(200, c.el.clientWidth);
  const opts: uPlot.Options = {
    width,
    height: 180,
    legend: { live: false },
    cursor: { drag: { x: false, y: false } },
    scales: { x: { time: true }, y: { range: (_u, _min, max) => [0, max > 0 ? max * 1.1 : 1] } },
    axes: [
      { stroke: "#6b7280", grid: { stroke: "#e5e7eb" }, ticks: { stroke: "#e5e7eb" } },
      { stroke: "#6b7280", grid: { stroke: "#e5e7eb" }, ticks: { stroke: "#e5e7eb" }, size: 50 },
    ],
    series: [
      {},
      ...c.names.map((name, i) => ({
        label: name,
        stroke: PALETTE[i % PALETTE.length],
        width: 2,
        spanGaps: false,
        points: { show: false },
        // Tokens/s is an order of magnitude above tokens/step: its own scale, on the right.
        ...(c.spec.id === "tps" && i === 1 ? { scale: "rate" } : {}),
      })),
    ],
  };
  if (c.spec.id === "tps") {
    opts.scales!.rate = { range: (_u, _min, max) => [0, max > 0 ? max * 1.1 : 1] };
    opts.axes!.push({ scale: "rate", side: 1, stroke: PALETTE[1], grid: { show: false }, size: 50 });
  }
  const data: uPlot.AlignedData = [c.xs, ...c.names.map((n) => c.ys.get(n) ?? [])];
  c.plot = new uPlot(opts, data, c.el);
}

function tick(): void {
  const now = Date.now();
  win.prune(now);
  const replica = replicaSel.value || null;
  for (const c of charts) {
    const values = c.spec.series(now, replica);
    const names = values.map(([n]) => n);
    c.xs.push(now / 1000);
    for (const [name, v] of values) {
      if (!c.ys.has(name)) c.ys.set(name, new Array(c.xs.length - 1).fill(null));
      c.ys.get(name)!.push(v);
    }
    for (const [name, list] of c.ys) if (!names.includes(name)) list.push(null);
    if (c.xs.length > HISTORY_S) {
      c.xs.shift();
      for (const list of c.ys.values()) list.shift();
    }
    if (!c.plot || names.join() !== c.names.join()) {
      c.names = names;
      build(c);
    } else {
      c.plot.setData([c.xs, ...c.names.map((n) => c.ys.get(n)!)]);
    }
    c.el.parentElement!.dataset.points = String(values.filter(([, v]) => v !== null).length);
  }
  tiles(now, replica);
  syncReplicas();
}

function fmt(v: number | null, unit = ""): string {
  if (v === null || Number.isNaN(v)) return "–";
  const text = v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
  return unit ? `${text} ${unit}` : text;
}

function tiles(now: number, replica: string | null): void {
  const c = win.recent(now, 60_000, replica).filter((r) => r.status === "completed");
  const names = replica === null ? win.replicas() : [replica];
  const live = names.map((n) => win.latest(n, now, 3000)).filter((s) => s !== null);
  const sum = (f: (s: (typeof live)[number]) => number) => live.reduce((a, s) => a + f(s!), 0);
  const errors = win
    .replicas()
    .filter((n) => replica === null || n === replica)
    .flatMap((n) => (win.summaries.get(n) ?? []).filter((s) => s.at > now - 60_000))
    .reduce((a, s) => a + Object.values(s.errors).reduce((x, y) => x + y, 0), 0);
  const set = (id: string, text: string) => ($(id).textContent = text);
  set("t-replies", String(win.recent(now, 60_000, replica).length));
  set("t-ttfr", fmt(quantile(c.map((r) => r.first_revision_ms), 0.95), "ms"));
  set("t-latency", fmt(quantile(c.map((r) => r.total_ms), 0.95), "ms"));
  set("t-running", live.length ? `${sum((s) => s.running)} / ${sum((s) => s.waiting)}` : "–");
  set("t-connections", live.length ? String(sum((s) => s.connections)) : "–");
  set("t-errors", String(errors));
  set("t-replicas", String(win.replicas().length));
}

function syncReplicas(): void {
  const names = win.replicas();
  const have = [...replicaSel.options].slice(1).map((o) => o.value);
  if (have.join() === names.join()) return;
  const selected = replicaSel.value;
  replicaSel.length = 1;
  for (const n of names) replicaSel.add(new Option(`Replica ${short(n)}`, n));
  replicaSel.value = names.includes(selected) ? selected : "";
}

function setStatus(state: "live" | "connecting" | "refused", text: string): void {
  statusEl.dataset.state = state;
  statusEl.textContent = text;
}

let socket: WebSocket | null = null;
let retry = 1000;
function connect(): void {
  socket?.close();
  const key = localStorage.getItem(KEY_STORAGE) ?? "";
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/stats`;
  const ws = new WebSocket(url, key ? ["dllm-stats", `key.${key}`] : ["dllm-stats"]);
  socket = ws;
  setStatus("connecting", "Connecting…");
  let refused = false;
  ws.onopen = () => {
    retry = 1000;
    setStatus("live", "Live");
  };
  ws.onmessage = (m) => {
    const r = JSON.parse(String(m.data)) as StatsRecord | { type: "error"; error: { message: string } };
    if (r.type === "error") {
      refused = true;
      setStatus("refused", "Admin key needed");
      keyForm.open = true;
      return;
    }
    win.add(r);
  };
  ws.onclose = () => {
    if (socket !== ws || refused) return;
    setStatus("connecting", "Reconnecting…");
    setTimeout(connect, retry);
    retry = Math.min(retry * 2, 15_000);
  };
}

keyInput.value = localStorage.getItem(KEY_STORAGE) ?? "";
keyFormEl.addEventListener("submit", (e) => {
  e.preventDefault();
  const key = keyInput.value.trim();
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
  keyForm.open = false;
  connect();
});
replicaSel.addEventListener("change", () => {
  for (const c of charts) {
    c.xs = [];
    c.ys.clear();
    c.plot?.destroy();
    c.plot = null;
  }
  tick();
});
new ResizeObserver(() => {
  for (const c of charts) c.plot?.setSize({ width: Math.max(200, c.el.clientWidth), height: 180 });
}).observe(grid);

connect();
tick();
setInterval(tick, 1000);
