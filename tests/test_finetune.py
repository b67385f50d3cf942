"""Fine-tuning on other images with other classes: tokenising with a checkpoint's codebook
(codebook_from), starting from the checkpoint (init_from) with its label tokens rebuilt for the new
classes, the refusal of a checkpoint of another codebook, and class names that travel with the
checkpoint into eval.py, sample.py --class, the export and the service."""
import json
import os
import shutil

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import eval as eval_cmd
import hf_export
import sample as sample_cmd
from imagegpt import checkpoint, service
from imagegpt.errors import UserError
from imagegpt.prepare import prepare
from imagegpt.settings import build, changed
from imagegpt.train_config import TrainConfig
from imagegpt.training import train

TEN = [f"k{c}" for c in range(10)]


def write_classes(root, names, per_class, seed):
    """8 x 8 grey images: class c of `names` is a bright 2 x 2 square at one of 10 places (c mod 10), on
    noise, so that any two sets of these images share their patches."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(names):
        os.makedirs(os.path.join(root, name))
        r, col = divmod((3 * c) % 10, 5)
        for i in range(per_class):
            im = (rng.random((8, 8)) * 40).astype(np.uint8)
            y, x = 1 + 3 * r + rng.integers(0, 2), col + rng.integers(0, 2)
            im[y:y + 2, x:x + 2] = 200 + rng.integers(0, 55)
            Image.fromarray(im).save(os.path.join(root, name, f"{i:03d}.png"))


def make_cfg(tmp, name, **kw):
    base = dict(source=f"folder:{tmp / name}", data_dir=str(tmp / f"data-{name}"), out_dir=str(tmp / f"run-{name}"),
                image_size=8, patch_size=2, num_codes=16, kmeans_iters=5, n_layer=2, n_head=2, n_embd=32,
                batch_size=16, epochs=8, lr=3e-3, min_lr=3e-4, warmup_steps=5, eval_every=0, dev_fraction=0.2,
                seed=3, device="cpu", cond_fraction=0.5, cond_drop=0.2, bf16="false")
    return build(TrainConfig, **{**base, **kw})


@pytest.fixture(scope="module")
def ten(tmp_path_factory):
    """A checkpoint trained on 10 classes, and a folder of 3 new classes of the same kind of image."""
    tmp = tmp_path_factory.mktemp("finetune")
    write_classes(tmp / "ten", TEN, 30, seed=0)
    write_classes(tmp / "three", ["alpha", "beta", "gamma"], 30, seed=1)
    cfg = make_cfg(tmp, "ten")
    train(changed(cfg), log=lambda *a: None)
    return dict(tmp=tmp, cfg=cfg, ckpt=os.path.join(cfg.out_dir, "final"))


def first_loss(cfg):
    """The loss of the first training step (the log's first line with eval_every 1)."""
    return json.loads(open(os.path.join(cfg.out_dir, "log.jsonl")).readline())["train_loss"]


@pytest.fixture(scope="module")
def tuned(ten):
    """The 10-class checkpoint fine-tuned on the 3 new classes, tokenised with its codebook, and a fresh
    model trained on the same data for as many steps."""
    tmp, logs = ten["tmp"], []
    cfg = make_cfg(tmp, "three", codebook_from=ten["ckpt"], init_from=ten["ckpt"], epochs=2, eval_every=1,
                   out_dir=str(tmp / "run-tuned"))
    train(changed(cfg), log=logs.append)
    fresh = changed(cfg, init_from="", out_dir=str(tmp / "run-fresh"))
    train(changed(fresh), log=lambda *a: None)
    return dict(cfg=cfg, fresh=fresh, logs=logs, ckpt=os.path.join(cfg.out_dir, "final"))


def test_prepare_with_a_checkpoints_codebook_and_fine_tune_from_it(ten, tuned):
    ck10 = checkpoint.load(ten["ckpt"])
    rep = json.load(open(os.path.join(tuned["cfg"].data.data_dir, "report.json")))
    assert rep["codebook_sha256"] == ck10.codebook.sha256 and rep["classes"] == ["alpha", "beta", "gamma"]
    assert rep["config"]["codebook_from"] == ten["ckpt"] and rep["seconds_fit"] < 1     # nothing fitted
    assert any("its 10 classes replaced by the data's 3 (all new)" in line for line in tuned["logs"])
    # the checkpoint already predicts the codes of the new images: its first loss is far below a fresh model's
    assert first_loss(tuned["cfg"]) < 0.7 * first_loss(tuned["fresh"]), (first_loss(tuned["cfg"]),
                                                                            first_loss(tuned["fresh"]))
    ck3 = checkpoint.load(tuned["ckpt"])
    assert ck3.class_names == ["alpha", "beta", "gamma"] and ck3.vocab.num_classes == 3
    assert ck3.vocab.num_codes == ck10.vocab.num_codes and ck3.codebook.sha256 == ck10.codebook.sha256


def test_new_label_rows_start_at_the_mean_of_the_old_ones_and_kept_classes_keep_theirs(ten):
    from imagegpt.token_format import Vocab
    from imagegpt.finetune import fine_tuned
    ck = checkpoint.load(ten["ckpt"])
    model = fine_tuned(ck, Vocab(16, 3), ["k4", "new", "k0"], seed=0)
    old, new = ck.model.transformer.wte.weight, model.transformer.wte.weight
    lo_old, lo_new = ck.vocab.label_offset, Vocab(16, 3).label_offset
    assert lo_old == lo_new and new.shape[0] == lo_new + 3
    assert (new[:lo_new] == old[:lo_old]).all()                                  # markers and codes kept
    assert (new[lo_new] == old[lo_old + 4]).all() and (new[lo_new + 2] == old[lo_old]).all()   # kept by name
    mean = old[lo_old:lo_old + 10].mean(0)
    assert 0 < (new[lo_new + 1] - mean).norm() < 0.05 * mean.numel() ** 0.5     # the mean, plus a little noise
    for name, p in model.named_parameters():
        if "wte" not in name:
            assert (p == dict(ck.model.named_parameters())[name]).all(), name


def test_a_checkpoint_of_another_codebook_is_refused_in_one_line(ten, tmp_path):
    cfg = make_cfg(ten["tmp"], "three", data_dir=str(tmp_path / "own-codebook"), out_dir=str(tmp_path / "run"),
                   init_from=ten["ckpt"], epochs=1)
    with pytest.raises(UserError) as e:
        train(cfg, log=lambda *a: None)
    msg = str(e.value)
    assert "\n" not in msg and "its codebook is not the one that tokenised" in msg
    assert f"--codebook_from {ten['ckpt']}" in msg and not os.path.exists(os.path.join(tmp_path, "run", "final"))


def test_codebook_from_refuses_other_image_sizes_and_folders_without_a_codebook(ten, tmp_path):
    with pytest.raises(UserError, match=r"its codebook reads 8 x 8 grey images with 1 channel\(s\), not 16 x 16 colour with 3; "
                                        r"add --image_size 8 --channels 1"):
        prepare(changed(make_cfg(ten["tmp"], "three"), image_size=16, channels=3, codebook_from=ten["ckpt"],
                                 data_dir=str(tmp_path / "d")).data)
    with pytest.raises(UserError, match=r"no codebook.json there; .*a run folder: give its final/"):
        prepare(changed(make_cfg(ten["tmp"], "three"), codebook_from=ten["cfg"].out_dir,
                                 data_dir=str(tmp_path / "d")).data)
    assert not os.path.exists(tmp_path / "d")


def test_the_class_names_travel_to_eval_sample_the_export_and_the_service(tuned, tmp_path, capsys):
    ckpt = tuned["ckpt"]
    assert eval_cmd.main(["--ckpt", ckpt, "--out", str(tmp_path / "e.json"), "--bf16", "false"]) == 0
    assert json.load(open(tmp_path / "e.json"))["classes"] == ["alpha", "beta", "gamma"]
    assert "alpha |" in capsys.readouterr().out                                   # the confusion matrix's rows
    assert sample_cmd.main(["--ckpt", ckpt, "--class", "beta", "--num_samples", "3", "--out_png",
                            str(tmp_path / "s.png"), "--out_jsonl", str(tmp_path / "s.jsonl")]) == 0
    recs = [json.loads(line) for line in open(tmp_path / "s.jsonl")]
    assert all(r["meta"]["asked"] == "beta" and r["label"] == 1 for r in recs)
    with pytest.raises(UserError, match=r"--class 'delta': not a class of this checkpoint \(classes: 'alpha', 'beta', 'gamma'; or an index 0 .. 2\)"):
        sample_cmd.main(["--ckpt", ckpt, "--class", "delta", "--out_png", str(tmp_path / "x.png")])
    out = str(tmp_path / "hf")
    assert hf_export.main(["--ckpt", ckpt, "--out", out]) == 0
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["id2label"] == {"0": "alpha", "1": "beta", "2": "gamma"}
    assert "2 `gamma`" in open(os.path.join(out, "README.md")).read()
    assert checkpoint.load(out).class_names == ["alpha", "beta", "gamma"]
    with TestClient(service.create_app(checkpoint.load(ckpt))) as client:
        assert client.get("/healthz").json()["classes"] == ["alpha", "beta", "gamma"]
        r = client.post("/generate", json={"count": 2, "class": "gamma", "seed": 1})
        assert r.status_code == 200 and all(s["label"] == 2 for s in r.json()["samples"])
        assert client.post("/generate", json={"count": 1, "class": 1}).status_code == 200
        r = client.post("/generate", json={"count": 1, "class": "delta"})
        assert r.status_code == 422 and "not a class of this checkpoint" in r.json()["detail"]


def test_a_checkpoint_away_from_its_data_folder_still_names_its_classes(tuned, tmp_path):
    moved = tmp_path / "elsewhere" / "final"
    shutil.copytree(tuned["ckpt"], moved)
    cfg = json.load(open(moved / "config.json"))
    cfg["train"]["data_dir"] = str(tmp_path / "no-such-folder")
    json.dump(cfg, open(moved / "config.json", "w"))
    assert checkpoint.load(str(moved)).class_names == ["alpha", "beta", "gamma"]
    cfg["classes"] = ["alpha", "alpha", "gamma"]     # damaged: one line, never '0', '1', ... in silence
    json.dump(cfg, open(moved / "config.json", "w"))
    with pytest.raises(UserError, match=r"config.json: classes is .*expected 3 distinct class names"):
        checkpoint.load(str(moved))


def test_class_list_in_messages_is_quoted_and_bounded():
    from imagegpt.token_format import list_classes
    assert list_classes(["a b", "c"]) == "'a b', 'c'"
    many = list_classes([f"class {i}" for i in range(1000)])
    assert many.startswith("'class 0', 'class 1'") and many.endswith("'class 11', ... (1000 in all)")
