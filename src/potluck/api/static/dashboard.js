// potluck dashboard: polls /api/v1/swarm and redraws. Plain DOM, no build step, no dependencies.
"use strict";

const REFRESH_MS = 2000;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function shortPeer(id) { return "…" + id.slice(-10); }
function fmt(x, digits = 1) { return x === null || x === undefined ? "–" : Number(x).toFixed(digits); }

function blockMap(model) {
  const missing = new Set(model.missing_blocks);
  const table = el("table", { class: "map", "data-testid": "block-map" });
  const head = el("tr", {}, el("th", {}, ""));
  for (let b = 0; b < model.num_blocks; b++) head.append(el("th", {}, b % 4 === 0 ? b : ""));
  table.append(head);
  for (const s of model.servers) {
    const row = el("tr", { "data-peer-id": s.peer_id }, el("th", {}, s.name || shortPeer(s.peer_id)));
    for (let b = 0; b < model.num_blocks; b++) {
      const held = s.start <= b && b < s.end;
      row.append(el("td", {}, el("span", {
        class: "cell " + (held ? s.state : "empty"),
        title: held ? `block ${b}: ${s.name || s.peer_id} (${s.state})` : "",
      })));
    }
    table.append(row);
  }
  const cover = el("tr", {}, el("th", {}, "coverage"));
  for (let b = 0; b < model.num_blocks; b++) {
    cover.append(el("td", {}, el("span", { class: "cell " + (missing.has(b) ? "missing" : "online"), title: `block ${b}` })));
  }
  table.append(cover);
  return table;
}

function serverTable(model) {
  const table = el("table", { class: "servers", "data-testid": "servers" });
  table.append(el("tr", {}, ...["name", "peer", "span", "state", "tok/s/block", "steps/s", "cache left",
    "dtype", "quantization", "adapters", "version", "announced"].map((h) => el("th", {}, h))));
  for (const s of model.servers) {
    table.append(el("tr", { class: "server", "data-peer-id": s.peer_id, "data-state": s.state },
      el("td", {}, s.name || "–"),
      el("td", {}, el("code", { title: s.peer_id }, shortPeer(s.peer_id))),
      el("td", {}, `${s.start}:${s.end}`),
      el("td", {}, el("span", { class: "cell " + s.state }), " ", s.state),
      el("td", { class: "num" }, fmt(s.throughput)),
      el("td", { class: "num" }, fmt(s.inference_rps)),
      el("td", { class: "num" }, s.cache_tokens_left),
      el("td", {}, s.dtype),
      el("td", {}, s.quantization || "–"),
      el("td", {}, s.adapters.length ? s.adapters.join(", ") : "–"),
      el("td", {}, s.version),
      el("td", {}, s.announced_ago_s === null ? "–" : `${fmt(s.announced_ago_s)} s ago`)));
  }
  return table;
}

function render(report) {
  const root = document.getElementById("models");
  root.replaceChildren();
  if (!report.models.length) root.append(el("p", { class: "muted" }, "no models announced in this swarm yet"));
  for (const m of report.models) {
    const missing = m.missing_blocks.length
      ? el("span", { class: "error" }, `missing blocks: ${m.missing_blocks.join(", ")}`)
      : el("span", { class: "muted" }, "all blocks served");
    root.append(el("section", { class: "model", "data-model": m.model },
      el("h2", {}, `${m.model} — ${m.num_blocks} blocks, ${m.servers.length} servers `, missing),
      blockMap(m), el("h2", {}, "servers"), serverTable(m)));
  }
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
}

async function refresh() {
  try {
    const response = await fetch("/api/v1/swarm", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
  } catch (e) {
    document.getElementById("updated").textContent = "refresh failed: " + e.message;
  } finally {
    setTimeout(refresh, REFRESH_MS);
  }
}

refresh();
