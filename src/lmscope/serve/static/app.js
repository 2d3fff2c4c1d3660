// lmscope serve: the inspector and the steering playground call the JSON API from here.
// User text only ever reaches the page through textContent, never innerHTML.
"use strict";

const BLUE = [37, 99, 235];

function actAlpha(act, scale) {
  if (!(scale > 0) || !(act > 0)) return 0;
  return Math.round(Math.min(1, act / scale) * 1000) / 1000;
}

function showToken(t) {
  const s = t.replace(/\n/g, "↵").replace(/\t/g, "⇥");
  return s === "" ? "∅" : s;
}

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function $(id) {
  return document.getElementById(id);
}

function featureHref(sae, index) {
  return "/sae/" + encodeURIComponent(sae) + "/feature/" + index;
}

function paintToken(span, act, scale) {
  const a = actAlpha(act, scale);
  span.style.backgroundColor = `rgba(${BLUE[0]}, ${BLUE[1]}, ${BLUE[2]}, ${a})`;
  span.classList.toggle("dark", a > 0.55);
  span.dataset.act = act.toFixed(4);
  span.title = act.toFixed(4);
}

function showError(message) {
  const box = $("error-message");
  box.textContent = message;
  box.hidden = !message;
}

// POST JSON and, while the server works, show its progress from /api/status.
async function postJSON(url, body) {
  const bar = $("progress");
  showError("");
  bar.hidden = false;
  bar.textContent = "sending…";
  let pending = true;
  const poll = async () => {
    while (pending) {
      try {
        const s = await (await fetch("/api/status")).json();
        if (pending && s.busy) {
          const wait = s.waiting ? ` (${s.waiting} more waiting)` : "";
          bar.textContent = `${s.task}: step ${s.step}/${s.steps}: ${s.message} · ${s.elapsed_s.toFixed(1)} s${wait}`;
        } else if (pending) {
          bar.textContent = "waiting for the model…";
        }
      } catch (e) {
        /* the status poll is best-effort */
      }
      await new Promise((r) => setTimeout(r, 250));
    }
  };
  poll();
  try {
    const resp = await fetch(url, {
      method: "POST",
      headers: { "content-type": "application/json", accept: "application/json" },
      body: JSON.stringify(body),
    });
    const data = await resp.json().catch(() => ({ error: `the server answered ${resp.status}` }));
    if (!resp.ok) throw new Error(data.error || `the server answered ${resp.status}`);
    return data;
  } finally {
    pending = false;
    bar.hidden = true;
  }
}

// -- inspector ------------------------------------------------------------------------------
function inspectBody() {
  const choice = $("sae").value;
  const body = { text: $("text").value, top_k: Number($("top-k").value) || 8 };
  if (choice.startsWith("kind:")) body.kind = choice.slice(5);
  else body.saes = [choice];
  return body;
}

function renderInspect(data) {
  const out = $("result");
  out.replaceChildren();
  $("token-detail").hidden = true;
  for (const s of data.saes) {
    const section = el("section", { class: "sae-result", "data-sae": s.sae });
    const h = el("h3");
    h.append(el("a", { href: "/sae/" + encodeURIComponent(s.sae) }, s.sae));
    section.append(h);
    const strip = el("div", { class: "ctx" });
    // each token coloured by its strongest feature, named on hover (scale: this SAE on this text)
    const best = s.top.map((fs) => (fs.length ? fs[0] : null));
    const scale = Math.max(0, ...best.map((f) => (f ? f.act : 0)));
    data.tokens.forEach((t, i) => {
      const span = el("span", { class: "tok", "data-i": String(i) }, showToken(t));
      paintToken(span, best[i] ? best[i].act : 0, scale);
      if (best[i]) span.dataset.feature = String(best[i].index);
      span.title = best[i]
        ? `top feature #${best[i].index} (${best[i].act.toFixed(3)}); ${s.l0[i]} features active`
        : "no feature fires here";
      span.addEventListener("click", () => showTokenDetail(s, data.tokens, i));
      strip.append(span);
    });
    section.append(strip);
    out.append(section);
  }
}

function showTokenDetail(s, tokens, i) {
  const box = $("token-detail");
  box.replaceChildren();
  box.append(el("h3", {}, `“${showToken(tokens[i])}” (token ${i}) in ${s.sae}: ${s.l0[i]} active`));
  const list = el("ul", { class: "token-features" });
  for (const f of s.top[i]) {
    const li = el("li");
    li.append(el("a", { href: featureHref(s.sae, f.index), class: "feature-link" }, `#${f.index}`));
    li.append(document.createTextNode(` ${f.act.toFixed(3)} `));
    if (f.label) li.append(el("span", { class: "label", title: `detection ${f.score == null ? "–" : f.score.toFixed(2)}` }, f.label), document.createTextNode(" "));
    const b = el("button", { type: "button", class: "hl-button" }, "highlight");
    b.addEventListener("click", () => highlight(s.sae, f.index));
    li.append(b);
    list.append(li);
  }
  if (!s.top[i].length) list.append(el("li", { class: "muted" }, "no feature fires here"));
  box.append(list);
  box.hidden = false;
}

async function highlight(sae, index) {
  $("hl-sae").value = sae;
  $("hl-index").value = index;
  let data;
  try {
    data = await postJSON("/api/inspect", { text: $("text").value, feature_sae: sae, feature_index: Number(index) });
  } catch (e) {
    showError(e.message);
    return;
  }
  const acts = data.feature.acts;
  const scale = Math.max(0, ...acts);
  const title = $("hl-title");
  title.replaceChildren(el("a", { href: featureHref(sae, index), class: "feature-link" }, `${sae} #${index}`));
  if (data.feature.label) title.append(document.createTextNode(" "), el("span", { class: "label" }, data.feature.label));
  title.append(document.createTextNode(` · max ${scale.toFixed(3)} on this text`));
  const strip = $("hl-tokens");
  strip.replaceChildren();
  data.tokens.forEach((t, i) => {
    const span = el("span", { class: "tok" }, showToken(t));
    paintToken(span, acts[i], scale);
    strip.append(span);
  });
  $("highlighted").hidden = false;
  // the same colours on that SAE's own strip, when it is shown
  for (const section of document.querySelectorAll(".sae-result")) {
    if (section.dataset.sae !== sae) continue;
    section.querySelectorAll(".tok").forEach((span, i) => paintToken(span, acts[i], scale));
  }
}

function setupInspector() {
  const form = $("inspect-form");
  if (!form) return;
  // "Trace this prompt" opens the graph explorer on the text as it stands
  const traceLink = () => ($("trace-link").href = "/graph?prompt=" + encodeURIComponent($("text").value));
  $("text").addEventListener("input", traceLink);
  traceLink();
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    try {
      renderInspect(await postJSON("/api/inspect", inspectBody()));
    } catch (e) {
      showError(e.message);
    }
  });
  $("highlight").addEventListener("click", () => {
    if ($("hl-index").value === "") return showError("type a feature index to highlight");
    highlight($("hl-sae").value, $("hl-index").value);
  });
  if ($("text").value && form.dataset.feature !== "") {
    highlight($("hl-sae").value, form.dataset.feature);
  }
}

// -- steering -------------------------------------------------------------------------------
function setupSteering() {
  const form = $("steer-form");
  if (!form) return;
  const body = document.querySelector("#steer-features tbody");
  const template = body.querySelector(".steer-row").cloneNode(true);
  const wire = (row) => row.querySelector(".s-remove").addEventListener("click", () => {
    if (body.querySelectorAll(".steer-row").length > 1) row.remove();
  });
  // each row shows its feature's label (lmscope explain), fetched when the SAE or index changes
  const showLabel = async (row) => {
    const cell = row.querySelector(".s-label");
    const sae = row.querySelector(".s-sae").value;
    const index = row.querySelector(".s-index").value;
    if (index === "") return (cell.textContent = "–");
    try {
      const resp = await fetch("/api/labels?f=" + encodeURIComponent(`${sae}:${index}`));
      const [found] = resp.ok ? await resp.json() : [{}];
      cell.textContent = (found && found.label) || "–";
    } catch (e) {
      cell.textContent = "–";
    }
  };
  const wireLabel = (row) => {
    row.querySelector(".s-sae").addEventListener("change", () => showLabel(row));
    row.querySelector(".s-index").addEventListener("change", () => showLabel(row));
    showLabel(row);
  };
  wire(body.querySelector(".steer-row"));
  wireLabel(body.querySelector(".steer-row"));
  $("add-feature").addEventListener("click", () => {
    const row = template.cloneNode(true);
    wire(row);
    wireLabel(row);
    body.append(row);
  });
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const features = [...body.querySelectorAll(".steer-row")].map((row) => ({
      sae: row.querySelector(".s-sae").value,
      index: Number(row.querySelector(".s-index").value),
      coeff: Number(row.querySelector(".s-coeff").value),
    }));
    const req = {
      prompt: $("prompt").value,
      features,
      max_new_tokens: Number($("max-new").value),
      temperature: Number($("temperature").value),
      seed: Number($("seed").value),
    };
    try {
      const data = await postJSON("/api/steer", req);
      document.querySelectorAll(".prompt-echo").forEach((n) => (n.textContent = data.prompt));
      $("baseline").textContent = data.baseline;
      $("steered").textContent = data.steered;
      for (const side of ["baseline", "steered"]) {
        const list = $("next-" + side);
        list.replaceChildren();
        for (const [tok, p] of data.next_token[side]) {
          const li = el("li");
          li.append(el("code", { class: "t" }, showToken(tok)), document.createTextNode(` ${(100 * p).toFixed(1)}%`));
          list.append(li);
        }
      }
      $("kl").textContent = `(KL ${data.next_token.kl.toFixed(3)} nats)`;
      $("outputs").hidden = false;
    } catch (e) {
      showError(e.message);
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  setupInspector();
  setupSteering();
});
