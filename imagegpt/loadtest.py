"""Load test of the web service on loopback, bounded in count and time: throughput, a flood, a stop in
the middle of a flood, and a client that disconnects.

    result = main("runs/demo/final", ServiceConfig(), ["throughput", "flood", "drain", "disconnect"])
    print(report(result)); save("loadtest.json", result)

- throughput (run): the app served twice in a thread of this process, request batching off and on;
  `requests` /classify uploads and /generate requests from `clients` concurrent httpx clients.
- flood: serve.py in a subprocess; 48 clients (each from its own loopback address, 127.0.0.2 up, so
  that the service tells them apart) send 288 requests for 64 drawings, one after another each, and
  wait out the Retry-After of a refusal before their next request (none is sent again). Measured:
  answers by status, refusal and accepted latency, /healthz latency during the flood (a probe every
  0.1 s), the server's peak resident memory (VmHWM).
- drain: the same flood of 96 requests, and a SIGTERM to the service 2 s in (once it has admitted
  work): every request the service admitted must reach its client (its count of 200 and 503 answers,
  printed as it stops, equals the clients'), and the process must exit 0 within --drain_s.
- disconnect: behind three requests of other clients, and with a batch window of 1 s (so that a job
  waits visibly), a client asks for 64 drawings and closes its connection while its job waits: /metrics
  must show it dropped and only the drawings of the three requests ahead made.
"""
import asyncio
import contextlib
import gc
import io
import os
import shlex
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

import httpx
import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from imagegpt import checkpoint, drain
from imagegpt.provenance import machine, write_result
from imagegpt.served import REQUEST_TIMEOUT, Served, Where, client_at, metric, scrape, wait_for
from imagegpt.service import create_app
from imagegpt.settings import flat

RETRY_AFTER_CAP = 5.0     # seconds: the longest a flood client waits after a refusal


def start(app):
    """Run app (service.create_app) with uvicorn on a free loopback port in a daemon thread -> (server,
    thread, base url); the server drains as serve.py's does (srv.handle_exit(signal.SIGTERM, None))."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)   # TCP_NODELAY: see serve.listen
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    srv = drain.server(app, log_level="error")
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


def run(ck, clients, requests, cfg=None, progress=True):
    """-> one row per (batching off/on, endpoint): clients, requests, failed, seconds, throughput
    (successful requests per second), p50/p99 latency in ms, mean rows per model call."""
    out = []
    for batching in (False, True):
        app = create_app(ck, cfg, batching=batching)
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


# ----------------------------------------------------------------------------- the service in a subprocess

@dataclass
class Crowd:
    """The size of the flood and drain scenarios."""

    clients: int = 48
    """concurrent clients, each from its own loopback address"""
    requests: int = 288
    """flood requests in all, shared evenly between the clients"""
    count: int = 64
    """drawings per request"""
    drain_requests: int = 96
    """requests of the flood that a SIGTERM interrupts"""
    signal_after_s: float = 2.0
    """seconds into that flood when the service gets its SIGTERM (once it has work in flight)"""


QUICK = Crowd(clients=8, requests=24, count=32, drain_requests=16, signal_after_s=0.5)
QUICK_QUEUE = {"max_queue": 64, "max_client_queue": 64}     # so that a quick flood meets the bound too


def ms_summary(seconds):
    """Latencies in seconds -> {n, p50, p99, max} in ms (None when there are none)."""
    if not seconds:
        return {"n": 0, "p50": None, "p99": None, "max": None}
    ms = np.array(seconds) * 1000
    return {"n": len(ms), "p50": round(float(np.percentile(ms, 50)), 1),
            "p99": round(float(np.percentile(ms, 99)), 1), "max": round(float(ms.max()), 1)}


async def crowd(url, clients, requests, count, stop_on_refused_connection=False):
    """`requests` POST /generate of `count` drawings from `clients` clients (127.0.0.2 up), one after another
    each, waiting out each refusal's Retry-After (capped) -> a list of (status or error name, seconds)."""
    out = []

    async def client(c, n):
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                r = await c.post("/generate", json={"count": count, "top_p": 0.9})
            except httpx.HTTPError as e:
                out.append((type(e).__name__, time.perf_counter() - t0))
                if stop_on_refused_connection and isinstance(e, httpx.ConnectError):
                    return          # the service has stopped listening
                continue
            out.append((r.status_code, time.perf_counter() - t0))
            if r.status_code == 503:
                await asyncio.sleep(min(RETRY_AFTER_CAP, float(r.headers.get("retry-after", 1))))

    async with contextlib.AsyncExitStack() as stack:     # every client opened before the first request
        opened = [await stack.enter_async_context(client_at(url, f"127.0.0.{2 + i}")) for i in range(clients)]
        await asyncio.gather(*(client(c, requests // clients + (i < requests % clients)) for i, c in enumerate(opened)))
    return out


def outcome(answers):
    """(status or error name, seconds) pairs -> {str(status): count}."""
    counts = {}
    for status, _ in answers:
        counts[str(status)] = counts.get(str(status), 0) + 1
    return counts


def flood(ckpt, cfg, size, where, changes=None):
    """The flood against serve.py in a subprocess (see the module's docstring) -> a dict of figures."""
    srv = Served(ckpt, cfg, where, **(changes or {}))
    try:
        health, rss_peak = [], [0.0]

        async def probe(done):
            async with client_at(srv.url, "127.0.0.1") as c:
                while not done.is_set():
                    t0 = time.perf_counter()
                    await c.get("/healthz")
                    health.append(time.perf_counter() - t0)
                    rss_peak[0] = max(rss_peak[0], srv.memory_mb() or 0.0)
                    await asyncio.sleep(0.1)

        async def scenario():
            done = asyncio.Event()
            prober = asyncio.create_task(probe(done))
            answers = await crowd(srv.url, size.clients, size.requests, size.count)
            done.set()
            await prober
            return answers

        rss_before = srv.memory_mb()
        t0 = time.perf_counter()
        answers = asyncio.run(scenario())
        wall = time.perf_counter() - t0
        samples = scrape(srv.url)
        peak = srv.memory_mb("VmHWM")
    finally:
        srv.stop()
    ok = [t for s, t in answers if s == 200]
    calls = metric(samples, "imagegpt_batch_rows_count", kind="draw")
    return {"clients": size.clients, "requests": size.requests, "count": size.count, "answers": outcome(answers),
            "unanswered": sum(1 for s, _ in answers if s not in (200, 503)),
            "refused_ms": ms_summary([t for s, t in answers if s == 503]), "accepted_ms": ms_summary(ok),
            "healthz_ms": ms_summary(health), "rss_mb_before": round(rss_before or 0, 1),
            "rss_mb_peak": round(peak or rss_peak[0], 1), "seconds": round(wall, 2),
            "drawings_per_s": round(len(ok) * size.count / wall, 1),
            "rows_per_model_call": round(metric(samples, "imagegpt_batch_rows_sum", kind="draw") / calls, 1) if calls else 0,
            "refused_by_reason": {r: int(metric(samples, "imagegpt_refused_total", reason=r))
                                  for r in ("queue_full", "client_full", "draining")},
            "command": " ".join(shlex.quote(a) for a in srv.command)}


def stopped_line(out):
    """serve.py's last line 'stopped after a drain of X s...; answered: n x 200, m x 503' -> (X, {status: n})."""
    for line in reversed(out.splitlines()):
        if line.startswith("stopped after a drain of "):
            seconds = float(line.split()[5])
            answered = line.split("answered: ", 1)[1]
            counts = {} if answered == "nothing" else \
                {part.split(" x ")[1]: int(part.split(" x ")[0]) for part in answered.split(", ")}
            return seconds, counts
    return None, {}


def drain_under_flood(ckpt, cfg, size, where, changes=None):
    """A SIGTERM `size.signal_after_s` into a flood of `size.drain_requests` requests -> a dict of figures."""
    srv = Served(ckpt, cfg, where, **(changes or {}))
    try:
        async def scenario():
            flood_task = asyncio.create_task(crowd(srv.url, size.clients, size.drain_requests, size.count,
                                                   stop_on_refused_connection=True))
            await asyncio.sleep(size.signal_after_s)
            await wait_for(srv.url, lambda m: metric(m, "imagegpt_queue_rows") > 0)   # with work in flight
            t_signal = time.perf_counter()
            srv.proc.send_signal(signal.SIGTERM)
            answers = await flood_task
            return answers, t_signal

        answers, t_signal = asyncio.run(scenario())
        try:
            code = srv.proc.wait(timeout=cfg.drain_s + 60)
        except subprocess.TimeoutExpired:
            code = None
        exit_s = time.perf_counter() - t_signal
    finally:
        out, err = srv.stop()
    drained_s, server = stopped_line(out)
    clients = outcome(answers)
    api = {k: v for k, v in server.items()}
    transport = {k: v for k, v in clients.items() if not k.isdigit()}
    return {"clients": size.clients, "requests": size.drain_requests, "count": size.count,
            "signal_after_s": size.signal_after_s, "answers": clients, "server_answered": api,
            "every_admitted_request_answered": clients.get("200", 0) == api.get("200", 0)
            and clients.get("503", 0) == api.get("503", 0) and set(transport) <= {"ConnectError"},
            "exit_code": code, "exit_s": round(exit_s, 2), "drain_s": drained_s, "drain_limit_s": cfg.drain_s,
            "stderr": err.strip()[-300:], "command": " ".join(shlex.quote(a) for a in srv.command)}


def disconnect(ckpt, cfg, count, where):
    """A client that leaves while its request waits -> what /metrics shows. Three requests of `count`
    drawings from three other clients come first, and the batch window is 1 s, so that the leaving
    client's job waits at least a second and three model calls for its turn (longer on a slower machine)."""
    srv = Served(ckpt, cfg, where, batch_window_ms=1000.0, max_queue=max(cfg.max_queue, 4 * count))
    try:
        async def leave():
            async with contextlib.AsyncExitStack() as stack:
                c = await stack.enter_async_context(httpx.AsyncClient(base_url=srv.url, timeout=REQUEST_TIMEOUT))
                ahead = [await stack.enter_async_context(client_at(srv.url, f"127.0.0.{10 + i}")) for i in range(3)]
                first = [asyncio.create_task(a.post("/generate", json={"count": count})) for a in ahead]
                await wait_for(srv.url, lambda m: metric(m, "imagegpt_queue_rows") >= 3 * count)
                reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
                body = f'{{"count": {count}}}'.encode()
                writer.write(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                await writer.drain()
                waited = await wait_for(srv.url, lambda m: metric(m, "imagegpt_queue_rows") >= 4 * count)
                writer.close()                        # the client goes away while its job waits
                await writer.wait_closed()
                dropped = await wait_for(srv.url, lambda m: metric(m, "imagegpt_dropped_total",
                                                                   reason="disconnected") >= 1)
                statuses = [(await t).status_code for t in first]
                before = await asyncio.to_thread(scrape, srv.url)
                r = await c.post("/generate", json={"count": 4})
                after = await asyncio.to_thread(scrape, srv.url)
                return waited, dropped, statuses, before, r.status_code, after

        waited, dropped, ahead, before, status, after = asyncio.run(leave())
    finally:
        srv.stop()
    return {"count": count, "queued_seen": waited, "drop_seen": dropped, "requests_ahead": ahead,
            "dropped_requests": int(metric(before, "imagegpt_dropped_total", reason="disconnected")),
            "dropped_rows": int(metric(before, "imagegpt_dropped_rows_total", reason="disconnected")),
            "drawings_made": int(metric(before, "imagegpt_drawings_total")),
            "drawings_ahead": 3 * count,
            "model_calls": int(metric(before, "imagegpt_batch_rows_count", kind="draw")),
            "next_request": status, "drawings_made_after_it": int(metric(after, "imagegpt_drawings_total")),
            "command": " ".join(shlex.quote(a) for a in srv.command)}


# ----------------------------------------------------------------------------- the whole test and its record

def main(ckpt, cfg, scenarios, quick=False, load=(32, 256), where=None):
    """Run the chosen scenarios -> a result dict (figures and provenance) for report() and save(). load:
    (clients, requests) of the throughput scenario; where: how serve.py runs the model (served.Where)."""
    where = where or Where()
    gc.freeze()     # torch's objects are never garbage: a full collection over them (~80 ms) is not the service's
    size = QUICK if quick else Crowd()
    changes = QUICK_QUEUE if quick else {}
    facts = {"model_threads": where.threads or torch.get_num_threads(), "device": str(where.device),
             "seeds": "none sent: the service draws each call's seed at random",
             "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.perf_counter()
    result = {"run": facts, "settings": {**flat(cfg), **changes}, "crowd": size.__dict__}
    if "throughput" in scenarios:
        ck = checkpoint.load(ckpt, where.device, where.backend)
        n_clients, n_requests = (8, 32) if quick else load
        result["throughput"] = run(ck, n_clients, n_requests, cfg, progress=not quick)
    if "flood" in scenarios:
        result["flood"] = flood(ckpt, cfg, size, where, changes)
    if "drain" in scenarios:
        result["drain"] = drain_under_flood(ckpt, cfg, size, where, changes)
    if "disconnect" in scenarios:
        result["disconnect"] = disconnect(ckpt, cfg, size.count, where)
    facts["wall_s"] = round(time.perf_counter() - t0, 1)
    facts["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    return result


def passed(result):
    """No failed request; every admitted request answered across a SIGTERM and exit 0; a left job not computed."""
    ok = all(r["failed"] == 0 for r in result.get("throughput", []))
    if "flood" in result:
        ok &= result["flood"]["unanswered"] == 0
    if "drain" in result:
        d = result["drain"]
        ok &= d["exit_code"] == 0 and d["every_admitted_request_answered"]
    if "disconnect" in result:
        d = result["disconnect"]
        ok &= d["dropped_requests"] == 1 and d["drawings_made"] == d["drawings_ahead"] and d["next_request"] == 200
    return bool(ok)


def save(path, result, cfg):
    """Write the result with its provenance (imagegpt/provenance.py): commit, command, machine, versions."""
    return write_result(path, result, config=cfg, dtype="fp32")


def report(result, m=None):
    """The result as Markdown tables, with the issue's targets beside the flood's figures; m: the machine that
    ran it (default: this one)."""
    parts = []
    if "throughput" in result:
        parts.append(table(result["throughput"]))
    if "flood" in result:
        f = result["flood"]
        parts.append(f"flood: {f['requests']} requests for {f['count']} drawings from {f['clients']} clients, "
                     f"{f['seconds']} s\n\n| measure | figure | target |\n|---|---|---|\n"
                     f"| answers | {fmt_answers(f['answers'])} | every request answered |\n"
                     f"| refusal latency p50 / p99 / max (ms) | {fmt_ms(f['refused_ms'])} | < 100 |\n"
                     f"| accepted latency p50 / p99 / max (ms) | {fmt_ms(f['accepted_ms'])} | p50 <= 2000, p99 <= 5000 |\n"
                     f"| /healthz during the flood p50 / p99 / max (ms), {f['healthz_ms']['n']} probes "
                     f"| {fmt_ms(f['healthz_ms'])} | < 100 |\n"
                     f"| server memory before / peak (MB) | {f['rss_mb_before']} / {f['rss_mb_peak']} | bounded |\n"
                     f"| drawings per second, rows per model call | {f['drawings_per_s']}, {f['rows_per_model_call']} | |")
    if "drain" in result:
        d = result["drain"]
        parts.append(f"drain: SIGTERM {d['signal_after_s']} s into a flood of {d['requests']} requests for "
                     f"{d['count']} drawings from {d['clients']} clients\n\n| measure | figure |\n|---|---|\n"
                     f"| clients got | {fmt_answers(d['answers'])} |\n"
                     f"| the service answered (its last line) | {fmt_answers(d['server_answered'])} |\n"
                     f"| every admitted request answered | {'yes' if d['every_admitted_request_answered'] else 'NO'} |\n"
                     f"| exit code, seconds from SIGTERM to exit | {d['exit_code']}, {d['exit_s']} "
                     f"(drain {d['drain_s']} s of at most {d['drain_limit_s']:g}) |")
    if "disconnect" in result:
        d = result["disconnect"]
        parts.append(f"disconnect: a request for {d['count']} drawings whose client leaves while it waits\n\n"
                     f"| /metrics after it | value |\n|---|---|\n"
                     f"| imagegpt_dropped_total{{reason=\"disconnected\"}} | {d['dropped_requests']} |\n"
                     f"| imagegpt_dropped_rows_total{{reason=\"disconnected\"}} | {d['dropped_rows']} |\n"
                     f"| imagegpt_drawings_total (model calls): the {d['drawings_ahead']} drawings of the three requests "
                     f"ahead only | {d['drawings_made']} ({d['model_calls']}) |\n"
                     f"| the next request, and imagegpt_drawings_total after it | {d['next_request']}, "
                     f"{d['drawings_made_after_it']} |")
    p, m = result["run"], m or machine()
    parts.append(f"{m['cpu']}, {m['cores_available']} cores, {p['model_threads']} model thread(s); load average "
                 f"before {p['load_average_before']}, after {p['load_average_after']}; {p['wall_s']} s")
    return "\n\n".join(parts)


def fmt_answers(counts):
    return ", ".join(f"{n} x {k}" for k, n in sorted(counts.items())) or "none"


def fmt_ms(s):
    return "-" if s["n"] == 0 else f"{s['p50']:.0f} / {s['p99']:.0f} / {s['max']:.0f}"
