"""FLOPs of a training step: the count per token (the PaLM / nanoGPT convention, and the part our kernels
compute) and the matmul ceiling it is measured against (MatmulPeak), for the benchmark's MFU."""
import torch

from imagegpt import cpu_linear
from imagegpt.measure import median, timed
from model import SHORT_ATTENTION


class MatmulPeak:
    """The matmul ceiling in one dtype: the best rate (FLOP/s) of matrix products run alone through the ops
    a training step runs them with. A square n x n product (sample() times it once, between the training
    repetitions, through torch's a @ b and, where cpu_linear takes oneDNN, through oneDNN too), and, for
    each training shape added with add_model(), the forward and the two backward products of each of the
    model's linear layers in the layouts autograd uses (x W^T; dX = dY W; dW = dY^T X, through cpu_linear:
    the library the step takes for each), each timed `model_reps` times. The ceiling is the best rate of
    all of them: no product of the step runs faster alone, so a step's FLOP/s over it stays <= 100 % (on
    the AVX2 EPYC of issue 37 the square alone ran slower than the model's shapes: 118 % "MFU")."""

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
        """One sample: the square's best rate over the libraries the step may use."""
        self.samples.append(max(2 * self.n ** 3 / timed(p, self.device)[0] for p in self._square_products()))

    def _square_products(self):
        """The square product through each library the step may use: torch's own (a @ b) and, where
        cpu_linear sends fp32 products to oneDNN, oneDNN's."""
        yield lambda: self.a @ self.b
        if self.a.device.type == "cpu" and self.dtype == torch.float32 and cpu_linear.onednn_fp32():
            bt = self.b.t()
            yield lambda: cpu_linear.mm_t(self.a, bt)

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
            for what, fn in ((f"{name} forward {rows}x{k} @ ({n}x{k})^T", lambda: cpu_linear.linear(x, w)),
                             (f"{name} dX {rows}x{n} @ {n}x{k}", lambda: cpu_linear.mm_t(dy, w.t())),
                             (f"{name} dW ({rows}x{n})^T @ {rows}x{k}", lambda: cpu_linear.mm_t(dy.t(), x.t()))):
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
