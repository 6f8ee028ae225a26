// The page's only script: reads /v1/model and /v1/videos, asks POST /v1/videos/{vid}/predict,
// and draws the answer (saliency curve, top-k moment bars, moment list) as plain SVG/DOM.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const W = 1200, LEFT = 70, RIGHT = 16;
const SAL_TOP = 8, SAL_BOTTOM = 146; // saliency panel, y pixels (viewBox 1200 x 292)
const LANES_TOP = 158, LANES_BOTTOM = 250; // one lane per moment
const AXIS_Y = 256;

const $ = (id) => document.getElementById(id);
const state = { videos: new Map(), answer: null, selected: 0, duration: 0 };

async function api(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try { body = await response.json(); } catch (_) { /* not JSON */ }
  if (!response.ok) {
    const err = body && body.error;
    const where = err && err.field ? `${err.field}: ` : "";
    throw new Error(err ? `${where}${err.message}` : `HTTP ${response.status}`);
  }
  return body;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

function el(tag, attrs = {}, text = null) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

function niceStep(span, maxTicks) {
  const raw = span / maxTicks;
  const mag = Math.pow(10, Math.floor(Math.log10(raw || 1)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * mag >= raw) return m * mag;
  return 10 * mag;
}

function fmt(x, digits) { return Number(x).toFixed(digits); }

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" };
const esc = (text) => String(text).replace(/[&<>"]/g, (c) => ESCAPES[c]);

function topMoments() {
  const k = Math.max(1, Math.min(10, parseInt($("top-k").value, 10) || 5));
  return state.answer.pred_relevant_windows.slice(0, k);
}

function drawChart() {
  const svg = $("chart");
  svg.replaceChildren();
  if (!state.answer) {
    svg.append(el("text", { x: W / 2, y: 140, "text-anchor": "middle", class: "empty" },
      "Choose a video and a query, then “Find moments”."));
    return;
  }
  const { pred_saliency_scores: sal, clip_len_s: clipLen } = state.answer;
  const duration = Math.max(state.answer.duration || 0, sal.length * clipLen);
  const x = (t) => LEFT + (t / duration) * (W - LEFT - RIGHT);
  const lo = Math.min(...sal), hi = Math.max(...sal);
  const pad = (hi - lo) * 0.08 || 0.5;
  const y0 = lo - pad, y1 = hi + pad;
  const y = (v) => SAL_BOTTOM - ((v - y0) / (y1 - y0)) * (SAL_BOTTOM - SAL_TOP);

  // grid + x axis (seconds)
  const grid = el("g", { class: "grid" }), axis = el("g", { class: "axis" });
  const xStep = niceStep(duration, 12);
  for (let t = 0; t <= duration + 1e-9; t += xStep) {
    grid.append(el("line", { x1: x(t), x2: x(t), y1: SAL_TOP, y2: LANES_BOTTOM }));
    axis.append(el("line", { x1: x(t), x2: x(t), y1: AXIS_Y, y2: AXIS_Y + 5 }));
    axis.append(el("text", { x: x(t), y: AXIS_Y + 17, "text-anchor": "middle" }, fmt(t, 0)));
  }
  axis.append(el("line", { x1: LEFT, x2: W - RIGHT, y1: AXIS_Y, y2: AXIS_Y }));
  axis.append(el("text", { x: (LEFT + W - RIGHT) / 2, y: AXIS_Y + 32, "text-anchor": "middle",
    class: "axis-label" }, "time (s)"));
  // y axis (saliency)
  const yStep = niceStep(y1 - y0, 4);
  for (let v = Math.ceil(y0 / yStep) * yStep; v <= y1; v += yStep) {
    grid.append(el("line", { x1: LEFT, x2: W - RIGHT, y1: y(v), y2: y(v) }));
    axis.append(el("text", { x: LEFT - 6, y: y(v) + 4, "text-anchor": "end" },
      fmt(v, yStep < 0.1 ? 2 : 1)));
  }
  axis.append(el("line", { x1: LEFT, x2: LEFT, y1: SAL_TOP, y2: SAL_BOTTOM }));
  axis.append(el("text", { x: 14, y: (SAL_TOP + SAL_BOTTOM) / 2, class: "axis-label",
    "text-anchor": "middle",
    transform: `rotate(-90 14 ${(SAL_TOP + SAL_BOTTOM) / 2})` }, "saliency score"));
  axis.append(el("text", { x: 14, y: (LANES_TOP + LANES_BOTTOM) / 2, class: "axis-label",
    "text-anchor": "middle",
    transform: `rotate(-90 14 ${(LANES_TOP + LANES_BOTTOM) / 2})` }, "moments"));
  svg.append(grid, axis);

  // the selected moment's span behind the curve
  const moments = topMoments();
  const chosen = moments[state.selected] || moments[0];
  if (chosen) {
    svg.append(el("rect", { class: "moment-span", x: x(chosen[0]), y: SAL_TOP,
      width: Math.max(2, x(chosen[1]) - x(chosen[0])), height: SAL_BOTTOM - SAL_TOP }));
  }
  // saliency curve at clip centres
  const pts = sal.map((v, i) => `${x((i + 0.5) * clipLen).toFixed(1)},${y(v).toFixed(1)}`);
  svg.append(el("polygon", { class: "area", points:
    `${x(0.5 * clipLen)},${SAL_BOTTOM} ${pts.join(" ")} ${x((sal.length - 0.5) * clipLen)},` +
    `${SAL_BOTTOM}` }));
  svg.append(el("polyline", { class: "curve", points: pts.join(" ") }));

  // one lane per moment, ranked by score
  const lane = (LANES_BOTTOM - LANES_TOP) / Math.max(moments.length, 1);
  const barH = Math.max(6, Math.min(16, lane - 4));
  moments.forEach(([st, ed, score], r) => {
    const top = LANES_TOP + r * lane + (lane - barH) / 2;
    const bar = el("rect", { class: "moment-bar" + (r === state.selected ? " selected" : ""),
      x: x(st), y: top, width: Math.max(2, x(ed) - x(st)), height: barH, rx: 2,
      "data-rank": r + 1, "fill-opacity": (0.35 + 0.65 * score).toFixed(2) });
    bar.append(el("title", {}, `#${r + 1}: ${fmt(st, 1)}–${fmt(ed, 1)} s, score ${fmt(score, 3)}`));
    bar.addEventListener("click", () => select(r, true));
    svg.append(bar);
    svg.append(el("text", { x: LEFT - 6, y: top + barH - 2, "text-anchor": "end" }, `#${r + 1}`));
    svg.append(el("text", { class: "moment-label", x: x(ed) + 5, y: top + barH - 2 },
      fmt(score, 3)));
  });
  drawPlayhead();
}

function drawPlayhead() {
  const old = $("chart").querySelector(".playhead");
  if (old) old.remove();
  const player = $("player");
  if (!state.answer || player.hidden || !player.currentTime) return;
  const sal = state.answer.pred_saliency_scores;
  const duration = Math.max(state.answer.duration || 0, sal.length * state.answer.clip_len_s);
  const px = LEFT + (player.currentTime / duration) * (W - LEFT - RIGHT);
  $("chart").append(el("line", { class: "playhead", x1: px, x2: px, y1: SAL_TOP,
    y2: AXIS_Y }));
}

function drawList() {
  const body = $("moments").querySelector("tbody");
  body.replaceChildren();
  if (!state.answer) return;
  topMoments().forEach(([st, ed, score], r) => {
    const row = document.createElement("tr");
    row.dataset.rank = r + 1;
    row.dataset.start = st;
    row.dataset.end = ed;
    row.dataset.score = score;
    if (r === state.selected) row.classList.add("selected");
    for (const text of [`${r + 1}`, fmt(st, 1), fmt(ed, 1), fmt(ed - st, 1), fmt(score, 3)]) {
      const cell = document.createElement("td");
      cell.textContent = text;
      row.append(cell);
    }
    const barCell = document.createElement("td");
    barCell.className = "bar-cell";
    const bar = document.createElement("span");
    bar.style.width = `${Math.round(score * 100)}%`;
    barCell.append(bar);
    row.append(barCell);
    row.addEventListener("click", () => select(r, true));
    body.append(row);
  });
}

function select(rank, seek) {
  state.selected = rank;
  drawChart();
  drawList();
  const moment = topMoments()[rank];
  const player = $("player");
  if (seek && moment && !player.hidden) {
    player.currentTime = moment[0];
    player.play().catch(() => { /* autoplay refused: the seek still happened */ });
  }
}

function chooseVideo() {
  const video = state.videos.get($("video").value);
  const options = $("query-options");
  options.replaceChildren(...video.queries.map((q) => {
    const option = document.createElement("option");
    option.value = q;
    return option;
  }));
  $("query").value = video.queries[0] || "";
  const player = $("player");
  player.hidden = !video.video_url;
  $("no-video").hidden = Boolean(video.video_url);
  if (video.video_url) player.src = video.video_url.replace(/^\//, "");
  else player.removeAttribute("src");
  state.answer = null;
  drawChart();
  drawList();
  $("chart-title").textContent = `Saliency over the timeline of ${video.vid} ` +
    `(${fmt(video.duration, 0)} s, ${video.clips} clips)`;
}

async function ask(event) {
  event.preventDefault();
  const vid = $("video").value;
  const query = $("query").value;
  $("run").disabled = true;
  setStatus("asking the model…");
  const t0 = performance.now();
  try {
    const answer = await api(`v1/videos/${encodeURIComponent(vid)}/predict`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ query }),
    });
    state.answer = answer;
    state.selected = 0;
    drawChart();
    drawList();
    setStatus(`“${answer.query}” on ${answer.vid}: answered by ${answer.model.name} ` +
      `version ${answer.model.version} in ${Math.round(performance.now() - t0)} ms`);
    document.body.dataset.answered = String(Date.now());
  } catch (err) {
    setStatus(err.message, true);
  } finally {
    $("run").disabled = false;
  }
}

async function init() {
  drawChart();
  try {
    const model = await api("v1/model");
    const sel = model.selection_metric || {};
    const parts = [`<b>${esc(model.name)}</b> version <b>${esc(model.version)}</b>` +
      (model.alias ? ` (@${esc(model.alias)}${model.follow_alias ? ", followed" : ""})` : ""),
      esc(`${model.dataset} · features ${model.feature_sets.video.join("+")} / ` +
        model.feature_sets.text.join("+"))];
    if (sel.name) parts.push(esc(`selected by ${sel.name} = ${fmt(sel.value, 3)}`));
    $("model-info").innerHTML = parts.join(" · ");
    const { videos } = await api("v1/videos");
    for (const v of videos) {
      state.videos.set(v.vid, v);
      const option = document.createElement("option");
      option.value = v.vid;
      option.textContent = `${v.vid} (${fmt(v.duration, 0)} s, ${v.queries.length} ` +
        `quer${v.queries.length === 1 ? "y" : "ies"})`;
      $("video").append(option);
    }
    if (!videos.length) throw new Error("the served data set has no videos");
    chooseVideo();
    setStatus(`${videos.length} videos in the served data set`);
    document.body.dataset.ready = "true";
  } catch (err) {
    setStatus(err.message, true);
  }
}

$("ask").addEventListener("submit", ask);
$("video").addEventListener("change", chooseVideo);
$("top-k").addEventListener("change", () => { if (state.answer) select(0, false); });
$("player").addEventListener("timeupdate", drawPlayhead);
init();
