"""Training loop: the loss, truncation, resuming, Ctrl-C, DDP through torchrun, config errors and
checkpoint folders. Everything runs on a tiny image folder written here (60 grey 8x8 images, 3
classes, 2x2 patches, 8 codes: 21-token sequences) and tiny models (2 layers, 2 heads, 32 wide)."""
import contextlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fixtures import ROOT, write_images

from imagegpt import checkpoint
from imagegpt import finetune, optimizer, seed_runs, train_data
from imagegpt import training as train_mod
from imagegpt.data_config import check_data_config
from imagegpt.errors import UserError
from imagegpt.metrics import evaluate
from imagegpt.sequences import make_batch, read_sequences
from imagegpt.settings import build, changed, flat, names
from imagegpt.token_format import Vocab
from imagegpt.train_config import TrainConfig, load_config
from imagegpt.train_data import load_split
from imagegpt.training import train
from model import GPT, GPTConfig

N_IMAGES, STEPS_PER_EPOCH = 80, 6   # 48 train / 17 dev / 15 test sequences, batches of 8
CKPT_FILES = ["model.safetensors", "config.json", "vocab.json", "codebook.json", "codebook.safetensors",
              "metrics.json"]
LOGGED = ["step", "epoch", "tokens", "lr", "train_loss", "dev_loss", "dev_perplexity", "dev_token_accuracy",
          "dev_image_perplexity", "dev_accuracy"]   # every field of a log line except the wall-clock time


def make_cfg(tmp, out, **kw):
    base = dict(source=f"folder:{tmp / 'images'}", data_dir=str(tmp / "prepared"), image_size=8, patch_size=2,
                num_codes=8, kmeans_iters=3, out_dir=str(tmp / out), n_layer=2, n_head=2, n_embd=32,
                max_length=32, batch_size=8, epochs=3, lr=1e-3, min_lr=1e-4, warmup_steps=3, eval_every=4,
                seed=1, device="cpu", dev_fraction=0.25, bf16="false")   # fp32: exact comparisons
    return build(TrainConfig, **{**base, **kw})


def cli_args(cfg):
    """The non-default fields of a TrainConfig as --key value pairs."""
    default = flat(TrainConfig())
    return [a for k, v in flat(cfg).items() if v != default[k] for a in (f"--{k}", str(v))]


def read_log(cfg):
    with open(os.path.join(cfg.out_dir, "log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def weights(folder):
    return checkpoint.load(folder).model.state_dict()


def run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, **kw)


def stop_after(n):
    """A stand-in for trainer.StopFlag whose flag goes up when the loop asks for the (n+1)-th time,
    i.e. after n optimizer steps: an interruption at an exact step, without signals."""
    class Stop:
        reads = 0

        @property
        def set(self):
            Stop.reads += 1
            return Stop.reads > n

        def restore(self):
            pass
    return Stop


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """The reference run (3 epochs = 18 steps, evaluations every 4 steps and at the end). train()
    prepares the image folder itself. A spy on checkpoint.save records, at each save, the logits of the
    very model object being saved on a fixed probe batch."""
    tmp = tmp_path_factory.mktemp("train")
    write_images(tmp / "images", n=N_IMAGES)
    cfg = make_cfg(tmp, "a")
    probe = torch.randint(0, 6 + 8 + 3, (3, 21), generator=torch.Generator().manual_seed(0))
    seen = {}
    real_save = checkpoint.save

    def spy(folder, model, *a, **k):
        with torch.no_grad():
            seen[os.path.basename(folder)] = checkpoint.raw_model(model).eval()(probe)[0].clone()
        model.train()
        return real_save(folder, model, *a, **k)

    lines = []
    mp = pytest.MonkeyPatch()
    mp.setattr(checkpoint, "save", spy)
    try:
        before = signal.getsignal(signal.SIGINT)
        out = train(changed(cfg), log=lines.append)
        after = signal.getsignal(signal.SIGINT)
    finally:
        mp.undo()
    return dict(tmp=tmp, cfg=cfg, out=out, log=read_log(cfg), lines=lines, probe=probe, seen=seen,
                handlers=(before, after))


# ----------------------------------------------------------------------------- the loss

def test_run_a_trains_and_logs(run_a):
    cfg, out, log = run_a["cfg"], run_a["out"], run_a["log"]
    assert os.path.exists(os.path.join(cfg.data.data_dir, "report.json"))   # prepared by train()
    assert out["step"] == 3 * STEPS_PER_EPOCH
    assert [r["step"] for r in log] == [4, 8, 12, 16, 18]
    assert log[-1]["tokens"] == 18 * 8 * 20                             # 20 scored tokens per sequence
    assert all(r["train_loss"] is not None and np.isfinite(r["train_loss"]) for r in log)
    assert log[-1]["dev_loss"] < log[0]["dev_loss"]
    assert any("parameters" in str(line) for line in run_a["lines"])
    assert run_a["handlers"][0] == run_a["handlers"][1], "train() must put the SIGINT handler back"


def test_no_training_decision_reads_the_test_split(run_a, tmp_path):
    """The test split (test.jsonl) is replaced by garbage: training must not notice. The evaluations
    (curves), best/ (the checkpoint choice) and final/ are those of the run with the real file."""
    cfg = run_a["cfg"]
    data = tmp_path / "prepared"
    shutil.copytree(cfg.data.data_dir, data)
    (data / "test.jsonl").write_text("not a sequence file\n")
    cfg2 = changed(cfg, data_dir=str(data), out_dir=str(tmp_path / "run"))
    train(cfg2, log=lambda *a: None)
    assert [[r[k] for k in LOGGED] for r in read_log(cfg2)] == [[r[k] for k in LOGGED] for r in run_a["log"]]
    for name in ("best", "final"):
        a, b = weights(os.path.join(cfg.out_dir, name)), weights(os.path.join(cfg2.out_dir, name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    best = json.load(open(os.path.join(cfg2.out_dir, "best", "metrics.json")))
    assert best["split"] == "dev" and best["chosen"].startswith("best: the highest development-split accuracy")


def test_make_batch_scores_real_tokens_once(run_a):
    """One shift, pads never scored: the model's loss on a padded batch equals the cross entropy of
    each sequence on its own, over its real next tokens only."""
    cfg = run_a["cfg"]
    vocab = Vocab.load(os.path.join(cfg.data.data_dir, "vocab.json"))
    seqs, labels = read_sequences(os.path.join(cfg.data.data_dir, "test.jsonl"), vocab)
    seqs = [s[:1 + k] + s[-4:] for s, k in zip(seqs[:4], (16, 3, 9, 0))]   # different lengths -> padding
    x, y, cls_pos = make_batch(seqs, 64, vocab.pad_id)
    assert x.shape == y.shape == (4, 20)
    for i, s in enumerate(seqs):
        n = len(s) - 1
        assert x[i, :n].tolist() == s[:-1] and y[i, :n].tolist() == s[1:]
        assert torch.equal(y[i, :n - 1], x[i, 1:n])                      # y[:, t] == x[:, t + 1]
        assert (x[i, n:] == vocab.pad_id).all() and (y[i, n:] == -100).all()
        assert x[i, cls_pos[i]] == vocab.cls_id and y[i, cls_pos[i]] == vocab.label_id(labels[i])
        assert y[i, n - 1] == vocab.eos_id
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(vocab), block_size=32, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        _, loss = model(x, y)
        ce, count = 0.0, 0
        for s in seqs:
            t = torch.tensor(s)
            logits, _ = model(t[None, :-1])
            ce += F.cross_entropy(logits[0], t[1:], reduction="sum").item()
            count += len(s) - 1
    assert count == (y != -100).sum()
    assert loss.item() == pytest.approx(ce / count, rel=1e-5)


def test_train_loss_is_the_weighted_mean_over_real_tokens(run_a):
    """The first logged train loss equals the cross entropy of the untrained model on the first global
    batch, over real next tokens, with the label token weighted by label_weight."""
    cfg = make_cfg(run_a["tmp"], "lw", epochs=1, eval_every=1, label_weight=3.0)
    train(changed(cfg), log=lambda *a: None)
    first = read_log(cfg)[0]
    vocab = Vocab.load(os.path.join(cfg.data.data_dir, "vocab.json"))
    x, y, cls_pos = load_split(cfg, "train", vocab)
    torch.manual_seed(cfg.seed)
    data = train_data.Data(vocab, None, None, None, cfg.max_length, cfg.max_length, None)
    model = finetune.build_model(cfg, data, print)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.batch_size]
    with torch.no_grad():
        logits, _ = model(x[idx])
    ce = F.cross_entropy(logits.transpose(1, 2), y[idx], ignore_index=-100, reduction="none")
    w = (y[idx] != -100).float()
    w[torch.arange(len(idx)), cls_pos[idx]] = 3.0
    assert first["step"] == 1
    assert first["train_loss"] == pytest.approx(((ce * w).sum() / w.sum()).item(), rel=1e-5)


def test_bf16_auto_trains_in_bf16_where_the_cpu_has_it(run_a):
    """bf16 "auto" (the default) autocasts to bf16 on a CPU with bf16 instructions (and keeps fp32 where
    oneDNN would only emulate them); "true" insists: the first training loss is the fp32 one to bf16
    precision, not bit for bit; "false" keeps fp32."""
    from imagegpt.device import bf16_autocast, native_cpu_bf16
    assert isinstance(bf16_autocast("false", "cpu"), contextlib.nullcontext)
    with pytest.raises(UserError, match="expected auto, true or false"):
        bf16_autocast("maybe", "cpu")
    losses = {}
    modes = ("false", "auto", "true") if torch.ops.mkldnn._is_mkldnn_bf16_supported() else ("false", "auto")
    for mode in modes:
        cfg = make_cfg(run_a["tmp"], f"prec-{mode}", epochs=1, eval_every=1, bf16=mode)
        train(changed(cfg), log=lambda *a: None)
        losses[mode] = read_log(cfg)[0]["train_loss"]
    if "true" in losses:   # bf16 kernels, native or emulated
        assert losses["true"] != losses["false"] and losses["true"] == pytest.approx(losses["false"], rel=1e-2)
    assert losses["auto"] == (losses["true"] if native_cpu_bf16() else losses["false"])


def test_truncation_keeps_the_label_tail(run_a):
    cfg = make_cfg(run_a["tmp"], "short", max_length=12, allow_truncation=True, epochs=1, eval_every=0)
    out = train(changed(cfg), log=lambda *a: None)
    assert out["step"] == STEPS_PER_EPOCH
    vocab = Vocab.load(os.path.join(cfg.data.data_dir, "vocab.json"))
    full, labels = read_sequences(os.path.join(cfg.data.data_dir, "train.jsonl"), vocab)
    assert len(full[0]) == 21 > cfg.max_length
    x, y, cls_pos = load_split(cfg, "train", vocab)
    assert x.shape == (len(full), 11) and (cls_pos == 9).all()
    rows = torch.arange(len(x))
    assert (y[rows, cls_pos] == torch.tensor([vocab.label_id(c) for c in labels])).all()
    assert (x[rows, cls_pos] == vocab.cls_id).all() and (x[:, 8] == vocab.img_end_id).all()
    assert (y[:, -1] == vocab.eos_id).all() and (y != -100).all()
    assert x[:, :8].tolist() == [s[:8] for s in full]                  # <IMG> and the first 7 codes stay
    ck = checkpoint.load(os.path.join(cfg.out_dir, "final"))
    model = ck.model
    assert model.config.block_size == 12
    assert ck.metrics["n_sequences"] == 17 and ck.metrics["split"] == "dev" and 0 <= ck.metrics["accuracy"] <= 1


def test_grad_accum_matches_a_bigger_batch(run_a):
    """batch_size 4 x grad_accum 2 is the same optimizer step as batch_size 8 (up to summation order)."""
    cfg = make_cfg(run_a["tmp"], "accum", batch_size=4, grad_accum=2)
    train(changed(cfg), log=lambda *a: None)
    got, want = read_log(cfg), run_a["log"]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        for k in ("train_loss", "dev_loss"):
            assert g[k] == pytest.approx(w[k], rel=1e-5), k


# ----------------------------------------------------------------------------- resuming

@pytest.mark.parametrize("stop_at,ema", [(5, 0.0), (8, 0.0), (5, 0.8)])   # between two evaluations, right after one
def test_resume_continues_exactly(run_a, monkeypatch, stop_at, ema):
    """A run interrupted after `stop_at` steps and resumed logs the same losses and ends with the same
    weights, bit for bit, as the same run left alone (dropout on, so the RNG state must come back too;
    with a weight average, both the average and the trained weights)."""
    tmp = run_a["tmp"]
    whole = make_cfg(tmp, f"whole{stop_at}-{ema}", dropout=0.1, ema=ema)
    train(changed(whole), log=lambda *a: None)
    cut = make_cfg(tmp, f"cut{stop_at}-{ema}", dropout=0.1, ema=ema)
    monkeypatch.setattr(train_mod, "StopFlag", stop_after(stop_at))
    lines = []
    out = train(changed(cut), log=lines.append)
    assert out["step"] == stop_at
    assert any("interrupted" in str(line) and "--resume" in str(line) for line in lines)
    state = checkpoint.load_trainer_state(os.path.join(cut.out_dir, "final"))
    assert state["step"] == stop_at and not state["done"]
    log_cut = read_log(cut)
    assert [r["step"] for r in log_cut] == ([4] if stop_at < 8 else [4, 8])  # no line for the interruption
    monkeypatch.undo()

    out = train(changed(cut), resume=True, log=lines.append)
    assert out["step"] == 3 * STEPS_PER_EPOCH
    assert any("resumed" in str(line) and f"at step {stop_at}" in str(line) for line in lines)
    a = {r["step"]: r for r in read_log(whole)}
    b = read_log(cut)
    assert b[:len(log_cut)] == log_cut                                      # the lines before it are kept
    after = [r for r in b if r["step"] > stop_at]
    assert [r["step"] for r in after] == [s for s in a if s > stop_at]
    for r in after:
        assert {k: r[k] for k in LOGGED} == {k: a[r["step"]][k] for k in LOGGED}
    wa, wb = weights(os.path.join(whole.out_dir, "final")), weights(os.path.join(cut.out_dir, "final"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa = checkpoint.load_trainer_state(os.path.join(whole.out_dir, "final"))
    sb = checkpoint.load_trainer_state(os.path.join(cut.out_dir, "final"))
    assert sb["done"] and sb["step"] == sa["step"] and sb["tokens"] == sa["tokens"]
    assert torch.equal(sa["rng"], sb["rng"])
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert ("weights" in sa) == (ema > 0) and ("weights" in sb) == (ema > 0)
    if ema:
        assert all(torch.equal(sa["weights"][k], sb["weights"][k]) for k in sa["weights"])


def test_weight_average_is_evaluated_and_saved_without_changing_training(run_a, tmp_path):
    """With ema, the optimizer's trajectory is run_a's, bit for bit (the trainer state keeps those
    weights); final/ and the logged dev metrics are the average's: the average computed here from
    the trained weights of every step, and the metrics of the loaded final/."""
    steps = []
    real_update = optimizer.WeightAverage.update

    def spy(self, model, step):
        steps.append([p.detach().clone() for p in model.parameters()])
        return real_update(self, model, step)

    cfg = replace(run_a["cfg"], out_dir=str(tmp_path / "ema"), ema=0.8)
    mp = pytest.MonkeyPatch()
    mp.setattr(optimizer.WeightAverage, "update", spy)
    try:
        train(changed(cfg), log=lambda *a: None)
    finally:
        mp.undo()
    final = os.path.join(cfg.out_dir, "final")
    state = checkpoint.load_trainer_state(final)
    plain = weights(os.path.join(run_a["cfg"].out_dir, "final"))
    assert all(torch.equal(state["weights"][k], plain[k]) for k in state["weights"])   # training unchanged
    model = checkpoint.load(final).model
    avg = None
    for t, ws in enumerate(steps, start=1):   # the definition, step by step, from the first weights
        d = min(0.8, (1 + t) / (10 + t))
        avg = [w.clone() for w in ws] if avg is None else [a + (1 - d) * (w - a) for a, w in zip(avg, ws)]
    assert len(steps) == 3 * STEPS_PER_EPOCH
    for a, p in zip(avg, model.parameters()):
        assert torch.allclose(a, p, atol=1e-6)
    assert any(not torch.equal(p, plain[n]) for n, p in model.state_dict().items() if n in plain)
    log = read_log(cfg)
    ck = checkpoint.load(final)
    dev = load_split(cfg, "dev", ck.vocab)
    m = evaluate(ck, dev)
    assert m["loss"] == pytest.approx(log[-1]["dev_loss"], rel=1e-5)
    assert json.load(open(os.path.join(final, "metrics.json")))["weights"].startswith("exponential moving average")


def test_resume_without_a_checkpoint_is_a_user_error(run_a):
    with pytest.raises(UserError, match="trainer_state.pt: missing"):
        train(make_cfg(run_a["tmp"], "nothing"), resume=True, log=lambda *a: None)


def test_sigint_saves_and_resume_finishes(run_a, tmp_path):
    """A real Ctrl-C to `python train.py CONFIG --key value`: exit 0, final/ loadable, --resume ends it."""
    cfg = make_cfg(run_a["tmp"], "", out_dir=str(tmp_path / "run"), epochs=1000, eval_every=5)
    yaml_path = tmp_path / "cfg.yaml"
    over = {"out_dir", "eval_every"}   # these two come from the command line, the rest from the file
    yaml_path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in flat(cfg).items() if k not in over))
    args = [sys.executable, "train.py", str(yaml_path), "--out_dir", cfg.out_dir, "--eval_every", "5"]
    log_path = tmp_path / "run" / "log.jsonl"
    with open(tmp_path / "stdout", "w") as so, open(tmp_path / "stderr", "w") as se:
        p = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=so, stderr=se)
        try:
            deadline = time.time() + 120
            while not (log_path.exists() and log_path.read_text().strip()) and p.poll() is None:
                assert time.time() < deadline, "no training progress within 120 s"
                time.sleep(0.05)
            p.send_signal(signal.SIGINT)
            rc = p.wait(timeout=120)
        finally:
            if p.poll() is None:
                p.kill()
    err = (tmp_path / "stderr").read_text()
    assert rc == 0, err[-2000:]
    assert "Traceback" not in err
    assert "interrupted: saved" in (tmp_path / "stdout").read_text()
    final = os.path.join(cfg.out_dir, "final")
    state = checkpoint.load_trainer_state(final)
    stopped = state["step"]
    assert 5 <= stopped < 1000 * STEPS_PER_EPOCH and not state["done"]
    checkpoint.load(final)
    last = read_log(cfg)[-1]["step"]   # the interruption itself writes no log line
    assert last % 5 == 0 and stopped - 5 < last <= stopped
    # resume, with fewer epochs so that it ends soon
    epochs = stopped // STEPS_PER_EPOCH + 1
    r = run(args + ["--resume", "--allow_changes", "--epochs", str(epochs)])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resumed {final} at step {stopped}" in r.stdout
    assert f"resuming with changed settings (--allow_changes): epochs 1000 -> {epochs}" in r.stdout
    state = checkpoint.load_trainer_state(final)
    assert state["done"] and state["step"] == epochs * STEPS_PER_EPOCH
    steps = [rec["step"] for rec in read_log(cfg)]
    assert steps[-1] == epochs * STEPS_PER_EPOCH and steps == sorted(set(steps))


# ----------------------------------------------------------------------------- DDP

def test_torchrun_two_processes_match_one(run_a, tmp_path):
    """torchrun with 2 CPU processes (gloo) and batch_size 4 each = run A (one process, batch_size 8):
    the same logged losses and the same final weights up to float summation order. Not skipped: it
    runs everywhere the test suite runs."""
    cfg = replace(run_a["cfg"], out_dir=str(tmp_path / "ddp"), batch_size=4)
    launcher = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launcher = [launcher] if os.path.exists(launcher) else [sys.executable, "-m", "torch.distributed.run"]
    r = run(launcher + ["--standalone", "--nproc_per_node=2", "train.py"] + cli_args(cfg))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on cpu x 2" in r.stdout
    got, want = read_log(cfg), run_a["log"]
    assert [g["step"] for g in got] == [w["step"] for w in want]
    for g, w in zip(got, want):
        assert g["tokens"] == w["tokens"] and g["lr"] == w["lr"]
        for k in ("train_loss", "dev_loss", "dev_perplexity"):
            assert g[k] == pytest.approx(w[k], rel=1e-5), (g["step"], k)
    wd, wa = weights(os.path.join(cfg.out_dir, "final")), weights(os.path.join(run_a["cfg"].out_dir, "final"))
    for k in wa:
        torch.testing.assert_close(wd[k], wa[k], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- checkpoints

def test_checkpoint_folders(run_a):
    out = run_a["cfg"].out_dir
    for name in ("best", "final"):
        for f in CKPT_FILES:
            assert os.path.isfile(os.path.join(out, name, f)), f"{name}/{f}"
    assert not [f for f in os.listdir(out) if f.startswith(".")], "temporary folders left behind"
    state = torch.load(os.path.join(out, "final", "trainer_state.pt"), weights_only=True)
    assert state["step"] == 18 and state["done"] and set(state["optimizer"]) == {"state", "param_groups"}
    saved = json.load(open(os.path.join(out, "final", "config.json")))
    assert saved["model"]["n_embd"] == 32 and saved["model"]["block_size"] == 32 and "n_embd" not in saved["train"]
    with open(os.path.join(out, "final", "metrics.json")) as f:
        metrics = json.load(f)
    assert metrics["loss"] == run_a["log"][-1]["dev_loss"]
    best = json.load(open(os.path.join(out, "best", "metrics.json")))
    assert best["accuracy"] == run_a["out"]["best_accuracy"] == max(r["dev_accuracy"] for r in run_a["log"])


def test_loaded_model_gives_the_trained_logits(run_a):
    out, probe = run_a["cfg"].out_dir, run_a["probe"]
    for name in ("best", "final"):
        ck = checkpoint.load(os.path.join(out, name))
        model = ck.model
        with torch.no_grad():
            assert torch.equal(model(probe)[0], run_a["seen"][name])
        assert ck.vocab.num_codes == 8 and ck.vocab.num_classes == 3
        assert ck.codebook.cfg.patch_size == 2


class Custom:
    """Any class outside the weights_only allow-list."""


def test_pickled_trainer_state_is_refused(run_a, tmp_path):
    """A trainer_state.pt that would run code when unpickled is refused, and nothing runs."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    src = os.path.join(run_a["cfg"].out_dir, "final")
    for kind, write in (("raw pickle", lambda p: p.write_bytes(pickle.dumps(Evil(), protocol=2))),
                        ("torch.save", lambda p: torch.save({"step": 3, "evil": Evil()}, p)),
                        ("custom class", lambda p: torch.save({"step": 3, "x": Custom()}, p))):
        out = tmp_path / kind.replace(" ", "_")
        os.makedirs(out / "final")
        for f in CKPT_FILES:
            (out / "final" / f).write_bytes(open(os.path.join(src, f), "rb").read())
        write(out / "final" / "trainer_state.pt")
        with pytest.raises(UserError, match="trainer_state.pt: cannot load trainer state: refused, it holds "
                                            "Python objects other than tensors"):
            checkpoint.load_trainer_state(out / "final")
        with pytest.raises(UserError, match="cannot load trainer state"):
            train(replace(run_a["cfg"], out_dir=str(out)), resume=True, log=lambda *a: None)
        assert not marker.exists(), kind
    good = open(os.path.join(src, "trainer_state.pt"), "rb").read()
    (tmp_path / "torch.save" / "final" / "trainer_state.pt").write_bytes(good[:len(good) // 2])
    with pytest.raises(UserError, match="trainer_state.pt: cannot load trainer state"):
        checkpoint.load_trainer_state(tmp_path / "torch.save" / "final")


# ----------------------------------------------------------------------------- configs and the command line

def write(tmp_path, text, name="cfg.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text,overrides,match", [
    ("n_layer: 2\nbogus: 1\n", {},
     r"cfg.yaml: unknown key 'bogus'; valid keys: patch_size, .*, n_layer, .*, batch_size"),
    ("n_layer: abc\n", {}, r"cfg.yaml: n_layer expects int, got 'abc'"),
    ("n_layer: 2.5\n", {}, r"n_layer expects int"),
    ("lr: [1, 2]\n", {}, r"lr expects float"),
    ("", {"lr": "notanumber"}, r"command line: lr expects float, got 'notanumber'"),
    ("", {"bogus": "1"}, r"command line: unknown key 'bogus'; valid keys: .*n_embd"),
    ("n_layer: 2\nn_layer: 3\n", {}, r"cfg.yaml:2: invalid YAML \(duplicated key 'n_layer'\)"),
    ("n_layer: 2\nlr: [1, 2\nepochs: 3\n", {}, r"cfg.yaml:\d+: invalid YAML"),
    ("n_layer: 2\n  n_head: 2\n", {}, r"cfg.yaml:2: invalid YAML"),
    ("- 1\n- 2\n", {}, r"cfg.yaml: expected a mapping of key: value"),
    ("just a string\n", {}, r"cfg.yaml: expected a mapping"),
    ("n_embd: 30\nn_head: 4\n", {}, r"n_embd 30 is not divisible by n_head 4"),
    ("", {"n_head": "5"}, r"n_embd 384 is not divisible by n_head 5"),
    ("n_layer: 0\n", {}, r"n_layer must be at least 1"),
])
def test_config_errors(tmp_path, text, overrides, match):
    with pytest.raises(UserError, match=match):
        load_config(write(tmp_path, text), overrides)


def test_config_file_errors(tmp_path):
    with pytest.raises(UserError, match="cannot read config"):
        load_config(str(tmp_path / "missing.yaml"))
    p = tmp_path / "latin1.yaml"
    p.write_bytes("out_dir: caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        load_config(str(p))


def test_config_values_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "n_layer: 3\nlr: 1e-3\ncompile: false\n# comment\n"),
                      {"n_layer": "4", "bf16": "false", "dropout": "0.1"})
    assert (cfg.model.n_layer, cfg.lr, cfg.compile, cfg.bf16, cfg.model.dropout) == (4, 1e-3, False, "false", 0.1)
    assert isinstance(cfg.lr, float)
    assert load_config(write(tmp_path, "", "empty.yaml")) == TrainConfig()
    assert load_config(None, {"epochs": "2"}).epochs == 2


def test_shipped_configs_load():
    v2 = load_config(os.path.join(ROOT, "config", "v2.yaml"))
    assert (v2.batch_size, v2.epochs, v2.lr, v2.max_length) == (16, 30, 1e-4, 512)
    assert (v2.model.n_layer, v2.model.n_head, v2.model.n_embd) == (6, 8, 384)
    assert (v2.out_dir, v2.data.data_dir, v2.data.source, v2.data.codebook.patch_size, v2.data.codebook.num_codes) == \
        ("runs/v2", "data/mnist5k", "builtin", 4, 500)
    v1 = load_config(os.path.join(ROOT, "config", "v1.yaml"))
    assert (v1.batch_size, v1.epochs, v1.lr, v1.max_length) == (8, 20, 5e-5, 1024)
    assert (v1.weight_decay, v1.grad_clip, v1.out_dir) == (0.01, 1.0, "runs/v1")
    assert (v1.data.codebook.patch_size, v1.data.data_dir, v1.data.source) == (1, "data/mnist5k-p1", "builtin")
    assert 28 * 28 + 5 <= v1.max_length                                   # the per-pixel sequences fit
    for name in ("demo", "large"):  # augmented copies of the training images: their own data_dir
        cfg = load_config(os.path.join(ROOT, "config", f"{name}.yaml"))
        assert cfg.data.augment > 0 and cfg.data.data_dir != v2.data.data_dir and cfg.label_weight > 1
        assert (cfg.data.source, cfg.data.codebook.patch_size, cfg.data.codebook.num_codes, cfg.data.dev_fraction) == ("builtin", 4, 500, 0.1)
    best = load_config(os.path.join(ROOT, "config", "best.yaml"))   # the warp has a data folder of its own
    assert (best.data.augment, best.data.max_elastic, best.data.codebook.num_codes, best.model.n_layer) == (20, 1.5, 1000, 6)
    assert best.data.data_dir != cfg.data.data_dir
    for name in sorted(os.listdir(os.path.join(ROOT, "config"))):     # every one passes the data checks
        check_data_config(load_config(os.path.join(ROOT, "config", name)).data, name)


def test_cli_help_lists_the_keys():
    r = run([sys.executable, "train.py", "--help"])
    assert r.returncode == 0 and not r.stderr
    for name in names(TrainConfig):
        assert f"--{name}" in r.stdout
    assert "--resume" in r.stdout


def test_cli_config_error_is_one_line(tmp_path):
    r = run([sys.executable, "train.py", write(tmp_path, "n_layer: 2\nbogus: 1\n"), "--epochs", "1"])
    assert r.returncode == 2 and r.stdout == ""
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "unknown key 'bogus'" in lines[0]


def test_ctrl_c_stops_a_series_of_seeds_and_resume_goes_on(run_a, tmp_path, monkeypatch):
    """Ctrl-C in the first of 2 seeds saves it and stops the series (it does not start the next seed);
    --resume finishes the first and trains the second."""
    cfg = make_cfg(run_a["tmp"], "", out_dir=str(tmp_path / "seeds"), epochs=1, eval_every=0)
    logs = []
    monkeypatch.setattr(train_mod, "StopFlag", stop_after(2))
    summary = seed_runs.train_seeds(cfg, 2, log=logs.append)
    assert [r["seed"] for r in summary["runs"]] == [cfg.seed] and summary["runs"][0]["interrupted"]
    assert summary["final_dev_accuracy"] is None and not os.path.exists(tmp_path / "seeds" / f"seed-{cfg.seed + 1}")
    assert any("the series stops at seed" in line for line in logs)
    monkeypatch.undo()
    summary = seed_runs.train_seeds(cfg, 2, resume=True, log=lambda *a: None)
    assert [(r["seed"], r["interrupted"]) for r in summary["runs"]] == [(cfg.seed, False), (cfg.seed + 1, False)]
    assert summary["final_dev_accuracy"]["n"] == 2


def test_seeds_train_each_and_eval_summarises_them(run_a, tmp_path, capsys):
    """train.py --seeds 2: two runs (seeds s and s + 1) in out_dir/seed-*, summarised in seeds.json;
    eval.py with both checkpoints reports each on the test split and their mean, std and interval."""
    import eval as ev
    import train as train_script
    from imagegpt.stats import seed_summary
    cfg = make_cfg(run_a["tmp"], "", out_dir=str(tmp_path / "seeds"), epochs=1, eval_every=0)
    assert train_script.main(cli_args(cfg) + ["--seeds", "2"]) == 0
    summary = json.load(open(tmp_path / "seeds" / "seeds.json"))
    assert [r["seed"] for r in summary["runs"]] == [cfg.seed, cfg.seed + 1]
    assert list(summary)[-1] == "provenance" and summary["provenance"]["seeds"] == [cfg.seed, cfg.seed + 1]
    accs = [json.load(open(tmp_path / "seeds" / f"seed-{s}" / "final" / "metrics.json"))["accuracy"]
            for s in (cfg.seed, cfg.seed + 1)]
    assert summary["final_dev_accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
    a, b = (weights(str(tmp_path / "seeds" / f"seed-{s}" / "final")) for s in (cfg.seed, cfg.seed + 1))
    assert any(not torch.equal(a[k], b[k]) for k in a)                  # really two different seeds
    out = tmp_path / "summary.json"
    finals = [str(tmp_path / "seeds" / f"seed-{s}" / "final") for s in (cfg.seed, cfg.seed + 1)]
    assert ev.main(["--ckpt", *finals, "--out", str(out)]) == 0
    rep = json.load(open(out))
    each = [json.load(open(os.path.join(f, "eval.json")))["accuracy"] for f in finals]
    assert rep["accuracy"] == seed_summary(each) and "2 checkpoints: accuracy" in capsys.readouterr().out

