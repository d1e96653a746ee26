// The proxy's status page: one module, no build step, nothing fetched but this proxy's own routes.
// It reads /status/stream (server-sent events, read with fetch so an API key can go in a header) and
// redraws on every snapshot; the key, when the proxy wants one, is kept in this tab's sessionStorage.

const KEY = "llamactl-api-key";
const COLORS = ["#56b6c2", "#c678dd", "#98c379", "#e5c07b", "#61afef", "#e06c75", "#d19a66", "#4db5bd"];
const $ = (sel) => document.querySelector(sel);

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 2 : 0)} ${units[i]}`;
}

function duration(s) {
  if (s === null || s === undefined) return "-";
  s = Math.round(s);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;  // CSSOM: the page's CSP allows no style attributes
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function headers() {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function colorOf(name, names) {
  return COLORS[names.indexOf(name) % COLORS.length];
}

function segments(gpu, instances) {
  const total = gpu.memory_total_bytes || 1;
  const used = gpu.memory_used_bytes || 0;
  const ours = [];
  for (const inst of instances) {
    const k = (inst.gpu_ids || []).indexOf(gpu.index);
    if (k < 0 || !inst.pid) continue;
    const proc = (gpu.processes || []).find((p) => p.pid === inst.pid && p.used_memory_bytes !== null);
    const dev = (inst.devices || {})[`GPU${k}`] || {};
    ours.push([inst.name, proc ? proc.used_memory_bytes : (dev.actual_bytes || dev.estimated_bytes || 0), "instance"]);
  }
  const oursTotal = ours.reduce((a, s) => a + s[1], 0);
  return { total, parts: [...ours, ["other programs", Math.max(used - oursTotal, 0), "other"], ["free", Math.max(total - used, 0), "free"]] };
}

function chart(history, index) {
  const points = history.map((h) => (h.gpus.find((g) => g.index === index) || {})).filter((g) => g.total);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "chart");
  svg.setAttribute("viewBox", "0 0 600 60");
  svg.setAttribute("preserveAspectRatio", "none");
  if (points.length > 1) {
    const line = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    const step = 600 / (points.length - 1);
    line.setAttribute("points", points.map((g, i) => `${(i * step).toFixed(1)},${(58 - 56 * g.used / g.total).toFixed(1)}`).join(" "));
    svg.append(line);
  }
  return svg;
}

function drawGpus(snap, names) {
  const box = $("#gpus");
  box.replaceChildren();
  if (!snap.gpus.length) {
    box.append(el("p", { class: "dim" }, `No GPUs${snap.gpu_note ? ": " + snap.gpu_note : ""}.`));
    return;
  }
  for (const gpu of snap.gpus) {
    const { total, parts } = segments(gpu, snap.instances);
    const bar = el("div", { class: "bar", title: `${bytes(gpu.memory_used_bytes)} of ${bytes(total)} used` });
    const legend = el("div", { class: "legend" });
    for (const [label, size, kind] of parts) {
      const color = kind === "instance" ? colorOf(label, names) : kind === "other" ? "#5c6370" : "transparent";
      bar.append(el("span", { style: `width:${(100 * size / total).toFixed(2)}%;background:${color}`, title: `${label}: ${bytes(size)}` }));
      legend.append(el("i", { style: `background:${kind === "free" ? "#1a2027" : color}` }), `${label} ${bytes(size)}`);
    }
    const facts = [`GPU ${gpu.index} ${gpu.name}`, `${bytes(gpu.memory_used_bytes)} / ${bytes(total)}`];
    if (gpu.utilization_gpu !== null) facts.push(`util ${gpu.utilization_gpu}%`);
    if (gpu.temperature_c !== null) facts.push(`${gpu.temperature_c}°C`);
    if (gpu.power_w !== null) facts.push(`${Math.round(gpu.power_w)} W`);
    box.append(el("div", { class: "gpu" },
      el("div", {}, facts.join(" · ")), bar, legend,
      chart(snap.history || [], gpu.index)));
  }
}

async function act(name, verb) {
  const reply = await fetch(`/models/${encodeURIComponent(name)}/${verb}`, {
    method: "POST", headers: { ...headers(), "Content-Type": "application/json" }, body: "{}",
  });
  if (!reply.ok) {
    const body = await reply.json().catch(() => ({}));
    alert(`${verb} ${name}: ${(body.error && body.error.message) || reply.status}`);
  }
}

function drawModels(snap, names) {
  const body = $("#models tbody");
  body.replaceChildren();
  for (const inst of snap.instances) {
    const rate = (snap.rates || {})[inst.name] || {};
    const running = inst.state === "ready";
    const remote = inst.upstream !== null && inst.upstream !== undefined;  // another box's: never loaded here
    const state = remote && inst.latency_ms !== null ? `${inst.state} ${Math.round(inst.latency_ms)} ms` : inst.state;
    const button = remote
      ? el("button", { disabled: "" }, "remote")
      : running
      ? el("button", { onclick: () => act(inst.name, "unload") }, "unload")
      : el("button", { onclick: () => act(inst.name, "load"), ...(inst.state === "stopped" ? {} : { disabled: "" }) }, "load");
    body.append(el("tr", { "data-model": inst.name },
      el("td", { style: `color:${colorOf(inst.name, names)}` }, inst.name),
      el("td", { class: `state-${inst.state}` }, state),
      el("td", {}, remote ? `@${inst.upstream}` : (inst.gpu_ids || []).join(",") || (inst.pid ? "CPU" : "-")),
      el("td", { class: "num" }, bytes(inst.estimated_bytes)),
      el("td", { class: "num" }, bytes(inst.actual_bytes)),
      el("td", { class: "num" }, inst.in_flight),
      el("td", { class: "num" }, inst.queued),
      el("td", { class: "num" }, rate.per_min || 0),
      el("td", { class: "num" }, rate.p50_ms === undefined || rate.p50_ms === null ? "-" : `${rate.p50_ms} ms`),
      el("td", { class: "num" }, rate.p95_ms === undefined || rate.p95_ms === null ? "-" : `${rate.p95_ms} ms`),
      el("td", {}, inst.pid ? duration(inst.idle_s) : "-"),
      el("td", {}, duration(inst.ttl_left_s)),
      el("td", {}, button)));
  }
  $("#queue").textContent = snap.queue ? `${snap.queue} queued` : "";
}

function drawEvents(snap) {
  const list = $("#events");
  list.replaceChildren();
  for (const e of [...snap.events].reverse()) {
    const bad = ["crash", "oom", "failed", "timeout", "no_fit"].includes(e.kind);
    list.append(el("li", { class: bad ? "bad" : "" },
      `${new Date(e.at * 1000).toLocaleTimeString()} ${e.kind.padEnd(8)} ${e.model} ${e.detail || ""}`));
  }
}

function drawRequests(snap) {
  const body = $("#requests tbody");
  body.replaceChildren();
  for (const r of [...snap.requests].reverse().slice(0, 20)) {
    body.append(el("tr", {},
      el("td", {}, new Date(r.at * 1000).toLocaleTimeString()), el("td", {}, r.model),
      el("td", { class: r.status >= 400 ? "error" : "" }, r.status), el("td", { class: "num" }, r.ms),
      el("td", { class: "num" }, r.tokens === null || r.tokens === undefined ? "-" : r.tokens)));
  }
}

function draw(snap) {
  const names = snap.instances.map((i) => i.name).sort();
  drawGpus(snap, names);
  drawModels(snap, names);
  drawEvents(snap);
  drawRequests(snap);
  $("#stamp").textContent = new Date(snap.at * 1000).toLocaleTimeString();
}

function setConn(text, ok) {
  const conn = $("#conn");
  conn.textContent = text;
  conn.className = `conn ${ok ? "ok" : "bad"}`;
}

async function stream() {
  for (;;) {
    let reply;
    try {
      reply = await fetch("/status/stream", { headers: headers() });
    } catch (err) {
      setConn("proxy unreachable; retrying", false);
      await new Promise((r) => setTimeout(r, 2000));
      continue;
    }
    if (reply.status === 401) {
      askForKey(sessionStorage.getItem(KEY) ? "that key was refused" : "");
      return;
    }
    $("#key-form").hidden = true;
    $("#main").hidden = false;
    setConn("live", true);
    const reader = reply.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
          if (data) draw(JSON.parse(data));
        }
      }
    } catch (err) {
      // the proxy went away mid-stream: reconnect below
    }
    setConn("disconnected; reconnecting", false);
    await new Promise((r) => setTimeout(r, 1000));
  }
}

function askForKey(error) {
  $("#main").hidden = true;
  $("#key-form").hidden = false;
  $("#key-error").textContent = error;
  setConn("needs an API key", false);
  $("#api-key").focus();
}

$("#key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(KEY, $("#api-key").value.trim());
  stream();
});

stream();
