// The tunesmith web UI: plain JavaScript over the server's own APIs (no build step).
// Nothing lives only in this page: every view is rebuilt from the server on load, and the URL's
// hash (#runs/ftjob-...) says which tab and run are shown, so a reload shows the same thing.
"use strict";

const KEY_STORE = "tunesmith-api-key";
const $ = (id) => document.getElementById(id);
const state = { info: null, tab: "train", job: null, stream: null, points: {}, compare: new Set() };

// -- the API, with the key asked once per browser session --------------------------------------------

let keyWaiters = null;

function askKey(message) {
  $("key-error").textContent = message || "";
  $("key-dialog").hidden = false;
  $("key-input").focus();
  if (!keyWaiters) keyWaiters = [];
  return new Promise((resolve) => keyWaiters.push(resolve));
}

$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY_STORE, $("key-input").value.trim());
  $("key-dialog").hidden = true;
  const waiting = keyWaiters || [];
  keyWaiters = null;
  waiting.forEach((resolve) => resolve());
});

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY_STORE);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function api(path, options = {}) {
  for (;;) {
    const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
    if (response.status === 401) {
      const had = sessionStorage.getItem(KEY_STORE);
      await askKey(had ? "That key was refused; try again." : "");
      continue;
    }
    const body = response.headers.get("content-type")?.includes("json") ? await response.json() : await response.text();
    if (!response.ok) {
      const message = body?.error?.message || String(body);
      const error = new Error(message);
      error.param = body?.error?.param;
      throw error;
    }
    return body;
  }
}

const post = (path, body) =>
  api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body || {}) });

async function upload(file) {
  const form = new FormData();
  form.append("purpose", "fine-tune");
  form.append("file", file, file.name);
  return api("/v1/files", { method: "POST", body: form });
}

// Server-sent events over fetch (EventSource cannot send the bearer token).
function openStream(path, onMessage, onEnd) {
  const control = new AbortController();
  let lastId = 0;
  const run = async () => {
    for (;;) {
      let response;
      try {
        response = await fetch(`${path}?after=${lastId}`, { headers: headers(), signal: control.signal });
      } catch (e) { if (control.signal.aborted) return; await sleep(1000); continue; }
      if (response.status === 401) { await askKey("That key was refused; try again."); continue; }
      if (!response.ok) { onEnd && onEnd({ error: `stream: HTTP ${response.status}` }); return; }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "", ended = false;
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
            let kind = "message", data = "", id = null;
            for (const line of block.split("\n")) {
              if (line.startsWith("event: ")) kind = line.slice(7);
              else if (line.startsWith("data: ")) data += line.slice(6);
              else if (line.startsWith("id: ")) id = Number(line.slice(4));
            }
            if (id !== null) lastId = id;
            if (!data) continue;
            const payload = JSON.parse(data);
            if (kind === "end") { ended = true; onEnd && onEnd(payload); }
            else onMessage(kind, payload);
          }
        }
      } catch (e) { if (control.signal.aborted) return; }
      if (ended || control.signal.aborted) return;
      await sleep(1000);
    }
  };
  run();
  return { close: () => control.abort() };
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const esc = (s) => String(s ?? "").replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
const statusBadge = (s) => `<span class="status ${esc(s)}">${esc(s)}</span>`;
const shortId = (id) => id.replace(/^ftjob-/, "").slice(0, 10);

// -- YAML out (the server parses it back) ----------------------------------------------------------------

function toYaml(value, indent = "") {
  const scalar = (v) => {
    if (v === null || v === undefined) return "null";
    if (typeof v === "number" || typeof v === "boolean") return String(v);
    const s = String(v);
    return /^[\w./+-][\w ./+:-]*$/.test(s) && !/^(true|false|null|yes|no|on|off|~)$/i.test(s) && !/^[-+]?[\d.]+(e[-+]?\d+)?$/i.test(s) && !s.endsWith(" ") ? s : JSON.stringify(s);
  };
  if (Array.isArray(value)) {
    if (!value.length) return " []";
    return value.map((item) => {
      if (item && typeof item === "object") {
        const inner = toYaml(item, indent + "  ").replace(/^\n\s*/, "");
        return `\n${indent}- ${inner}`;
      }
      return `\n${indent}- ${scalar(item)}`;
    }).join("");
  }
  if (value && typeof value === "object") {
    const keys = Object.keys(value);
    if (!keys.length) return " {}";
    return keys.map((k) => {
      const v = value[k];
      return v && typeof v === "object" ? `\n${indent}${k}:${toYaml(v, indent + "  ")}` : `\n${indent}${k}: ${scalar(v)}`;
    }).join("");
  }
  return ` ${scalar(value)}`;
}

const yamlText = (obj) => toYaml(obj).replace(/^\n/, "") + "\n";

// -- tabs -------------------------------------------------------------------------------------------------

function route() {
  const [tab, id] = (location.hash.replace(/^#/, "") || "train").split("/");
  state.tab = ["train", "runs", "data", "chat", "export"].includes(tab) ? tab : "train";
  document.querySelectorAll(".page").forEach((p) => { p.hidden = p.id !== `page-${state.tab}`; });
  document.querySelectorAll("#tabs a").forEach((a) => a.classList.toggle("active", a.dataset.tab === state.tab));
  if (state.tab === "runs") showRuns(id);
  if (state.tab === "data") showData();
  if (state.tab === "chat") showChat();
  if (state.tab === "export") showExport();
  if (state.tab !== "runs") closeStream();
}

window.addEventListener("hashchange", route);

// -- Train -----------------------------------------------------------------------------------------------

async function fileOptions(select, { optional = false, keep } = {}) {
  const files = await api("/v1/files?purpose=fine-tune&limit=100");
  const current = keep || select.value;
  select.innerHTML = (optional ? '<option value="">(none)</option>' : "") +
    files.data.map((f) => `<option value="${esc(f.id)}">${esc(f.filename)} · ${esc(f.id)} · ${esc(f.status)}</option>`).join("");
  if (current && files.data.some((f) => f.id === current)) select.value = current;
  return files.data;
}

function fieldInput(field) {
  const schema = field.schema || {};
  const types = (schema.anyOf || [schema]).map((s) => s.type).filter(Boolean);
  const nullable = types.includes("null");
  const type = types.find((t) => t !== "null") || "string";
  const id = `field-${field.section}-${field.name}`;
  const value = field.default;
  let input;
  if (type === "boolean") {
    input = `<input type="checkbox" id="${id}" ${value ? "checked" : ""}>`;
  } else if (schema.enum) {
    input = `<select id="${id}">${schema.enum.map((v) => `<option ${v === value ? "selected" : ""}>${esc(v)}</option>`).join("")}</select>`;
  } else {
    const numeric = type === "integer" || type === "number";
    const bounds = [];
    const inner = (schema.anyOf || [schema]).find((s) => s.type === type) || {};
    if (inner.minimum !== undefined) bounds.push(`min="${inner.minimum}"`);
    if (inner.exclusiveMinimum !== undefined) bounds.push(`min="${type === "integer" ? inner.exclusiveMinimum + 1 : inner.exclusiveMinimum}"`);
    if (inner.maximum !== undefined) bounds.push(`max="${inner.maximum}"`);
    const step = type === "integer" ? 'step="1"' : 'step="any"';
    const shown = value === null || value === undefined ? "" : Array.isArray(value) ? value.join(",") : value;
    input = `<input id="${id}" ${numeric ? `type="number" ${step} ${bounds.join(" ")}` : 'type="text"'} value="${esc(shown)}" ${nullable ? 'placeholder="(default: none)"' : ""}>`;
  }
  return `<label>${esc(field.key)} <small class="help">${esc(field.help)}</small>${input}</label>`;
}

function readField(field) {
  const el = $(`field-${field.section}-${field.name}`);
  const schema = field.schema || {};
  const types = (schema.anyOf || [schema]).map((s) => s.type).filter(Boolean);
  const type = types.find((t) => t !== "null") || "string";
  if (type === "boolean") return el.checked;
  const raw = el.value.trim();
  if (raw === "") return null;
  if (type === "integer") return parseInt(raw, 10);
  if (type === "number") return parseFloat(raw);
  return raw;
}

function formConfig() {
  const info = state.info;
  const config = { model: $("field-model").value, method: $("field-method").value, data: {}, adapter: { type: "lora" }, train: {} };
  config.data.train = [{ path: $("field-train-file").value || "file-..." }];
  if ($("field-eval-file").value) config.data.eval = [{ path: $("field-eval-file").value }];
  for (const field of info.form.fields) {
    const value = readField(field);
    const same = JSON.stringify(value) === JSON.stringify(field.default);
    const fromDefaults = (info.defaults[field.section] || {})[field.name];
    if (value === null || (same && fromDefaults === undefined && !["epochs", "batch_size", "lr", "r", "alpha"].includes(field.name))) continue;
    config[field.section][field.name] = value;
  }
  return config;
}

function refreshYaml() { $("yaml").value = yamlText(formConfig()); }

async function setupTrain() {
  const info = state.info;
  $("field-model").innerHTML = info.base_names.map((n) => `<option ${n === info.base ? "selected" : ""}>${esc(n)}</option>`).join("");
  $("help-model").textContent = "the base this server serves (and fine-tunes)";
  $("help-method").textContent = info.form.method_help;
  $("field-method").innerHTML = info.form.methods.map((m) => `<option>${esc(m)}</option>`).join("");
  const groups = {};
  for (const field of info.form.fields) (groups[field.section] ||= []).push(field);
  $("schema-fields").innerHTML = Object.entries(groups)
    .map(([section, fields]) => `<fieldset><legend>${esc(section)}</legend>${fields.map(fieldInput).join("")}</fieldset>`).join("");
  // The server's job defaults fill the form first (they are what a job runs with unless changed).
  for (const field of info.form.fields) {
    const preset = (info.defaults[field.section] || {})[field.name];
    if (preset !== undefined) { field.default = preset; const el = $(`field-${field.section}-${field.name}`); if (el.type === "checkbox") el.checked = !!preset; else el.value = preset ?? ""; }
  }
  const start = { epochs: 1, batch_size: 2, r: 8, alpha: 16 };
  for (const field of info.form.fields) {
    if (start[field.name] !== undefined && (info.defaults[field.section] || {})[field.name] === undefined) {
      field.default = start[field.name]; $(`field-${field.section}-${field.name}`).value = start[field.name];
    }
  }
  await fileOptions($("field-train-file"));
  await fileOptions($("field-eval-file"), { optional: true });
  $("train-form").addEventListener("input", refreshYaml);
  $("train-form").addEventListener("change", refreshYaml);
  refreshYaml();
}

$("train-upload").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  if (!file) return;
  $("upload-status").textContent = `uploading ${file.name} ...`;
  try {
    const row = await upload(file);
    await fileOptions($("field-train-file"), { keep: row.id });
    await fileOptions($("field-eval-file"), { optional: true });
    $("upload-status").textContent = `${row.filename}: ${row.status}${row.status_details ? " — " + row.status_details : ""}`;
    refreshYaml();
  } catch (err) { $("upload-status").textContent = `upload failed: ${err.message}`; }
  e.target.value = "";
});

$("start-button").addEventListener("click", async () => {
  $("train-error").textContent = "";
  $("start-button").disabled = true;
  try {
    const job = await post("/ui/api/jobs", { yaml: $("yaml").value, suffix: $("field-suffix").value.trim() || null });
    location.hash = `#runs/${job.id}`;
  } catch (err) {
    $("train-error").textContent = err.message;
  } finally { $("start-button").disabled = false; }
});

// -- Runs ------------------------------------------------------------------------------------------------

let runsTimer = null;

async function loadRunsTable() {
  const jobs = await api("/ui/api/jobs");
  const checked = state.compare;
  const rows = jobs.data.map((job) => ({ job, fraction: job.progress?.fraction || 0 }));
  $("runs-table").querySelector("tbody").innerHTML = rows.map(({ job, fraction }) =>
    `<tr class="clickable ${state.job === job.id ? "selected" : ""}" data-id="${esc(job.id)}">
      <td><input type="checkbox" class="compare-check" value="${esc(job.id)}" ${checked.has(job.id) ? "checked" : ""}></td>
      <td>${esc(shortId(job.id))}<br><small class="muted">${esc(job.user_provided_suffix || "")} ${new Date(job.created_at * 1000).toLocaleTimeString()}</small></td>
      <td>${statusBadge(job.status)}</td>
      <td><div class="bar"><div style="width:${Math.round(fraction * 100)}%"></div></div></td></tr>`).join("");
  document.querySelectorAll(".compare-check").forEach((box) =>
    box.addEventListener("change", () => { if (box.checked) state.compare.add(box.value); else state.compare.delete(box.value); }));
  document.querySelectorAll("#runs-table tr.clickable").forEach((tr) =>
    tr.addEventListener("click", (e) => { if (e.target.type !== "checkbox") location.hash = `#runs/${tr.dataset.id}`; }));
  return jobs.data;
}

async function showRuns(id) {
  clearInterval(runsTimer);
  const jobs = await loadRunsTable();
  runsTimer = setInterval(() => { if (state.tab === "runs") loadRunsTable().catch(() => {}); }, 2000);
  const pick = id || (jobs[0] && jobs[0].id);
  $("compare-body").hidden = true;
  if (pick) openRun(pick); else { $("run-body").hidden = true; $("run-empty").hidden = false; }
}

function closeStream() { if (state.stream) { state.stream.close(); state.stream = null; } }

function renderJob(job) {
  $("run-title").textContent = job.id;
  const status = $("run-status");
  status.textContent = job.status; status.className = `status ${job.status}`;
  $("run-model").textContent = job.fine_tuned_model || "";
  $("run-progress").style.width = `${Math.round((job.progress?.fraction || 0) * 100)}%`;
  const p = job.progress || {};
  if (p.step) $("run-step").textContent = `step ${p.step}${p.max_steps ? ` of ${p.max_steps}` : ""}${p.epoch != null ? `, epoch ${Number(p.epoch).toFixed(2)}` : ""}`;
  $("run-error").textContent = job.error ? `${job.error.code}: ${job.error.message}` : "";
  $("cancel-button").disabled = !["validating_files", "queued", "running", "paused"].includes(job.status);
  $("pause-button").disabled = !["queued", "running"].includes(job.status);
  $("resume-button").disabled = job.status !== "paused";
}

function drawRunChart() {
  const p = state.points;
  const series = [{ name: "train_loss", points: p.train }, { name: "valid_loss", points: p.valid }].filter((s) => s.points.length);
  lineChart($("chart"), series);
}

async function openRun(id) {
  closeStream();
  state.job = id;
  document.querySelectorAll("#runs-table tr").forEach((tr) => tr.classList.toggle("selected", tr.dataset.id === id));
  $("run-empty").hidden = true; $("run-body").hidden = false; $("compare-body").hidden = true;
  $("run-events").innerHTML = ""; $("run-log").textContent = "";
  state.points = { train: [], valid: [] };
  drawRunChart();
  const detail = await api(`/ui/api/jobs/${id}`);
  renderJob(detail);
  $("run-config").textContent = detail.config_yaml;
  let pending = false;
  const redraw = () => { if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; drawRunChart(); }); } };
  state.stream = openStream(`/ui/api/jobs/${id}/stream`, (kind, data) => {
    if (state.job !== id) return;
    if (kind === "job") renderJob(data);
    else if (kind === "event") {
      if (data.type === "metrics") {
        if (Number.isFinite(data.data.train_loss)) state.points.train.push([data.data.step, data.data.train_loss]);
        if (Number.isFinite(data.data.valid_loss)) state.points.valid.push([data.data.step, data.data.valid_loss]);
        redraw();
      } else {
        const li = document.createElement("li");
        li.className = data.level;
        li.textContent = `${new Date(data.created_at * 1000).toLocaleTimeString()}  ${data.message}`;
        $("run-events").prepend(li);
      }
    } else if (kind === "log") {
      const log = $("run-log");
      log.textContent = (log.textContent + data.text).slice(-20000);
      log.scrollTop = log.scrollHeight;
    }
  }, (end) => {
    if (state.job === id) { $("run-body").dataset.ended = end.status || "gone"; loadRunsTable().catch(() => {}); }
  });
  $("run-body").dataset.ended = "";
}

for (const action of ["cancel", "pause", "resume"]) {
  $(`${action}-button`).addEventListener("click", async () => {
    try { renderJob({ ...(await post(`/v1/fine_tuning/jobs/${state.job}/${action}`)), progress: null }); }
    catch (err) { $("run-error").textContent = err.message; }
    loadRunsTable().catch(() => {});
    if (action === "resume") openRun(state.job);
  });
}

$("compare-button").addEventListener("click", async () => {
  const ids = [...state.compare];
  if (!ids.length) return;
  closeStream(); state.job = null;
  $("run-body").hidden = true; $("run-empty").hidden = true; $("compare-body").hidden = false;
  const details = await Promise.all(ids.map((id) => api(`/ui/api/jobs/${id}`)));
  const series = [];
  details.forEach((d) => {
    const tag = shortId(d.id).slice(0, 6);
    series.push({ name: `${tag} train`, points: d.metrics.filter((m) => Number.isFinite(m.loss)).map((m) => [m.step, m.loss]) });
    const evals = d.metrics.filter((m) => Number.isFinite(m.eval_loss)).map((m) => [m.step, m.eval_loss]);
    if (evals.length) series.push({ name: `${tag} eval`, points: evals });
  });
  lineChart($("compare-chart"), series);
  $("compare-table").querySelector("tbody").innerHTML = details.map((d) => {
    const losses = d.metrics.filter((m) => Number.isFinite(m.loss));
    const evals = d.metrics.filter((m) => Number.isFinite(m.eval_loss)).map((m) => m.eval_loss);
    const last = losses[losses.length - 1];
    return `<tr><td>${esc(shortId(d.id))}</td><td>${statusBadge(d.status)}</td><td>${last ? last.step : 0}</td>
      <td>${last ? last.loss.toFixed(4) : ""}</td><td>${evals.length ? Math.min(...evals).toFixed(4) : ""}</td>
      <td>${esc(d.metrics[0]?.lr ?? "")}</td><td>${esc(d.hyperparameters.n_epochs)}</td></tr>`;
  }).join("");
});

// -- Data ------------------------------------------------------------------------------------------------

async function showData() {
  const files = await fileOptions($("data-file"));
  showFileStatus(files);
}

function showFileStatus(files) {
  const f = files.find((x) => x.id === $("data-file").value);
  $("data-file-status").textContent = f ? `${f.filename}: ${f.bytes} bytes, ${f.status}${f.status_details ? " — " + f.status_details : ""}` : "No files yet: upload one.";
}

$("data-file").addEventListener("change", async () => showFileStatus((await api("/v1/files?purpose=fine-tune&limit=100")).data));

$("data-upload").addEventListener("change", async (e) => {
  const file = e.target.files[0];
  if (!file) return;
  try { const row = await upload(file); showFileStatus(await fileOptions($("data-file"), { keep: row.id })); }
  catch (err) { $("data-error").textContent = err.message; }
  e.target.value = "";
});

$("data-preview-button").addEventListener("click", async () => {
  $("data-error").textContent = "";
  $("data-samples").innerHTML = ""; $("data-summary").textContent = ""; $("data-issues").innerHTML = "";
  try {
    const result = await post("/ui/api/data/preview", {
      file_id: $("data-file").value, method: $("data-method").value,
      seq_len: parseInt($("data-seq-len").value, 10) || 1024, train_on_prompt: $("data-train-on-prompt").checked, n: 5,
    });
    if (result.error) $("data-error").textContent = result.error;
    $("data-samples").innerHTML = result.samples.map((s, i) =>
      `<div class="sample"><div class="head">sample ${i + 1} of ${result.total_samples} (${esc(s.source)}, ${s.tokens} tokens, ${s.trained} trained${s.truncated ? ", truncated" : ""})</div>` +
      s.runs.map((r) => (r.trained ? `<span class="trained">${esc(r.text)}</span>` : esc(r.text))).join("") + "</div>").join("");
    $("data-summary").textContent = (result.summary || []).join("\n");
    const issues = result.issues.map((t) => `<li class="error">${esc(t)}</li>`).concat((result.notes || []).map((t) => `<li>note: ${esc(t)}</li>`));
    $("data-issues").innerHTML = issues.length ? issues.join("") : `<li>none: ${result.rows ?? 0} rows read, all valid</li>`;
  } catch (err) { $("data-error").textContent = err.message; }
});

// -- Chat ------------------------------------------------------------------------------------------------

const chats = { tuned: [], plain: [] };

async function showChat() {
  const models = await api("/v1/models");
  const tuned = models.data.filter((m) => m.id !== state.info.base);
  const current = $("chat-model").value;
  $("chat-model").innerHTML = tuned.length ? tuned.map((m) => `<option>${esc(m.id)}</option>`).join("") : '<option value="">(no finished run yet)</option>';
  if (tuned.some((m) => m.id === current)) $("chat-model").value = current;
  $("chat-base").value = state.info.base;
}

function renderChat(which) {
  $(`chat-${which}`).innerHTML = chats[which].map((m) => `<div class="msg ${m.role}">${esc(m.content)}</div>`).join("");
}

async function ask(which, model) {
  const body = {
    model, messages: chats[which], max_tokens: parseInt($("chat-max-tokens").value, 10) || 48,
    temperature: parseFloat($("chat-temperature").value) || 0,
  };
  const answer = await post("/v1/chat/completions", body);
  chats[which].push({ role: "assistant", content: answer.choices[0].message.content });
  renderChat(which);
}

$("chat-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const text = $("chat-input").value.trim();
  const model = $("chat-model").value;
  if (!text) return;
  if (!model) { $("chat-error").textContent = "No fine-tuned model yet: finish a run first."; return; }
  $("chat-error").textContent = ""; $("chat-input").value = ""; $("chat-send").disabled = true;
  for (const which of ["tuned", "plain"]) { chats[which].push({ role: "user", content: text }); renderChat(which); }
  try { await Promise.all([ask("tuned", model), ask("plain", state.info.base)]); }
  catch (err) { $("chat-error").textContent = err.message; }
  finally { $("chat-send").disabled = false; }
});

$("chat-clear").addEventListener("click", () => { chats.tuned = []; chats.plain = []; renderChat("tuned"); renderChat("plain"); });

// -- Export ----------------------------------------------------------------------------------------------

let exportTimer = null;

async function showExport() {
  const jobs = (await api("/v1/fine_tuning/jobs?limit=100")).data.filter((j) => j.status === "succeeded");
  const current = $("export-job").value;
  $("export-job").innerHTML = jobs.length ? jobs.map((j) => `<option value="${esc(j.id)}">${esc(j.fine_tuned_model)}</option>`).join("") : '<option value="">(no succeeded run yet)</option>';
  if (jobs.some((j) => j.id === current)) $("export-job").value = current;
  await loadExports();
}

async function loadExports() {
  clearTimeout(exportTimer);
  const id = $("export-job").value;
  if (!id) { $("export-table").querySelector("tbody").innerHTML = ""; return; }
  const records = (await api(`/ui/api/jobs/${id}/exports`)).data;
  $("export-table").querySelector("tbody").innerHTML = records.map((r) =>
    `<tr class="clickable" data-id="${esc(r.id)}"><td>${esc(r.id)}</td><td>${esc(r.kind)}${r.gguf_type ? " " + esc(r.gguf_type) : ""}</td>
     <td>${statusBadge(r.status)}</td><td>${r.check ? statusBadge(r.check) : ""}</td><td><small>${esc(r.out)}</small></td></tr>`).join("");
  document.querySelectorAll("#export-table tr.clickable").forEach((tr) => tr.addEventListener("click", () => {
    const r = records.find((x) => x.id === tr.dataset.id); $("export-output").textContent = r.output || "(running)";
  }));
  if (records[0]) $("export-output").textContent = records[0].output || "(running)";
  if (records.some((r) => r.status === "running") && state.tab === "export") exportTimer = setTimeout(() => loadExports().catch(() => {}), 1500);
}

$("export-job").addEventListener("change", () => loadExports());
$("export-button").addEventListener("click", async () => {
  $("export-error").textContent = "";
  try {
    await post(`/ui/api/jobs/${$("export-job").value}/exports`, {
      kind: $("export-kind").value, gguf_type: $("export-type").value, verify: $("export-verify").checked,
    });
    await loadExports();
  } catch (err) { $("export-error").textContent = err.message; }
});

// -- start -----------------------------------------------------------------------------------------------

async function start() {
  state.info = await api("/ui/api/info");
  $("base-name").textContent = `base: ${state.info.base}`;
  await setupTrain();
  route();
  document.body.dataset.ready = "1";
}

start().catch((err) => { document.body.insertAdjacentHTML("afterbegin", `<p class="error">${esc(err.message)}</p>`); });
