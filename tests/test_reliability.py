"""Reliability, round two (issue 18), beyond the one-line cases of test_bad_input.py: a training run that
meets a non-finite loss or non-finite weights stops and keeps its last good checkpoint; one run per run
folder (a lock, a stale lock never blocks); --resume with other settings; sampling at temperatures near
zero; allocation failures as one line; odd file names; outputs checked before any work; max_length and
the data; file modes; class folders.
"""
import contextlib
import glob
import io
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
from fixtures import ROOT, write_images

from imagegpt import checkpoint, cli, decoding, device, errors
from imagegpt import files as files_mod
from imagegpt import train_config
from imagegpt import training as trainer_mod
from imagegpt.draw_settings import DrawSettings
from imagegpt.errors import UserError
from imagegpt.settings import build, changed, flat
from imagegpt.train_config import TrainConfig, load_config
from imagegpt.training import train

TINY = dict(image_size=8, patch_size=2, num_codes=8, kmeans_iters=3, n_layer=2, n_head=2, n_embd=32,
            batch_size=8, epochs=2, eval_every=3, lr=1e-3, warmup_steps=2, seed=1, device="cpu", dev_fraction=0.25)
STEPS = 12   # 48 training images (80 - 15 test - 17 dev) / batch 8 = 6 steps per epoch, 2 epochs


def cli_args(cfg):
    return [a for k in (*TINY, "source", "data_dir", "out_dir") for a in (f"--{k}", str(flat(cfg)[k]))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny finished run (max_length 0: the block size follows the data) and its data folder."""
    tmp = str(tmp_path_factory.mktemp("reliab"))
    write_images(os.path.join(tmp, "images"), n=80)
    cfg = build(TrainConfig, source=f"folder:{tmp}/images", data_dir=f"{tmp}/data", out_dir=f"{tmp}/run", **TINY)
    lines = []
    train(changed(cfg), log=lines.append)
    return {"tmp": tmp, "cfg": cfg, "lines": lines}


def copy_run(run, dest):
    shutil.copytree(run["cfg"].out_dir, dest)
    return changed(run["cfg"], out_dir=str(dest))


def files(folder):
    """Every file under folder -> its bytes."""
    out = {}
    for d, _, fs in os.walk(folder):
        for f in fs:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), folder)] = fh.read()
    return out


def run_main(main, argv):
    """main(argv) through cli.run_cli -> (exit code, stdout, stderr)."""
    err, so = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(so), contextlib.redirect_stderr(err):
        try:
            cli.run_cli(lambda: main(argv))
            code = 0
        except SystemExit as e:
            code = e.code
    return code, so.getvalue(), err.getvalue()


def one_line(stderr):
    """The one error line a terminal shows of stderr (progress bars, redrawn after carriage returns,
    left out), checked to be the only line."""
    lines = [ln.split("\r")[-1].strip() for ln in stderr.split("\n")]
    lines = [ln for ln in lines if ln and not re.match(r"^[^:]*: *\d+%\|", ln)]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def subprocess_env():
    return dict(os.environ, OMP_NUM_THREADS="1")


# ----------------------------------------------------------------------------- 1. non-finite losses

def test_the_block_size_follows_the_data_and_best_only_improves(run):
    ck = checkpoint.load(os.path.join(run["cfg"].out_dir, "final"))
    assert ck.model.config.block_size == 21 and ck.settings["max_length"] == 0   # 16 codes + 5 markers
    with open(os.path.join(run["cfg"].out_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    assert [r["step"] for r in log] == list(range(3, STEPS + 1, 3))
    best = checkpoint.load(os.path.join(run["cfg"].out_dir, "best"))
    first_best = next(r for r in log if r["dev_accuracy"] == max(r["dev_accuracy"] for r in log))
    assert best.metrics["accuracy"] == first_best["dev_accuracy"] and best.metrics["loss"] == first_best["dev_loss"]
    assert not os.path.exists(os.path.join(run["cfg"].out_dir, files_mod.FolderLock.NAME))


def poison(monkeypatch, at, what):
    """Make trainer.train_step, on its `at`-th call, return a NaN loss (what='loss') or leave NaN in a
    weight while returning a finite loss (what='weights'), after doing the real step."""
    real, calls = trainer_mod.train_step, [0]

    def step(model, *a, **k):
        loss = real(model, *a, **k)
        calls[0] += 1
        if calls[0] == at:
            if what == "loss":
                return float("nan")
            with torch.no_grad():
                next(checkpoint.raw_model(model).parameters())[0, 0] = float("inf")
        return loss
    monkeypatch.setattr(trainer_mod, "train_step", step)


@pytest.mark.parametrize("what,at,step,said", [
    ("loss", 2, 14, "the training loss is nan"),                   # between evaluations
    ("loss", 3, 15, "the training loss is nan"),                   # at an evaluation (step 15)
    ("weights", 3, 15, "the weights are not finite (NaN or inf)"),  # the loss still finite: caught before saving
    ("weights", 1, 14, "the training loss is nan"),                # caught by the next step's loss
])
def test_nonfinite_stops_the_run_and_keeps_the_last_good_checkpoint(run, tmp_path, monkeypatch, what, at, step, said):
    """A resumed run (final/ at step 12, evaluations every 3 steps) meets a NaN loss or inf weights `at`
    steps later: a UserError that says what is kept, final/ and best/ byte for byte as they were (and
    loadable), no log line, no lock left."""
    cfg = copy_run(run, tmp_path / "run")
    before = {name: files(os.path.join(cfg.out_dir, name)) for name in ("final", "best")}
    log_before = open(os.path.join(cfg.out_dir, "log.jsonl")).read()
    poison(monkeypatch, at, what)
    lines = []
    with pytest.raises(UserError) as e:
        train(changed(cfg, epochs=3), resume=True, allow_changes=True, log=lines.append)
    msg = str(e.value)
    assert msg.startswith(f"step {step}: {said}; training diverged and was stopped ({cfg.out_dir}/final keeps "
                          f"step {STEPS}; final/ and best/ never get non-finite weights)"), msg
    for name in ("final", "best"):
        assert files(os.path.join(cfg.out_dir, name)) == before[name], f"{name}/ changed"
        assert torch.isfinite(checkpoint.load(os.path.join(cfg.out_dir, name)).model.lm_head.weight).all()
    assert open(os.path.join(cfg.out_dir, "log.jsonl")).read() == log_before   # no line for a diverged step
    assert sorted(os.listdir(cfg.out_dir)) == ["best", "curves.png", "final", "log.jsonl"]
    assert any("resuming with changed settings (--allow_changes): epochs 2 -> 3" in str(x) for x in lines)


def test_diverging_from_scratch_by_command_saves_nothing(run, tmp_path):
    """`python train.py ... --lr 1e30`: exit 2, one line, and no run folder at all (nothing was good)."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "train.py", *cli_args(changed(run["cfg"], out_dir=str(out))), "--lr", "1e30"],
                       cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 2
    line = one_line(r.stderr)
    assert "the training loss is" in line and "no checkpoint of this run was written" in line
    assert not out.exists()


def test_a_diverged_resume_leaves_a_checkpoint_that_samples(run, tmp_path):
    """The same by command on a finished run resumed with a huge lr: final/ still samples."""
    cfg = copy_run(run, tmp_path / "run")
    r = subprocess.run([sys.executable, "train.py", *cli_args(cfg), "--lr", "1e30", "--epochs", "3", "--resume",
                        "--allow_changes"], cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert r.returncode == 2 and f"final keeps step {STEPS}" in one_line(r.stderr)
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", f"{cfg.out_dir}/final", "--num_samples", "2",
                        "--out_png", str(tmp_path / "s.png")], cwd=ROOT, capture_output=True, text=True,
                       env=subprocess_env(), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "s.png").exists()


# ----------------------------------------------------------------------------- 2. one run per run folder

def wait_for(cond, what, timeout=120):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, what
        time.sleep(0.02)


def lock_pid(folder):
    try:
        return open(os.path.join(folder, files_mod.FolderLock.NAME)).read().strip()
    except FileNotFoundError:
        return ""


def test_two_runs_on_one_folder_exactly_one_runs(run, tmp_path):
    """Two `python train.py` on one out_dir: the second, started while the first holds the folder, is
    refused in one line naming the first one's pid; the first runs to its end, its log holds every
    evaluation once, and the lock goes away with it."""
    cfg = changed(run["cfg"], out_dir=str(tmp_path / "run"), epochs=100)   # 600 steps: seconds
    args = [sys.executable, "train.py", *cli_args(cfg)]
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=subprocess_env())
    try:
        wait_for(lambda: lock_pid(cfg.out_dir) == str(first.pid) or first.poll() is not None, "no lock taken")
        second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=120)
        assert first.poll() is None, "the first run ended before the second started: no overlap"
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2
    line = one_line(second.stderr)
    assert f"{cfg.out_dir}: the run folder (out_dir) is in use by another process (pid {first.pid}" in line
    assert first.returncode == 0, err[-2000:]
    with open(os.path.join(cfg.out_dir, "log.jsonl")) as f:
        steps = [json.loads(x)["step"] for x in f]
    assert steps == list(range(3, 601, 3))
    assert sorted(os.listdir(cfg.out_dir)) == ["best", "curves.png", "final", "log.jsonl"]


def test_a_stale_lock_never_blocks(run, tmp_path):
    """A lock file left by a process that is gone (a dead pid written in it, or the lock of a run killed
    with SIGKILL) does not stop the next run."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    cfg = copy_run(run, tmp_path / "run")
    with open(os.path.join(cfg.out_dir, files_mod.FolderLock.NAME), "w") as f:
        f.write(f"{dead.pid}\n")
    out = train(changed(cfg, epochs=3), resume=True, allow_changes=True, log=lambda *a: None)
    assert out["step"] == 3 * 6
    assert not os.path.exists(os.path.join(cfg.out_dir, files_mod.FolderLock.NAME))
    # the lock of a run killed in the middle of training
    cfg = changed(run["cfg"], out_dir=str(tmp_path / "killed"), epochs=100)
    p = subprocess.Popen([sys.executable, "train.py", *cli_args(cfg)], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=subprocess_env())
    try:
        wait_for(lambda: lock_pid(cfg.out_dir) == str(p.pid), "no lock taken")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait(60)
    assert lock_pid(cfg.out_dir) == str(p.pid)   # left behind, holding a dead pid
    out = train(changed(cfg, epochs=1), log=lambda *a: None)
    assert out["step"] == 6 and not os.path.exists(os.path.join(cfg.out_dir, files_mod.FolderLock.NAME))


def test_the_lock_itself(tmp_path):
    """lock_folder(): a second holder is refused naming the first one's pid; release leaves no trace,
    not even a new modification time; the folders it created go away again."""
    folder = tmp_path / "a" / "b"
    lock = files_mod.lock_folder(str(folder), "run folder", "; try later")
    assert lock_pid(folder) == str(os.getpid())
    with pytest.raises(UserError, match=rf"b: the run folder is in use by another process \(pid {os.getpid()}, "
                                        rf"lock file .*\.lock\); try later"):
        files_mod.lock_folder(str(folder), "run folder", "; try later")
    lock.release()
    lock.release()   # twice is harmless
    assert not (tmp_path / "a").exists()
    (tmp_path / "old").mkdir()
    os.utime(tmp_path / "old", ns=(10 ** 18, 10 ** 18))
    with files_mod.lock_folder(str(tmp_path / "old")):
        assert (tmp_path / "old" / ".lock").exists()
    assert os.listdir(tmp_path / "old") == [] and os.stat(tmp_path / "old").st_mtime_ns == 10 ** 18
    with files_mod.lock_folder(str(tmp_path / "old")):
        (tmp_path / "old" / "written").write_text("x")    # a real change keeps its time
    assert os.stat(tmp_path / "old").st_mtime_ns != 10 ** 18


# ----------------------------------------------------------------------------- 3. resume with other settings

def test_resume_refuses_other_settings_before_preparing_data(run, tmp_path):
    cfg = copy_run(run, tmp_path / "run")
    data = str(tmp_path / "other-data")
    with pytest.raises(UserError, match=r"other model or data settings: num_codes 8 -> 16"):
        train(changed(cfg, num_codes=16, data_dir=data), resume=True, log=lambda *a: None)
    assert not os.path.exists(data)
    with pytest.raises(UserError, match=r"other training settings than the run's: epochs 2 -> 4, lr 0.001 -> 0.0005; "
                                        r"it would not continue the same run; pass --allow_changes"):
        train(changed(cfg, lr=5e-4, epochs=4), resume=True, log=lambda *a: None)
    # the settings that say where and how it runs may change freely
    out = train(changed(cfg, device="cpu", compile=False, bf16="false"), resume=True, log=lambda *a: None)
    assert out["step"] == STEPS


# ----------------------------------------------------------------------------- 4. sizes, temperatures

@pytest.mark.parametrize("t", [1e-5, 1e-30, 1e-38, 1e-40, 1e-45, 1e-300, 5e-324])
def test_a_temperature_near_zero_is_greedy_never_nan(t):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 50, generator=g) * 20
    logits[0, :3] = 55.0                                     # a tie for the largest: either is fine
    want = logits.argmax(-1)
    for top_k, top_p in ((None, None), (5, None), (None, 0.5), (3, 0.9)):
        got = decoding.choose_next(logits, DrawSettings(temperature=t, top_k=top_k or 0, top_p=top_p or 1.0), g)
        assert (got[1:] == want[1:]).all() and got[0].item() in (0, 1, 2)


def test_ordinary_temperatures_sample_as_before():
    """The near-zero path is taken only when the scaled logits overflow: the usual draws are unchanged."""
    logits = torch.randn(32, 40, generator=torch.Generator().manual_seed(1)) * 3
    for t in (0.3, 0.8, 1.0, 2.5):
        a = decoding.choose_next(logits, DrawSettings(temperature=t, top_k=10, top_p=0.9), torch.Generator().manual_seed(5))
        ref = decoding.top_p_filter(decoding.top_k_filter(logits.float() / t, 10), 0.9).softmax(-1)
        b = torch.multinomial(ref, 1, generator=torch.Generator().manual_seed(5)).squeeze(-1)
        assert torch.equal(a, b)


def test_generation_at_a_tiny_temperature_equals_greedy(run):
    ck = checkpoint.load(os.path.join(run["cfg"].out_dir, "final"))
    prompts = [[ck.vocab.img_id]] * 3
    greedy = decoding.generate(ck, prompts, DrawSettings(greedy=True, max_new_tokens=30))
    cold = decoding.generate(ck, prompts, DrawSettings(temperature=1e-40, max_new_tokens=30))
    assert [r["ids"] for r in cold] == [r["ids"] for r in greedy]


def test_nonfinite_logits_are_one_line():
    with pytest.raises(UserError, match="logits are not finite"):
        decoding.choose_next(torch.tensor([[1.0, float("nan")]]), DrawSettings(temperature=1e-45))


def test_an_allocation_that_fails_is_one_line():
    """What no estimate caught: torch's allocator failing for real, a MemoryError, a CUDA OOM."""
    def real():
        torch.empty(10 ** 7, 10 ** 7)      # 400 TB

    def cuda():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; ...)\nmore text")

    for main, part in ((real, "DefaultCPUAllocator: can't allocate memory"), (lambda: [0] * (10 ** 13), ""),
                       (cuda, "CUDA out of memory. Tried to allocate 20.00 GiB")):
        code, _, err = run_main(lambda argv: main(), [])
        line = one_line(err)
        assert code == 1 and line.startswith("error: out of memory (") and part in line, line
        assert "enforce fail" not in line
    with pytest.raises(RuntimeError, match="a bug"):   # any other RuntimeError is a bug: its traceback shows
        run_main(lambda argv: (_ for _ in ()).throw(RuntimeError("a bug")), [])


def test_size_estimates_let_the_shipped_configs_through(monkeypatch):
    """The estimates refuse what cannot fit, never what can: every shipped config fits in 4 GB, none in 20 MB.
    And every config but the original's two runs (v1, v2) takes max_length from the data."""
    names = sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(ROOT, "config", "*.yaml")))
    assert {"demo", "demo_cond", "best", "best_cond", "colour", "finetune", "large", "v1", "v2"} <= set(names)
    for name in names:
        cfg = load_config(os.path.join(ROOT, "config", f"{name}.yaml"))
        assert (cfg.max_length == 0) == (name not in ("v1", "v2")), name
        monkeypatch.setattr(device, "memory_bytes", lambda device="cpu": 4 * 10 ** 9)
        train_config.check_fits(cfg, "cpu")
        monkeypatch.setattr(device, "memory_bytes", lambda device="cpu": 20 * 10 ** 6)
        with pytest.raises(UserError, match="more than the 20.0 MB of memory"):
            train_config.check_fits(cfg, "cpu")


# ----------------------------------------------------------------------------- 6. odd file names

def test_printable():
    assert errors.printable("runs/demo/best") == "runs/demo/best"
    assert errors.printable("é ü 数字 a b") == "é ü 数字 a b"
    assert errors.printable("a\nb\rc\td\x1be\x00f\u2028") == "a\\nb\\rc\\td\\x1be\\x00f\\u2028"
    assert errors.printable("caf\udce9.png") == "caf\\xe9.png"


def test_a_name_with_bytes_that_are_not_utf8_is_written_and_printed(run, tmp_path):
    """sample.py --out_png <name with a byte that is not UTF-8>: the file gets exactly that name, and the
    message printing it (stdout) does not crash."""
    png = os.path.join(os.fsencode(tmp_path), b"s\xff.png")
    r = subprocess.run([sys.executable.encode(), b"sample.py", b"--ckpt", os.fsencode(f"{run['cfg'].out_dir}/final"),
                        b"--num_samples", b"2", b"--out_png", png], cwd=ROOT, capture_output=True, env=subprocess_env(),
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.listdir(os.fsencode(tmp_path)) == [b"s\xff.png"]
    assert b"wrote " + png in r.stdout


# ----------------------------------------------------------------------------- 7. outputs checked first

def deny_writes(monkeypatch, folder):
    """os.access says `folder` is not writable (tests run as root, whom chmod does not stop)."""
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if os.path.abspath(p) == str(folder)
                        and mode & os.W_OK else real(p, mode, *a, **k))


def test_an_output_in_a_folder_that_cannot_be_written_is_refused_first(run, tmp_path, monkeypatch):
    import bench
    import data
    import eval as eval_mod
    import hf_export
    import sample
    import train as train_script
    ro = tmp_path / "ro"
    ro.mkdir()
    final, d = f"{run['cfg'].out_dir}/final", run["cfg"].data.data_dir
    deny_writes(monkeypatch, ro)
    cases = [
        (sample.main, ["--ckpt", final, "--out_png", str(ro / "s.png")]),
        (sample.main, ["--ckpt", final, "--out_png", str(tmp_path / "ok.png"), "--out_jsonl", str(ro / "s.jsonl")]),
        (eval_mod.main, ["--ckpt", final, "--out", str(ro / "m.json")]),
        (eval_mod.main, ["--curves", run["cfg"].out_dir, "--out", str(ro / "c.png")]),
        (data.main, ["render", f"{d}/test.jsonl", "--out", str(ro / "g.png")]),
        (data.main, ["reconstruct", d, "--out", str(ro / "r.png")]),
        (data.main, ["prepare", "--source", run["cfg"].data.source, "--data_dir", str(ro / "new")]),
        (hf_export.main, ["--ckpt", final, "--out", str(ro / "hf")]),
        (bench.main, ["--quick", "--json", str(ro / "b.json")]),
        (train_script.main, [*cli_args(changed(run["cfg"], out_dir=str(ro)))]),
        (train_script.main, [*cli_args(changed(run["cfg"], out_dir=str(ro / "run")))]),
    ]
    for main, argv in cases:
        code, out, err = run_main(main, argv)
        assert code == 2 and f"{ro} is not writable" in one_line(err), (argv, err)
    assert os.listdir(ro) == [] and os.listdir(tmp_path) == ["ro"]


# ----------------------------------------------------------------------------- 8. class folders, notes

def test_hidden_folders_are_not_classes(tmp_path):
    from imagegpt import sources
    write_images(str(tmp_path / "imgs"), n=12)
    shutil.copytree(tmp_path / "imgs" / "c0", tmp_path / "imgs" / ".ipynb_checkpoints")
    names, items = sources._class_files(str(tmp_path / "imgs"), sources.IMAGE_EXTS)
    assert names == ["c0", "c1", "c2"] and len(items) == 12


def test_a_new_run_over_an_earlier_one_says_so(run, tmp_path):
    cfg = copy_run(run, tmp_path / "run")
    lines = []
    train(changed(cfg, epochs=1), log=lines.append)
    assert any(f"note: {cfg.out_dir} holds an earlier run; this new one replaces its log" in str(x) for x in lines)


# ----------------------------------------------------------------------------- 9. max_length and the data

def test_allow_truncation_trains_on_cut_images_and_says_so(run, tmp_path):
    lines = []
    cfg = changed(run["cfg"], out_dir=str(tmp_path / "run"), max_length=12, allow_truncation=True, epochs=1)
    train(cfg, log=lines.append)
    assert any("note: max_length 12 cuts the image tokens of 65 sequences" in str(x) for x in lines)
    assert checkpoint.load(os.path.join(cfg.out_dir, "final")).model.config.block_size == 12
    import sample  # such a model cannot draw a whole image: sampling says so
    code, out, err = run_main(sample.main, ["--ckpt", os.path.join(cfg.out_dir, "final"), "--num_samples", "2",
                                            "--out_png", str(tmp_path / "s.png")])
    assert code == 0, err
    assert "note: the model's block size 12 is shorter than a complete image (21 tokens" in out
    assert "0/2 rows are complete images" in out


def test_a_cut_is_refused_before_preparing_the_data(run, tmp_path):
    cfg = changed(run["cfg"], out_dir=str(tmp_path / "run"), data_dir=str(tmp_path / "data"), image_size=16,
                  max_length=64)
    with pytest.raises(UserError, match=r"max_length 64 is shorter than the sequences of image_size 16 in patches "
                                        r"of 2 \(69 tokens\): it would cut every sequence"):
        train(cfg, log=lambda *a: None)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- 10. file modes

def modes(folder):
    return {os.path.relpath(os.path.join(d, f), folder): stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode)
            for d, ds, fs in os.walk(folder) for f in fs + ds}


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_every_output_follows_the_umask(run, tmp_path, mask):
    """Weights, codebooks, exports, settings, pictures: 0666 less the umask, folders 0777 less it."""
    from imagegpt import huggingface, plots
    old = os.umask(mask)
    try:
        ck = checkpoint.load(os.path.join(run["cfg"].out_dir, "final"))
        checkpoint.save(str(tmp_path / "ckpt"), ck.model, run["cfg"], ck.vocab, ck.codebook, ck.metrics,
                        checkpoint.load_trainer_state(os.path.join(run["cfg"].out_dir, "final")))
        huggingface.write_export(ck, str(tmp_path / "hf"))
        ck.codebook.save(str(tmp_path))
        plots.plot_curves(os.path.join(run["cfg"].out_dir, "log.jsonl"), str(tmp_path / "curves.png"))
    finally:
        os.umask(old)
    got = modes(tmp_path)
    assert {"ckpt/model.safetensors", "ckpt/trainer_state.pt", "hf/model.safetensors", "codebook.safetensors",
            "curves.png", "hf"} <= set(got)
    for name, mode in got.items():
        want = (0o777 if os.path.isdir(tmp_path / name) else 0o666) & ~mask
        assert mode == want, f"{name}: {oct(mode)}, expected {oct(want)}"


def test_the_training_run_wrote_shareable_files(run):
    mask = files_mod.umask()
    for folder in (run["cfg"].out_dir, run["cfg"].data.data_dir):
        for name, mode in modes(folder).items():
            want = (0o777 if os.path.isdir(os.path.join(folder, name)) else 0o666) & ~mask
            assert mode == want, f"{folder}/{name}: {oct(mode)}"
