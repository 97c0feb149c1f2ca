"""``GET /``: a single page to try the endpoint in a browser.

Drop or choose an image: the page posts it to ``v1/segment?format=overlay`` and
``v1/segment?format=json`` (relative to its own address, so it works under any route prefix),
shows the overlay, a legend of the model's classes (from ``v1/model``) and the per-class areas.
An API key field appears when the endpoint answers 401. No external scripts, styles or fonts,
and no icon to fetch: the page requests nothing but the endpoint's own routes.
"""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>segplatform</title>
<link rel="icon" href="data:,">
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; max-width: 70rem; }
  h1 { font-size: 1.3rem; margin: 0 0 .3rem 0; }
  #model { color: #555; margin-bottom: 1rem; }
  #drop { border: 2px dashed #888; border-radius: 8px; padding: 1.5rem; text-align: center;
          cursor: pointer; background: #fafafa; }
  #drop.over { background: #eef5ff; border-color: #3477eb; }
  #result { display: flex; gap: 1.5rem; flex-wrap: wrap; margin-top: 1rem; }
  #result img { width: 100%; max-width: 640px; image-rendering: pixelated;
                border: 1px solid #ccc; }
  .panel { flex: 1 1 20rem; }
  #legend { list-style: none; padding: 0; display: flex; flex-wrap: wrap; gap: .4rem 1rem; }
  #legend li { display: flex; align-items: center; gap: .35rem; }
  .swatch { width: 1rem; height: 1rem; border: 1px solid #333; display: inline-block; }
  table { border-collapse: collapse; }
  td, th { padding: .15rem .6rem; text-align: right; border-bottom: 1px solid #ddd; }
  td:first-child, th:first-child { text-align: left; }
  #error { color: #b00020; white-space: pre-wrap; }
  #keyrow { display: none; margin: .5rem 0; }
</style>
</head>
<body>
<h1>segplatform</h1>
<div id="model">loading model…</div>
<div id="keyrow"><label>API key <input id="key" type="password" autocomplete="off"></label></div>
<div id="drop">Drop an image here or <label style="text-decoration: underline">choose a file
  <input id="file" type="file" accept="image/png,image/jpeg,image/webp,image/tiff"
         style="display:none"></label></div>
<div id="error" role="alert"></div>
<div id="result">
  <div class="panel"><h2>Overlay</h2><img id="overlay" alt="segmentation overlay"></div>
  <div class="panel"><h2>Classes</h2><ul id="legend"></ul>
    <table id="areas"><thead><tr><th>class</th><th>pixels</th><th>%</th></tr></thead>
    <tbody></tbody></table></div>
</div>
<script>
"use strict";
const base = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
const $ = (id) => document.getElementById(id);
function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = $("key").value;
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}
async function failure(response) {
  if (response.status === 401) $("keyrow").style.display = "block";
  let text = response.status + " " + response.statusText;
  try { const body = await response.json(); text = response.status + ": " + body.error.message; }
  catch (e) { /* not JSON */ }
  return text;
}
function rgb(c) { return "rgb(" + c[0] + "," + c[1] + "," + c[2] + ")"; }
async function loadModel() {
  const response = await fetch(base + "v1/model", {headers: headers()});
  if (!response.ok) { $("model").textContent = await failure(response); return; }
  const m = await response.json();
  $("model").textContent = m.name + (m.version ? " version " + m.version : "") +
    (m.alias ? " (@" + m.alias + ")" : "") + " · " + m.architecture;
  const legend = $("legend");
  legend.replaceChildren();
  m.classes.forEach((name, i) => {
    const li = document.createElement("li");
    li.className = "legend-item";
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = rgb(m.palette[i]);
    li.append(sw, document.createTextNode(name));
    legend.append(li);
  });
}
async function segment(file) {
  $("error").textContent = "";
  const type = file.type || "application/octet-stream";
  const post = (format) => fetch(base + "v1/segment?format=" + format,
    {method: "POST", body: file, headers: headers({"Content-Type": type})});
  const [over, areas] = await Promise.all([post("overlay"), post("json")]);
  if (!over.ok) { $("error").textContent = await failure(over); return; }
  if (!areas.ok) { $("error").textContent = await failure(areas); return; }
  const img = $("overlay");
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(await over.blob());
  const data = await areas.json();
  const rows = data.classes.filter((c) => c.pixels > 0).map((c) => {
    const tr = document.createElement("tr");
    for (const v of [c.name, c.pixels, (100 * c.fraction).toFixed(1)]) {
      const td = document.createElement("td"); td.textContent = v; tr.append(td);
    }
    return tr;
  });
  document.querySelector("#areas tbody").replaceChildren(...rows);
  document.body.dataset.done = String(Date.now());
  if (!$("legend").children.length) loadModel();
}
$("file").addEventListener("change", (e) => { if (e.target.files[0]) segment(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) segment(e.dataTransfer.files[0]);
});
$("key").addEventListener("change", loadModel);
loadModel();
</script>
</body>
</html>
"""
