// adapterserve's page: the same API and keys as any client (GET /v1/adapters, POST /classify with
// explain, POST /generate streamed).
"use strict";
const $ = (id) => document.getElementById(id);
const keyInput = $("key");
keyInput.value = localStorage.getItem("adapterserve-key") || "";
let adapters = [];

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = keyInput.value.trim();
  localStorage.setItem("adapterserve-key", key);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function failed(resp) {
  let message = resp.status + " " + resp.statusText;
  try { message = (await resp.json()).error.message || message; } catch (e) { /* not JSON */ }
  throw new Error(message);
}

async function loadAdapters() {
  $("error").textContent = "";
  const resp = await fetch("/v1/adapters", { headers: headers() });
  if (!resp.ok) await failed(resp);
  const body = await resp.json();
  adapters = body.data || body.adapters || body;
  const select = $("adapter");
  select.innerHTML = "";
  const bare = document.createElement("option");
  bare.value = ""; bare.textContent = "(the bare base model: generate)";
  select.appendChild(bare);
  for (const a of adapters) {
    const option = document.createElement("option");
    option.value = a.name; option.textContent = a.name + " (" + a.task + ")";
    select.appendChild(option);
  }
  const first = adapters.find((a) => a.task === "classify");
  if (first) select.value = first.name;
  showTask();
}

function taskOf(name) {
  const a = adapters.find((x) => x.name === name);
  return a ? a.task : "generate";
}

function showTask() { $("task").textContent = taskOf($("adapter").value); }

function colour(score, scale) {
  const v = scale > 0 ? Math.min(1, Math.abs(score) / scale) : 0;
  return score >= 0 ? `rgba(30, 160, 60, ${v * 0.75})` : `rgba(210, 40, 40, ${v * 0.75})`;
}

function showClassification(result) {
  const table = $("labels");
  table.innerHTML = "";
  for (const [label, p] of Object.entries(result.scores)) {
    const row = table.insertRow();
    row.insertCell().textContent = label + (label === result.label ? " ✓" : "");
    row.insertCell().textContent = p.toFixed(3);
    const bar = document.createElement("span");
    bar.className = "bar"; bar.style.width = Math.round(p * 200) + "px";
    row.insertCell().appendChild(bar);
  }
  const tokens = $("tokens");
  tokens.innerHTML = "";
  const shown = result.attributions.filter((t) => !t.special);
  const scale = Math.max(...shown.map((t) => Math.abs(t.score)), 0);
  const text = $("text").value;
  let at = 0;
  for (const t of result.attributions) {
    const span = document.createElement("span");
    if (t.special) {
      span.className = "special"; span.textContent = t.token + " ";
    } else {
      if (t.start > at) tokens.appendChild(document.createTextNode(text.slice(at, t.start)));
      span.textContent = text.slice(t.start, t.end);
      span.style.background = colour(t.score, scale);
      at = Math.max(at, t.end);
    }
    span.title = t.token + ": " + t.score.toFixed(4);
    span.dataset.score = t.score;
    tokens.appendChild(span);
  }
  $("delta").textContent = "explaining " + result.explained +
    (result.delta !== undefined ? "; delta " + result.delta.toFixed(4) : "") +
    " (green: towards the label, red: against it)";
}

async function classify(adapter) {
  const body = { adapter, inputs: $("text").value, explain: { method: $("method").value } };
  const resp = await fetch("/classify", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!resp.ok) await failed(resp);
  showClassification((await resp.json()).results[0]);
}

async function generate(adapter) {
  const reply = $("reply");
  reply.hidden = false; reply.textContent = "";
  const body = { adapter: adapter || null, messages: [{ role: "user", content: $("text").value }], stream: true };
  const resp = await fetch("/generate", { method: "POST", headers: headers(), body: JSON.stringify(body) });
  if (!resp.ok) await failed(resp);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    const lines = buffer.split("\n");
    buffer = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
      const event = JSON.parse(line.slice(6));
      if (event.error) throw new Error(event.error.message);
      reply.textContent += event.text || "";
    }
  }
  reply.dataset.done = "true";
}

async function run() {
  $("error").textContent = "";
  $("labels").innerHTML = ""; $("tokens").innerHTML = ""; $("delta").textContent = "";
  $("reply").hidden = true; delete $("reply").dataset.done;
  const adapter = $("adapter").value;
  try {
    if (taskOf(adapter) === "classify") await classify(adapter); else await generate(adapter);
  } catch (e) {
    $("error").textContent = e.message;
  }
}

$("load").addEventListener("click", () => loadAdapters().catch((e) => { $("error").textContent = e.message; }));
$("adapter").addEventListener("change", showTask);
$("run").addEventListener("click", run);
loadAdapters().catch((e) => { $("error").textContent = e.message; });
