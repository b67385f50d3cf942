"""The GPT as ONNX graphs: export (the decoder with its key/value cache) and int8 quantisation.

    export_onnx(model, folder)    -> folder/onnx/model.onnx (+ folder/onnx/export.json: opset, shapes)
    quantize_int8(folder)         -> folder/onnx/model_quantized.onnx (dynamic int8 weights)

The graph is one decoder for every step, laid out and named as the Hugging Face ONNX tools lay out a
GPT-2 decoder with past, so runtimes written for those load it:

    inputs   input_ids            int64  (batch_size, sequence_length)
             attention_mask       int64  (batch_size, past_sequence_length + sequence_length)
             position_ids         int64  (batch_size, sequence_length)
             past_key_values.{i}.key / .value   float32 (batch_size, n_head, past_sequence_length, head_dim)
    outputs  logits               float32 (batch_size, sequence_length, vocab_size)
             present.{i}.key / .value           float32 (batch_size, n_head, past_sequence_length
                                                         + sequence_length, head_dim)

The first step feeds past tensors of length 0. The GPT's configuration is stored in the graph's
metadata (key "gpt_config", JSON), so imagegpt.onnx_runtime.OnnxGPT needs nothing but the .onnx file.
"""
import copy
import json
import logging
import os
import warnings
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from imagegpt.errors import UserError
from imagegpt.files import atomic_path, write_json

OPSET = 18             # the torch.export-based exporter's default; ONNX Runtime 1.16+ runs it


GRAPH = "model.onnx"


QUANTIZED = "model_quantized.onnx"


INFO = "export.json"


def input_names(n_layer):
    return (["input_ids", "attention_mask", "position_ids"]
            + [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")])


def output_names(n_layer):
    return ["logits"] + [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


class _Decoder(nn.Module):
    """The export view of a GPT: the same submodules and weights, but a cache that is passed in and
    returned (past -> present by concatenation) instead of model.KVCache's preallocated buffers
    written in place, which a graph cannot express. It also honours attention_mask (0 = a padded
    key position, as in Hugging Face GPT-2), which our own model has no use for.

    Query t of the T new tokens sits at absolute position past + t and sees the keys at positions
    0..past + t whose attention_mask is 1. Masked scores get the float32 minimum rather than -inf,
    so a row with every key masked (a left-padding position) gives finite, ignored values, not NaN.
    """

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.n_head = gpt.config.n_head

    def forward(self, input_ids, attention_mask, position_ids, past):
        tr = self.gpt.transformer
        x = tr.wte(input_ids) + tr.wpe(position_ids)                                # (B, T, C)
        B, T, C = x.shape
        total = attention_mask.shape[1]                                              # past + T
        q_pos = torch.arange(T, device=x.device)[:, None] + (total - T)              # (T, 1)
        allowed = torch.arange(total, device=x.device)[None, :] <= q_pos             # (T, total)
        allowed = allowed[None, None] & (attention_mask[:, None, None, :] > 0)       # (B, 1, T, total)
        bias = torch.where(allowed, 0.0, torch.finfo(x.dtype).min).to(x.dtype)
        present = []
        for i, block in enumerate(tr.h):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=2)
            q, k, v = (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in (q, k, v))
            k = torch.cat([past[2 * i], k], dim=2)                                   # (B, nh, total, hd)
            v = torch.cat([past[2 * i + 1], v], dim=2)
            present += [k, v]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
            x = x + block.mlp(block.ln_2(x))
        return (self.gpt.lm_head(tr.ln_f(x)), *present)


def export_onnx(model, folder, opset=OPSET):
    """Write folder/onnx/model.onnx (the decoder with past, see the module docstring) and
    folder/onnx/export.json (opset, exporter, input and output shapes, the GPT configuration).
    The model is copied to float32 on the CPU first; it is left as it was. Returns the graph's path."""
    import onnx   # onnx and onnxruntime: loaded by an export only, not at every command's start-up
    cfg = model.config
    gpt = copy.deepcopy(model).float().cpu().eval()        # deepcopy keeps the tied embedding/head
    dec = _Decoder(gpt).eval()
    # example inputs: batch 2, 3 new tokens after 4 cached ones (sizes 0 and 1 would be taken as fixed)
    B, T, P, hd = 2, 3, 4, cfg.n_embd // cfg.n_head
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    mask = torch.ones(B, P + T, dtype=torch.long)
    pos = torch.arange(P, P + T).expand(B, T).contiguous()
    past = tuple(torch.randn(B, cfg.n_head, P, hd, generator=gen) for _ in range(2 * cfg.n_layer))
    Dim = torch.export.Dim
    batch, seq, past_len = Dim("batch_size"), Dim("sequence_length"), Dim("past_sequence_length")
    shapes = ({0: batch, 1: seq}, {0: batch, 1: Dim.DYNAMIC}, {0: batch, 1: seq},
              tuple({0: batch, 2: past_len} for _ in past))
    with warnings.catch_warnings(), _quiet("torch.onnx", "torch.export"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(dec, (ids, mask, pos, past), dynamo=True, opset_version=opset,
                                    input_names=input_names(cfg.n_layer), output_names=output_names(cfg.n_layer),
                                    dynamic_shapes=shapes, verbose=False, optimize=True)
    proto = program.model_proto
    _tidy(proto, cfg)
    onnx.checker.check_model(proto, full_check=True)
    out_dir = os.path.join(folder, "onnx")
    path = os.path.join(out_dir, GRAPH)
    with atomic_path(path) as tmp:
        onnx.save(proto, tmp)
    write_json(os.path.join(out_dir, INFO), {
        "graph": GRAPH, "opset": opset, "ir_version": proto.ir_version,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__.split('+')[0]}, "
                    f"onnx {onnx.__version__}",
        "layout": "Hugging Face GPT-2 decoder with past (one graph: past length 0 on the first step)",
        "inputs": {v.name: _describe(v) for v in proto.graph.input},
        "outputs": {v.name: _describe(v) for v in proto.graph.output},
        "gpt_config": asdict(cfg),
    })
    return path


class _quiet:
    """Raise the named loggers to ERROR for a while (the exporter logs notes about optional packages)."""

    def __init__(self, *names):
        self.loggers = [logging.getLogger(n) for n in names]

    def __enter__(self):
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        for lg, level in zip(self.loggers, self.levels):
            lg.setLevel(level)


def _tidy(proto, cfg):
    """Give the attention mask's length its Hugging Face name, drop the exporter's per-node notes
    (source file paths and stack traces of this machine), and store the GPT configuration."""
    total = "past_sequence_length + sequence_length"
    for v in proto.graph.input:
        if v.name == "attention_mask":
            v.type.tensor_type.shape.dim[1].dim_param = total
    for node in proto.graph.node:
        del node.metadata_props[:]
    proto.doc_string = "GPT-2 decoder with past (imagegpt-tokens)"
    entry = proto.metadata_props.add()
    entry.key, entry.value = "gpt_config", json.dumps(asdict(cfg))


def _describe(value_info):
    import onnx
    t = value_info.type.tensor_type
    return {"dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}


def quantize_int8(folder):
    """folder/onnx/model.onnx -> folder/onnx/model_quantized.onnx with onnxruntime's dynamic
    quantisation: weights of the matrix products and the embedding lookups stored as int8 (one
    scale per tensor), activations quantised on the fly to uint8. Returns the two file sizes in bytes.

    The weights keep 7 bits (reduce_range: -64..64), so that the graph gives the same logits on every
    x86 CPU. Without VNNI (AVX2, AVX-512 before Cascade Lake) onnxruntime multiplies uint8 by int8
    with vpmaddubsw, which adds two products into an int16 and saturates: 2 x 255 x 127 overflows it,
    2 x 255 x 64 = 32640 does not (onnxruntime's quantisation guide names the cure). Measured on the
    tests' random GPT: max |logit drift| 0.72 on an AVX2 CPU with 8-bit weights, 0.23 with 7-bit
    weights on AVX2 and on AVX-512 with VNNI alike (docs/export.md)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    src = os.path.join(folder, "onnx", GRAPH)
    if not os.path.isfile(src):
        raise UserError(f"{src}: no such ONNX graph (export it first)")
    dst = os.path.join(folder, "onnx", QUANTIZED)
    with atomic_path(dst) as tmp, _quiet(""):    # its advice to pre-process changes nothing on this graph
        quantize_dynamic(src, tmp, weight_type=QuantType.QInt8, reduce_range=True, per_channel=True)
    return {"fp32_bytes": os.path.getsize(src), "int8_bytes": os.path.getsize(dst)}
