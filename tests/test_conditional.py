"""Class-conditional generation: the conditioned token format, training data that never lets a stated
class reach the classifier, classifier-free guidance in the decoding loop (scale 1 = plain conditional
sampling), a tiny conditioned model that draws the asked class, the sample.py / eval.py commands and
the model card's guidance snippet. Tiny data written here: 90 grey 8x8 images whose class (0..2) is
the row band of a bright square (fixtures.write_images), 2x2 patches, 8 codes."""
import json
import os

import numpy as np
import pytest
import torch
from fixtures import png_size, write_images

import eval as eval_cmd
import sample as sample_cmd
from imagegpt import checkpoint, draw_settings
from imagegpt import drawing_report as gm
from imagegpt.batches import micro_batch
from imagegpt.decoding import generate, guide
from imagegpt.draw_settings import DrawSettings as S
from imagegpt.errors import UserError
from imagegpt.metrics import class_probs
from imagegpt.sequences import make_batch, read_sequences
from imagegpt.settings import build, changed
from imagegpt.split_images import real_split
from imagegpt.token_format import NO_CLASS, Vocab, truncate
from imagegpt.processes import Processes
from imagegpt.train_config import TrainConfig
from imagegpt.train_data import load_data, load_split
from imagegpt.training import train
from tokenizer import uint8_to_tensor


def make_cfg(tmp, **kw):
    base = dict(source=f"folder:{tmp / 'images'}", data_dir=str(tmp / "prepared"), image_size=8, patch_size=2,
                num_codes=8, kmeans_iters=3, out_dir=str(tmp / "run"), n_layer=2, n_head=2, n_embd=32,
                max_length=32, batch_size=16, epochs=40, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_every=0,
                seed=1, device="cpu", cond_fraction=1.0, cond_drop=0.2, bf16="false")   # thresholds set in fp32
    return build(TrainConfig, **{**base, **kw})


def centroid_judge(images, labels, num_classes):
    """An independent judge for the toy images: the nearest class mean of real training pixels."""
    means = torch.stack([images[torch.as_tensor(labels) == c].mean(0) for c in range(num_classes)]).flatten(1)
    return lambda x: (-torch.cdist(x.flatten(1).float(), means)).softmax(-1)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny model trained for a few seconds with conditioned copies of every training sequence."""
    tmp = tmp_path_factory.mktemp("cond")
    write_images(tmp / "images", n=90)
    cfg = make_cfg(tmp)
    out = train(changed(cfg), log=lambda *a: None)
    ck = checkpoint.load(os.path.join(cfg.out_dir, "final"))
    tr_img, tr_lab, te_img, te_lab = real_split(ck.settings)
    judge = centroid_judge(uint8_to_tensor(tr_img), tr_lab, 3)
    return dict(tmp=tmp, cfg=cfg, out=out, ck=ck, judge=judge, test=(uint8_to_tensor(te_img), te_lab),
                train=(uint8_to_tensor(tr_img), tr_lab))


# ----------------------------------------------------------------------------- the token format

def test_the_vocabulary_stays_the_seeds():
    v = Vocab(500, 10)
    assert len(v) == 516 and v.tokens[1] == NO_CLASS == "<UNK>" and v.unk_id == 1
    original = {t: i for i, t in enumerate(["<PAD>", "<UNK>", "<IMG>", "</IMG>", "<CLS>", "<EOS>"]
                                           + [f"<Z_{k:03d}>" for k in range(500)] + [f"<CLS_{c}>" for c in range(10)])}
    assert Vocab.from_dict(original).to_dict() == original          # the seed's 516-entry vocab.json
    seq = v.image_ids([3, 4, 5], 7)
    assert v.decode(v.conditioned(seq, 7)) == "<CLS_7> <IMG> <Z_003> <Z_004> <Z_005> </IMG> <EOS>"
    assert v.decode(v.conditioned(seq)) == "<UNK> <IMG> <Z_003> <Z_004> <Z_005> </IMG> <EOS>"
    assert v.decode(v.cond_prompt(2)) == "<CLS_2> <IMG>" and v.decode(v.cond_prompt(None)) == "<UNK> <IMG>"
    assert v.is_cond_complete(v.conditioned(seq, 7), 3) and not v.is_cond_complete(seq, 3)
    assert not v.is_conditioned(seq) and v.is_conditioned(v.conditioned(seq))
    # truncation keeps each kind's tail
    assert v.decode(truncate(v.conditioned(seq, 7), 6)) == "<CLS_7> <IMG> <Z_003> <Z_004> </IMG> <EOS>"
    assert v.decode(truncate(seq, 7)) == "<IMG> <Z_003> <Z_004> </IMG> <CLS> <CLS_7> <EOS>"


def test_conditioned_copies_never_train_the_classifier(tmp_path):
    """The label token is a training target only at the <CLS> of plain sequences (image first): in a
    conditioned copy the class is an input before the image and nothing after the image names it."""
    write_images(tmp_path / "images", n=30)
    cfg = make_cfg(tmp_path, cond_fraction=1.0, cond_drop=0.3, label_weight=5.0)
    data = load_data(cfg, Processes("cpu"), log=lambda *a: None)
    v = data.vocab
    seqs, labels = read_sequences(os.path.join(cfg.data.data_dir, "train.jsonl"), v)
    x, y, w = micro_batch(data.train, np.arange(data.train.n), 0, data.block, data.width, v.pad_id, cfg.label_weight)
    cls_pos = load_split(cfg, "train", v, conditioned=True)[2]
    n = len(seqs)
    assert len(x) == 2 * n and (cls_pos[:n] >= 0).all() and (cls_pos[n:] == -1).all()
    is_label = (y >= v.label_offset) & (y < v.label_offset + v.num_classes)
    rows, cols = is_label.nonzero(as_tuple=True)
    assert rows.tolist() == list(range(n)) and cols.tolist() == cls_pos[:n].tolist()   # one per plain row, at <CLS>
    assert not (x[n:] == v.cls_id).any()                                 # no <CLS> in a conditioned row
    assert (w == 5.0).sum() == n and (w[n:] <= 1).all()
    first = x[n:, 0]
    stated = [v.is_label(int(t)) for t in first]
    assert all(v.is_label(int(t)) or int(t) == v.unk_id for t in first)
    assert 0.1 < 1 - np.mean(stated) < 0.5                                   # about cond_drop unstated
    kept = [int(t) - v.label_offset for t, s in zip(first, stated) if s]
    assert kept == [labels[i] for i, s in zip(range(n), stated) if s]     # the stated class is the true one
    # off (the default): exactly the plain sequences, as before
    plain = load_split(changed(cfg, cond_fraction=0.0), "train", v, conditioned=True)
    ref = make_batch(seqs, cfg.max_length, v.pad_id)
    assert all(torch.equal(a, b) for a, b in zip(plain, ref))
    assert TrainConfig().cond_fraction == 0.0


def test_classification_prefixes_state_no_class(toy):
    ck = toy["ck"]
    imgs = (toy["test"][0] * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for p in ck.encode_images(imgs):
        assert p[0] == ck.vocab.img_id and p[-2:] == [ck.vocab.img_end_id, ck.vocab.cls_id]
        assert not any(ck.vocab.is_label(i) or i == ck.vocab.unk_id for i in p)


# ----------------------------------------------------------------------------- guidance

def test_guidance_scale_one_is_plain_conditional_sampling(toy):
    ck = toy["ck"]
    v = ck.vocab
    prompts = [v.cond_prompt(c % 3) for c in range(12)]
    uncond = [v.cond_prompt(None)] * 12
    c = torch.randn(4, len(v))
    assert torch.equal(guide(c, torch.randn(4, len(v)) * 100, 1.0), c)
    for kw in (dict(), dict(top_k=3), dict(top_p=0.8, temperature=0.7)):
        run = lambda guidance=1.0, uncond=None: generate(ck, prompts, S(max_new_tokens=20, seed=5, guidance=guidance, **kw),
                                                         uncond=uncond, record_logits=True)
        plain, one, two = run(), run(1.0, uncond), run(3.0, uncond)
        assert [r["ids"] for r in plain] == [r["ids"] for r in one]
        for a, b in zip(plain, one):
            torch.testing.assert_close(a["logits"], b["logits"], rtol=0, atol=1e-5)
        assert [r["ids"] for r in plain] != [r["ids"] for r in two]
    # the guided logits of the first step are guide(cond, uncond) of separate forward passes
    with torch.no_grad():
        cl = ck.model(torch.tensor([prompts[1]]))[0][0, -1]
        ul = ck.model(torch.tensor([uncond[1]]))[0][0, -1]
    r = generate(ck, prompts[1:2], S(max_new_tokens=1, greedy=True, guidance=2.5), uncond=uncond[1:2],
                 record_logits=True)[0]
    torch.testing.assert_close(r["logits"][0], guide(cl, ul, 2.5), rtol=0, atol=1e-4)
    with pytest.raises(UserError, match="same length"):
        generate(ck, prompts[:2], S(max_new_tokens=3, guidance=2.0), uncond=[[v.unk_id]] * 2)


def test_a_conditioned_tiny_model_draws_the_asked_class(toy):
    ck, judge = toy["ck"], toy["judge"]
    real, real_lab = toy["test"]
    assert gm.judged_accuracy(judge, real, real_lab, 3)["accuracy"] == 1.0     # the judge's ceiling
    seqs, labels = read_sequences(os.path.join(toy["cfg"].data.data_dir, "test.jsonl"), ck.vocab)
    probs = class_probs(ck, [s[:-2] for s in seqs])       # classification still works
    assert (probs.argmax(1) == torch.tensor(labels)).float().mean().item() >= 0.9
    asked = [c for c in range(3) for _ in range(20)]
    for scale in (1.0, 2.0):
        images, res = gm.draw_classes(ck, asked, S(guidance=scale))
        acc = gm.judged_accuracy(judge, images, asked, 3)
        assert acc["accuracy"] >= 0.75 and min(acc["per_class"]) >= 0.5, (scale, acc)   # chance: 1/3
        assert sum(ck.vocab.is_cond_complete(r["ids"], ck.codebook.seq_len) for r in res) >= 40
    # the same samples judged against shuffled requests: the class really comes from the prompt
    images, _ = gm.draw_classes(ck, asked, S())
    assert gm.judged_accuracy(judge, images, [(c + 1) % 3 for c in asked], 3)["accuracy"] <= 0.25


# ----------------------------------------------------------------------------- the measures

def test_precision_recall_and_diversity():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(60, 1, 4, 4, generator=g)
    p, r = gm.precision_recall(real, real.clone(), k=3)
    assert p == 1.0 and r == 1.0
    collapsed = real[:1].repeat(60, 1, 1, 1) + 1e-3 * torch.rand(60, 1, 4, 4, generator=g)
    p, r = gm.precision_recall(real, collapsed, k=3)
    assert p == 1.0 and r < 0.2                       # realistic but covers little: recall catches it
    far = real + 5
    assert gm.precision_recall(real, far, k=3)[0] == 0.0
    labels = [i % 3 for i in range(60)]
    div = gm.diversity(collapsed, labels, real, labels, 3)
    assert all(d["ratio"] < 0.05 for d in div)
    assert all(abs(d["ratio"] - 1) < 1e-12 for d in gm.diversity(real, labels, real, labels, 3))
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]]).view(3, 1, 1, 2)
    assert gm.mean_pairwise_distance(x) == pytest.approx((5 + 5 + 0) / 3)


# ----------------------------------------------------------------------------- commands

def test_sample_digit_grid_and_conditional_completion(toy, tmp_path, capsys):
    ck = os.path.join(toy["cfg"].out_dir, "final")
    png, js = str(tmp_path / "s.png"), str(tmp_path / "s.jsonl")
    with pytest.raises(SystemExit) as e:
        sample_cmd.run_cli(lambda: sample_cmd.main(["--ckpt", ck, "--digit", "c2", "--num_samples", "6",
                                                    "--out_png", png, "--out_jsonl", js, "--top_k", "4"]))
    assert e.value.code == 0
    recs = [json.loads(line) for line in open(js)]
    assert len(recs) == 6 and all(r["meta"]["asked"] == "c2" and r["meta"]["guidance"] == 3.0 for r in recs)
    assert all(r["meta"]["temperature"] == draw_settings.TEMPERATURE for r in recs)     # a drawing's default
    assert all(r["tokens"].startswith("<CLS_2> <IMG>") for r in recs)
    assert all(r["label"] == 2 and r["well_formed"] for r in recs)             # decoded in the format
    assert sample_cmd.main(["--ckpt", ck, "--num_samples", "2", "--out_png", png, "--out_jsonl", js]) == 0
    assert all(json.loads(line)["meta"]["temperature"] == 1.0 for line in open(js))   # free sampling's
    assert sample_cmd.main(["--ckpt", ck, "--grid", "--num_samples", "4", "--cfg", "1", "--out_png", png]) == 0
    w, h = png_size(png)
    assert (w, h) == (4 * (8 * 11 + 4), 3 * (8 * 11 + 16))       # 3 rows (classes) x 4, cells of scale 11
    assert sample_cmd.main(["--ckpt", ck, "--complete", "3", "--digit", "1", "--out_png", png, "--out_jsonl", js]) == 0
    recs = [json.loads(line) for line in open(js)]
    assert all(r["tokens"].startswith("<CLS_1> <IMG>") and r["meta"]["kept_codes"] == 8 for r in recs)
    out = capsys.readouterr().out
    assert "reads c1 in" in out and "completions (guidance 3.0)" in out


@pytest.mark.parametrize("args, match", [
    (["--cfg", "2"], "needs a class"),
    (["--digit", "dog"], "not a class"),
    (["--grid", "--digit", "1"], "one of them"),
    (["--digit", "1", "--start", "<IMG>"], "--start"),
    (["--digit", "1", "--cfg", "-1"], ">= 0"),
])
def test_sample_conditional_errors(toy, tmp_path, args, match):
    with pytest.raises(UserError, match=match):
        sample_cmd.main(["--ckpt", os.path.join(toy["cfg"].out_dir, "final"), "--out_png", str(tmp_path / "x.png")] + args)


def test_asking_an_unconditioned_model_for_a_class_is_one_line(tiny, tmp_path):
    with pytest.raises(UserError, match="without class-conditioned"):
        sample_cmd.main(["--ckpt", tiny.ckpt, "--digit", "1", "--out_png", str(tmp_path / "x.png")])


def test_eval_generation_report(toy, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gm, "load_judge", lambda folder, names: toy["judge"])
    out = str(tmp_path / "gen.json")
    assert eval_cmd.main(["--ckpt", os.path.join(toy["cfg"].out_dir, "final"), "--bf16", "false", "--generation", "--judge", "J",
                          "--per_class", "8", "--scales", "1,3", "--out", out]) == 0
    rep = json.load(open(out))
    assert list(rep["scales"]) == ["1.0", "3.0"] and rep["real"]["judge"]["accuracy"] == 1.0
    for q in rep["scales"].values():
        assert len(q["judge_per_class"]) == 3 and 0 <= q["precision"] <= 1 and 0 <= q["recall"] <= 1
        assert q["judge_accuracy"] >= 0.6 and len(q["diversity_per_class"]) == 3
    assert rep["codebook_generator"]["judge_accuracy"] >= 0.9
    text = capsys.readouterr().out
    assert "judge accuracy on the real test digits 100.0 %" in text and "guidance" in text
    with pytest.raises(UserError, match="--judge"):
        eval_cmd.main(["--ckpt", os.path.join(toy["cfg"].out_dir, "final"), "--generation"])


def test_generation_compared_with_the_dev_split_reads_no_test_image(toy, tmp_path):
    """--real dev compares drawings with exactly the development images data.prepare writes to dev.jsonl:
    no test image, and the training images it keeps exclude them."""
    from PIL import Image

    from imagegpt.prepare import prepare
    cfg = changed(toy["cfg"], dev_fraction=0.2, data_dir=str(tmp_path / "prepared"))
    prepare(cfg.data)
    dev_files = [json.loads(ln)["meta"]["source"] for ln in open(tmp_path / "prepared" / "dev.jsonl")]
    want = {np.asarray(Image.open(toy["tmp"] / "images" / f)).tobytes() for f in dev_files}
    settings = dict(toy["ck"].settings, dev_fraction=0.2)
    tr, _, dev, dev_labels = real_split(settings, "dev")
    _, _, test, _ = real_split(settings, "test")
    pixels = lambda a: {x.tobytes() for x in a}
    assert pixels(dev) == want and len(dev) == len(dev_files) == 15
    assert not pixels(dev) & pixels(test) and not pixels(dev) & pixels(tr)
    assert len(tr) + len(dev) + len(test) == 90 and sorted(set(dev_labels.tolist())) == [0, 1, 2]
    with pytest.raises(UserError, match="development split"):
        real_split(dict(settings, dev_fraction=0.0), "dev")


# ----------------------------------------------------------------------------- export

def test_model_card_guidance_snippet_runs_with_transformers(toy, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from imagegpt import huggingface, model_card
    out = huggingface.write_export(toy["ck"], str(tmp_path / "hf"))
    card = open(os.path.join(out, "README.md")).read()
    assert "## Draw a chosen class" in card and "<UNK> <IMG>" in card
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    snippet = model_card.GUIDANCE_SNIPPET.format(L=toy["ck"].codebook.seq_len).replace("digit, scale = 7", "digit, scale = 1")
    env = {"model": model, "tok": tok, "torch": torch, "print": lambda *a: None}
    exec(snippet, env)
    ids = env["ids"][0].tolist()
    v = toy["ck"].vocab
    assert ids[:2] == v.cond_prompt(1) and v.is_cond_complete(ids, toy["ck"].codebook.seq_len)
