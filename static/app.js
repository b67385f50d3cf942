// The page: a canvas to draw on (or an image file to open or drop), the model's reading of it while you
// draw, "complete my drawing" and "draw me N (of a class)". The title, the texts and the colours follow
// the model: its class names, grey or colour. The same page runs the model in one of two ways behind
// one interface (info, classify, generate, complete), chosen by <body data-backend>:
//   service.js  serve.py's HTTP API (python serve.py)
//   browser.js  onnxruntime-web in this page (the static folder of python hf_export.py --web OUT)
"use strict";

const $ = (id) => document.getElementById(id);
const pad = $("pad");
const ctx = pad.getContext("2d");
const ink = document.createElement("canvas");   // the strokes (or an opened image) on a transparent layer
const inkCtx = ink.getContext("2d", { willReadFrequently: true });
let model = null;                    // the backend: {info, classify, generate, complete}
let info = null;
let words = null;                    // the page's texts for this model's classes
let scale = 10;                      // canvas pixels per model pixel
let source = "drawing";              // "drawing" (cropped and centred) or "upload" (kept whole)
let drawn = false;                   // anything on the canvas?
let drawing = false;
let last = null;
let timer = null;
let asked = 0;                       // classify requests sent, to drop answers that arrive late
let temperatureTouched = false;

const colour = () => info && info.channels === 3;
const brush = () => (colour() ? $("brush").value : "#ffffff");
const background = () => (colour() ? $("background").value : "#000000");

// ----------------------------------------------------------------------------- texts from the classes

function article(name) {
  return `${/^[aeiou]/i.test(name) ? "an" : "a"} ${name.replace(/_/g, " ")}`;
}

function either(items) {             // ["a circle", "a square", "a triangle"] -> "a circle, a square or a triangle"
  return items.length < 2 ? items.join("") : `${items.slice(0, -1).join(", ")} or ${items[items.length - 1]}`;
}

// Digits (classes "0".."9") keep the page's old words; other classes are named: "Draw a circle, a
// square or a triangle" (up to eight of them; more are counted).
function texts(classes) {
  if (classes.every((c) => /^\d$/.test(c))) {
    return { title: "Draw a digit", noun: "digit", what: "which digit it is", many: "digits",
      drawn: (n, c) => `${n} ${c === null ? "digits" : `${classes[c]}s`} drawn by the model, each with the digit it says it drew` };
  }
  const list = classes.length <= 8 ? either(classes.map(article)) : `one of ${classes.length} kinds of picture`;
  return { title: `Draw ${list}`, noun: "class", what: `whether it shows ${either(classes.map(article))}`, many: "pictures",
    drawn: (n, c) => `${n} drawings${c === null ? "" : ` of ${article(classes[c])}`} by the model, each captioned with the class it reads in it` };
}

// ----------------------------------------------------------------------------- the canvas

function render() {                  // background, then the strokes
  ctx.fillStyle = background();
  ctx.fillRect(0, 0, pad.width, pad.height);
  ctx.drawImage(ink, 0, 0);
  pad.style.background = background();
}

function clearPad() {
  inkCtx.clearRect(0, 0, ink.width, ink.height);
  source = "drawing";
  drawn = false;
  render();
  $("complete").disabled = true;
  asked++;
  showProbs(null);
}

function point(e) {
  const r = pad.getBoundingClientRect();
  return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
}

function stroke(a, b) {
  inkCtx.strokeStyle = brush();
  inkCtx.lineWidth = pad.width * 0.075;    // about 2 pixels of a 28 x 28 digit, like an MNIST stroke
  inkCtx.lineCap = "round";
  inkCtx.lineJoin = "round";
  inkCtx.beginPath();
  inkCtx.moveTo(a[0], a[1]);
  inkCtx.lineTo(b[0], b[1]);
  inkCtx.stroke();
  render();
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

// An image file (opened or dropped) fills the canvas, stretched to the model's shape as the service's
// resize does; it is then kept whole (not cropped), and can be drawn on.
async function openImage(file) {
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch (err) {
    status(`${file.name}: not an image this browser can read`);
    return;
  }
  inkCtx.clearRect(0, 0, ink.width, ink.height);
  inkCtx.imageSmoothingQuality = "high";
  inkCtx.drawImage(bitmap, 0, 0, ink.width, ink.height);
  source = "upload";
  render();
  status("");
  changed(true);
}

document.querySelector("label.file").addEventListener("keydown", (e) => {   // the label is a button for keys too
  if (e.key === "Enter" || e.key === " ") {
    e.preventDefault();
    $("file").click();
  }
});
$("file").addEventListener("change", () => {
  if ($("file").files[0]) openImage($("file").files[0]);
  $("file").value = "";
});
pad.addEventListener("dragover", (e) => e.preventDefault());
pad.addEventListener("drop", (e) => {
  e.preventDefault();
  const file = e.dataTransfer.files[0];
  if (file) openImage(file);
});

// The picture as the model takes it, made here for both backends, in three steps:
//   crop    a drawing is cut to the box around its strokes (an opened image is kept whole);
//   centre  the box is scaled to fit 20/28 of the frame (at most 4x) and centred in it, as the MNIST
//           digits were made;
//   resize  the frame, `scale` times the model's size, becomes the model's size by averaging each
//           scale x scale block of pixels.
// -> ImageData at the model's size (opaque RGBA).
function modelInput() {
  const { width: W, height: H } = pad;
  const frame = document.createElement("canvas");
  frame.width = W;
  frame.height = H;
  const f = frame.getContext("2d");
  f.fillStyle = background();
  f.fillRect(0, 0, W, H);
  f.imageSmoothingQuality = "high";
  const box = source === "upload" ? null : inkBox();
  if (source === "upload") {
    f.drawImage(ink, 0, 0);
  } else if (box) {
    const [x0, y0, w, h] = box;
    const s = Math.min((W * 20 / 28) / w, (H * 20 / 28) / h, 4);
    f.drawImage(ink, x0, y0, w, h, (W - w * s) / 2, (H - h * s) / 2, w * s, h * s);
  }
  const big = f.getImageData(0, 0, W, H).data;
  const out = new ImageData(W / scale, H / scale);
  for (let y = 0; y < out.height; y++) {
    for (let x = 0; x < out.width; x++) {
      for (let c = 0; c < 4; c++) {
        let sum = 0;
        for (let dy = 0; dy < scale; dy++) {
          for (let dx = 0; dx < scale; dx++) sum += big[((y * scale + dy) * W + x * scale + dx) * 4 + c];
        }
        out.data[(y * out.width + x) * 4 + c] = Math.round(sum / (scale * scale));
      }
    }
  }
  return out;
}

function inkBox() {                  // [x, y, w, h] around the strokes, or null
  const { width: W, height: H } = ink;
  const a = inkCtx.getImageData(0, 0, W, H).data;
  let x0 = W, y0 = H, x1 = -1, y1 = -1;
  for (let y = 0; y < H; y++) {
    for (let x = 0; x < W; x++) {
      if (a[(y * W + x) * 4 + 3] > 20) {
        if (x < x0) x0 = x;
        if (x > x1) x1 = x;
        if (y < y0) y0 = y;
        if (y > y1) y1 = y;
      }
    }
  }
  return x1 < 0 ? null : [x0, y0, x1 - x0 + 1, y1 - y0 + 1];
}

function dataUrl(image) {            // ImageData -> PNG data URL (the input the model was given)
  const c = document.createElement("canvas");
  c.width = image.width;
  c.height = image.height;
  c.getContext("2d").putImageData(image, 0, 0);
  return c.toDataURL("image/png");
}

// ----------------------------------------------------------------------------- the model's answers

function status(text) {
  $("status").textContent = text || "";
}

async function classify() {
  if (!drawn) return;
  const mine = ++asked;
  const image = modelInput();
  try {
    const r = await model.classify(image);
    if (mine !== asked) return;             // the drawing changed meanwhile; a newer answer follows
    showProbs(r, image);
    status("");
  } catch (err) {
    if (mine === asked) status(`classify: ${err.message}`);
  }
}

function buildBars() {
  const bars = $("bars");
  bars.innerHTML = "";
  info.classes.forEach((name) => {
    const row = document.createElement("div");
    row.className = "bar";
    row.dataset.class = name;
    row.dataset.p = "0";
    row.innerHTML = `<span class="name"></span><span class="track"><span class="fill"></span></span>` +
      `<span class="pct">&ndash;</span>`;
    row.querySelector(".name").textContent = name;
    row.querySelector(".name").title = name;
    bars.appendChild(row);
  });
}

function showProbs(r, image) {
  const rows = $("bars").children;
  const best = r ? r.prediction : -1;
  for (let c = 0; c < rows.length; c++) {
    const p = r ? r.probabilities[c] : 0;
    rows[c].dataset.p = p.toFixed(6);
    rows[c].classList.toggle("best", c === best);
    rows[c].querySelector(".fill").style.width = `${(100 * p).toFixed(1)}%`;
    rows[c].querySelector(".pct").textContent = r ? `${Math.round(100 * p)}%` : "\u2013";
  }
  const pred = $("pred");
  const label = r ? info.classes[r.prediction] : "";
  pred.textContent = r ? label : "\u2013";
  pred.dataset.label = label;
  const seen = $("seen");
  seen.src = r ? r.seen : "";
  seen.dataset.tokens = r ? r.tokens : "";
  seen.dataset.input = r ? dataUrl(image) : "";    // the pixels the model was given (for tests and the curious)
  $("view").classList.toggle("shown", !!r);
  $("probs").dataset.state = r ? "done" : "empty";
}

function cell(sample, text) {
  const fig = document.createElement("figure");
  fig.className = "sample";
  fig.dataset.wellFormed = String(sample.wellFormed);
  fig.dataset.tokens = sample.tokens;
  const img = document.createElement("img");
  img.src = sample.image;
  img.alt = text;
  img.title = sample.tokens;
  const cap = document.createElement("figcaption");
  cap.textContent = text;
  fig.append(img, cap);
  return fig;
}

function caption(s) {
  if (s.prediction === null) return "no label";
  return `${info.classes[s.prediction]} \u00b7 ${Math.round(100 * s.probability)}%`;
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

function settings() {                // the sampling settings of the form
  const label = $("class").value === "" ? null : parseInt($("class").value, 10);
  const topK = Math.max(0, parseInt($("top-k").value, 10) || 0);
  const topP = Math.min(1, Math.max(0.01, parseFloat($("top-p").value) || 1));
  return { label, temperature: parseFloat($("temperature").value), topK, topP,
    guidance: parseFloat($("guidance").value) };
}

$("gen-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const count = Math.max(1, Math.min(16, parseInt($("count").value, 10) || 1));
  const o = { ...settings(), count };
  busy($("generate"), true);
  status("drawing\u2026");
  try {
    const samples = await model.generate(o);
    showSamples(words.drawn(samples.length, o.label), samples);
    status("");
  } catch (err) {
    status(`generate: ${err.message}`);
  } finally {
    busy($("generate"), false);
  }
});

$("complete").addEventListener("click", async () => {
  const o = { ...settings(), count: 4, fraction: 0.5 };
  busy($("complete"), true);
  status("completing\u2026");
  try {
    const j = await model.complete(modelInput(), o);
    const given = cell({ image: j.given, tokens: "", wellFormed: false }, `given: ${j.kept} of ${j.total} tokens`);
    given.classList.add("given");
    showSamples(`Your ${source === "upload" ? "picture" : "drawing"}, finished by the model (the top half is yours)`,
      j.samples, given);
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
  temperatureTouched = true;
  $("temp-out").textContent = parseFloat($("temperature").value).toFixed(1);
});
$("guidance").addEventListener("input", () => {
  $("guidance-out").textContent = parseFloat($("guidance").value).toFixed(1);
});
$("class").addEventListener("change", () => {   // a chosen class draws at the model's own default temperature
  if (temperatureTouched) return;
  $("temperature").value = $("class").value === "" ? 1 : info.temperature;
  $("temp-out").textContent = parseFloat($("temperature").value).toFixed(1);
});
$("background").addEventListener("input", () => {
  render();
  if (drawn) changed(true);
});

// ----------------------------------------------------------------------------- start

function fitTo(info) {               // the page for this model: texts, colours, canvas size, controls
  words = texts(info.classes);
  $("title").textContent = words.title;
  document.title = `imagegpt-tokens: ${words.title.toLowerCase()}`;
  $("subtitle").textContent = `A small GPT reads your ${colour() ? "picture" : "drawing"} as a sequence of ` +
    `codebook tokens, says ${words.what}, finishes it, or draws ${words.many} of its own.`;
  $("class-word").textContent = `of ${words.noun}`;
  $("colours").hidden = !colour();
  const [H, W] = info.imageSize;
  scale = Math.max(1, Math.ceil(280 / W));
  pad.width = ink.width = W * scale;
  pad.height = ink.height = H * scale;
  pad.style.aspectRatio = `${W} / ${H}`;
  buildBars();
  const sel = $("class");
  info.classes.forEach((name, c) => sel.add(new Option(name, String(c))));
  $("guidance").value = info.guidance;
  $("guidance-out").textContent = Number(info.guidance).toFixed(1);
  $("guidance-label").hidden = !info.conditional;
  if (!info.conditional) {
    sel.disabled = true;
    $("gen-note").textContent = `This model was trained without class conditioning: it draws ${words.many} ` +
      "of its own choosing and labels each one itself.";
  }
  $("api-link").hidden = info.backend !== "service";
  const mp = (info.parameters / 1e6).toFixed(2);
  $("model-facts").textContent = `model: ${mp} M parameters, ${info.imageSize.join("\u00d7")} ` +
    `${colour() ? "colour" : "grey"} images, ${info.vocabSize} tokens, running ${info.runs}`;
}

async function start() {
  const how = document.body.dataset.backend === "browser" ? "browser" : "service";
  try {
    const backend = await import(how === "browser" ? "./browser.js" : "./service.js");
    model = await backend.open();
  } catch (err) {
    status(how === "browser" ? `cannot load the model in this browser: ${err.message}`
      : `cannot reach the server: ${err.message}`);
    return;
  }
  info = model.info;
  fitTo(info);
  clearPad();
  window.imagegpt = { model, info, modelInput };   // for the browser tests and the benchmark
  document.body.dataset.ready = "1";
}

start();
