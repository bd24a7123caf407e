// The web page: load an image, paint the mask, pick a method and its options, run a job with live
// progress (Server-Sent Events), compare before/after, download, and keep a history of this session.
// Plain ES modules, no build step, nothing loaded from outside this server.

import { MaskPainter } from "./painter.js";

const API = "/api/v1";
const $ = (id) => document.getElementById(id);

const state = {
  config: null, // GET /api/v1/methods
  image: null, // { blob, url, width, height, name }
  job: null, // { id, events, poll, startedAt }
  history: [], // { url, blob, inputUrl, method, seed, parameters, timings, jobId, index }
  shown: null,
  guidanceTouched: false, // a guidance the user set is kept when the method changes
};

const painter = new MaskPainter($("mask-canvas"), $("brush-cursor"), updateControls);

// ---------------------------------------------------------------------------------------- startup

init();

async function init() {
  bindTools();
  bindSettings();
  bindCompare();
  try {
    const response = await fetch(`${API}/methods`);
    if (!response.ok) throw new Error(await errorText(response));
    state.config = await response.json();
    applyConfig(state.config);
  } catch (err) {
    showError(`Could not reach the server: ${err.message}`);
  }
  refreshHealth();
  setInterval(refreshHealth, 15000);
  new ResizeObserver(fitCanvas).observe($("stage"));
  window.addEventListener("resize", fitCanvas);
}

function applyConfig(config) {
  const methodSelect = $("method");
  methodSelect.replaceChildren(
    ...config.methods.map((m) => new Option(m.name, m.name, false, m.name === config.default_method)),
  );
  const schedulerSelect = $("scheduler");
  const defaults = config.request_defaults;
  schedulerSelect.replaceChildren(
    ...config.schedulers.map((s) => new Option(s, s, false, s === defaults.scheduler)),
  );
  setRange("steps", defaults.steps);
  // null: each method's base family decides (SD1.5 7.5, SDXL 5.0); set in renderMethodOptions
  if (defaults.guidance_scale != null) setRange("guidance", defaults.guidance_scale);
  $("blend").checked = defaults.blend;
  $("mask-grow").value = defaults.mask_grow;
  $("crop-to-mask").checked = defaults.crop_to_mask;
  $("num-images").value = defaults.num_images;
  renderMethodOptions();
  updateControls();
}

async function refreshHealth() {
  const el = $("server-status");
  try {
    const response = await fetch(`${API}/health`);
    const health = await response.json();
    el.className = "status ok";
    const busy = health.running + health.queued;
    el.textContent = busy ? `busy · ${health.running} running, ${health.queued} queued` : "ready";
    el.title = `Methods: ${health.methods.join(", ")} · devices: ${health.workers.join(", ")}`;
  } catch {
    el.className = "status bad";
    el.textContent = "offline";
  }
}

// ---------------------------------------------------------------------------------------- image

async function setImage(blob, name, { keepMask = false } = {}) {
  hideError();
  const url = URL.createObjectURL(blob);
  let img;
  try {
    img = await loadImg(url);
  } catch {
    URL.revokeObjectURL(url);
    showError(`${name || "This file"} is not an image the browser can read.`);
    return;
  }
  const { naturalWidth: width, naturalHeight: height } = img;
  const limit = state.config?.limits?.max_pixels;
  if (limit && width * height > limit) {
    URL.revokeObjectURL(url);
    showError(`The image is ${width}×${height}; the server accepts at most ${limit.toLocaleString()} pixels.`);
    return;
  }
  const canvas = $("image-canvas");
  const sameSize = state.image && state.image.width === width && state.image.height === height;
  canvas.width = width;
  canvas.height = height;
  canvas.getContext("2d").drawImage(img, 0, 0);
  // Send exactly the pixels shown (EXIF rotation applied): PNGs as they are, other formats re-encoded.
  const upload = blob.type === "image/png" ? blob : await new Promise((r) => canvas.toBlob(r, "image/png"));
  // the old input's URL stays while the history or a running job (its "before" image) uses it
  const inUse = state.history.some((h) => h.inputUrl === state.image?.url) || state.job?.input === state.image;
  if (state.image && !inUse) {
    URL.revokeObjectURL(state.image.url);
  }
  state.image = { blob: upload, url, width, height, name: name || "image" };
  $("image-info").textContent = `${width}×${height}`;
  $("dropzone").hidden = true;
  $("canvas-wrap").hidden = false;
  if (!(keepMask && sameSize)) painter.reset(width, height);
  fitCanvas();
  updateControls();
}

/** Show the image as large as the stage allows (small images scaled up, large ones down), aspect kept. */
function fitCanvas() {
  if (!state.image) return;
  const stage = $("stage");
  const style = getComputedStyle(stage);
  const available = stage.clientWidth - parseFloat(style.paddingLeft) - parseFloat(style.paddingRight);
  const maxHeight = Math.max(240, Math.min(window.innerHeight * 0.7, 900));
  const scale = Math.min(available / state.image.width, maxHeight / state.image.height);
  const wrap = $("canvas-wrap");
  wrap.style.width = `${Math.floor(state.image.width * scale)}px`;
  wrap.style.height = `${Math.floor(state.image.height * scale)}px`;
}

function loadImg(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = reject;
    img.src = url;
  });
}

async function loadMaskFile(file) {
  if (!state.image) return showError("Open an image first, then its mask.");
  const url = URL.createObjectURL(file);
  try {
    const img = await loadImg(url);
    if (img.naturalWidth !== state.image.width || img.naturalHeight !== state.image.height) {
      showError(
        `The mask is ${img.naturalWidth}×${img.naturalHeight} but the image is ` +
          `${state.image.width}×${state.image.height}; they must match.`,
      );
      return;
    }
    hideError();
    painter.loadMask(img);
  } catch {
    showError(`${file.name} is not an image the browser can read.`);
  } finally {
    URL.revokeObjectURL(url);
  }
}

// ---------------------------------------------------------------------------------------- tools

function bindTools() {
  for (const id of ["image-input", "image-input-2"]) {
    $(id).addEventListener("change", (e) => {
      const file = e.target.files[0];
      if (file) setImage(file, file.name);
      e.target.value = "";
    });
  }
  $("mask-input").addEventListener("change", (e) => {
    const file = e.target.files[0];
    if (file) loadMaskFile(file);
    e.target.value = "";
  });

  const stage = $("stage");
  stage.addEventListener("dragover", (e) => {
    e.preventDefault();
    stage.classList.add("over");
  });
  stage.addEventListener("dragleave", () => stage.classList.remove("over"));
  stage.addEventListener("drop", (e) => {
    e.preventDefault();
    stage.classList.remove("over");
    const file = [...e.dataTransfer.files].find((f) => f.type.startsWith("image/"));
    if (file) setImage(file, file.name);
  });
  window.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData?.items || [])].find((i) => i.type.startsWith("image/"));
    if (item) setImage(item.getAsFile(), "pasted image");
  });

  const setTool = (erasing) => {
    painter.erasing = erasing;
    $("tool-brush").classList.toggle("active", !erasing);
    $("tool-eraser").classList.toggle("active", erasing);
    $("tool-brush").setAttribute("aria-pressed", String(!erasing));
    $("tool-eraser").setAttribute("aria-pressed", String(erasing));
  };
  $("tool-brush").addEventListener("click", () => setTool(false));
  $("tool-eraser").addEventListener("click", () => setTool(true));
  const size = $("brush-size");
  const setSize = (value) => {
    size.value = value;
    painter.size = Number(size.value);
    $("brush-size-value").textContent = size.value;
  };
  size.addEventListener("input", () => setSize(size.value));
  setSize(size.value);
  $("undo").addEventListener("click", () => painter.undo());
  $("clear-mask").addEventListener("click", () => painter.clear());
  $("invert-mask").addEventListener("click", () => painter.invert());

  window.addEventListener("keydown", (e) => {
    if (e.target.closest("input, textarea, select")) return;
    if ((e.ctrlKey || e.metaKey) && e.key.toLowerCase() === "z") {
      e.preventDefault();
      painter.undo();
    } else if (e.key === "b") setTool(false);
    else if (e.key === "e") setTool(true);
    else if (e.key === "[") setSize(Number(size.value) - 5);
    else if (e.key === "]") setSize(Number(size.value) + 5);
  });
}

function updateControls() {
  const ready = Boolean(state.image && state.config);
  const hasMask = ready && painter.hasMask();
  $("undo").disabled = !painter.canUndo;
  for (const id of ["clear-mask", "invert-mask"]) $(id).disabled = !state.image;
  const running = Boolean(state.job);
  const generate = $("generate");
  generate.disabled = !ready || !hasMask || running;
  generate.textContent = running ? "Working…" : "Generate";
  generate.title = !state.image ? "Open an image first" : !hasMask ? "Paint the area to replace" : "";
  $("cancel").hidden = !running;
}

// ---------------------------------------------------------------------------------------- settings

function setRange(id, value) {
  $(id).value = value;
  $(`${id}-value`).textContent = $(id).value;
}

function bindSettings() {
  for (const id of ["steps", "guidance"]) {
    $(id).addEventListener("input", () => ($(`${id}-value`).textContent = $(id).value));
  }
  $("guidance").addEventListener("input", () => (state.guidanceTouched = true));
  $("seed-random").addEventListener("click", () => {
    $("seed").value = Math.floor(Math.random() * 2 ** 31);
  });
  $("method").addEventListener("change", renderMethodOptions);
  $("settings").addEventListener("submit", (e) => {
    e.preventDefault();
    generate();
  });
  $("cancel").addEventListener("click", cancelJob);
  $("use-result").addEventListener("click", () => {
    if (state.shown) setImage(state.shown.blob, "result", { keepMask: true });
  });
}

function currentMethod() {
  return state.config?.methods.find((m) => m.name === $("method").value);
}

/** Build the method's option inputs from its JSON schema (GET /api/v1/methods). */
function renderMethodOptions() {
  const method = currentMethod();
  const box = $("method-options");
  box.replaceChildren();
  if (!method) return;
  $("method-description").textContent = method.description;
  if (!state.guidanceTouched && state.config.request_defaults.guidance_scale == null) {
    setRange("guidance", method.default_guidance_scale);
  }
  // a brushnet served with a guide ControlNet needs a control image with every request
  $("control-image-field").hidden = !method.control_image;
  // the schedulers this method takes (repaint, hd-painter: ddim only); keep the chosen one where it is allowed
  const schedulers = method.schedulers || state.config.schedulers;
  const chosen = $("scheduler").value;
  const selected = schedulers.includes(chosen) ? chosen : method.default_scheduler;
  $("scheduler").replaceChildren(...schedulers.map((s) => new Option(s, s, false, s === selected)));
  const props = method.options_schema.properties || {};
  const names = Object.keys(props);
  $("method-options-box").querySelector("summary").textContent =
    names.length ? `Method options (${names.length})` : "Method options (none)";
  for (const name of names) {
    const spec = resolveSchema(props[name], method.options_schema);
    const value = method.options_defaults[name] ?? spec.default;
    const label = document.createElement("label");
    label.className = spec.type === "boolean" ? "field check" : "field";
    label.title = spec.description || "";
    const caption = document.createElement("span");
    caption.textContent = spec.title || name;
    let input;
    if (spec.enum) {
      input = document.createElement("select");
      input.append(...spec.enum.map((v) => new Option(String(v), String(v), false, v === value)));
    } else if (spec.type === "boolean") {
      input = document.createElement("input");
      input.type = "checkbox";
      input.checked = Boolean(value);
    } else if (spec.type === "integer" || spec.type === "number") {
      input = document.createElement("input");
      input.type = "number";
      input.step = spec.type === "integer" ? "1" : "any";
      if (spec.minimum !== undefined) input.min = spec.minimum;
      if (spec.maximum !== undefined) input.max = spec.maximum;
      input.value = value ?? "";
      if (spec.nullable) input.placeholder = "default";
    } else {
      input = document.createElement("input");
      input.type = "text";
      input.value = value ?? "";
    }
    input.dataset.option = name;
    input.dataset.kind = spec.type || "string";
    if (spec.nullable) input.dataset.nullable = "1";
    if (spec.type === "boolean") label.append(input, caption);
    else label.append(caption, input);
    if (spec.description) {
      const help = document.createElement("small");
      help.className = "muted";
      help.textContent = spec.description;
      label.append(help);
    }
    box.append(label);
  }
}

function resolveSchema(spec, root) {
  if (spec.$ref) {
    const name = spec.$ref.split("/").pop();
    return { ...root.$defs?.[name], ...spec, $ref: undefined };
  }
  if (spec.anyOf) {
    const real = spec.anyOf.find((s) => s.type !== "null") || {};
    const nullable = spec.anyOf.some((s) => s.type === "null");
    return { ...resolveSchema(real, root), ...spec, anyOf: undefined, nullable };
  }
  return spec;
}

function collectOptions() {
  const options = {};
  for (const input of $("method-options").querySelectorAll("[data-option]")) {
    const kind = input.dataset.kind;
    let value;
    if (kind === "boolean") value = input.checked;
    else if (input.value === "" && input.dataset.nullable) value = null;
    else if (kind === "integer" || kind === "number") value = Number(input.value);
    else value = input.value;
    options[input.dataset.option] = value;
  }
  return options;
}

function requestBody() {
  const body = {
    method: $("method").value,
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value,
    steps: Number($("steps").value),
    guidance_scale: Number($("guidance").value),
    blend: $("blend").checked,
    scheduler: $("scheduler").value,
    mask_grow: Number($("mask-grow").value || 0),
    crop_to_mask: $("crop-to-mask").checked,
    num_images: Number($("num-images").value || 1),
    options: collectOptions(),
  };
  const seed = $("seed").value.trim();
  if (seed !== "") body.seed = Number(seed);
  return body;
}

// ---------------------------------------------------------------------------------------- jobs

async function generate() {
  if (state.job || !state.image) return;
  hideError();
  const control = currentMethod()?.control_image ? $("control-image").files[0] : null;
  if (currentMethod()?.control_image && !control) {
    return showError("This method needs a control image (Method options).");
  }
  // The job exists from the first moment, before any await: a second click (a double-click) finds it and
  // sends nothing, and a Cancel during the upload finishes this job, which the code below then notices.
  const input = state.image;
  const job = { id: null, startedAt: performance.now(), input };
  state.job = job;
  updateControls();
  setProgress(0, 0, "Uploading…");
  const form = new FormData();
  form.append("image", input.blob, "image.png");
  form.append("mask", await painter.toMaskBlob(), "mask.png");
  form.append("request", JSON.stringify(requestBody()));
  if (control) form.append("control_image", control, control.name);
  if (state.job !== job) return; // cancelled before anything was sent
  let response;
  try {
    response = await fetch(`${API}/inpaint`, { method: "POST", body: form });
  } catch (err) {
    if (state.job === job) finishJob(`Upload failed: ${err.message}`);
    return;
  }
  if (state.job !== job) {
    // Cancelled while uploading: the server queued it all the same; cancel it there too.
    if (response.ok) {
      const queued = await response.json();
      fetch(`${API}/jobs/${queued.job_id}`, { method: "DELETE" }).catch(() => {});
    }
    return;
  }
  if (!response.ok) return finishJob(await errorText(response));
  const queued = await response.json();
  if (state.job !== job) {
    fetch(`${API}/jobs/${queued.job_id}`, { method: "DELETE" }).catch(() => {});
    return;
  }
  job.id = queued.job_id;
  setProgress(0, 0, "Waiting in the queue…");
  followJob(queued);
}

function followJob(queued) {
  const job = state.job;
  const events = new EventSource(queued.events_url);
  job.events = events;
  const onStatus = (status) => {
    if (state.job !== job) return;
    if (status.state === "running" || status.state === "queued") {
      const { step, total } = status.progress;
      setProgress(step, total, status.state === "queued" ? "Waiting in the queue…" : null);
    } else if (status.state === "done") {
      events.close();
      showJobResult(status, job);
    } else {
      events.close();
      finishJob(status.error || `Job ${status.state}.`);
    }
  };
  for (const name of ["progress", "done", "failed", "cancelled"]) {
    events.addEventListener(name, (e) => onStatus(JSON.parse(e.data)));
  }
  events.onerror = () => {
    // The stream dropped (proxy, network): fall back to polling the job.
    events.close();
    if (state.job !== job || job.poll) return;
    job.poll = setInterval(async () => {
      try {
        const response = await fetch(queued.status_url);
        if (!response.ok) {
          clearInterval(job.poll);
          return finishJob(await errorText(response));
        }
        const status = await response.json();
        if (["done", "failed", "cancelled"].includes(status.state)) clearInterval(job.poll);
        onStatus(status);
      } catch {
        /* keep polling */
      }
    }, 500);
  };
}

async function cancelJob() {
  const job = state.job;
  if (!job) return;
  if (!job.id) return finishJob("Cancelled.");
  try {
    await fetch(`${API}/jobs/${job.id}`, { method: "DELETE" });
  } catch {
    /* the stream reports the outcome */
  }
}

async function showJobResult(status, job) {
  const result = status.result;
  const entries = [];
  try {
    for (const [index, url] of result.images.entries()) {
      const response = await fetch(url);
      if (!response.ok) throw new Error(await errorText(response));
      const blob = await response.blob();
      entries.push({
        url: URL.createObjectURL(blob),
        blob,
        inputUrl: job.input.url,
        method: result.method,
        seed: result.parameters.seeds?.[index] ?? result.seed,
        parameters: result.parameters,
        timings: result.timings,
        jobId: status.job_id,
        index,
      });
    }
  } catch (err) {
    return finishJob(`Could not fetch the result: ${err.message}`);
  }
  const seconds = (performance.now() - job.startedAt) / 1000;
  finishJob(null, `Done in ${seconds.toFixed(1)} s`);
  for (const entry of entries) addToHistory(entry);
  showEntry(entries[0]);
  refreshHealth();
}

function finishJob(error, message) {
  const job = state.job;
  if (job?.events) job.events.close();
  if (job?.poll) clearInterval(job.poll);
  state.job = null;
  updateControls();
  if (error) {
    $("progress").hidden = true;
    showError(error);
  } else {
    setProgress(1, 1, message);
    $("progress").classList.add("complete");
  }
}

function setProgress(step, total, label) {
  const bar = $("progress");
  bar.hidden = false;
  bar.classList.remove("complete");
  const fraction = total ? step / total : 0;
  $("progress-bar").style.width = `${(fraction * 100).toFixed(1)}%`;
  $("progress-label").textContent = label ?? `Step ${step} / ${total}`;
  bar.setAttribute("aria-valuenow", String(Math.round(fraction * 100)));
}

// ---------------------------------------------------------------------------------------- results

function bindCompare() {
  const slider = $("compare-slider");
  const apply = () => {
    const pos = Number(slider.value);
    $("compare-after").style.clipPath = `inset(0 ${100 - pos}% 0 0)`;
    $("compare-handle").style.left = `${pos}%`;
  };
  slider.addEventListener("input", apply);
  apply();
}

function showEntry(entry) {
  state.shown = entry;
  const compare = $("compare");
  compare.classList.remove("empty");
  compare.style.aspectRatio = `${entry.parameters.image_size[0]} / ${entry.parameters.image_size[1]}`;
  $("compare-empty").hidden = true;
  $("compare-before").src = entry.inputUrl;
  $("compare-after").src = entry.url;
  for (const id of ["compare-before", "compare-after", "compare-handle", "compare-slider"]) $(id).hidden = false;
  const p = entry.parameters;
  $("result-info").textContent =
    `${entry.method} · seed ${entry.seed} · ${p.steps} steps · ${entry.timings.total_s.toFixed(1)} s`;
  const download = $("download");
  download.href = entry.url;
  download.download = `brushnet-${entry.method}-${entry.seed}.png`;
  download.hidden = false;
  $("use-result").hidden = false;
  for (const button of $("history").querySelectorAll("button")) {
    button.classList.toggle("current", button.entry === entry);
  }
}

function addToHistory(entry) {
  state.history.unshift(entry);
  $("history-empty").hidden = true;
  const button = document.createElement("button");
  button.type = "button";
  button.entry = entry;
  button.title = `${entry.method}, seed ${entry.seed}: ${entry.parameters.prompt || "(no prompt)"}`;
  const img = document.createElement("img");
  img.src = entry.url;
  img.alt = button.title;
  const tag = document.createElement("span");
  tag.className = "tag";
  tag.textContent = entry.parameters.prompt || `seed ${entry.seed}`;
  button.append(img, tag);
  button.addEventListener("click", () => showEntry(entry));
  $("history").prepend(button);
  $("history-count").textContent = String(state.history.length);
}

// ---------------------------------------------------------------------------------------- errors

async function errorText(response) {
  try {
    const body = await response.json();
    const message = body.error ?? body.detail;
    return typeof message === "string" ? message : JSON.stringify(message);
  } catch {
    return `HTTP ${response.status} ${response.statusText}`;
  }
}

function showError(message) {
  const el = $("error");
  el.textContent = message;
  el.hidden = false;
}

function hideError() {
  $("error").hidden = true;
}
