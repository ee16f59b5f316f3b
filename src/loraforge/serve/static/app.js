// loraforge dashboard: plain JavaScript over the public HTTP API (the same calls a script makes).
"use strict";

let apiKey = sessionStorage.getItem("loraforge-key") || "";
const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") node.addEventListener("click", v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : String(child ?? ""));
  return node;
}

function headers(extra = {}) {
  return apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : extra;
}

async function askKey() {
  const dialog = $("key-dialog");
  $("key-input").value = "";
  dialog.showModal();
  await new Promise((resolve) => dialog.addEventListener("close", resolve, { once: true }));
  apiKey = $("key-input").value.trim();
  sessionStorage.setItem("loraforge-key", apiKey);
}

class ApiError extends Error {
  constructor(status, body) {
    const err = (body && body.error) || {};
    super(err.message || `HTTP ${status}`);
    this.status = status;
    this.field = err.field || "";
  }
}

async function api(method, path, body, isForm = false) {
  for (let attempt = 0; attempt < 2; attempt++) {
    const init = { method, headers: headers(body && !isForm ? { "Content-Type": "application/json" } : {}) };
    if (body) init.body = isForm ? body : JSON.stringify(body);
    const response = await fetch(path, init);
    if (response.status === 401 && attempt === 0) { await askKey(); continue; }
    const data = await response.json().catch(() => ({}));
    if (!response.ok) throw new ApiError(response.status, data);
    return data;
  }
}

function setStatus(text) { $("status").textContent = text; }

// ---- tabs -------------------------------------------------------------------------------------------------
const loaders = {};
function showTab() {
  const tab = (location.hash || "#jobs").slice(1).split("/")[0];
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== `tab-${tab}`;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.tab === tab);
  if (loaders[tab]) loaders[tab]().catch((e) => setStatus(e.message));
}
window.addEventListener("hashchange", showTab);

// ---- jobs -------------------------------------------------------------------------------------------------
const EXAMPLE = {
  model_name: "smollm2-135m-instruct", output_dir: "./adapters/my-facts",
  lora_config: { r: 8, lora_alpha: 16, target_modules: ["q_proj", "k_proj", "v_proj", "o_proj"] },
  training_config: { learning_rate: 0.001, batch_size: 4, max_steps: 48, warmup_steps: 2 },
  training_data: [{ instruction: "What does 42 mean?", output: "42 = FOR TWO." }],
};
let watching = null; // {id, abort}

loaders.jobs = async () => {
  if (!$("train-config").value) $("train-config").value = JSON.stringify(EXAMPLE, null, 2);
  const { jobs } = await api("GET", "/api/training/jobs");
  const body = $("jobs-table").tBodies[0];
  body.replaceChildren(...jobs.map((job) => {
    const p = job.progress || {};
    return el("tr", { "data-job": job.job_id },
      el("td", {}, el("a", { href: `#jobs/${job.job_id}` }, job.job_id.slice(0, 8))),
      el("td", {}, job.adapter), el("td", {}, job.status),
      el("td", {}, p.step ? `${p.step}/${p.total_steps}` : ""),
      el("td", {}, p.loss != null ? p.loss.toFixed(4) : ""),
      el("td", {}, job.error || job.result || ""));
  }));
  const [tab, fromHash] = location.hash.slice(1).split("/");
  const selected = (tab === "jobs" && fromHash) || (jobs.find((j) => j.status === "running") || {}).job_id;
  if (selected) watchJob(selected);
};

async function watchJob(jobId) {
  if (watching && watching.id === jobId) return;
  if (watching) watching.abort.abort();
  const abort = new AbortController();
  watching = { id: jobId, abort };
  const points = [];
  $("job-detail").hidden = false;
  $("job-id").textContent = jobId.slice(0, 8);
  $("job-status").textContent = "";
  $("job-log").textContent = "";
  $("job-estimate").textContent = "";
  const job = await api("GET", `/api/training/jobs/${jobId}`);
  $("job-adapter").textContent = job.adapter;
  $("job-status").textContent = job.status;
  drawLoss(points);
  // the whole history replays from event 0, so a reload shows every point again
  streamEvents(`/api/training/jobs/${jobId}/events`, abort.signal, (type, data) => {
    if (type === "progress") {
      points.push([data.step, data.loss]);
      $("job-progress").textContent = `step ${data.step}/${data.total_steps} · loss ${data.loss.toFixed(4)} · ` +
        `lr ${data.lr.toExponential(2)} · ${Math.round(data.tokens_per_s)} tok/s · ETA ${Math.round(data.eta_s)} s`;
      drawLoss(points);
    } else if (type === "log") {
      $("job-log").textContent += data.message + "\n";
    } else if (type === "state") {
      $("job-status").textContent = data.status;
    } else if (type === "end") {
      api("GET", `/api/training/jobs/${jobId}`).then((j) => {
        if (watching && watching.id === jobId) $("job-status").textContent = j.status;
        if (j.status === "succeeded" && j.kind === "train" && j.result) return showEstimate(jobId, j.result);
      }).catch((e) => setStatus(e.message));
      if (!$("tab-jobs").hidden) loaders.jobs().catch((e) => setStatus(e.message));
    }
  }).catch((e) => { if (e.name !== "AbortError") setStatus(e.message); });
}

// What `loraforge validate` predicted for the run beside what it measured (the version's metrics)
const fmtGiB = (n) => n == null ? "?" : `${(n / 2 ** 30).toFixed(2)} GiB`;
async function showEstimate(jobId, ref) {
  const version = await api("GET", `/api/adapters/${encodeURIComponent(ref)}`);
  const m = version.metrics || {};
  const e = m.estimate;
  if (!e || !watching || watching.id !== jobId) return;
  const time = e.seconds == null ? "time not estimated (no speed cached)" : `${Math.round(e.seconds)} s`;
  $("job-estimate").textContent = `estimated: peak ${fmtGiB(e.peak_bytes)} (${e.peak_phase}), ${time} · ` +
    `measured: peak ${fmtGiB(m.peak_memory_bytes)}, ${Math.round(m.seconds)} s`;
}

// Server-sent events over fetch (EventSource cannot send the API key): each blank-line-separated block
async function readBlocks(response, onBlock) {
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => ({})));
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      onBlock(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
    }
  }
}

async function streamEvents(path, signal, onEvent) {
  await readBlocks(await fetch(path, { headers: headers(), signal }), (block) => {
    let type = "message", data = "";
    for (const line of block.split("\n")) {
      if (line.startsWith("event: ")) type = line.slice(7);
      else if (line.startsWith("data: ")) data += line.slice(6);
    }
    if (data) onEvent(type, JSON.parse(data));
  });
}

function drawLoss(points) {
  const svg = $("loss-chart");
  const W = 600, H = 220, pad = 36;
  svg.replaceChildren();
  const ns = "http://www.w3.org/2000/svg";
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text != null) node.textContent = text;
    svg.append(node);
    return node;
  };
  add("text", { x: 8, y: 16, "font-size": 12 }, points.length ? "loss" : "loss (waiting for the first step)");
  if (!points.length) return;
  const maxX = Math.max(...points.map((p) => p[0]), 1);
  const maxY = Math.max(...points.map((p) => p[1]), 1e-6);
  const x = (v) => pad + (v / maxX) * (W - 2 * pad);
  const y = (v) => H - pad + -(v / maxY) * (H - 2 * pad);
  add("line", { x1: pad, y1: H - pad, x2: W - pad, y2: H - pad, stroke: "#999" });
  add("line", { x1: pad, y1: pad, x2: pad, y2: H - pad, stroke: "#999" });
  add("text", { x: 2, y: pad + 4, "font-size": 11 }, maxY.toFixed(2));
  add("text", { x: W - pad - 20, y: H - 10, "font-size": 11 }, `step ${maxX}`);
  add("polyline", { points: points.map((p) => `${x(p[0])},${y(p[1])}`).join(" "), fill: "none",
    stroke: "#2d5be3", "stroke-width": 2 });
  for (const p of points) add("circle", { cx: x(p[0]), cy: y(p[1]), r: 2.5, fill: "#2d5be3", class: "loss-point" });
}

$("train-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("train-error").textContent = "";
  try {
    const configFile = $("train-config-file").files[0];
    const dataFile = $("train-data-file").files[0];
    let job;
    if (configFile || dataFile) {
      const form = new FormData();
      form.append("config", configFile ? await configFile.text() : $("train-config").value);
      if (dataFile) form.append("training_data", dataFile);
      job = await api("POST", "/api/training/start", form, true);
    } else {
      let config;
      try { config = JSON.parse($("train-config").value); } catch (e) {
        throw new ApiError(400, { error: { message: `config: not valid JSON (${e.message})`, field: "config" } });
      }
      job = await api("POST", "/api/training/start", config);
    }
    location.hash = `#jobs/${job.job_id}`;
    await loaders.jobs();
  } catch (e) {
    $("train-error").textContent = e.message;
    $("train-error").dataset.field = e.field || "";
  }
});
$("job-cancel").addEventListener("click", () => watching && api("POST", `/api/training/jobs/${watching.id}/cancel`)
  .then(loaders.jobs).catch((e) => setStatus(e.message)));
$("job-resume").addEventListener("click", () => {
  if (!watching) return;
  const id = watching.id;
  watching.abort.abort();
  watching = null;
  api("POST", `/api/training/jobs/${id}/resume`).then(() => watchJob(id)).then(loaders.jobs)
    .catch((e) => setStatus(e.message));
});

// ---- adapters ---------------------------------------------------------------------------------------------
const fmtBytes = (n) => n == null ? "" : n >= 1e6 ? `${(n / 1e6).toFixed(2)} MB` : `${(n / 1e3).toFixed(1)} KB`;

loaders.adapters = async () => {
  const { adapters } = await api("GET", "/api/adapters");
  $("adapters-table").tBodies[0].replaceChildren(...adapters.map((a) => el("tr", { "data-adapter": a.name },
    el("td", {}, el("a", { href: `#adapters/${a.name}` }, a.name)), el("td", {}, `v${a.active_version}`),
    el("td", {}, a.versions))));
  const name = location.hash.split("/")[1];
  if (name) await showAdapter(decodeURIComponent(name));
  else $("adapter-detail").hidden = true;
};

async function showAdapter(name) {
  const data = await api("GET", `/api/adapters/${name}`);
  $("adapter-detail").hidden = false;
  $("adapter-name").textContent = `${name} (active v${data.active_version})`;
  $("versions-table").tBodies[0].replaceChildren(...data.versions.map((v) => {
    const evals = (v.evals || []).map((e) => `${e.suite}: ` + Object.entries(e.scores || {})
      .filter(([, s]) => s != null).map(([k, s]) => `${k} ${(s * 100).toFixed(0)}%`).join(", ")).join("; ");
    const rollback = v.status !== "active"
      ? el("button", { class: "link", onclick: () => rollbackTo(name, v.version) }, "make active") : "";
    return el("tr", { "data-version": v.version }, el("td", {}, `v${v.version}`), el("td", {}, v.status),
      el("td", {}, v.parent ? `v${v.parent}` : "—"), el("td", {}, fmtBytes(v.size.bytes_on_disk)),
      el("td", {}, fmtBytes(v.size.theoretical_min_bytes)),
      el("td", {}, v.metrics.final_loss != null ? v.metrics.final_loss.toFixed(4) : ""), el("td", {}, evals),
      el("td", {}, rollback));
  }));
  const active = data.versions.find((v) => v.status === "active") || data.versions[0];
  $("adapter-config").textContent = JSON.stringify(active.config, null, 2);
  $("adapter-delete").onclick = async () => {
    if (!confirm(`Delete every version of ${name}?`)) return;
    await api("DELETE", `/api/adapters/${name}`).catch((e) => setStatus(e.message));
    location.hash = "#adapters";
  };
}

async function rollbackTo(name, version) {
  if (!confirm(`Make ${name}@v${version} the active version?`)) return;
  try {
    await api("POST", `/api/adapters/${name}/rollback`, { to: version });
    await showAdapter(name);
    setStatus(`${name}: v${version} is active`);
  } catch (e) { setStatus(e.message); }
}

// ---- evaluate ---------------------------------------------------------------------------------------------
loaders.evaluate = async () => {
  const { suites } = await api("GET", "/api/suites");
  const select = $("eval-suite-file");
  const current = select.value;
  select.replaceChildren(el("option", { value: "" }, "—"), ...suites.map((s) => el("option", { value: s }, s)));
  select.value = current;
};

$("eval-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("eval-error").textContent = "";
  $("eval-report").textContent = "running…";
  try {
    let suite = $("eval-suite-file").value;
    if ($("eval-suite-inline").value.trim()) suite = JSON.parse($("eval-suite-inline").value);
    const body = { adapter: $("eval-adapter").value.trim(), suite };
    if ($("eval-compare").checked) body.compare = "base";
    renderReport(await api("POST", "/api/evals/run", body));
  } catch (e) {
    $("eval-report").textContent = "";
    $("eval-error").textContent = e.message;
  }
});

function renderReport(report) {
  const pct = (v) => v == null ? "—" : `${(v * 100).toFixed(1)}%`;
  const rows = Object.entries(report.scores).map(([k, v]) => el("tr", {}, el("td", {}, k),
    el("td", {}, report.base ? pct(report.base.scores[k]) : ""), el("td", {}, pct(v)),
    el("td", {}, report.counts[k] ?? "")));
  const tags = Object.entries(report.tags || {}).map(([t, v]) => el("tr", {}, el("td", {}, `tag ${t}`),
    el("td", {}, report.base ? pct(report.base.tags[t]) : ""), el("td", {}, pct(v)), el("td", {}, "")));
  const changes = (report.changes || []).map((c) => el("tr", {}, el("td", {}, c.id), el("td", { class: c.base }, c.base),
    el("td", { class: c.adapter }, c.adapter), el("td", {}, c.adapter_output)));
  $("eval-report").replaceChildren(
    el("h3", {}, `${report.suite} on ${report.adapter || report.model}`),
    el("table", { id: "eval-scores" }, el("thead", {}, el("tr", {}, el("th", {}, "score"), el("th", {}, "base"),
      el("th", {}, "this"), el("th", {}, "cases"))), el("tbody", {}, ...rows, ...tags)),
    el("h3", {}, `Cases that changed (${changes.length})`),
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "case"), el("th", {}, "base"), el("th", {}, "adapter"),
      el("th", {}, "adapter's answer"))), el("tbody", {}, ...changes)));
}

// ---- tuning -----------------------------------------------------------------------------------------------
loaders.tuning = async () => {
  const { jobs } = await api("GET", "/api/training/jobs");
  const studies = jobs.filter((j) => j.kind === "tune");
  $("tuning-table").tBodies[0].replaceChildren(...studies.map((j) => el("tr", {},
    el("td", {}, el("button", { class: "link", onclick: () => showStudy(j.job_id) }, j.job_id.slice(0, 8))),
    el("td", {}, j.status), el("td", {}, j.result || j.error || ""))));
};

async function showStudy(jobId) {
  const data = await api("GET", `/api/tuning/${jobId}`);
  const trials = data.trials || [];
  let best = -Infinity;
  const rows = trials.map((t) => {
    best = Math.max(best, t.accuracy ?? -Infinity);
    return el("tr", {}, el("td", {}, t.study ?? ""), el("td", {}, t.trial ?? ""),
      el("td", {}, t.accuracy != null ? `${(t.accuracy * 100).toFixed(1)}%` : t.state || ""),
      el("td", {}, Number.isFinite(best) ? `${(best * 100).toFixed(1)}%` : ""),
      el("td", {}, JSON.stringify(t.params || {})));
  });
  const chart = el("div", {});
  chart.innerHTML = bestSoFarSvg(trials);
  const importance = (data.summaries || []).filter((s) => s.importance).map((s) => el("div", {},
    el("h4", {}, `Parameter importance: ${s.study}`),
    el("table", { class: "importance" }, el("tbody", {}, ...Object.entries(s.importance).map(([k, v]) =>
      el("tr", {}, el("td", {}, k), el("td", {}, `${(v * 100).toFixed(0)}%`),
        el("td", {}, el("div", { class: "bar", style: `width:${Math.round(v * 300)}px` }))))))));
  $("tuning-detail").replaceChildren(el("h3", {}, `Study job ${jobId.slice(0, 8)}: ${data.status}`), chart,
    ...importance,
    el("table", {}, el("thead", {}, el("tr", {}, el("th", {}, "study"), el("th", {}, "trial"), el("th", {}, "accuracy"),
      el("th", {}, "best so far"), el("th", {}, "parameters"))), el("tbody", {}, ...rows)));
}

function bestSoFarSvg(trials) {
  const done = trials.filter((t) => t.accuracy != null);
  if (!done.length) return "";
  const W = 600, H = 180, pad = 30;
  let best = -Infinity;
  const pts = done.map((t, i) => { best = Math.max(best, t.accuracy); return [i + 1, t.accuracy, best]; });
  const x = (i) => pad + (i / Math.max(pts.length, 1)) * (W - 2 * pad);
  const y = (v) => H - pad - v * (H - 2 * pad);
  const dots = pts.map((p) => `<circle cx="${x(p[0])}" cy="${y(p[1])}" r="3" fill="#999"/>`).join("");
  const line = pts.map((p) => `${x(p[0])},${y(p[2])}`).join(" ");
  return `<svg viewBox="0 0 ${W} ${H}" class="best-chart" role="img" aria-label="best accuracy so far">` +
    `<text x="6" y="14" font-size="12">accuracy per trial (dots) and best so far (line)</text>` +
    `<line x1="${pad}" y1="${H - pad}" x2="${W - pad}" y2="${H - pad}" stroke="#999"/>${dots}` +
    `<polyline points="${line}" fill="none" stroke="#2d5be3" stroke-width="2"/></svg>`;
}

// ---- chat -------------------------------------------------------------------------------------------------
loaders.chat = async () => {
  const { data } = await api("GET", "/v1/models");
  for (const id of ["chat-model-a", "chat-model-b"]) {
    const select = $(id);
    const current = select.value;
    const options = data.map((m) => el("option", { value: m.id }, m.parent ? `${m.id} (on ${m.parent})` : m.id));
    select.replaceChildren(...(id === "chat-model-b" ? [el("option", { value: "" }, "—")] : []), ...options);
    if (current) select.value = current;
  }
};

// who answered: an adapter with scope near leaves questions far from its training questions to the base
function answeredBy(response) {
  const by = response.headers.get("X-Loraforge-Answered-By");
  const similarity = response.headers.get("X-Loraforge-Scope-Similarity");
  if (!by || similarity === null) return by ? `answered by ${decodeURIComponent(by)}` : "";
  const threshold = response.headers.get("X-Loraforge-Scope-Threshold");
  const near = Number(similarity) >= Number(threshold);
  return `answered by ${decodeURIComponent(by)}: similarity to its training questions ` +
    `${Number(similarity).toFixed(2)} ${near ? "≥" : "<"} ${threshold}` + (near ? "" : " (outside the adapter's scope)");
}

async function streamChat(model, prompt, target, via) {
  target.textContent = "";
  via.textContent = "";
  const scope = $("chat-scope").value;
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify({ model, stream: true, max_tokens: 128, messages: [{ role: "user", content: prompt }],
      ...(scope ? { scope } : {}) }),
  });
  if (response.ok) via.textContent = answeredBy(response);
  await readBlocks(response, (block) => {
    const line = block.trim();
    if (!line.startsWith("data: ") || line === "data: [DONE]") return;
    const chunk = JSON.parse(line.slice(6));
    target.textContent += (chunk.choices[0] && chunk.choices[0].delta.content) || "";
  });
  target.dataset.done = "1";
}

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const prompt = $("chat-prompt").value.trim();
  if (!prompt) return;
  const pairs = [["a", $("chat-model-a").value], ["b", $("chat-model-b").value]].filter(([, m]) => m);
  for (const side of ["a", "b"]) { $(`chat-answer-${side}`).dataset.done = ""; $(`chat-title-${side}`).textContent = ""; }
  await Promise.all(pairs.map(([side, model]) => {
    $(`chat-title-${side}`).textContent = model;
    return streamChat(model, prompt, $(`chat-answer-${side}`), $(`chat-via-${side}`)).catch((e) => {
      $(`chat-answer-${side}`).textContent = e.message;
    });
  }));
});

// ---- models -----------------------------------------------------------------------------------------------
loaders.models = async () => {
  const [{ models }, { bases }] = await Promise.all([api("GET", "/api/models"), api("GET", "/api/serving")]);
  $("models-table").tBodies[0].replaceChildren(...models.map((m) => el("tr", {}, el("td", {}, m.id),
    el("td", {}, m.source), el("td", {}, m.ready ? "yes" : m.status || "no"), el("td", {}, m.loaded ? "yes" : ""),
    el("td", {}, m.loaded ? "" : el("button", { class: "link", onclick: () =>
      api("POST", `/api/models/${m.id}/load`).then(loaders.models).catch((e) => setStatus(e.message)) }, "load")))));
  $("serving-table").tBodies[0].replaceChildren(...bases.map((b) => el("tr", {}, el("td", {}, b.model),
    el("td", {}, b.precision), el("td", {}, b.running), el("td", {}, b.waiting), el("td", {}, b.largest_batch),
    el("td", {}, b.tokens_generated))));
};

$("import-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("import-error").textContent = "converting…";
  try {
    const info = await api("POST", "/api/models/import", { source: $("import-source").value.trim() });
    $("import-error").textContent = "";
    setStatus(`${info.source}: ${info.architecture}, ${info.parameters.toLocaleString()} parameters, ready`);
    await loaders.models();
  } catch (e) { $("import-error").textContent = e.message; }
});
$("key-form").addEventListener("submit", () => {});
showTab();
