"""The training-step benchmark (bench.py --only train): one training step (forward, loss, backward, AdamW step)
of our GPT against transformers' GPT2LMHeadModel holding the same weights, in fp32 and under bf16 autocast,
timed in one alternation, with its FLOPs against the matmul ceiling (imagegpt/flops.py) and peak memory."""
from contextlib import nullcontext

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from imagegpt import huggingface
from imagegpt.device import bf16_autocast
from imagegpt.flops import computed_flops_per_token, flops_per_token
from imagegpt.measure import alternate, median, peak_memory, warm_up
from imagegpt.token_format import Vocab
from imagegpt.train_config import TrainConfig
from model import GPT, param_groups


def hf_config(mcfg):
    """The transformers GPT2Config that hf_export writes for a model of these sizes."""
    from transformers import GPT2Config   # optional: only the benchmark compares with transformers
    d = huggingface.gpt2_config(mcfg, Vocab(mcfg.vocab_size - 16, 10), [str(c) for c in range(10)])
    return GPT2Config(**{k: v for k, v in d.items() if k not in ("architectures", "model_type", "dtype")})


def build_pair(mcfg, device, seed=0):
    """Our GPT and a GPT2LMHeadModel holding the same weights, both in training mode."""
    from transformers import GPT2LMHeadModel   # optional: only the benchmark compares with transformers
    torch.manual_seed(seed)
    ours = GPT(mcfg)
    theirs = GPT2LMHeadModel(hf_config(mcfg))
    missing, unexpected = theirs.load_state_dict(huggingface.to_gpt2_state_dict(ours), strict=False)
    bad = [k for k in missing if k != "lm_head.weight"] + list(unexpected)
    if bad:
        raise RuntimeError(f"weights do not map onto GPT2LMHeadModel: {bad[:3]}")
    return ours.to(device).train(), theirs.to(device).train()


def cuda_checks(model, x, y, opt):
    """What train.py relies on for speed on CUDA, checked on our model: a bf16 training step whose
    attention runs in the flash SDPA kernel (forced: it raises where flash cannot run), and AdamW's
    fused kernel. -> dict (True, or the reason it is not used)."""
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


def bench_train(mcfg, batch, T, timing, device, peaks):
    """One training step (forward, loss, backward, AdamW step) of ours and of HF's GPT-2 at (batch, T),
    each in fp32 and, where the device has bf16 kernels, under bf16 autocast: up to four sides timed
    in one alternation (measure.Timing), so that every comparison comes from the same repetitions:
        defaults  ours as train.py runs it (bf16_autocast("auto"): bf16 where supported; compiled on
                  CUDA) vs theirs as transformers runs it unless told otherwise (fp32)
        fp32      both in fp32 (ours compiled on CUDA)
        bf16      both under bf16 autocast
    peaks: precision ("fp32", "bf16") -> MatmulPeak, each sampled once per repetition. -> dict of figures."""
    ours, theirs = build_pair(mcfg, device)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(mcfg.vocab_size, (batch, T + 1), generator=g).to(device)
    x, y = seq[:, :-1].contiguous(), seq[:, 1:].contiguous()
    precisions = {"fp32": nullcontext}
    if bf16_kernels(device):   # measured wherever bf16 runs at all (natively or emulated); the defaults follow --bf16 auto
        precisions["bf16"] = lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    fns, checks = training_steps(ours, theirs, (x, y), precisions, device)
    # same weights, same batch: the same loss (HF unshifts the labels we pass as shift_labels); the
    # bf16 sides then start from the weights after one identical fp32 step on each side
    first = {n: v.item() for n, v in warm_up(fns, timing.warmup).items()}
    mem = {}
    for n, fn in fns.items():
        _, mem[n], method = peak_memory(fn, device)
    gemm = {}   # the ceiling includes this step's own matrix products, each run alone; their sum bounds the step
    for p, pk in peaks.items():
        gemm[p] = pk.add_model(mcfg, batch * T)
    times, cpu = alternate(fns, timing.reps, device, lambda: [pk.sample() for pk in peaks.values()], timing.label)
    secs = {n: median(t) for n, t in times.items()}
    auto = isinstance(bf16_autocast("auto", str(device)), torch.autocast)   # what train.py's default computes in
    default = "ours_bf16" if "bf16" in precisions and auto else "ours_fp32"
    pairs = {"defaults": (default, "theirs_fp32"), **{p: (f"ours_{p}", f"theirs_{p}") for p in precisions}}
    return {"batch": batch, "length": T, "precisions": list(precisions), "ours_default": default,
            "compile_ours": device.type == "cuda", "hf_attention": theirs.config._attn_implementation,
            "cuda_checks": checks, "first_loss": first, **figures(mcfg, (batch, T), secs, pairs, device),
            "peak_memory_bytes": mem, "memory_method": method,
            "gemm_seconds": gemm,   # our step's linear-layer products alone: no step of ours can be faster
            "ratio_bound": {k: secs[t] / gemm[o.split("_")[1]] for k, (o, t) in pairs.items()},
            "ratio_cpu_time": {k: median(cpu[t]) / median(cpu[o]) for k, (o, t) in pairs.items()},
            "raw_seconds": times, "raw_cpu_seconds": cpu}


def training_steps(ours, theirs, batch, precisions, device):
    """The sides: {ours_P, theirs_P: one training step} for each precision P, each with AdamW over the same
    two groups (model.param_groups) and train.py's settings; ours compiled on CUDA -> (sides, cuda_checks)."""
    x, y = batch
    tc = TrainConfig()
    opt_o = ours.configure_optimizers(tc.weight_decay, tc.lr, (tc.beta1, tc.beta2), device.type)
    fused = {"fused": True} if any(g.get("fused") for g in opt_o.param_groups) else {}
    opt_t = torch.optim.AdamW(param_groups(theirs, tc.weight_decay), lr=tc.lr, betas=(tc.beta1, tc.beta2), **fused)
    step_o = torch.compile(ours) if device.type == "cuda" else ours

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
    return fns, checks


def figures(mcfg, shape, secs, pairs, device):
    """Tokens/s, the ratios of each pair, the FLOPs per token and the FLOP/s our sides achieved."""
    batch, T = shape
    tokens = batch * T
    computed = computed_flops_per_token(mcfg, T, device)
    return {"seconds": secs, "tokens_per_s": {n: tokens / t for n, t in secs.items()},
            "pairs": pairs, "ratio": {k: secs[t] / secs[o] for k, (o, t) in pairs.items()},
            "flops_per_token": {"full": flops_per_token(mcfg, T), "causal": flops_per_token(mcfg, T, causal=True),
                                "computed": computed},
            "achieved_flops": {k[len("ours_"):]: computed * tokens / t for k, t in secs.items() if k.startswith("ours_")}}
