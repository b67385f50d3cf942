// The model behind the page, reached over the service's HTTP API (serve.py: /healthz, /classify,
// /generate, /complete), with its API key when it has one. browser.js offers the same calls with the
// model running in the page itself.
// Every picture the page sends already has the model's size (app.js makes it), so the service only
// tokenises it.
"use strict";

// The API key, when the service has one (its /healthz says key_required): asked for once on the page and
// kept in sessionStorage, so for this tab only (a reload keeps it, a new tab or a closed one forgets it),
// and sent on every call as "Authorization: Bearer <key>". A call answered 401 asks again.
const KEY = "imagegpt-api-key";
let key = sessionStorage.getItem(KEY);
let asking = null;

function askKey(note) {    // show the key form -> a promise of the key typed there
  if (asking) return asking;
  const form = document.getElementById("key-form");
  const input = document.getElementById("key");
  document.getElementById("key-note").textContent = note;
  document.body.dataset.keyAsks = String(Number(document.body.dataset.keyAsks || 0) + 1);
  form.hidden = false;
  input.focus();
  asking = new Promise((resolve) => {
    form.addEventListener("submit", function given(event) {
      event.preventDefault();
      const value = input.value.trim();
      if (!value) return;
      form.removeEventListener("submit", given);
      form.hidden = true;
      input.value = "";
      sessionStorage.setItem(KEY, value);
      key = value;
      asking = null;
      resolve(value);
    });
  });
  return asking;
}

function headers(more) {
  return key ? { ...more, authorization: `Bearer ${key}` } : more;
}

async function api(path, body) {
  const kind = body instanceof FormData ? {} : { "content-type": "application/json" };
  let r = await fetch(path, { method: "POST", body, headers: headers(kind) });
  while (r.status === 401) {          // no key yet, or a wrong one: ask, then send the same call again
    sessionStorage.removeItem(KEY);
    key = null;
    await askKey("The service refused the key. Enter its API key again (kept for this tab only).");
    r = await fetch(path, { method: "POST", body, headers: headers(kind) });
  }
  const j = await r.json().catch(() => ({ detail: `HTTP ${r.status}` }));
  if (!r.ok) throw new Error(j.detail || `HTTP ${r.status}`);
  return j;
}

function png(image) {      // ImageData (the model's size) -> a PNG Blob to upload
  const c = document.createElement("canvas");
  c.width = image.width;
  c.height = image.height;
  c.getContext("2d").putImageData(image, 0, 0);
  return new Promise((resolve) => c.toBlob(resolve, "image/png"));
}

const url = (b64) => `data:image/png;base64,${b64}`;

function sample(s) {
  return { image: url(s.image_png), tokens: s.tokens, label: s.label, prediction: s.prediction,
    probability: s.probability, wellFormed: s.well_formed };
}

function sampling(o) {     // the page's settings -> the API's fields (a class and guidance only when asked)
  const body = { count: o.count, temperature: o.temperature, top_k: o.topK, top_p: o.topP };
  if (o.label !== null) {
    body.class = o.label;
    body.guidance = o.guidance;
  }
  if (o.seed !== undefined) body.seed = o.seed;
  return body;
}

export async function open() {
  const r = await fetch("healthz");
  if (!r.ok) throw new Error(`healthz: HTTP ${r.status}`);
  const h = await r.json();
  if (h.key_required && !key) await askKey("This service needs its API key. The page keeps it for this tab only.");
  const info = { classes: h.classes, imageSize: h.image_size, channels: h.channels, conditional: h.conditional,
    guidance: h.guidance, temperature: h.temperature, parameters: h.parameters, vocabSize: h.vocab_size,
    runs: `on the server (${h.device})`, backend: "service" };
  return {
    info,
    async classify(image) {
      const form = new FormData();
      form.append("image", await png(image), "drawing.png");
      const j = await api("classify", form);
      return { probabilities: j.probabilities, prediction: j.prediction, tokens: j.tokens, seen: url(j.image_png) };
    },
    async generate(o) {
      const j = await api("generate", JSON.stringify(sampling(o)));
      return j.samples.map(sample);
    },
    async complete(image, o) {
      const form = new FormData();
      form.append("image", await png(image), "drawing.png");
      for (const [k, v] of Object.entries({ ...sampling(o), fraction: o.fraction })) form.append(k, String(v));
      const j = await api("complete", form);
      return { given: url(j.given_png), kept: j.kept, total: j.total, samples: j.samples.map(sample) };
    },
  };
}
