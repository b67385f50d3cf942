"""The exported GPT run by onnxruntime: OnnxGPT stands in for model.GPT in the decoding loop, the
evaluation and the service (export_checks.onnx_parity compares the two).

    OnnxGPT(path)   -> model(idx, cache=cache) as GPT.forward, run by onnxruntime on the CPU
"""
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from imagegpt.errors import UserError
from imagegpt.onnx_export import input_names, output_names
from model import GPT, GPTConfig


class OnnxCache:
    """The key/value cache of OnnxGPT: the present.* arrays of the last step, fed back as past.
    pos: tokens cached so far (as model.KVCache.pos)."""

    def __init__(self, batch_size, max_len, past):
        self.batch_size = batch_size
        self.max_len = max_len
        self.past = past     # [key 0, value 0, key 1, ...], each (B, n_head, pos, head_dim) float32
        self.pos = 0


class OnnxGPT:
    """An exported graph run by onnxruntime on the CPU, with the interface of model.GPT that the
    decoding loop, the evaluation and the service use: config, device, training, eval(), train(),
    num_params(), new_cache(), and model(idx, targets=None, cache=None) -> (logits, loss).

    threads: onnxruntime's intra-op threads (None: as many as torch's, which device.use_threads sets for
    the machine)."""

    def __init__(self, path, threads=None):
        import onnxruntime as ort   # loaded with --backend onnx only, not at every command's start-up
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such ONNX graph")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads() if threads is None else threads
        opts.inter_op_num_threads = 1        # one graph, run node after node: no inter-op pool needed
        opts.log_severity_level = 3          # errors only
        try:
            self.session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        except Exception as e:               # onnxruntime raises its own exception types
            raise UserError(f"{path}: onnxruntime cannot load it ({str(e).splitlines()[0]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "gpt_config" not in meta:
            raise UserError(f"{path}: no gpt_config in the graph's metadata (not written by onnx_backend.export_onnx)")
        self.config = GPTConfig(**json.loads(meta["gpt_config"]))
        self.path = path
        self.device = torch.device("cpu")
        self.training = False
        self._outputs = output_names(self.config.n_layer)
        self._past_names = input_names(self.config.n_layer)[3:]

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def num_params(self):
        """The parameters of the GPT the graph was exported from (counted by model.GPT, on the meta
        device: no memory)."""
        with torch.device("meta"):
            return GPT(self.config).num_params()

    def new_cache(self, batch_size, max_len, device=None, dtype=None):
        """An empty cache for up to max_len positions (device and dtype are accepted and ignored)."""
        c = self.config
        if max_len > c.block_size:
            raise ValueError(f"cache length {max_len} exceeds block_size {c.block_size}")
        empty = np.zeros((batch_size, c.n_head, 0, c.n_embd // c.n_head), np.float32)
        return OnnxCache(batch_size, max_len, [empty] * (2 * c.n_layer))

    def __call__(self, idx, targets=None, cache=None, logits_at=None):
        """idx (B, T) long -> (logits (B, T, vocab) float32, loss or None), as GPT.forward; with a
        cache, idx follows the cache.pos cached tokens and cache.pos advances by T; logits_at (B,): the
        logits at these positions alone, (B, 1, vocab) (the graph computes every position's)."""
        B, T = idx.shape
        start = 0 if cache is None else cache.pos
        if start + T > self.config.block_size:
            raise ValueError(f"sequence length {start + T} (cached {start} + new {T}) "
                             f"exceeds block_size {self.config.block_size}")
        if cache is None:
            past = self.new_cache(B, T).past
        else:
            if start + T > cache.max_len:
                raise ValueError(f"sequence length {start + T} exceeds the cache's max_len {cache.max_len}")
            if B != cache.batch_size:
                raise ValueError(f"batch size {B} does not match the cache's batch size {cache.batch_size}")
            past = cache.past
        feed = {"input_ids": idx.detach().cpu().numpy().astype(np.int64, copy=False),
                "attention_mask": np.ones((B, start + T), np.int64),
                "position_ids": np.tile(np.arange(start, start + T, dtype=np.int64), (B, 1))}
        feed.update(zip(self._past_names, past))
        out = self.session.run(self._outputs if cache is not None else self._outputs[:1], feed)
        logits = torch.from_numpy(out[0])
        if logits_at is not None:
            logits = logits[torch.arange(B), logits_at.cpu()].unsqueeze(1)
        if cache is not None:
            cache.past = out[1:]
            cache.pos += T
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1).cpu(), ignore_index=-100)
        return logits, loss
