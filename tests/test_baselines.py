"""Baselines: each classifier learns a toy problem and is deterministic, k-NN and logistic regression agree
with scikit-learn, the CNN's files round-trip and refuse corruption, baselines.py runs end to end, and no
decision of the protocol reads the test split."""
import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from fixtures import ROOT, write_images

from imagegpt import baseline_protocol as suite_mod
from imagegpt import classifiers as clf
from imagegpt.data_config import DataConfig
from imagegpt.errors import UserError
from imagegpt.settings import build
from imagegpt.stats import seed_summary, t975, wilson_interval


def toy(n=90, size=12, seed=0, noise=60):
    """uint8 images (n, size, size, 1), labels (n,): class c (0..2) is a bright 3x3 square in row band c,
    at a random column, on noise."""
    rng = np.random.default_rng(seed)
    images = (rng.random((n, size, size, 1)) * noise).astype(np.uint8)
    labels = np.arange(n) % 3
    for i, c in enumerate(labels):
        r, col = 4 * c + rng.integers(0, 2), rng.integers(0, size - 3)
        images[i, r:r + 3, col:col + 3] = 200 + rng.integers(0, 55)
    return images, labels


def toy_tensors(n, seed):
    images, labels = toy(n, seed=seed)
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(labels)


ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")   # tiny tensors: a second thread only adds waiting


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


CNN12 = clf.CNNConfig(channels=1, image_size=12, num_classes=3)
SHORT = clf.CNNTraining(epochs=12, batch_size=16, lr=3e-3, warmup_steps=5)


# ----------------------------------------------------------------------------- each classifier learns, deterministically

def test_knn_learns_the_toy_problem():
    xtr, ytr = toy_tensors(90, 0)
    xte, yte = toy_tensors(60, 1)
    for metric in clf.METRICS:
        pred = clf.knn_predict(xtr, ytr, xte, 1, metric, 3)
        assert (pred == yte).float().mean() >= 0.9, metric
        assert torch.equal(pred, clf.knn_predict(xtr, ytr, xte, 1, metric, 3))


def test_knn_vote_breaks_class_ties_towards_the_smallest_class():
    ref_labels = torch.tensor([2, 1, 1, 2])
    neighbours = torch.tensor([[0, 1], [3, 2], [1, 2]])   # votes: {2, 1}, {2, 1}, {1, 1}
    assert clf.knn_vote(ref_labels, neighbours, 2, 3).tolist() == [1, 1, 1]
    assert clf.knn_vote(ref_labels, neighbours, 1, 3).tolist() == [2, 2, 1]


def test_logreg_learns_the_toy_problem_and_is_deterministic():
    xtr, ytr = toy_tensors(90, 0)
    xte, yte = toy_tensors(60, 1)
    a = clf.fit_logreg(xtr, ytr, 3, 1e-3)
    b = clf.fit_logreg(xtr, ytr, 3, 1e-3)
    assert (a.predict(xte) == yte).float().mean() >= 0.9
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_cnn_learns_the_toy_problem_and_is_deterministic_for_a_seed():
    xtr, ytr = toy_tensors(90, 0)
    xte, yte = toy_tensors(60, 1)
    rng_before = torch.get_rng_state()
    a = clf.train_cnn(xtr, ytr, CNN12, SHORT, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)      # the global RNG is left alone
    b = clf.train_cnn(xtr, ytr, CNN12, SHORT, seed=3)
    c = clf.train_cnn(xtr, ytr, CNN12, SHORT, seed=4)
    assert (clf.cnn_predict(a, xte) == yte).float().mean() >= 0.9
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_lenet_has_the_lenet5_size_on_digits_and_refuses_tiny_images():
    assert sum(p.numel() for p in clf.LeNet(clf.CNNConfig()).parameters()) == 61706
    with pytest.raises(UserError, match="at least 12 x 12"):
        clf.LeNet(clf.CNNConfig(image_size=8))


# ----------------------------------------------------------------------------- agreement with scikit-learn

def test_knn_agrees_with_scikit_learn():
    from sklearn.neighbors import KNeighborsClassifier
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(80, 1, 4, 5, generator=g)
    ref_y = torch.randint(0, 4, (80,), generator=g)
    query = torch.rand(40, 1, 4, 5, generator=g)
    for metric, sk_metric in (("l2", "euclidean"), ("cosine", "cosine")):
        for k in (1, 3, 4, 7):
            ours = clf.knn_predict(ref, ref_y, query, k, metric, 4)
            sk = KNeighborsClassifier(k, metric=sk_metric, algorithm="brute").fit(
                ref.flatten(1).numpy(), ref_y.numpy()).predict(query.flatten(1).numpy())
            assert ours.tolist() == sk.tolist(), (metric, k)


def test_logreg_agrees_with_scikit_learn():
    from sklearn.linear_model import LogisticRegression
    g = torch.Generator().manual_seed(1)
    x = torch.rand(120, 1, 3, 4, generator=g)
    y = (x.flatten(1)[:, :3].argmax(1) + (torch.rand(120, generator=g) < 0.2).long()) % 3  # noisy, not separable
    l2 = 1e-2
    ours = clf.fit_logreg(x, y, 3, l2)
    sk = LogisticRegression(C=1 / (l2 * len(x)), tol=1e-10, max_iter=10000).fit(x.flatten(1).double().numpy(), y.numpy())
    assert np.allclose(ours.weight.numpy(), sk.coef_, atol=1e-4)
    assert np.allclose(ours.bias.numpy(), sk.intercept_, atol=1e-4)
    assert np.allclose(torch.softmax(ours.logits(x), 1).numpy(), sk.predict_proba(x.flatten(1).double().numpy()), atol=1e-5)


# ----------------------------------------------------------------------------- the CNN's files

def trained_cnn():
    xtr, ytr = toy_tensors(60, 0)
    return clf.train_cnn(xtr, ytr, CNN12, replace(SHORT, epochs=1), seed=0)


def test_cnn_round_trip_gives_identical_predictions(tmp_path):
    model = trained_cnn()
    clf.save_cnn(model, str(tmp_path / "judge"), ["a", "b", "c"], info={"test_accuracy": 0.5})
    loaded, meta = clf.load_cnn(str(tmp_path / "judge"))
    x, _ = toy_tensors(30, 5)
    assert torch.equal(clf.cnn_logits(model, x), clf.cnn_logits(loaded, x))
    assert meta["class_names"] == ["a", "b", "c"] and meta["info"]["test_accuracy"] == 0.5
    assert sorted(os.listdir(tmp_path / "judge")) == ["cnn.json", "cnn.safetensors"]


def one_line_error(folder, match):
    with pytest.raises(UserError, match=match) as e:
        clf.load_cnn(str(folder))
    assert "\n" not in str(e.value)


def test_corrupt_cnn_files_are_one_line_errors(tmp_path):
    folder = tmp_path / "judge"
    clf.save_cnn(trained_cnn(), str(folder))
    weights = (folder / "cnn.safetensors").read_bytes()
    meta = json.loads((folder / "cnn.json").read_text())

    (folder / "cnn.safetensors").write_bytes(weights[:len(weights) // 2])        # truncated
    one_line_error(folder, "not a readable safetensors file")
    (folder / "cnn.safetensors").write_bytes(b"\x80\x04" + weights[2:])          # a pickle's first bytes
    one_line_error(folder, "pickle")
    (folder / "cnn.safetensors").write_bytes(weights)
    clf.load_cnn(str(folder))                                                    # intact again

    (folder / "cnn.json").write_text(json.dumps(dict(meta, architecture=dict(meta["architecture"], fc1=64))))
    one_line_error(folder, r"fc1\.(weight|bias) is .* needs float")                       # weights do not fit
    (folder / "cnn.json").write_text(json.dumps(dict(meta, architecture=dict(meta["architecture"], conv1="6"))))
    one_line_error(folder, "architecture")
    (folder / "cnn.json").write_text(json.dumps(dict(meta, class_names=["x"])))
    one_line_error(folder, "class_names")
    (folder / "cnn.json").write_text(json.dumps(dict(meta, format="something else")))
    one_line_error(folder, "not a CNN file")
    (folder / "cnn.json").write_text("{broken")
    one_line_error(folder, "invalid JSON")
    os.remove(folder / "cnn.json")
    one_line_error(folder, "no such cnn.json")
    one_line_error(tmp_path / "nowhere", "no such folder")


# ----------------------------------------------------------------------------- statistics

def test_seed_summary_and_intervals():
    s = seed_summary([0.97, 0.98, 0.99])
    assert s["mean"] == pytest.approx(0.98) and s["std"] == pytest.approx(0.01)
    assert s["ci95"] == pytest.approx([0.98 - 4.3027 * 0.01 / 3 ** 0.5, 0.98 + 4.3027 * 0.01 / 3 ** 0.5])
    assert seed_summary([0.5])["ci95"] is None
    assert t975(40) == pytest.approx(2.0211, abs=2e-4) and t975(120) == pytest.approx(1.9799, abs=2e-4)
    lo, hi = wilson_interval(985, 1000)
    assert lo == pytest.approx(0.9754, abs=2e-4) and hi == pytest.approx(0.9909, abs=2e-4)


# ----------------------------------------------------------------------------- the protocol: no decision reads test

TINY = build(DataConfig, source="toy", image_size=12, augment=1, num_codes=8, fit_samples=2000, kmeans_iters=3)


def tiny_suite():
    suite, cfg = suite_mod.quick(suite_mod.SuiteConfig(seeds=1), TINY)
    return replace(suite, cnn=replace(suite.cnn, epochs=1)), cfg


def decisions(report):
    """Everything the protocol decides or measures before the test split: per baseline and run, the chosen
    setting, the dev accuracy and the whole dev table."""
    return {name: [(json.dumps(r["params"], sort_keys=True), r["dev_accuracy"],
                    json.dumps(r.get("dev_table"), sort_keys=True)) for r in res["runs"]]
            for name, res in report["baselines"].items()}


def run(images, labels, roles):
    suite, cfg = tiny_suite()
    return suite_mod.run_baselines(images, labels, ["a", "b", "c"], cfg, suite, roles=roles)


def poisoned(images, labels, test):
    """The same data with every test label wrong, and with the test images replaced by noise."""
    bad_labels = labels.copy()
    bad_labels[test] = (labels[test] + 1) % 3
    bad_images = images.copy()
    bad_images[test] = np.random.default_rng(9).integers(0, 256, bad_images[test].shape, dtype=np.uint8)
    return (images, bad_labels), (bad_images, labels)


def test_no_decision_reads_the_test_split():
    """The split is made once from the true labels (a stratified split is defined by them); given it, the
    baselines are run on the data as it is, with every test label wrong, and with noise for test images."""
    images, labels = toy(120, noise=150)
    roles = suite_mod.project_split(labels, TINY, 0.2)
    clean, clean_pred = run(images, labels, roles)
    (i1, l1), (i2, l2) = poisoned(images, labels, roles["test"])
    wrong_labels, wrong_labels_pred = run(i1, l1, roles)
    noise_images, _ = run(i2, l2, roles)
    assert decisions(wrong_labels) == decisions(clean)
    assert decisions(noise_images) == decisions(clean)         # e.g. the codebook never saw a test image
    for name in clean_pred:                                     # the same models: the same test predictions,
        assert all(torch.equal(a, b) for a, b in zip(clean_pred[name], wrong_labels_pred[name]))
        # scored against the labels given
        for labels_, report in ((labels, clean), (l1, wrong_labels)):
            want = (clean_pred[name][0].numpy() == labels_[roles["test"]]).mean()
            assert report["baselines"][name]["test_accuracy"]["mean"] == pytest.approx(want)
    assert clean["baselines"]["knn_pixels"]["test_accuracy"]["mean"] >= 0.8
    assert set(clean["baselines"]) == {"knn_pixels", "knn_pixels_augmented", "logreg_pixels",
                                       "knn_reconstructions", "cnn", "cnn_tta", "cnn_on_reconstructions"}


def test_the_check_catches_a_protocol_that_reads_test():
    """The same comparisons, for a protocol that uses the test images as its dev split, must differ: the
    test above can fail."""
    images, labels = toy(120, noise=150)
    roles = suite_mod.project_split(labels, TINY, 0.2)
    leaky = dict(roles, dev=roles["test"])
    clean, _ = run(images, labels, leaky)
    (i1, l1), (i2, l2) = poisoned(images, labels, roles["test"])
    assert decisions(run(i1, l1, leaky)[0]) != decisions(clean)
    assert decisions(run(i2, l2, leaky)[0]) != decisions(clean)


# ----------------------------------------------------------------------------- the command

def test_baselines_command_runs_end_to_end(tmp_path):
    write_images(str(tmp_path / "imgs"), n=60, size=12)
    out, judge = tmp_path / "b.json", tmp_path / "judge"
    r = subprocess.run([sys.executable, "baselines.py", "--source", f"folder:{tmp_path / 'imgs'}", "--quick",
                        "--seeds", "2", "--image_size", "12", "--num_codes", "8", "--augment", "1", "--epochs", "1",
                        "--out", str(out), "--save_judge", str(judge)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["counts"] == {"train": 48, "fit": 39, "dev": 9, "test": 12}
    assert report["seeds"] == [0, 1] and len(report["baselines"]["cnn"]["runs"]) == 2
    assert report["baselines"]["knn_pixels"]["test_accuracy"]["n"] == 1
    assert "| k-NN on raw pixels |" in r.stdout and "| LeNet-5-like CNN" in r.stdout
    model, meta = clf.load_cnn(str(judge))
    assert meta["class_names"] == ["c0", "c1", "c2"] and model.cfg.image_size == 12


def test_baselines_command_bad_input_is_one_line(tmp_path):
    for args, match in ((["--source", f"folder:{tmp_path / 'none'}"], "no such folder"),
                        (["--seeds", "0"], "--seeds must be at least 1"),
                        (["--out", str(tmp_path)], "is a folder"),
                        (["--nonsense", "1"], "unrecognized arguments: --nonsense 1")):
        r = subprocess.run([sys.executable, "baselines.py", *args], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env=ONE_THREAD)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.strip().count("\n") == 0 and match in r.stderr, (args, r.stderr)


def test_tokenisation_table_reads_no_test_image(tmp_path):
    """Each row fits a codebook on the fitting images only and measures the development images; the
    test images never enter (replacing them by noise changes nothing), and the figures are real:
    finer patches reconstruct better and make longer sequences."""
    images, labels = toy(n=90, size=12)
    cfg = build(DataConfig, image_size=12, num_codes=8, kmeans_iters=3, fit_samples=5000)
    rows = [("p2", {"patch_size": 2}), ("p4", {"patch_size": 4})]
    a = suite_mod.tokenisation_table(images, labels, cfg, 0.25, rows=rows, progress=False)
    test = suite_mod.project_split(labels, cfg, 0.25)["test"]
    noisy = images.copy()
    noisy[test] = np.random.default_rng(1).integers(0, 256, noisy[test].shape, dtype=np.uint8)
    b = suite_mod.tokenisation_table(noisy, labels, cfg, 0.25, rows=rows, progress=False)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]
    assert strip(a) == strip(b)
    p2, p4 = a
    assert (p2["tokens_per_image"], p4["tokens_per_image"]) == (36 + 5, 9 + 5)
    assert p2["dev_psnr_db"] > p4["dev_psnr_db"] and 0 < p4["knn1_reconstructions"] <= 1
    assert p2["distinct_images"] == len(set(map(bytes, images[np.setdiff1d(np.arange(90), test)])))
    assert "| p2 | 41 |" in suite_mod.tokenisation_markdown(a)


def test_tokenisation_command(tmp_path):
    write_images(str(tmp_path / "imgs"), n=60, size=28)
    out = tmp_path / "tok.json"
    r = subprocess.run([sys.executable, "baselines.py", "--tokenisation", "--quick", "--source",
                        f"folder:{tmp_path / 'imgs'}", "--num_codes", "16", "--kmeans_iters", "3",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.load(open(out))["rows"]
    assert [x["tokens_per_image"] for x in rows] == [201, 54, 21] and "| setting |" in r.stdout


def test_the_codebook_rows_use_the_configured_kind_of_codebook():
    """With palette > 0 the codebook baselines read the palette codebook's reconstructions (shape apart from
    colour), as the GPT's tokens are, not a patch codebook of the same sizes."""
    from tokenizer import Codebook, PaletteCodebook
    x = torch.rand(40, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cfg = build(DataConfig, channels=3, image_size=8, patch_size=4, num_codes=8, palette=4, kmeans_iters=2)
    assert isinstance(suite_mod.fit_codebook(x, cfg, seed=0), PaletteCodebook)
    assert isinstance(suite_mod.fit_codebook(x, replace(cfg, codebook=replace(cfg.codebook, palette=0)), seed=0),
                      Codebook)
