"""The page's speed in a real browser (bench.py --only web): the static page of `hf_export.py --web`
running the model in Chromium with onnxruntime-web, beside the same page running it through serve.py,
the same calls of the page's model interface (static/app.js: classify, generate) timed in the page.

    measure(ck, export, threads=(1, 2), ...) -> {"rows": [...], ...}

Rows: the page in the browser (model.onnx, and model_quantized.onnx where the export has it) and the page
through serve.py (PyTorch on the CPU, `python serve.py --threads N` in a process of its own), each at 1
and 2 threads (WebAssembly threads; torch's intra-op threads). Measured per row: classification latency
(p50, p99 in ms) of one drawing, from its pixels at the model's size to the class probabilities and the
picture decoded from its codes (through serve.py: the PNG upload and the JSON answer too); and drawings
per second ("draw me N", any class, top-p 0.9) at batch 1 and 8.

WebAssembly threads need a cross-origin isolated page, which takes two response headers
(Cross-Origin-Opener-Policy: same-origin, Cross-Origin-Embedder-Policy: require-corp). A plain static
host, python -m http.server included, sends neither, so the page runs on 1 thread there; this benchmark
serves the 2-thread rows with those headers (the 1-thread rows without them, as such a host would).
"""
import functools
import os
import shutil
import statistics
import tempfile
import threading
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from imagegpt import checkpoint, huggingface, web_export
from imagegpt.errors import UserError
from imagegpt.served import Served, Where
from imagegpt.split_images import test_images

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp"}


class _Handler(SimpleHTTPRequestHandler):
    headers_to_send = {}

    def end_headers(self):
        for k, v in self.headers_to_send.items():
            self.send_header(k, v)
        super().end_headers()

    def log_message(self, *args):        # quiet
        pass


class StaticHost:
    """A static file server on a free loopback port, in a thread: plain (as python -m http.server) or
    cross-origin isolated (the COOP and COEP headers that WebAssembly threads need)."""

    def __init__(self, folder, isolated=False):
        handler = type("Handler", (_Handler,), {"headers_to_send": ISOLATION if isolated else {}})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=folder))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# run in the page once it is ready: the page's own model interface, timed with performance.now()
WARMUP = """async ({pixels, warmup, counts}) => {
  const m = window.imagegpt.model, [H, W] = window.imagegpt.info.imageSize;
  window.benchImage = new ImageData(new Uint8ClampedArray(pixels), W, H);
  for (let i = 0; i < warmup; i++) await m.classify(window.benchImage);
  for (const count of counts) {
    await m.generate({ count, temperature: 1, topK: 0, topP: 0.9, label: null, guidance: 1, seed: 0 });
  }
  return { runs: window.imagegpt.info.runs, isolated: self.crossOriginIsolated };
}"""
CHUNK = """async ({n, counts, seed}) => {
  const m = window.imagegpt.model, classify = [], draw = {};
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    await m.classify(window.benchImage);
    classify.push(performance.now() - t);
  }
  for (const count of counts) {
    const t = performance.now();
    await m.generate({ count, temperature: 1, topK: 0, topP: 0.9, label: null, guidance: 1, seed });
    draw[count] = performance.now() - t;
  }
  return { classify, draw };
}"""


def percentile(xs, q):
    return float(np.percentile(np.asarray(xs), q))


@dataclass
class Rounds:
    """How the page is timed: n classifications per row in all, `reps` rounds, warm-up calls first, and the
    batch sizes of the drawing calls."""
    n: int = 200
    reps: int = 5
    warmup: int = 10
    counts: tuple = (1, 8)


def measure(ck, export, threads=(1, 2), rounds=Rounds(), image=None, log=print):
    """Time the page of the export folder `export` (written with --onnx: onnx/ and model.json) in Chromium,
    in the browser and through serve.py (a process of its own, on ck's folder), at each number of threads.
    Every row's page stays open and the rows take turns, `rounds.reps` rounds of n / reps classifications and
    one drawing call of each batch size, the order reversed every round, so that a shared machine's drift
    falls on all of them alike. image: uint8 (H, W, C) to classify (default: a blank one).
    Returns {"rows": [...], "browser": version, "onnxruntime_web": ...}."""
    from playwright.sync_api import sync_playwright   # optional: only the web benchmark drives a browser
    if not os.path.exists(CHROMIUM):
        raise UserError(f"{CHROMIUM}: no such browser; the web benchmark drives Debian's chromium (apt-get install chromium)")
    H, W = ck.codebook.image_size
    img = np.zeros((H, W, ck.codebook.channels), np.uint8) if image is None else np.asarray(image, np.uint8)
    rgba = np.concatenate([img.repeat(3 // img.shape[-1], -1), np.full((H, W, 1), 255, np.uint8)], -1)
    closers = []
    with tempfile.TemporaryDirectory(prefix="web-bench-") as tmp, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            rows = sides(ck, export, threads, tmp, closers)
            for row in rows:
                open_page(browser, row, rgba, rounds, log)
            per = max(1, rounds.n // rounds.reps)
            for r in range(rounds.reps):
                log(f"[web] round {r + 1} of {rounds.reps}: {per} classifications and a drawing call of each batch "
                    f"size per row")
                for row in rows if r % 2 == 0 else rows[::-1]:
                    got = row["page"].evaluate(CHUNK, {"n": per, "counts": list(rounds.counts), "seed": r + 1})
                    row["classify"] += got["classify"]
                    for c, ms in got["draw"].items():
                        row["draw"][str(c)].append(ms)
            version = browser.version
        finally:
            browser.close()
            for c in closers:
                c.close()
    return {"rows": [summary(row) for row in rows], "browser": f"chromium {version}",
            "classify_calls": per * rounds.reps, "draw_reps": rounds.reps,
            "onnxruntime_web": web_export.ort_dist()[1], "image": "given" if image is not None else "blank"}


def sides(ck, export, threads, tmp, closers):
    """The rows to time: the static page of each graph of the export (served from tmp) and the page through
    serve.py, at each number of threads; what must be closed after goes to `closers`."""
    graphs = [("model.onnx", False)] + [("model_quantized.onnx", True)] * os.path.isfile(
        os.path.join(export, "onnx", "model_quantized.onnx"))
    rows = []
    for graph, int8 in graphs:
        site = os.path.join(tmp, graph)
        web_export.write_site(export, site, int8=int8)
        for t in threads:
            host = StaticHost(site, isolated=t > 1)
            closers.append(host)
            rows.append({"key": f"{'browser_int8' if int8 else 'browser'}_t{t}", "threads": t,
                         "side": f"the page in the browser (onnxruntime-web, {graph})", "url": f"{host.url}/?threads={t}"})
    for t in threads:
        svc = Served(ck.folder, where=Where(threads=t, device="auto"))
        closers.append(svc)
        rows.append({"key": f"service_t{t}", "threads": t, "side": "the page through serve.py (PyTorch)",
                     "url": svc.url + "/"})
    return rows


def open_page(browser, row, rgba, rounds, log):
    """Open the row's page, wait until its model is ready and warm it up (checking its WebAssembly threads)."""
    log(f"[web] opening {row['side']}, {row['threads']} thread(s)")
    row["page"] = page = browser.new_page()
    page.goto(row["url"])
    page.wait_for_selector("body[data-ready='1']", timeout=120000)
    row.update(page.evaluate(WARMUP, {"pixels": rgba.flatten().tolist(), "warmup": rounds.warmup,
                                      "counts": list(rounds.counts)}))
    if row["threads"] > 1 and row["key"].startswith("browser") and \
            not (row["isolated"] and f"{row['threads']} threads" in row["runs"]):
        raise UserError(f"the page did not run {row['threads']} WebAssembly threads ({row['runs']})")
    row["classify"], row["draw"] = [], {str(c): [] for c in rounds.counts}


def summary(row):
    """A timed row -> its figures: classification latency p50 / p99 and drawings per second."""
    return {"key": row["key"], "side": row["side"], "threads": row["threads"], "runs": row["runs"],
            "isolated": row["isolated"],
            "classify_ms": {"p50": percentile(row["classify"], 50), "p99": percentile(row["classify"], 99),
                            "n": len(row["classify"])},
            "drawings_per_s": {c: int(c) / (statistics.median(ms) / 1000) for c, ms in row["draw"].items()},
            "draw_ms": row["draw"]}


def measure_checkpoint(ckpt, threads, n, reps, log=print):
    """The page of the checkpoint `ckpt` exported with --onnx --quantize int8 (in a temporary folder),
    classifying a real test image of its data (or a blank one): measure()'s result and the checkpoint."""
    web_export.ort_dist()                                   # npm ci first: before the export work
    ck = checkpoint.load(ckpt)
    image = test_images(ck)[0]
    folder = tempfile.mkdtemp(prefix="bench-web-")
    try:
        log(f"[web] exporting {ck.folder} with --onnx --quantize int8")
        huggingface.write_export(ck, os.path.join(folder, "hf"), onnx="int8")
        r = measure(ck, os.path.join(folder, "hf"), threads, Rounds(n=n, reps=reps),
                    image=None if image is None else image[0], log=log)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    r["checkpoint"] = ck.folder
    return r
