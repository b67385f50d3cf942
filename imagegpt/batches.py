"""Training batches: the rows of a prepared split and each process's micro-batches of an epoch.

A split's rows come from, in this order of preference:
    AugmentedRows  with augment_on_the_fly (training split only): the training images (train.images.npy,
                   memory-mapped), transformed and tokenised with the codebook when a batch is gathered
    ShardRows      <split>.tokens.npy through a memory map (only the rows of a batch are read) and its
                   index <split>.index.npz (labels, lengths)
    ListRows       <split>.jsonl, parsed into memory (folders prepared before the token arrays existed)
and ConditionedRows adds class-conditioned copies of a seeded share of them (cond_fraction).

epoch_steps() yields, step by step, this process's grad_accum micro-batches (x, y, loss weights). The
epoch's order is torch.randperm seeded with seed + epoch; each step takes the next batch_size x
grad_accum x processes rows of it and each process gathers only its own share, in torch DataLoader
workers (num_workers; 0 gathers in the training process). What a batch holds depends only on (seed,
epoch, row), never on the number of workers, so a resumed run replays the same batches.
"""
import os

import numpy as np
import torch

from imagegpt.augment import make_copy, move_width, moves
from imagegpt.errors import UserError
from imagegpt.prepare import IMAGES_FILE
from imagegpt.sequences import make_batch, read_sequences
from tokenizer import uint8_to_tensor

V2_HINT = "training needs the v2 tail </IMG> <CLS> <CLS_y> <EOS>: prepare the data again with data.py prepare"


class ListRows:
    """Sequences held in memory (a JSONL file)."""

    def __init__(self, seqs):
        self.seqs = seqs
        self.n = len(seqs)
        self.lengths = np.array([len(s) for s in seqs])
        self.longest = int(self.lengths.max())

    def get(self, idx, epoch):
        return [self.seqs[i] for i in idx.tolist()]


def read_index(folder, name):
    """<folder>/<name>.index.npz -> (labels, lengths) int arrays of one length, never unpickled."""
    path = os.path.join(folder, f"{name}.index.npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            labels, lengths = z["labels"], z["lengths"]
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not an index written by data.py prepare ({str(e).splitlines()[0][:120]})") from None
    if labels.ndim != 1 or labels.shape != lengths.shape or labels.dtype.kind not in "iu" \
            or lengths.dtype.kind not in "iu":
        raise UserError(f"{path}: expected integer arrays labels and lengths of one length, got "
                        f"{labels.dtype} {labels.shape} and {lengths.dtype} {lengths.shape}")
    return labels, lengths


def open_array(path, what):
    """A .npy file as a read-only memory map (never unpickled) -> array."""
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it as {what} ({str(e).splitlines()[0][:120]})") from None


def gather(array, idx):
    """array[idx] for rows idx (numpy ints). A memory-mapped array is read with one pread per row, not
    through the map: a page touched through a map counts in the process's memory (RSS), and the kernel
    maps the neighbours of each page touched (fault-around), so random rows would grow it step by step."""
    if not isinstance(array, np.memmap):
        return array[idx]
    out = np.empty((len(idx),) + array.shape[1:], array.dtype)
    rows = out.reshape(len(idx), -1).view(np.uint8)
    size = rows.shape[1]
    fd = os.open(array.filename, os.O_RDONLY)
    try:
        for k, i in enumerate(idx.tolist()):
            if os.preadv(fd, [rows[k]], array.offset + i * size) != size:
                raise UserError(f"{array.filename}: row {i} is cut short (the file is truncated)")
    finally:
        os.close(fd)
    return out


class ShardRows:
    """<name>.tokens.npy (n, width) token ids padded with <PAD>, read through a memory map; lengths and
    labels from <name>.index.npz."""

    def __init__(self, folder, name, vocab):
        self.path = os.path.join(folder, f"{name}.tokens.npy")
        self.tokens = open_array(self.path, "a token array")
        self.labels, self.lengths = read_index(folder, name)
        self.vocab_size = len(vocab)
        if self.tokens.ndim != 2 or self.tokens.dtype not in (np.uint16, np.int32) \
                or len(self.tokens) != len(self.lengths) or len(self.lengths) == 0:
            raise UserError(f"{self.path}: expected a non-empty (n, width) uint16 or int32 array with the "
                            f"{len(self.lengths)} rows of {name}.index.npz, got {self.tokens.dtype} {self.tokens.shape}")
        self.n = len(self.tokens)
        self.longest = int(self.lengths.max())
        if self.longest > self.tokens.shape[1] or self.lengths.min() < 2:
            raise UserError(f"{folder}/{name}.index.npz: lengths {self.lengths.min()}..{self.longest} do not fit "
                            f"the {self.tokens.shape[1]} columns of {self.path}")

    def get(self, idx, epoch):
        rows = gather(self.tokens, idx)
        if rows.size and int(rows.max()) >= self.vocab_size:
            raise UserError(f"{self.path}: token id {int(rows.max())} is outside the vocabulary of {self.vocab_size}")
        return [r[:k] for r, k in zip(rows.tolist(), self.lengths[idx].tolist())]


class AugmentedRows:
    """augment_on_the_fly: an epoch has (augment + 1) x N rows; row j is training image j mod N, as it is
    for j < N, else rotated and shifted by amounts drawn from (seed, epoch, j) (uniform within
    max_rotate degrees and max_shift pixels, scaled and sheared within max_scale and max_shear, warped within
    max_elastic, as the fixed copies), then tokenised with the codebook."""

    def __init__(self, folder, vocab, book, cfg):
        path = os.path.join(folder, IMAGES_FILE)
        self.images = open_array(path, "training images")
        self.labels = read_index(folder, "train")[0]
        self.N = len(self.images)
        if self.images.dtype != np.uint8 or self.images.shape[1:] != (*book.image_size, book.channels) \
                or len(self.labels) < self.N:
            raise UserError(f"{path}: expected uint8 images (N, {book.image_size[0]}, {book.image_size[1]}, "
                            f"{book.channels}) with their labels in train.index.npz, got {self.images.dtype} "
                            f"{self.images.shape}")
        self.vocab, self.book, self.seed, self.jitter = vocab, book, cfg.seed, cfg.data
        self.n = self.N * (cfg.data.augment + 1)
        self.longest = book.seq_len + 5
        self.lengths = np.broadcast_to(np.int64(self.longest), (self.n,))   # all alike; no memory

    def params(self, idx, epoch):
        """The moves of rows idx in this epoch: float32 (n, move_width) as augment.transform takes them."""
        w = move_width(self.jitter)
        u = np.array([np.random.default_rng([self.seed, epoch, j]).random(w) for j in idx.tolist()]).reshape(-1, w)
        return moves(torch.from_numpy(u * 2 - 1).float(), self.jitter)

    def get(self, idx, epoch):
        x = uint8_to_tensor(gather(self.images, idx % self.N))
        moved = torch.from_numpy(idx >= self.N)
        if moved.any():
            x[moved] = make_copy(x[moved], self.params(idx[idx >= self.N], epoch), torch.from_numpy(idx[idx >= self.N] // self.N),
                                 self.jitter)
        rows = self.vocab.image_id_rows(self.book.encode(x).numpy(), self.labels[idx % self.N])
        return rows.tolist()


class ConditionedRows:
    """base's rows, then class-conditioned copies '<CLS_y> <IMG> codes </IMG> <EOS>' of a seeded share
    `fraction` of them, the class replaced by the no-class marker <UNK> with probability `drop` (the
    classifier-free guidance recipe). The copies are added to the plain rows, never replace them."""

    def __init__(self, base, vocab, fraction, drop, seed):
        rng = np.random.default_rng(seed)
        self.pick = np.sort(rng.permutation(base.n)[:int(round(fraction * base.n))])
        self.unstated = rng.random(len(self.pick)) < drop
        self.base, self.vocab = base, vocab
        self.n = base.n + len(self.pick)
        self.longest = base.longest
        self.lengths = np.concatenate([base.lengths, base.lengths[self.pick] - 1])

    def get(self, idx, epoch):
        copy = idx >= self.base.n
        k = np.where(copy, idx - self.base.n, 0)
        seqs = self.base.get(np.where(copy, self.pick[k], idx), epoch)
        return [self.vocab.conditioned(s, None if self.unstated[j] else s[-2] - self.vocab.label_offset) if c else s
                for s, c, j in zip(seqs, copy.tolist(), k.tolist())]


def open_rows(cfg, name, vocab, book=None, conditioned=False):
    """The rows of split `name` of cfg.data.data_dir (see the module docstring)."""
    folder = cfg.data.data_dir
    if name == "train" and cfg.data.augment_on_the_fly:
        rows = AugmentedRows(folder, vocab, book, cfg)
    elif os.path.exists(os.path.join(folder, f"{name}.tokens.npy")):
        rows = ShardRows(folder, name, vocab)
    else:
        rows = ListRows(read_sequences(os.path.join(folder, f"{name}.jsonl"), vocab, v1_hint=V2_HINT)[0])
    if conditioned and cfg.cond_fraction > 0:
        rows = ConditionedRows(rows, vocab, cfg.cond_fraction, cfg.cond_drop, cfg.seed)
    return rows


def micro_batch(rows, idx, epoch, block, width, pad_id, label_weight):
    """Rows idx (numpy) of an epoch -> x, y (len(idx), width - 1) as make_batch makes them, and the loss
    weight of each target: 1, label_weight at <CLS> (the label token), 0 at padding."""
    x, y, cls_pos = make_batch(rows.get(idx, epoch), block, pad_id, width)
    w = (y != -100).float()
    plain = (cls_pos >= 0).nonzero().squeeze(1)   # conditioned rows have no <CLS> and no label target
    w[plain, cls_pos[plain]] = label_weight
    return x, y, w


class _MicroBatches(torch.utils.data.Dataset):
    def __init__(self, rows, batches, epoch, args):
        self.rows, self.batches, self.epoch, self.args = rows, batches, epoch, args

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, i):
        return micro_batch(self.rows, self.batches[i], self.epoch, *self.args)


def epoch_order(n, seed, epoch):
    """The order of the rows in an epoch: it depends only on (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def epoch_steps(rows, epoch, start, cfg, procs, shape):
    """This process's micro-batches for steps start, start + 1, ... of an epoch: each step a list of
    grad_accum (x, y, w). Global step k is rows order[k * S:(k + 1) * S] (S = batch_size x grad_accum x
    world); process r takes its r-th part of it, in grad_accum micro-batches. procs: this process's rank
    and the world's size (processes.Processes); shape: (block, width, pad_id) of every micro-batch."""
    rank, world = procs.rank, procs.world
    block, width, pad_id = shape
    per_step = cfg.batch_size * cfg.grad_accum * world
    steps = rows.n // per_step
    order = epoch_order(rows.n, cfg.seed, epoch)[:steps * per_step]
    mine = order.view(steps, world, cfg.grad_accum, cfg.batch_size)[start:, rank].reshape(-1, cfg.batch_size)
    data = _MicroBatches(rows, list(mine.numpy()), epoch, (block, width, pad_id, cfg.label_weight))
    # its own generator: a DataLoader draws its workers' base seed from it, never from the global RNG
    # (which dropout uses, and which a resumed run restores as it was at the checkpoint)
    loader = torch.utils.data.DataLoader(data, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                                         generator=torch.Generator())
    it = iter(loader)
    for _ in range(steps - start):
        yield [next(it) for _ in range(cfg.grad_accum)]
