// The status page served at /status/ on the coordinator's metrics port: one static HTML page with
// inline CSS and JavaScript, no framework. It polls /status/api every 2 s and, for each live node,
// that node's own /metrics (its metrics server allows cross-origin reads) for GPU utilization and
// memory; CPU nodes show none.
#include <string>

#include "coordinator/status_board.h"

namespace kiln::coordinator {

const std::string& StatusPageHtml() {
  static const std::string html = R"HTML(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>kiln status</title>
<style>
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
  h1 { font-size: 1.4em; margin: 0 0 .2em; }
  h2 { font-size: 1.1em; margin: 1.4em 0 .4em; }
  table { border-collapse: collapse; width: 100%; background: #fff; }
  th, td { text-align: left; padding: 4px 8px; border-bottom: 1px solid #e4e4e4; vertical-align: middle; }
  th { background: #f0f0f0; font-weight: 600; }
  .muted { color: #888; }
  .state { font-weight: 600; }
  .ready, .succeeded { color: #17803d; } .draining, .running, .queued { color: #b26b00; }
  .dead, .failed { color: #b3261e; } .left, .cancelled { color: #777; }
  img.thumb { width: 64px; height: 64px; object-fit: cover; border-radius: 4px; display: block; }
  .bar { display: inline-block; width: 80px; height: 8px; background: #eee; border-radius: 4px; vertical-align: middle; }
  .bar > span { display: block; height: 100%; background: #2f7ed8; border-radius: 4px; }
</style>
</head>
<body>
<h1>kiln</h1>
<div class="muted" id="summary">loading...</div>
<h2>Nodes</h2>
<table id="nodes"><thead><tr><th>node</th><th>state</th><th>device</th><th>GPU util</th>
<th>GPU memory</th><th>running</th><th>done</th><th>last seen</th></tr></thead><tbody></tbody></table>
<h2>Queue</h2>
<table id="queue"><thead><tr><th>job</th><th>model</th><th>size</th><th>priority</th>
<th>waiting</th></tr></thead><tbody></tbody></table>
<h2>Running and recent jobs</h2>
<table id="jobs"><thead><tr><th>image</th><th>job</th><th>state</th><th>model</th><th>size</th>
<th>node</th><th>progress</th><th>queued s</th><th>ran s</th><th>cold start s</th><th>prompt</th>
</tr></thead><tbody></tbody></table>
<script>
"use strict";
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;","'":"&#39;"}[c]));
const secs = v => (typeof v === "number" ? v.toFixed(2) : "");
const gib = b => (b / 1073741824).toFixed(1) + " GiB";
const bar = r => `<span class="bar"><span style="width:${Math.round(r * 100)}%"></span></span> ${Math.round(r * 100)}%`;
const gpu = {};  // node id -> {util, used, total}

// Reads the node's GPU figures from its own /metrics (whole card, or its MIG slice).
async function scrape(node) {
  if (node.device.kind !== "cuda" || !node.metrics_url) return;
  try {
    const text = await (await fetch(node.metrics_url)).text();
    const get = name => {
      const m = text.match(new RegExp("^" + name + "\\{[^}]*\\} ([0-9.eE+-]+)$", "m"));
      return m ? Number(m[1]) : undefined;
    };
    const mig = node.device.mig_profile !== "";
    gpu[node.node_id] = {
      util: mig ? get("kiln_mig_sm_utilization_ratio") : get("kiln_gpu_utilization_ratio"),
      used: get(mig ? "kiln_mig_memory_used_bytes" : "kiln_gpu_memory_used_bytes"),
      total: get(mig ? "kiln_mig_memory_total_bytes" : "kiln_gpu_memory_total_bytes"),
    };
  } catch (e) { /* node unreachable from this browser: leave its figures empty */ }
}

function rows(id, html) { document.querySelector(`#${id} tbody`).innerHTML = html.join(""); }

async function refresh() {
  let s;
  try { s = await (await fetch("/status/api", {cache: "no-store"})).json(); }
  catch (e) { document.getElementById("summary").textContent = "coordinator unreachable"; return; }
  await Promise.all(s.nodes.filter(n => n.state === "ready" || n.state === "draining").map(scrape));
  const live = s.nodes.filter(n => n.state === "ready" || n.state === "draining").length;
  document.getElementById("summary").textContent =
    `${live} live node(s), ${s.queue.depth} queued, ${s.running.length} running; job store: ${s.store}; ` +
    `updated ${new Date(s.generated_unix_ms).toLocaleTimeString()}`;
  rows("nodes", s.nodes.map(n => {
    const g = gpu[n.node_id] || {};
    const dev = esc(n.device.name) + (n.device.mig_profile ? ` <b>MIG ${esc(n.device.mig_profile)}</b>` : "");
    return `<tr data-node="${esc(n.node_id)}"><td>${esc(n.node_id)}</td>` +
      `<td class="state ${esc(n.state)}">${esc(n.state)}</td><td>${dev}</td>` +
      `<td>${g.util !== undefined ? bar(g.util) : '<span class="muted">-</span>'}</td>` +
      `<td>${g.used !== undefined ? gib(g.used) + " / " + gib(g.total) : '<span class="muted">-</span>'}</td>` +
      `<td>${esc(n.running_jobs.join(", "))}</td><td>${n.jobs_done}</td>` +
      `<td>${n.last_seen_unix_ms ? new Date(n.last_seen_unix_ms).toLocaleTimeString() : ""}</td></tr>`;
  }));
  rows("queue", s.queue.jobs.map(j => `<tr data-job="${esc(j.job_id)}"><td>${esc(j.job_id)}</td>` +
    `<td>${esc(j.model)}</td><td>${j.width}x${j.height}</td><td>${j.priority}</td>` +
    `<td>${esc(j.error)}</td></tr>`));
  rows("jobs", s.running.concat(s.recent).map(j => `<tr data-job="${esc(j.job_id)}">` +
    `<td>${j.thumbnail ? `<img class="thumb" alt="${esc(j.job_id)}" src="${esc(j.thumbnail)}">` : ""}</td>` +
    `<td>${esc(j.job_id)}</td><td class="state ${esc(j.state)}">${esc(j.state)}` +
    `${j.error ? `<div class="muted">${esc(j.error)}</div>` : ""}</td>` +
    `<td>${esc(j.model)} ${esc(j.precision)}</td><td>${j.width}x${j.height}</td><td>${esc(j.node_id)}</td>` +
    `<td>${j.total_steps ? `${j.step}/${j.total_steps}` : ""}</td>` +
    `<td>${j.node_id ? secs(j.queue_seconds) : ""}</td>` +
    `<td>${["queued", "running"].includes(j.state) ? "" : secs(j.run_seconds)}</td>` +
    `<td>${j.cold_start_seconds ? secs(j.cold_start_seconds) : ""}</td>` +
    `<td class="muted">${esc(j.prompt)}</td></tr>`));
  document.body.dataset.loaded = "1";
}
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
)HTML";
  return html;
}

}  // namespace kiln::coordinator
