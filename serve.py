"""Serve a checkpoint over HTTP: the drawing page at / and the API (classify, generate, complete).

    python serve.py                                  # runs/demo/final on http://127.0.0.1:8000
    python serve.py --backend onnx --ckpt runs/demo/hf    # the model's ONNX graph in onnxruntime
    python serve.py --ckpt hf_out --port 8080        # an exported Hugging Face folder works too
    python serve.py --host 0.0.0.0                   # reachable from other machines (off by default)
    python serve.py --loadtest [--clients 32 --requests 256] [--quick] [--json load.json] [--threads 1]

The load test starts the server on a free loopback port and drives it with concurrent clients,
with and without request batching, and prints throughput and p50/p99 latency per endpoint.
"""
import os
import socket

from imagegpt import checkpoint
from imagegpt.cli import add_backend, add_ckpt, add_device, add_threads, parser, run_cli
from imagegpt.device import resolve_device, use_threads
from imagegpt.errors import UserError
from imagegpt.files import write_json


def build_parser():
    p = parser(__doc__, prog="serve.py")
    add_ckpt(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    add_device(p)
    add_backend(p)
    add_threads(p)
    p.add_argument("--batch_window_ms", type=float, default=10.0,
                   help="how long concurrent requests are collected into one model call")
    p.add_argument("--max_batch", type=int, default=64, help="most rows (images) in one model call")
    p.add_argument("--no_batching", action="store_true", help="every request is its own model call")
    p.add_argument("--max_upload_mb", type=float, default=4.0, help="request bodies over this get 413")
    lt = p.add_argument_group("load test")
    lt.add_argument("--loadtest", action="store_true", help="measure the server instead of serving")
    lt.add_argument("--clients", type=int, default=32, help="concurrent clients")
    lt.add_argument("--requests", type=int, default=256, help="requests per endpoint and mode")
    lt.add_argument("--quick", action="store_true", help="8 clients, 32 requests (a smoke test)")
    lt.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p


def check_args(a):
    if not 0 < a.port < 65536:
        raise UserError(f"--port {a.port}: expected 1..65535")
    if a.threads < 0:
        raise UserError(f"--threads {a.threads}: expected 0 (auto) or a positive number")
    if a.batch_window_ms < 0 or a.batch_window_ms > 1000:
        raise UserError(f"--batch_window_ms {a.batch_window_ms}: expected 0..1000")
    if a.max_batch < 1:
        raise UserError(f"--max_batch {a.max_batch}: expected a positive integer")
    if a.max_upload_mb <= 0:
        raise UserError(f"--max_upload_mb {a.max_upload_mb}: expected a positive number")
    if not (1 <= a.clients <= 1024 and 1 <= a.requests <= 100_000):
        raise UserError(f"--clients {a.clients} --requests {a.requests}: expected 1..1024 clients, 1..100000 requests")
    if (a.json or a.quick) and not a.loadtest:
        raise UserError("--json and --quick are for --loadtest")


def listen(host, port):
    """Bind before loading anything, so that a busy port is a one-line error."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        # IPPROTO_TCP, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on connections of a TCP
        # socket it can recognise as one; without it every answer on a kept-alive connection waited ~40 ms
        sock = socket.socket(info[0], socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except (OSError, socket.gaierror) as e:
        raise UserError(f"{host}:{port}: cannot listen ({e.strerror or e})") from None
    return sock


def main(argv=None):
    a = build_parser().parse_args(argv)
    check_args(a)
    import torch
    import uvicorn

    from imagegpt import loadtest, service
    use_threads(a.threads)   # once, at start-up: the machine's CPUs less what other processes keep busy
    sock = None if a.loadtest else listen(a.host, a.port)
    ck = checkpoint.load(a.ckpt, resolve_device(a.device), a.backend)
    opts = dict(window=a.batch_window_ms / 1000, max_rows=a.max_batch, max_upload=int(a.max_upload_mb * 2**20))
    if a.loadtest:
        clients, requests = (8, 32) if a.quick else (a.clients, a.requests)
        load_before = [round(x, 2) for x in os.getloadavg()]
        rows = loadtest.run(ck, clients, requests, **opts)
        print(loadtest.table(rows))
        print(f"{a.ckpt}, {torch.get_num_threads()} model thread(s), batch window {a.batch_window_ms:g} ms; "
              f"load average before the run {load_before[0]}")
        if a.json:
            write_json(a.json, {"checkpoint": a.ckpt, "threads": torch.get_num_threads(), "clients": clients,
                                "requests": requests, "batch_window_ms": a.batch_window_ms,
                                "load_average_before": load_before, "rows": rows})
        failed = sum(r["failed"] for r in rows)
        return 1 if failed else 0
    app = service.create_app(ck, batching=not a.no_batching, **opts)
    print(f"serving {a.ckpt} on http://{a.host}:{a.port}/ (API docs at /docs); Ctrl-C stops")
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    run_cli(main)
