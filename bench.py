"""Benchmarks, each side by side with what users would otherwise pick, in one run on one machine.

    python bench.py                      # everything at the v2 sizes (CPU: several minutes)
    python bench.py --quick              # fewer repetitions, 100,000 k-means vectors
    python bench.py --json bench.json    # also write every figure (and the raw timings) as JSON
    python bench.py --only train,kmeans  # a subset: train, sample, kmeans

What is measured (ours vs peer, identical sizes, batch and dtype, same weights where it applies):
  train    one training step (forward, loss, backward, AdamW step) of our GPT vs transformers'
           GPT2LMHeadModel built from the same GPT2Config our export writes (gelu_new, dropout 0,
           the attention implementation transformers picks by default, reported), loaded with our
           weights so both compute the same loss; AdamW with the same two groups and settings as
           train.py (ours: model.configure_optimizers; theirs: torch.optim.AdamW). Batch 16, at
           sequence length 512 and at the default one (the default tokenisation gives 54-token
           sequences: 53 input tokens). Tokens/s = batch * length / step time.
  mfu      achieved FLOP/s of our training step over a matmul peak measured in the same run (a
           large square matmul in the training dtype, sampled between the training steps).
           FLOPs per token, the PaLM / nanoGPT convention:
               6 * N + 12 * n_layer * T * n_embd
           N = the weights of the matmuls (12 * n_embd^2 per layer, plus vocab * n_embd for the
           tied output layer; embeddings lookups, biases and LayerNorms are not counted); 12*L*T*d
           counts the attention scores and the weighted values (forward 4*T*d per layer, backward
           twice that) over the full T x T square, although a causal kernel skips half of it.
  sample   greedy sampling through our KV cache (generation.generate) vs transformers' generate() on
           the model exported by hf_export and loaded with AutoModelForCausalLM; batch 1 and 16,
           prompt "<IMG>", the same number of new tokens on both sides (EOS disabled on both, so
           neither stops early); the generated tokens are compared. The ONNX graphs of the same export
           (onnx/model.onnx fp32 and onnx/model_quantized.onnx int8 weights) run through our decoding
           loop in onnxruntime (CPU only), reported as images/s (one image per row per call).
           Classification (at each sampling batch size): class probabilities of random prefixes
           '<IMG> codes </IMG> <CLS>' (52 tokens) through metrics.class_probs, ours and onnxruntime,
           vs one forward of the HF model read at <CLS>; images/s.
  kmeans   our tokenizer.kmeans vs scikit-learn KMeans(n_clusters=500, init="k-means++", n_init=1)
           on the same 300,000 feature vectors: the per-pixel features (patch_size 1) of the
           built-in training digits, as in the original project: position (x, y), intensity and
           gradient (Gx, Gy), each group standardised with weight 1 (time is 0 for still images and
           left out): 5 dimensions, through Codebook.fit_data. Ours runs the project's default 30
           Lloyd iterations, scikit-learn its defaults (up to 300, tol 1e-4). Both final inertias
           are computed by the same float64 function.
  memory   peak memory of a training step and of a sampling call, each side: on CUDA the
           allocator's peak (torch.cuda.max_memory_allocated) above what was allocated before; on
           Linux the growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs)
           above the RSS before the call.

Repetitions alternate ours / theirs (the order flips every repetition) and medians are reported,
so that the ratios hold on a shared machine whose absolute speed drifts; the JSON also has the
ratios of median process CPU time. Both sides use the same threads (--threads, default torch's:
all cores). On a machine whose cores are busy with other jobs, prefer --threads 1: with all cores,
every parallel region waits for a thread that a neighbour has preempted, which swamps small ops
(a sampling step) on both sides alike.

On CUDA the training step uses bf16 autocast on both sides and torch.compile for ours (as train.py
does); sampling runs in the model's dtype (fp32) on both sides (as sample.py does); our k-means
runs on the GPU (as data.prepare does), scikit-learn on the CPU.
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

import checkpoint
import data
import hf_format
from cli import parser, run_cli
from generation import generate
from metrics import class_probs
from model import GPT, GPTConfig
from onnx_backend import OnnxGPT
from tokenizer import Codebook, CodebookConfig, assign, kmeans, uint8_to_tensor
from tokens import Vocab
from trainer import TrainConfig
from util import UserError, check_file, check_memory, resolve_device, write_json

# targets on the CPU (issue 7): key -> (comparison, value, description)
TARGETS = {
    "train_long": (">=", 1.5, "training tokens/s vs HF GPT-2, length 512"),
    "train_default": (">=", 1.15, "training tokens/s vs HF GPT-2, default length"),
    "mfu": (">=", 0.80, "achieved FLOP/s vs measured matmul peak"),
    "sample_b1": (">=", 3.0, "sampling tokens/s vs HF generate(), batch 1"),
    "sample_b16": (">=", 2.0, "sampling tokens/s vs HF generate(), batch 16"),
    "kmeans_time": ("<=", 0.5, "k-means time vs scikit-learn"),
    "kmeans_inertia": ("<=", 1.02, "k-means inertia vs scikit-learn"),
}


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def default_length():
    """Input tokens of a default sequence: (28/p)^2 codes + <IMG> </IMG> <CLS> <CLS_y> <EOS>, minus 1."""
    return (28 // CodebookConfig().patch_size) ** 2 + 5 - 1


# ----------------------------------------------------------------------------- machine and timing

def machine_info(device):
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "device": str(device), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.read().splitlines()
        get = lambda key: next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), "")
        info["cpu"] = get("model name")
        flags = set(get("flags").split())
        info["cpu_flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"})
    except OSError:
        info["cpu"] = platform.processor()
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    for mod in ("transformers", "sklearn"):
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
    """Square n x n matmuls in the training dtype; sample() adds one timing (GFLOP/s)."""

    def __init__(self, n, device, dtype):
        self.n, self.device, self.dtype = n, device, dtype
        g = torch.Generator(device=device).manual_seed(0)
        self.a = torch.randn(n, n, generator=g, device=device).to(dtype)
        self.b = torch.randn(n, n, generator=g, device=device).to(dtype)
        self.samples = []
        self.sample()  # warm-up, not kept
        self.samples = []

    def sample(self):
        dt, _ = timed(lambda: self.a @ self.b, self.device)
        self.samples.append(2 * self.n ** 3 / dt)

    def result(self):
        return {"n": self.n, "dtype": str(self.dtype).replace("torch.", ""),
                "median_flops": median(self.samples), "max_flops": max(self.samples) if self.samples else None,
                "samples": len(self.samples)}


# ----------------------------------------------------------------------------- training

def flops_per_token(cfg, T):
    """Training FLOPs per token (forward + backward): 6 N + 12 L T d, see the module docstring."""
    n_matmul = cfg.n_layer * 12 * cfg.n_embd ** 2 + cfg.vocab_size * cfg.n_embd
    return 6 * n_matmul + 12 * cfg.n_layer * T * cfg.n_embd


def hf_config(mcfg):
    """The transformers GPT2Config that hf_export writes for a model of these sizes."""
    from transformers import GPT2Config
    d = hf_format.gpt2_config(mcfg, Vocab(mcfg.vocab_size - 16, 10))
    return GPT2Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type", "dtype")})


def build_pair(mcfg, device, seed=0):
    """Our GPT and a GPT2LMHeadModel holding the same weights, both in training mode."""
    from transformers import GPT2LMHeadModel
    torch.manual_seed(seed)
    ours = GPT(mcfg)
    theirs = GPT2LMHeadModel(hf_config(mcfg))
    missing, unexpected = theirs.load_state_dict(hf_format.to_gpt2_state_dict(ours), strict=False)
    bad = [k for k in missing if k != "lm_head.weight"] + list(unexpected)
    if bad:
        raise RuntimeError(f"weights do not map onto GPT2LMHeadModel: {bad[:3]}")
    return ours.to(device).train(), theirs.to(device).train()


def adamw_groups(model, weight_decay):
    """The groups of GPT.configure_optimizers: decay on parameters with dim >= 2, none on the rest."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def bench_train(mcfg, batch, T, reps, warmup, device, peak, compile_ours=False, bf16=False, label=""):
    """One training step of ours vs HF at (batch, T). -> dict of figures; peak (MatmulPeak) gets one
    sample per repetition."""
    tc = TrainConfig()
    ours, theirs = build_pair(mcfg, device)
    opt_o = ours.configure_optimizers(tc.weight_decay, tc.lr, (tc.beta1, tc.beta2), device.type)
    fused = {"fused": True} if any(g.get("fused") for g in opt_o.param_groups) else {}
    opt_t = torch.optim.AdamW(adamw_groups(theirs, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2), **fused)
    step_o = torch.compile(ours) if compile_ours else ours
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(mcfg.vocab_size, (batch, T + 1), generator=g).to(device)
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    def run_ours():
        with ctx():
            _, loss = step_o(x, y)
        loss.backward()
        opt_o.step()
        opt_o.zero_grad(set_to_none=True)
        return loss.detach()

    def run_theirs():
        with ctx():
            loss = theirs(input_ids=x, labels=y, shift_labels=y).loss   # the same targets, unshifted again
        loss.backward()
        opt_t.step()
        opt_t.zero_grad(set_to_none=True)
        return loss.detach()

    first_o, first_t = run_ours().item(), run_theirs().item()   # same weights, same batch: same loss
    for _ in range(max(0, warmup - 1)):
        run_ours(), run_theirs()
    mem = {}
    for name, fn in (("ours", run_ours), ("theirs", run_theirs)):
        _, mem[name], method = peak_memory(fn, device)
    times, cpu = alternate({"ours": run_ours, "theirs": run_theirs}, reps, device, peak.sample, label)
    t_o, t_t = median(times["ours"]), median(times["theirs"])
    tokens = batch * T
    fpt = flops_per_token(mcfg, T)
    return {"batch": batch, "length": T, "dtype": "bf16 autocast" if bf16 else str(next(ours.parameters()).dtype).replace("torch.", ""),
            "compile_ours": compile_ours, "hf_attention": theirs.config._attn_implementation,
            "first_loss": {"ours": first_o, "theirs": first_t},
            "seconds": {"ours": t_o, "theirs": t_t},
            "tokens_per_s": {"ours": tokens / t_o, "theirs": tokens / t_t},
            "ratio": t_t / t_o,
            "flops_per_token": fpt, "achieved_flops": fpt * tokens / t_o,
            "peak_memory_bytes": mem, "memory_method": method,
            "ratio_cpu_time": _cpu_ratio(cpu), "raw_seconds": times, "raw_cpu_seconds": cpu}


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
    tc = TrainConfig(n_layer=mcfg.n_layer, n_head=mcfg.n_head, n_embd=mcfg.n_embd, max_length=mcfg.block_size,
                     num_codes=vocab.num_codes)
    checkpoint.save(os.path.join(folder, "ckpt"), model, tc, vocab, book)
    out = hf_format.write_export(checkpoint.load(os.path.join(folder, "ckpt")), os.path.join(folder, "hf"),
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
    when `ort` maps names to OnnxGPT models). images/s counts one image per row and call."""
    fns = {"ours": lambda: our_generate(model, vocab, batch, new_tokens),
           "theirs": lambda: hf_generate(hf, vocab, batch, new_tokens)}
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
            "generated": {"ours": list(a.shape), "theirs": list(b.shape)},
            "same_tokens": a.shape == b.shape and torch.equal(a, b),
            "same_tokens_ort": {k: torch.equal(first[k], a) for k in (ort or {})},
            "seconds": secs, "tokens_per_s": {k: n / t for k, t in secs.items()},
            "images_per_s": {k: batch / t for k, t in secs.items()}, "ratio": secs["theirs"] / secs["ours"],
            "ratio_ort": {k: secs["theirs"] / secs[k] for k in (ort or {})},
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
    images, labels, _, _ = data.load_builtin()
    train, _ = data.stratified_split(labels, 0.2, 0)
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
    from sklearn.cluster import KMeans
    try:
        from threadpoolctl import threadpool_limits
        limit = (lambda: threadpool_limits(limits=threads)) if threads else nullcontext
    except ImportError:
        limit = nullcontext
    xn, xd = x.numpy(), x.to(device)     # ours runs where the project fits codebooks (data.prepare)
    res = {}

    def ours():
        res["ours"] = kmeans(xd, k, iters=iters, seed=seed)[0].cpu()

    def theirs():
        with limit():
            km = KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=seed).fit(xn)
        res["theirs"] = km.cluster_centers_
        res["theirs_iters"] = int(km.n_iter_)

    times, cpu = alternate({"ours": ours, "theirs": theirs}, reps, device, label=label)
    i_o, i_t = inertia(x, res["ours"]), inertia(x, res["theirs"])
    t_o, t_t = median(times["ours"]), median(times["theirs"])
    return {"n": len(x), "dim": x.shape[1], "k": k, "device": {"ours": str(device), "theirs": "cpu"}, "distinct_vectors": len(torch.unique(x, dim=0)),
            "iters": {"ours": iters, "theirs": res["theirs_iters"]},
            "seconds": {"ours": t_o, "theirs": t_t}, "time_ratio": t_o / t_t,
            "time_ratio_cpu_time": median(cpu["ours"]) / median(cpu["theirs"]),
            "inertia": {"ours": i_o, "theirs": i_t}, "inertia_ratio": i_o / i_t,
            "raw_seconds": times, "raw_cpu_seconds": cpu}


# ----------------------------------------------------------------------------- the run

def build_parser():
    ap = parser(__doc__, prog="bench.py")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and 100,000 k-means vectors")
    ap.add_argument("--json", metavar="OUT", help="write all figures to this JSON file")
    ap.add_argument("--only", default="train,sample,kmeans", help="sections to run (default: %(default)s)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    ap.add_argument("--threads", type=int, help="CPU threads for torch and scikit-learn (default: torch's)")
    ap.add_argument("--n_layer", type=int, default=6)
    ap.add_argument("--n_head", type=int, default=8)
    ap.add_argument("--n_embd", type=int, default=384)
    ap.add_argument("--block_size", type=int, default=512)
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
    ap.add_argument("--kmeans_k", type=int, default=500)
    ap.add_argument("--kmeans_iters", type=int, default=30, help="our Lloyd iterations (the project's default)")
    ap.add_argument("--kmeans_data", default="digits", choices=["digits", "random"])
    ap.add_argument("--matmul_n", type=int, help="side of the square peak matmul (default: 2048; CUDA 8192)")
    ap.add_argument("--extra", action="store_true",
                    help="also time both models with CPU bf16 autocast at the long length (an extra row)")
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
    if not sections or sections - {"train", "sample", "kmeans"}:
        raise UserError(f"--only: choose from train, sample, kmeans; got {a.only!r}")
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
    if "sample" in sections and not 1 <= a.new_tokens < a.block_size:
        raise UserError(f"--new_tokens must be in 1..{a.block_size - 1}")
    if a.threads is not None and a.threads < 1:
        raise UserError("--threads must be at least 1")
    batches = ints(a.sample_batches, "--sample_batches")
    n = mcfg.num_params_estimate()   # two models (ours, HF) side by side, each training or sampling
    need = {"train": 2 * (16 * n + 4 * a.batch * max(lengths) * (16 * a.n_layer * a.n_embd + 3 * a.vocab_size))
            + 12 * (a.matmul_n or 2048) ** 2,
            "sample": 2 * (4 * n + 4 * max(batches) * a.block_size * (2 * a.n_layer * a.n_embd + a.vocab_size)),
            "kmeans": 4 * (a.kmeans_n or 300000) * (5 + a.kmeans_k) if a.kmeans_n else 0}
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
    threads = torch.get_num_threads()
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        return _run(a, command, sections, mcfg, lengths, sample_batches, device)
    finally:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()


def _run(a, command, sections, mcfg, lengths, sample_batches, device):
    cuda = device.type == "cuda"
    quick = a.quick
    warmup = a.warmup if a.warmup is not None else (1 if quick else 2)
    if cuda:
        warmup = max(warmup, 3)   # torch.compile traces on the first calls
    out = {"command": command,
           "quick": quick, "machine": machine_info(device),
           "model": {"n_layer": mcfg.n_layer, "n_head": mcfg.n_head, "n_embd": mcfg.n_embd,
                     "block_size": mcfg.block_size, "vocab_size": mcfg.vocab_size}}
    t_start = time.time()

    if "train" in sections:
        dtype = torch.bfloat16 if cuda else torch.float32
        peak = MatmulPeak(a.matmul_n or (8192 if cuda else 2048), device, dtype)
        out["train"] = []
        for i, T in enumerate(lengths):
            reps = a.reps or ((3 if quick else 5) if T >= 256 else (5 if quick else 10))
            log(f"[train] batch {a.batch}, length {T}: {warmup} warm-up + {reps} timed steps each side")
            r = bench_train(mcfg, a.batch, T, reps, warmup, device, peak, compile_ours=cuda, bf16=cuda,
                            label=f"train T={T}")
            if len(lengths) == 1:
                r["key"] = "train_default" if T == default_length() else "train_long"
            else:
                r["key"] = "train_long" if i == 0 else "train_default" if i == len(lengths) - 1 else f"train_{T}"
            out["train"].append(r)
        out["matmul_peak"] = peak.result()
        for r in out["train"]:
            r["mfu"] = r["achieved_flops"] / out["matmul_peak"]["median_flops"]
        if a.extra and not cuda:
            T = lengths[0]
            log(f"[train, extra] CPU bf16 autocast on both sides, length {T}")
            bpeak = MatmulPeak(a.matmul_n or 2048, device, torch.bfloat16)
            r = bench_train(mcfg, a.batch, T, a.reps or (2 if quick else 3), warmup, device, bpeak, bf16=True,
                            label=f"train bf16 T={T}")
            r["key"] = "train_bf16"
            r["mfu"] = r["achieved_flops"] / bpeak.result()["median_flops"]
            r["matmul_peak"] = bpeak.result()
            out["train_extra"] = [r]

    if "sample" in sections:
        out["sample"] = []
        folder = tempfile.mkdtemp(prefix="bench-export-")
        try:
            log("[sample] exporting a random model with hf_export and loading it with transformers")
            model, hf, ort, vocab = export_pair(mcfg, folder, threads=a.threads)
            model, hf = model.to(device), hf.to(device)
            for b in sample_batches:
                reps = a.reps or (3 if quick else 7)
                log(f"[sample] batch {b}, {a.new_tokens} new tokens: {warmup} warm-up + {reps} timed calls each side")
                r = bench_sample(model, hf, vocab, b, a.new_tokens, reps, warmup, device, label=f"sample B={b}",
                                 ort=None if device.type == "cuda" else ort)
                r["key"] = f"sample_b{b}"
                r["hf_attention"] = hf.config._attn_implementation
                out["sample"].append(r)
                log(f"[classify] batch {b}: {warmup} warm-up + {reps} timed calls each side")
                c = bench_classify(model, hf, vocab, b, min(default_length() - 1, mcfg.block_size), reps, warmup, device,
                                   label=f"classify B={b}", ort=None if device.type == "cuda" else ort)
                c["key"] = f"classify_b{b}"
                out.setdefault("classify", []).append(c)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    if "kmeans" in sections:
        n = a.kmeans_n or (100000 if quick else 300000)
        log(f"[kmeans] {n} vectors ({a.kmeans_data}), k={a.kmeans_k}")
        x, what = kmeans_data(n, a.kmeans_data)
        reps = a.reps or (1 if quick else 3)
        r = bench_kmeans(x, a.kmeans_k, reps, a.kmeans_iters, a.threads, label="kmeans", device=device)
        r["features"] = what
        out["kmeans"] = r

    out["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None
    out["seconds_total"] = round(time.time() - t_start, 1)
    out["rows"] = rows(out)
    return out


# ----------------------------------------------------------------------------- report

def _verdict(key, value, cuda):
    if key not in TARGETS or cuda or value is None or not math.isfinite(value):
        return None, None
    op, target, _ = TARGETS[key]
    return f"{op} {target:g}{'x' if key != 'mfu' else ''}" if key != "mfu" else f">= {100 * target:.0f} %", \
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

    for r in out.get("train", []) + out.get("train_extra", []):
        what = f"training tokens/s, length {r['length']}, batch {r['batch']}, {r['dtype']}"
        if r["compile_ours"]:
            what += ", ours compiled"
        add(r["key"], what + " (vs HF GPT-2)", f"{r['tokens_per_s']['ours']:.0f}",
            f"{r['tokens_per_s']['theirs']:.0f}", r["ratio"], f"{r['ratio']:.2f}x")
    if "matmul_peak" in out:
        p = out["matmul_peak"]
        for r in out["train"]:
            add("mfu" if r["key"] == "train_long" or len(out["train"]) == 1 else "mfu_" + r["key"],
                f"achieved FLOP/s of our training step, length {r['length']} (vs {p['n']}^2 {p['dtype']} matmul)",
                f"{r['achieved_flops'] / 1e9:.1f} GFLOP/s", f"{p['median_flops'] / 1e9:.1f} GFLOP/s",
                r["mfu"], f"{100 * r['mfu']:.0f} %")
    for r in out.get("train_extra", []):
        add("mfu_bf16", f"achieved FLOP/s, bf16 autocast, length {r['length']} (vs bf16 matmul)",
            f"{r['achieved_flops'] / 1e9:.1f} GFLOP/s", f"{r['matmul_peak']['median_flops'] / 1e9:.1f} GFLOP/s",
            r["mfu"], f"{100 * r['mfu']:.0f} %")
    for r in out.get("sample", []):
        add(r["key"], f"sampling tokens/s, batch {r['batch']}, {r['new_tokens']} new (vs HF generate)"
            + ("" if r["same_tokens"] else " [tokens differ]"),
            f"{r['tokens_per_s']['ours']:.0f}", f"{r['tokens_per_s']['theirs']:.0f}", r["ratio"], f"{r['ratio']:.2f}x")
        for k, ratio in r.get("ratio_ort", {}).items():
            add(f"{r['key']}_{k}", f"sampling images/s, onnxruntime {'int8' if 'int8' in k else 'fp32'} through our "
                f"loop, batch {r['batch']} (vs HF generate)" + ("" if r["same_tokens_ort"][k] else " [tokens differ]"),
                f"{r['images_per_s'][k]:.1f}", f"{r['images_per_s']['theirs']:.1f}", ratio, f"{ratio:.2f}x")
    for r in out.get("classify", []):
        for k, ratio in r["ratio"].items():
            side = {"ours": "ours (PyTorch)", "onnx": "onnxruntime fp32", "onnx_int8": "onnxruntime int8"}[k]
            add(f"{r['key']}_{k}", f"classification images/s, {side}, batch {r['batch']} (vs an HF forward)",
                f"{r['images_per_s'][k]:.0f}", f"{r['images_per_s']['theirs']:.0f}", ratio, f"{ratio:.2f}x")
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
            extra = f"length {r['length']}" if sec == "train" else f"batch {r['batch']}"
            add(f"memory_{r['key']}", f"peak memory, {what}, {extra} ({r['memory_method']})",
                _mb(m["ours"]), _mb(m["theirs"]), m["ours"] / m["theirs"] if m["theirs"] else float("nan"),
                f"{m['ours'] / m['theirs']:.2f}x" if m["theirs"] else "-")
    return table


def format_report(out):
    m = out["machine"]
    lines = []
    dev = m.get("gpu") or f"{m.get('cpu', '?')} ({m['cpu_count']} cores"
    if not m.get("gpu"):
        dev += f", {', '.join(m.get('cpu_flags', []))})" if m.get("cpu_flags") else ")"
    lines.append(f"machine: {dev}; {m['platform']}")
    attn = next((r["hf_attention"] for r in out.get("train", []) + out.get("sample", [])), None)
    lines.append(f"software: python {m['python']}, torch {m['torch']} ({m['device']}, {m['threads']} threads), "
                 f"transformers {m['transformers']} (GPT-2 attention: {attn}), scikit-learn {m['sklearn']}")
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
        d = abs(r["first_loss"]["ours"] - r["first_loss"]["theirs"])
        notes.append(f"length {r['length']}: first-step loss ours {r['first_loss']['ours']:.5f}, "
                     f"HF {r['first_loss']['theirs']:.5f} (|diff| {d:.1e})")
    if "kmeans" in out:
        k = out["kmeans"]
        notes.append(f"k-means data: {k['features']}; {k['distinct_vectors']} distinct of {k['n']}; "
                     f"iterations ours {k['iters']['ours']}, scikit-learn {k['iters']['theirs']}")
    for r in out.get("sample", []):
        notes.append(f"sampling batch {r['batch']}: generated {r['generated']['ours']} vs {r['generated']['theirs']}, "
                     f"same tokens: {r['same_tokens']}")
    if notes:
        lines.append("")
        lines += ["- " + n for n in notes]
    return "\n".join(lines)


def main(argv=None):
    a = build_parser().parse_args(argv)
    if a.json:
        check_file(a.json, "JSON file")   # before minutes of measuring
    out = run(a, " ".join(["python bench.py"] + list(sys.argv[1:] if argv is None else argv)))
    if a.json:
        write_json(a.json, out)
    print(format_report(out))
    if a.json:
        print(f"wrote {a.json}")
    return 0


if __name__ == "__main__":
    run_cli(main)
