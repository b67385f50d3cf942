"""The page's speed in a real browser (bench.py --only web): the static page of `hf_export.py --web`
running the model in Chromium with onnxruntime-web, beside the same page running it through serve.py,
the same calls of the page's model interface (static/app.js: classify, generate) timed in the page.

    measure(ck, export, threads=(1, 2), ...) -> {"rows": [...], ...}

Rows: the page in the browser (model.onnx, and model_quantized.onnx where the export has it) and the page
through serve.py (PyTorch on the CPU, in this process), each at 1 and 2 threads (WebAssembly threads;
torch's intra-op threads). Measured per row: classification latency (p50, p99 in ms) of one drawing,
from its pixels at the model's size to the class probabilities and the picture decoded from its codes;
and drawings per second ("draw me N", any class, top-p 0.9) at batch 1 and 8.

WebAssembly threads need a cross-origin isolated page, which takes two response headers
(Cross-Origin-Opener-Policy: same-origin, Cross-Origin-Embedder-Policy: require-corp). A plain static
host, python -m http.server included, sends neither, so the page runs on 1 thread there; this benchmark
serves the 2-thread rows with those headers (the 1-thread rows without them, as such a host would).
"""
import functools
import os
import statistics
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

from imagegpt import loadtest, service, web_export
from imagegpt.errors import UserError

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


# runs in the page once it is ready: the page's own model interface, timed with performance.now()
TIMING = """async ({pixels, n, warmup, counts, reps}) => {
  const m = window.imagegpt.model, info = window.imagegpt.info, [H, W] = info.imageSize;
  const image = new ImageData(new Uint8ClampedArray(pixels), W, H);
  for (let i = 0; i < warmup; i++) await m.classify(image);
  const classify = [];
  for (let i = 0; i < n; i++) {
    const t = performance.now();
    await m.classify(image);
    classify.push(performance.now() - t);
  }
  const draw = {};
  for (const count of counts) {
    const o = { count, temperature: 1, topK: 0, topP: 0.9, label: null, guidance: 1 };
    await m.generate({ ...o, seed: 0 });
    draw[count] = [];
    for (let r = 1; r <= reps; r++) {
      const t = performance.now();
      await m.generate({ ...o, seed: r });
      draw[count].push(performance.now() - t);
    }
  }
  return { classify, draw, runs: info.runs, isolated: self.crossOriginIsolated };
}"""


def percentile(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def _row(name, side, threads, r, counts):
    return {"key": f"{side}_t{threads}", "side": name, "threads": threads, "runs": r["runs"],
            "isolated": r["isolated"], "classify_ms": {"p50": percentile(r["classify"], 50),
                                                        "p99": percentile(r["classify"], 99), "n": len(r["classify"])},
            "drawings_per_s": {str(c): c / (statistics.median(r["draw"][str(c)]) / 1000) for c in counts},
            "draw_ms": r["draw"]}


def measure(ck, export, threads=(1, 2), n=200, warmup=10, counts=(1, 8), reps=5, image=None, log=print):
    """Time the page of the export folder `export` (written with --onnx: onnx/ and model.json) in Chromium,
    in the browser and through serve.py (PyTorch, ck), at each number of threads. image: uint8 (H, W, C)
    to classify (default: a blank one). Returns {"rows": [...], "browser": version, "onnxruntime_web": ...}."""
    import tempfile

    from playwright.sync_api import sync_playwright
    if not os.path.exists(CHROMIUM):
        raise UserError(f"{CHROMIUM}: no such browser; the web benchmark drives Debian's chromium (apt-get install chromium)")
    H, W = ck.codebook.image_size
    img = np.zeros((H, W, ck.codebook.channels), np.uint8) if image is None else np.asarray(image, np.uint8)
    rgba = np.concatenate([img.repeat(3 // img.shape[-1], -1), np.full((H, W, 1), 255, np.uint8)], -1)
    args = {"pixels": rgba.flatten().tolist(), "n": n, "warmup": warmup, "counts": list(counts), "reps": reps}
    graphs = [("model.onnx", False)] + [("model_quantized.onnx", True)] * os.path.isfile(
        os.path.join(export, "onnx", "model_quantized.onnx"))
    rows = []
    torch_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="web-bench-") as tmp, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            for graph, int8 in graphs:
                site = os.path.join(tmp, graph)
                web_export.write_site(export, site, int8=int8)
                for t in threads:
                    host = StaticHost(site, isolated=t > 1)
                    try:
                        log(f"[web] the page in the browser, {graph}, {t} thread(s)")
                        r = _time_page(browser, f"{host.url}/?threads={t}", args)
                    finally:
                        host.close()
                    if t > 1 and not (r["isolated"] and f"{t} threads" in r["runs"]):
                        raise UserError(f"the page did not run {t} WebAssembly threads ({r['runs']})")
                    rows.append(_row(f"the page in the browser (onnxruntime-web, {graph})",
                                     "browser_int8" if int8 else "browser", t, r, counts))
            app = service.create_app(ck)
            srv, thread, url = loadtest.start(app)
            try:
                for t in threads:
                    torch.set_num_threads(t)
                    log(f"[web] the page through serve.py (PyTorch), {t} thread(s)")
                    rows.append(_row("the page through serve.py (PyTorch)", "service", t,
                                     _time_page(browser, url + "/", args), counts))
            finally:
                loadtest.stop(srv, thread)
                torch.set_num_threads(torch_threads)
            version = browser.version
        finally:
            browser.close()
    return {"rows": rows, "browser": f"chromium {version}", "classify_calls": n, "draw_reps": reps,
            "onnxruntime_web": web_export.ort_dist()[1], "image": "given" if image is not None else "blank"}


def _time_page(browser, url, args):
    page = browser.new_page()
    try:
        page.goto(url)
        page.wait_for_selector("body[data-ready='1']", timeout=120000)
        r = page.evaluate(TIMING, args)
        r["draw"] = {str(k): v for k, v in r["draw"].items()}
        return r
    finally:
        page.close()
