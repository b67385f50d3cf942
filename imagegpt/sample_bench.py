"""The sampling and classification benchmark (bench.py --only sample, sample_demo): greedy sampling through our
KV cache (decoding.generate) against transformers' generate() on the model exported by hf_export, and
classification (metrics.class_probs) against a forward of the same model, with onnxruntime's fp32 and
int8 graphs through our loop beside them."""
import os
from dataclasses import dataclass

import torch

from imagegpt import checkpoint, huggingface
from imagegpt.decoding import generate
from imagegpt.device import bf16_autocast
from imagegpt.draw_settings import DrawSettings
from imagegpt.measure import alternate, cpu_ratio, median, peak_memory, warm_up
from imagegpt.metrics import class_probs
from imagegpt.onnx_runtime import OnnxGPT
from imagegpt.settings import build
from imagegpt.token_format import Vocab
from imagegpt.train_bench import bf16_kernels
from imagegpt.train_config import TrainConfig
from model import GPT
from imagegpt.codebook_config import CodebookConfig
from tokenizer import Codebook


@dataclass
class Pair:
    """Our model (a Checkpoint) and its export loaded by transformers (hf) and onnxruntime (ort: {name: OnnxGPT},
    empty on CUDA), on `device`."""
    ck: checkpoint.Checkpoint
    hf: object
    ort: dict
    device: torch.device


def export_pair(mcfg, folder, seed=0, threads=None):
    """A random model of these sizes saved as a checkpoint, exported to the Hugging Face format (with
    its ONNX graphs, fp32 and int8) and loaded back with transformers and onnxruntime -> (our checkpoint,
    HF model, {"onnx": OnnxGPT, "onnx_int8": OnnxGPT})."""
    from transformers import AutoModelForCausalLM   # optional: only the benchmark compares with transformers
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
    return checkpoint.Checkpoint(model.eval(), vocab, book), hf, ort


def our_generate(ck, batch, new_tokens):
    """Greedy continuation of "<IMG>" by new_tokens tokens through our KV cache, never stopping at
    <EOS> -> (batch, 1 + new_tokens) token ids."""
    greedy = DrawSettings(greedy=True, max_new_tokens=new_tokens, batch_size=batch)
    res = generate(ck, [[ck.vocab.img_id]] * batch, greedy, stop_at_eos=False)
    return torch.tensor([r["ids"] for r in res])


def hf_generate(hf, vocab, batch, new_tokens):
    """The same with transformers' generate() (fp32, greedy)."""
    ids = torch.full((batch, 1), vocab.img_id, device=hf.device)
    with torch.no_grad():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new_tokens,
                           pad_token_id=vocab.pad_id).cpu()


def bench_classify(pair, batch, length, timing):
    """Classification: `batch` random prefixes '<IMG> codes </IMG> <CLS>' of `length` tokens -> class
    probabilities, through metrics.class_probs (ours, and onnxruntime when given) vs a plain forward of
    the HF model read at the last position over the label tokens. images/s = batch / seconds."""
    vocab = pair.ck.vocab
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(vocab.num_codes, (batch, length - 3), generator=g).tolist()
    prefixes = [vocab.prefix_ids(c) for c in codes]
    ids = torch.tensor(prefixes, device=pair.device)
    labels = slice(vocab.label_offset, vocab.label_offset + vocab.num_classes)

    def theirs():
        with torch.no_grad():
            return pair.hf(ids, attention_mask=torch.ones_like(ids)).logits[:, -1, labels].float().softmax(-1).cpu()

    fns = {"ours": lambda: class_probs(pair.ck, prefixes, batch_size=batch), "theirs": theirs}
    for name, m in pair.ort.items():
        fns[name] = lambda m=m: class_probs(pair.ck.with_model(m), prefixes, batch_size=batch)
    first = warm_up(fns, timing.warmup)
    times, _ = alternate(fns, timing.reps, pair.device, label=timing.label)
    secs = {n: median(t) for n, t in times.items()}
    return {"batch": batch, "length": length, "seconds": secs,
            "images_per_s": {k: batch / t for k, t in secs.items()},
            "ratio": {k: secs["theirs"] / t for k, t in secs.items() if k != "theirs"},
            "max_prob_diff": {k: (v - first["theirs"]).abs().max().item() for k, v in first.items() if k != "theirs"},
            "raw_seconds": times}


def bench_sample(pair, batch, new_tokens, timing):
    """Greedy sampling: ours vs HF generate() (and onnxruntime fp32 / int8 through our decoding loop,
    when pair.ort has them). "ours" computes as sample.py does by default
    (bf16_autocast("auto", decode_width=n_embd): bf16 autocast on a bf16 GPU, and on a bf16 CPU for
    models at least device.BF16_DECODE_MIN_WIDTH wide; fp32 otherwise); "ours_other"
    is ours in the other precision (where the device has bf16), to show what the default chose
    between. HF generate() runs as transformers does by default: fp32. images/s counts one image
    per row and call."""
    ck, device = pair.ck, pair.device
    width = ck.model.config.n_embd

    def ours(precision):
        def run():
            with bf16_autocast(precision, device, decode_width=width):
                return our_generate(ck, batch, new_tokens)
        return run

    fns = {"ours": ours("auto"), "theirs": lambda: hf_generate(pair.hf, ck.vocab, batch, new_tokens)}
    default_bf16 = isinstance(bf16_autocast("auto", device, decode_width=width), torch.autocast)
    bf16 = bf16_kernels(device)
    if bf16:
        fns["ours_other"] = ours("false" if default_bf16 else "true")
    for name, m in pair.ort.items():
        fns[name] = lambda m=m: our_generate(ck.with_model(m), batch, new_tokens)
    first = warm_up(fns, timing.warmup)
    mem = {}
    for name in ("ours", "theirs"):
        _, mem[name], method = peak_memory(fns[name], device)
    times, cpu = alternate(fns, timing.reps, device, label=timing.label)
    secs = {n: median(t) for n, t in times.items()}
    a, b = first["ours"], first["theirs"]
    return {"batch": batch, "new_tokens": new_tokens, "prompt": "<IMG>", "decoding": "greedy, EOS disabled",
            "ours_precision": "bf16 autocast" if default_bf16 else "fp32",
            "ours_other_precision": ("fp32" if default_bf16 else "bf16 autocast") if bf16 else None,
            "generated": {"ours": list(a.shape), "theirs": list(b.shape)},
            "same_tokens": a.shape == b.shape and torch.equal(a, b),
            "same_tokens_as_hf": {k: v.shape == b.shape and torch.equal(v, b) for k, v in first.items() if k != "theirs"},
            "seconds": secs, "tokens_per_s": {k: batch * new_tokens / t for k, t in secs.items()},
            "images_per_s": {k: batch / t for k, t in secs.items()}, "ratio": secs["theirs"] / secs["ours"],
            "ratio_other": {k: secs["theirs"] / secs[k] for k in secs if k not in ("ours", "theirs")},
            "peak_memory_bytes": mem, "memory_method": method, "ratio_cpu_time": cpu_ratio(cpu),
            "raw_seconds": times, "raw_cpu_seconds": cpu}
