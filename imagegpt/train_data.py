"""The data a training run reads: its prepared folder (prepared first if needed), the training rows
gathered step by step, the development split, the sequence length it trains with, its class names. The
test split is never read here: no training decision sees it."""
import os
from dataclasses import dataclass

import numpy as np
import torch.distributed as dist

from imagegpt.batches import open_rows
from imagegpt.errors import UserError
from imagegpt.files import read_json
from imagegpt.prepare import ensure_prepared
from imagegpt.sequences import make_batch
from imagegpt.token_format import Vocab, check_class_names
from tokenizer import Codebook, load_tokens


@dataclass
class Data:
    """What a run trains and evaluates on."""
    vocab: Vocab
    book: Codebook
    train: object  # the training rows (batches.open_rows): gathered step by step, never all at once
    dev: tuple     # the development split (x, y, cls_pos), or None: then training evaluates nothing
    block: int = 0          # the sequence length trained with (the model's block size)
    width: int = 0          # the width of every training row (min(block, longest sequence))
    class_names: list = None   # from report.json: the checkpoints carry them


def load_data(cfg, procs, log):
    """Prepare the data folder if needed (rank 0; the others wait), open the training rows and read the
    development split. The test split (val.*) is never read here: no training decision sees it."""
    if procs.master:
        ensure_prepared(cfg.data, device=procs.device, log=log)
    if procs.ddp:
        dist.barrier()
    vocab, book = load_tokens(cfg.data.data_dir)
    splits = {"train": open_rows(cfg, "train", vocab, book, conditioned=True)}
    if any(os.path.exists(os.path.join(cfg.data.data_dir, "dev" + ext)) for ext in (".tokens.npy", ".jsonl")):
        splits["dev"] = open_rows(cfg, "dev", vocab)
    block = block_size(cfg, splits, cfg.data.data_dir)
    cut = sum(int((r.lengths > block).sum()) for r in splits.values()) if block < max(
        r.longest for r in splits.values()) else 0
    if cut:
        log(f"note: max_length {block} cuts the image tokens of {cut} sequences (allow_truncation: true)")
    dev = splits.get("dev")
    dev = make_batch(dev.get(np.arange(dev.n), 0), block, vocab.pad_id) if dev else None
    report = os.path.join(cfg.data.data_dir, "report.json")
    rep = read_json(report, "report.json")
    names = check_class_names(rep.get("classes") if isinstance(rep, dict) else None, vocab, f"{report}: classes")
    return Data(vocab, book, splits["train"], dev, block, min(block, splits["train"].longest), names)


def load_split(cfg, name, vocab, conditioned=False, book=None):
    """The whole split `name` of cfg.data.data_dir (token arrays, or JSONL) -> x, y (N, T) next-token inputs and
    targets, cls_pos (N,); with conditioned=True and cfg.cond_fraction > 0 the class-conditioned copies
    follow the plain sequences."""
    rows = open_rows(cfg, name, vocab, book, conditioned)
    return make_batch(rows.get(np.arange(rows.n), 0), cfg.max_length, vocab.pad_id)


def block_size(cfg, splits, where):
    """The sequence length to train with: cfg.max_length, or with 0 the longest sequence of `splits`
    (name -> rows). A max_length that would cut sequences is refused, naming how many and what it would
    take, unless cfg.allow_truncation."""
    longest = max(r.longest for r in splits.values())
    block = cfg.max_length or longest
    if block >= longest or cfg.allow_truncation:
        return block
    cut = " and ".join(f"{int((r.lengths > block).sum())} of {r.n} {name}" for name, r in splits.items())
    raise UserError(too_short(block, longest, where, f"{cut} sequences"))


def too_short(block, longest, where, cut):
    return (f"config: max_length {block} is shorter than the sequences of {where} ({longest} tokens): it would "
            f"cut {cut} (up to {longest - block} image tokens each, the bottom of the image); set max_length: "
            f"{longest} (or 0, the data's length), or allow_truncation: true to train on the cut images")
