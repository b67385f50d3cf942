// The model in the page itself: onnxruntime-web runs the export's three graphs in WebAssembly on the
// CPU (tokenizer.onnx: pixels -> codes; model.onnx: the GPT with its key/value cache; detokenizer.onnx:
// codes -> pixels), and this file does the rest as imagegpt/drawing.py and imagegpt/decoding.py do it
// in Python: the prompts, the token format's mask, classifier-free guidance, temperature, top-k and
// top-p sampling, and the model's own reading of each drawing. service.js offers the same calls over
// serve.py's HTTP API. model.json (written by hf_export.py --web) says what the model is.
"use strict";

import * as ort from "../ort/ort.wasm.bundle.min.mjs";

const TOP_P_TOL = 1e-6;   // as decoding.TOP_P_TOL: a cumulative probability this close to p reaches it

// WebAssembly threads need SharedArrayBuffer, which a browser gives only to a cross-origin isolated page
// (COOP and COEP headers). A plain static host (python -m http.server) sends no such headers: 1 thread.
// ?threads=N asks for N where the page is isolated.
function wasmThreads() {
  const asked = parseInt(new URLSearchParams(location.search).get("threads") || "0", 10);
  if (!self.crossOriginIsolated) return 1;
  return asked > 0 ? asked : Math.min(4, navigator.hardwareConcurrency || 1);
}

export async function open() {
  const r = await fetch("model.json");
  if (!r.ok) throw new Error(`model.json: HTTP ${r.status}`);
  const m = await r.json();
  const threads = wasmThreads();
  ort.env.wasm.numThreads = threads;
  // the export's own copy of the binary, beside the module (whose WebAssembly glue is bundled in); no CDN
  ort.env.wasm.wasmPaths = { wasm: new URL("../ort/ort-wasm-simd-threaded.wasm", import.meta.url).href };
  const options = { executionProviders: ["wasm"], graphOptimizationLevel: "all" };
  const sessions = [];
  for (const g of ["tokenizer", "model", "detokenizer"]) {
    sessions.push(await ort.InferenceSession.create(`onnx/${m.graphs[g]}`, options));
  }
  return new BrowserModel(m, threads, ...sessions);
}

const int64 = (values, dims) => new ort.Tensor("int64", BigInt64Array.from(values, (v) => BigInt(v)), dims);

function roundHalfEven(x) {       // Python's round() and torch.round(): halves go to the even neighbour
  const r = Math.round(x);
  return Math.abs(x % 1) === 0.5 && r % 2 ? r - 1 : r;
}

function softmax(z) {             // Float64Array of logits (-Infinity: ruled out) -> probabilities
  let max = -Infinity;
  for (const v of z) if (v > max) max = v;
  const p = new Float64Array(z.length);
  let sum = 0;
  for (let i = 0; i < z.length; i++) sum += (p[i] = Math.exp(z[i] - max));
  for (let i = 0; i < z.length; i++) p[i] /= sum;
  return p;
}

function argmax(z) {
  let best = 0;
  for (let i = 1; i < z.length; i++) if (z[i] > z[best]) best = i;
  return best;
}

// A seeded generator (mulberry32): the same seed gives the same drawings in this page.
function generator(seed) {
  let a = (seed === undefined ? crypto.getRandomValues(new Uint32Array(1))[0] : seed) >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// The next token from logits (Float64Array, -Infinity where the format rules a token out), as
// decoding.choose_next: greedy at temperature 0; else softmax(logits / temperature) after top-k (ties
// with the k-th value kept) and top-p (the smallest most probable set reaching p, at least one token).
export function choose(logits, temperature, topK, topP, random) {
  if (temperature === 0) return argmax(logits);
  const max = logits[argmax(logits)];
  const z = logits.map((v) => (v - max) / temperature);
  if (topK > 0 && topK < z.length) {
    const kth = Float64Array.from(z).sort().reverse()[topK - 1];
    for (let i = 0; i < z.length; i++) if (z[i] < kth) z[i] = -Infinity;
  }
  if (topP < 1) {
    const p = softmax(z);
    const sorted = Float64Array.from(p).sort().reverse();
    let before = 0, threshold = sorted[0];
    for (const q of sorted) {
      if (before >= topP - TOP_P_TOL) break;
      threshold = q;
      before += q;
    }
    for (let i = 0; i < z.length; i++) if (p[i] < threshold) z[i] = -Infinity;
  }
  const p = softmax(z);
  let u = random(), i = 0;
  for (; i < p.length - 1; i++) {
    if ((u -= p[i]) < 0) break;
  }
  while (p[i] === 0) i--;          // rounding left u above the total: the last possible token instead
  return i;
}

// Classifier-free guidance, as decoding.guide: cond + (scale - 1) * (cond - uncond).
function guide(cond, uncond, scale) {
  const z = new Float64Array(cond.length);
  for (let i = 0; i < z.length; i++) z[i] = cond[i] + (scale - 1) * (cond[i] - uncond[i]);
  return z;
}

class BrowserModel {
  constructor(m, threads, tokenizer, gpt, detokenizer) {
    this.m = m;
    this.t = m.tokens;
    this.tokenizer = tokenizer;
    this.gpt = gpt;
    this.detokenizer = detokenizer;
    const [H, W] = m.image_size;
    this.H = H;
    this.W = W;
    this.info = { classes: m.classes, imageSize: m.image_size, channels: m.channels, conditional: m.conditional,
      guidance: m.guidance, temperature: m.temperature, parameters: m.parameters, vocabSize: m.vocab_size,
      runs: `in this browser (onnxruntime-web, ${threads} thread${threads > 1 ? "s" : ""})`, backend: "browser" };
    const names = (prefix, n) => Array.from({ length: n },   // as token_format.Vocab names them
      (_, k) => `<${prefix}_${String(k).padStart(Math.max(3, String(n - 1).length), "0")}>`);
    const P = this.t.palette || 0;
    this.names = ["<PAD>", "<UNK>", "<IMG>", "</IMG>", "<CLS>", "<EOS>"]
      .concat(names("Z", this.t.num_codes), names("C", P), names("D", P))
      .concat(Array.from({ length: this.t.num_classes }, (_, c) => `<CLS_${c}>`));
  }

  // ImageData at the model's size -> its uint8 pixels (H, W, C): grey as Pillow's convert("L") makes it
  // (ITU-R 601-2 luma in fixed point), colour as R, G, B.
  pixels(image) {
    const { data } = image, C = this.m.channels, n = this.H * this.W;
    const out = new Uint8Array(n * C);
    for (let i = 0; i < n; i++) {
      const [r, g, b] = [data[4 * i], data[4 * i + 1], data[4 * i + 2]];
      if (C === 1) out[i] = (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16;
      else out.set([r, g, b], 3 * i);
    }
    return out;
  }

  async encode(images) {          // ImageData list -> code rows (tokenizer.onnx)
    const n = images.length, size = this.H * this.W * this.m.channels, L = this.m.seq_len;
    const px = new Uint8Array(n * size);
    images.forEach((im, i) => px.set(this.pixels(im), i * size));
    const { codes } = await this.tokenizer.run({ images: new ort.Tensor("uint8", px, [n, this.H, this.W, this.m.channels]) });
    return Array.from({ length: n }, (_, i) => Array.from(codes.data.subarray(i * L, (i + 1) * L), Number));
  }

  // The GPT on new tokens `rows` (equal lengths) after the cached ones -> [the last position's logits of
  // each row, the cache to pass next]; the cache is the present.* outputs, fed back as past_key_values.*.
  async step(rows, cache) {
    const B = rows.length, T = rows[0].length, past = cache ? cache.length : 0;
    const { n_layer: layers, n_head: heads, head_dim: hd } = this.m;
    const feeds = {
      input_ids: int64(rows.flat(), [B, T]),
      attention_mask: int64(new Array(B * (past + T)).fill(1), [B, past + T]),
      position_ids: int64(rows.flatMap(() => Array.from({ length: T }, (_, i) => past + i)), [B, T]),
    };
    for (let i = 0; i < layers; i++) {
      for (const kv of ["key", "value"]) {
        feeds[`past_key_values.${i}.${kv}`] = cache ? cache.tensors[`present.${i}.${kv}`]
          : new ort.Tensor("float32", new Float32Array(0), [B, heads, 0, hd]);
      }
    }
    const out = await this.gpt.run(feeds);
    const V = this.m.vocab_size, data = out.logits.data;
    const last = Array.from({ length: B }, (_, b) => data.subarray((b * T + T - 1) * V, (b * T + T) * V));
    return [last, { length: past + T, tensors: out }];
  }

  labelProbs(logits) {            // logits at <CLS> -> probabilities over the label tokens only
    const o = this.t.label_offset;
    return Array.from(softmax(Float64Array.from(logits.subarray(o, o + this.t.num_classes))));
  }

  prefix(codes) {                 // '<IMG> codes </IMG> <CLS>': what the classifier reads
    return [this.t.img, ...codes.map((k) => k + this.t.code_offset), this.t.img_end, this.t.cls];
  }

  async read(codeRows) {          // the classifier on each image -> probabilities per class
    const [last] = await this.step(codeRows.map((c) => this.prefix(c)), null);
    return last.map((z) => this.labelProbs(z));
  }

  async pictures(codeRows) {      // code rows (-1: missing, black) -> PNG data URLs (detokenizer.onnx)
    const n = codeRows.length, L = this.m.seq_len, C = this.m.channels, { H, W } = this;
    const { images } = await this.detokenizer.run({ codes: int64(codeRows.flat(), [n, L]) });
    const canvas = document.createElement("canvas");
    canvas.width = W;
    canvas.height = H;
    const ctx = canvas.getContext("2d");
    return codeRows.map((_, i) => {
      const img = ctx.createImageData(W, H);
      for (let p = 0; p < H * W; p++) {
        for (let c = 0; c < 3; c++) {
          // x * 255 in float32 (Math.fround), then rounded half to even: as torch gives the service's pixels
          img.data[4 * p + c] = roundHalfEven(Math.fround(255 * images.data[(i * H * W + p) * C + (C === 1 ? 0 : c)]));
        }
        img.data[4 * p + 3] = 255;
      }
      ctx.putImageData(img, 0, 0);
      return canvas.toDataURL("image/png");
    });
  }

  tokens(ids) {
    return ids.map((i) => this.names[i]).join(" ");
  }

  async classify(image) {
    const [codes] = await this.encode([image]);
    const [probabilities] = await this.read([codes]);
    const [seen] = await this.pictures([codes]);
    return { probabilities, prediction: argmax(probabilities), tokens: this.tokens(this.prefix(codes)), seen };
  }

  prompt(label, kept = []) {      // as drawing.prompt: '<CLS_label> <IMG>' or '<IMG>', then kept codes
    const start = label === null ? [this.t.img] : [this.t.label_offset + label, this.t.img];
    return start.concat(kept.map((k) => k + this.t.code_offset));
  }

  async generate(o) {
    return this.draw(new Array(o.count).fill(this.prompt(o.label)), o);
  }

  async complete(image, o) {
    const [codes] = await this.encode([image]);
    const L = this.m.seq_len, head = this.t.colour_tokens || 0;   // as drawing.kept: the colours, then a share of the rest
    const keep = head + Math.max(1, roundHalfEven(o.fraction * (L - head)));   // the fraction is above 0 here
    const kept = codes.slice(0, keep);
    const samples = await this.draw(new Array(o.count).fill(this.prompt(o.label, kept)), o);
    const [given] = await this.pictures([kept.concat(new Array(L - keep).fill(-1))]);
    return { given, kept: keep, total: L, samples };
  }

  // Continue equal prompts into complete images, held to the token format at every step (codes until
  // the image is whole, then '</IMG> <CLS> label <EOS>', or '</IMG> <EOS>' after a stated class), with
  // guidance for a stated class: its prompt with the class unstated ('<UNK> <IMG> ...') decodes beside
  // it in the same batch.
  async draw(prompts, o) {
    const t = this.t, L = this.m.seq_len, B = prompts.length;
    const stated = o.label !== null, guided = stated && o.guidance !== 1;
    const rows = guided ? prompts.concat(prompts.map((p) => [t.unk, ...p.slice(1)])) : prompts;
    const start = prompts[0].length - (stated ? 2 : 1);                 // codes already in the prompt
    const one = (id) => [[id, id + 1]];
    const tail = stated ? [one(t.img_end), one(t.eos)]
      : [one(t.img_end), one(t.cls), [[t.label_offset, t.label_offset + t.num_classes]], one(t.eos)];
    const steps = L - start + tail.length;
    const random = generator(o.seed);
    const out = prompts.map((p) => p.slice());
    let probs = new Array(B).fill(null);
    let [last, cache] = await this.step(rows, null);
    for (let s = 0; s < steps; s++) {
      const k = start + s - L;                                         // < 0: a code; else the k-th of the tail
      const allowed = k < 0 ? [this.m.code_ranges[start + s].map((c) => t.code_offset + c)] : tail[k];
      const chosen = out.map((ids, b) => {
        const z = guided ? guide(last[b], last[B + b], o.guidance) : Float64Array.from(last[b]);
        const masked = new Float64Array(z.length).fill(-Infinity);
        for (const [lo, hi] of allowed) masked.set(z.subarray(lo, hi), lo);
        return choose(masked, o.temperature, o.topK, o.topP, random);
      });
      chosen.forEach((tok, b) => out[b].push(tok));
      if (s === steps - 1) break;
      [last, cache] = await this.step((guided ? chosen.concat(chosen) : chosen).map((tok) => [tok]), cache);
      if (!stated && chosen[0] === t.cls) probs = last.map((z) => this.labelProbs(z));   // read at <CLS>
    }
    const codes = out.map((ids) => ids.slice(stated ? 2 : 1, (stated ? 2 : 1) + L).map((i) => i - t.code_offset));
    if (stated) probs = await this.read(codes);                         // the model's own reading of each
    const images = await this.pictures(codes);
    return out.map((ids, b) => ({
      image: images[b], tokens: this.tokens(ids), label: stated ? o.label : ids[ids.length - 2] - t.label_offset,
      prediction: argmax(probs[b]), probability: Math.max(...probs[b]), wellFormed: this.isComplete(ids, stated),
    }));
  }

  isComplete(ids, stated) {        // as Vocab.is_complete / is_cond_complete
    const t = this.t, L = this.m.seq_len, isCode = (i) => i >= t.code_offset && i < t.label_offset;
    const head = stated ? 2 : 1, codes = ids.slice(head, head + L), rest = ids.slice(head + L);
    const want = stated ? [t.img_end, t.eos] : [t.img_end, t.cls, null, t.eos];
    return codes.length === L && codes.every(isCode) && rest.length === want.length
      && rest.every((v, i) => want[i] === null ? v >= t.label_offset && v < t.label_offset + t.num_classes : v === want[i]);
  }
}
