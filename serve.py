"""Serve a checkpoint over HTTP: the drawing page at / and the API (classify, generate, complete).

    python serve.py                                  # runs/demo/final on http://127.0.0.1:8000
    python serve.py --backend onnx --ckpt runs/demo/hf    # the model's ONNX graph in onnxruntime
    python serve.py --ckpt hf_out --port 8080        # an exported Hugging Face folder works too
    IMAGEGPT_API_KEY=... python serve.py --host 0.0.0.0   # other machines too: only with an API key
    python serve.py --loadtest [--quick] [--scenarios flood,drain] [--json docs/results/load.json]

The service admits at most --max_queue drawings and images at a time (503 with Retry-After past it),
drops work whose deadline passed or whose client left, and on SIGTERM or Ctrl-C finishes what it
admitted (up to --drain_s) and exits 0. /metrics serves Prometheus metrics, /readyz readiness.

The load test starts the service on loopback and measures it: throughput with batching off and on, a
flood of 288 requests for 64 drawings from 48 clients, a SIGTERM in the middle of a flood, and a client
that disconnects (see imagegpt/loadtest.py and docs/service.md).
"""
import socket

from imagegpt import access, checkpoint
from imagegpt.cli import add_backend, add_ckpt, add_device, add_threads, parser, run_cli
from imagegpt.device import resolve_device, use_threads
from imagegpt.errors import UserError
from imagegpt.service_config import ServiceConfig
from imagegpt.settings import add_options, apply_options

SCENARIOS = ("throughput", "flood", "drain", "disconnect")


def build_parser():
    p = parser(__doc__, prog="serve.py")
    add_ckpt(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (127.0.0.1: this machine only; any other needs an API key)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    add_device(p)
    add_backend(p)
    add_threads(p)
    add_options(p, ServiceConfig)
    lt = p.add_argument_group("load test")
    lt.add_argument("--loadtest", action="store_true", help="measure the service on loopback instead of serving")
    lt.add_argument("--scenarios", default=",".join(SCENARIOS),
                    help="which parts of the load test to run, comma-separated (default: %(default)s)")
    lt.add_argument("--clients", type=int, default=32, help="concurrent clients of the throughput part")
    lt.add_argument("--requests", type=int, default=256, help="requests per endpoint and mode of the throughput part")
    lt.add_argument("--quick", action="store_true", help="every part small (a smoke test, as the tests run it)")
    lt.add_argument("--json", metavar="FILE", help="also write the results as JSON, with the run's provenance")
    return p


def check_args(args):
    if not 0 < args.port < 65536:
        raise UserError(f"--port {args.port}: expected 1..65535")
    if args.threads < 0:
        raise UserError(f"--threads {args.threads}: expected 0 (auto) or a positive number")
    if not (1 <= args.clients <= 1024 and 1 <= args.requests <= 100_000):
        raise UserError(f"--clients {args.clients} --requests {args.requests}: expected 1..1024 clients, 1..100000 requests")
    if (args.json or args.quick) and not args.loadtest:
        raise UserError("--json and --quick are for --loadtest")
    unknown = set(args.scenarios.split(",")) - set(SCENARIOS)
    if unknown or not args.scenarios:
        raise UserError(f"--scenarios {args.scenarios}: expected some of {','.join(SCENARIOS)}")
    return apply_options(ServiceConfig(), args).check()


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
    args = build_parser().parse_args(argv)
    cfg = check_args(args)
    if args.loadtest:
        return load_test(args, cfg)
    key = access.read_key(cfg.api_key_env, cfg.api_key_file)
    sock = listen(args.host, args.port)
    try:
        access.check_exposure(sock.getsockname()[0], key, cfg.api_key_env)
    except UserError:
        sock.close()
        raise
    from imagegpt import drain, service   # FastAPI and uvicorn load only now: a bad flag, port or key fails fast
    use_threads(args.threads)   # once, at start-up: the machine's CPUs less what other processes keep busy
    ck = checkpoint.load(args.ckpt, resolve_device(args.device), args.backend)
    app = service.create_app(ck, cfg, api_key=key)
    where = f"--api_key_file {cfg.api_key_file}" if cfg.api_key_file else f"${cfg.api_key_env}"
    print(f"serving {args.ckpt} on http://{args.host}:{args.port}/ (API docs at /docs, metrics at /metrics); "
          f"{f'API key from {where}' if key else 'no API key'}; Ctrl-C or SIGTERM stops", flush=True)
    server = drain.server(app)
    server.run(sockets=[sock])
    answered = ", ".join(f"{n} x {status}" for status, n in sorted(app.state.metrics.answered().items()))
    if server.drained_in is not None:
        cut = "; work still waiting at the limit got 503" if server.cut else ""
        print(f"stopped after a drain of {server.drained_in:.1f} s{cut}; answered: {answered or 'nothing'}", flush=True)
    return 0


def load_test(args, cfg):
    from imagegpt import loadtest, served   # httpx and the service load only now, as in main()
    use_threads(args.threads)
    where = served.Where(args.threads, resolve_device(args.device), args.backend)
    result = loadtest.main(args.ckpt, cfg, args.scenarios.split(","), quick=args.quick, load=(args.clients, args.requests),
                           where=where)
    print(loadtest.report(result))
    if args.json:
        loadtest.save(args.json, result, cfg)
        print(f"wrote {args.json}")
    return 0 if loadtest.passed(result) else 1


if __name__ == "__main__":
    run_cli(main)
