"""onnx_backend: the exported decoder with past, its int8 copy, and OnnxGPT in our decoding loop.

onnx, onnxruntime and onnxscript are imported plainly: without them these tests fail, not skip."""
import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime
import onnxscript  # noqa: F401  (the exporter needs it)
import pytest
import torch

import eval as ev
import hf_export
import sample as sp
from imagegpt import checkpoint, onnx_export, onnx_runtime
from imagegpt.checkpoint import Checkpoint
from imagegpt.decoding import generate
from imagegpt.draw_settings import DrawSettings
from imagegpt.errors import UserError
from imagegpt.metrics import class_probs, evaluate
from imagegpt.token_format import Vocab
from model import GPT, GPTConfig

VOCAB = Vocab(16, 8)            # 30 tokens: 6 specials, 16 codes, 8 labels
BLOCK = 24
IMG, END, CLS, EOS = VOCAB.img_id, VOCAB.img_end_id, VOCAB.cls_id, VOCAB.eos_id
INT8_TOL = 0.05                 # int8 vs fp32 here (3 random GPTs x 5 random batches of 4 x 24 tokens),
                                # measured: max |logit difference| 0.15-0.22 = 1.9-3.0 % of the largest
                                # |logit| (6.5-8.2); max probability difference 0.020-0.033; 97-100 % of the
                                # argmaxes unchanged; the same on AVX2 and AVX-512 VNNI (docs/export.md)


def tiny_model(seed=0, vocab_size=len(VOCAB), block=BLOCK):
    """2 layers, 2 heads, 32 wide; every parameter perturbed (no zero biases or unit LayerNorms to
    hide a mistake) and the head scaled up so that greedy choices are not near-ties (an untrained one
    reads every image as nearly uniform)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block, n_layer=2, n_head=2, n_embd=32))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        model.lm_head.weight.mul_(3)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("onnx_export"))
    model = tiny_model()
    path = onnx_export.export_onnx(model, folder)
    sizes = onnx_export.quantize_int8(folder)
    return model, folder, path, sizes


def random_tokens(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, len(VOCAB), (n, length), generator=g)


def sequences(n, seed):
    """n v2 sequences '<IMG> codes </IMG> <CLS> <CLS_y> <EOS>' with 3..12 random codes."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        codes = [VOCAB.code_id(int(k)) for k in rng.integers(0, VOCAB.num_codes, rng.integers(3, 13))]
        out.append([IMG] + codes + [END, CLS, VOCAB.label_id(i % VOCAB.num_classes), EOS])
    return out


# ----------------------------------------------------------------------------- the graph

def test_export_writes_the_graph_and_its_description(exported):
    model, folder, path, _ = exported
    assert path == os.path.join(folder, "onnx", "model.onnx")
    onnx.checker.check_model(path, full_check=True)
    info = json.load(open(os.path.join(folder, "onnx", "export.json")))
    assert info["opset"] == onnx_export.OPSET and info["gpt_config"]["n_layer"] == 2
    assert info["inputs"]["past_key_values.1.value"] == {
        "dtype": "float32", "shape": ["batch_size", 2, "past_sequence_length", 16]}
    assert info["outputs"]["present.0.key"]["shape"][2] == "past_sequence_length + sequence_length"
    assert info["outputs"]["logits"] == {"dtype": "float32", "shape": ["batch_size", "sequence_length", 30]}
    # no stack traces or paths of the exporting machine in the graph
    assert b"stack_trace" not in open(path, "rb").read()
    # the torch model is left as it was (export works on a copy)
    assert model.lm_head.weight is model.transformer.wte.weight and not model.training


# the same code as the example in the report: numpy and onnxruntime only
PLAIN = """
import sys, json, numpy as np, onnxruntime as ort
path, expect_file = sys.argv[1], sys.argv[2]
s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
names = ([i.name for i in s.get_inputs()], [o.name for o in s.get_outputs()])
ids = np.array(json.load(open(expect_file))["ids"], dtype=np.int64)
B, T = ids.shape
past = {i.name: np.zeros((B, i.shape[1], 0, i.shape[3]), np.float32) for i in s.get_inputs() if i.name.startswith("past")}
out = s.run(None, {"input_ids": ids[:, :-1], "attention_mask": np.ones((B, T - 1), np.int64),
                   "position_ids": np.tile(np.arange(T - 1), (B, 1)), **past})
present = dict(zip(names[1][1:], out[1:]))
step = {"past_key_values" + k[len("present"):]: v for k, v in present.items()}
last = s.run(["logits"], {"input_ids": ids[:, -1:], "attention_mask": np.ones((B, T), np.int64),
                          "position_ids": np.full((B, 1), T - 1), **step})[0]
assert not any(m.startswith(("model", "onnx_backend", "torch")) for m in sys.modules), "project code or torch imported"
print(json.dumps({"names": names, "logits": out[0].tolist(), "last": last.tolist()}))
"""


def test_graph_runs_with_plain_onnxruntime_and_has_the_hugging_face_names(exported, tmp_path):
    model, _, path, _ = exported
    ids = random_tokens(3, 9, seed=1)
    (tmp_path / "ids.json").write_text(json.dumps({"ids": ids.tolist()}))
    (tmp_path / "plain.py").write_text(PLAIN)
    r = subprocess.run([sys.executable, "plain.py", path, "ids.json"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert got["names"] == [onnx_export.input_names(2), onnx_export.output_names(2)]
    assert got["names"][0][:5] == ["input_ids", "attention_mask", "position_ids",
                                   "past_key_values.0.key", "past_key_values.0.value"]
    with torch.no_grad():
        want = model(ids)[0]
    assert np.abs(np.array(got["logits"]) - want[:, :-1].numpy()).max() < 1e-4
    assert np.abs(np.array(got["last"])[:, 0] - want[:, -1].numpy()).max() < 1e-4


def test_attention_mask_zero_hides_left_padding(exported):
    """A left-padded row (attention_mask 0 on the pads, positions counted from the first real
    token) gives the same logits as the unpadded row: the Hugging Face convention for batches."""
    model, _, path, _ = exported
    s = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    ids = random_tokens(1, 6, seed=2)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1).numpy()
    empty = {n: np.zeros((1, 2, 0, 16), np.float32) for n in onnx_export.input_names(2)[3:]}
    feed = {"input_ids": padded, "attention_mask": np.array([[0, 0, 0, 1, 1, 1, 1, 1, 1]]),
            "position_ids": np.array([[0, 0, 0, 0, 1, 2, 3, 4, 5]]), **empty}
    logits = s.run(["logits"], feed)[0]
    assert np.isfinite(logits).all()
    with torch.no_grad():
        want = model(ids)[0].numpy()
    assert np.abs(logits[:, 3:] - want).max() < 1e-4


# ----------------------------------------------------------------------------- OnnxGPT

def test_onnx_logits_equal_torch_with_and_without_the_cache(exported):
    model, _, path, _ = exported
    onx = onnx_runtime.OnnxGPT(path, threads=1)
    assert onx.config == model.config and onx.device == torch.device("cpu") and not onx.training
    assert onx.eval() is onx and onx.train() is onx and onx.device.type == "cpu"
    assert onx.num_params() == model.num_params()
    x = random_tokens(3, BLOCK, seed=3)
    with torch.no_grad():
        want = model(x)[0]
    logits, loss = onx(x)
    assert logits.dtype == torch.float32 and logits.shape == (3, BLOCK, len(VOCAB)) and loss is None
    assert (logits - want).abs().max() < 1e-4
    # the loss is GPT.forward's
    y = x.roll(-1, 1)
    y[:, -1] = -100
    assert onx(x, targets=y)[1].item() == pytest.approx(model(x, targets=y)[1].item(), abs=1e-5)
    # incremental: a prompt of 5, a chunk of 3, then one token at a time = the full forward
    cache = onx.new_cache(3, BLOCK)
    chunks, start = [], 0
    for size in [5, 3] + [1] * (BLOCK - 8):
        chunks.append(onx(x[:, start:start + size], cache=cache)[0])
        start += size
        assert cache.pos == start
    assert (torch.cat(chunks, 1) - want).abs().max() < 1e-4
    assert cache.batch_size == 3 and cache.max_len == BLOCK and cache.past[0].shape == (3, 2, BLOCK, 16)


def test_onnx_rejects_what_gpt_rejects(exported):
    _, _, path, _ = exported
    onx = onnx_runtime.OnnxGPT(path)
    with pytest.raises(ValueError, match="block_size"):
        onx(random_tokens(1, BLOCK + 1, seed=0))
    with pytest.raises(ValueError, match="block_size"):
        onx.new_cache(1, BLOCK + 1)
    cache = onx.new_cache(2, 4)
    with pytest.raises(ValueError, match="max_len"):
        onx(random_tokens(2, 5, seed=0), cache=cache)
    with pytest.raises(ValueError, match="batch size"):
        onx(random_tokens(1, 2, seed=0), cache=cache)


def test_greedy_decoding_gives_the_same_tokens(exported):
    model, _, path, _ = exported
    onx = onnx_runtime.OnnxGPT(path)
    prompts = [[IMG], [IMG], [IMG, VOCAB.code_id(3)], [IMG, VOCAB.code_id(0), VOCAB.code_id(5), END, CLS]]
    greedy = DrawSettings(greedy=True, max_new_tokens=BLOCK)
    with torch.no_grad():
        a = generate(Checkpoint(model, VOCAB, None), prompts, greedy)
    b = generate(Checkpoint(onx, VOCAB, None), prompts, greedy)
    assert [r["ids"] for r in a] == [r["ids"] for r in b]
    assert sum(r["new"] for r in a) >= 20                  # the comparison covered real decoding
    assert [r["pred"] for r in a] == [r["pred"] for r in b]
    assert a[-1]["pred"] is not None                        # and a prediction read at <CLS>


def test_classification_at_cls_is_identical(exported):
    model, _, path, _ = exported
    onx = onnx_runtime.OnnxGPT(path)
    seqs = sequences(24, seed=4)
    prefixes = [s[:-2] for s in seqs]                       # '<IMG> ... </IMG> <CLS>', different lengths
    ours, theirs = Checkpoint(model, VOCAB, None), Checkpoint(onx, VOCAB, None)
    with torch.no_grad():
        want = class_probs(ours, prefixes, batch_size=7)
    got = class_probs(theirs, prefixes, batch_size=7)
    assert torch.equal(got.argmax(1), want.argmax(1))
    assert (got - want).abs().max() < 1e-5
    # the evaluation (metrics over all tokens, classification at <CLS>) is the same too
    from imagegpt.sequences import make_batch
    batch = make_batch(seqs, BLOCK, VOCAB.pad_id)
    m_torch = evaluate(ours, batch, batch_size=5)
    m_onnx = evaluate(theirs, batch, batch_size=5)
    assert m_onnx["confusion"] == m_torch["confusion"] and m_onnx["accuracy"] == m_torch["accuracy"]
    assert m_onnx["loss"] == pytest.approx(m_torch["loss"], abs=1e-5)


def test_int8_copy_is_smaller_loads_and_stays_close(exported):
    model, folder, path, sizes = exported
    q = os.path.join(folder, "onnx", "model_quantized.onnx")
    assert sizes == {"fp32_bytes": os.path.getsize(path), "int8_bytes": os.path.getsize(q)}
    assert sizes["int8_bytes"] < 0.6 * sizes["fp32_bytes"]
    graph = onnx.load(q).graph
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer}
    products = [n for n in graph.node if n.op_type == "MatMulInteger"]
    assert len(products) == 2 * 4 + 1                       # the weights really are integers now
    for n in products:
        # the same logits on every x86 CPU: without VNNI, onnxruntime adds pairs of uint8 x int8
        # products into an int16 that saturates, so |weight| <= 64 (2 x 255 x 64 < 2**15), zero point 0
        w, zero = weights[n.input[1]], weights[n.input[3]]
        assert w.dtype == np.int8 and np.abs(w.astype(int)).max() <= 64 and not zero.any(), n.name
        assert zero.shape == (w.shape[1],)                  # one scale per output column
    x = random_tokens(4, BLOCK, seed=5)
    with torch.no_grad():
        want = model(x)[0]
    onx = onnx_runtime.OnnxGPT(q)
    got = onx(x)[0]
    diff = (got - want).abs().max().item()
    assert 1e-6 < diff < INT8_TOL * want.abs().max().item(), diff     # changed, but only a little
    assert (got.softmax(-1) - want.softmax(-1)).abs().max() < INT8_TOL
    # the cache works on the int8 graph too; activations are quantised with one scale per tensor and
    # call, so cached steps differ a little from the full forward (measured: up to 0.13), not 1e-4
    cache = onx.new_cache(4, BLOCK)
    steps = torch.cat([onx(x[:, :10], cache=cache)[0]] + [onx(x[:, t:t + 1], cache=cache)[0]
                                                          for t in range(10, BLOCK)], 1)
    assert (steps - want).abs().max() < INT8_TOL * want.abs().max()


def test_bad_files_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no such ONNX graph"):
        onnx_runtime.OnnxGPT(str(tmp_path / "missing.onnx"))
    with pytest.raises(UserError, match="export it first"):
        onnx_export.quantize_int8(str(tmp_path))
    (tmp_path / "junk.onnx").write_bytes(b"not a graph")
    with pytest.raises(UserError, match="cannot load"):
        onnx_runtime.OnnxGPT(str(tmp_path / "junk.onnx"))
    # a valid graph without our metadata (as written by another tool)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    g = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                               [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    onnx.save(onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid("", 18)]), str(tmp_path / "other.onnx"))
    with pytest.raises(UserError, match="gpt_config"):
        onnx_runtime.OnnxGPT(str(tmp_path / "other.onnx"))


# ----------------------------------------------------------------------------- the commands

def test_export_cli_check_and_the_onnx_backend_of_sample_and_eval(tiny, tmp_path, capsys):
    """hf_export.py --onnx --quantize int8 --check writes both graphs and reports parity; sample.py and
    eval.py with --backend onnx give what the PyTorch backend gives."""
    out, found = str(tmp_path / "hf"), tmp_path / "parity.json"
    assert hf_export.main(["--ckpt", tiny.ckpt, "--out", out, "--onnx", "--quantize", "int8", "--check",
                           "--json", str(found)]) == 0
    text = capsys.readouterr().out
    parity = json.loads(found.read_text())      # --json: what the check found, with its provenance
    assert list(parity) == ["checkpoint", "export", "transformers", "onnx", "onnx-int8", "tokenizer", "passed", "provenance"]
    assert parity["passed"] and parity["onnx"]["greedy_equal"] and parity["tokenizer"]["max_abs_pixel_diff"] <= 1e-6
    assert "onnx parity" in text and "onnx-int8 parity" in text and "greedy identical" in text
    assert sorted(os.listdir(os.path.join(out, "onnx"))) == ["detokenizer.onnx", "export.json", "model.json", "model.onnx",
                                                             "model_quantized.onnx", "tokenizer.onnx"]
    assert "onnx/tokenizer.onnx" in text and "codes differ from tokenizer.py" in text    # the tokenizer's parity
    assert "## ONNX" in open(os.path.join(out, "README.md")).read()
    runs = {}
    for backend in ("torch", "onnx"):
        png, jl = str(tmp_path / f"{backend}.png"), str(tmp_path / f"{backend}.jsonl")
        assert sp.main(["--ckpt", out, "--backend", backend, "--bf16", "false", "--num_samples", "5", "--seed", "3",
                        "--out_png", png, "--out_jsonl", jl]) == 0
        runs[backend] = [json.loads(line) for line in open(jl)]
        e = str(tmp_path / f"{backend}_eval.json")
        assert ev.main(["--ckpt", out, "--backend", backend, "--bf16", "false", "--data", tiny.val, "--out", e]) == 0
        runs[backend + "_eval"] = json.load(open(e))
    capsys.readouterr()
    assert [r["tokens"] for r in runs["torch"]] == [r["tokens"] for r in runs["onnx"]]   # same sampled tokens
    a, b = runs["torch_eval"], runs["onnx_eval"]
    assert a["confusion"] == b["confusion"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert isinstance(checkpoint.load(out, backend="onnx-int8").model, onnx_runtime.OnnxGPT)


def test_onnx_backend_without_a_graph_is_one_clear_line(tiny, tmp_path):
    with pytest.raises(UserError, match=r"onnx/model.onnx: missing; write it with python hf_export.py"):
        checkpoint.load(tiny.ckpt, backend="onnx")
    with pytest.raises(UserError, match="--quantize only applies together with --onnx"):
        hf_export.main(["--ckpt", tiny.ckpt, "--out", str(tmp_path / "x"), "--quantize", "int8"])
    assert not (tmp_path / "x").exists()
