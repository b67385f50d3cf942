"""The benchmark run (bench.py): its sections (train, sample, sample_demo, kmeans, web, threads) measured in
one run on one machine by their modules (train_bench, sample_bench, kmeans_bench, web_bench,
thread_bench), the machine they ran on, and the summary rows (bench_report).

    out = run(args, checked, command)   # bench.py's parsed options, and what its check made of them
"""
import os
import platform
import shutil
import tempfile
import time

import torch

from imagegpt import cpu_linear, thread_bench, web_bench
from imagegpt.bench_report import rows
from imagegpt.codebook_config import CodebookConfig
from imagegpt.device import check_memory, cpu_kernels, resolve_device, use_threads
from imagegpt.errors import UserError
from imagegpt.flops import MatmulPeak
from imagegpt.kmeans_bench import bench_kmeans, kmeans_data
from imagegpt.measure import Timing, log
from imagegpt.sample_bench import Pair, bench_classify, bench_sample, export_pair
from imagegpt.settings import read_yaml
from imagegpt.train_bench import bench_train, bf16_kernels
from model import GPTConfig

SECTIONS = ("train", "sample", "sample_demo", "kmeans", "web", "threads")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_length():
    """Input tokens of a default sequence: (28/p)^2 codes + <IMG> </IMG> <CLS> <CLS_y> <EOS>, minus 1."""
    return (28 // CodebookConfig().patch_size) ** 2 + 5 - 1


def demo_config(vocab_size):
    """The demo model's sizes (config/demo.yaml: layers, heads, width; its max_length as the block, or
    the data's length when the config leaves it to the data)."""
    d = read_yaml(os.path.join(ROOT, "config", "demo.yaml"))
    return GPTConfig(vocab_size=vocab_size, block_size=d.get("max_length") or default_length() + 1,
                     n_layer=d["n_layer"], n_head=d["n_head"], n_embd=d["n_embd"])


def ints(text, what):
    """Comma-separated positive integers, or a UserError naming the option."""
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise UserError(f"{what}: expected positive integers, got {text!r}")
    return vals


def check_fits(args, sections, mcfg, lengths, batches):
    """Refuse, before minutes of measuring, a section whose two models (ours, HF) could not fit in memory."""
    n = mcfg.num_params_estimate()   # two models (ours, HF) side by side, each training or sampling
    L, d, V = mcfg.n_layer, mcfg.n_embd, mcfg.vocab_size
    need = {"train": 2 * (16 * n + 4 * args.batch * max(lengths) * (16 * L * d + 3 * V)) + 12 * (args.matmul_n or 2048) ** 2,
            "sample": 2 * (4 * n + 4 * max(batches) * mcfg.block_size * (2 * L * d + V)),
            "sample_demo": 2 * (4 * demo_config(V).num_params_estimate()),
            "kmeans": 4 * (args.kmeans_n or 300000) * (5 + args.kmeans_k) if args.kmeans_n else 0, "web": 0, "threads": 0}
    for s in sorted(sections):
        check_memory(need[s], f"the {s} benchmark at these sizes", args.device, hint="lower the sizes")


def machine_info(device, threads=None):
    """The machine, its software, the threads used (threads: what device.use_threads chose, and why) and the
    kernels the CPU work runs (device.cpu_kernels: ISA of ATen, MKL, oneDNN and onnxruntime's MLAS)."""
    kernels = cpu_kernels()
    if cpu_linear.onednn_fp32():   # the model's large fp32 products leave MKL for oneDNN (cpu_linear)
        kernels["fp32_matmul"] += (f"; the model's products from {cpu_linear.ONEDNN_MIN_MACS:,} multiply-adds: "
                                   f"oneDNN {kernels['onednn']['isa']} (cpu_linear)")
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "device": str(device), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "threads_choice": threads,
            "cpu": kernels["cpu"]["model"] or platform.processor(), "cpu_vendor": kernels["cpu"]["vendor"],
            "cpu_flags": kernels["cpu"]["flags"], "kernels": {k: v for k, v in kernels.items() if k != "cpu"}}
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    for mod in ("transformers", "sklearn", "onnxruntime"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def run(args, checked, command=None):
    """Every section measured -> the figures, the machine and the summary rows. args: bench.py's options;
    checked: (sections, the benchmarked GPTConfig, training lengths, sampling batch sizes)."""
    sections, mcfg, lengths, batches = checked
    device = torch.device(resolve_device(args.device))
    try:
        import transformers   # optional: the benchmark compares with it
    except ImportError:
        raise UserError("bench.py compares with transformers: pip install transformers") from None
    verbosity, bars = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()       # no notes about generation settings on every call
    transformers.utils.logging.disable_progress_bar()
    threads = torch.get_num_threads()     # torch's default, unless the caller set them
    try:
        chosen = use_threads(args.threads, log=log)
        chosen["default"] = threads
        warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
        if device.type == "cuda":
            warmup = max(warmup, 3)   # torch.compile traces on the first calls
        out = {"command": command, "quick": args.quick, "machine": machine_info(device, chosen),
               "model": {"n_layer": mcfg.n_layer, "n_head": mcfg.n_head, "n_embd": mcfg.n_embd,
                         "block_size": mcfg.block_size, "vocab_size": mcfg.vocab_size}}
        t_start = time.time()
        if "train" in sections:
            train_section(args, out, mcfg, lengths, (warmup, device))
        for name, cfg in (("sample", mcfg), ("sample_demo", demo_config(mcfg.vocab_size))):
            if name in sections:
                sample_section(args, out, (name, cfg), batches, (warmup, device))
        if "kmeans" in sections:
            kmeans_section(args, out, device)
        if "web" in sections:
            out["web"] = web_bench.measure_checkpoint(args.web_ckpt, ints(args.web_threads, "--web_threads"),
                                                      20 if args.quick else args.web_n, 2 if args.quick else 5, log)
        if "threads" in sections:
            jobs = [j.strip() for j in args.thread_jobs.split(",") if j.strip()]
            out["threads"] = thread_bench.measure(chosen["default"], jobs, reps=args.reps or (4 if args.quick else 10),
                                                  log=log)
            torch.set_num_threads(chosen["threads"])
        out["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
        out["seconds_total"] = round(time.time() - t_start, 1)
        out["rows"] = rows(out)
        return out
    finally:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def train_section(args, out, mcfg, lengths, how):
    """The training step at each length (bench_train), then each one's MFU against the matmul ceiling."""
    warmup, device = how
    dtypes = {"fp32": torch.float32}
    if bf16_kernels(device):
        dtypes["bf16"] = torch.bfloat16
    peaks = {p: MatmulPeak(args.matmul_n or (8192 if device.type == "cuda" else 2048), device, dt)
             for p, dt in dtypes.items()}
    out["train"] = []
    for i, T in enumerate(lengths):
        reps = args.reps or ((2 if args.quick else 3) if T >= 256 else (5 if args.quick else 8))
        log(f"[train] batch {args.batch}, length {T}: {warmup} warm-up + {reps} timed steps each side "
            f"({', '.join(dtypes)}, ours and HF)")
        r = bench_train(mcfg, args.batch, T, Timing(reps, warmup, f"train T={T}"), device, peaks)
        if len(lengths) == 1:
            r["key"] = "train_default" if T == default_length() else "train_long"
        else:
            r["key"] = "train_long" if i == 0 else "train_default" if i == len(lengths) - 1 else f"train_{T}"
        out["train"].append(r)
    out["matmul_peak"] = {p: pk.result() for p, pk in peaks.items()}
    for r in out["train"]:   # MFU: FLOP/s the kernels computed over the same dtype's matmul ceiling
        r["mfu"] = {p: f / out["matmul_peak"][p]["ceiling_flops"] for p, f in r["achieved_flops"].items()}
        fpt = r["flops_per_token"]
        r["mfu_full"] = {p: m * fpt["full"] / fpt["computed"] for p, m in r["mfu"].items()}
        r["mfu_causal"] = {p: m * fpt["causal"] / fpt["computed"] for p, m in r["mfu"].items()}


def sample_section(args, out, model, batches, how):
    """Sampling and classification at each batch size, of a random model (name, its GPTConfig) exported
    with hf_export and loaded back by transformers and onnxruntime."""
    (name, cfg), (warmup, device) = model, how
    out.setdefault("sample", [])
    folder = tempfile.mkdtemp(prefix="bench-export-")
    try:
        log(f"[{name}] exporting a random {cfg.n_layer}x{cfg.n_head}x{cfg.n_embd} model with hf_export and "
            f"loading it with transformers")
        ck, hf, ort = export_pair(cfg, folder, threads=torch.get_num_threads())
        ck.model.to(device)
        pair = Pair(ck, hf.to(device), {} if device.type == "cuda" else ort, device)
        for b in batches:
            reps = args.reps or (3 if args.quick else 7)
            log(f"[{name}] batch {b}, {args.new_tokens} new tokens: {warmup} warm-up + {reps} timed calls each side")
            r = bench_sample(pair, b, args.new_tokens, Timing(reps, warmup, f"{name} B={b}"))
            r["key"] = f"{name}_b{b}"
            r["model"] = {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "block_size": cfg.block_size}
            r["hf_attention"] = hf.config._attn_implementation
            out["sample"].append(r)
            log(f"[classify] batch {b}: {warmup} warm-up + {reps} timed calls each side")
            c = bench_classify(pair, b, min(default_length() - 1, cfg.block_size), Timing(reps, warmup, f"classify B={b}"))
            c["key"] = f"classify{name[len('sample'):]}_b{b}"
            out.setdefault("classify", []).append(c)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def kmeans_section(args, out, device):
    """Our k-means against scikit-learn's on the same feature vectors."""
    n = args.kmeans_n or (100000 if args.quick else 300000)
    log(f"[kmeans] {n} vectors ({args.kmeans_data}), k={args.kmeans_k}")
    x, what = kmeans_data(n, args.kmeans_data)
    timing = Timing(args.reps or (1 if args.quick else 3), 0, "kmeans")
    r = bench_kmeans(x, args.kmeans_k, args.kmeans_iters, timing, torch.get_num_threads(), device=device)
    r["features"] = what
    out["kmeans"] = r
