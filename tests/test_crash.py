"""Crash safety: a tiny training run is killed with SIGKILL again and again (at random moments, while a
checkpoint folder is being written, between the two renames that swap a checkpoint in, while the old
one is being removed, in the middle of a log line, while --resume rewrites the log) and resumed each
time. After every kill, every checkpoint on disk (final/, best/) must load, its metrics must be the
uninterrupted run's at that step, and the log lines up to it must be the uninterrupted run's; at the
end the weights (final/ and best/) and every logged number equal the uninterrupted run's bit for bit,
and nothing temporary is left in the run folder.

The first run is a real `python train.py config.yaml` (killed after its first evaluation) and so is
the last one (`--resume`, to the end). The runs in between are forked from a multiprocessing fork
server that has already imported torch and train.py, so each start costs milliseconds instead of the
~3 s of a fresh interpreter; they run train.py's main() through cli.run_cli exactly as the command
does, in their own process, and are killed with SIGKILL from here (or kill themselves at an injected
point). The plan of kills comes from a seeded random generator, so it is the same on every run.
"""
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from fixtures import ROOT, write_images

from imagegpt import checkpoint, prepare
from imagegpt import training as train_mod
from imagegpt.files import resolve_dir
from imagegpt.settings import build, flat
from imagegpt.train_config import TrainConfig

SEED = 20240531
EVAL_EVERY = 2
STEPS = 6 * 40          # 48 training images (80 - 16 test - 16 dev) / batch 8 = 6 steps per epoch, 40 epochs; lr and label_weight
                        # are high enough that the validation accuracy improves (best/ is saved) mid-run
FIRST = ["between_saves", "cli"]   # a fresh run killed between best/ and final/ at its first evaluation
                                   # (always an improvement), then the real command, also from scratch
PLAN = (["time"] * 8 + ["checkpoint_write"] * 8 + ["between_renames"] * 2 + ["removing_old"] * 2
        + ["log_line"] * 2 + ["log_rewrite"] * 1 + ["between_saves"] * 1)  # then these, shuffled: 26 in all


# ----------------------------------------------------------------------------- the child process

class _HalfLine:
    """A log file whose next write stops halfway and kills the process (a kill in mid-write)."""

    def __init__(self, f):
        self.f = f

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, text):
        self.f.write(text[:len(text) // 2])
        self.f.flush()
        _die()


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def _inject(kind, n):
    """Make this process SIGKILL itself the n-th time training reaches the point `kind`."""
    import contextlib

    from imagegpt import run_folder   # where the run folder's log is written
    seen = [0]

    def nth():
        seen[0] += 1
        return seen[0] == n

    if kind == "between_saves":        # an evaluation improved: one of best/ and final/ saved, not the other
        from imagegpt import checkpoint
        real_save, last = checkpoint.save, [None]

        def save(folder, model, *a, **k):
            weights = float(sum(p.double().sum() for p in model.parameters()))   # the same evaluation?
            if last[0] and last[0] != (os.path.basename(folder), weights) and last[0][1] == weights and nth():
                _die()
            last[0] = (os.path.basename(folder), weights)
            return real_save(folder, model, *a, **k)
        checkpoint.save = save
    elif kind == "between_renames":    # final/ -> final.old done, the new folder not yet renamed in
        real_replace = os.replace

        def replace(src, dst, *a, **k):
            real_replace(src, dst, *a, **k)
            if str(dst).endswith("final.old") and nth():
                _die()
        os.replace = replace
    elif kind == "removing_old":       # the new final/ is in place, final.old half deleted
        real_rmtree = shutil.rmtree

        def rmtree(path, *a, **k):
            if str(path).endswith("final.old") and os.path.isdir(path) and nth():
                os.remove(os.path.join(path, sorted(os.listdir(path))[0]))
                _die()
            return real_rmtree(path, *a, **k)
        shutil.rmtree = rmtree
    elif kind == "log_line":           # half a JSON line appended to log.jsonl
        def open_(path, mode="r", *a, **k):
            f = open(path, mode, *a, **k)
            return _HalfLine(f) if str(path).endswith("log.jsonl") and "a" in mode and nth() else f
        run_folder.open = open_
    elif kind == "log_rewrite":        # --resume has written the shortened log, not yet renamed it
        real_atomic = run_folder.atomic_path

        @contextlib.contextmanager
        def atomic_path(path):
            with real_atomic(path) as tmp:
                yield tmp
                if nth():
                    _die()
        run_folder.atomic_path = atomic_path
    else:
        raise ValueError(kind)


def child(argv, log_file, inject=None):
    """`python train.py argv` in a process forked from the fork server: output to log_file."""
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)           # as OMP_NUM_THREADS=1 for the real-CLI runs: bitwise the same
    import threading

    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())   # not tqdm's multiprocessing lock: a SIGKILL would leak its semaphore
    import train
    from imagegpt import cli
    if inject:
        _inject(*inject)
    sys.argv = ["train.py", *argv]
    cli.run_cli(train.main)


# ----------------------------------------------------------------------------- helpers


def records(out_dir):
    """log.jsonl as records without the wall-clock time; a last line cut short is left out."""
    path = os.path.join(out_dir, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    return [{k: v for k, v in json.loads(ln).items() if k != "time"} for ln in lines[:-1] if ln.strip()]


def has_checkpoint(out_dir):
    final = resolve_dir(os.path.join(out_dir, "final"))
    return os.path.exists(os.path.join(final, "trainer_state.pt"))


def temporary(out_dir):
    """The temporary folders of checkpoints being written (or left by a kill)."""
    try:
        return {f for f in os.listdir(out_dir) if f.startswith((".final.tmp-", ".best.tmp-"))}
    except FileNotFoundError:
        return set()


def leftovers(out_dir):
    return sorted(f for f in os.listdir(out_dir) if f.startswith(".") or f.endswith(".old"))


class Checker:
    """What must hold on disk after every kill, against the uninterrupted reference run."""

    def __init__(self, ref_dir):
        self.ref = {r["step"]: r for r in records(ref_dir)}
        self.last_step = 0
        self.loads = 0

    def __call__(self, out_dir, what):
        final, best = os.path.join(out_dir, "final"), os.path.join(out_dir, "best")
        step = 0
        best_acc = None
        if os.path.exists(final) or os.path.exists(final + ".old"):
            ck = checkpoint.load(final)                 # final/, or final.old between renames
            state = checkpoint.load_trainer_state(final)
            step, best_acc = state["step"], state["best"]
            assert step in self.ref, (what, step)
            assert ck.metrics["loss"] == self.ref[step]["dev_loss"], (what, step)
            assert step >= self.last_step, f"{what}: the checkpoint went back from {self.last_step} to {step}"
            self.last_step = step
            self.loads += 2
        if os.path.exists(best) or os.path.exists(best + ".old"):
            ck = checkpoint.load(best)
            self.loads += 1
            hit = [s for s, r in self.ref.items() if r["dev_loss"] == ck.metrics["loss"]]
            assert len(hit) == 1, (what, hit)
            s = hit[0]
            assert s <= step + EVAL_EVERY, f"{what}: best/ is from step {s}, final/ from {step}"
            acc = self.ref[s]["dev_accuracy"]
            assert all(r["dev_accuracy"] < acc for t, r in self.ref.items() if t < s), f"{what}: best/ was no improvement"
            assert ck.metrics["accuracy"] == acc
            if step:   # the best accuracy that final/ resumes with is best/'s, or best/ is one evaluation ahead
                assert best_acc == acc if s <= step else best_acc < acc, (what, s, step, best_acc, acc)
        elif best_acc is not None:
            raise AssertionError(f"{what}: final/ records a best accuracy {best_acc}, but there is no best/")
        kept = [r for r in records(out_dir) if r["step"] <= step]
        assert kept == [self.ref[r["step"]] for r in kept] and [r["step"] for r in kept] == \
            [s for s in sorted(self.ref) if s <= step], f"{what}: log.jsonl up to step {step} differs"
        return step


# ----------------------------------------------------------------------------- the test

@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["train", "eval", "matplotlib.figure", "matplotlib.backends.backend_agg",
                                "safetensors.torch", "torch._dynamo", os.path.splitext(os.path.basename(__file__))[0]])
    return ctx


def start(ctx, argv, log_file, inject=None):
    p = ctx.Process(target=child, args=(argv, log_file, inject), daemon=True)
    p.start()
    return p


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_run(tmp_path, forkserver):
    t_start = time.time()
    tmp = str(tmp_path)
    write_images(os.path.join(tmp, "images"), n=80)
    cfg = build(TrainConfig, source=f"folder:{tmp}/images", data_dir=f"{tmp}/data", out_dir=f"{tmp}/run",
                      image_size=8, patch_size=2, num_codes=8, kmeans_iters=3, n_layer=2, n_head=2, n_embd=32, dev_fraction=0.25,
                      max_length=32, batch_size=8, epochs=STEPS // 6, eval_every=EVAL_EVERY, dropout=0.1,
                      lr=2e-2, label_weight=5.0, warmup_steps=3, seed=7, device="cpu")
    prepare.prepare(cfg.data)
    config = os.path.join(tmp, "config.yaml")
    with open(config, "w") as f:
        f.write("".join(f"{k}: {json.dumps(v)}\n" for k, v in flat(cfg).items()))
    out, ref = cfg.out_dir, os.path.join(tmp, "ref")
    logs = os.path.join(tmp, "logs")
    os.makedirs(logs)

    def log_file(i):
        return os.path.join(logs, f"{i:02d}.txt")

    def tail(i):
        with open(log_file(i), errors="replace") as f:
            return f.read()[-3000:]

    # the uninterrupted reference run
    t0 = time.time()
    p = start(forkserver, [config, "--out_dir", ref], log_file(99))
    p.join(120)
    assert p.exitcode == 0, tail(99)
    step_time = (time.time() - t0) / STEPS   # this machine's pace: "time" kills land a few steps in
    check = Checker(ref)
    assert sorted(check.ref) == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))

    env = dict(os.environ, OMP_NUM_THREADS="1")
    rng = random.Random(SEED)
    plan = []
    for kind in FIRST + rng.sample(PLAN, len(PLAN)):
        arg = {"cli": rng.uniform(0.0, 0.3), "time": rng.uniform(0.05, 0.6), "checkpoint_write": rng.uniform(0.0, 0.004),
               "between_saves": 1}.get(kind, rng.randint(1, 2))
        plan.append((kind, arg))

    kills, found = [], []
    improved = [s for s in sorted(check.ref) if check.ref[s]["dev_accuracy"] >
                max([check.ref[t]["dev_accuracy"] for t in check.ref if t < s], default=-1)]
    for i, (kind, arg) in enumerate(plan):
        if kind == "between_saves" and i and not [s for s in improved if 0 < s - check.last_step <= 30]:
            kind = "between_renames"   # no improvement close ahead (says the reference run): no best/ save to hit
        resume = has_checkpoint(out)
        stale = temporary(out)
        argv = [config] + (["--resume"] if resume else [])
        before = check.last_step
        if kind == "cli":   # the real command; killed some time after its first checkpoint
            with open(log_file(i), "w") as lf:
                p = subprocess.Popen([sys.executable, "train.py", *argv], cwd=ROOT, env=env, stdout=lf, stderr=lf)
            deadline = time.time() + 120
            while not has_checkpoint(out) and p.poll() is None and time.time() < deadline:
                time.sleep(0.01)
            time.sleep(arg)
            p.send_signal(signal.SIGKILL)
            rc = p.wait(60)
        else:
            p = start(forkserver, argv, log_file(i), (kind, arg) if kind not in ("time", "checkpoint_write") else None)
            if kind == "time":   # 1 to 12 steps' worth of time after the start, however fast the machine
                time.sleep(arg * 20 * step_time)
                p.kill()
            elif kind == "checkpoint_write":  # as soon as a new checkpoint folder is being written
                deadline = time.time() + 60
                while p.is_alive() and time.time() < deadline and not temporary(out) - stale:
                    time.sleep(0.0005)
                time.sleep(arg)
                p.kill()
            p.join(60)
            rc = p.exitcode
        assert rc == -signal.SIGKILL, f"kill {i} ({kind}): the run ended by itself with {rc}:\n{tail(i)}"
        left = leftovers(out) if os.path.isdir(out) else []
        step = check(out, f"after kill {i} ({kind})")
        kills.append((kind, before, step, left))
        if kind == "checkpoint_write":
            found.append(bool(temporary(out) - stale))
        if kind == "between_renames":
            assert not os.path.exists(os.path.join(out, "final")) and os.path.isdir(os.path.join(out, "final.old"))

    # the last run, a real `python train.py config --resume`, to the end
    r = subprocess.run([sys.executable, "train.py", config, "--resume"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert check(out, "at the end") == STEPS

    # the same run as the uninterrupted one, bit for bit
    for name in ("final", "best"):
        a, b = checkpoint.load(os.path.join(ref, name)).model.state_dict(), checkpoint.load(os.path.join(out, name)).model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f"{name}/ weights differ"
    assert records(out) == [check.ref[s] for s in sorted(check.ref)]
    sa, sb = (checkpoint.load_trainer_state(os.path.join(d, "final")) for d in (ref, out))
    assert (sa["step"], sa["tokens"], sa["best"], sa["done"]) == (sb["step"], sb["tokens"], sb["best"], sb["done"])
    assert torch.equal(sa["rng"], sb["rng"])
    for pa, pb in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert sorted(os.listdir(out)) == ["best", "curves.png", "final", "log.jsonl"], os.listdir(out)

    during = sum(found)
    summary = (f"best/ saved at steps {improved}; {len(kills)} SIGKILLs in {time.time() - t_start:.0f} s; {during} of {len(found)} kills aimed at "
               f"checkpoint writes left a half-written temporary folder; kinds: "
               + ", ".join(f"{k}@{b}->{s}" for k, b, s, _ in kills))
    print(summary)
    assert len(kills) >= 20
    assert during >= len(found) // 2, summary   # most of them did hit a checkpoint write
    assert any(left for *_, left in kills), "no kill left anything to clean up"


def test_same_config_and_seed_give_the_same_run(tmp_path):
    """Determinism on the CPU: two fresh runs of one config and seed (dropout on) log the same numbers
    and end with the same weights, bit for bit. (The kill test above also compares a fresh
    `python train.py` run with a forked one, up to its first kill.)"""
    tmp = str(tmp_path)
    write_images(os.path.join(tmp, "images"), n=80)
    runs = []
    for name in ("a", "b"):
        cfg = build(TrainConfig, source=f"folder:{tmp}/images", data_dir=f"{tmp}/data", out_dir=f"{tmp}/{name}",
                          image_size=8, patch_size=2, num_codes=8, kmeans_iters=3, n_layer=2, n_head=2, n_embd=32, dev_fraction=0.25,
                          max_length=32, batch_size=8, epochs=2, eval_every=3, dropout=0.1, lr=2e-2, seed=5,
                          device="cpu")
        train_mod.train(cfg, log=lambda *a: None)
        runs.append((records(cfg.out_dir), checkpoint.load(os.path.join(cfg.out_dir, "final")).model.state_dict()))
    (la, wa), (lb, wb) = runs
    assert [r["step"] for r in la] == [3, 6, 9, 12] and la == lb
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
