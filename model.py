"""The model: a GPT-2-architecture causal transformer (nanoGPT style) with a key/value cache.

Module names mirror GPT-2 / nanoGPT exactly (transformer.wte, transformer.h[i].attn.c_attn, ...)
so exporting to the Hugging Face GPT-2 format is a plain name map (Linear weights transposed to Conv1D).
"""
import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn import functional as F

from imagegpt import cpu_linear


@dataclass
class GPTConfig:
    """The model's shape (the defaults are the original's v2 model, about 11 M parameters)."""
    vocab_size: int = 516
    """tokens in the vocabulary (516: 6 markers, 500 codes, 10 classes); training takes it from the data"""
    block_size: int = 512
    """the longest sequence the model reads (its position embeddings); training takes it from max_length"""
    n_layer: int = 6
    """transformer blocks"""
    n_head: int = 8
    """attention heads per block (n_embd must be divisible by it)"""
    n_embd: int = 384
    """width of the embeddings and of every block"""
    dropout: float = 0.0
    """dropout probability in training (0: none)"""
    bias: bool = True
    """biases in the linear layers and LayerNorms (the Hugging Face GPT-2 format needs them)"""

    def num_params_estimate(self):
        """GPT.num_params() of a model of this config, computed without building it (a size check
        before allocating)."""
        d, b = self.n_embd, 1 if self.bias else 0
        block = 12 * d * d + (9 * d) * b + 2 * d * (1 + b)     # attention, MLP, two LayerNorms
        return (self.vocab_size + self.block_size) * d + self.n_layer * block + d * (1 + b)


def linear(x, layer):
    """layer(x) for an nn.Linear, without nn.Module's call machinery (hooks, tracing checks). At the
    demo's size that machinery cost 14 % of a decoding step (docs/performance.md), so the model's
    forward calls its layers through these two functions and its own submodules through .forward;
    the modules stay, for their parameters' names (the GPT-2 layout the export maps). Large fp32 products
    on the CPU go through cpu_linear (oneDNN where MKL is the slower library)."""
    return cpu_linear.linear(x, layer.weight, layer.bias)


def layer_norm(x, norm):
    """norm(x) for an nn.LayerNorm, without the call machinery (see linear)."""
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def dropout(x, p, training):
    """F.dropout, without even an op call when it does nothing (evaluation, or p = 0): a decoding
    step would otherwise spend 2n_layer+1 calls on it."""
    return F.dropout(x, p) if training and p > 0 else x


class KVCache:
    """Preallocated keys and values for incremental decoding.

    kv[i]: (2, B, n_head, max_len, head_dim) for layer i, keys then values; positions [0, pos) are
    filled, the rest is left uninitialised (never read: filling it with zeros cost 9 % of a batch-16
    demo decode). GPT.forward writes the new tokens' keys and values at [pos, pos+T) (one copy per
    layer), reads [0, pos+T) and then advances pos by T.
    """

    def __init__(self, n_layer, batch_size, n_head, max_len, head_dim, device=None, dtype=None):
        self.kv = [torch.empty((2, batch_size, n_head, max_len, head_dim), device=device, dtype=dtype)
                   for _ in range(n_layer)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.pos = 0


SHORT_ATTENTION = 128   # on the CPU, sequences up to this long attend through explicit matmuls (below)


def causal_attention(q, k, v, dropout_p=0.0):
    """Causal self-attention of a whole sequence: q, k, v (B, nh, T, hd) -> (B, nh, T, hd).

    On the CPU, for T <= SHORT_ATTENTION, as softmax(q k^T / sqrt(hd) + causal mask) v in plain ops:
    there PyTorch's scaled_dot_product_attention takes its flash kernel, whose backward is slow on short
    sequences (two threads, batch 32, 4 heads, T = 53: forward + backward 9.9 ms in bf16 and 4.4 ms in
    fp32, against 1.6 and 2.2 ms this way; the flash kernel wins from about T = 256 on, and always on a
    GPU). The same function either way, up to rounding."""
    T = q.size(-2)
    if q.device.type != "cpu" or T > SHORT_ATTENTION:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)
    att = att.masked_fill(future, float("-inf")).softmax(-1)
    return dropout(att, dropout_p, dropout_p > 0) @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, cache=None, layer=0, at=None):
        B, T, C = x.size()
        # (B, T, 3C) -> (3, B, nh, T, hd): queries, keys, values
        qkv = linear(x, self.c_attn).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)
        q, k, v = qkv
        p = self.dropout if self.training else 0.0
        if at is not None:   # one query per row, at position at[b]: it sees the keys 0..at[b]
            q = q[torch.arange(B, device=x.device), :, at].unsqueeze(2)                  # (B, nh, 1, hd)
            mask = None if bool((at == T - 1).all()) else \
                (torch.arange(T, device=x.device) <= at[:, None])[:, None, None, :]      # (B, 1, 1, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        elif cache is None:
            y = causal_attention(q, k, v, p)
        else:
            start, end = cache.pos, cache.pos + T
            kv = cache.kv[layer]
            kv[:, :, :, start:end] = qkv[1:]
            k, v = kv[:, :, :, :end]  # everything cached so far plus the new tokens: (B, nh, end, hd)
            if start == 0:            # a prefill: the whole sequence so far
                y = causal_attention(q, k, v, p)
            else:   # query i sits at absolute position start+i and sees keys 0..start+i; one new token sees all
                mask = None if T == 1 else \
                    torch.arange(end, device=x.device)[None, :] <= torch.arange(start, end, device=x.device)[:, None]
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, y.size(2), C)  # (B, T, C); (B, 1, C) with at
        return dropout(linear(y, self.c_proj), self.dropout, self.training)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x):
        h = F.gelu(linear(x, self.c_fc), approximate="tanh")   # GPT-2's gelu_new
        return dropout(linear(h, self.c_proj), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0, at=None):
        """x (B, T, C) -> (B, T, C); with at (B,) positions: only there -> (B, 1, C)."""
        y = self.attn.forward(layer_norm(x, self.ln_1), cache=cache, layer=layer, at=at)
        x = x + y if at is None else x[torch.arange(len(x), device=x.device), at].unsqueeze(1) + y
        return x + self.mlp.forward(layer_norm(x, self.ln_2))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def device(self):
        return self.lm_head.weight.device

    def num_params(self, non_embedding=False):
        """Parameter count (tied weights once). non_embedding drops the position embeddings;
        the token embeddings stay, as they are also the output layer (nanoGPT's convention)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.transformer.wpe.weight.numel()
        return n

    def new_cache(self, batch_size, max_len, device=None, dtype=None):
        """An empty KVCache for up to max_len positions (defaults: the model's device, and its dtype or
        the autocast dtype when autocast is on)."""
        c = self.config
        if max_len > c.block_size:
            raise ValueError(f"cache length {max_len} exceeds block_size {c.block_size}")
        w = self.lm_head.weight
        device = w.device if device is None else torch.device(device)
        if dtype is None:   # under autocast the keys and values come out in its dtype
            autocast = torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else w.dtype
        return KVCache(c.n_layer, batch_size, c.n_head, max_len, c.n_embd // c.n_head, device=device, dtype=dtype)

    def forward(self, idx, targets=None, cache=None, logits_at=None):
        """idx (B, T) long -> (logits (B, T, vocab), loss or None).

        targets (B, T) long are already shifted (targets[:, t] follows idx[:, t]); -100 is not scored.
        With a cache, idx holds the next T tokens after the cache.pos cached ones; cache.pos advances by T.
        logits_at (B,) long: only the logits at these positions, one per row -> logits (B, 1, vocab) (a
        classification reads the logits at <CLS> alone): the last block then computes its attention query,
        projection and MLP at those positions only, and the output layer too (no cache, no targets).
        """
        B, T = idx.size()
        start = 0 if cache is None else cache.pos
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} (cached {start} + new {T}) "
                             f"exceeds block_size {self.config.block_size}")
        if cache is not None:
            if start + T > cache.max_len:
                raise ValueError(f"sequence length {start + T} exceeds the cache's max_len {cache.max_len}")
            if B != cache.batch_size:
                raise ValueError(f"batch size {B} does not match the cache's batch size {cache.batch_size}")
        tr = self.transformer
        pos_emb = tr.wpe.weight[start:start + T]  # positions start .. start+T-1: (T, C)
        x = dropout(F.embedding(idx, tr.wte.weight) + pos_emb, self.config.dropout, self.training)  # (B, T, C)
        if logits_at is not None and (cache is not None or targets is not None):
            raise ValueError("logits_at reads some positions of a whole sequence: no cache, no targets")
        last = len(tr.h) - 1
        for i, block in enumerate(tr.h):
            x = block.forward(x, cache=cache, layer=i, at=logits_at if i == last else None)
        logits = cpu_linear.linear(layer_norm(x, tr.ln_f), self.lm_head.weight)  # (B, T, vocab)
        if cache is not None:
            cache.pos += T
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas, device_type):
        """AdamW over param_groups(self, weight_decay); fused on CUDA."""
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
        return torch.optim.AdamW(param_groups(self, weight_decay), lr=learning_rate, betas=betas,
                                 **({"fused": True} if fused else {}))


def param_groups(model, weight_decay):
    """AdamW's two groups of any module's parameters (ours, or transformers' GPT-2 in the benchmark): weight
    decay only on those with dim >= 2 (matmul weights and embeddings), none on biases and LayerNorms."""
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() yields tied ones once
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
