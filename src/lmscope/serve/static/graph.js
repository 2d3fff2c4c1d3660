// lmscope serve: the graph explorer. Loaded after app.js, whose helpers (el, $, postJSON,
// showError, showToken, featureHref) it uses. Drawn as plain SVG; text only via textContent.
"use strict";

const SVGNS = "http://www.w3.org/2000/svg";
const PER_ROW = 6; // nodes side by side in one (layer, position) cell before wrapping
const STEP = 16; // px between nodes of a cell
const LEFT = 56; // room for the layer labels

const graph = {
  doc: null, // the graph document (/api/graph or /api/graphs/<slug>)
  pinned: new Set(), // node ids
  supernodes: [], // [{name, nodes: [ids]}]
  clamp: new Map(), // pinned feature id -> {mode, value}
  contexts: new Map(), // "sae:latent" -> top contexts (a promise)
};

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function nodeById() {
  return new Map(graph.doc.nodes.map((n) => [n.id, n]));
}

// -- pruning in the browser -----------------------------------------------------------------
// The server pruned at the slider's maximum and sent every kept node's influence: keep the most
// influential until they carry `threshold` of the whole graph's influence (tokens and logits
// always), then the edges between kept nodes, then drop features and errors left without an
// outgoing edge and features without an incoming one (docs/circuits.md, "Pruning"). Pinned nodes
// and supernode members always stay.
function prune(doc, threshold) {
  const total = doc.explorer.influence_total || doc.nodes.reduce((s, n) => s + Math.max(n.influence, 0), 0);
  const forced = new Set(graph.pinned);
  for (const s of graph.supernodes) s.nodes.forEach((id) => forced.add(id));
  const keep = new Set();
  let cum = 0;
  for (const n of [...doc.nodes].sort((a, b) => b.influence - a.influence)) {
    if (n.kind === "token" || n.kind === "logit" || forced.has(n.id) || cum < threshold * total) keep.add(n.id);
    cum += Math.max(n.influence, 0);
  }
  const kind = new Map(doc.nodes.map((n) => [n.id, n.kind]));
  let edges = [];
  for (;;) {
    edges = doc.edges.filter((e) => keep.has(e.source) && keep.has(e.target));
    const out = new Set(edges.map((e) => e.source));
    const inn = new Set(edges.map((e) => e.target));
    const drop = [...keep].filter((id) => {
      if (forced.has(id)) return false;
      const k = kind.get(id);
      return (k === "feature" || k === "error") && (!out.has(id) || (k === "feature" && !inn.has(id)));
    });
    if (!drop.length) break;
    drop.forEach((id) => keep.delete(id));
  }
  return { nodes: doc.nodes.filter((n) => keep.has(n.id)), edges };
}

// -- layout: positions left to right, layers bottom (tokens) to top (logits) -----------------
function layout(doc, nodes) {
  const T = doc.tokens.length;
  const L = doc.n_layers;
  const cells = new Map();
  for (const n of nodes) {
    if (n.kind !== "feature" && n.kind !== "error") continue;
    const key = `${n.layer}|${n.position}`;
    if (!cells.has(key)) cells.set(key, []);
    cells.get(key).push(n);
  }
  const perPos = new Array(T).fill(1);
  const perLayer = new Array(L).fill(1);
  for (const [key, list] of cells) {
    const [layer, pos] = key.split("|").map(Number);
    perPos[pos] = Math.max(perPos[pos], Math.min(PER_ROW, list.length));
    perLayer[layer] = Math.max(perLayer[layer], Math.ceil(list.length / PER_ROW));
  }
  const colW = perPos.map((k) => Math.max(64, 16 + STEP * k));
  const colX = [];
  colW.reduce((x, w, i) => ((colX[i] = x), x + w), LEFT);
  const width = Math.max(LEFT + colW.reduce((a, b) => a + b, 0) + 64, 480); // + room for a supernode's name
  const rowH = [34, ...perLayer.map((k) => Math.max(40, 16 + STEP * k)), 34]; // tokens, layers, logits
  const height = rowH.reduce((a, b) => a + b, 0) + 8;
  const rowTop = (layer) => {
    // layer -1 = tokens (bottom row), L = logits (top row)
    let y = 4;
    for (let r = L; r > layer; r--) y += rowH[r + 1];
    return y;
  };
  const pos = new Map();
  for (const [key, list] of cells) {
    const [layer, p] = key.split("|").map(Number);
    list.sort((a, b) => b.influence - a.influence);
    const used = STEP * Math.min(PER_ROW, list.length);
    const lines = Math.ceil(list.length / PER_ROW);
    const x0 = colX[p] + (colW[p] - used) / 2 + STEP / 2;
    const y0 = rowTop(layer) + (rowH[layer + 1] - STEP * lines) / 2 + STEP / 2;
    list.forEach((n, k) => pos.set(n.id, [x0 + STEP * (k % PER_ROW), y0 + STEP * Math.floor(k / PER_ROW)]));
  }
  const logits = nodes.filter((n) => n.kind === "logit");
  const logitW = Math.min(120, (width - LEFT) / Math.max(1, logits.length));
  logits.forEach((n, k) => pos.set(n.id, [LEFT + logitW * (k + 0.5), rowTop(L) + rowH[L + 1] / 2]));
  for (const n of nodes) {
    if (n.kind === "token") pos.set(n.id, [colX[n.position] + colW[n.position] / 2, rowTop(-1) + rowH[0] / 2]);
  }
  return { pos, width, height, colX, colW, rowTop, rowH, logitW };
}

// -- drawing ----------------------------------------------------------------------------------
function draw() {
  const doc = graph.doc;
  const threshold = Number($("node-threshold").value);
  $("threshold-value").textContent = `${Math.round(threshold * 100)}%`;
  const { nodes, edges } = prune(doc, threshold);
  const g = layout(doc, nodes);
  const root = svgEl("svg", { id: "graph-svg", width: g.width, height: g.height, viewBox: `0 0 ${g.width} ${g.height}`, role: "img" });
  // layer labels and bands
  for (let layer = -1; layer <= doc.n_layers; layer++) {
    const y = g.rowTop(layer);
    const name = layer < 0 ? "tokens" : layer === doc.n_layers ? "logits" : `L${layer}`;
    if (layer >= 0 && layer < doc.n_layers && layer % 2 === 0) {
      root.append(svgEl("rect", { x: LEFT, y, width: g.width - LEFT, height: g.rowH[layer + 1], class: "band" }));
    }
    root.append(svgEl("text", { x: 4, y: y + g.rowH[layer + 1] / 2 + 4, class: "tick" }, name));
  }
  const maxIn = new Map();
  for (const e of edges) maxIn.set(e.target, Math.max(maxIn.get(e.target) || 0, Math.abs(e.weight)));
  const edgeLayer = svgEl("g", { class: "edges" });
  for (const e of edges) {
    const [x1, y1] = g.pos.get(e.source);
    const [x2, y2] = g.pos.get(e.target);
    const w = 0.3 + 2.4 * (Math.abs(e.weight) / (maxIn.get(e.target) || 1));
    const line = svgEl("line", { x1, y1, x2, y2, "stroke-width": w.toFixed(2), class: e.weight >= 0 ? "edge pos" : "edge neg" });
    line.dataset.source = e.source;
    line.dataset.target = e.target;
    edgeLayer.append(line);
  }
  root.append(edgeLayer);
  drawSupernodes(root, g);
  const maxInfl = Math.max(1e-12, ...nodes.filter((n) => n.kind === "feature" || n.kind === "error").map((n) => n.influence));
  const nodeLayer = svgEl("g", { class: "nodes" });
  for (const n of nodes) nodeLayer.append(drawNode(n, g, maxInfl));
  root.append(nodeLayer);
  $("graph-canvas").replaceChildren(root);
  const features = nodes.filter((n) => n.kind === "feature").length;
  const count = $("node-count");
  count.textContent = `${nodes.length} of ${doc.nodes.length} nodes (${features} features), ${edges.length} edges`;
  count.dataset.nodes = String(nodes.length);
}

function drawNode(n, g, maxInfl) {
  const [x, y] = g.pos.get(n.id);
  const member = graph.supernodes.findIndex((s) => s.nodes.includes(n.id));
  const cls = ["node", n.kind, graph.pinned.has(n.id) ? "pinned" : "", member >= 0 ? `member k${member % 6}` : ""];
  const node = svgEl("g", { class: cls.join(" ").trim(), tabindex: 0 });
  node.dataset.id = n.id;
  const r = 3 + 4.5 * Math.sqrt(Math.max(n.influence, 0) / maxInfl);
  if (n.kind === "feature") {
    node.append(svgEl("circle", { cx: x, cy: y, r: r.toFixed(2) }));
  } else if (n.kind === "error") {
    node.append(svgEl("rect", { x: x - r, y: y - r, width: 2 * r, height: 2 * r }));
  } else {
    const w = n.kind === "token" ? g.colW[n.position] - 8 : g.logitW - 8;
    const text = n.kind === "token" ? showToken(n.token) : `${showToken(n.token)} ${(100 * n.probability).toFixed(0)}%`;
    node.append(svgEl("rect", { x: x - w / 2, y: y - 11, width: w, height: 22, rx: 3 }));
    const label = svgEl("text", { x, y: y + 4, "text-anchor": "middle" }, text.length > 14 ? text.slice(0, 13) + "…" : text);
    node.append(label);
  }
  node.addEventListener("mouseenter", (ev) => {
    showTooltip(n, ev);
    focusEdges(n.id);
  });
  node.addEventListener("mousemove", (ev) => placeTooltip(ev));
  node.addEventListener("mouseleave", () => {
    hideTooltip();
    focusEdges(null);
  });
  node.addEventListener("click", (ev) => {
    if (ev.shiftKey) return togglePin(n.id);
    if (n.kind === "feature") window.open(featureHref(n.sae, n.latent), "_blank", "noopener");
  });
  return node;
}

// While a node is hovered its own edges stand out and the rest fade (ids are [FETL][0-9.]+).
function focusEdges(id) {
  const root = $("graph-svg");
  if (!root) return;
  root.querySelectorAll("line.hot").forEach((l) => l.classList.remove("hot"));
  root.classList.toggle("focus", id !== null);
  if (id !== null) root.querySelectorAll(`line[data-source="${id}"], line[data-target="${id}"]`).forEach((l) => l.classList.add("hot"));
}

function drawSupernodes(root, g) {
  graph.supernodes.forEach((s, k) => {
    const pts = s.nodes.map((id) => g.pos.get(id)).filter(Boolean);
    if (!pts.length) return;
    const xs = pts.map((p) => p[0]);
    const ys = pts.map((p) => p[1]);
    const box = svgEl("g", { class: `supernode k${k % 6}` });
    box.dataset.name = s.name;
    const x = Math.min(...xs) - 11;
    const y = Math.min(...ys) - 11;
    box.append(svgEl("rect", { x, y, width: Math.max(...xs) - x + 11, height: Math.max(...ys) - y + 11, rx: 6 }));
    box.append(svgEl("text", { x, y: y - 3 }, s.name));
    root.append(box);
  });
}

// -- hover: label and top contexts ------------------------------------------------------------
function showTooltip(n, ev) {
  const tip = $("graph-tooltip");
  tip.replaceChildren();
  const where = n.kind === "logit" ? "" : ` at “${showToken(n.token)}” (position ${n.position})`;
  tip.append(el("div", { class: "tt-title" }, `${n.id}${where}`));
  if (n.kind === "feature") {
    tip.append(el("div", { class: "tt-label label" }, n.label || "no label yet (lmscope explain)"));
    tip.append(el("div", { class: "muted" }, `${n.sae} #${n.latent} · activation ${n.activation.toFixed(3)} · influence ${n.influence.toFixed(4)}`));
    const box = el("div", { class: "tt-contexts" }, "loading top contexts…");
    tip.append(box);
    topContexts(n).then((examples) => {
      if (!tip.isConnected || tip.dataset.id !== n.id) return;
      box.replaceChildren();
      if (!examples.length) box.textContent = "no top contexts (lmscope interpret)";
      for (const ex of examples) {
        const line = el("div", { class: "ctx" });
        ex.tokens.forEach((t, i) => line.append(i === ex.center ? el("b", {}, showToken(t)) : document.createTextNode(t)));
        box.append(line);
      }
    });
  } else if (n.kind === "logit") {
    tip.append(el("div", {}, `next token “${showToken(n.token)}”, p = ${n.probability.toFixed(3)}`));
  } else {
    const what = n.kind === "error" ? "error: what the transcoder misses of this MLP output" : "token embedding";
    tip.append(el("div", { class: "muted" }, `${what} · influence ${n.influence.toFixed(4)}`));
  }
  tip.dataset.id = n.id;
  tip.hidden = false;
  placeTooltip(ev);
}

function placeTooltip(ev) {
  const tip = $("graph-tooltip");
  tip.style.left = `${Math.min(ev.clientX + 14, window.innerWidth - 380)}px`;
  tip.style.top = `${ev.clientY + 14}px`;
}

function hideTooltip() {
  $("graph-tooltip").hidden = true;
}

function topContexts(n) {
  const key = `${n.sae}:${n.latent}`;
  if (!graph.contexts.has(key)) {
    const url = `/api/saes/${encodeURIComponent(n.sae)}/features/${n.latent}`;
    graph.contexts.set(key, fetch(url).then((r) => (r.ok ? r.json() : { top: [] })).then((f) => f.top.slice(0, 3)).catch(() => []));
  }
  return graph.contexts.get(key);
}

// -- pins, supernodes, steering ---------------------------------------------------------------
function togglePin(id) {
  if (graph.pinned.has(id)) graph.pinned.delete(id);
  else graph.pinned.add(id);
  renderSide();
  draw();
}

function renderSide() {
  const nodes = nodeById();
  const list = $("pinned");
  list.replaceChildren();
  for (const id of graph.pinned) {
    const n = nodes.get(id);
    const li = el("li", { "data-id": id });
    li.append(el("code", {}, id), document.createTextNode(" "));
    if (n.kind === "feature") {
      li.append(el("span", { class: "label" }, n.label || ""), document.createTextNode(" "));
      const c = graph.clamp.get(id) || { mode: "ablate", value: 0 };
      graph.clamp.set(id, c);
      const mode = el("select", { class: "clamp-mode" });
      for (const [v, t] of [["ablate", "ablate"], ["multiply", "× activation"], ["set", "set to"]]) mode.append(el("option", { value: v }, t));
      mode.value = c.mode;
      const value = el("input", { class: "clamp-value", type: "number", step: "any", value: String(c.value) });
      value.hidden = c.mode === "ablate";
      mode.addEventListener("change", () => {
        c.mode = mode.value;
        value.hidden = c.mode === "ablate";
        if (c.mode === "multiply" && !c.value) value.value = c.value = 2;
      });
      value.addEventListener("change", () => (c.value = Number(value.value)));
      li.append(mode, value);
    }
    const x = el("button", { type: "button", class: "unpin", title: "unpin" }, "✕");
    x.addEventListener("click", () => togglePin(id));
    li.append(x);
    list.append(li);
  }
  if (!graph.pinned.size) list.append(el("li", { class: "muted" }, "shift-click nodes to pin them"));
  const sn = $("supernodes");
  sn.replaceChildren();
  graph.supernodes.forEach((s, k) => {
    const li = el("li", { class: `k${k % 6}` });
    li.append(el("b", { class: "supernode-name" }, s.name), document.createTextNode(` ${s.nodes.join(", ")} `));
    const pin = el("button", { type: "button", title: "pin its nodes" }, "pin");
    pin.addEventListener("click", () => {
      s.nodes.forEach((id) => graph.pinned.add(id));
      renderSide();
      draw();
    });
    const ungroup = el("button", { type: "button", title: "ungroup" }, "✕");
    ungroup.addEventListener("click", () => {
      graph.supernodes.splice(k, 1);
      renderSide();
      draw();
    });
    li.append(pin, ungroup);
    sn.append(li);
  });
  if (!graph.supernodes.length) sn.append(el("li", { class: "muted" }, "none"));
}

function groupPinned() {
  const name = $("supernode-name").value.trim();
  if (graph.pinned.size < 2) return showError("pin at least two nodes (shift-click) to group them");
  if (!name) return showError("name the supernode");
  showError("");
  const taken = new Set(graph.supernodes.flatMap((s) => s.nodes));
  const nodes = [...graph.pinned].filter((id) => !taken.has(id));
  if (nodes.length < 2) return showError("those nodes already belong to a supernode");
  graph.supernodes.push({ name, nodes });
  nodes.forEach((id) => graph.pinned.delete(id));
  $("supernode-name").value = "";
  renderSide();
  draw();
}

async function steerPinned() {
  const nodes = nodeById();
  const features = [...graph.pinned].map((id) => nodes.get(id)).filter((n) => n.kind === "feature").map((n) => {
    const c = graph.clamp.get(n.id) || { mode: "ablate", value: 0 };
    const value = c.mode === "ablate" ? 0 : c.mode === "multiply" ? c.value * n.activation : c.value;
    return { layer: n.layer, position: n.position, latent: n.latent, value };
  });
  if (!features.length) return showError("pin feature nodes (shift-click) to clamp or ablate them");
  let data;
  try {
    data = await postJSON("/api/graph/steer", { prompt: graph.doc.prompt, features });
  } catch (e) {
    return showError(e.message);
  }
  for (const [side, list] of [["before", $("steer-before")], ["after", $("steer-after")]]) {
    list.replaceChildren();
    for (const t of data[side]) {
      const li = el("li");
      const delta = side === "after" ? ` (was ${(100 * t.other).toFixed(1)}%)` : ` (then ${(100 * t.other).toFixed(1)}%)`;
      li.append(el("code", { class: "t" }, showToken(t.token)), document.createTextNode(` ${(100 * t.probability).toFixed(1)}%${delta}`));
      list.append(li);
    }
  }
  $("steer-kl").textContent = `KL(before ‖ after) ${data.kl.toFixed(4)} nats, ${features.length} feature(s) clamped`;
  $("steer-result").hidden = false;
}

// -- save and load ----------------------------------------------------------------------------
async function saveGraph() {
  const name = $("save-name").value.trim();
  if (!name) return showError("name the graph to save it");
  const annotations = { node_threshold: Number($("node-threshold").value), pinned: [...graph.pinned], supernodes: graph.supernodes };
  let data;
  try {
    data = await postJSON("/api/graphs", { name, key: graph.doc.key, annotations });
  } catch (e) {
    return showError(e.message);
  }
  const msg = $("save-message");
  msg.replaceChildren(document.createTextNode(`saved as ${data.path} · `), el("a", { href: `/graph?saved=${encodeURIComponent(data.slug)}`, id: "saved-link" }, "reload"));
  history.replaceState(null, "", `/graph?saved=${encodeURIComponent(data.slug)}`);
  const list = $("saved-graphs");
  list.querySelectorAll("li").forEach((li) => {
    const a = li.querySelector("a");
    if (!a || a.getAttribute("href") === `/graph?saved=${encodeURIComponent(data.slug)}`) li.remove();
  });
  const li = el("li");
  li.append(el("a", { href: `/graph?saved=${encodeURIComponent(data.slug)}` }, data.name), document.createTextNode(` “${graph.doc.prompt}” · ${graph.doc.nodes.length} nodes · ${data.saved}`));
  list.prepend(li);
}

function show(doc) {
  graph.doc = doc;
  const notes = doc.annotations || {};
  const ids = new Set(doc.nodes.map((n) => n.id));
  graph.pinned = new Set((notes.pinned || []).filter((id) => ids.has(id)));
  graph.supernodes = (notes.supernodes || []).map((s) => ({ name: s.name, nodes: s.nodes.filter((id) => ids.has(id)) }));
  graph.clamp = new Map();
  const slider = $("node-threshold");
  slider.max = String(doc.pruning.node_threshold);
  slider.value = String(notes.node_threshold ?? doc.pruning.node_threshold);
  $("graph-prompt").value = doc.prompt;
  if (notes.name) $("save-name").value = notes.name;
  const s = doc.scores;
  const top = doc.logits.length ? ` · next token “${showToken(doc.logits[0].token)}” ${(100 * doc.logits[0].probability).toFixed(1)}%` : "";
  $("graph-scores").textContent = `replacement score ${s.replacement.toFixed(3)} · completeness ${s.completeness.toFixed(3)}${top}`;
  $("steer-result").hidden = true;
  $("save-message").textContent = "";
  $("graph-view").hidden = false;
  renderSide();
  draw();
}

async function trace(prompt) {
  try {
    show(await postJSON("/api/graph", { prompt }));
    history.replaceState(null, "", `/graph?prompt=${encodeURIComponent(prompt)}`);
  } catch (e) {
    showError(e.message);
  }
}

async function loadSaved(slug) {
  showError("");
  try {
    const resp = await fetch(`/api/graphs/${encodeURIComponent(slug)}`, { headers: { accept: "application/json" } });
    const data = await resp.json();
    if (!resp.ok) throw new Error(data.error || `the server answered ${resp.status}`);
    show(data);
  } catch (e) {
    showError(e.message);
  }
}

function setupGraph() {
  const form = $("graph-form");
  if (!form) return;
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    trace($("graph-prompt").value);
  });
  $("node-threshold").addEventListener("input", () => graph.doc && draw());
  $("group").addEventListener("click", groupPinned);
  $("steer").addEventListener("click", steerPinned);
  $("save").addEventListener("click", saveGraph);
  if (form.dataset.saved) loadSaved(form.dataset.saved);
  else if (form.dataset.autostart) trace($("graph-prompt").value);
}

document.addEventListener("DOMContentLoaded", setupGraph);
