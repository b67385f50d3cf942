"""Training batches (batches.py): token arrays read through a memory map give the batches the JSONL files
give; augmentation on the fly is deterministic for a seed, does not depend on the number of DataLoader
workers, and a run killed with SIGKILL resumes to the uninterrupted run's weights bit for bit; two DDP
processes read disjoint shares that cover each step's batch. Tiny data: 60 grey 8x8 images (3 classes),
2x2 patches, 8 codes (21-token sequences), a tiny model."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from fixtures import ROOT, write_images

from imagegpt import checkpoint
from imagegpt import prepare as prepare_mod
from imagegpt.augment import WARP_GRID
from imagegpt.batches import AugmentedRows, ListRows, ShardRows, epoch_steps, open_rows
from imagegpt.data_config import check_data_config
from imagegpt.errors import UserError
from imagegpt.prepare import IMAGES_FILE, prepare, token_dtype
from imagegpt.processes import Processes
from imagegpt.sequences import read_sequences
from imagegpt.settings import build, changed, flat
from imagegpt.token_format import Vocab
from imagegpt.train_config import TrainConfig
from imagegpt.training import train
from tokenizer import load_codebook, uint8_to_tensor

AUGMENT = 2


def make_cfg(tmp, **kw):
    base = dict(source=f"folder:{tmp / 'images'}", data_dir=str(tmp / "fly"), image_size=8, patch_size=2,
                num_codes=8, kmeans_iters=3, augment=AUGMENT, augment_on_the_fly=True, out_dir=str(tmp / "run"),
                n_layer=2, n_head=2, n_embd=32, batch_size=8, epochs=2, lr=1e-3, min_lr=1e-4, warmup_steps=3,
                eval_every=4, seed=1, device="cpu", dev_fraction=0.2, bf16="false", dropout=0.1)
    return build(TrainConfig, **{**base, **kw})


@pytest.fixture(scope="module")
def fly(tmp_path_factory):
    """A folder prepared with augment_on_the_fly, and the same data with fixed copies."""
    tmp = tmp_path_factory.mktemp("fly")
    write_images(tmp / "images", n=60)
    cfg = make_cfg(tmp)
    prepare(cfg.data)
    fixed = changed(cfg, augment_on_the_fly=False, data_dir=str(tmp / "fixed"))
    prepare(fixed.data)
    vocab = Vocab.load(os.path.join(cfg.data.data_dir, "vocab.json"))
    return dict(tmp=tmp, cfg=cfg, fixed=fixed, vocab=vocab, book=load_codebook(cfg.data.data_dir))


def all_steps(rows, cfg, epoch, vocab, start=0, rank=0, world=1):
    return [[tuple(t.clone() for t in m) for m in step]
            for step in epoch_steps(rows, epoch, start, cfg, Processes("cpu", rank, world), (32, rows.longest, vocab.pad_id))]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(p, q) for s, t in zip(a, b) for m, n in zip(s, t) for p, q in zip(m, n))


# ----------------------------------------------------------------------------- augmentation on the fly

def test_on_the_fly_files_and_the_codebook_of_the_fixed_copies(fly):
    cfg, fixed = fly["cfg"], fly["fixed"]
    images = np.load(os.path.join(cfg.data.data_dir, IMAGES_FILE), allow_pickle=False)
    labels = np.load(os.path.join(cfg.data.data_dir, "train.index.npz"), allow_pickle=False)["labels"]
    seqs, ys = read_sequences(os.path.join(cfg.data.data_dir, "train.jsonl"), fly["vocab"])
    assert images.dtype == np.uint8 and images.shape == (len(seqs), 8, 8, 1) and labels.tolist() == ys
    assert len(read_sequences(os.path.join(fixed.data.data_dir, "train.jsonl"), fly["vocab"])[0]) == (AUGMENT + 1) * len(seqs)
    # both fit the codebook on the same images (the originals and the fixed copies): the same codes
    for f in ("codebook.safetensors", "test.jsonl", "dev.jsonl"):
        with open(os.path.join(cfg.data.data_dir, f), "rb") as a, open(os.path.join(fixed.data.data_dir, f), "rb") as b:
            assert a.read() == b.read(), f
    # the stored images are the training images: tokenised untransformed they are train.jsonl
    codes = fly["book"].encode(uint8_to_tensor(images))
    assert fly["vocab"].image_id_rows(codes, labels).tolist() == seqs
    rep = json.load(open(os.path.join(cfg.data.data_dir, "report.json")))
    assert rep["counts"]["train_augmented"] == 0 and rep["config"]["augment_on_the_fly"] is True


def test_on_the_fly_rows_are_fresh_each_epoch_and_deterministic(fly):
    cfg, vocab, book = fly["cfg"], fly["vocab"], fly["book"]
    rows = open_rows(cfg, "train", vocab, book)
    assert isinstance(rows, AugmentedRows) and rows.n == (AUGMENT + 1) * rows.N
    idx = np.arange(rows.n)
    e0, e0b, e1 = rows.get(idx, 0), rows.get(idx, 0), rows.get(idx, 1)
    plain = read_sequences(os.path.join(cfg.data.data_dir, "train.jsonl"), vocab)[0]
    assert e0 == e0b                                          # the same (seed, epoch, row): the same sequence
    assert e0[:rows.N] == plain == e1[:rows.N]                # copy 0: the image as it is
    moved = range(rows.N, rows.n)
    assert sum(e0[j] != e1[j] for j in moved) > rows.n // 2    # every epoch new transforms
    assert sum(e0[j] != plain[j % rows.N] for j in moved) > rows.n // 2
    assert [e0[j] for j in (70, 3, 95)] == rows.get(np.array([70, 3, 95]), 0)   # a row does not depend on its batch
    other = AugmentedRows(cfg.data.data_dir, vocab, book, changed(cfg, seed=2))
    assert other.get(idx, 0)[:rows.N] == plain and other.get(idx, 0) != e0   # another seed, other transforms


def test_on_the_fly_warp_leaves_the_other_moves(fly):
    cfg, vocab, book = fly["cfg"], fly["vocab"], fly["book"]
    idx = np.arange(5, 40)
    plain = AugmentedRows(cfg.data.data_dir, vocab, book, cfg).params(idx, 1)
    warped = AugmentedRows(cfg.data.data_dir, vocab, book, changed(cfg, max_elastic=1.0)).params(idx, 1)
    assert plain.shape == (35, 5) and warped.shape == (35, 5 + 2 * WARP_GRID ** 2)
    assert torch.equal(warped[:, :5], plain) and 0.9 < warped[:, 5:].abs().max() <= 1.0


def test_on_the_fly_batches_do_not_depend_on_the_workers(fly):
    cfg, vocab = fly["cfg"], fly["vocab"]
    rows = open_rows(cfg, "train", vocab, fly["book"])
    ref = all_steps(rows, changed(cfg, num_workers=0), 1, vocab)
    assert len(ref) == rows.n // cfg.batch_size
    assert same(all_steps(rows, changed(cfg, num_workers=2), 1, vocab), ref)
    assert same(all_steps(rows, changed(cfg, num_workers=1), 1, vocab, start=3), ref[3:])   # a resume mid-epoch
    assert not same(all_steps(rows, cfg, 2, vocab), ref)


def test_on_the_fly_needs_augment():
    with pytest.raises(UserError, match="augment_on_the_fly needs augment >= 1"):
        check_data_config(build(TrainConfig, augment_on_the_fly=True, augment=0).data)


def test_a_killed_on_the_fly_run_resumes_to_the_same_weights(fly, tmp_path):
    """`python train.py` with augment_on_the_fly and 2 DataLoader workers, SIGKILLed after its first
    checkpoint and resumed, ends bitwise equal to the same run left alone in this process (0 workers)."""
    cfg = changed(fly["cfg"], epochs=6)
    whole = changed(cfg, out_dir=str(tmp_path / "whole"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                 # as OMP_NUM_THREADS=1 for the command below: bitwise the same
    try:
        train(changed(whole), log=lambda *a: None)
    finally:
        torch.set_num_threads(threads)
    cut = changed(cfg, out_dir=str(tmp_path / "cut"), num_workers=2)
    args = [sys.executable, "train.py"] + [a for k, v in flat(cut).items() if v != flat(TrainConfig())[k]
                                           for a in (f"--{k}", str(v))]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    saved = tmp_path / "cut" / "final" / "trainer_state.pt"
    p = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    try:
        deadline = time.time() + 120
        while not saved.exists() and p.poll() is None:
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        os.killpg(p.pid, signal.SIGKILL)                          # the run and its DataLoader workers
        p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    state = checkpoint.load_trainer_state(os.path.join(cut.out_dir, "final"))
    total = 6 * (open_rows(cfg, "train", fly["vocab"], fly["book"]).n // 8)
    assert 4 <= state["step"] < total
    r = subprocess.run(args + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"at step {state['step']}" in r.stdout
    a = checkpoint.load(os.path.join(whole.out_dir, "final")).model.state_dict()
    b = checkpoint.load(os.path.join(cut.out_dir, "final")).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert checkpoint.load_trainer_state(os.path.join(cut.out_dir, "final"))["step"] == total


# ----------------------------------------------------------------------------- token arrays and JSONL

def test_token_arrays_and_jsonl_give_the_same_batches(fly, tmp_path):
    """The fixed-copies folder read through its token arrays and the same folder with only its JSONL
    files (as prepared before the arrays existed): bitwise the same batches, and the same training."""
    fixed, vocab = fly["fixed"], fly["vocab"]
    shards = open_rows(fixed, "train", vocab)
    only = tmp_path / "jsonl-only"
    shutil.copytree(fixed.data.data_dir, only)
    for f in os.listdir(only):
        if f.endswith((".npy", ".npz")):
            os.remove(only / f)
    rep = json.loads((only / "report.json").read_text())
    del rep["config"]["augment_on_the_fly"]              # a folder prepared before the setting existed
    (only / "report.json").write_text(json.dumps(rep))
    jsonl = open_rows(changed(fixed, data_dir=str(only)), "train", vocab)
    assert isinstance(shards, ShardRows) and isinstance(jsonl, ListRows) and shards.n == jsonl.n
    tokens = np.load(os.path.join(fixed.data.data_dir, "train.tokens.npy"), allow_pickle=False)
    assert tokens.dtype == np.uint16 and tokens.shape == (jsonl.n, 21)
    for epoch in (0, 1):
        assert same(all_steps(shards, fixed, epoch, vocab), all_steps(jsonl, fixed, epoch, vocab))
    runs = {}
    for name, folder in (("shards", fixed.data.data_dir), ("jsonl", str(only))):
        c = changed(fixed, data_dir=folder, out_dir=str(tmp_path / name), epochs=1)
        train(changed(c), log=lambda *a: None)
        runs[name] = checkpoint.load(os.path.join(c.out_dir, "final")).model.state_dict()
    assert all(torch.equal(runs["shards"][k], runs["jsonl"][k]) for k in runs["shards"])


def test_token_rows_and_dtype(fly):
    vocab = fly["vocab"]
    codes, labels = np.array([[0, 7, 3], [5, 5, 1]]), np.array([2, 0])
    assert vocab.image_id_rows(codes, labels).tolist() == [vocab.image_ids(c, y) for c, y in zip(codes, labels)]
    assert token_dtype(516) == np.uint16 and token_dtype(65536) == np.uint16 and token_dtype(65537) == np.int32


def test_a_token_array_that_does_not_fit_its_index_is_one_line(fly, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(fly["fixed"].data.data_dir, folder)
    np.save(folder / "train.tokens.npy", np.zeros((3, 21), np.uint16))
    with pytest.raises(UserError, match=r"train.tokens.npy: expected a non-empty \(n, width\) uint16 or int32 array"):
        ShardRows(str(folder), "train", fly["vocab"])
    np.save(folder / "train.tokens.npy", np.array([{"a": 1}], dtype=object))   # a pickle is never loaded
    with pytest.raises(UserError, match="cannot read it as a token array"):
        ShardRows(str(folder), "train", fly["vocab"])


DDP_SCRIPT = r"""
import json, os, sys
import numpy as np, torch, torch.distributed as dist
sys.path.insert(0, os.environ["REPO"])
from imagegpt.batches import ListRows, epoch_steps
from imagegpt.processes import Processes
from imagegpt.settings import build
from imagegpt.train_config import TrainConfig
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
# row i holds its own number in its codes, so the rows a process read can be told from its batches
rows = ListRows([[2, 6 + i // 10, 6 + i % 10, 3, 4, 16 + i % 3, 5] for i in range(100)])
cfg = build(TrainConfig, batch_size=4, grad_accum=2, seed=7)
read = []
for epoch in (0, 1):
    for step in epoch_steps(rows, epoch, 0, cfg, Processes("cpu", rank, world), (16, 7, 0)):
        read.append([int((x[r, 1] - 6) * 10 + x[r, 2] - 6) for x, _, _ in step for r in range(len(x))])
out = [None] * world
dist.all_gather_object(out, read)
if rank == 0:
    json.dump(out, open(os.environ["OUT"], "w"))
dist.destroy_process_group()
"""


def test_ddp_processes_read_disjoint_shares_covering_each_step(tmp_path):
    """torchrun, 2 CPU processes (gloo): at every step the two processes read disjoint rows whose union is
    the step's global batch of the one-process order; over an epoch they cover every row but the
    remainder that makes no whole step."""
    script, out = tmp_path / "ddp_rows.py", tmp_path / "rows.json"
    script.write_text(DDP_SCRIPT)
    launcher = os.path.join(os.path.dirname(sys.executable), "torchrun")
    launcher = [launcher] if os.path.exists(launcher) else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, OMP_NUM_THREADS="1", REPO=ROOT, OUT=str(out))
    r = subprocess.run(launcher + ["--standalone", "--nproc_per_node=2", str(script)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.load(open(out))
    rows = ListRows([[2, 6 + i // 10, 6 + i % 10, 3, 4, 16 + i % 3, 5] for i in range(100)])
    one = all_steps(rows, build(TrainConfig, batch_size=8, grad_accum=2, seed=7), 0, Vocab(100, 3)) + \
        all_steps(rows, build(TrainConfig, batch_size=8, grad_accum=2, seed=7), 1, Vocab(100, 3))
    assert len(a) == len(b) == len(one) == 2 * (100 // 16)
    for ra, rb, step in zip(a, b, one):
        whole = [int((x[r, 1] - 6) * 10 + x[r, 2] - 6) for x, _, _ in step for r in range(len(x))]
        assert len(ra) == len(rb) == 8 and not set(ra) & set(rb) and sorted(ra + rb) == sorted(whole)
    first = [i for s in a[:6] + b[:6] for i in s]
    assert len(set(first)) == 96 and set(first) <= set(range(100))


def test_prepare_in_worker_processes_writes_the_same_files(fly, tmp_path, monkeypatch):
    """Chunks of 8 images tokenised in worker processes (one per core): the same files as one chunk in
    this process."""
    monkeypatch.setattr(prepare_mod, "CHUNK", 8)
    cfg = changed(fly["fixed"], data_dir=str(tmp_path / "chunked"))
    rep = prepare(cfg.data)
    ref = json.load(open(os.path.join(fly["fixed"].data.data_dir, "report.json")))
    assert ref["tokenise_processes"] == 1 and rep["tokenise_processes"] == os.cpu_count()   # one per core
    assert rep["images_tokenised"] == ref["images_tokenised"] == 60 - sum(ref["counts"]["train"]) + 3 * sum(
        ref["counts"]["train"])
    for k in ("counts", "test_psnr_db", "train_psnr_db", "distinct_images", "distinct_sequences", "codes_used",
              "code_perplexity"):
        assert rep[k] == ref[k], k
    for f in sorted(os.listdir(fly["fixed"].data.data_dir)):
        if f != "report.json":
            with open(os.path.join(fly["fixed"].data.data_dir, f), "rb") as a, open(os.path.join(cfg.data.data_dir, f), "rb") as b:
                assert a.read() == b.read(), f


def test_scale_source_is_an_idx_source(tmp_path):
    """scale.py's synthetic digits: an IDX source of transformed built-in digits, read memory-mapped."""
    from imagegpt.sources import load_builtin, load_idx
    from scale import main, make_source
    make_source(str(tmp_path), 300, chunk=128)
    images, labels, names, meta = load_idx(str(tmp_path))
    assert isinstance(images, np.memmap) and images.shape == (300, 28, 28, 1) and names == [str(c) for c in range(10)]
    assert set(labels.tolist()) <= set(range(10)) and len(set(labels.tolist())) == 10
    assert meta[299] == {"source": "train-images-idx3-ubyte", "index": 299}
    base = {r.tobytes() for r in load_builtin()[0]}
    assert sum(r.tobytes() in base for r in np.asarray(images)) < 30      # moved, not copied
    for bad, said in ((["--sizes", "10,x"], "expected comma-separated whole numbers"),
                      (["--sizes", "50"], "each must be in 100"), (["--steps", "0"], "--steps and --repeats must be at least 1")):
        with pytest.raises(UserError, match=said):
            main(bad + ["--work_dir", str(tmp_path / "w")])
