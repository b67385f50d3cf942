"""hf_format.py and hf_export.py: the transformers GPT-2 folder, parity with our model, reading it back,
upload (mocked)."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from fixtures import ROOT
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel

import hf_export
from imagegpt import checkpoint, decoding, export_checks, hub, huggingface
from imagegpt.checkpoint import Checkpoint
from imagegpt.draw_settings import DrawSettings
from imagegpt.cli import run_cli
from imagegpt.errors import UserError
from imagegpt.settings import build
from imagegpt.token_format import Vocab
from imagegpt.finetune import build_model
from imagegpt.train_config import TrainConfig
from imagegpt.train_data import Data
from model import GPT, GPTConfig
from tokenizer import Codebook, CodebookConfig, load_codebook

BLOCK = 32
METRICS = {"n_sequences": 12, "loss": 1.25, "perplexity": 3.4903, "token_accuracy": 0.625,
           "accuracy": 0.5833, "topk_accuracy": {"1": 0.5833, "2": 0.75}, "per_class_accuracy": [0.5, 0.75, 0.5]}


def tiny_checkpoint(folder, bias=True, seed=0):
    """A random tiny model (every parameter perturbed, so zero biases or unit LayerNorms cannot hide a
    mapping bug) saved with checkpoint.save, with a codebook fitted on random 8x8 images."""
    torch.manual_seed(seed)
    vocab = Vocab(16, 3)
    book = Codebook.fit(torch.rand(20, 1, 8, 8),
                        CodebookConfig(patch_size=4, num_codes=16, kmeans_iters=2, fit_samples=80))
    model = GPT(GPTConfig(vocab_size=len(vocab), block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, bias=bias))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cfg = build(TrainConfig, n_layer=2, n_head=2, n_embd=32, max_length=BLOCK, image_size=8, patch_size=4, num_codes=16)
    checkpoint.save(folder, model, cfg, vocab, book, metrics=METRICS)
    return model.eval(), vocab, book


def export(ckpt, out=None):
    """What hf_export.py does without its printing: checkpoint folder -> export folder."""
    return huggingface.write_export(checkpoint.load(ckpt), out or huggingface.default_out(ckpt))


def read(folder):
    ck = checkpoint.load(folder)
    return ck.model, ck.vocab, ck.codebook


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model, vocab, book = tiny_checkpoint(root / "run" / "best")
    out = export(root / "run" / "best")
    return {"root": root, "ckpt": root / "run" / "best", "out": out, "model": model, "vocab": vocab, "book": book}


@pytest.fixture(scope="module")
def hf(exported):
    return AutoModelForCausalLM.from_pretrained(exported["out"]).eval()


def greedy(model, prompt, steps, eos_id, pad_id):
    """Plain greedy decoding over our model, full recompute each step (no cache): finished rows get
    <PAD>, as transformers' generate() does. (sample.py's generate() did not exist when this was written.)"""
    out, done = prompt, torch.zeros(len(prompt), dtype=torch.bool)
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(out)[0][:, -1].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out = torch.cat([out, nxt[:, None]], 1)
            done |= nxt == eos_id
            if done.all():
                break
    return out


def test_folder_contents_and_config(exported):
    out = exported["out"]
    assert out == str(exported["root"] / "run" / "hf")  # default: hf/ next to the checkpoint folder
    files = set(os.listdir(out))
    assert set(huggingface.FILES) | {"metrics.json", "train_config.json"} == files
    assert not [f for f in os.listdir(exported["root"] / "run") if f.startswith(".")]  # no temp dirs left
    cfg = json.load(open(os.path.join(out, "config.json")))
    v = exported["vocab"]
    assert cfg["model_type"] == "gpt2" and cfg["architectures"] == ["GPT2LMHeadModel"]
    assert (cfg["vocab_size"], cfg["n_positions"], cfg["n_embd"], cfg["n_layer"], cfg["n_head"]) == (len(v), BLOCK, 32, 2, 2)
    assert cfg["activation_function"] == "gelu_new" and cfg["layer_norm_epsilon"] == 1e-5
    assert cfg["tie_word_embeddings"] is True and cfg["resid_pdrop"] == cfg["attn_pdrop"] == cfg["embd_pdrop"] == 0.0
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"], cfg["unk_token_id"]) == \
        (v.img_id, v.eos_id, v.pad_id, v.unk_id)
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert (gen["eos_token_id"], gen["pad_token_id"], gen["max_length"]) == (v.eos_id, v.pad_id, BLOCK)
    from safetensors import safe_open
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert f.get_tensor("transformer.h.0.attn.c_attn.weight").shape == (32, 96)  # Conv1D: (in, out)
        assert f.get_tensor("transformer.h.1.mlp.c_proj.weight").shape == (128, 32)
    assert all(n.startswith("transformer.") for n in names) and "lm_head.weight" not in names
    assert Vocab.load(os.path.join(out, "vocab.json")).to_dict() == v.to_dict()
    assert torch.equal(load_codebook(out).centroids, exported["book"].centroids)


def test_transformers_loads_cleanly_and_logits_match(exported, capfd):
    model, info = AutoModelForCausalLM.from_pretrained(exported["out"], output_loading_info=True)
    assert type(model) is GPT2LMHeadModel
    assert not any(info.values()), info                              # no missing/unexpected/mismatched keys
    assert "LOAD REPORT" not in capfd.readouterr().err
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied
    model.eval()
    x = torch.randint(len(exported["vocab"]), (3, BLOCK), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(x).logits - exported["model"](x)[0]).abs().max().item()
    assert diff < 1e-4, diff


def test_greedy_generate_matches_ours(exported, hf):
    v, ours = exported["vocab"], exported["model"]
    g = torch.Generator().manual_seed(2)
    prompt = torch.cat([torch.full((3, 1), v.img_id), torch.randint(v.code_offset, v.label_offset, (3, 2), generator=g)], 1)
    steps = BLOCK - prompt.shape[1]
    theirs = hf.generate(prompt, do_sample=False, max_length=BLOCK, attention_mask=torch.ones_like(prompt))
    mine = greedy(ours, prompt, steps, v.eos_id, v.pad_id)
    assert theirs.shape[1] > prompt.shape[1] + 5
    assert torch.equal(theirs, mine)
    ck = Checkpoint(ours, v, exported["book"])
    res = decoding.generate(ck, prompt.tolist(), DrawSettings(greedy=True, max_new_tokens=steps))  # as --check does
    assert [r["ids"] + [v.pad_id] * (mine.shape[1] - len(r["ids"])) for r in res] == mine.tolist()
    assert export_checks.hf_parity(ck, exported["out"])["greedy_equal"]


def test_greedy_generate_matches_generation_py(exported, hf):
    v, ours = exported["vocab"], exported["model"]
    g = torch.Generator().manual_seed(6)
    prompts = [[v.img_id] + torch.randint(v.code_offset, v.label_offset, (n,), generator=g).tolist() for n in (1, 2, 4)]
    ck = Checkpoint(ours, v, exported["book"])
    for p, r in zip(prompts, decoding.generate(ck, prompts, DrawSettings(greedy=True, max_new_tokens=BLOCK))):
        theirs = hf.generate(torch.tensor([p]), do_sample=False, max_length=BLOCK,
                             attention_mask=torch.ones(1, len(p), dtype=torch.long))
        assert theirs[0].tolist() == r["ids"]


def test_fast_tokenizer_same_ids_as_vocab(exported):
    v = exported["vocab"]
    tok = AutoTokenizer.from_pretrained(exported["out"])
    assert tok.is_fast and len(tok) == len(v)
    assert tok.convert_tokens_to_ids(v.tokens) == list(range(len(v)))
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id, tok.cls_token_id) == \
        (v.pad_id, v.eos_id, v.img_id, v.unk_id, v.cls_id)
    seq = v.image_tokens([3, 0, 15, 7], 2)
    ids = v.encode(seq)
    assert tok(seq)["input_ids"] == ids
    assert tok.decode(ids) == seq
    assert tok.decode(ids, skip_special_tokens=True) == "<Z_003> <Z_000> <Z_015> <Z_007> <CLS_2>"
    assert tok("<IMG>  <Z_001>\n<Z_999> </IMG>")["input_ids"] == [v.img_id, v.code_id(1), v.unk_id, v.img_end_id]
    rand = torch.randint(len(v), (40,), generator=torch.Generator().manual_seed(3)).tolist()
    assert tok(v.decode(rand))["input_ids"] == rand and tok.decode(rand) == v.decode(rand)
    batch = tok([seq, "<IMG> <Z_001>"], padding=True)["input_ids"]
    assert batch[1] == [v.img_id, v.code_id(1)] + [v.pad_id] * (len(ids) - 2)


def test_round_trip_import_checkpoint_load_and_init_from(exported):
    x = torch.randint(len(exported["vocab"]), (2, BLOCK), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = exported["model"](x)[0]
        model, vocab, book = read(exported["out"])
        assert torch.equal(model(x)[0], want)
        assert vocab.to_dict() == exported["vocab"].to_dict() and torch.equal(book.colours, exported["book"].colours)
        ck = checkpoint.load(exported["out"])
        assert torch.equal(ck.model(x)[0], want)
        orig = checkpoint.load(exported["ckpt"])
        assert ck.settings == orig.settings and ck.metrics == METRICS
        assert ck.vocab.to_dict() == vocab.to_dict() and torch.equal(ck.codebook.centroids, book.centroids)
        cfg = build(TrainConfig, init_from=exported["out"], max_length=BLOCK)
        data = Data(exported["vocab"], exported["book"], None, None, BLOCK, BLOCK, orig.class_names)
        model3 = build_model(cfg, data, log=lambda *a: None)
        assert model3.training
        assert torch.equal(model3.eval()(x)[0], want)
    # re-exporting the export gives the same weights
    out2 = export(exported["out"], exported["root"] / "again")
    assert torch.equal(read(out2)[0](x)[0], want)


def test_import_reads_folders_saved_by_transformers(exported, hf, tmp_path):
    x = torch.randint(len(exported["vocab"]), (2, BLOCK), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = exported["model"](x)[0]
    d = tmp_path / "resaved"
    hf.save_pretrained(d)
    for f in ("vocab.json", "codebook.json", "codebook.safetensors"):
        shutil.copy(os.path.join(exported["out"], f), d / f)
    with torch.no_grad():
        assert (read(d)[0](x)[0] - want).abs().max().item() == 0
    # the original GPT-2 naming: no "transformer." prefix, causal-mask buffers stored, lm_head stored
    from safetensors.torch import load_file, save_file
    sd = load_file(os.path.join(exported["out"], "model.safetensors"))
    old = {k.removeprefix("transformer."): v for k, v in sd.items()}
    old["h.0.attn.bias"] = torch.ones(1, 1, BLOCK, BLOCK)
    old["lm_head.weight"] = sd["transformer.wte.weight"].clone()
    save_file(old, d / "model.safetensors")
    with torch.no_grad():
        assert torch.equal(read(d)[0](x)[0], want)


def _broken_copy(exported, tmp_path, edit_config=None, edit_weights=None, edit_vocab=None):
    d = tmp_path / "broken"
    shutil.copytree(exported["out"], d)
    if edit_config:
        cfg = json.load(open(d / "config.json"))
        edit_config(cfg)
        json.dump(cfg, open(d / "config.json", "w"))
    if edit_weights:
        from safetensors.torch import load_file, save_file
        sd = load_file(d / "model.safetensors")
        edit_weights(sd)
        save_file(sd, d / "model.safetensors")
    if edit_vocab:
        edit_vocab(d)
    return d


@pytest.mark.parametrize("case, pattern", [
    ("activation", r"activation_function is 'relu'.*tanh"),
    ("vocab_size", r"vocab\.json has 25 tokens, config\.json says vocab_size 30"),
    ("vocab_file", r"vocab\.json has 26 tokens, config\.json says vocab_size 25"),
    ("no_bias", r"missing \['transformer\.h\.0\.attn\.c_attn\.bias'.*biases"),
    ("shape", r"transformer\.h\.0\.mlp\.c_fc\.weight has shape \(32, 64\), config\.json needs \(32, 128\)"),
    ("untied", r"lm_head\.weight differs"),
    ("inner", r"n_inner is 64"),
    ("no_weights", r"model\.safetensors: missing"),
])
def test_clear_errors_for_folders_that_do_not_fit(exported, tmp_path, case, pattern):
    edits = {
        "activation": dict(edit_config=lambda c: c.update(activation_function="relu")),
        "vocab_size": dict(edit_config=lambda c: c.update(vocab_size=30)),
        "vocab_file": dict(edit_vocab=lambda d: Vocab(17, 3).save(d / "vocab.json")),
        "no_bias": dict(edit_weights=lambda sd: [sd.pop(k) for k in list(sd) if k.endswith("bias")]),
        "shape": dict(edit_weights=lambda sd: sd.update({"transformer.h.0.mlp.c_fc.weight": torch.zeros(32, 64)})),
        "untied": dict(edit_weights=lambda sd: sd.update({"lm_head.weight": torch.zeros(25, 32)})),
        "inner": dict(edit_config=lambda c: c.update(n_inner=64)),
        "no_weights": dict(edit_vocab=lambda d: os.remove(d / "model.safetensors")),
    }
    d = _broken_copy(exported, tmp_path, **edits[case])
    with pytest.raises(UserError, match=pattern) as e:
        huggingface.read_export(d)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=pattern):
        checkpoint.load(d)


def test_export_refuses_a_model_without_biases_and_writes_nothing(tmp_path):
    tiny_checkpoint(tmp_path / "nobias", bias=False)
    with pytest.raises(UserError, match="no biases"):
        export(tmp_path / "nobias", tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["nobias"]


def test_export_is_atomic_and_does_not_clobber_other_folders(exported, tmp_path, monkeypatch):
    out = tmp_path / "hf"
    export(exported["ckpt"], out)
    before = {f: open(out / f, "rb").read() for f in os.listdir(out)}

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(huggingface, "model_card", boom)
    with pytest.raises(UserError, match="No space left"):
        export(exported["ckpt"], out)
    assert {f: open(out / f, "rb").read() for f in os.listdir(out)} == before  # the earlier export is intact
    assert sorted(os.listdir(tmp_path)) == ["hf"]                              # no temp folders left
    monkeypatch.setattr(huggingface, "model_card", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        export(exported["ckpt"], tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    # a folder that is not an earlier export (here: the checkpoint itself) is never replaced
    with pytest.raises(UserError, match="not an earlier export"):
        export(exported["ckpt"], exported["ckpt"])
    assert "train" in json.load(open(exported["ckpt"] / "config.json"))


def test_model_card_metadata_metrics_and_snippet(exported):
    import yaml
    text = open(os.path.join(exported["out"], "README.md")).read()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation" and "gpt2" in meta["tags"]
    assert "| classification accuracy | 0.5833 |" in text and "| perplexity (all real tokens) | 3.4903 |" in text
    assert "top-2 classification accuracy | 0.7500" in text
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    code = code.replace('repo = "path/to/this/folder"', f"repo = {exported['out']!r}")
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)  # the snippet runs as written: samples, then classifies
    assert ns["out"].shape[1] > 1 and ns["scores"].shape == (3,)


class FakeApi:
    calls = []

    def __init__(self, token=None, **kw):
        self.token = token

    def create_repo(self, repo_id, **kw):
        FakeApi.calls.append(("create_repo", repo_id, kw, self.token))
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, **kw):
        FakeApi.calls.append(("upload_folder", kw["repo_id"], kw, self.token))


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError(f"network touched: {a}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_push_to_hub_sends_the_folder(exported, tmp_path, monkeypatch, no_network, capsys):
    import huggingface_hub
    FakeApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    out = tmp_path / "hf"
    assert hf_export.main(["--ckpt", str(exported["ckpt"]), "--out", str(out), "--push_to_hub", "me/img-gpt",
                           "--private"]) == 0
    (c_name, c_repo, c_kw, c_tok), (u_name, u_repo, u_kw, u_tok) = FakeApi.calls
    assert (c_name, c_repo, c_kw["private"], c_kw["exist_ok"], c_tok) == ("create_repo", "me/img-gpt", True, True, "hf_test_token")
    assert (u_name, u_repo, u_kw["folder_path"], u_kw["repo_type"]) == ("upload_folder", "me/img-gpt", str(out), "model")
    plan = hub.upload_plan(out, "me/img-gpt", private=True)
    assert plan == {"repo_id": "me/img-gpt", "private": True,
                    "files": sorted(set(huggingface.FILES) | {"metrics.json", "train_config.json"})}
    assert u_kw["allow_patterns"] == plan["files"]
    assert "uploaded 12 files to https://huggingface.co/me/img-gpt (private)" in capsys.readouterr().out
    assert "repo = \"me/img-gpt\"" in open(out / "README.md").read()


def test_push_without_token_or_network_fails_in_one_line(exported, tmp_path, monkeypatch, no_network, capsys):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    args = ["--ckpt", str(exported["ckpt"]), "--out", str(tmp_path / "hf"), "--push_to_hub", "me/img-gpt"]
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: hf_export.main(args))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "HF_TOKEN" in err
    assert not os.path.exists(tmp_path / "hf")  # failed before the export work

    class Offline(FakeApi):
        def create_repo(self, repo_id, **kw):
            raise ConnectionError("Failed to resolve 'huggingface.co'\nmore detail")
    monkeypatch.setattr(huggingface_hub, "HfApi", Offline)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: hf_export.main(args))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == "error: upload to me/img-gpt failed: Failed to resolve 'huggingface.co'\n"
    with pytest.raises(UserError, match="not a repository id"):
        hf_export.main(args[:-1] + ["a/b/c"])


def test_help_runs():
    r = subprocess.run([sys.executable, "hf_export.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--push_to_hub" in r.stdout and "--ckpt" in r.stdout
