// The model behind the page, reached over the service's HTTP API (serve.py: /healthz, /classify,
// /generate, /complete). browser.js offers the same calls with the model running in the page itself.
// Every picture the page sends already has the model's size (app.js makes it), so the service only
// tokenises it.
"use strict";

async function api(path, body) {
  const r = await fetch(path, { method: "POST", body,
    headers: body instanceof FormData ? {} : { "content-type": "application/json" } });
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
