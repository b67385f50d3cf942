"""The model's fp32 linear layers on the CPU, through the faster of torch's two matrix-product libraries.

torch computes an fp32 x @ W^T with MKL's sgemm, and MKL runs its AVX2 code path on an AMD CPU even where
the CPU has AVX-512, while oneDNN (torch's other library, already behind every bf16 product) runs its
AVX-512 kernels there. On a Zen 5 EPYC, one thread, the training products of the benchmarked model ran
at about 100 GFLOP/s in MKL and 150 to 240 in oneDNN (docs/performance.md, "fp32 products through
oneDNN"); with oneDNN capped to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2) the two were within about 20 % of each
other, either way. So oneDNN takes over only where MKL is the narrower one: an AMD CPU with AVX-512
(on an Intel CPU MKL takes its own AVX-512 path; not measured here). Small products (a decoding step's
single row) stay with MKL everywhere: oneDNN's call costs about 10 us more. The two broke even near a
million multiply-adds timed alone, but the demo model's decoding at batch 16, whose products are just
over a million, ran 12 % slower with them in oneDNN, so the bar is two million. Everything else (bf16
autocast, CUDA, exporting, tracing) is F.linear.

The two libraries round differently, so a model trained on one CPU kind is not bit-identical to one
trained on another; it never was (the kernels differ by CPU anyway), and on one machine every run is
repeatable.
"""
import functools
import os

import torch
from torch.nn import functional as F

from imagegpt.device import cpu_description

ONEDNN_MIN_MACS = 1 << 21   # multiply-adds (rows x in x out) from which a product goes to oneDNN


def prefers_onednn(cpu, env):
    """Whether oneDNN is the faster fp32 library on a CPU described by device.cpu_description() with the
    environment env: an AMD CPU with AVX-512 (MKL takes its AVX2 path there), unless ONEDNN_MAX_CPU_ISA
    caps oneDNN below AVX-512."""
    cap = env.get("ONEDNN_MAX_CPU_ISA", "ALL").upper()
    return (cpu.get("vendor") == "AuthenticAMD" and "avx512f" in cpu["flags"]
            and (cap in ("ALL", "DEFAULT") or cap.startswith(("AVX512", "AVX10"))))


@functools.cache
def onednn_fp32():
    """Whether this process sends its large fp32 CPU products to oneDNN (prefers_onednn on this CPU)."""
    return torch.backends.mkldnn.is_available() and prefers_onednn(cpu_description(), os.environ)


def _onednn(x, weight):
    """Whether x @ weight^T, of at least ONEDNN_MIN_MACS multiply-adds (the caller checks it: the cheapest test,
    first), goes to oneDNN: fp32 on the CPU where onednn_fp32(); never under autocast (its bf16 products are
    oneDNN's already) or while exporting (torch.onnx.export(dynamo=True) traces under is_compiling(), the
    older exporter under jit tracing)."""
    return (x.dtype == torch.float32 and weight.dtype == torch.float32 and x.is_cpu and onednn_fp32()
            and not (torch.is_autocast_enabled("cpu") or torch.jit.is_tracing() or torch.compiler.is_compiling()))


def _pointwise(x, w, b=None):
    """x @ w^T + b in oneDNN (x 2-D, fp32)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def mm_t(a, b):
    """a @ b^T for 2-D a and b, without autograd, in the library linear() takes for that product (the
    benchmark's matmul ceiling times the step's products through it)."""
    return _pointwise(a, b) if a.numel() * b.shape[0] >= ONEDNN_MIN_MACS and _onednn(a, b) else a @ b.t()


class _OneDNNLinear(torch.autograd.Function):
    """x @ W^T + b with all three products of training in oneDNN: y = x W^T, dX = dY W, dW = dY^T X."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return _pointwise(x, w, b)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = _pointwise(dy, w.t()) if ctx.needs_input_grad[0] else None
        dw = _pointwise(dy.t(), x.t()) if ctx.needs_input_grad[1] else None
        db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def linear(x, weight, bias=None):
    """F.linear(x, weight, bias), computed in oneDNN where onednn_fp32() says it is faster (see above)."""
    if x.numel() * weight.shape[0] < ONEDNN_MIN_MACS or not _onednn(x, weight):   # rows x in x out
        return F.linear(x, weight, bias)
    x2 = x.reshape(-1, x.size(-1))
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    y = _OneDNNLinear.apply(x2, weight, bias) if grad else _pointwise(x2, weight, bias)
    return y.view(*x.shape[:-1], weight.size(0))
