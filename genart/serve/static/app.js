// genart playground: talks to the JSON/PNG API next to this page (relative URLs, so any route prefix works).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "genart-api-key";
let apiKey = sessionStorage.getItem(KEY_STORE) || "";
let models = [];
const objectUrls = {};
let guidanceMoved = false;
// Requests that draw into one place: a later click, or a new input, supersedes the earlier ones, whose results and
// errors are then dropped. Generate and Walk share the picture; stylize and classify belong to the chosen photo.
const latest = { gen: 0, photo: 0, search: 0, recommend: 0 };
const MAX_LIKED = 100;  // the API's cap on a recommendation's chosen images (genart.serve.config.MAX_LIKED)

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
    if (apiKey) sessionStorage.removeItem(KEY_STORE);  // not sent again after a reload
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

// Runs one click's work with its button disabled. `stale()` says the click was superseded: its error is not shown
// (the work itself drops its result). `ready()` says whether the button may be pressed again afterwards.
async function busy(button, work, stale = () => false, ready = () => true) {
  button.disabled = true;
  button.dataset.busy = "1";
  showError("");
  try { await work(); } catch (err) { if (!stale()) showError(err.message); } finally {
    delete button.dataset.busy;
    button.disabled = !ready();
  }
}

function enable(id, ok) {  // a button in use stays disabled until its request ends
  $(id).disabled = !ok || $(id).dataset.busy === "1";
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
  enable("generate", generators.length);
  enable("interpolate", generators.length);
  enable("stylize", of("style").length);
  enable("classify", of("critic").length);
  $("search-card").hidden = !body.search;  // the server has no index: no search panel
  const maxSide = body.limits.max_side;  // the server's own cap: a larger choice would be refused
  const sides = [256, 512, 768, 1024].filter((v) => v <= maxSide);
  if (!sides.length || sides[sides.length - 1] < maxSide) sides.push(maxSide);
  fillSelect($("max-side"), sides.map(String));
  $("max-side").value = String(sides.includes(512) ? 512 : sides[sides.length - 1]);
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

function chosenLabel() {  // the class picker's value, or undefined for the seed's own class
  const label = $("gen-label").value;
  return !$("label-wrap").hidden && label && label !== "(by seed)" ? label : undefined;
}

function generateBody() {
  const body = {
    model: $("gen-model").value,
    seed: Number($("seed").value) || 0,
    n: Number($("n").value),
    truncation: Number($("truncation").value),
  };
  if (chosenLabel() !== undefined) body.label = chosenLabel();
  if (!$("guidance-wrap").hidden && guidanceMoved) body.guidance = Number($("guidance").value);
  return body;
}

async function generate(ticket) {
  const body = generateBody();
  const t0 = performance.now();
  const response = await api("v1/generate", {
    method: "POST", headers: { "Content-Type": "application/json", Accept: "image/png" }, body: JSON.stringify(body),
  });
  const blob = await response.blob();
  if (ticket !== latest.gen) return;  // a later click's picture is (or will be) shown
  showImage($("gen-img"), blob);
  const guided = body.guidance === undefined ? "" : ` · guidance ${body.guidance.toFixed(2)}`;
  $("gen-cap").textContent = `${body.model} · seeds ${body.seed}–${body.seed + body.n - 1}${guided} · ${Math.round(performance.now() - t0)} ms`;
}

const MAX_SEED = 4294967295;

async function interpolate(ticket) {
  const seed = Math.min(Number($("seed").value) || 0, MAX_SEED);
  const next = seed === MAX_SEED ? 0 : seed + 1;
  const body = { model: $("gen-model").value, seed_a: seed, seed_b: next, steps: 16, format: "gif" };
  if (chosenLabel() !== undefined) body.label = chosenLabel();  // the walk stays in the grid's class
  const response = await api("v1/interpolate", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const blob = await response.blob();
  if (ticket !== latest.gen) return;
  showImage($("gen-img"), blob);
  $("gen-cap").textContent = `${body.model} · walk from seed ${seed} to ${next}`;
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

async function stylize(photo) {
  const style = $("style-model").value;
  const form = photoForm(style, { max_side: $("max-side").value });
  const t0 = performance.now();
  const response = await api("v1/stylize", { method: "POST", body: form });
  const blob = await response.blob();
  if (photo !== latest.photo) return;  // another photo was chosen meanwhile: this result is not for it
  showImage($("style-img"), blob);
  $("style-cap").textContent = `${style} · ${Math.round(performance.now() - t0)} ms`;
}

async function classify(photo) {
  const body = await (await api("v1/classify", { method: "POST", body: photoForm(null) })).json();
  if (photo !== latest.photo) return;
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
  // relative, as every URL of this page: the server's thumbnail_url is root-absolute, which a proxy that strips a
  // path prefix (nginx /genart/ -> Serve /) breaks
  thumbnailInto(img, `v1/index/thumbnails/${encodeURIComponent(hit.id)}.jpg`, listId).catch((err) => showError(err.message));
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
  if (liked.has(id)) liked.delete(id);
  else if (liked.size >= MAX_LIKED) return showError(`At most ${MAX_LIKED} chosen images; clear some first.`);
  else liked.add(id);
  showLiked();
}

function clearLiked() {
  liked.clear();
  showLiked();
}

function showLiked() {
  for (const tile of document.querySelectorAll(".hit")) tile.setAttribute("aria-pressed", String(liked.has(tile.dataset.id)));
  enable("recommend", liked.size);
  $("clear-liked").hidden = !liked.size;
  $("recommend").textContent = liked.size ? `Recommend more like these ${liked.size}` : "Recommend more like the chosen";
}

async function findSimilar(ticket) {
  const file = $("search-photo").files[0];
  if (!file) throw new Error("Choose an image first.");
  const form = new FormData();
  form.append("image", file);
  form.append("k", $("search-k").value);
  const t0 = performance.now();
  const body = await (await api("v1/similar", { method: "POST", body: form })).json();
  if (ticket !== latest.search) return;  // another image was chosen, or searched for, meanwhile
  showHits("similar-results", body.results);
  $("search-cap").textContent = `${body.results.length} closest of ${body.index_size} indexed images · ` +
    `${Math.round(performance.now() - t0)} ms · click to choose the ones you like`;
}

async function recommend(ticket) {
  const body = { liked: [...liked], k: Number($("search-k").value), diversity: Number($("diversity").value) };
  const response = await api("v1/recommend", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const out = await response.json();
  if (ticket !== latest.recommend) return;
  showHits("recommend-results", out.results);
  $("search-cap").textContent = `${out.results.length} recommended from ${out.liked.length} chosen (variety ${body.diversity})`;
}

async function checkHealth() {
  try {
    const response = await fetch("healthz");
    if (!response.ok) throw new Error(response.statusText);
    const health = await response.json();
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
  // one click = one request on its channel; `ticket` tells the work (and busy) whether a later one superseded it
  const onClick = (id, channel, work, { bump = true, ready } = {}) => $(id).addEventListener("click", (e) => {
    const ticket = bump ? ++latest[channel] : latest[channel];
    busy(e.currentTarget, () => work(ticket), () => ticket !== latest[channel], ready);
  });
  onClick("generate", "gen", generate);
  onClick("interpolate", "gen", interpolate);
  onClick("stylize", "photo", stylize, { bump: false });  // stylize and classify of one photo do not supersede each other
  onClick("classify", "photo", classify, { bump: false });
  onClick("find-similar", "search", findSimilar);
  onClick("recommend", "recommend", recommend, { ready: () => liked.size > 0 });
  $("clear-liked").addEventListener("click", clearLiked);
  $("search-photo").addEventListener("change", () => {  // a new image: the old one's results go
    latest.search += 1;
    showHits("similar-results", []);
  });
  $("photo").addEventListener("change", () => {  // a new photo: the old one's results go
    latest.photo += 1;
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
  $("api-key").addEventListener("keydown", (e) => { if (e.key === "Enter") $("save-key").click(); });
}

wire();
checkHealth();
loadModels().catch((err) => showError(err.message));
