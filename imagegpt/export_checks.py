"""Checking an export against the checkpoint it came from (hf_export.py --check): transformers loading the
Hugging Face folder, onnxruntime running the ONNX graphs, the image tokenizer's graphs, and the thresholds
each must meet for the export to pass."""
import os

import torch

from imagegpt.checkpoint import load
from imagegpt.decoding import generate
from imagegpt.draw_settings import DrawSettings
from imagegpt.files import read_json

MAX_LOGIT_DIFF = 1e-4        # fp32 logits of transformers and of the fp32 ONNX graph against ours
MAX_PIXEL_DIFF = 1e-6        # the image tokenizer's graphs: codes may differ only where two centroids tie to
                             # float rounding; the decoded pixels not at all


@torch.no_grad()
def hf_parity(ck, folder, batch=4, seed=0):
    """Load the export `folder` with transformers and compare it with the checkpoint's model: max |logit
    difference| on random sequences, greedy generation, and the tokenizer's ids. Needs transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer   # optional: only the checks need it
    from transformers.utils import logging as hf_logging
    hf, load_info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    hf.eval()
    tok = AutoTokenizer.from_pretrained(folder)
    model, vocab = ck.model.eval(), ck.vocab
    T = model.config.block_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(len(vocab), (batch, T), generator=g)
    diff = (hf(x, attention_mask=torch.ones_like(x)).logits - model(x)[0]).abs().max().item()
    prompt = torch.cat([torch.full((batch, 1), vocab.img_id),
                        torch.randint(vocab.code_offset, vocab.label_offset, (batch, 3), generator=g)], 1)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # generate() drops the all-ones mask on later steps, then warns of padding
    try:
        theirs = hf.generate(prompt, do_sample=False, max_length=T, attention_mask=torch.ones_like(prompt))
    finally:
        hf_logging.set_verbosity(level)
    greedy = DrawSettings(greedy=True, max_new_tokens=T - prompt.shape[1])
    rows = [r["ids"] for r in generate(ck, prompt.tolist(), greedy)]
    width = max(len(r) for r in rows)   # generate() pads rows that ended early, as here
    ours = torch.tensor([r + [vocab.pad_id] * (width - len(r)) for r in rows])
    seq = vocab.decode(x[0].tolist())
    return {"max_abs_logit_diff": diff, "greedy_equal": torch.equal(theirs, ours),
            "greedy_tokens": int(ours.shape[1] - prompt.shape[1]),
            "tokenizer_equal": tok(seq)["input_ids"] == x[0].tolist() and tok.decode(x[0].tolist()) == seq,
            "load_problems": {k: v for k, v in load_info.items() if v}}


@torch.no_grad()
def onnx_parity(ck, onnx, batch=4, seed=0):
    """Compare an OnnxGPT with the checkpoint's torch model it was exported from, on random sequences: the
    largest |logit difference| of a full forward, and step by step through the cache (prefill half, then one
    token at a time), and greedy decoding's tokens (through decoding.generate on both)."""
    model, vocab = ck.model.float().cpu().eval(), ck.vocab
    T = model.config.block_size
    x = torch.randint(len(vocab), (batch, T), generator=torch.Generator().manual_seed(seed))
    want = model(x)[0]
    full = (onnx(x)[0] - want).abs().max().item()
    cache, half = onnx.new_cache(batch, T), T // 2
    steps = [onnx(x[:, :half], cache=cache)[0]] + [onnx(x[:, t:t + 1], cache=cache)[0] for t in range(half, T)]
    cached = (torch.cat(steps, 1) - want).abs().max().item()
    prompts = [[vocab.img_id] + x[b, 1:3].tolist() for b in range(batch)]
    greedy = DrawSettings(greedy=True, max_new_tokens=T)
    ours = [r["ids"] for r in generate(ck.with_model(model), prompts, greedy)]
    theirs = [r["ids"] for r in generate(ck.with_model(onnx), prompts, greedy)]
    return {"max_abs_logit_diff": full, "max_abs_cached_diff": cached, "greedy_equal": ours == theirs,
            "greedy_tokens": sum(len(r) - len(p) for r, p in zip(ours, prompts))}


def check_export(ck, out, backends=(), tokenizer=False):
    """Every check of the export folder `out` of the checkpoint: transformers (hf_parity), the ONNX graphs
    of `backends` ("onnx", "onnx-int8": onnx_parity) and with `tokenizer` the image tokenizer's graphs (their
    parity in onnx/export.json) -> what was found, and "passed": whether each met its threshold (int8's
    logits are reported, never judged: quantisation changes them)."""
    r = hf_parity(ck, out)
    ok = r["max_abs_logit_diff"] < MAX_LOGIT_DIFF and r["greedy_equal"] and r["tokenizer_equal"] and not r["load_problems"]
    found = {"checkpoint": ck.folder, "export": out, "transformers": r}
    for backend in backends:
        o = found[backend] = onnx_parity(ck, load(out, backend=backend).model)
        ok &= backend == "onnx-int8" or (o["max_abs_logit_diff"] < MAX_LOGIT_DIFF and o["greedy_equal"])
    if tokenizer:
        found["tokenizer"] = read_json(os.path.join(out, "onnx", "export.json"))["tokenizer"]["parity"]
        ok &= found["tokenizer"]["max_abs_pixel_diff"] <= MAX_PIXEL_DIFF
    return {**found, "passed": bool(ok)}
