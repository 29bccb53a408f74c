// fastomni motion-field viewer: plain JavaScript and canvas, no network, no build step.
// Data arrive as <script> files (data/manifest.js, data/q_NNNNN.js) because browsers block fetch()
// of file:// URLs. The page's state is mirrored to <pre id="state"> (JSON) and body[data-*] for tests.
// A URL hash "#query=Q&click=X,Y&frame=T&grid=1" performs those actions on load (X, Y in image pixels).
"use strict";

const state = {status: "loading", error: null, frame: 0, playing: false, grid: false, queryFrame: null,
               click: null, trail: null, loadedQueryFrames: []};
const queries = {};
const pending = {};
const frameImages = [];
const depthImages = [];
let M = null;
let viewScale = 1;
let timer = null;

function $(id) { return document.getElementById(id); }
function pad(i) { return String(i).padStart(5, "0"); }

function publish() {
  $("state").textContent = JSON.stringify(state, null, 1);
  const b = document.body.dataset;
  b.status = state.status;
  b.frame = String(state.frame);
  b.grid = String(state.grid);
  b.queryFrame = state.queryFrame === null ? "" : String(state.queryFrame);
  b.trailPoints = state.trail ? String(state.trail.drawn) : "0";
}

function fail(message) {
  state.status = "error";
  state.error = message;
  const box = $("error");
  box.hidden = false;
  box.textContent = message;
  if (timer) { clearInterval(timer); timer = null; }
  publish();
}

window.fastomniMissing = function (path) {
  fail("Cannot load " + path + ": the data file is missing or unreadable.\n" +
       "Write the viewer again with `fastomni view RUN_or_EXPORT --video VIDEO --out SITE` and open " +
       "SITE/index.html from that folder (keep data/, frames/ and depth/ beside it).");
};

function decode(b64, Type) {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Type(bytes.buffer);
}

window.fastomniQuery = function (i, tracks64, occluded64) {
  const n = M.gridRows * M.gridCols;
  const tracks = decode(tracks64, Int16Array);
  const occluded = decode(occluded64, Uint8Array);
  if (tracks.length !== n * M.numFrames * 2 || occluded.length !== n * M.numFrames) {
    fail("data/q_" + pad(i) + ".js holds " + tracks.length / 2 + " positions, expected " + n * M.numFrames +
         " (" + n + " points x " + M.numFrames + " frames): it belongs to another export");
    return;
  }
  queries[i] = {tracks: tracks, occluded: occluded};
};

function loadQuery(i, done) {
  if (queries[i]) { done(); return; }
  if (pending[i]) { pending[i].push(done); return; }
  pending[i] = [done];
  const path = "data/q_" + pad(i) + ".js";
  const script = document.createElement("script");
  script.src = path;
  script.onload = function () {
    const callbacks = pending[i];
    delete pending[i];
    if (!queries[i]) { if (state.status !== "error") fail(path + " did not define its data"); return; }
    state.loadedQueryFrames.push(i);
    callbacks.forEach(function (f) { f(); });
  };
  script.onerror = function () { delete pending[i]; window.fastomniMissing(path); };
  document.body.appendChild(script);
}

// position of grid point n at frame t of query frame q: [x, y] image pixels, or null (no estimate)
function position(q, n, t) {
  const k = (n * M.numFrames + t) * 2;
  const x = q.tracks[k], y = q.tracks[k + 1];
  if (x === M.missing || y === M.missing) return null;
  return [x / M.trackScale, y / M.trackScale];
}

function occludedAt(q, n, t) { return q.occluded[n * M.numFrames + t] === 1; }

function toCanvas(p) { return [(p[0] + 0.5) * viewScale, (p[1] + 0.5) * viewScale]; }

function hue(n) {
  const r = Math.floor(n / M.gridCols), c = n % M.gridCols;
  return "hsl(" + Math.round(300 * (r * M.gridCols + c) / (M.gridRows * M.gridCols)) + ",90%,55%)";
}

function drawMarker(ctx, p, visible, color, radius) {
  const c = toCanvas(p);
  ctx.beginPath();
  ctx.arc(c[0], c[1], radius, 0, 2 * Math.PI);
  if (visible) { ctx.fillStyle = color; ctx.fill(); }
  else { ctx.strokeStyle = "#bbbbbb"; ctx.lineWidth = 1.5; ctx.stroke(); }
}

function drawTrail(ctx) {
  const q = queries[state.queryFrame];
  const n = state.click.point;
  ctx.lineWidth = 2;
  for (let t = 1; t < M.numFrames; t++) {
    const a = position(q, n, t - 1), b = position(q, n, t);
    if (!a || !b) continue;
    const visible = !occludedAt(q, n, t - 1) && !occludedAt(q, n, t);
    ctx.setLineDash(visible ? [] : [4, 4]);
    ctx.strokeStyle = visible ? "#ffdc00" : "#999999";
    const ca = toCanvas(a), cb = toCanvas(b);
    ctx.beginPath(); ctx.moveTo(ca[0], ca[1]); ctx.lineTo(cb[0], cb[1]); ctx.stroke();
  }
  ctx.setLineDash([]);
  for (let t = 0; t < M.numFrames; t++) {
    const p = position(q, n, t);
    if (p) drawMarker(ctx, p, !occludedAt(q, n, t), t === state.frame ? "#ff4136" : "#ffdc00",
                      t === state.frame ? 6 : 3);
  }
}

function drawGrid(ctx) {
  const q = queries[state.queryFrame];
  const step = Math.max(1, Math.ceil(Math.sqrt(M.gridRows * M.gridCols / 400)));
  for (let r = 0; r < M.gridRows; r += step) {
    for (let c = 0; c < M.gridCols; c += step) {
      const n = r * M.gridCols + c;
      const p = position(q, n, state.frame);
      if (p) drawMarker(ctx, p, !occludedAt(q, n, state.frame), hue(n), 2.5);
    }
  }
}

function drawPanes() {
  const depth = $("depth").getContext("2d");
  const img = depthImages[state.frame];
  if (img && img.complete && img.naturalWidth) depth.drawImage(img, 0, 0, $("depth").width, $("depth").height);
  $("depth-frame").textContent = String(state.frame);
  const occ = $("occlusion").getContext("2d");
  const q = state.queryFrame === null ? null : queries[state.queryFrame];
  const cw = $("occlusion").width / M.gridCols, ch = $("occlusion").height / M.gridRows;
  occ.fillStyle = "#444444";
  occ.fillRect(0, 0, $("occlusion").width, $("occlusion").height);
  if (!q) return;
  let hidden = 0;
  for (let n = 0; n < M.gridRows * M.gridCols; n++) {
    const o = occludedAt(q, n, state.frame);
    hidden += o ? 1 : 0;
    occ.fillStyle = o ? "#e0245e" : "#2ecc40";
    occ.fillRect((n % M.gridCols) * cw, Math.floor(n / M.gridCols) * ch, Math.ceil(cw), Math.ceil(ch));
  }
  state.occludedFractionAtFrame = hidden / (M.gridRows * M.gridCols);
}

function draw() {
  if (!M || state.status === "error") return;
  const canvas = $("video");
  const ctx = canvas.getContext("2d");
  const img = frameImages[state.frame];
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  if (img && img.complete && img.naturalWidth) ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  if (state.grid && state.queryFrame !== null && queries[state.queryFrame]) drawGrid(ctx);
  if (state.click && queries[state.queryFrame]) drawTrail(ctx);
  drawPanes();
  $("frame").value = String(state.frame);
  $("frame-label").textContent = "frame " + state.frame + " / " + (M.numFrames - 1);
  publish();
}

function setFrame(t) { state.frame = Math.max(0, Math.min(M.numFrames - 1, t)); draw(); }

// click at image pixel (x, y) of the current frame: that frame becomes the query frame
function clickAt(x, y, done) {
  const qf = state.frame;
  loadQuery(qf, function () {
    const q = queries[qf];
    let best = -1, bestD = Infinity;
    for (let n = 0; n < M.gridRows * M.gridCols; n++) {
      const p = position(q, n, qf);
      if (!p) continue;
      const d = (p[0] - x) * (p[0] - x) + (p[1] - y) * (p[1] - y);
      if (d < bestD) { bestD = d; best = n; }
    }
    state.queryFrame = qf;
    let visible = 0, hidden = 0, missing = 0;
    for (let t = 0; t < M.numFrames; t++) {
      if (!position(q, best, t)) missing++;
      else if (occludedAt(q, best, t)) hidden++;
      else visible++;
    }
    const start = position(q, best, qf);
    state.click = {x: x, y: y, queryFrame: qf, point: best, pixel: start};
    state.trail = {frames: M.numFrames, drawn: visible + hidden, visibleFrames: visible, occludedFrames: hidden,
                   noEstimateFrames: missing,
                   occluded: Array.from({length: M.numFrames}, function (_, t) { return occludedAt(q, best, t) ? 1 : 0; })};
    draw();
    if (done) done();
  });
}

function setGrid(on, done) {
  state.grid = on;
  $("grid").checked = on;
  if (on && state.queryFrame === null) {
    const qf = state.frame;
    loadQuery(qf, function () { state.queryFrame = qf; draw(); if (done) done(); });
  } else { draw(); if (done) done(); }
}

function togglePlay() {
  state.playing = !state.playing;
  $("play").textContent = state.playing ? "pause" : "play";
  if (state.playing) timer = setInterval(function () { setFrame((state.frame + 1) % M.numFrames); }, 1000 / M.fps);
  else { clearInterval(timer); timer = null; }
  publish();
}

function loadImage(path, t) {
  const img = new Image();
  img.onload = function () { if (t === state.frame) draw(); };
  img.onerror = function () { window.fastomniMissing(path); };
  img.src = path;
  return img;
}

function loadImages() {
  for (let t = 0; t < M.numFrames; t++) {
    frameImages.push(loadImage("frames/" + pad(t) + ".jpg", t));
    depthImages.push(loadImage("depth/" + pad(t) + ".png", t));
  }
}

// "#query=Q&click=X,Y&frame=T&grid=1": click (X, Y) in frame Q (default T), then show frame T
function applyHash(done) {
  const params = new URLSearchParams(location.hash.replace(/^#/, "") || location.search.replace(/^\?/, ""));
  const frame = parseInt(params.get("frame") || "0", 10) || 0;
  setFrame(params.has("query") ? parseInt(params.get("query"), 10) || 0 : frame);
  const steps = [];
  if (params.get("grid") === "1") steps.push(function (next) { setGrid(true, next); });
  if (params.has("click")) {
    const xy = params.get("click").split(",").map(Number);
    steps.push(function (next) { clickAt(xy[0], xy[1], next); });
  }
  steps.push(function (next) { setFrame(frame); next(); });
  (function run(k) { if (k < steps.length) steps[k](function () { run(k + 1); }); else done(); })(0);
}

window.fastomniStart = function () {
  M = window.FASTOMNI_MANIFEST;
  if (!M || !M.numFrames) { fail("data/manifest.js does not define the viewer's data (FASTOMNI_MANIFEST)"); return; }
  viewScale = Math.max(1, Math.floor(640 / Math.max(M.width, M.height)));
  const canvas = $("video");
  canvas.width = M.width * viewScale;
  canvas.height = M.height * viewScale;
  const side = 256 / Math.max(M.width, M.height);
  for (const id of ["depth", "occlusion"]) {
    $(id).width = Math.round(M.width * side);
    $(id).height = Math.round(M.height * side);
  }
  $("frame").max = String(M.numFrames - 1);
  $("info").textContent = M.numFrames + " frames of " + M.width + "x" + M.height + ", tracks on a " + M.gridCols +
    "x" + M.gridRows + " grid (every " + M.stride + " model pixels), occlusion: " + M.occlusion;
  $("frame").addEventListener("input", function () { setFrame(parseInt($("frame").value, 10)); });
  $("play").addEventListener("click", togglePlay);
  $("grid").addEventListener("change", function () { setGrid($("grid").checked); });
  $("clear").addEventListener("click", function () { state.click = null; state.trail = null; draw(); });
  canvas.addEventListener("click", function (e) {
    const rect = canvas.getBoundingClientRect();
    clickAt((e.clientX - rect.left) / rect.width * M.width - 0.5, (e.clientY - rect.top) / rect.height * M.height - 0.5);
  });
  loadImages();
  applyHash(function () { if (state.status !== "error") { state.status = "ready"; draw(); } });
};
