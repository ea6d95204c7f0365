// freqar studio: plain JS, no build step. Talks to /api/models, /api/jobs and the job's PNGs.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { models: {}, polling: null };

function showError(field, message) {
  const box = $("error");
  box.textContent = field ? `${field}: ${message}` : message;
  box.hidden = false;
  document.querySelectorAll(".bad").forEach((el) => el.classList.remove("bad"));
  const id = field && field.startsWith("knobs.") ? "knob-" + field.slice(6) : field;
  if (id && $(id)) $(id).classList.add("bad");
}

function clearError() {
  $("error").hidden = true;
  document.querySelectorAll(".bad").forEach((el) => el.classList.remove("bad"));
}

function fillModel() {
  const m = state.models[$("model").value];
  if (!m) return;
  $("model-info").textContent = `${m.family}, ${m.image_size}px, ${m.num_stages} stages, ${m.num_classes} classes`;
  const label = $("label");
  label.innerHTML = "";
  label.append(new Option("random (from seed)", ""));
  for (let i = 0; i < m.num_classes; i++) {
    const name = m.class_names ? m.class_names[i] : null;
    label.append(new Option(name ? `${i}: ${name}` : String(i), String(i)));
  }
  for (const k of ["cfg", "top_k", "top_p", "temperature"]) $(k).value = m.defaults[k];
  const accel = $("accel");
  const before = accel.value;
  accel.innerHTML = "";
  for (const a of Object.keys(m.accel)) accel.append(new Option(a, a));
  if (m.accel[before] !== undefined) accel.value = before;
  else if (m.accel.sparsevar !== undefined) accel.value = "sparsevar";
  fillKnobs();
}

function fillKnobs() {
  const m = state.models[$("model").value];
  const knobs = m ? m.accel[$("accel").value] || {} : {};
  const box = $("knobs");
  box.innerHTML = "";
  for (const [name, def] of Object.entries(knobs)) {
    const lab = document.createElement("label");
    lab.textContent = name + " ";
    const inp = document.createElement("input");
    inp.id = "knob-" + name;
    inp.dataset.knob = name;
    inp.dataset.list = Array.isArray(def) ? "1" : "";
    inp.placeholder = def === null ? "auto" : String(def);
    lab.append(inp);
    box.append(lab);
  }
  $("compare").disabled = $("accel").value === "none";
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function requestBody() {
  const body = {
    model: $("model").value,
    label: $("label").value === "" ? null : Number($("label").value),
    seed: numberOrNull("seed"),
    cfg: numberOrNull("cfg"),
    top_k: numberOrNull("top_k"),
    top_p: numberOrNull("top_p"),
    temperature: numberOrNull("temperature"),
    accel: $("accel").value,
    compare: $("accel").value !== "none" && $("compare").checked,
  };
  const knobs = {};
  document.querySelectorAll("#knobs input").forEach((inp) => {
    const v = inp.value.trim();
    if (v === "") return;
    knobs[inp.dataset.knob] = inp.dataset.list ? v.split(",").map(Number) : Number(v);
  });
  if (body.accel !== "none") body.knobs = knobs;
  return body;
}

function setProgress(view) {
  const p = view.progress;
  const phases = view.settings.compare ? 2 : 1;
  const done = (p.phase === "accelerated" && phases === 2 ? p.num_stages : 0) + p.stages.length;
  const total = Math.max(1, phases * (p.num_stages || 1));
  $("progress").hidden = false;
  const last = p.stages[p.stages.length - 1];
  const where = last ? `stage ${last.stage + 1}/${p.num_stages} (${last.grid[0]}x${last.grid[1]})` : "";
  $("phase").textContent = view.status === "queued" ? "queued…" : `${p.phase || "starting"} ${where}`;
  $("bar-fill").style.width = `${Math.round((100 * done) / total)}%`;
}

function ms(s) {
  return (1000 * s).toFixed(1);
}

function render(view) {
  $("progress").hidden = true;
  $("image").src = view.image;
  $("image-fig").hidden = false;
  $("image-caption").textContent =
    `${view.settings.accel === "none" ? "dense" : view.settings.accel} · label ${view.label}` +
    (view.class_name ? ` (${view.class_name})` : "") + ` · seed ${view.seed}`;
  if (view.dense) {
    $("dense-image").src = view.dense.image;
    $("dense-fig").hidden = false;
  } else {
    $("dense-fig").hidden = true;
  }
  if (view.masks) {
    $("masks").src = view.masks;
    $("masks-fig").hidden = false;
  } else {
    $("masks-fig").hidden = true;
  }
  const tbody = $("timings").querySelector("tbody");
  tbody.innerHTML = "";
  view.stages.forEach((s, i) => {
    const d = view.dense ? view.dense.stages[i] : null;
    const tr = document.createElement("tr");
    const cells = [s.stage, `${s.grid[0]}x${s.grid[1]}`, `${s.tokens}/${s.total}`, ms(s.seconds),
      d ? `${d.tokens}/${d.total}` : "", d ? ms(d.seconds) : ""];
    for (const c of cells) {
      const td = document.createElement("td");
      td.textContent = c;
      tr.append(td);
    }
    tbody.append(tr);
  });
  $("timings").classList.toggle("with-dense", !!view.dense);
  $("timings").hidden = false;
  let text = `transformer ${ms(view.transformer_seconds)} ms · decode ${ms(view.decode_seconds)} ms · ` +
    `tokens ${view.tokens_computed}/${view.tokens_total}`;
  if (view.compare) {
    const c = view.compare;
    text += ` · speed-up ×${c.speedup.toFixed(2)} (tokens ×${c.token_ratio.toFixed(2)})` +
      ` · PSNR ${c.psnr === null ? "∞ (identical)" : c.psnr.toFixed(2) + " dB"} · SSIM ${c.ssim.toFixed(4)}`;
  }
  $("summary").textContent = text;
  $("summary").hidden = false;
  $("settings").textContent = JSON.stringify(view.settings, null, 2);
  $("settings-box").hidden = false;
}

async function poll(id) {
  const res = await fetch(`/api/jobs/${id}`, { cache: "no-store" });
  const view = await res.json();
  if (!res.ok) throw new Error(view.error ? view.error.message : res.statusText);
  if (view.status === "done") {
    render(view);
    return true;
  }
  if (view.status === "error") {
    showError(null, view.error.message);
    $("progress").hidden = true;
    return true;
  }
  setProgress(view);
  return false;
}

async function generate(ev) {
  ev.preventDefault();
  clearError();
  const button = $("generate");
  button.disabled = true;
  document.body.dataset.busy = "1";
  try {
    const res = await fetch("/api/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(requestBody()),
    });
    const view = await res.json();
    if (res.status === 503) {
      showError(null, `${view.error.message} (Retry-After ${res.headers.get("Retry-After")} s)`);
      return;
    }
    if (!res.ok) {
      showError(view.error.field, view.error.message);
      return;
    }
    $("seed").value = view.seed;
    setProgress(view);
    for (;;) {
      if (await poll(view.id)) break;
      await new Promise((r) => setTimeout(r, 150));
    }
  } catch (e) {
    showError(null, String(e));
  } finally {
    button.disabled = false;
    delete document.body.dataset.busy;
  }
}

async function init() {
  const res = await fetch("/api/models");
  const data = await res.json();
  for (const m of data.models) {
    state.models[m.name] = m;
    $("model").append(new Option(m.name, m.name));
  }
  $("model").addEventListener("change", fillModel);
  $("accel").addEventListener("change", fillKnobs);
  $("dice").addEventListener("click", () => ($("seed").value = Math.floor(Math.random() * 2 ** 31)));
  $("form").addEventListener("submit", generate);
  fillModel();
  document.body.dataset.ready = "1";
}

init().catch((e) => showError(null, `cannot load models: ${e}`));
