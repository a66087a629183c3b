// The line's page: live parts, review with marks, the threshold. Plain JavaScript, no build.
// Names are user data: they only ever go in as text (textContent), never as HTML.
// The tokens live in this page's memory only (no cookie, no storage): a reload asks again.
"use strict";

const state = { token: null, model: null, offset: 0, rows: [], selected: 0, thumbs: new Map() };
const $ = (id) => document.getElementById(id);
const VERDICT = { good: "\u2714 good", anomalous: "\u2716 anomalous", error: "! error" };
const MARK = { false_alarm: "false alarm", defect: "defect" };
const PAGE = 50;

async function api(path, options = {}, token = state.token) {
  const headers = Object.assign({}, options.headers || {});
  if (token) headers.Authorization = "Bearer " + token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (ignored) { /* not JSON */ }
    throw new Error(response.status + ": " + detail);
  }
  return response;
}

function say(message) { $("status").textContent = message || ""; }

function element(tag, text, className) {
  const made = document.createElement(tag);
  if (text !== undefined && text !== null) made.textContent = String(text);
  if (className) made.className = className;
  return made;
}

async function overlayInto(img, part) {
  if (!part.overlay_url) { img.alt = "overlay " + (part.overlay_state || "none"); return; }
  if (!state.thumbs.has(part.id)) {
    const blob = await (await api(part.overlay_url)).blob();
    state.thumbs.set(part.id, URL.createObjectURL(blob));
  }
  img.src = state.thumbs.get(part.id);
}

async function imageInto(img, part) {
  const blob = await (await api(part.image_url)).blob();
  if (state.original) URL.revokeObjectURL(state.original);
  state.original = URL.createObjectURL(blob);
  img.src = state.original;
}

function forgetThumbs(keep) {  // a page left open all shift must not grow: only what is shown
  for (const [id, url] of state.thumbs) {
    if (!keep.has(id) && !(state.open && state.open.id === id)) {
      URL.revokeObjectURL(url);
      state.thumbs.delete(id);
    }
  }
}

function openPart(part) {
  const img = $("detail-image");
  img.removeAttribute("src");
  state.open = part;
  const toggle = $("heatmap");
  toggle.hidden = !part.image_url;  // the image as received, only where the record keeps it
  toggle.setAttribute("aria-pressed", "true");
  toggle.textContent = "heatmap on (h)";
  overlayInto(img, part).catch((error) => say(error.message));
  $("detail-text").textContent =
    `${part.name || "(no name)"}: ${VERDICT[part.verdict] || part.verdict}, score ` +
    `${fixed(part.score)} (threshold ${fixed(part.threshold)})`;
  $("detail").showModal();
}

function fixed(value) { return value === null || value === undefined ? "-" : Number(value).toFixed(4); }

// ------------------------------------------------------------------ live

async function live() {
  const [found, shift, alarms] = await Promise.all([
    (await api("/v1/parts?limit=24")).json(),
    (await api("/v1/shift")).json(),
    (await api("/v1/alarms")).json(),
  ]);
  const banner = $("alarms");
  banner.replaceChildren();
  const NAMES = { quiet: "\u26A0 No parts", run: "\u26A0 Anomalous run", drift: "\u26A0 Drift" };
  for (const [name, alarm] of Object.entries(alarms)) {
    if (alarm.active) banner.append(element("p", `${NAMES[name] || name}: ${alarm.detail}`, "alarm " + name));
  }
  const counts = $("counts");
  counts.replaceChildren();
  for (const [key, label] of [["good", "good"], ["anomalous", "anomalous"], ["error", "errors"]]) {
    const item = element("span", label + " ", key);
    item.prepend(element("strong", shift.counts[key] + " "));
    counts.append(item);
  }
  counts.append(element("span", `${shift.per_minute.toFixed(1)} parts/min`));
  forgetThumbs(new Set(found.parts.map((part) => part.id)));
  const grid = $("parts");
  grid.replaceChildren();
  for (const part of found.parts) {
    const card = element("figure", null, "card " + part.verdict);
    card.dataset.part = part.id;
    const img = element("img");
    img.alt = "overlay of " + (part.name || "a part");
    const caption = element("figcaption");
    caption.append(element("div", VERDICT[part.verdict] || part.verdict, "verdict " + part.verdict));
    caption.append(element("div", "score " + fixed(part.score)));
    caption.append(element("div", part.name || "(no name)", "name"));
    card.append(img, caption);
    card.addEventListener("click", () => openPart(part));
    grid.append(card);
    overlayInto(img, part).catch(() => {});
  }
}

// ------------------------------------------------------------------ review

function filters() {
  const query = new URLSearchParams({ limit: PAGE, offset: state.offset, order: $("order").value });
  for (const key of ["verdict", "mark"]) if ($(key).value) query.set(key, $(key).value);
  for (const key of ["since", "until"]) {
    if ($(key).value) query.set(key, new Date($(key).value).getTime() / 1000);
  }
  return query;
}

async function review() {
  const found = await (await api("/v1/parts?" + filters())).json();
  state.rows = found.parts;
  forgetThumbs(new Set(found.parts.map((part) => part.id)));
  state.selected = Math.min(state.selected, Math.max(0, state.rows.length - 1));
  const body = $("table").tBodies[0];
  body.replaceChildren();
  state.rows.forEach((part, index) => {
    const row = element("tr", null, index === state.selected ? "selected" : "");
    row.dataset.part = part.id;
    row.append(
      element("td", new Date(part.time * 1000).toLocaleString()),
      element("td", part.name || "(no name)"),
      element("td", fixed(part.score)),
      element("td", VERDICT[part.verdict] || part.verdict, "verdict " + part.verdict),
      element("td", MARK[part.current_mark] || "", "mark"),
    );
    const actions = element("td");
    for (const [mark, label] of [["false_alarm", "false alarm"], ["defect", "defect"], [null, "undo"]]) {
      const button = element("button", label);
      button.type = "button";
      button.dataset.mark = mark === null ? "undo" : mark;
      button.addEventListener("click", () => markPart(part, mark));
      actions.append(button);
    }
    row.append(actions);
    row.addEventListener("dblclick", () => openPart(part));
    body.append(row);
  });
  $("page").textContent = `parts ${state.offset + 1}-${state.offset + state.rows.length}`;
}

async function exportParts(kind) {
  const query = filters();
  query.delete("limit");
  query.delete("offset");
  const blob = await (await api(`/v1/parts.${kind}?${query}`)).blob();
  const link = element("a");
  link.href = URL.createObjectURL(blob);
  link.download = kind === "csv" ? "parts.csv" : "overlays.zip";
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 60000);
}

async function markPart(part, mark) {
  await api(`/v1/parts/${part.id}/mark`, {
    method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ mark }),
  });
  await review();
}

function reviewKeys(event) {
  if ($("review").hidden || event.target.closest("input, select") || $("detail").open) return;
  const part = state.rows[state.selected];
  const actions = {
    j: () => { state.selected = Math.min(state.selected + 1, state.rows.length - 1); review(); },
    k: () => { state.selected = Math.max(state.selected - 1, 0); review(); },
    Enter: () => part && openPart(part),
    f: () => part && markPart(part, "false_alarm"),
    d: () => part && markPart(part, "defect"),
    u: () => part && markPart(part, null),
  };
  if (actions[event.key]) { event.preventDefault(); Promise.resolve(actions[event.key]()).catch((e) => say(e.message)); }
}

// ------------------------------------------------------------------ threshold

async function threshold() {
  if (!state.model) state.model = Object.keys(await (await api("/v1/models")).json())[0];
  if (!state.model) { say("the threshold view needs the service (stpm-serve), not stpm-review"); return; }
  const share = Number($("share").value);
  const base = `/v1/models/${encodeURIComponent(state.model)}/validation`;
  const [validation, recorded, defects, alarms] = await Promise.all([
    (await api(`${base}?max_false_alarms=${share}`)).json(),
    (await api("/v1/parts?limit=500")).json(),
    (await api("/v1/parts?limit=500&mark=defect")).json(),
    (await api("/v1/parts?limit=500&mark=false_alarm")).json(),
  ]);
  const candidate = validation.candidate;
  const above = (parts) => parts.filter((p) => p.score !== null && p.score > candidate).length;
  $("share-out").textContent = (100 * share).toFixed(1) + " %";
  $("candidate").textContent = fixed(candidate);
  $("current").textContent = fixed(validation.threshold);
  $("caught").textContent = `${above(defects.parts)} of ${defects.parts.length}`;
  $("raised").textContent = `${above(alarms.parts)} of ${alarms.parts.length}`;
  draw(validation.scores, recorded.parts, defects.parts, alarms.parts, candidate);
}

function draw(validation, recorded, defects, alarms, candidate) {
  const canvas = $("histogram");
  const context = canvas.getContext("2d");
  const scores = (parts) => parts.map((p) => p.score).filter((s) => s !== null);
  const all = [...validation, ...scores(recorded), candidate];
  const low = Math.min(...all), high = Math.max(...all) * 1.02 || 1;
  const bins = 60, width = canvas.width / bins;
  const at = (value) => Math.min(bins - 1, Math.floor(((value - low) / (high - low)) * bins));
  const count = (values) => { const c = new Array(bins).fill(0); values.forEach((v) => c[at(v)]++); return c; };
  const series = [
    [count(validation), "#999"], [count(scores(recorded)), "#3b6fd4"],
    [count(scores(defects)), "#b3001b"], [count(scores(alarms)), "#e08a00"],
  ];
  const top = Math.max(1, ...series.map(([c]) => Math.max(...c)));
  context.clearRect(0, 0, canvas.width, canvas.height);
  series.forEach(([c, colour], index) => {
    context.fillStyle = colour;
    c.forEach((n, bin) => {
      const h = (n / top) * (canvas.height - 20);
      context.fillRect(bin * width + index * (width / 4), canvas.height - h, width / 4, h);
    });
  });
  context.fillStyle = "#000";
  context.fillRect(((candidate - low) / (high - low)) * canvas.width, 0, 2, canvas.height);
}

async function apply(event) {
  event.preventDefault();
  const field = $("admin-token");
  const token = field.value.trim();
  field.value = "";  // not kept, not even in this page
  try {
    const record = await (await api(`/v1/models/${encodeURIComponent(state.model)}/threshold`, {
      method: "PUT", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ max_false_alarms: Number($("share").value), note: "from the page" }),
    }, token)).json();
    $("applied").textContent = `threshold ${fixed(record.threshold)} applied`;
    await threshold();
  } catch (error) {
    $("applied").textContent = "not applied: " + error.message;
  }
}

// ------------------------------------------------------------------ the page

const VIEWS = { live, review, threshold };
let current = "live";

function show(view) {
  current = view;
  for (const name of Object.keys(VIEWS)) {
    $(name).hidden = name !== view;
    $("tab-" + name).setAttribute("aria-pressed", String(name === view));
  }
  refresh();
}

function refresh() { VIEWS[current]().then(() => say(""), (error) => say(error.message)); }

document.querySelectorAll("nav button").forEach((b) => b.addEventListener("click", () => show(b.dataset.view)));
$("login").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("token").value.trim() || null;
  $("token").value = "";
  refresh();
});
$("filters").addEventListener("submit", (event) => { event.preventDefault(); state.offset = 0; refresh(); });
$("previous").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE); refresh(); });
$("next").addEventListener("click", () => { if (state.rows.length === PAGE) { state.offset += PAGE; refresh(); } });
let pending = null;
$("share").addEventListener("input", () => { clearTimeout(pending); pending = setTimeout(refresh, 150); });
$("apply").addEventListener("submit", apply);
for (const kind of ["csv", "zip"]) {
  $("export-" + kind).addEventListener("click", () => exportParts(kind).catch((e) => say(e.message)));
}
$("close").addEventListener("click", () => $("detail").close());
function toggleHeatmap() {
  const toggle = $("heatmap"), part = state.open;
  if (!part || !part.image_url) return;
  const on = toggle.getAttribute("aria-pressed") !== "true";
  toggle.setAttribute("aria-pressed", String(on));
  toggle.textContent = on ? "heatmap on (h)" : "heatmap off (h)";
  (on ? overlayInto($("detail-image"), part) : imageInto($("detail-image"), part)).catch((e) => say(e.message));
}
$("heatmap").addEventListener("click", toggleHeatmap);
document.addEventListener("keydown", (event) => { if ($("detail").open && event.key === "h") toggleHeatmap(); });
document.addEventListener("keydown", reviewKeys);
setInterval(() => { if (current === "live" && !$("detail").open) refresh(); }, 1000);
show("live");
