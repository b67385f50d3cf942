// The page: draw on a canvas (white on black, like the MNIST digits), live class probabilities while
// drawing, "complete my drawing", "draw me N of digit d". Talks only to this server's API.
"use strict";

const $ = (id) => document.getElementById(id);
const pad = $("pad");
const ctx = pad.getContext("2d");
const BRUSH = pad.width * 0.075;     // about 2 pixels of a 28 x 28 digit, like an MNIST stroke
let classes = [];
let drawn = false;                   // anything on the canvas?
let drawing = false;
let last = null;
let timer = null;
let asked = 0;                       // classify requests sent, to drop answers that arrive late

function clearPad() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, pad.width, pad.height);
  drawn = false;
  $("complete").disabled = true;
  asked++;
  showProbs(null);
}

function point(e) {
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}

function stroke(a, b) {
  ctx.strokeStyle = "#fff";
  ctx.fillStyle = "#fff";
  ctx.lineWidth = BRUSH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(a[0], a[1]);
  ctx.lineTo(b[0], b[1]);
  ctx.stroke();
}

pad.addEventListener("pointerdown", (e) => {
  e.preventDefault();
  pad.setPointerCapture(e.pointerId);
  drawing = true;
  last = point(e);
  stroke(last, last);
  changed(false);
});
pad.addEventListener("pointermove", (e) => {
  if (!drawing) return;
  const p = point(e);
  stroke(last, p);
  last = p;
  changed(false);
});
for (const ev of ["pointerup", "pointercancel"]) {
  pad.addEventListener(ev, () => {
    if (!drawing) return;
    drawing = false;
    changed(true);
  });
}

function changed(now) {
  drawn = true;
  $("complete").disabled = false;
  $("probs").dataset.state = "pending";
  clearTimeout(timer);
  timer = setTimeout(classify, now ? 0 : 150);   // live while drawing, at most every 150 ms
}

// The drawing as the model expects a digit: cropped to its strokes, scaled to fit 20 of 28 pixels
// and centred (how MNIST digits were made), as a PNG. The server resizes it to the model's size.
function modelInput() {
  const { width: W, height: H } = pad;
  const px = ctx.getImageData(0, 0, W, H).data;
  let x0 = W, y0 = H, x1 = -1, y1 = -1;
  for (let y = 0; y < H; y++) {
    for (let x = 0; x < W; x++) {
      if (px[(y * W + x) * 4] > 20) {
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        if (y > y1) y1 = y;
      }
    }
  }
  const out = document.createElement("canvas");
  out.width = W;
  out.height = H;
  const o = out.getContext("2d");
  o.fillStyle = "#000";
  o.fillRect(0, 0, W, H);
  if (x1 >= 0) {
    const w = x1 - x0 + 1, h = y1 - y0 + 1;
    const s = Math.min((W * 20 / 28) / w, (H * 20 / 28) / h, 4);
    o.imageSmoothingQuality = "high";
    o.drawImage(pad, x0, y0, w, h, (W - w * s) / 2, (H - h * s) / 2, w * s, h * s);
  }
  return new Promise((resolve) => out.toBlob(resolve, "image/png"));
}

async function api(path, body) {
  const r = await fetch(path, { method: "POST", body,
    headers: body instanceof FormData ? {} : { "content-type": "application/json" } });
  const j = await r.json().catch(() => ({ detail: `HTTP ${r.status}` }));
  if (!r.ok) throw new Error(j.detail || `HTTP ${r.status}`);
  return j;
}

function status(text) {
  $("status").textContent = text || "";
}

async function classify() {
  if (!drawn) return;
  const mine = ++asked;
  const form = new FormData();
  form.append("image", await modelInput(), "drawing.png");
  try {
    const j = await api("/classify", form);
    if (mine !== asked) return;             // the drawing changed meanwhile; a newer answer follows
    showProbs(j);
    status("");
  } catch (err) {
    if (mine === asked) status(`classify: ${err.message}`);
  }
}

function buildBars() {
  const bars = $("bars");
  bars.innerHTML = "";
  classes.forEach((name, c) => {
    const row = document.createElement("div");
    row.className = "bar";
    row.dataset.class = name;
    row.dataset.p = "0";
    row.innerHTML = `<span class="name"></span><span class="track"><span class="fill"></span></span>` +
      `<span class="pct">&ndash;</span>`;
    row.querySelector(".name").textContent = name;
    bars.appendChild(row);
  });
}

function showProbs(j) {
  const rows = $("bars").children;
  const best = j ? j.prediction : -1;
  for (let c = 0; c < rows.length; c++) {
    const p = j ? j.probabilities[c] : 0;
    rows[c].dataset.p = p.toFixed(4);
    rows[c].classList.toggle("best", c === best);
    rows[c].querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    rows[c].querySelector(".pct").textContent = j ? `${Math.round(100 * p)}%` : "\u2013";
  }
  const pred = $("pred");
  pred.textContent = j ? j.label : "\u2013";
  pred.dataset.label = j ? j.label : "";
  $("seen").src = j ? `data:image/png;base64,${j.image_png}` : "";
  $("view").classList.toggle("shown", !!j);
  $("probs").dataset.state = j ? "done" : "empty";
}

function cell(sample, caption) {
  const fig = document.createElement("figure");
  fig.className = "sample";
  const img = document.createElement("img");
  img.src = `data:image/png;base64,${sample.image_png}`;
  img.alt = caption;
  img.title = sample.tokens;
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  fig.append(img, cap);
  return fig;
}

function caption(s) {
  if (s.prediction === null) return "no label";
  const name = classes[s.prediction];
  return `${name} \u00b7 ${Math.round(100 * s.probability)}%`;
}

function showSamples(title, samples, given) {
  $("results-title").textContent = title;
  const g = $("given");
  g.innerHTML = "";
  if (given) g.appendChild(given);
  const box = $("results");
  box.innerHTML = "";
  for (const s of samples) box.appendChild(cell(s, caption(s)));
  box.dataset.count = String(samples.length);
}

function busy(button, on) {
  button.disabled = on;
  button.classList.toggle("busy", on);
}

$("gen-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const count = Math.max(1, Math.min(16, parseInt($("count").value, 10) || 1));
  const body = { count, temperature: parseFloat($("temperature").value), top_p: 0.9 };
  if ($("digit").value !== "") body.digit = parseInt($("digit").value, 10);
  busy($("generate"), true);
  status("drawing\u2026");
  try {
    const j = await api("/generate", JSON.stringify(body));
    const what = body.digit === undefined ? "digits" : `${classes[body.digit]}s`;
    showSamples(`${j.samples.length} ${what} drawn by the model, each with the digit it says it drew`, j.samples);
    status("");
  } catch (err) {
    status(`generate: ${err.message}`);
  } finally {
    busy($("generate"), false);
  }
});

$("complete").addEventListener("click", async () => {
  const form = new FormData();
  form.append("image", await modelInput(), "drawing.png");
  form.append("fraction", "0.5");
  form.append("count", "4");
  form.append("top_p", "0.9");
  busy($("complete"), true);
  status("completing\u2026");
  try {
    const j = await api("/complete", form);
    const given = cell({ image_png: j.given_png, tokens: "" }, `given: ${j.kept} of ${j.total} tokens`);
    given.classList.add("given");
    showSamples("Your drawing, finished by the model (the top half is yours)", j.samples, given);
    status("");
  } catch (err) {
    status(`complete: ${err.message}`);
  } finally {
    busy($("complete"), false);
    $("complete").disabled = !drawn;
  }
});

$("clear").addEventListener("click", clearPad);
$("count").addEventListener("input", () => {
  $("generate").textContent = `Draw me ${$("count").value || 1}`;
});
$("temperature").addEventListener("input", () => {
  $("temp-out").textContent = parseFloat($("temperature").value).toFixed(1);
});

async function start() {
  clearPad();
  try {
    const r = await fetch("/healthz");
    const h = await r.json();
    classes = h.classes;
    buildBars();
    showProbs(null);
    const sel = $("digit");
    classes.forEach((name, c) => sel.add(new Option(name, String(c))));
    if (!h.conditional) {
      sel.disabled = true;
      $("gen-note").textContent = "This model was trained without class conditioning: it draws digits " +
        "of its own choosing and labels each one itself.";
    }
    const mp = (h.parameters / 1e6).toFixed(2);
    $("model-facts").textContent = `model: ${mp} M parameters, ${h.image_size.join("\u00d7")} images, ` +
      `${h.vocab_size} tokens, ${h.device}`;
    document.body.dataset.ready = "1";
  } catch (err) {
    status(`cannot reach the server: ${err.message}`);
  }
}

start();
