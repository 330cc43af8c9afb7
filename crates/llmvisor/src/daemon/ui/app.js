// llmvisor dashboard: one stream of /api/events (read with fetch so the admin key travels in a
// header, never in a URL), rendered into plain DOM. No framework, no build step.
"use strict";

const KEY_STORE = "llmvisor-admin-key";
const models = new Map();      // id -> status object
const progress = new Map();    // id -> {percent, stage}
const requests = [];           // recent request events, newest first
const samples = [];            // {t, model, tps}
const COLORS = ["#6cb6ff", "#5fd38d", "#f0c05a", "#d2a8ff", "#ff7b72", "#56d4dd", "#ffa657", "#a5d6ff"];
let facts = {};
let lastId = null;
let logModel = null;
let abort = null;
let retry = 0;

const $ = (id) => document.getElementById(id);
const key = () => sessionStorage.getItem(KEY_STORE);

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const k = key();
  if (k) h["Authorization"] = "Bearer " + k;
  return h;
}

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of kids) if (c !== null && c !== undefined) e.append(c);
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
}

function dur(s) {
  s = Math.floor(s);
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  if (d) return `${d}d ${h}h`;
  if (h) return `${h}h ${m}m`;
  if (m) return `${m}m ${s % 60}s`;
  return `${s}s`;
}

// ---------------------------------------------------------------------------------------------
// The stream

async function connect() {
  if (abort) abort.abort();
  abort = new AbortController();
  const url = "/api/events" + (logModel ? "?logs=" + encodeURIComponent(logModel) : "");
  const h = headers({ "Accept": "text/event-stream" });
  if (lastId !== null) h["Last-Event-ID"] = String(lastId);
  let resp;
  try {
    resp = await fetch(url, { headers: h, signal: abort.signal, cache: "no-store" });
  } catch (e) {
    if (e.name === "AbortError") return;
    return reconnect();
  }
  if (resp.status === 401) {
    setConn("key needed", false);
    const refused = key() !== null;
    sessionStorage.removeItem(KEY_STORE);
    return askKey(refused ? "That key was refused." : null);
  }
  if (!resp.ok) { setConn("error " + resp.status, false); return reconnect(); }
  retry = 0;
  setConn("live", true);
  const reader = resp.body.getReader();
  const dec = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, i);
        buf = buf.slice(i + 2);
        handleBlock(block);
      }
    }
  } catch (e) {
    if (e.name === "AbortError") return;
  }
  reconnect();
}

function reconnect() {
  setConn("reconnecting…", false);
  retry = Math.min(retry + 1, 5);
  setTimeout(connect, 500 * retry);
}

function setConn(text, live) {
  const c = $("conn");
  c.textContent = text;
  c.className = "conn " + (live ? "live" : "down");
}

function handleBlock(block) {
  let data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("id:")) lastId = Number(line.slice(3).trim());
    else if (line.startsWith("data:")) data += line.slice(5).trim();
  }
  if (!data) return;
  let ev;
  try { ev = JSON.parse(data); } catch { return; }
  onEvent(ev);
}

function onEvent(ev) {
  switch (ev.type) {
    case "daemon": facts = ev; facts.received = Date.now(); renderFacts(); tickUptime(); break;
    case "model": {
      const s = ev.status;
      const prev = models.get(s.id);
      // Why it changed (evicted, crashed, …), kept until the next change that says.
      s.reason = ev.reason || (prev && s.state === prev.state ? prev.reason : null);
      if (s.state !== "starting") progress.delete(s.id);
      else if (!prev || prev.state !== "starting") progress.set(s.id, { percent: 0, stage: "waiting for room" });
      models.set(s.id, s);
      renderModel(s);
      renderFacts();
      break;
    }
    case "progress":
      progress.set(ev.model, { percent: ev.percent, stage: ev.stage });
      if (models.has(ev.model)) renderModel(models.get(ev.model));
      break;
    case "queue": {
      const s = models.get(ev.model);
      if (s) { s.queued = ev.queued; s.wait_reason = ev.wait_reason; renderModel(s); }
      break;
    }
    case "request": addRequest(ev); break;
    case "log": addLog(ev.line); break;
    case "lagged":
      // A cut stream (too many readers, or its age limit) ends next; connect() resumes it.
      if (!ev.cut) $("action-msg").textContent = `The view fell behind (${ev.missed} events); refreshed.`;
      break;
  }
}

// ---------------------------------------------------------------------------------------------
// Key

function askKey(error) {
  const d = $("key-dialog");
  const e = $("key-error");
  e.hidden = !error;
  e.textContent = error || "";
  if (!d.open) d.showModal();
  $("key-input").focus();
}

function submitKey(ev) {
  ev.preventDefault();
  const v = $("key-input").value.trim();
  if (!v) return;
  sessionStorage.setItem(KEY_STORE, v);
  $("key-input").value = "";
  $("key-dialog").close();
  connect();
}

// ---------------------------------------------------------------------------------------------
// Models

async function act(id, what) {
  const msg = $("action-msg");
  const path = what === "load" ? `/api/models/${encodeURIComponent(id)}/load?wait=false`
    : `/api/models/${encodeURIComponent(id)}/unload` + (what === "force" ? "?force=true" : "");
  msg.textContent = `${what === "load" ? "Loading" : "Unloading"} ${id}…`;
  try {
    const r = await fetch(path, { method: "POST", headers: headers({ "Content-Type": "application/json" }), body: "{}" });
    if (r.status === 401) { sessionStorage.removeItem(KEY_STORE); return askKey("That key was refused."); }
    if (!r.ok) {
      let m = r.statusText;
      try { m = (await r.json()).error.message; } catch { /* not JSON */ }
      msg.textContent = `${id}: ${m}`;
    } else {
      msg.textContent = what === "load" ? `${id}: start requested.` : `${id}: stopped.`;
    }
  } catch (e) {
    msg.textContent = `${id}: ${e}`;
  }
}

function renderModel(s) {
  const cardId = "model-" + s.id.replace(/[^A-Za-z0-9_-]/g, "_");
  const running = s.state === "ready" || s.state === "starting" || s.state === "stopping";
  const rows = [
    ["pid", s.pid ?? "–"],
    ["address", s.url ?? "–"],
    ["memory", s.memory == null ? `– (${s.memory_source})` : `${bytes(s.memory)} (${s.memory_source})`],
    ["leases", s.leases],
    ["queue", s.queued ? `${s.queued} waiting` + (s.wait_reason ? ` — ${s.wait_reason}` : "") : "0"],
    ["restarts", s.restarts],
    ["ready in", s.ready_ms == null ? "–" : (s.ready_ms / 1000).toFixed(2) + " s"],
    ["last exit", s.last_exit ?? "–"],
  ];
  // The estimate beside what the running server really holds, and where it runs.
  const d = s.memory_detail || {};
  if (d.estimate || d.measured) {
    rows.splice(3, 0, ["estimate / measured",
      `${bytes(d.estimate ? d.estimate.total : null)} / ${bytes(d.measured ? d.measured.ram : null)}`]);
  }
  if (s.gpus && s.gpus.length) rows.splice(3, 0, ["gpu", s.gpus.join(", ")]);
  if (s.aliases && s.aliases.length) rows.unshift(["aliases", s.aliases.join(", ")]);
  if (s.reason) rows.push(["why", s.reason.replace("_", " ")]);
  const dl = el("dl");
  for (const [k, v] of rows) dl.append(el("dt", {}, k), el("dd", {}, String(v)));
  let prog = null;
  if (s.state === "starting") {
    const p = progress.get(s.id) || { percent: 0, stage: "starting" };
    prog = el("div", { class: "progress" },
      el("progress", { max: "100", value: String(p.percent), "aria-label": `${s.id} loading progress` }),
      el("span", {}, `${p.percent}% · ${p.stage}`));
  }
  let err = null;
  if (s.error) {
    const lines = s.error.split("\n");
    err = el("div", { class: "err", role: "group", "aria-label": `${s.id} error` },
      el("p", {}, lines[0]),
      lines.length > 1 ? el("pre", {}, ...ansi(lines.slice(1).join("\n"))) : null);
  }
  const card = el("article", { class: "card", id: cardId, "data-state": s.state, "aria-labelledby": cardId + "-h" },
    el("div", { class: "card-head" },
      el("h3", { id: cardId + "-h" }, s.id + (s.pinned ? " 📌" : "")),
      el("span", { class: "badge " + s.state, "data-testid": "state" }, s.state)),
    prog, dl, err,
    el("div", { class: "actions" },
      el("button", { onclick: () => act(s.id, "load"), disabled: running, "aria-label": `Load ${s.id}` }, "Load"),
      el("button", { onclick: () => act(s.id, "unload"), disabled: !running, "aria-label": `Unload ${s.id}` }, "Unload"),
      el("button", { class: "danger", onclick: () => act(s.id, "force"), disabled: !running, "aria-label": `Force unload ${s.id}` }, "Force unload"),
      el("button", { onclick: () => followLog(s.id), "aria-label": `Show log of ${s.id}`, "aria-pressed": String(logModel === s.id) }, "Log")));
  const old = document.getElementById(cardId);
  const focused = old && old.contains(document.activeElement) ? document.activeElement.getAttribute("aria-label") : null;
  if (old) old.replaceWith(card);
  else {
    const list = $("models");
    const after = [...list.children].find((c) => c.querySelector("h3").textContent > s.id);
    list.insertBefore(card, after || null);
  }
  if (focused) {
    const b = [...card.querySelectorAll("button")].find((x) => x.getAttribute("aria-label") === focused);
    if (b && !b.disabled) b.focus();
  }
}

function renderFacts() {
  if (facts.version) $("f-version").textContent = facts.version;
  let used = 0, loaded = 0;
  for (const s of models.values()) {
    if (s.state !== "stopped" && s.state !== "failed") { used += s.memory || 0; loaded++; }
  }
  $("f-budget").textContent = facts.memory_budget ? `${bytes(used)} / ${bytes(facts.memory_budget)}` : `${bytes(used)} (no budget)`;
  $("f-loaded").textContent = facts.max_loaded ? `${loaded} / ${facts.max_loaded}` : `${loaded} of ${models.size}`;
}

function tickUptime() {
  if (facts.received) $("f-uptime").textContent = dur(facts.uptime_s + (Date.now() - facts.received) / 1000);
}

// ---------------------------------------------------------------------------------------------
// Log, with ANSI colours

function ansi(text) {
  const out = [];
  let cls = [];
  const re = /\x1b\[([0-9;]*)m/g;
  let at = 0, m;
  const push = (t) => { if (t) out.push(cls.length ? el("span", { class: cls.join(" ") }, t) : document.createTextNode(t)); };
  while ((m = re.exec(text))) {
    push(text.slice(at, m.index));
    at = re.lastIndex;
    for (const code of (m[1] || "0").split(";").map(Number)) {
      if (code === 0) cls = [];
      else if (code === 1) cls.push("a-b");
      else if (code >= 30 && code <= 37) cls = cls.filter((c) => c === "a-b").concat("a-" + code);
      else if (code >= 90 && code <= 97) cls = cls.filter((c) => c === "a-b").concat("a-" + (code - 60), "a-b");
      else if (code === 39) cls = cls.filter((c) => c === "a-b");
    }
  }
  push(text.slice(at).replace(/\x1b\[[0-9;]*[A-Za-z]/g, ""));
  return out;
}

function addLog(line) {
  const log = $("log");
  log.append(...ansi(line + "\n"));
  while (log.childNodes.length > 3000) log.removeChild(log.firstChild);
  if (!$("log-pause").checked) log.scrollTop = log.scrollHeight;
}

function followLog(id) {
  logModel = id;
  $("log").textContent = "";
  $("log-model").textContent = `of ${id}`;
  for (const s of models.values()) renderModel(s);
  connect(); // resumes after lastId, now with ?logs=
}

// ---------------------------------------------------------------------------------------------
// Requests and charts

const seenRequests = new Set();

function addRequest(ev) {
  // A fresh snapshot repeats the recent requests it still has.
  if (seenRequests.has(ev.id)) return;
  seenRequests.add(ev.id);
  requests.unshift(ev);
  if (requests.length > 50) requests.pop();
  samples.push({ t: ev.time || Date.now(), model: ev.model, tps: ev.tokens_per_s });
  const tb = $("requests").tBodies[0];
  const ms = (v) => v == null ? "–" : v < 1000 ? Math.round(v) + " ms" : (v / 1000).toFixed(2) + " s";
  const tr = el("tr", {},
    el("td", {}, new Date(ev.time || Date.now()).toLocaleTimeString()),
    el("td", {}, ev.model), el("td", {}, ev.route),
    el("td", { class: ev.status >= 400 || ev.cut ? "bad" : null }, String(ev.status) + (ev.cut ? " (cut)" : "")),
    el("td", {}, ms(ev.duration_ms)), el("td", {}, ms(ev.ttfb_ms)),
    el("td", {}, `${ev.prompt_tokens ?? "–"} / ${ev.completion_tokens ?? "–"}`),
    el("td", {}, ev.tokens_per_s == null ? "–" : ev.tokens_per_s.toFixed(1)));
  tb.insertBefore(tr, tb.firstChild);
  while (tb.rows.length > 50) tb.deleteRow(-1);
  drawCharts();
}

function color(id) {
  const ids = [...new Set([...models.keys(), ...samples.map((s) => s.model)])].sort();
  return COLORS[Math.max(0, ids.indexOf(id)) % COLORS.length];
}

function drawCharts() {
  const now = Date.now(), span = 10 * 60 * 1000, bucket = 30 * 1000, n = span / bucket;
  while (samples.length && samples[0].t < now - span) samples.shift();
  const per = new Map();
  for (const s of samples) {
    if (!per.has(s.model)) per.set(s.model, { req: new Array(n).fill(0), tps: [] });
    const i = Math.min(n - 1, Math.floor((s.t - (now - span)) / bucket));
    per.get(s.model).req[i]++;
    if (s.tps != null) per.get(s.model).tps.push([s.t, s.tps]);
  }
  const maxReq = Math.max(1, ...[...per.values()].flatMap((p) => p.req));
  const maxTps = Math.max(1, ...[...per.values()].flatMap((p) => p.tps.map((x) => x[1])));
  const svgNS = "http://www.w3.org/2000/svg";
  const line = (pts, c) => {
    const p = document.createElementNS(svgNS, "polyline");
    p.setAttribute("points", pts.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" "));
    p.setAttribute("fill", "none"); p.setAttribute("stroke", c); p.setAttribute("stroke-width", "1.5");
    return p;
  };
  const req = $("chart-req"), tps = $("chart-tps"), legend = $("legend");
  req.replaceChildren(); tps.replaceChildren(); legend.replaceChildren();
  for (const [m, p] of per) {
    const c = color(m);
    req.append(line(p.req.map((v, i) => [i * 300 / (n - 1), 76 - v / maxReq * 70]), c));
    const pts = p.tps.map(([t, v]) => [(t - (now - span)) / span * 300, 76 - v / maxTps * 70]);
    if (pts.length === 1) pts.push([pts[0][0] + 2, pts[0][1]]);
    if (pts.length) tps.append(line(pts, c));
    const last = p.tps.length ? p.tps[p.tps.length - 1][1].toFixed(1) + " tok/s" : "";
    legend.append(el("li", {}, el("i", { "data-c": c }), `${m} ${p.req.reduce((a, b) => a + b, 0)} req ${last}`));
  }
  for (const i of legend.querySelectorAll("i")) i.style.background = i.dataset.c;
}

// ---------------------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", submitKey);
  setInterval(tickUptime, 1000);
  setInterval(drawCharts, 15000);
  connect();
});
