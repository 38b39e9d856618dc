// genart playground: talks to the JSON/PNG API next to this page (relative URLs, so any route prefix works).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "genart-api-key";
let apiKey = sessionStorage.getItem(KEY_STORE) || "";
let models = [];
const objectUrls = {};
let photoVersion = 0;  // bumped when another photo is chosen: late results of the old one are dropped
let guidanceMoved = false;
let genRequest = 0;  // the latest Generate or Interpolate click: both draw into one picture, the last one asked wins

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function askForKey(message) {
  $("auth").hidden = false;
  $("auth-msg").textContent = message;
  $("api-key").focus();
}

// fetch with the API key; a 401 shows the key field, any other error shows the server's JSON message
async function api(path, options = {}) {
  const headers = new Headers(options.headers || {});
  if (apiKey) headers.set("Authorization", "Bearer " + apiKey);
  const response = await fetch(path, { ...options, headers });
  if (response.ok) return response;
  let message = response.status + " " + response.statusText;
  try {
    const body = await response.json();
    const detail = Array.isArray(body.detail)
      ? body.detail.map((d) => (d.loc || []).slice(-1)[0] + ": " + d.msg).join("; ")
      : body.detail;
    message = body.error + (detail ? " — " + detail : "");
  } catch (_) { /* not JSON (e.g. a proxy page) */ }
  if (response.status === 401) {
    askForKey(apiKey ? "That key was refused. Check it and try again." : "This server needs an API key.");
  }
  const err = new Error(message);
  err.status = response.status;
  throw err;
}

function showImage(img, blob) {
  if (objectUrls[img.id]) URL.revokeObjectURL(objectUrls[img.id]);
  objectUrls[img.id] = URL.createObjectURL(blob);
  img.src = objectUrls[img.id];
}

async function busy(button, work) {
  button.disabled = true;
  showError("");
  try { await work(); } catch (err) { showError(err.message); } finally { button.disabled = false; }
}

function fillSelect(select, names) {
  select.replaceChildren(...names.map((n) => new Option(n, n)));
}

async function loadModels() {
  const body = await (await api("v1/models")).json();
  models = body.models;
  const of = (...families) => models.filter((m) => families.includes(m.family)).map((m) => m.name);
  const generators = models.filter((m) => m.generative).map((m) => m.name);  // the server says which families sample
  fillSelect($("gen-model"), generators);
  fillSelect($("style-model"), of("style"));
  $("generate").disabled = $("interpolate").disabled = !generators.length;
  $("stylize").disabled = !of("style").length;
  $("classify").disabled = !of("critic").length;
  $("search-card").hidden = !body.search;  // the server has no index: no search panel
  updateLabels();
}

function updateLabels() {
  const m = models.find((x) => x.name === $("gen-model").value);
  const conditional = Boolean(m && m.conditional && m.labels.length);
  $("label-wrap").hidden = !conditional;
  if (conditional) fillSelect($("gen-label"), ["(by seed)", ...m.labels]);
  // token models trained with a "no class" token take a guidance scale; the slider starts at the model's own
  $("guidance-wrap").hidden = !(m && m.guidance_trained);
  guidanceMoved = false;  // a request carries no guidance (the model's own) until the user moves the slider
  if (m && m.guidance_trained) {
    $("guidance").value = m.guidance;
    $("guid-out").value = Number(m.guidance).toFixed(2);
  }
}

function generateBody() {
  const body = {
    model: $("gen-model").value,
    seed: Number($("seed").value) || 0,
    n: Number($("n").value),
    truncation: Number($("truncation").value),
  };
  const label = $("gen-label").value;
  if (!$("label-wrap").hidden && label && label !== "(by seed)") body.label = label;
  if (!$("guidance-wrap").hidden && guidanceMoved) body.guidance = Number($("guidance").value);
  return body;
}

async function generate() {
  const mine = ++genRequest;
  const body = generateBody();
  const t0 = performance.now();
  const response = await api("v1/generate", {
    method: "POST", headers: { "Content-Type": "application/json", Accept: "image/png" }, body: JSON.stringify(body),
  });
  const blob = await response.blob();
  if (mine !== genRequest) return;  // a later click's picture is (or will be) shown
  showImage($("gen-img"), blob);
  const guided = body.guidance === undefined ? "" : ` · guidance ${body.guidance.toFixed(2)}`;
  $("gen-cap").textContent = `${body.model} · seeds ${body.seed}–${body.seed + body.n - 1}${guided} · ${Math.round(performance.now() - t0)} ms`;
}

async function interpolate() {
  const mine = ++genRequest;
  const seed = Number($("seed").value) || 0;
  const body = { model: $("gen-model").value, seed_a: seed, seed_b: seed + 1, steps: 16, format: "gif" };
  const response = await api("v1/interpolate", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const blob = await response.blob();
  if (mine !== genRequest) return;
  showImage($("gen-img"), blob);
  $("gen-cap").textContent = `${body.model} · walk from seed ${seed} to ${seed + 1}`;
}

function photoForm(model, extra = {}) {
  const file = $("photo").files[0];
  if (!file) throw new Error("Choose a photo first.");
  const form = new FormData();
  form.append("image", file);
  if (model) form.append("model", model);
  for (const [k, v] of Object.entries(extra)) form.append(k, v);
  return form;
}

async function stylize() {
  const style = $("style-model").value;
  const form = photoForm(style, { max_side: $("max-side").value });
  const t0 = performance.now(), asked = photoVersion;
  const response = await api("v1/stylize", { method: "POST", body: form });
  const blob = await response.blob();
  if (asked !== photoVersion) return;  // another photo was chosen meanwhile: this result is not for it
  showImage($("style-img"), blob);
  $("style-cap").textContent = `${style} · ${Math.round(performance.now() - t0)} ms`;
}

async function classify() {
  const asked = photoVersion;
  const body = await (await api("v1/classify", { method: "POST", body: photoForm(null) })).json();
  if (asked !== photoVersion) return;
  $("labels").replaceChildren(...body.labels.map(({ label, probability }) => {
    const li = document.createElement("li");
    const pct = (probability * 100).toFixed(1);
    li.innerHTML = `<span></span><span class="bar"><i style="width:${pct}%"></i></span><span class="p">${pct}%</span>`;
    li.firstChild.textContent = label;  // label names come from the checkpoint: never as HTML
    return li;
  }));
}

// ---- search: similar artworks and recommendations (thumbnails are API data: fetched with the key, shown as blobs)
const liked = new Set();
const hitUrls = {};

async function thumbnailInto(img, url, listId) {
  const blob = await (await api(url)).blob();
  const objectUrl = URL.createObjectURL(blob);
  hitUrls[listId].push(objectUrl);
  img.src = objectUrl;
}

function hitTile(hit, listId) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "hit";
  button.dataset.id = hit.id;
  button.title = "choose / unchoose: recommendations follow the chosen";
  button.setAttribute("aria-pressed", String(liked.has(hit.id)));
  const img = document.createElement("img");
  img.alt = hit.label || hit.id;
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(4);  // cosine similarity
  const label = document.createElement("span");
  label.className = "hit-label";
  label.textContent = hit.label || "";  // labels come from the archive: never as HTML
  button.append(img, score, label);
  button.addEventListener("click", () => toggleLiked(hit.id));
  thumbnailInto(img, hit.thumbnail_url, listId).catch((err) => showError(err.message));
  const li = document.createElement("li");
  li.append(button);
  return li;
}

function showHits(listId, hits) {
  (hitUrls[listId] || []).forEach((u) => URL.revokeObjectURL(u));
  hitUrls[listId] = [];
  $(listId).replaceChildren(...hits.map((hit) => hitTile(hit, listId)));
  $(listId + "-title").hidden = !hits.length;
}

function toggleLiked(id) {
  if (liked.has(id)) liked.delete(id); else liked.add(id);
  for (const tile of document.querySelectorAll(".hit")) {
    if (tile.dataset.id === id) tile.setAttribute("aria-pressed", String(liked.has(id)));
  }
  $("recommend").disabled = !liked.size;
  $("recommend").textContent = liked.size ? `Recommend more like these ${liked.size}` : "Recommend more like the chosen";
}

async function findSimilar() {
  const file = $("search-photo").files[0];
  if (!file) throw new Error("Choose an image first.");
  const form = new FormData();
  form.append("image", file);
  form.append("k", $("search-k").value);
  const t0 = performance.now();
  const body = await (await api("v1/similar", { method: "POST", body: form })).json();
  showHits("similar-results", body.results);
  $("search-cap").textContent = `${body.results.length} closest of ${body.index_size} indexed images · ` +
    `${Math.round(performance.now() - t0)} ms · click to choose the ones you like`;
}

async function recommend() {
  const body = { liked: [...liked], k: Number($("search-k").value), diversity: Number($("diversity").value) };
  const response = await api("v1/recommend", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const out = await response.json();
  showHits("recommend-results", out.results);
  $("search-cap").textContent = `${out.results.length} recommended from ${out.liked.length} chosen (variety ${body.diversity})`;
}

async function checkHealth() {
  try {
    const health = await (await fetch("healthz")).json();
    $("status").textContent = "server ok";
    $("status").className = "status ok";
    if (health.auth_required && !apiKey) askForKey("This server needs an API key.");
  } catch (_) {
    $("status").textContent = "server unreachable";
    $("status").className = "status bad";
  }
}

function wire() {
  $("n").addEventListener("input", () => { $("n-out").value = $("n").value; });
  $("truncation").addEventListener("input", () => { $("trunc-out").value = Number($("truncation").value).toFixed(2); });
  $("guidance").addEventListener("input", () => {
    guidanceMoved = true;
    $("guid-out").value = Number($("guidance").value).toFixed(2);
  });
  $("dice").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 1e6); });
  $("gen-model").addEventListener("change", updateLabels);
  $("generate").addEventListener("click", (e) => busy(e.currentTarget, generate));
  $("interpolate").addEventListener("click", (e) => busy(e.currentTarget, interpolate));
  $("stylize").addEventListener("click", (e) => busy(e.currentTarget, stylize));
  $("classify").addEventListener("click", (e) => busy(e.currentTarget, classify));
  $("photo").addEventListener("change", () => {  // a new photo: the old one's results go
    photoVersion += 1;
    const file = $("photo").files[0];
    if (file) showImage($("photo-img"), file);
    $("labels").replaceChildren();
    $("style-img").removeAttribute("src");
    $("style-cap").textContent = "stylized";
  });
  $("save-key").addEventListener("click", () => {
    apiKey = $("api-key").value.trim();
    sessionStorage.setItem(KEY_STORE, apiKey);
    $("auth-msg").textContent = "Checking…";
    loadModels().then(() => { $("auth").hidden = true; showError(""); }).catch((err) => showError(err.message));
  });
  $("diversity").addEventListener("input", () => { $("div-out").value = Number($("diversity").value).toFixed(2); });
  $("find-similar").addEventListener("click", (e) => busy(e.currentTarget, findSimilar));
  $("recommend").addEventListener("click", (e) => busy(e.currentTarget, recommend));
  $("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") $("save-key").click(); });
}

wire();
checkHealth();
loadModels().catch((err) => showError(err.message));
