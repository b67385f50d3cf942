"""Benchmarks, each side by side with what users would otherwise pick, in one run on one machine.

    python bench.py --threads 1 --json bench.json   # everything (CPU: about 15 minutes)
    python bench.py --quick              # fewer repetitions, 100,000 k-means vectors
    python bench.py --only train,kmeans  # a subset: train, sample, sample_demo, kmeans
    python bench.py --preset gpu         # the GPU table of docs/performance.md on a CUDA GPU -> gpu_bench.json
    python bench.py --only web --web_ckpt runs/demo/final   # the page in Chromium: in the browser vs serve.py

What is measured (ours vs peer, identical sizes and batch, same weights where it applies):
  train    one training step (forward, loss, backward, AdamW step) of our GPT vs transformers'
           GPT2LMHeadModel built from the same GPT2Config our export writes (gelu_new, dropout 0,
           the attention implementation transformers picks by default, reported), loaded with our
           weights so both compute the same loss; AdamW with the same two groups and settings as
           train.py (ours: model.configure_optimizers; theirs: torch.optim.AdamW). Batch 16, at
           sequence length 512 and at the default one (the default tokenisation gives 54-token
           sequences: 53 input tokens). Tokens/s = batch * length / step time. Each side runs in
           fp32 and, where the device has bf16 kernels, under bf16 autocast; the up to four sides
           alternate in one loop, and three comparisons are reported:
             defaults  what a user gets: ours as train.py runs it (--bf16 auto: bf16 autocast where
                       supported) vs theirs as transformers runs it unless told otherwise (fp32);
             fp32      both fp32;   bf16   both under bf16 autocast.
  mfu      the FLOP/s our training step's kernels compute over the matmul ceiling measured in the same
           run and dtype: the best rate of a large square product (sampled between the training steps)
           and of each of the step's own matrix products run alone (the forward and both backward
           products of every linear layer, in autograd's layouts; MatmulPeak). No product of the step
           runs faster alone than that ceiling, so the MFU stays <= 100 % on any CPU (on an AVX2 EPYC the
           square alone was slower than the model's shapes, and the old square-only peak gave 118 %).
           FLOPs per token, the PaLM / nanoGPT convention:
               6 * N + 12 * n_layer * T * n_embd
           N = the weights of the matmuls (12 * n_embd^2 per layer, plus vocab * n_embd for the
           tied output layer; embeddings lookups, biases and LayerNorms are not counted); 12*L*T*d
           counts the attention scores and the weighted values (forward 4*T*d per layer, backward
           twice that) over the full T x T square. A causal kernel computes about half of that
           square: 6 * N + 6 * n_layer * T * n_embd. The MFU counts what our kernels compute: the full
           square where model.causal_attention runs explicit matmuls (CPU, T <= SHORT_ATTENTION), the
           causal half where it runs the flash kernel; nanoGPT's full-square figure is reported beside it.
  sample   greedy sampling through our KV cache (decoding.generate) vs transformers' generate() on
           the model exported by hf_export and loaded with AutoModelForCausalLM; batch 1 and 16,
           prompt "<IMG>", the same number of new tokens on both sides (EOS disabled on both, so
           neither stops early); the generated tokens are compared; images/s (one image per row).
           Ours computes as sample.py does by default (--bf16 auto for decoding: bf16 autocast on a
           bf16 GPU, and on a bf16 CPU for models at least 256 wide; fp32 otherwise), theirs in fp32
           (transformers' default); ours in the other precision is reported beside it. The ONNX graphs of the same export (onnx/model.onnx
           fp32 and onnx/model_quantized.onnx int8 weights) run through our decoding loop in
           onnxruntime (CPU only). Classification (at each sampling batch size): class
           probabilities of random prefixes '<IMG> codes </IMG> <CLS>' (52 tokens) through
           metrics.class_probs, ours and onnxruntime, vs one forward of the HF model read at <CLS>.
           "sample" runs the model of --n_layer/--n_head/--n_embd/--block_size (v2 by default),
           "sample_demo" the demo model (config/demo.yaml's sizes).
  kmeans   our tokenizer.kmeans vs scikit-learn KMeans(n_clusters=500, init="k-means++", n_init=1)
           on the same 300,000 feature vectors: the per-pixel features (patch_size 1) of the
           built-in training digits, as in the original project: position (x, y), intensity and
           gradient (Gx, Gy), each group standardised with weight 1 (time is 0 for still images and
           left out): 5 dimensions, through Codebook.fit_data. The same rule on both sides: the
           same number of Lloyd iterations (--kmeans_iters, the project's 30), tolerance 0 on both
           (each stops early only at a fixed point; the iterations run are reported). Both final
           inertias are computed by the same float64 function.
  web      the page in Debian's Chromium (imagegpt/web_bench.py): the static export of --web_ckpt running
           the model in the browser (onnxruntime-web; model.onnx and model_quantized.onnx) vs the same page
           through serve.py (PyTorch), at 1 and 2 threads: classification latency (p50, p99 ms per drawing)
           and drawings/s at batch 1 and 8, timed in the page. Not in the default sections (it needs
           chromium, `npm ci` and a checkpoint).
  threads  milliseconds per call of the demo-sized GPT's work (a training step, batch 32 x 54; the service's
           classification and drawing of one image) idle and beside other jobs (a Python busy loop, another
           torch job, a numpy job), at torch's default threads (every core: what the commands ran with
           before), at one thread, and at the count the commands choose now (imagegpt/thread_bench.py).
           Not in the default sections (it starts busy processes beside itself for a minute or two).
  memory   peak memory of a training step and of a sampling call, each side: on CUDA the
           allocator's peak (torch.cuda.max_memory_allocated) above what was allocated before; on
           Linux the growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs)
           above the RSS before the call.

Repetitions alternate the sides (the order flips every repetition) and medians are reported,
so that the ratios hold on a shared machine whose absolute speed drifts; the JSON also has the
ratios of median process CPU time. Every side uses the same threads (torch's, onnxruntime's and
scikit-learn's): --threads N, or by default (0) the count the commands choose (imagegpt/device.py: the
machine's CPUs less those other jobs keep busy, when the run starts), which the JSON records with the CPU,
its flags and the kernels taken (machine.threads_choice, machine.kernels). With more threads than free
cores every parallel region waits for a thread that a neighbour has preempted, which swamps small ops
(a sampling step) on both sides alike; --threads 1 compares single cores.

On CUDA ours is compiled (torch.compile, as train.py does) and uses fused AdamW; the run also checks
that a bf16 training step of ours runs with the flash SDPA kernel forced (cuda_checks in the JSON);
our k-means runs on the GPU (as prepare.prepare does), scikit-learn on the CPU.
"""
import gc
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from imagegpt import checkpoint, huggingface, sources, splits
from imagegpt.cli import parser, run_cli
from imagegpt.decoding import generate
from imagegpt.device import (
    THREADS_ENV,
    bf16_autocast,
    check_memory,
    cpu_kernels,
    describe_threads,
    resolve_device,
    use_threads,
)
from imagegpt.errors import UserError
from imagegpt.files import check_file
from imagegpt.metrics import class_probs
from imagegpt.onnx_runtime import OnnxGPT
from imagegpt.provenance import write_result
from imagegpt.settings import read_yaml
from imagegpt.token_format import Vocab
from imagegpt.settings import build
from imagegpt.training import TrainConfig
from model import GPT, SHORT_ATTENTION, GPTConfig
from imagegpt.kmeans import assign, kmeans
from tokenizer import Codebook, CodebookConfig, uint8_to_tensor

# targets on the CPU (issues 7 and 16): key -> (comparison, value, description)
TARGETS = {
    "train_long_defaults": (">=", 1.6, "training tokens/s vs HF GPT-2 at each side's defaults, length 512"),
    "train_default_defaults": (">=", 1.6, "training tokens/s vs HF GPT-2 at each side's defaults, default length"),
    "train_long_fp32": (">=", 1.5, "training tokens/s vs HF GPT-2, both fp32, length 512"),
    "mfu_train_long_fp32": (">=", 0.80, "achieved FLOP/s vs measured fp32 matmul peak"),
    "sample_demo_b1": (">=", 3.0, "sampling images/s vs HF generate(), demo model, batch 1"),
    "sample_demo_b16": (">=", 2.0, "sampling images/s vs HF generate(), demo model, batch 16"),
    "sample_b1": (">=", 1.8, "sampling images/s vs HF generate(), v2 model, batch 1"),
    "kmeans_time": ("<=", 0.5, "k-means time vs scikit-learn, the same iterations"),
    "kmeans_inertia": ("<=", 1.02, "k-means inertia vs scikit-learn"),
}


SECTIONS = ("train", "sample", "sample_demo", "kmeans", "web", "threads")

# the threads table (issue 37): the threads the commands choose now (auto) against torch's default (idle: within
# 5 %) and against one thread (beside another job: never slower, within 5 % of noise)
THREAD_TARGET = 0.95

# --preset gpu: the GPU table of docs/performance.md in one run on a CUDA GPU (about 5 minutes on an H200): the v2
# model's training step at lengths 512 and 53 (tokens/s, MFU, peak memory; bf16 and fp32, compiled),
# sampling at batch 1, 16 and 256 for the v2 and demo models, the CUDA checks (flash SDPA, fused
# AdamW), all written to gpu_bench.json. Later arguments override these (the tests run it with
# --device cpu and tiny sizes).
PRESETS = {"gpu": ["--device", "cuda", "--only", "train,sample,sample_demo", "--sample_batches", "1,16,256",
                   "--json", "gpu_bench.json"]}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def default_length():
    """Input tokens of a default sequence: (28/p)^2 codes + <IMG> </IMG> <CLS> <CLS_y> <EOS>, minus 1."""
    return (28 // CodebookConfig().patch_size) ** 2 + 5 - 1


def demo_config(vocab_size):
    """The demo model's sizes (config/demo.yaml: layers, heads, width; its max_length as the block, or
    the data's length when the config leaves it to the data)."""
    d = read_yaml(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "demo.yaml"))
    return GPTConfig(vocab_size=vocab_size, block_size=d.get("max_length") or default_length() + 1,
                     n_layer=d["n_layer"], n_head=d["n_head"],
                     n_embd=d["n_embd"])


# ----------------------------------------------------------------------------- machine and timing

def machine_info(device, threads=None):
    """The machine, its software, the threads used (threads: what device.use_threads chose, and why) and the
    kernels the CPU work runs (device.cpu_kernels: ISA of ATen, MKL, oneDNN and onnxruntime's MLAS)."""
    kernels = cpu_kernels()
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


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(seconds, result) of one call, synchronised on CUDA."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def _status_kb(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim():
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn, device):
    """Run fn once -> (result, peak bytes above the start, method)."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        sync(device)
        return out, torch.cuda.max_memory_allocated(device) - before, "cuda max_memory_allocated"
    _malloc_trim()       # hand freed heap pages back first, so that reuse of them shows as growth
    before = _status_kb("VmRSS")
    if before is not None and _reset_peak_rss():
        out = fn()
        return out, max(0, _status_kb("VmHWM") - before) * 1024, "peak RSS growth (VmHWM)"
    unit = 1 if sys.platform == "darwin" else 1024      # ru_maxrss: bytes on macOS, kB on Linux
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn()
    return out, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) * unit, \
        "ru_maxrss growth (a lower bound: never reset)"


def alternate(fns, reps, device, between=None, label=""):
    """Time each of fns (name -> fn) reps times, alternating the order every repetition.
    -> (name -> wall seconds, name -> process CPU seconds). between() runs after each repetition."""
    names = list(fns)
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            c = time.process_time()
            times[n].append(timed(fns[n], device)[0])
            cpu[n].append(time.process_time() - c)
        if between:
            between()
        log(f"  {label} rep {r + 1}/{reps}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    return times, cpu


def _cpu_ratio(cpu):
    """theirs / ours in median process CPU time (threads' spin-waits included)."""
    return median(cpu["theirs"]) / median(cpu["ours"]) if median(cpu["ours"]) > 0 else None


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ----------------------------------------------------------------------------- matmul peak

class MatmulPeak:
    """The matmul ceiling in one dtype: the best rate (FLOP/s) of matrix products run alone through the ops
    a training step runs them with. A square n x n product (a @ b; sample() times it once, between the
    training repetitions), and, for each training shape added with add_model(), the forward and the two
    backward products of each of the model's linear layers in the layouts autograd uses (F.linear's
    x W^T; dX = dY W; dW = dY^T X), each timed `model_reps` times. The ceiling is the best rate of all of
    them: no product of the step runs faster alone, so a step's FLOP/s over it stays <= 100 % (on the
    AVX2 EPYC of issue 37 the square alone ran slower than the model's shapes: 118 % "MFU")."""

    def __init__(self, n, device, dtype, model_reps=3):
        self.n, self.device, self.dtype, self.model_reps = n, device, dtype, model_reps
        g = torch.Generator(device=device).manual_seed(0)
        self.a = torch.randn(n, n, generator=g, device=device).to(dtype)
        self.b = torch.randn(n, n, generator=g, device=device).to(dtype)
        self.samples = []
        self.sample()  # warm-up, not kept
        self.samples = []
        self.model = {}   # name -> best FLOP/s

    def sample(self):
        dt, _ = timed(lambda: self.a @ self.b, self.device)
        self.samples.append(2 * self.n ** 3 / dt)

    def add_model(self, cfg, rows):
        """Time the GEMMs of a training step of a model `cfg` on `rows` = batch x length tokens -> the sum of
        their best times (seconds): a lower bound of the step (attention, GELU, LayerNorm, AdamW left out)."""
        d, g, total = cfg.n_embd, torch.Generator(device=self.device).manual_seed(1), 0.0
        layers = {"c_attn": (d, 3 * d), "attn.c_proj": (d, d), "c_fc": (d, 4 * d), "mlp.c_proj": (4 * d, d),
                  "lm_head": (d, cfg.vocab_size)}
        for name, (k, n) in layers.items():
            x = torch.randn(rows, k, generator=g, device=self.device).to(self.dtype)
            w = torch.randn(n, k, generator=g, device=self.device).to(self.dtype)
            dy = torch.randn(rows, n, generator=g, device=self.device).to(self.dtype)
            flops = 2 * rows * k * n
            for what, fn in ((f"{name} forward {rows}x{k} @ ({n}x{k})^T", lambda: F.linear(x, w)),
                             (f"{name} dX {rows}x{n} @ {n}x{k}", lambda: dy @ w),
                             (f"{name} dW ({rows}x{n})^T @ {rows}x{k}", lambda: dy.t() @ x)):
                fn()
                best = min(timed(fn, self.device)[0] for _ in range(self.model_reps))
                self.model[what] = max(self.model.get(what, 0.0), flops / best)
                total += cfg.n_layer * best if name != "lm_head" else best
        return total

    def ceiling(self):
        return max(self.samples + list(self.model.values()))

    def result(self):
        return {"n": self.n, "dtype": str(self.dtype).replace("torch.", ""),
                "median_flops": median(self.samples), "max_flops": max(self.samples) if self.samples else None,
                "samples": len(self.samples), "model_gemms": self.model, "ceiling_flops": self.ceiling(),
                "ceiling_from": "square" if max(self.samples) >= max(self.model.values(), default=0) else
                max(self.model, key=self.model.get)}


# ----------------------------------------------------------------------------- training

def flops_per_token(cfg, T, causal=False):
    """Training FLOPs per token (forward + backward): 6 N + 12 L T d, the attention over the full T x T
    square (nanoGPT's convention); causal: 6 N + 6 L T d, the half a causal kernel computes.
    See the module docstring."""
    n_matmul = cfg.n_layer * 12 * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd
    return 6 * n_matmul + (6 if causal else 12) * cfg.n_layer * T * cfg.n_embd


def computed_flops_per_token(cfg, T, device):
    """The FLOPs per token that our step's kernels compute: the attention over the full square where
    model.causal_attention runs explicit matmuls (the CPU, up to SHORT_ATTENTION tokens), the causal half
    where it runs the flash kernel (longer sequences, and always on a GPU). The MFU counts these."""
    return flops_per_token(cfg, T, causal=device.type != "cpu" or T > SHORT_ATTENTION)


def hf_config(mcfg):
    """The transformers GPT2Config that hf_export writes for a model of these sizes."""
    from transformers import GPT2Config
    d = huggingface.gpt2_config(mcfg, Vocab(mcfg.vocab_size - 16, 10), [str(c) for c in range(10)])
    return GPT2Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type", "dtype")})


def build_pair(mcfg, device, seed=0):
    """Our GPT and a GPT2LMHeadModel holding the same weights, both in training mode."""
    from transformers import GPT2LMHeadModel
    torch.manual_seed(seed)
    ours = GPT(mcfg)
    theirs = GPT2LMHeadModel(hf_config(mcfg))
    missing, unexpected = theirs.load_state_dict(huggingface.to_gpt2_state_dict(ours), strict=False)
    bad = [k for k in missing if k != "lm_head.weight"] + list(unexpected)
    if bad:
        raise RuntimeError(f"weights do not map onto GPT2LMHeadModel: {bad[:3]}")
    return ours.to(device).train(), theirs.to(device).train()


def adamw_groups(model, weight_decay):
    """The groups of GPT.configure_optimizers: decay on parameters with dim >= 2, none on the rest."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def cuda_checks(model, x, y, opt):
    """What train.py relies on for speed on CUDA, checked on our model: a bf16 training step whose
    attention runs in the flash SDPA kernel (forced: it raises where flash cannot run), and AdamW's
    fused kernel. -> dict (True, or the reason it is not used)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)[1]
        loss.backward()
        model.zero_grad(set_to_none=True)
        flash = True
    except RuntimeError as e:
        flash = str(e).splitlines()[0]
    return {"flash_sdpa_bf16": flash, "fused_adamw": any(g.get("fused") for g in opt.param_groups) or "not fused",
            "bf16_supported": torch.cuda.is_bf16_supported()}


def bf16_kernels(device):
    """Does bf16 run on `device` at all (a CUDA GPU with bf16; a CPU whose oneDNN has bf16 kernels, native or
    emulated)? The bf16 sides are measured there; --bf16 auto (the defaults) takes them only natively."""
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else torch.ops.mkldnn._is_mkldnn_bf16_supported()


def bench_train(mcfg, batch, T, reps, warmup, device, peaks, label=""):
    """One training step (forward, loss, backward, AdamW step) of ours and of HF's GPT-2 at (batch, T),
    each in fp32 and, where the device has bf16 kernels, under bf16 autocast: up to four sides timed
    in one alternation, so that every comparison comes from the same repetitions:
        defaults  ours as train.py runs it (bf16_autocast("auto"): bf16 where supported; compiled on
                  CUDA) vs theirs as transformers runs it unless told otherwise (fp32)
        fp32      both in fp32 (ours compiled on CUDA)
        bf16      both under bf16 autocast
    peaks: precision ("fp32", "bf16") -> MatmulPeak, each sampled once per repetition. -> dict of figures."""
    tc = TrainConfig()
    ours, theirs = build_pair(mcfg, device)
    opt_o = ours.configure_optimizers(tc.weight_decay, tc.lr, (tc.beta1, tc.beta2), device.type)
    fused = {"fused": True} if any(g.get("fused") for g in opt_o.param_groups) else {}
    opt_t = torch.optim.AdamW(adamw_groups(theirs, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2), **fused)
    compiled = device.type == "cuda"
    step_o = torch.compile(ours) if compiled else ours
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(mcfg.vocab_size, (batch, T + 1), generator=g).to(device)
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    precisions = {"fp32": nullcontext}
    if bf16_kernels(device):   # measured wherever bf16 runs at all (natively or emulated); the defaults follow --bf16 auto
        precisions["bf16"] = lambda: torch.autocast(device.type, dtype=torch.bfloat16)

    def training_step(loss_fn, opt, ctx):
        def run():
            with ctx():
                loss = loss_fn()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.detach()
        return run

    checks = cuda_checks(ours, x, y, opt_o) if device.type == "cuda" else None
    fns = {}
    for p, ctx in precisions.items():
        fns[f"ours_{p}"] = training_step(lambda: step_o(x, y)[1], opt_o, ctx)
        fns[f"theirs_{p}"] = training_step(lambda: theirs(input_ids=x, labels=y, shift_labels=y).loss, opt_t, ctx)
    # same weights, same batch: the same loss (HF unshifts the labels we pass as shift_labels); the
    # bf16 sides then start from the weights after one identical fp32 step on each side
    first = {n: fn().item() for n, fn in fns.items()}
    for _ in range(max(0, warmup - 1)):
        for fn in fns.values():
            fn()
    mem = {}
    for n, fn in fns.items():
        _, mem[n], method = peak_memory(fn, device)
    gemm = {}   # the ceiling includes this step's own matrix products, each run alone; their sum bounds the step
    for p, pk in peaks.items():
        gemm[p] = pk.add_model(mcfg, batch * T)
    times, cpu = alternate(fns, reps, device, lambda: [pk.sample() for pk in peaks.values()], label)
    secs = {n: median(t) for n, t in times.items()}
    tokens = batch * T
    auto = isinstance(bf16_autocast("auto", str(device)), torch.autocast)   # what train.py's default computes in
    default = "ours_bf16" if "bf16" in precisions and auto else "ours_fp32"
    pairs = {"defaults": (default, "theirs_fp32"), **{p: (f"ours_{p}", f"theirs_{p}") for p in precisions}}
    return {"batch": batch, "length": T, "precisions": list(precisions), "ours_default": default,
            "compile_ours": compiled, "hf_attention": theirs.config._attn_implementation, "cuda_checks": checks,
            "first_loss": first, "seconds": secs,
            "tokens_per_s": {n: tokens / t for n, t in secs.items()},
            "pairs": pairs, "ratio": {k: secs[t] / secs[o] for k, (o, t) in pairs.items()},
            "flops_per_token": {"full": flops_per_token(mcfg, T), "causal": flops_per_token(mcfg, T, causal=True),
                                "computed": computed_flops_per_token(mcfg, T, device)},
            "achieved_flops": {p: computed_flops_per_token(mcfg, T, device) * tokens / secs[f"ours_{p}"]
                               for p in precisions},
            "peak_memory_bytes": mem, "memory_method": method,
            "gemm_seconds": gemm,   # our step's linear-layer products alone: no step of ours can be faster
            "ratio_bound": {k: secs[t] / gemm[o.split("_")[1]] for k, (o, t) in pairs.items()},
            "ratio_cpu_time": {k: median(cpu[t]) / median(cpu[o]) for k, (o, t) in pairs.items()},
            "raw_seconds": times, "raw_cpu_seconds": cpu}


# ----------------------------------------------------------------------------- sampling

def export_pair(mcfg, folder, seed=0, threads=None):
    """A random model of these sizes saved as a checkpoint, exported to the Hugging Face format (with
    its ONNX graphs, fp32 and int8) and loaded back with transformers and onnxruntime -> (our model,
    HF model, {"onnx": OnnxGPT, "onnx_int8": OnnxGPT}, vocab)."""
    from transformers import AutoModelForCausalLM
    vocab = Vocab(mcfg.vocab_size - 16, 10)
    torch.manual_seed(seed)
    model = GPT(mcfg)
    with torch.no_grad():   # spread the logits so greedy decoding is not a near-tie everywhere
        model.lm_head.weight.mul_(5)
    g = torch.Generator().manual_seed(seed)
    book = Codebook.fit(torch.rand(max(2, -(-vocab.num_codes // 49)) + 1, 1, 28, 28, generator=g),
                        CodebookConfig(num_codes=vocab.num_codes, kmeans_iters=1))
    tc = build(TrainConfig, n_layer=mcfg.n_layer, n_head=mcfg.n_head, n_embd=mcfg.n_embd, max_length=mcfg.block_size,
               num_codes=vocab.num_codes)
    checkpoint.save(os.path.join(folder, "ckpt"), model, tc, vocab, book)
    out = huggingface.write_export(checkpoint.load(os.path.join(folder, "ckpt")), os.path.join(folder, "hf"),
                                 onnx="int8")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    hf.generation_config.eos_token_id = None     # generate() must not stop early either
    ort = {"onnx": OnnxGPT(os.path.join(out, "onnx", "model.onnx"), threads),
           "onnx_int8": OnnxGPT(os.path.join(out, "onnx", "model_quantized.onnx"), threads)}
    return model.eval(), hf, ort, vocab


def our_generate(model, vocab, batch, new_tokens):
    """Greedy continuation of "<IMG>" by new_tokens tokens through our KV cache, never stopping at
    <EOS> -> (batch, 1 + new_tokens) token ids."""
    res = generate(model, [[vocab.img_id]] * batch, vocab, new_tokens, greedy=True, batch_size=batch,
                   stop_at_eos=False)
    return torch.tensor([r["ids"] for r in res])


def hf_generate(hf, vocab, batch, new_tokens):
    device = hf.device
    ids = torch.full((batch, 1), vocab.img_id, device=device)
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                           pad_token_id=vocab.pad_id).cpu()


def bench_classify(model, hf, vocab, batch, length, reps, warmup, device, label="", ort=None):
    """Classification: `batch` random prefixes '<IMG> codes </IMG> <CLS>' of `length` tokens -> class
    probabilities, through metrics.class_probs (ours, and onnxruntime when given) vs a plain forward of
    the HF model read at the last position over the label tokens. images/s = batch / seconds."""
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(vocab.num_codes, (batch, length - 3), generator=g).tolist()
    prefixes = [vocab.prefix_ids(c) for c in codes]
    ids = torch.tensor(prefixes, device=device)
    labels = slice(vocab.label_offset, vocab.label_offset + vocab.num_classes)

    def theirs():
        with torch.no_grad():
            return hf(ids, attention_mask=torch.ones_like(ids)).logits[:, -1, labels].float().softmax(-1).cpu()

    fns = {"ours": lambda: class_probs(model, prefixes, vocab, batch_size=batch), "theirs": theirs}
    for name, m in (ort or {}).items():
        fns[name] = lambda m=m: class_probs(m, prefixes, vocab, batch_size=batch)
    first = {n: fn() for n, fn in fns.items()}
    for _ in range(max(0, warmup - 1)):
        for fn in fns.values():
            fn()
    times, _ = alternate(fns, reps, device, label=label)
    secs = {n: median(t) for n, t in times.items()}
    return {"batch": batch, "length": length, "seconds": secs,
            "images_per_s": {k: batch / t for k, t in secs.items()},
            "ratio": {k: secs["theirs"] / t for k, t in secs.items() if k != "theirs"},
            "max_prob_diff": {k: (v - first["theirs"]).abs().max().item() for k, v in first.items() if k != "theirs"},
            "raw_seconds": times}


def bench_sample(model, hf, vocab, batch, new_tokens, reps, warmup, device, label="", ort=None):
    """Greedy sampling: ours vs HF generate() (and onnxruntime fp32 / int8 through our decoding loop,
    when `ort` maps names to OnnxGPT models). "ours" computes as sample.py does by default
    (bf16_autocast("auto", decode_width=n_embd): bf16 autocast on a bf16 GPU, and on a bf16 CPU for
    models at least device.BF16_DECODE_MIN_WIDTH wide; fp32 otherwise); "ours_other"
    is ours in the other precision (where the device has bf16), to show what the default chose
    between. HF generate() runs as transformers does by default: fp32. images/s counts one image
    per row and call."""
    bf16 = bf16_kernels(device)
    width = model.config.n_embd

    def ours(precision):
        def run():
            with bf16_autocast(precision, device, decode_width=width):
                return our_generate(model, vocab, batch, new_tokens)
        return run

    fns = {"ours": ours("auto"), "theirs": lambda: hf_generate(hf, vocab, batch, new_tokens)}
    default_bf16 = isinstance(bf16_autocast("auto", device, decode_width=width), torch.autocast)
    if bf16:
        fns["ours_other"] = ours("false" if default_bf16 else "true")
    for name, m in (ort or {}).items():
        fns[name] = lambda m=m: our_generate(m, vocab, batch, new_tokens)
    first = {n: fn() for n, fn in fns.items()}
    for _ in range(max(0, warmup - 1)):
        for fn in fns.values():
            fn()
    mem = {}
    for name in ("ours", "theirs"):
        _, mem[name], method = peak_memory(fns[name], device)
    times, cpu = alternate(fns, reps, device, label=label)
    secs = {n: median(t) for n, t in times.items()}
    n = batch * new_tokens
    a, b = first["ours"], first["theirs"]
    return {"batch": batch, "new_tokens": new_tokens, "prompt": "<IMG>", "decoding": "greedy, EOS disabled",
            "ours_precision": "bf16 autocast" if default_bf16 else "fp32",
            "ours_other_precision": ("fp32" if default_bf16 else "bf16 autocast") if bf16 else None,
            "generated": {"ours": list(a.shape), "theirs": list(b.shape)},
            "same_tokens": a.shape == b.shape and torch.equal(a, b),
            "same_tokens_as_hf": {k: v.shape == b.shape and torch.equal(v, b) for k, v in first.items() if k != "theirs"},
            "seconds": secs, "tokens_per_s": {k: n / t for k, t in secs.items()},
            "images_per_s": {k: batch / t for k, t in secs.items()}, "ratio": secs["theirs"] / secs["ours"],
            "ratio_other": {k: secs["theirs"] / secs[k] for k in secs if k not in ("ours", "theirs")},
            "peak_memory_bytes": mem, "memory_method": method, "ratio_cpu_time": _cpu_ratio(cpu),
            "raw_seconds": times, "raw_cpu_seconds": cpu}


# ----------------------------------------------------------------------------- k-means

KMEANS_FEATURES = ("per-pixel features (patch_size 1) of the built-in training digits: position (x, y), "
                   "intensity, gradient (Gx, Gy); each group standardised, weight 1; time left out (0)")


def kmeans_data(n, source="digits", seed=0):
    """n feature vectors (float32, CPU) and a description. source: digits (the built-in training
    images through Codebook.fit_data) or random (Gaussian blobs, for tests without the digits)."""
    if source == "random":
        g = torch.Generator().manual_seed(seed)
        centres = torch.randn(50, 5, generator=g) * 3
        x = centres[torch.randint(50, (n,), generator=g)] + torch.randn(n, 5, generator=g)
        return x, "random: 50 Gaussian blobs in 5 dimensions"
    images, labels, _, _ = sources.load_builtin()
    train, _ = splits.stratified_split(labels, 0.2, 0)
    cfg = CodebookConfig(patch_size=1, w_position=1.0, w_time=0.0, w_colour=1.0, w_gradient=1.0,
                         fit_samples=n, codebook_seed=seed)
    imgs = uint8_to_tensor(images[train])
    if n > len(imgs) * imgs.shape[2] * imgs.shape[3]:
        raise UserError(f"--kmeans_n {n} is more than the {len(imgs) * imgs.shape[2] * imgs.shape[3]} pixels")
    _, x, _ = Codebook.fit_data(imgs, cfg)
    return x.contiguous(), KMEANS_FEATURES


def inertia(x, c):
    """Sum of squared distances to the nearest centroid, in float64 (the same function for both)."""
    return assign(x.double(), torch.as_tensor(c).double())[1].sum().item()


def bench_kmeans(x, k, reps, iters, threads=None, seed=0, label="", device=torch.device("cpu")):
    """Our tokenizer.kmeans vs scikit-learn's KMeans under the same rule: k-means++ start, then `iters`
    Lloyd iterations on both sides (our relative-inertia tolerance and scikit-learn's centre-shift
    tolerance both 0, so neither stops early unless nothing moves)."""
    from sklearn.cluster import KMeans
    try:
        from threadpoolctl import threadpool_limits
        limit = (lambda: threadpool_limits(limits=threads)) if threads else nullcontext
    except ImportError:
        limit = nullcontext
    xn, xd = x.numpy(), x.to(device)     # ours runs where the project fits codebooks (prepare.prepare)
    res = {}

    def ours():
        done = []
        res["ours"] = kmeans(xd, k, iters=iters, seed=seed, tol=0.0, progress=lambda phase, i, n: done.append(phase == "Lloyd iterations" and i > 0))[0].cpu()
        res["ours_iters"] = sum(done)

    def theirs():
        with limit():
            km = KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=seed, max_iter=iters, tol=0.0).fit(xn)
        res["theirs"] = km.cluster_centers_
        res["theirs_iters"] = int(km.n_iter_)

    times, cpu = alternate({"ours": ours, "theirs": theirs}, reps, device, label=label)
    i_o, i_t = inertia(x, res["ours"]), inertia(x, res["theirs"])
    t_o, t_t = median(times["ours"]), median(times["theirs"])
    return {"n": len(x), "dim": x.shape[1], "k": k, "device": {"ours": str(device), "theirs": "cpu"}, "distinct_vectors": len(torch.unique(x, dim=0)),
            "iters": {"ours": res["ours_iters"], "theirs": res["theirs_iters"]}, "max_iters": iters,
            "rule": "the same number of Lloyd iterations on both sides (tol 0: each stops early only at a fixed point)",
            "seconds": {"ours": t_o, "theirs": t_t}, "time_ratio": t_o / t_t,
            "time_ratio_cpu_time": median(cpu["ours"]) / median(cpu["theirs"]),
            "inertia": {"ours": i_o, "theirs": i_t}, "inertia_ratio": i_o / i_t,
            "raw_seconds": times, "raw_cpu_seconds": cpu}


def bench_web(a, quick):
    """The page in Chromium (imagegpt/web_bench.py), on --web_ckpt exported with --onnx --quantize int8,
    classifying a real test digit of its data (or a blank image)."""
    from imagegpt import web_bench, web_export
    web_export.ort_dist()                                   # npm ci first: before the export work
    ck = checkpoint.load(a.web_ckpt)
    image = web_export.test_split(ck)[0]
    folder = tempfile.mkdtemp(prefix="bench-web-")
    try:
        log(f"[web] exporting {ck.folder} with --onnx --quantize int8")
        huggingface.write_export(ck, os.path.join(folder, "hf"), onnx="int8")
        r = web_bench.measure(ck, os.path.join(folder, "hf"), threads=ints(a.web_threads, "--web_threads"),
                              n=20 if quick else a.web_n, reps=2 if quick else 5,
                              image=None if image is None else image[0], log=log)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    r["checkpoint"] = ck.folder
    return r


# ----------------------------------------------------------------------------- the run

def build_parser():
    ap = parser(__doc__, prog="bench.py")
    ap.add_argument("--preset", choices=sorted(PRESETS),
                    help="gpu: the GPU table of docs/performance.md in one run (see PRESETS; later arguments override it)")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and 100,000 k-means vectors")
    ap.add_argument("--json", metavar="OUT", help="write all figures to this JSON file")
    ap.add_argument("--only", default="train,sample,sample_demo,kmeans",
                    help="sections to run: train, sample (the model of --n_layer etc.), sample_demo (the demo "
                         "model of config/demo.yaml), kmeans (default: %(default)s)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for torch, onnxruntime and scikit-learn; 0: chosen from what the machine offers "
                         f"now (its CPUs, cgroup quota and other processes' load), unless {THREADS_ENV} or "
                         "OMP_NUM_THREADS sets them (default: %(default)s)")
    ap.add_argument("--n_layer", type=int, default=6, help="transformer blocks of the benchmarked model (default: %(default)s)")
    ap.add_argument("--n_head", type=int, default=8, help="its attention heads (default: %(default)s)")
    ap.add_argument("--n_embd", type=int, default=384, help="its width (default: %(default)s)")
    ap.add_argument("--block_size", type=int, default=512, help="its block size (default: %(default)s)")
    ap.add_argument("--vocab_size", type=int, default=516, help="codes + 16 (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=16, help="training batch (default: %(default)s)")
    ap.add_argument("--lengths", help="training sequence lengths, long first (default: block size and "
                                      f"the default tokenisation's {default_length()})")
    ap.add_argument("--sample_batches", default="1,16", help="sampling batch sizes (default: %(default)s)")
    ap.add_argument("--new_tokens", type=int, default=default_length(),
                    help="tokens generated per row (default: %(default)s, one default image after <IMG>)")
    ap.add_argument("--reps", type=int, help="timed repetitions per measure (default: by measure and mode)")
    ap.add_argument("--warmup", type=int, help="untimed calls before timing (default: 2, --quick 1)")
    ap.add_argument("--kmeans_n", type=int, help="feature vectors (default: 300000, --quick 100000)")
    ap.add_argument("--kmeans_k", type=int, default=500, help="k-means clusters (default: %(default)s)")
    ap.add_argument("--kmeans_iters", type=int, default=30,
                    help="Lloyd iterations on both sides (default: %(default)s, the project's)")
    ap.add_argument("--kmeans_data", default="digits", choices=["digits", "random"],
                    help="k-means on the built-in digits' features or on random blobs (default: %(default)s)")
    ap.add_argument("--matmul_n", type=int, help="side of the square peak matmul (default: 2048; CUDA 8192)")
    ap.add_argument("--thread_jobs", default="idle,busy,torch,numpy",
                    help="threads: the other jobs to time beside: idle, busy (a Python loop), torch, numpy "
                         "(default: %(default)s)")
    ap.add_argument("--web_ckpt", default="runs/demo/final",
                    help="web: the checkpoint whose page is timed (default: %(default)s)")
    ap.add_argument("--web_threads", default="1,2", help="web: WebAssembly and torch threads to time (default: %(default)s)")
    ap.add_argument("--web_n", type=int, default=200, help="web: timed classifications per row (default: %(default)s)")
    return ap


def ints(text, what):
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what}: expected comma-separated integers, got {text!r}") from None
    if not vals or min(vals) < 1:
        raise UserError(f"{what}: expected positive integers, got {text!r}")
    return vals


def check_args(a):
    sections = {s.strip() for s in a.only.split(",") if s.strip()}
    if not sections or sections - set(SECTIONS):
        raise UserError(f"--only: choose from {', '.join(SECTIONS)}; got {a.only!r}")
    for k in ("n_layer", "n_head", "n_embd", "block_size", "batch", "reps", "kmeans_n", "kmeans_k",
              "kmeans_iters", "matmul_n"):
        if getattr(a, k) is not None and getattr(a, k) < 1:
            raise UserError(f"--{k} must be at least 1, got {getattr(a, k)}")
    if a.warmup is not None and a.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {a.warmup}")
    mcfg = GPTConfig(vocab_size=a.vocab_size, block_size=a.block_size, n_layer=a.n_layer, n_head=a.n_head,
                     n_embd=a.n_embd)
    if a.n_embd % a.n_head:
        raise UserError("--n_embd must be divisible by --n_head")
    if a.vocab_size <= 16:
        raise UserError("--vocab_size must be more than 16 (6 specials and 10 class tokens besides the codes)")
    lengths = ints(a.lengths, "--lengths") if a.lengths else [a.block_size, default_length()]
    if max(lengths) > a.block_size:
        raise UserError(f"--lengths: {max(lengths)} exceeds --block_size {a.block_size}")
    for name, block in (("sample", a.block_size), ("sample_demo", demo_config(a.vocab_size).block_size)):
        if name in sections and not 1 <= a.new_tokens < block:
            raise UserError(f"--new_tokens must be in 1..{block - 1} (the block size of the {name} model)")
    if a.threads < 0:
        raise UserError("--threads must be 0 (auto) or a positive number")
    batches = ints(a.sample_batches, "--sample_batches")
    n = mcfg.num_params_estimate()   # two models (ours, HF) side by side, each training or sampling
    need = {"train": 2 * (16 * n + 4 * a.batch * max(lengths) * (16 * a.n_layer * a.n_embd + 3 * a.vocab_size))
            + 12 * (a.matmul_n or 2048) ** 2,
            "sample": 2 * (4 * n + 4 * max(batches) * a.block_size * (2 * a.n_layer * a.n_embd + a.vocab_size)),
            "sample_demo": 2 * (4 * demo_config(a.vocab_size).num_params_estimate()),
            "kmeans": 4 * (a.kmeans_n or 300000) * (5 + a.kmeans_k) if a.kmeans_n else 0, "web": 0, "threads": 0}
    ints(a.web_threads, "--web_threads")
    from imagegpt.thread_bench import JOBS
    jobs = [j.strip() for j in a.thread_jobs.split(",") if j.strip()]
    if not jobs or set(jobs) - set(JOBS):
        raise UserError(f"--thread_jobs: choose from {', '.join(JOBS)}; got {a.thread_jobs!r}")
    if a.web_n < 1:
        raise UserError(f"--web_n must be at least 1, got {a.web_n}")
    for s in sorted(sections):
        check_memory(need[s], f"the {s} benchmark at these sizes", a.device,
                     hint="lower the sizes")
    return sections, mcfg, lengths, batches


def run(a, command=None):
    sections, mcfg, lengths, sample_batches = check_args(a)
    device = torch.device(resolve_device(a.device))
    try:
        import transformers
    except ImportError:
        raise UserError("bench.py compares with transformers: pip install transformers") from None
    verbosity, bars = transformers.logging.get_verbosity(), transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()       # no notes about generation settings on every call
    transformers.utils.logging.disable_progress_bar()
    threads = torch.get_num_threads()     # torch's default, unless the caller set them
    try:
        chosen = use_threads(a.threads, log=log)
        chosen["default"] = threads
        return _run(a, command, sections, mcfg, lengths, sample_batches, device, chosen)
    finally:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _run(a, command, sections, mcfg, lengths, sample_batches, device, chosen):
    cuda = device.type == "cuda"
    quick = a.quick
    warmup = a.warmup if a.warmup is not None else (1 if quick else 2)
    if cuda:
        warmup = max(warmup, 3)   # torch.compile traces on the first calls
    out = {"command": command,
           "quick": quick, "machine": machine_info(device, chosen),
           "model": {"n_layer": mcfg.n_layer, "n_head": mcfg.n_head, "n_embd": mcfg.n_embd,
                     "block_size": mcfg.block_size, "vocab_size": mcfg.vocab_size}}
    t_start = time.time()

    if "train" in sections:
        dtypes = {"fp32": torch.float32}
        if bf16_kernels(device):
            dtypes["bf16"] = torch.bfloat16
        peaks = {p: MatmulPeak(a.matmul_n or (8192 if cuda else 2048), device, dt) for p, dt in dtypes.items()}
        out["train"] = []
        for i, T in enumerate(lengths):
            reps = a.reps or ((2 if quick else 3) if T >= 256 else (5 if quick else 8))
            log(f"[train] batch {a.batch}, length {T}: {warmup} warm-up + {reps} timed steps each side "
                f"({', '.join(dtypes)}, ours and HF)")
            r = bench_train(mcfg, a.batch, T, reps, warmup, device, peaks, label=f"train T={T}")
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

    sizes = [(name, cfg) for name, cfg in (("sample", mcfg), ("sample_demo", demo_config(mcfg.vocab_size)))
             if name in sections]
    for name, cfg in sizes:
        out.setdefault("sample", [])
        folder = tempfile.mkdtemp(prefix="bench-export-")
        try:
            log(f"[{name}] exporting a random {cfg.n_layer}x{cfg.n_head}x{cfg.n_embd} model with hf_export and "
                f"loading it with transformers")
            model, hf, ort, vocab = export_pair(cfg, folder, threads=torch.get_num_threads())
            model, hf = model.to(device), hf.to(device)
            for b in sample_batches:
                reps = a.reps or (3 if quick else 7)
                log(f"[{name}] batch {b}, {a.new_tokens} new tokens: {warmup} warm-up + {reps} timed calls each side")
                r = bench_sample(model, hf, vocab, b, a.new_tokens, reps, warmup, device, label=f"{name} B={b}",
                                 ort=None if device.type == "cuda" else ort)
                r["key"] = f"{name}_b{b}"
                r["model"] = {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
                              "block_size": cfg.block_size}
                r["hf_attention"] = hf.config._attn_implementation
                out["sample"].append(r)
                log(f"[classify] batch {b}: {warmup} warm-up + {reps} timed calls each side")
                c = bench_classify(model, hf, vocab, b, min(default_length() - 1, cfg.block_size), reps, warmup, device,
                                   label=f"classify B={b}", ort=None if device.type == "cuda" else ort)
                c["key"] = f"classify{name[len('sample'):]}_b{b}"
                out.setdefault("classify", []).append(c)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    if "kmeans" in sections:
        n = a.kmeans_n or (100000 if quick else 300000)
        log(f"[kmeans] {n} vectors ({a.kmeans_data}), k={a.kmeans_k}")
        x, what = kmeans_data(n, a.kmeans_data)
        reps = a.reps or (1 if quick else 3)
        r = bench_kmeans(x, a.kmeans_k, reps, a.kmeans_iters, torch.get_num_threads(), label="kmeans", device=device)
        r["features"] = what
        out["kmeans"] = r

    if "web" in sections:
        out["web"] = bench_web(a, quick)

    if "threads" in sections:
        from imagegpt import thread_bench
        jobs = [j.strip() for j in a.thread_jobs.split(",") if j.strip()]
        out["threads"] = thread_bench.measure(chosen["default"], jobs, reps=a.reps or (4 if quick else 10), log=log)
        torch.set_num_threads(chosen["threads"])

    out["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    out["seconds_total"] = round(time.time() - t_start, 1)
    out["rows"] = rows(out)
    return out


# ----------------------------------------------------------------------------- report

def thread_work(name):
    from imagegpt.thread_bench import WORK
    return WORK[name]


def _verdict(key, value, cuda):
    if key.startswith("threads_") and value is not None and not cuda:
        # idle: within 5 % of torch's default; beside another job: not slower than one thread (5 % of noise)
        if key.endswith("_idle") or (key.endswith("_vs_one") and "_idle" not in key):
            return f">= {THREAD_TARGET:g}x", value >= THREAD_TARGET
        return None, None
    if key not in TARGETS or cuda or value is None or not math.isfinite(value):
        return None, None
    op, target, _ = TARGETS[key]
    return f"{op} {target:g}x" if not key.startswith("mfu") else f">= {100 * target:.0f} %", \
        (value >= target if op == ">=" else value <= target)


def _mb(b):
    return f"{b / 2 ** 20:.0f} MB"


def rows(out):
    """The summary table: list of dicts (measure, ours, theirs, ratio, target, met, key)."""
    cuda = out["machine"]["device"].startswith("cuda")
    table = []

    def add(key, measure, ours, theirs, ratio, ratio_text):
        target, met = _verdict(key, ratio, cuda)
        table.append({"key": key, "measure": measure, "ours": ours, "theirs": theirs, "ratio": ratio,
                      "ratio_text": ratio_text, "target": target, "met": met})

    names = {"fp32": "fp32", "bf16": "bf16 autocast"}
    for r in out.get("train", []):
        where = f"length {r['length']}, batch {r['batch']}"
        for k, (o, t) in r["pairs"].items():
            how = (f"defaults: ours {names[o.split('_')[1]]}, HF {names[t.split('_')[1]]}" if k == "defaults"
                   else f"both {names[k]}") + (", ours compiled" if r["compile_ours"] else "")
            add(f"{r['key']}_{k}", f"training tokens/s, {where}, {how} (vs HF GPT-2)",
                f"{r['tokens_per_s'][o]:.0f}", f"{r['tokens_per_s'][t]:.0f}", r["ratio"][k], f"{r['ratio'][k]:.2f}x")
            if "ratio_bound" in r:
                gemm = r["gemm_seconds"][o.split("_")[1]]
                add(f"{r['key']}_{k}_bound", f"the most that ratio could be: HF's step over our step's linear-layer "
                    f"products alone ({1000 * gemm:.0f} ms, each run alone; {where}, {k})",
                    f"{r['batch'] * r['length'] / gemm:.0f}", f"{r['tokens_per_s'][t]:.0f}", r["ratio_bound"][k],
                    f"{r['ratio_bound'][k]:.2f}x")
    for r in out.get("train", []):
        for p, mfu in r["mfu"].items():
            peak = out["matmul_peak"][p]
            half = r["flops_per_token"]["computed"] == r["flops_per_token"]["causal"]
            add(f"mfu_{r['key']}_{p}", f"achieved FLOP/s of our {names[p]} training step, length {r['length']}, "
                f"the FLOPs its kernels compute (attention over the {'causal half' if half else 'full square'}; "
                f"nanoGPT's full-square count in brackets), vs the {peak['dtype']} matmul ceiling (the best of a "
                f"{peak['n']}^2 product and the step's own products, each run alone)",
                f"{r['achieved_flops'][p] / 1e9:.1f} GFLOP/s", f"{peak['ceiling_flops'] / 1e9:.1f} GFLOP/s", mfu,
                f"{100 * mfu:.0f} % ({100 * r['mfu_full'][p]:.0f} %)")
    for r in out.get("sample", []):
        m = r["model"]
        size = ("demo model" if r["key"].startswith("sample_demo") else "model") + f" {m['n_layer']}x{m['n_head']}x{m['n_embd']}"
        add(r["key"], f"sampling images/s, {size}, batch {r['batch']}, {r['new_tokens']} new tokens, ours at its "
            f"default ({r['ours_precision']}) (vs HF generate(), fp32)" + ("" if r["same_tokens"] else " [tokens differ]"),
            f"{r['images_per_s']['ours']:.1f}", f"{r['images_per_s']['theirs']:.1f}", r["ratio"], f"{r['ratio']:.2f}x")
        for k, ratio in r["ratio_other"].items():
            what = {"ours_other": f"ours in {r['ours_other_precision']} (not the default)",
                    "onnx": "onnxruntime fp32 through our loop", "onnx_int8": "onnxruntime int8 through our loop"}[k]
            differ = not r["same_tokens_as_hf"][k]
            add(f"{r['key']}_{k}", f"sampling images/s, {size}, batch {r['batch']}, {what} (vs HF generate())"
                + (" [tokens differ]" if differ else ""),
                f"{r['images_per_s'][k]:.1f}", f"{r['images_per_s']['theirs']:.1f}", ratio, f"{ratio:.2f}x")
    for r in out.get("classify", []):
        for k, ratio in r["ratio"].items():
            side = {"ours": "ours (PyTorch)", "onnx": "onnxruntime fp32", "onnx_int8": "onnxruntime int8"}[k]
            size = "demo model" if r["key"].startswith("classify_demo") else "model"
            add(f"{r['key']}_{k}", f"classification images/s, {size}, {side}, batch {r['batch']} (vs an HF forward)",
                f"{r['images_per_s'][k]:.0f}", f"{r['images_per_s']['theirs']:.0f}", ratio, f"{ratio:.2f}x")
    web = {r["key"]: r for r in out.get("web", {}).get("rows", [])}
    for key, r in web.items():
        if r["side"].startswith("the page through serve.py"):
            continue
        peer = web.get(f"service_t{r['threads']}")
        where = f"{r['side']}, {r['threads']} thread{'s' if r['threads'] > 1 else ''} (vs serve.py, PyTorch, the same threads)"
        for q in ("p50", "p99"):
            mine, theirs = r["classify_ms"][q], peer["classify_ms"][q] if peer else float("nan")
            add(f"web_{key}_classify_{q}", f"classification latency {q}, ms per drawing, {where}; lower is better",
                f"{mine:.1f}", f"{theirs:.1f}", mine / theirs, f"{mine / theirs:.2f}x")
        for b, dps in r["drawings_per_s"].items():
            theirs = peer["drawings_per_s"][b] if peer else float("nan")
            add(f"web_{key}_draw_b{b}", f"drawings/s, batch {b}, {where}", f"{dps:.1f}", f"{theirs:.1f}",
                dps / theirs, f"{dps / theirs:.2f}x")
    for r in out.get("threads", {}).get("rows", []):
        n, ms = r["threads"], r["ms"]
        what = f"ms per {thread_work(r['work'])}, demo GPT, {r['where']}: the threads chosen now ({n['auto']})"
        key = f"threads_{r['work']}_{r['job']}"
        same = lambda m: " (the same setting, timed once)" if r.get("auto_is") == m else ""
        add(key, f"{what} vs torch's default ({n['default']}, before){same('default')}", f"{ms['auto']:.1f}",
            f"{ms['default']:.1f}", ms["default"] / ms["auto"], f"{ms['default'] / ms['auto']:.2f}x")
        add(f"{key}_vs_one", f"{what} vs one thread{same('one')}", f"{ms['auto']:.1f}", f"{ms['one']:.1f}",
            ms["one"] / ms["auto"], f"{ms['one'] / ms['auto']:.2f}x")
    if "kmeans" in out:
        r = out["kmeans"]
        add("kmeans_time", f"k-means seconds, {r['n']} x {r['dim']}, k={r['k']} (vs scikit-learn; lower is better)",
            f"{r['seconds']['ours']:.1f} s", f"{r['seconds']['theirs']:.1f} s", r["time_ratio"],
            f"{r['time_ratio']:.2f}x")
        add("kmeans_inertia", "k-means final inertia (vs scikit-learn; lower is better)",
            f"{r['inertia']['ours']:.1f}", f"{r['inertia']['theirs']:.1f}", r["inertia_ratio"],
            f"{r['inertia_ratio']:.4f}x")
    for sec, what in (("train", "training step"), ("sample", "sampling")):
        for r in out.get(sec, []):
            m = r["peak_memory_bytes"]
            pairs = r["pairs"] if sec == "train" else {"": ("ours", "theirs")}
            for k, (o, t) in pairs.items():
                extra = f"length {r['length']}, {k}" if sec == "train" else f"batch {r['batch']}"
                add(f"memory_{r['key']}" + (f"_{k}" if k else ""), f"peak memory, {what}, {extra} ({r['memory_method']})",
                    _mb(m[o]), _mb(m[t]), m[o] / m[t] if m[t] else float("nan"), f"{m[o] / m[t]:.2f}x" if m[t] else "-")
    return table


def format_report(out):
    m = out["machine"]
    lines = []
    dev = m.get("gpu") or f"{m.get('cpu', '?')} ({m['cpu_count']} cores"
    if not m.get("gpu"):
        dev += f", {', '.join(m.get('cpu_flags', []))})" if m.get("cpu_flags") else ")"
    lines.append(f"machine: {dev}; {m['platform']}")
    attn = next((r["hf_attention"] for r in out.get("train", []) + out.get("sample", [])), None)
    threads = describe_threads(m["threads_choice"]) if m.get("threads_choice") else m["threads"]
    lines.append(f"software: python {m['python']}, torch {m['torch']} ({m['device']}, threads {threads}), "
                 f"transformers {m['transformers']}" + (f" (GPT-2 attention: {attn})" if attn else "")
                 + f", scikit-learn {m['sklearn']}, onnxruntime {m.get('onnxruntime')}")
    k = m.get("kernels")
    if k:
        lines.append(f"kernels: ATen {k['aten']}; fp32 matmul {k['fp32_matmul']}; oneDNN {k['onednn']['isa']} "
                     f"(fp32 {k['onednn']['fp32']}, bf16 {k['onednn']['bf16']}); onnxruntime MLAS fp32 "
                     f"{k['onnxruntime_mlas']['fp32']}, int8 {k['onnxruntime_mlas']['int8']} (derived from the flags)"
                     + (f"; environment {k['env']}" if k.get("env") else ""))
    if m.get("load_average"):
        lines.append(f"load average (1/5/15 min): {m['load_average']} at the start, {m.get('load_average_end')} at the end")
    if out.get("command"):
        lines.append(f"command: {out['command']}   ({out['seconds_total']} s)")
    lines.append("")
    lines.append("| measure | ours | peer | ratio | target | met |")
    lines.append("|---|---:|---:|---:|---|---|")
    for r in out["rows"]:
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['measure']} | {r['ours']} | {r['theirs']} | {r['ratio_text']} | {r['target'] or ''} | {met} |")
    notes = []
    for r in out.get("train", []):
        f = r["first_loss"]
        notes.append(f"length {r['length']}: first-step loss, fp32: ours {f['ours_fp32']:.5f}, HF {f['theirs_fp32']:.5f} "
                     f"(|diff| {abs(f['ours_fp32'] - f['theirs_fp32']):.1e})"
                     + (f"; bf16: ours {f['ours_bf16']:.5f}, HF {f['theirs_bf16']:.5f}" if "ours_bf16" in f else "")
                     + f"; FLOPs per token {r['flops_per_token']['full']:,} (full-square attention, the MFU's count), "
                     f"{r['flops_per_token']['causal']:,} (causal half)")
    if "kmeans" in out:
        k = out["kmeans"]
        notes.append(f"k-means data: {k['features']}; {k['distinct_vectors']} distinct of {k['n']}; "
                     f"{k['rule']}: iterations run, ours {k['iters']['ours']}, scikit-learn {k['iters']['theirs']}")
    if "web" in out:
        w = out["web"]
        notes.append(f"web: {w['checkpoint']} in {w['browser']} with onnxruntime-web {w['onnxruntime_web']}; "
                     f"{w['classify_calls']} classifications and {w['draw_reps']} drawing calls per row, of "
                     f"{'a test image of its data' if w['image'] == 'given' else 'a blank image'}; 2 threads in the "
                     f"browser served with COOP/COEP headers (a plain static host gives the page 1 thread)")
    for r in out.get("train", [])[:1]:
        if r.get("cuda_checks"):
            notes.append("CUDA checks: " + ", ".join(f"{k} {v}" for k, v in r["cuda_checks"].items()))
    for r in out.get("sample", []):
        notes.append(f"{r['key']}: generated {r['generated']['ours']} vs {r['generated']['theirs']}, "
                     f"same tokens: {r['same_tokens']}")
    if notes:
        lines.append("")
        lines += ["- " + n for n in notes]
    return "\n".join(lines)


def expand_preset(argv):
    """--preset NAME -> its arguments first, so that any argument given after it still wins."""
    argv = list(argv)
    if "--preset" in argv:
        i = argv.index("--preset")
        name = argv[i + 1] if i + 1 < len(argv) else ""
        if name not in PRESETS:
            raise UserError(f"--preset: choose from {', '.join(PRESETS)}; got {name!r}")
        argv = PRESETS[name] + argv[:i] + argv[i + 2:]
    return argv


def main(argv=None):
    argv = expand_preset(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    if a.json:
        check_file(a.json, "JSON file")   # before minutes of measuring
    out = run(a, " ".join(["python bench.py"] + argv))
    if a.json:
        write_result(a.json, out, command=out["command"], config=a, dtype="per row (each side's precision is in its key)")
    print(format_report(out))
    if a.json:
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    run_cli(main)
