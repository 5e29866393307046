// The console's scripts: charts drawn from the JSON blocks the pages carry, and the overview's
// live refresh. No inline scripts (the Content-Security-Policy allows only these files).
"use strict";

function readJson(id) {
  const el = document.getElementById(id);
  return el ? JSON.parse(el.textContent) : null;
}

function cell(row, text, colspan) {
  const td = document.createElement("td");
  td.textContent = text;
  if (colspan) td.colSpan = colspan;
  row.appendChild(td);
  return td;
}

function mib(n) {
  return (n / 1048576).toLocaleString("en-US", {minimumFractionDigits: 1, maximumFractionDigits: 1}) + " MiB";
}

// ---- timeline: one stacked horizontal bar per row, an invisible offset first ----------------
function drawTimeline() {
  const data = readJson("timeline-data");
  if (!data) return;
  // horizontal bars are drawn bottom-up: rows reversed so the invocation's comes first on top
  const rows = (values) => values.slice().reverse();
  const series = [{name: "offset", className: "ct-series-offset", data: rows(data.offsets)}];
  data.phases.forEach((phase, i) => {
    series.push({name: phase, className: "ct-series-phase-" + (i + 1), data: rows(data.series[i])});
  });
  new Chartist.BarChart("#timeline-chart", {labels: rows(data.labels), series: series}, {
    stackBars: true, horizontalBars: true, height: 60 + 40 * data.labels.length,
    axisY: {offset: 90}, axisX: {scaleMinSpace: 70, labelInterpolationFnc: (v) => v + " ms"},
  });
}

// ---- billing: GB-seconds and cost per UTC day --------------------------------------------
function drawBilling() {
  const data = readJson("billing-data");
  if (!data) return;
  const short = data.labels.map((d) => d.slice(5));  // MM-DD
  const options = {height: 220, axisX: {labelInterpolationFnc: (v, i) =>
    data.labels.length > 14 && i % Math.ceil(data.labels.length / 14) ? null : v}};
  new Chartist.BarChart("#gb-chart", {labels: short, series: [data.gb_seconds]}, options);
  new Chartist.BarChart("#cost-chart", {labels: short, series: [data.cost_usd]}, options);
}

// ---- overview: poll the cluster JSON and redraw its tables -------------------------------
function renderNodes(nodes) {
  const body = document.querySelector("#nodes tbody");
  if (!body) return;
  body.replaceChildren();
  if (!nodes.length) {
    const row = body.insertRow();
    row.className = "empty";
    cell(row, "No nodes have registered. Start a node agent (hydraserve node) or make up.", 8);
  }
  for (const n of nodes) {
    for (const d of n.devices.length ? n.devices : [null]) {
      const row = body.insertRow();
      cell(row, n.id); cell(row, n.status); cell(row, n.last_heartbeat_at || "never");
      if (!d) { cell(row, "no devices", 5); continue; }
      cell(row, String(d.index)); cell(row, d.kind); cell(row, mib(d.memory_bytes));
      cell(row, mib(d.used_bytes)); cell(row, mib(d.free_bytes));
    }
  }
}

function renderLinks(nodes) {
  const body = document.querySelector("#links tbody");
  if (!body) return;
  body.replaceChildren();
  for (const n of nodes) {
    const row = body.insertRow();
    cell(row, n.id); cell(row, n.link_mbps ? `${Math.round(n.link_mbps)} Mb/s` : "uncapped");
    cell(row, mib(n.link_bytes));
    cell(row, n.link_mb_per_s === null ? "none yet" : `${n.link_mb_per_s.toFixed(2)} MB/s`);
    cell(row, n.cached_stages.join(", ") || "empty");
  }
}

function renderGroups(groups) {
  const body = document.querySelector("#groups tbody");
  body.replaceChildren();
  if (!groups.length) {
    const row = body.insertRow();
    row.className = "empty";
    cell(row, "No live groups: nothing is loaded. The first invocation of a function starts one.", 6);
  }
  for (const grp of groups) {
    const row = body.insertRow();
    cell(row, String(grp.plan_id)); cell(row, grp.tenant);
    const fn = cell(row, "");
    const link = document.createElement("a");
    link.href = "/console/functions/" + encodeURIComponent(grp.tenant) + "/" + encodeURIComponent(grp.function);
    link.textContent = grp.function;
    fn.appendChild(link);
    cell(row, String(grp.version));
    cell(row, grp.pipeline);
    const stages = cell(row, "");
    for (const s of grp.stages) {
      const span = document.createElement("span");
      span.className = "stage " + s.status;
      span.textContent = s.stage + ": #" + s.instance_id + " " + s.node_id + "/" + s.device_id +
        ", " + mib(s.memory_bytes) + ", " + s.status;
      stages.appendChild(span);
    }
  }
}

function pollCluster() {
  const el = document.getElementById("cluster-data");
  if (!el) return;
  const every = 1000 * Number(el.dataset.every || 3);
  const tick = async () => {
    try {
      const resp = await fetch(el.dataset.url, {credentials: "same-origin", cache: "no-store"});
      const body = await resp.json();
      if (!resp.ok) {
        document.getElementById("refreshed").textContent = body.error.message;
        return;  // the session ended: stop polling
      }
      renderNodes(body.nodes);
      renderLinks(body.nodes);
      renderGroups(body.groups);
      document.getElementById("refreshed").textContent = body.now;
    } catch (err) {
      document.getElementById("refreshed").textContent = "refresh failed (" + err + "); retrying";
    }
    setTimeout(tick, every);
  };
  setTimeout(tick, every);
}

document.addEventListener("DOMContentLoaded", () => {
  drawTimeline();
  drawBilling();
  pollCluster();
});
