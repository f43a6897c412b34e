// statehost dashboard: renders the snapshots of /v1/dashboard/events. Every value goes
// into the page as text (textContent), never as HTML: session client names and ids come
// from callers.
"use strict";

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function seconds(s) {
  if (s === null || s === undefined) return "–";
  return s < 1 ? (s * 1000).toFixed(1) + " ms" : s.toFixed(2) + " s";
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fill(id, items, render) {
  const body = document.querySelector("#" + id + " tbody");
  body.replaceChildren();
  for (const item of items) {
    const row = document.createElement("tr");
    render(row, item);
    body.appendChild(row);
  }
}

function bar(row, fraction) {
  const td = document.createElement("td");
  const outer = document.createElement("span");
  outer.className = "bar";
  const inner = document.createElement("span");
  inner.style.width = Math.round(100 * Math.min(1, Math.max(0, fraction))) + "%";
  outer.appendChild(inner);
  td.appendChild(outer);
  row.appendChild(td);
  return td;
}

function chart(history) {
  const svg = document.getElementById("memory-chart");
  svg.replaceChildren();
  if (history.length < 2) return;
  const totals = history.map(s => Object.values(s.used).reduce((a, b) => a + b, 0));
  const top = Math.max(1, ...totals);
  const t0 = history[0].t, span = Math.max(1e-9, history[history.length - 1].t - t0);
  const points = history.map((s, i) =>
    (600 * (s.t - t0) / span).toFixed(1) + "," + (115 - 110 * totals[i] / top).toFixed(1));
  const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
  line.setAttribute("points", points.join(" "));
  svg.appendChild(line);
  const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
  title.textContent = "memory in use, all devices: now " + bytes(totals[totals.length - 1]);
  svg.appendChild(title);
}

function render(s) {
  const v = s.viewer;
  document.getElementById("viewer").textContent =
    (v.label || "token") + " · " + (v.namespace === null ? "every namespace" : v.namespace) +
    " · " + v.scope;
  fill("devices", s.devices, (row, d) => {
    row.dataset.device = d.id;
    cell(row, d.id); cell(row, d.platform); cell(row, d.kind);
    cell(row, bytes(d.bytes_in_use), "num"); cell(row, bytes(d.bytes_limit), "num");
    cell(row, bytes(d.resident_bytes), "num");
  });
  chart(s.memory_history);
  fill("namespaces", s.namespaces, (row, n) => {
    row.dataset.namespace = n.name;
    cell(row, n.name); cell(row, n.durability); cell(row, bytes(n.resident_bytes), "num");
    cell(row, bytes(n.named_bytes), "num"); cell(row, bytes(n.session_bytes), "num");
    cell(row, n.max_bytes === null ? "no limit" : bytes(n.max_bytes), "num");
    if (n.max_bytes) bar(row, n.resident_bytes / n.max_bytes); else cell(row, "");
  });
  document.getElementById("anonymous").textContent = s.anonymous_bytes === null ? "" :
    "Sessions' own (anonymous) states: " + bytes(s.anonymous_bytes);
  fill("queues", Object.entries(s.calls.by_namespace), (row, [ns, c]) => {
    cell(row, ns); cell(row, c.running, "num"); cell(row, c.queued, "num");
  });
  document.getElementById("calls-finished").textContent =
    "(" + s.calls_finished + " finished since start)";
  fill("recent", s.recent_calls, (row, c) => {
    cell(row, c.id); cell(row, c.kind); cell(row, c.namespace === null ? "(operator)" : c.namespace);
    cell(row, c.outcome + (c.error ? " (" + c.error + ")" : ""), c.outcome);
    cell(row, seconds(c.queued_s), "num"); cell(row, seconds(c.running_s), "num");
    cell(row, c.compiled === undefined ? "–" : (c.compiled ? "yes" : "no"));
    cell(row, bytes(c.bytes_in), "num"); cell(row, bytes(c.bytes_out), "num");
  });
  fill("jobs", s.jobs, (row, j) => {
    row.dataset.job = j.id;
    const p = j.progress;
    cell(row, j.id); cell(row, j.status + (j.cancel_requested ? " (cancel requested)" : ""), j.status);
    bar(row, p.total ? p.done / p.total : 0);
    cell(row, p.done + " / " + p.total, "num done");
    cell(row, p.steps_per_second === null ? "–" : p.steps_per_second.toFixed(1), "num");
    cell(row, seconds(p.eta_s), "num");
  });
  document.getElementById("session-count").textContent = "(" + s.sessions.count + ")";
  fill("sessions", s.sessions.shown, (row, x) => {
    cell(row, x.id); cell(row, x.namespace === null ? "(operator)" : x.namespace);
    cell(row, x.client); cell(row, x.states, "num"); cell(row, seconds(x.idle_s), "num");
  });
  const programs = Object.entries(s.compile_cache.programs || {})
    .map(([source, n]) => n + " " + source).join(", ");
  document.getElementById("compile-cache").textContent =
    "Callables cached: " + s.compile_cache.functions + " of " + s.compile_cache.capacity +
    (programs ? "; programs built: " + programs : "");
  const status = document.getElementById("status");
  status.textContent = "updated " + new Date(s.time * 1000).toLocaleTimeString();
  status.className = "status";
  document.body.dataset.updates = String(Number(document.body.dataset.updates || 0) + 1);
}

function connect() {
  const source = new EventSource("/v1/dashboard/events");
  source.addEventListener("snapshot", e => render(JSON.parse(e.data)));
  source.onerror = () => {
    const status = document.getElementById("status");
    status.textContent = "reconnecting…";
    status.className = "status error";
  };
}

connect();
