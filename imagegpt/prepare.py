"""Preparing a data folder: load the source, split, fit the codebook on the training images, and write
every split as token sequences (prepare), or check that a folder was prepared with these settings
(ensure_prepared).

A prepared folder holds, for each split (train, dev when asked for, test), the
sequences three ways: <split>.jsonl (one record per image, the original project's format),
<split>.tokens.npy (the token ids, one fixed-width uint16 row per sequence, <PAD>-padded; int32 for a
vocabulary over 65,536) and <split>.index.npz (labels, lengths); then vocab.json, the codebook and
report.json. With augment_on_the_fly the training images themselves go to train.images.npy (uint8
N x H x W x C) instead of fixed augmented copies. Images are tokenised in chunks, in one worker
process per CPU core.
"""
import copy
import glob
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import torch
from tqdm import tqdm

from imagegpt.augment import FixedCopies
from imagegpt.data_config import DataConfig, check_data_config, image_bytes
from imagegpt.device import check_memory
from imagegpt.errors import UserError
from imagegpt.files import check_dir, read_json, resolve_dir, write_json
from imagegpt.settings import build, canonical, check_fields, flat
from imagegpt.sources import load_source
from imagegpt.splits import split_roles
from imagegpt.token_format import TAIL, Vocab
from tokenizer import fit_codebook as fit_book, load_codebook, psnr, uint8_to_tensor

FIT_IMAGES = 30000   # the codebook is fitted on at most this many training images (a seeded sample beyond)


CHUNK = 4096         # images read, transformed and tokenised at a time


SPLITS = ("train", "dev", "test")


SPLIT_FILES = (".jsonl", ".tokens.npy", ".index.npz")


IMAGES_FILE = "train.images.npy"   # with augment_on_the_fly: the training images, uint8 (N, H, W, C)


def token_dtype(vocab_size):
    """The dtype of the token arrays: uint16 while every id fits, else int32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def fit_images(images, tr, copies, cfg):
    """float (n, C, H, W): what the codebook is fitted on: the training images and their fixed copies
    (also with augment_on_the_fly, so that both ways tokenise with the same codebook); a seeded sample
    of FIT_IMAGES of them when there are more."""
    n = len(tr) * (cfg.augment + 1)
    pick = np.arange(n) if n <= FIT_IMAGES else \
        np.sort(np.random.default_rng(cfg.codebook.codebook_seed).choice(n, FIT_IMAGES, replace=False))
    out = []
    for c in range(cfg.augment + 1):
        pos = pick[(pick >= c * len(tr)) & (pick < (c + 1) * len(tr))] - c * len(tr)
        x = uint8_to_tensor(images[tr[pos]])
        out.append(copies(x, c, pos) if c else x)
    return torch.cat(out)


class SplitWriter:
    """One split's files, written chunk by chunk: <name>.jsonl (the interchange format), <name>.tokens.npy
    (n, width) token ids padded with <PAD> (uint16; int32 for a vocabulary of more than 65,536 tokens) and
    <name>.index.npz (labels, lengths: int32 arrays of n)."""

    def __init__(self, folder, name, n, vocab, width):
        self.folder, self.name, self.vocab, self.at = folder, name, vocab, 0
        self.jsonl = open(os.path.join(folder, f"{name}.jsonl"), "w", encoding="utf-8")
        self.tokens = np.lib.format.open_memmap(os.path.join(folder, f"{name}.tokens.npy"), "w+",
                                                token_dtype(len(vocab)), (n, width))
        self.labels = np.zeros(n, np.int32)

    def add(self, rows, labels, lines):
        """rows (n, width) token ids, labels (n,), and their JSONL lines (jsonl_lines)."""
        self.tokens[self.at:self.at + len(rows)] = rows
        self.labels[self.at:self.at + len(rows)] = labels
        self.at += len(rows)
        self.jsonl.write(lines)

    def close(self):
        self.jsonl.close()
        n, width = self.tokens.shape
        self.tokens.flush()
        del self.tokens
        np.savez(os.path.join(self.folder, f"{self.name}.index.npz"), labels=self.labels,
                 lengths=np.full(n, width, np.int32))


def jsonl_lines(rows, labels, metas, tokens):
    """The JSONL records of id rows: exactly json.dumps({"tokens": ..., "label": ..., "meta": ...}) per
    line (token names never need escaping), made by formatting, twice as fast."""
    dumps = json.JSONEncoder().encode
    return "".join('{"tokens": "%s", "label": %d, "meta": %s}\n' % (" ".join([tokens[i] for i in r]), y, dumps(m))
                   for r, y, m in zip(rows.tolist(), labels.tolist(), metas))


def _as_is(item):
    """The DataLoader's collate_fn for prepare: the worker's dict as it is (numpy arrays stay numpy)."""
    return item


class _Chunks(torch.utils.data.Dataset):
    """prepare's work, chunk by chunk (in DataLoader worker processes, one thread each): job k = (split,
    rows, copy, positions) -> the token rows of images[rows[positions]] (copy c > 0: transformed as fixed
    copy c) and their JSONL lines, and the figures of the report (code counts, PSNR sum, 64-bit hashes
    of the images and sequences, seconds reading and tokenising)."""

    def __init__(self, images, labels, meta, jobs, copies, book, vocab, device):
        self.images, self.labels, self.meta, self.jobs = images, labels, meta, jobs
        self.copies, self.book, self.vocab, self.device = copies, book, vocab, device
        self.encoder = book.to(device)

    def __len__(self):
        return len(self.jobs)

    def __getitem__(self, k):
        name, rows, c, pos = self.jobs[k]
        t = time.perf_counter()
        real = np.ascontiguousarray(self.images[rows[pos]])   # a memory-mapped or decoded source is read here
        t2 = time.perf_counter()
        x = uint8_to_tensor(real)
        if c:
            x = self.copies(x, c, pos)
        codes = self.encoder.encode(x.to(self.device)).cpu()
        labels = self.labels[rows[pos]]
        ids = self.vocab.image_id_rows(codes.numpy(), labels)
        metas = [dict(self.meta[j], split=name, **({"augmented": c} if c else {})) for j in rows[pos]]
        out = {"rows": ids.astype(token_dtype(len(self.vocab))), "labels": labels, "read": t2 - t,
               "lines": jsonl_lines(ids, labels, metas, self.vocab.tokens),
               "usage": np.bincount(codes.numpy().ravel(), minlength=self.book.code_space)}
        if c == 0:
            mse = (self.book.decode(codes) - x).pow(2).flatten(1).mean(1).clamp_min(1e-10)
            out["psnr"] = (10 * torch.log10(1 / mse)).sum().item()
            if name != "dev":
                digest = lambda a: [hashlib.blake2b(r.tobytes(), digest_size=8).digest() for r in a]
                out["hashes"] = (digest(real), digest(codes.numpy()))
        out["encode"] = time.perf_counter() - t2
        return out


def prepare(cfg, device="cpu"):
    """Load the source, split, fit the codebook on (a sample of) the training images, then tokenise
    every split in chunks of CHUNK images and write its files (SplitWriter; with augment_on_the_fly also
    the training images). With codebook_from, the images are tokenised with that codebook instead of
    a new one. Nothing is written to data_dir until everything is done -> the report."""
    t0 = time.time()
    check_data_config(cfg)
    cfg, given = given_codebook(cfg)
    check_dir(cfg.data_dir, "data folder")
    images, labels, names, meta = load_source(cfg)
    t_load = time.time() - t0
    tr, dev, te = roles(cfg, images, labels, names)
    copies = FixedCopies(len(tr), cfg.augment, cfg, cfg.split_seed)
    t1 = time.time()
    book = given or fit_codebook(fit_images(images, tr, copies, cfg), cfg, device)
    t_fit = time.time() - t1
    vocab = Vocab(cfg.codebook.num_codes, len(names), cfg.codebook.palette)
    n_copies = 0 if cfg.augment_on_the_fly else cfg.augment
    plan = [("train", tr, n_copies), ("dev", dev, 0), ("test", te, 0)]
    with staged(cfg.data_dir) as (stage, files):
        tally = tokenise((images, labels, meta), plan, copies, book, vocab, device, stage, t_load)
        files += [name + ext for name, rows, _ in plan if len(rows) for ext in SPLIT_FILES]
        if cfg.augment_on_the_fly:  # the training images themselves: training transforms them each epoch
            keep = np.lib.format.open_memmap(os.path.join(stage, IMAGES_FILE), "w+", np.uint8,
                                             (len(tr),) + images.shape[1:])
            for i in range(0, len(tr), CHUNK):
                keep[i:i + CHUNK] = images[tr[i:i + CHUNK]]
            keep.flush()
            del keep
            files.append(IMAGES_FILE)
        vocab.save(os.path.join(stage, "vocab.json"))
        book.save(stage)
    report = {
        "config": flat(cfg),
        "classes": names,
        "counts": {"train": np.bincount(labels[tr], minlength=len(names)).tolist(),
                   "dev": np.bincount(labels[dev], minlength=len(names)).tolist(),
                   "test": np.bincount(labels[te], minlength=len(names)).tolist(),
                   "train_augmented": n_copies * len(tr)},
        "sequence_length": book.seq_len + 1 + TAIL,
        "codebook_sha256": book.sha256,
        **tally.figures(book, t_fit, time.time() - t0),
    }
    write_json(os.path.join(cfg.data_dir, "report.json"), report)
    return report


def given_codebook(cfg):
    """With codebook_from: (cfg with the given codebook's own settings, that codebook), after checking
    that it reads images of cfg's size and channels; without: (cfg, None)."""
    if not cfg.codebook_from:
        return cfg, None
    folder = resolve_dir(cfg.codebook_from)
    if not os.path.isfile(os.path.join(folder, "codebook.json")):
        run = os.path.isdir(os.path.join(folder, "final"))
        raise UserError(f"codebook_from {cfg.codebook_from}: no codebook.json there; expected a checkpoint, a prepared "
                        f"data folder or a Hugging Face export{' (a run folder: give its final/)' if run else ''}")
    book = load_codebook(folder)
    (H, W), C = book.image_size, book.channels
    kind = lambda c: "colour" if c == 3 else "grey"
    if (H, W) != (cfg.image_size, cfg.image_size) or C != cfg.channels:
        raise UserError(f"codebook_from {cfg.codebook_from}: its codebook reads {H} x {W} {kind(C)} images with {C} "
                        f"channel(s), not {cfg.image_size} x {cfg.image_size} {kind(cfg.channels)} with {cfg.channels}; "
                        f"add --image_size {H} --channels {C} (the images are resized and converted to them)")
    cfg = copy.deepcopy(cfg)
    cfg.codebook = copy.deepcopy(book.cfg)   # the settings it was fitted with, which report.json records
    return cfg, book


def roles(cfg, images, labels, names):
    """The three roles of the source's images (splits.split_roles) -> (train, dev, test) index arrays,
    refused in one line where no classifier could be trained or tested on them."""
    tr, dev, te = split_roles(labels, cfg)
    if cfg.dev_fraction > 0 and len(dev) == 0:
        raise UserError(f"{cfg.source}: dev_fraction {cfg.dev_fraction} of {len(tr)} training images is no image")
    if len(tr) == 0 or len(te) == 0:
        raise UserError(f"{cfg.source}: {len(images)} images are too few for a train/test split")
    counts = np.bincount(labels, minlength=len(names))
    if (counts == 0).any():
        name = names[int(np.flatnonzero(counts == 0)[0])]
        kind, _, arg = cfg.source.partition(":")
        raise UserError(f"{os.path.join(arg, name)}: class folder without image files; add images or remove it"
                        if kind in ("folder", "csv") else
                        f"{cfg.source}: no images of class {name} (labels 0..{len(names) - 1}); a class without "
                        f"images cannot be learnt")
    present = [names[c] for c in np.unique(labels)]
    if len(present) < 2:
        raise UserError(f"{cfg.source}: all {len(images)} images are of one class ({present[0]!r}); a "
                        f"classifier needs images of at least 2 classes")
    n_fit = len(tr) * (cfg.augment + 1)
    check_memory(image_bytes(cfg, min(n_fit, FIT_IMAGES) + CHUNK) + 20 * len(tr) * cfg.augment,
                 f"{cfg.source}: {len(tr)} training images x {cfg.augment + 1} (augment {cfg.augment}) and "
                 f"{len(te)} test images of {cfg.image_size} x {cfg.image_size}", hint="lower augment or image_size")
    return tr, dev, te


def fit_codebook(x, cfg, device):
    """tokenizer.fit_codebook on the float images x, with one progress bar per k-means phase: its steps are alike
    within a phase (not across: a Lloyd iteration costs many k-means++ steps), and a bar starts with
    its phase, so that the features computed before are not counted as a step."""
    bars = {}

    def progress(phase, done, total):
        if phase not in bars:
            for bar in bars.values():
                bar.close()
            bars[phase] = tqdm(total=total, desc=f"fitting codebook: {phase}", leave=False)
        bars[phase].update(done - bars[phase].n)

    book = fit_book(x, cfg.codebook, device=device, progress=progress)
    for bar in bars.values():
        bar.close()
    return book


@contextmanager
def staged(data_dir):
    """Yield (a temporary folder inside data_dir, the list of file names to move in): the files are
    written there and moved into data_dir only if the block succeeds (report.json, written after,
    marks the folder as prepared), so an error or a kill leaves none of them half-written. Outputs of
    an earlier prepare that this one does not write (a dev split, on-the-fly images) are removed."""
    made = not os.path.exists(data_dir)
    os.makedirs(data_dir, exist_ok=True)
    for old in glob.glob(os.path.join(data_dir, ".prepare-*")):  # left by a killed earlier run
        shutil.rmtree(old, ignore_errors=True)
    stage = tempfile.mkdtemp(dir=data_dir, prefix=".prepare-")
    files = ["vocab.json", "codebook.json", "codebook.safetensors"]
    try:
        yield stage, files
        for f in [n + ext for n in SPLITS for ext in SPLIT_FILES] + [IMAGES_FILE]:
            if f not in files and os.path.exists(os.path.join(data_dir, f)):
                os.remove(os.path.join(data_dir, f))
        for f in files:
            os.replace(os.path.join(stage, f), os.path.join(data_dir, f))
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if made:
            shutil.rmtree(data_dir, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk: name the folder, not a temporary file in it
            raise UserError(f"{data_dir}: cannot write the prepared files ({e.strerror or e})") from None
        raise
    shutil.rmtree(stage, ignore_errors=True)


def tokenise(source, plan, copies, book, vocab, device, stage, t_read):
    """Tokenise the splits of `plan` ((name, rows, fixed copies) each) of source = (images, labels, their
    meta) chunk by chunk and write their
    files into `stage` -> the Tally of the report's figures. On the CPU every core tokenises chunks in
    its own process (one thread each); on a GPU this process does; either way this process writes the
    files, in order, meanwhile."""
    jobs = [(name, rows, c, np.arange(i, min(i + CHUNK, len(rows))))
            for name, rows, n_copies in plan for c in range(n_copies + 1) for i in range(0, len(rows), CHUNK)]
    n_images = sum(len(rows) * (c + 1) for _, rows, c in plan)
    workers = 0 if str(device) != "cpu" or n_images < 2 * CHUNK else min(os.cpu_count() or 1, len(jobs))
    loader = torch.utils.data.DataLoader(_Chunks(*source, jobs, copies, book, vocab, device),
                                         batch_size=None, num_workers=workers, generator=torch.Generator(),
                                         collate_fn=_as_is)
    writers = {name: SplitWriter(stage, name, len(rows) * (c + 1), vocab, book.seq_len + 1 + TAIL)
               for name, rows, c in plan if len(rows)}
    tally = Tally(book.code_space, n_images, max(workers, 1), t_read)
    bar = None   # started with the first chunk, so that starting the worker processes is not counted
    for (name, rows, c, pos), got in zip(jobs, loader):
        writers[name].add(got["rows"], got["labels"], got["lines"])
        tally.add(name, len(pos), got)
        if bar is None:
            bar = tqdm(total=n_images, initial=len(pos), desc="tokenising", unit="img", leave=False)
        else:
            bar.update(len(pos))
    if bar:
        bar.close()
    tally.seconds = time.time() - tally.start
    for w in writers.values():
        w.close()
    return tally


class Tally:
    """The figures of report.json, gathered chunk by chunk as tokenise() goes: code usage (training and
    test images), PSNR sums of the copies' originals, 64-bit hashes of the distinct images and
    sequences, seconds reading and encoding in the workers."""

    def __init__(self, num_codes, n_images, processes, t_read):
        self.usage = np.zeros(num_codes, np.int64)
        self.psnr, self.distinct = {}, (set(), set())
        self.times = {"read": t_read, "encode": 0.0}
        self.n_images, self.processes = n_images, processes
        self.start, self.seconds = time.time(), None

    def add(self, name, n, got):
        if name != "dev":
            self.usage += got["usage"]
        if "psnr" in got:
            s, k = self.psnr.get(name, (0.0, 0))
            self.psnr[name] = (s + got["psnr"], k + n)
        for seen, new in zip(self.distinct, got.get("hashes", ())):
            seen.update(new)
        self.times["read"] += got["read"]
        self.times["encode"] += got["encode"]

    def figures(self, book, t_fit, total):
        pr = torch.from_numpy(self.usage).double() / self.usage.sum()
        times = self.times
        return {
            "test_psnr_db": round(self.psnr["test"][0] / self.psnr["test"][1], 3),
            "train_psnr_db": round(self.psnr["train"][0] / self.psnr["train"][1], 3),
            **({"dev_psnr_db": round(self.psnr["dev"][0] / self.psnr["dev"][1], 3)} if "dev" in self.psnr else {}),
            "distinct_images": len(self.distinct[0]),
            "distinct_sequences": len(self.distinct[1]),
            "distinct_share": round(len(self.distinct[1]) / len(self.distinct[0]), 6),
            "codes_used": int((self.usage > 0).sum()),
            "code_perplexity": round(math.exp(-(pr[pr > 0] * pr[pr > 0].log()).sum().item()), 1),
            "kmeans_inertia": book.inertia,
            "images_tokenised": self.n_images,
            "tokenise_processes": self.processes,
            "images_per_second": round(self.n_images / self.seconds),
            "images_per_second_end_to_end": round(self.n_images / total),
            "read_share": round(times["read"] / (times["read"] + times["encode"]), 3),
            "seconds_read": round(times["read"], 2),
            "seconds_fit": round(t_fit, 2),
            "seconds_encode": round(times["encode"], 2),
            "seconds_tokenise": round(self.seconds, 2),
            "seconds_total": round(total, 2),
        }


def ensure_prepared(cfg, device="cpu", log=print):
    """Prepare cfg.data_dir unless it already holds files made with the same data settings."""
    path = os.path.join(cfg.data_dir, "report.json")
    if os.path.exists(path):
        report = read_json(path, "report.json")
        made = report.get("config") if isinstance(report, dict) else None
        if not isinstance(made, dict):
            raise UserError(f"{path}: expected a JSON object with the data settings under \"config\" "
                            f"(a report.json written by data.py prepare)")
        cfg, given = given_codebook(cfg)
        made, want = canonical(DataConfig, made), flat(cfg)
        default = flat(DataConfig())   # a setting newer than the folder: it was prepared with the default
        diff = [k for k in want if k != "data_dir" and made.get(k, default[k]) != want[k]]
        if given and report.get("codebook_sha256") != given.sha256:
            diff.append(f"the codebook of {cfg.codebook_from}")
        if diff:
            raise UserError(f"{cfg.data_dir} was prepared with other data settings ({', '.join(diff)}); "
                            f"use another data_dir or delete it")
        return report
    log(f"preparing {cfg.data_dir} from {cfg.source} ...")
    return prepare(cfg, device)


def split_file(data_dir, name):
    """<data_dir>/<name>.jsonl, the sequences of a split; a folder prepared before the test split had its
    name holds it as val.jsonl (the original project's name), which is read instead."""
    path = os.path.join(data_dir, f"{name}.jsonl")
    old = os.path.join(data_dir, "val.jsonl")
    return old if name == "test" and not os.path.exists(path) and os.path.exists(old) else path


def read_report(data_dir):
    """<data_dir>/report.json -> (the report, the data settings it was prepared with), checked."""
    path = os.path.join(data_dir, "report.json")
    rep = read_json(path, "report.json")
    if not isinstance(rep, dict) or "config" not in rep:
        raise UserError(f'{path}: expected a JSON object with the data settings under "config" '
                        f'(a report.json written by data.py prepare)')
    check_fields(rep["config"], DataConfig, path, "config.")
    cfg = build(DataConfig, rep["config"], where=f"{path}: config")
    check_data_config(cfg, path)
    return rep, cfg


def reconstructions(data_dir, n):
    """The first n test images of a prepared folder, each followed by its codebook reconstruction ->
    (images (2n, C, H, W), captions, mean PSNR of the reconstructions in dB)."""
    _, cfg = read_report(data_dir)
    images, labels, names, _ = load_source(cfg)
    test = split_roles(labels, cfg)[2][:n]
    book = load_codebook(data_dir)
    x = uint8_to_tensor(images[test])
    recon = book.decode(book.encode(x))
    captions = [f"{names[labels[i]]} {s}" for i in test for s in ("real", "code")]
    return torch.stack([x, recon], 1).flatten(0, 1), captions, psnr(recon, x)
