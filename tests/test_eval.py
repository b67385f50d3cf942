"""metrics.py and eval.py: metrics on a hand-made case with known answers, the CLI modes, the pictures."""
import json
import math
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from fixtures import CLASSES, ROOT, png_size

import eval as ev
from imagegpt import checkpoint, evaluation, metrics, plots
from imagegpt.checkpoint import Checkpoint
from imagegpt.errors import UserError
from imagegpt.sequences import make_batch
from imagegpt.token_format import Vocab

# ----------------------------------------------------------------------------- known answers

V2 = Vocab(2, 2)          # ids: specials 0..5, <Z_000>=6, <Z_001>=7, <CLS_0>=8, <CLS_1>=9
IMG, END, CLS, EOS, Z0, Z1, L0, L1 = 2, 3, 4, 5, 6, 7, 8, 9
NEG = -1e4                # exp(-1e4) is exactly 0 in float32: "probability 0"


class Stub(nn.Module):
    """A bigram 'model' with chosen next-token probabilities; at <CLS> the distribution depends on
    the first image code instead, so the class prediction differs between sequences."""

    def __init__(self):
        super().__init__()
        self.device = torch.device("cpu")
        self.config = SimpleNamespace(block_size=16)
        t = torch.full((10, 10), NEG)
        t[0] = 0.0                                   # after <PAD>: anything (never scored)
        t[EOS] = 0.0
        for cur, dist in {IMG: {Z0: .75, Z1: .25}, Z0: {Z0: .5, Z1: .25, END: .25},
                          Z1: {Z1: .6, END: .4}, END: {CLS: 1.0}, L0: {EOS: 1.0}, L1: {EOS: 1.0}}.items():
            for nxt, p in dist.items():
                t[cur, nxt] = math.log(p)
        c = torch.full((10, 10), NEG)
        for first, dist in {Z0: {L0: .8, L1: .2}, Z1: {EOS: .5, L1: .3, L0: .2}}.items():
            for nxt, p in dist.items():
                c[first, nxt] = math.log(p)
        self.register_buffer("table", t)
        self.register_buffer("cls_table", c)

    def forward(self, idx, targets=None, cache=None, logits_at=None):
        logits = self.table[idx]
        at_cls = (idx == CLS)[..., None]
        first = idx[:, min(1, idx.shape[1] - 1)]
        logits = torch.where(at_cls, self.cls_table[first][:, None, :], logits)
        return (logits if logits_at is None else logits[torch.arange(len(idx)), logits_at].unsqueeze(1)), None


SEQS = [[IMG, Z0, Z1, END, CLS, L0, EOS],          # label 0
        [IMG, Z1, Z1, END, CLS, L1, EOS],          # label 1
        [IMG, Z0, Z0, Z0, END, CLS, L1, EOS]]      # label 1 (longer: the others get padding)
# per target token: (probability the stub gives it, is it the argmax, kind)
TARGETS = [[(.75, 1, "img"), (.25, 0, "img"), (.4, 0, "end"), (1, 1, "cls"), (.8, 1, "lab"), (1, 1, "eos")],
           [(.25, 0, "img"), (.6, 1, "img"), (.4, 0, "end"), (1, 1, "cls"), (.3, 0, "lab"), (1, 1, "eos")],
           [(.75, 1, "img"), (.5, 1, "img"), (.5, 1, "img"), (.25, 0, "end"), (1, 1, "cls"), (.2, 0, "lab"),
            (1, 1, "eos")]]


def test_metrics_on_a_hand_made_case():
    x, y, cls_pos = make_batch(SEQS, 16, V2.pad_id)
    m = metrics.evaluate(Checkpoint(Stub(), V2, None), (x, y, cls_pos), batch_size=2, topk=(1, 2, 3))
    allt = [t for row in TARGETS for t in row]
    img = [t for t in allt if t[2] == "img"]
    lab = [t for t in allt if t[2] == "lab"]
    nll = lambda ts: -sum(math.log(p) for p, _, _ in ts) / len(ts)
    assert (len(allt), len(img), len(lab)) == (19, 7, 3)
    assert m["n_sequences"] == 3
    assert m["loss"] == pytest.approx(nll(allt), abs=1e-6)
    assert m["perplexity"] == pytest.approx(math.exp(nll(allt)), rel=1e-6)
    assert m["image_loss"] == pytest.approx(nll(img), abs=1e-6)
    assert m["image_perplexity"] == pytest.approx(math.exp(nll(img)), rel=1e-6)
    assert m["label_loss"] == pytest.approx(nll(lab), abs=1e-6)
    assert m["label_perplexity"] == pytest.approx((1 / (.8 * .3 * .2)) ** (1 / 3), rel=1e-6)
    assert m["token_accuracy"] == 12 / 19
    assert m["image_token_accuracy"] == 5 / 7
    assert m["label_token_accuracy"] == 1 / 3        # sequence 2: <EOS> beats <CLS_1> over the whole vocab
    assert m["accuracy"] == 2 / 3                    # but among the labels <CLS_1> wins
    assert m["topk_accuracy"] == {"1": 2 / 3, "2": 1.0}   # k = 3 > 2 classes is left out
    assert m["per_class_accuracy"] == [1.0, 0.5]
    assert m["confusion"] == [[1, 0], [1, 1]]        # rows true, columns predicted
    json.dumps(m)                                    # JSON-ready
    text = evaluation.metrics_text(m, ["a", "b"])
    assert "66.67 %" in text and "top-2 100.00 %" in text and "63.16 %" in text


def test_class_probs_and_next_tokens_on_the_stub():
    stub = Checkpoint(Stub(), V2, None)
    probs = metrics.class_probs(stub, [s[:-2] for s in SEQS], batch_size=2)
    assert torch.allclose(probs, torch.tensor([[.8, .2], [.4, .6], [.8, .2]]), atol=1e-6)
    top = metrics.next_tokens(stub, [IMG], k=2)
    assert [(t, i) for t, i, _ in top] == [("<Z_000>", Z0), ("<Z_001>", Z1)]
    assert [p for _, _, p in top] == pytest.approx([.75, .25], abs=1e-6)
    assert metrics.next_tokens(stub, [IMG, Z1, Z1, END, CLS], k=1)[0][:2] == ("<EOS>", EOS)


def test_parse_tokens_errors():
    assert V2.parse("<IMG> <Z_001>") == [IMG, Z1]
    with pytest.raises(UserError, match="unknown token '<Z_002>'"):
        V2.parse("<IMG> <Z_002>")
    with pytest.raises(UserError, match="empty"):
        V2.parse("   ")


# ----------------------------------------------------------------------------- pictures

def test_plot_curves_size_and_errors(tiny, tmp_path):
    out = str(tmp_path / "c.png")
    assert plots.plot_curves(os.path.join(tiny.run, "log.jsonl"), out) == plots.CURVES_SIZE
    assert png_size(out) == plots.CURVES_SIZE
    bad = tmp_path / "log.jsonl"
    bad.write_text('{"step": 1}\nnot json\n')
    with pytest.raises(UserError, match=r"log.jsonl:2: invalid JSON"):
        plots.plot_curves(str(bad), str(tmp_path / "x.png"))
    with pytest.raises(UserError, match="no such training log"):
        plots.plot_curves(str(tmp_path / "none.jsonl"), str(tmp_path / "x.png"))
    assert not (tmp_path / "x.png").exists()
    assert ev.main(["--curves", tiny.run]) == 0
    assert png_size(os.path.join(tiny.run, "curves.png")) == plots.CURVES_SIZE


# ----------------------------------------------------------------------------- command line

def test_eval_cli_default_split(tiny, capsys):
    assert ev.main(["--ckpt", tiny.ckpt, "--batch_size", "5", "--bf16", "false"]) == 0
    out = capsys.readouterr().out
    assert "classification accuracy" in out and "confusion matrix" in out and tiny.val in out
    rep = json.load(open(os.path.join(tiny.ckpt, "eval.json")))
    assert rep["data"] == f"{tiny.val} (the test split: held out, read by no training decision)"
    assert rep["classes"] == CLASSES and rep["n_sequences"] == 24 and "checkpoint_chosen" in rep
    assert png_size(os.path.join(tiny.ckpt, "eval_confusion.png")) == plots.CONFUSION_SIZE
    # the same numbers as evaluate() on the same data
    from imagegpt.sequences import read_sequences
    ck = checkpoint.load(tiny.ckpt)
    m = metrics.evaluate(ck, make_batch(read_sequences(tiny.val, ck.vocab)[0], 16), topk=(1, 2, 3, 5))
    for k in ("loss", "perplexity", "accuracy", "image_token_accuracy", "topk_accuracy"):
        assert rep[k] == pytest.approx(m[k], rel=1e-6), k
    assert rep["confusion"] == m["confusion"]
    assert sum(map(sum, rep["confusion"])) == 24


def test_a_folder_prepared_before_the_rename_is_read_from_val_jsonl(tiny, tmp_path, capsys):
    """Folders prepared before the test split was named test.jsonl hold it as val.jsonl (the original
    project's name): eval.py and sample.py --complete still find it there."""
    ck, data = tmp_path / "ck", tmp_path / "data"
    shutil.copytree(tiny.ckpt, ck)
    shutil.copytree(tiny.data_dir, data)
    os.rename(data / "test.jsonl", data / "val.jsonl")
    cfg = json.load(open(ck / "config.json"))
    cfg["train"]["data_dir"] = str(data)
    json.dump(cfg, open(ck / "config.json", "w"))
    assert ev.main(["--ckpt", str(ck), "--bf16", "false"]) == 0
    rep = json.load(open(ck / "eval.json"))
    assert rep["data"].startswith(str(data / "val.jsonl")) and rep["n_sequences"] == len(tiny.labels)
    assert checkpoint.load(str(ck)).split_file("test") == str(data / "val.jsonl")


def test_eval_cli_images_equal_the_sequences(tiny, tmp_path, capsys):
    out = str(tmp_path / "img_eval.json")
    assert ev.main(["--ckpt", tiny.ckpt, "--images", tiny.img_dir, "--out", out]) == 0
    a = json.load(open(out))
    assert a["n_sequences"] == 24 and png_size(str(tmp_path / "img_eval_confusion.png")) == plots.CONFUSION_SIZE
    # PNG round trip of uint8-valued images gives the same codes, so the same metrics as test.jsonl
    ev.main(["--ckpt", tiny.ckpt, "--data", tiny.val, "--out", str(tmp_path / "seq.json")])
    b = json.load(open(tmp_path / "seq.json"))
    assert a["confusion"] == b["confusion"] and a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    capsys.readouterr()


def test_eval_cli_bad_inputs_leave_no_outputs(tiny, tmp_path):
    out = tmp_path / "e.json"
    with pytest.raises(UserError, match="no.jsonl"):
        ev.main(["--ckpt", tiny.ckpt, "--data", str(tmp_path / "no.jsonl"), "--out", str(out)])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"tokens": "<IMG> <Z_000> </IMG> <CLS> <CLS> <EOS>", "label": 1}\n')
    with pytest.raises(UserError, match="--repair_v1"):
        ev.main(["--ckpt", tiny.ckpt, "--data", str(bad), "--out", str(out)])
    wrong = tmp_path / "imgs" / "zebra"
    wrong.mkdir(parents=True)
    from PIL import Image
    Image.new("L", (4, 4)).save(wrong / "a.png")
    with pytest.raises(UserError, match="'zebra' is not a class"):
        ev.main(["--ckpt", tiny.ckpt, "--images", str(tmp_path / "imgs"), "--out", str(out)])
    assert not out.exists() and not (tmp_path / "e_confusion.png").exists()
    assert ev.main(["--ckpt", tiny.ckpt, "--data", str(bad), "--repair_v1", "--out", str(out)]) == 0
    assert json.load(open(out))["n_sequences"] == 1


def test_classify_images_and_sequences(tiny, capsys):
    one = os.path.join(tiny.img_dir, "dog", "01.png")
    assert ev.main(["--ckpt", tiny.ckpt, "--classify", tiny.img_dir, one, tiny.val]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["input", "true", "predicted", "prob"]
    rows, last = lines[1:-1], lines[-1]
    assert len(rows) == 24 + 1 + 24 and last.startswith("accuracy on the 24 labelled sequences")
    ck = checkpoint.load(tiny.ckpt)
    from imagegpt.sequences import read_sequences
    seqs, labels = read_sequences(tiny.val, ck.vocab)
    probs = metrics.class_probs(ck, [s[:-2] for s in seqs])
    for row, p, y in zip(rows[25:], probs, labels):
        name, true, pred, prob = row.split()
        assert (true, pred) == (CLASSES[y], CLASSES[int(p.argmax())])
        assert float(prob) == pytest.approx(p.max().item(), abs=1e-3)
    # an image gets the same answer as its sequence (same codes)
    dog = [r for r in rows if r.startswith(one)]
    assert dog[0].split()[2:] == rows[25 + 1].split()[2:]
    with pytest.raises(UserError, match="expected an image"):
        ev.main(["--ckpt", tiny.ckpt, "--classify", os.path.join(tiny.data_dir, "report.json")])


def test_next_tokens_cli(tiny, capsys):
    assert ev.main(["--ckpt", tiny.ckpt, "--next", "<IMG> <Z_003>", "--top_k", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 + 4
    ck = checkpoint.load(tiny.ckpt)
    model = ck.model
    probs = model(torch.tensor([ck.vocab.encode("<IMG> <Z_003>")]))[0][0, -1].softmax(-1)
    p, i = probs.topk(4)
    for line, pi, ii in zip(lines[2:], p, i):
        rank, tok, tid, prob = line.split()
        assert int(tid) == ii and tok == ck.vocab.tokens[ii] and float(prob) == pytest.approx(pi.item(), abs=1e-4)


def test_help_and_one_line_error_subprocess(tiny, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "eval.py", "--help"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and all(c in r.stdout for c in ("metrics", "classify", "next", "curves", "generation"))
    r = subprocess.run([sys.executable, "eval.py", "metrics", "--help"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "--tta" in r.stdout and "--split" in r.stdout
    for argv in (["next", "--ckpt", tiny.ckpt, "<IMG> <Z_8>"], ["--ckpt", tiny.ckpt, "--next", "<IMG> <Z_8>"]):
        r = subprocess.run([sys.executable, "eval.py", *argv], cwd=ROOT, capture_output=True, text=True, env=env)
        assert r.returncode == 2 and r.stdout == ""
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: next: unknown token '<Z_8>'")


# ----------------------------------------------------------------------------- test-time augmentation

def test_tta_views_and_probs(tiny):
    from imagegpt.augment import tta_views
    from imagegpt.data_config import DataConfig
    ck = checkpoint.load(tiny.ckpt)
    x = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    views = list(tta_views(x, 3, DataConfig()))
    assert len(views) == 4 and torch.equal(views[0], x)
    assert all(not torch.equal(v, x) for v in views[1:])
    assert all(torch.equal(a, b) for a, b in zip(views, tta_views(x, 3, DataConfig())))   # fixed draws
    plain = metrics.class_probs(ck, [ck.vocab.prefix_ids(r) for r in ck.codebook.encode(x).tolist()])
    zero = metrics.augmented_class_probs(ck, x, 0, DataConfig())
    assert torch.allclose(zero, plain, atol=1e-6)      # no views: the plain probabilities
    three = metrics.augmented_class_probs(ck, x, 3, DataConfig())
    each = torch.stack([metrics.class_probs(ck, [ck.vocab.prefix_ids(r) for r in ck.codebook.encode(v).tolist()])
                        for v in views]).double()
    assert torch.allclose(three.double(), each.log().mean(0).softmax(-1), atol=1e-6)   # geometric mean, renormalised
    assert torch.allclose(three.sum(1), torch.ones(5), atol=1e-6)


def test_eval_cli_tta_on_images(tiny, tmp_path, capsys):
    out = str(tmp_path / "tta.json")
    assert ev.main(["--ckpt", tiny.ckpt, "--images", tiny.img_dir, "--tta", "3", "--bf16", "false", "--out", out]) == 0
    rep = json.load(open(out))
    t = rep["tta"]
    assert t["copies"] == 3 and sum(map(sum, t["confusion"])) == 24 and 0 <= t["accuracy"] <= 1
    assert t["accuracy"] == pytest.approx(sum(t["confusion"][c][c] for c in range(3)) / 24)
    assert "with test-time augmentation (3 moved views" in capsys.readouterr().out
    # the same probabilities as the library function on the same images
    from imagegpt.data_config import DataConfig
    from imagegpt.sources import load_folder
    from tokenizer import uint8_to_tensor
    ck = checkpoint.load(tiny.ckpt)
    images, labels, names, _ = load_folder(tiny.img_dir, 4, 1)
    probs = metrics.augmented_class_probs(ck, uint8_to_tensor(images), 3, DataConfig())
    truth = torch.tensor([CLASSES.index(names[y]) for y in labels.tolist()])
    assert t["accuracy"] == pytest.approx((probs.argmax(1) == truth).double().mean().item())


def test_eval_cli_tta_refusals(tiny, tmp_path):
    out = tmp_path / "e.json"
    with pytest.raises(UserError, match="--tta classifies images"):
        ev.main(["--ckpt", tiny.ckpt, "--data", tiny.val, "--tta", "2", "--out", str(out)])
    with pytest.raises(UserError, match="--tta must be 0"):
        ev.main(["--ckpt", tiny.ckpt, "--images", tiny.img_dir, "--tta", "-1", "--out", str(out)])
    # the tiny checkpoint's split file is not the tokens of its data source's images: refused, nothing written
    with pytest.raises(UserError):
        ev.main(["--ckpt", tiny.ckpt, "--tta", "2", "--out", str(out)])
    assert not out.exists() and not (tmp_path / "e_confusion.png").exists()


def test_codes_do_not_depend_on_a_callers_autocast():
    from imagegpt.kmeans import assign
    x, c = torch.tensor([[0.501]]), torch.tensor([[0.0], [1.0]])   # nearer to 1; bf16 rounds 0.501 to 0.5, a tie
    assert assign(x, c)[0].tolist() == [1]
    with torch.autocast("cpu", dtype=torch.bfloat16):   # eval.py and the service encode under autocast
        assert assign(x, c)[0].tolist() == [1]
