"""Load test of the web service: a real uvicorn server on a free loopback port, many concurrent clients.

run() serves the model twice, with request batching off (every request its own model call) and on,
and for /classify and /generate sends `requests` requests from `clients` concurrent httpx clients,
counting failures and timing each request. The server runs in a background thread of this process
(same interpreter), only on 127.0.0.1.
"""
import asyncio
import io
import socket
import threading
import time

import httpx
import numpy as np
from tqdm import tqdm

from imagegpt.service import create_app

REQUEST_TIMEOUT = 120.0   # seconds; a slower request counts as failed


def start(app):
    """Run app with uvicorn on a free loopback port in a daemon thread -> (server, thread, base url)."""
    import uvicorn
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)   # TCP_NODELAY: see serve.listen
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    return srv, thread, f"http://127.0.0.1:{port}"


def stop(srv, thread):
    srv.should_exit = True
    thread.join(timeout=30)


def digit_png(size=(28, 28)):
    """A clearly drawn '1' (a white vertical bar on black) as PNG bytes, at twice the model's size."""
    from PIL import Image, ImageDraw
    h, w = 2 * size[0], 2 * size[1]
    im = Image.new("L", (w, h), 0)
    ImageDraw.Draw(im).line([(w // 2, h // 7), (w // 2, h - h // 7)], fill=255, width=max(2, w // 12))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


async def drive(url, clients, requests, send, desc=None):
    """`requests` calls of send(client) from `clients` concurrent workers -> timings and failures."""
    latencies, failed, rows = [], 0, []
    todo = iter(range(requests))
    bar = tqdm(total=requests, desc=desc, leave=False, disable=desc is None)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT, limits=limits) as client:
        async def worker():
            nonlocal failed
            for _ in todo:
                t0 = time.perf_counter()
                try:
                    r = await send(client)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                    rows.append(r.json().get("batch_rows", 1))
                else:
                    failed += 1
                bar.update()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    bar.close()
    ms = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"requests": requests, "failed": failed, "seconds": round(wall, 3),
            "throughput": round(len(latencies) / wall, 2), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1),
            "mean_batch_rows": round(float(np.mean(rows)), 2) if rows else 0.0}


def senders(ck):
    png = digit_png(tuple(ck.codebook.image_size))

    def classify(client):
        return client.post("/classify", files={"image": ("one.png", png, "image/png")})

    def generate(client):
        return client.post("/generate", json={"count": 1, "top_p": 0.9})

    return {"classify": classify, "generate": generate}


def run(ck, clients, requests, window=0.01, max_rows=64, max_upload=4 << 20, progress=True):
    """-> one row per (batching off/on, endpoint): clients, requests, failed, seconds, throughput
    (successful requests per second), p50/p99 latency in ms, mean rows per model call."""
    out = []
    for batching in (False, True):
        app = create_app(ck, window=window, max_rows=max_rows, batching=batching, max_upload=max_upload)
        srv, thread, url = start(app)
        try:
            for endpoint, send in senders(ck).items():
                asyncio.run(drive(url, min(clients, 4), min(requests, 4), send))   # warm-up, not counted
                mode = "batched" if batching else "one by one"
                res = asyncio.run(drive(url, clients, requests, send,
                                        desc=f"{endpoint}, {mode}" if progress else None))
                out.append({"endpoint": endpoint, "batching": batching, "clients": clients, **res})
        finally:
            stop(srv, thread)
    return out


def table(rows):
    """Rows of run() -> a Markdown table."""
    lines = ["| endpoint | batching | clients | requests | failed | throughput (req/s) | p50 (ms) | p99 (ms) "
             "| rows per model call |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['endpoint']} | {'on' if r['batching'] else 'off'} | {r['clients']} | {r['requests']} "
                     f"| {r['failed']} | {r['throughput']:.1f} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} "
                     f"| {r['mean_batch_rows']:.1f} |")
    return "\n".join(lines)
