"""The image codebook: images <-> code grids (k-means over per-patch features).

The codebook turns every p x p patch of an image into a multi-dimensional feature vector in the
original's groups (position x, y; time t; colour; gradient Gx, Gy), standardises each group, weights
it, and maps it to the nearest of K centroids found by k-means (k-means++ start, batched Lloyd steps
in torch). Each code remembers the mean colour of its patches, so any code grid decodes to an image.
"""
import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F

from imagegpt.device import check_memory
from imagegpt.errors import UserError
from imagegpt.files import (
    atomic_path,
    check_finite_tensors,
    json_type,
    load_safetensors,
    read_json,
    safetensors_error,
    write_json,
)
from imagegpt.settings import check_fields

GROUPS = ("position", "time", "colour", "gradient")


# ----------------------------------------------------------------------------- k-means

def assign(x, c, chunk=None):
    """Nearest centroid for each row of x (n, D) among c (k, D): (labels (n,), squared distance (n,)).
    argmin ||x - c||^2 = argmin (||c||^2 - 2 x.c), one fused addmm per chunk of rows; the default
    chunk keeps each (chunk, k) block of distances near 2 MB, so it stays in cache for the min.
    Always in the inputs' precision: under a caller's bf16 autocast the distances would be rounded and
    images would get other codes than prepare.prepare gave them."""
    chunk = chunk or max(256, (1 << 19) // max(len(c), 1))
    c_sq = c.pow(2).sum(1)
    labels, dists = [], []
    with torch.autocast(x.device.type, enabled=False):
        for i in range(0, len(x), chunk):
            xi = x[i:i + chunk]
            d, l = torch.addmm(c_sq, xi, c.T, alpha=-2).min(1)
            labels.append(l)
            dists.append((d + xi.pow(2).sum(1)).clamp_min_(0))
    return torch.cat(labels), torch.cat(dists)


def _draw(weights, trials, g):
    """`trials` indices drawn with replacement with probability proportional to weights (n,),
    by inverse transform sampling: uniform draws from the CPU generator g, searched in the
    cumulative sum (float64). All-zero weights draw uniformly."""
    cum = weights.double().cumsum(0)
    total = cum[-1].item()
    if not total > 0:
        return torch.randint(len(weights), (trials,), generator=g).to(weights.device)
    r = torch.rand(trials, generator=g, dtype=torch.float64).to(weights.device) * total
    return torch.searchsorted(cum, r, right=True).clamp_max_(len(weights) - 1)


def kmeans(x, k, iters=30, seed=0, tol=1e-4, progress=None):
    """k-means with a greedy k-means++ start and full-batch Lloyd steps. x (n, D) float32 on any
    device. Deterministic for a seed on a given device. Returns (centroids (k, D), inertia).
    progress(phase, done, total): called when each phase begins (done 0) and after each of its steps;
    phase "k-means++ start" has k - 1 steps, "Lloyd iterations" at most `iters` (it may stop early).

    Identical rows are merged first and the distinct rows carry their counts as weights (weighted
    k-means++ sampling, weighted means): the same objective and the same steps as on the full
    multiset, at the cost of the distinct rows only (image features repeat a lot: blank patches)."""
    n = len(x)
    if n < k:
        raise UserError(f"k-means needs at least {k} feature vectors, got {n}")
    g = torch.Generator().manual_seed(seed)
    x, w = torch.unique(x, dim=0, return_counts=True)     # distinct rows (sorted), multiplicities
    w = w.to(x.dtype)
    m = len(x)
    trials = 2 + int(math.log(k))
    centroids = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    centroids[0] = x[_draw(w, 1, g)[0]]
    x_sq = x.pow(2).sum(1)
    closest = assign(x, centroids[:1])[1]
    if progress:
        progress("k-means++ start", 0, k - 1)
    for i in range(1, k):  # each step: sample candidates by D^2, keep the one that lowers the potential most
        cand = _draw(closest * w, trials, g)
        d = torch.addmm(x_sq[cand, None], x[cand], x.T, alpha=-2).add_(x_sq)   # (trials, m) distances
        d = torch.minimum(d, closest, out=d)               # each point's distance after adding a candidate
        best = (d @ w).argmin()                            # the candidate with the lowest potential
        centroids[i] = x[cand[best]]
        closest = d[best].clamp_min_(0)                    # (rounding can leave tiny negatives)
        if progress:
            progress("k-means++ start", i, k - 1)
    xw = x * w[:, None]
    prev = None
    if progress:
        progress("Lloyd iterations", 0, iters)
    for it in range(iters):
        labels, d = assign(x, centroids)
        inertia = (d @ w).item()
        sums = torch.zeros_like(centroids).index_add_(0, labels, xw)
        counts = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, labels, w)
        empty = (counts == 0).nonzero().flatten()
        centroids = sums / counts.clamp_min(1)[:, None]
        if len(empty):  # re-seed empty clusters at the points farthest from their centroid
            far = d.argsort(descending=True)               # (fewer distinct rows than empties: reuse)
            centroids[empty] = x[far[torch.arange(len(empty), device=x.device) % m]]
        if progress:
            progress("Lloyd iterations", it + 1, iters)
        if prev is not None and len(empty) == 0 and prev - inertia <= tol * prev:
            break
        prev = inertia
    labels, d = assign(x, centroids)
    return centroids, (d @ w).item()


# ----------------------------------------------------------------------------- codebook

@dataclass
class CodebookConfig:
    """How images become codes: the patch a token stands for, the number of codes, the feature weights."""
    patch_size: int = 4
    """a token stands for a patch_size x patch_size patch of pixels (1: one pixel, as the original)"""
    num_codes: int = 500
    """codes in the codebook (K): the image tokens <Z_0> .. <Z_K-1>"""
    w_position: float = 0.0
    """weight of a patch's position (x, y) in its features; 0 leaves it out"""
    w_time: float = 0.0
    """weight of the time (frame) feature t, 0 for still images; 0 leaves it out"""
    w_colour: float = 1.0
    """weight of a patch's pixel values (grey or R, G, B) in its features"""
    w_gradient: float = 0.5
    """weight of the intensity gradients (Gx, Gy) in a patch's features; 0 leaves them out"""
    fit_samples: int = 300000
    """patches sampled from the training images for k-means"""
    kmeans_iters: int = 30
    """largest number of k-means (Lloyd) iterations after the k-means++ start"""
    codebook_seed: int = 0
    """seed of the k-means start and of the patches sampled for it"""


def pixel_features(images, p):
    """images (N, C, H, W) float in [0, 1] -> per-patch feature groups, each (N, L, dim) with
    L = (H/p)(W/p) patches in raster order: position (x, y of the patch centre, in [0, 1]), time t
    (0 for still images), colour (the C*p*p values), gradient (Gx, Gy of the intensity, 2*p*p)."""
    N, C, H, W = images.shape
    inten = images.mean(1)                                  # (N, H, W)
    gy, gx = torch.gradient(inten, dim=(1, 2))              # central differences, like numpy
    patches = lambda t: F.unfold(t, p, stride=p).transpose(1, 2)  # (N, C', H, W) -> (N, L, C'*p*p)
    ys, xs = torch.meshgrid(torch.arange(0, H, p), torch.arange(0, W, p), indexing="ij")
    pos = torch.stack([(xs + (p - 1) / 2) / max(W - 1, 1), (ys + (p - 1) / 2) / max(H - 1, 1)], -1)
    L = pos.shape[0] * pos.shape[1]
    return {
        "position": pos.reshape(1, L, 2).expand(N, L, 2).to(images),
        "time": torch.zeros(N, L, 1, dtype=images.dtype, device=images.device),
        "colour": patches(images),
        "gradient": patches(torch.stack([gx, gy], 1)),
    }


class Codebook:
    """Standardisation stats, centroids and per-code mean colours; see the module docstring."""

    def __init__(self, cfg, image_size, channels, stats, centroids, colours, inertia=None):
        self.cfg, self.image_size, self.channels = cfg, tuple(image_size), channels
        self.stats = stats            # group -> (mean (dim,), scalar std)
        self.centroids = centroids    # (K, D) in weighted standardised feature space
        self.colours = colours        # (K, C*p*p) mean raw colour of each code's patches
        self.inertia = inertia

    @property
    def grid(self):  # (rows, cols) of codes per image
        p = self.cfg.patch_size
        return self.image_size[0] // p, self.image_size[1] // p

    @property
    def seq_len(self):
        return self.grid[0] * self.grid[1]

    @staticmethod
    def _groups(cfg):
        return [g for g in GROUPS if getattr(cfg, "w_" + g) > 0]

    def features(self, images):
        """images (N, C, H, W) -> weighted standardised features (N, L, D)."""
        groups = pixel_features(images.float(), self.cfg.patch_size)
        out = []
        for g in self._groups(self.cfg):
            mean, std = self.stats[g]
            f = groups[g]
            out.append((f - mean.to(f)) / std * (getattr(self.cfg, "w_" + g) / math.sqrt(f.shape[-1])))
        return torch.cat(out, -1)

    @classmethod
    def fit_data(cls, images, cfg):
        """What fit() clusters: (codebook with its standardisation stats but no centroids yet,
        features (n, D) of cfg.fit_samples patches drawn from images (N, C, H, W) float in [0, 1],
        their raw colours (n, C*p*p)). cfg may carry more settings (a DataConfig)."""
        cfg = CodebookConfig(**{f.name: getattr(cfg, f.name) for f in fields(CodebookConfig)})
        N, C, H, W = images.shape
        p = cfg.patch_size
        if H % p or W % p:
            raise UserError(f"image size {H}x{W} is not divisible by patch_size {p}")
        if not cls._groups(cfg):
            raise UserError("all feature group weights are 0; at least one must be positive")
        g = torch.Generator().manual_seed(cfg.codebook_seed)
        groups = pixel_features(images.float(), p)
        L = groups["colour"].shape[1]
        take = torch.randperm(N * L, generator=g)[:cfg.fit_samples]
        stats = {}
        for name, f in groups.items():
            f = f.reshape(N * L, -1)[take]
            mean = f.mean(0)
            std = (f - mean).pow(2).mean().sqrt().item()  # one scale per group keeps its geometry
            stats[name] = (mean, std if std > 1e-8 else 1.0)
        book = cls(cfg, (H, W), C, stats, None, None)
        x = book.features(images).reshape(N * L, -1)[take]
        return book, x, groups["colour"].reshape(N * L, -1)[take]

    @classmethod
    def fit(cls, images, cfg, device="cpu", progress=None):
        """Fit on training images (N, C, H, W) float in [0, 1]. cfg may carry more settings (a
        DataConfig); the codebook keeps only its own, so that codebook.json loads back."""
        book, x, raw = cls.fit_data(images, cfg)
        cfg = book.cfg
        if len(x) < cfg.num_codes:
            raise UserError(f"the codebook is fitted on {len(x)} patches ({len(images)} training images, at most "
                            f"fit_samples {cfg.fit_samples}), fewer than num_codes {cfg.num_codes}: pass --num_codes "
                            f"{len(x)} or fewer, or more images")
        x = x.to(device)
        book.centroids, book.inertia = kmeans(x, cfg.num_codes, cfg.kmeans_iters, cfg.codebook_seed,
                                              progress=progress)
        labels = assign(x, book.centroids)[0].cpu()
        counts = torch.bincount(labels, minlength=cfg.num_codes).clamp_min(1)[:, None]
        book.colours = torch.zeros(cfg.num_codes, raw.shape[1]).index_add_(0, labels, raw) / counts
        book.centroids = book.centroids.cpu()
        return book

    def encode(self, images, batch=1024):
        """images (N, C, H, W) -> code grid indices (N, L) long, raster order."""
        if tuple(images.shape[1:]) != (self.channels, *self.image_size):
            raise UserError(f"images are {tuple(images.shape[1:])}, the codebook expects "
                            f"{(self.channels, *self.image_size)} (C, H, W)")
        out = []
        for i in range(0, len(images), batch):
            f = self.features(images[i:i + batch])
            out.append(assign(f.reshape(-1, f.shape[-1]), self.centroids)[0].reshape(f.shape[:2]))
        return torch.cat(out) if out else torch.zeros(0, self.seq_len, dtype=torch.long)

    def to(self, device):
        """This codebook with its centroids and statistics on `device` (for encode there)."""
        if str(device) == "cpu":
            return self
        stats = {g: (m.to(device), s) for g, (m, s) in self.stats.items()}
        return Codebook(self.cfg, self.image_size, self.channels, stats, self.centroids.to(device),
                        self.colours.to(device), self.inertia)

    def decode(self, codes):
        """codes (N, L) long (-1 = missing, drawn black) -> images (N, C, H, W) float in [0, 1]."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        cols = self.colours[codes.clamp_min(0)] * (codes >= 0)[..., None]   # (N, L, C*p*p)
        p = self.cfg.patch_size
        return F.fold(cols.transpose(1, 2), self.image_size, p, stride=p).clamp(0, 1)

    def decode_ids(self, ids, vocab):
        """Any token-id sequence (real or generated) -> one image (C, H, W): the code tokens of its
        image part fill the grid in raster order; missing cells stay black."""
        codes = [k for k in vocab.image_codes(ids) if k < len(self.colours)][:self.seq_len]
        return self.decode(torch.tensor([codes + [-1] * (self.seq_len - len(codes))]))[0]

    def prefixes(self, images, vocab):
        """uint8 images (N, H, W, C) -> classification prefixes '<IMG> codes </IMG> <CLS>' (id lists)."""
        return [vocab.prefix_ids(row) for row in self.encode(uint8_to_tensor(images)).tolist()]

    # -- files: codebook.json (settings, shapes, standardisation stats, sha256) + codebook.safetensors

    def _meta(self):
        return {"config": asdict(self.cfg), "image_size": list(self.image_size), "channels": self.channels,
                "stats": {g: {"mean": m.tolist(), "std": s} for g, (m, s) in self.stats.items()}}

    @property
    def sha256(self):
        """A hash of everything that decides the codes of an image and the pixels of a code (settings,
        image size, standardisation, centroids, colours): two codebooks tokenise alike if and only if
        it is equal. Stored in codebook.json; --init_from compares it with the data's."""
        h = hashlib.sha256(json.dumps(self._meta(), sort_keys=True).encode())
        for t in (self.centroids, self.colours):
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def save(self, folder):
        from safetensors.torch import save_file
        meta = {**self._meta(), "inertia": self.inertia, "sha256": self.sha256}
        with atomic_path(os.path.join(folder, "codebook.safetensors")) as tmp:
            save_file({"centroids": self.centroids.contiguous(), "colours": self.colours.contiguous()}, tmp)
        write_json(os.path.join(folder, "codebook.json"), meta)

    @classmethod
    def load(cls, folder):
        from safetensors import SafetensorError
        path = os.path.join(folder, "codebook.json")
        meta = check_meta(read_json(path, "codebook.json"), path)
        try:
            cfg = CodebookConfig(**meta["config"])
            stats = {g: (torch.tensor(v["mean"], dtype=torch.float32), float(v["std"]))
                     for g, v in meta["stats"].items()}
            tensors = load_safetensors(os.path.join(folder, "codebook.safetensors"))
            book = cls(cfg, meta["image_size"], int(meta["channels"]), stats,
                       tensors["centroids"], tensors["colours"], meta.get("inertia"))
        except FileNotFoundError:
            raise UserError(f"{folder}: codebook.safetensors is missing") from None
        except SafetensorError as e:
            raise UserError(safetensors_error(os.path.join(folder, "codebook.safetensors"), e)) from None
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{folder}: not a codebook written by this project ({e})") from None
        if book.centroids.shape[0] != cfg.num_codes:
            raise UserError(f"{folder}: codebook has {book.centroids.shape[0]} centroids, "
                            f"its settings say {cfg.num_codes}")
        book._check(folder)
        check_finite_tensors({"centroids": book.centroids, "colours": book.colours,
                              **{f"stats.{g}.mean": m for g, (m, _) in book.stats.items()}},
                             os.path.join(folder, "codebook.safetensors"))
        if "sha256" in meta and meta["sha256"] != book.sha256:   # codebooks saved before the hash have none
            raise UserError(f"{path}: its sha256 does not match the codebook's contents (codebook.json or "
                            f"codebook.safetensors was changed or mixed up with another codebook's)")
        return book

    def _check(self, folder):
        """Shapes that must agree with each other (a hand-edited or mixed-up codebook fails here, in
        one line, rather than deep inside encode or decode)."""
        p, C, size = self.cfg.patch_size, self.channels, self.image_size
        where = os.path.join(folder, "codebook.json")
        if not (isinstance(p, int) and p >= 1 and C in (1, 3) and len(size) == 2
                and all(isinstance(n, int) and n >= 1 and n % p == 0 for n in size)):
            raise UserError(f"{where}: image_size {list(size)}, channels {C}, patch_size {p}: expected "
                            f"channels 1 or 3 and an image size divisible by the patch size")
        check_memory(4 * size[0] * size[1] * (3 * C + 7), f"{where}: image_size {list(size)}: one image and its "
                     f"patch features")
        dims = {"position": 2, "time": 1, "colour": C * p * p, "gradient": 2 * p * p}
        want = sum(dims[g] for g in self._groups(self.cfg))
        bad = [g for g in self._groups(self.cfg) if g not in self.stats or self.stats[g][0].shape != (dims[g],)]
        if (bad or self.centroids.dim() != 2 or self.centroids.shape[1] != want
                or tuple(self.colours.shape) != (self.cfg.num_codes, C * p * p)):
            raise UserError(f"{where}: the codebook's arrays do not fit its settings (centroids "
                            f"{tuple(self.centroids.shape)}, colours {tuple(self.colours.shape)}; expected "
                            f"({self.cfg.num_codes}, {want}) and ({self.cfg.num_codes}, {C * p * p})"
                            f"{', statistics of ' + ', '.join(bad) if bad else ''})")


def check_meta(meta, where):
    """codebook.json as read from disk -> the same dict, if every value has the JSON type save() writes."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    integer = lambda v: isinstance(v, int) and not isinstance(v, bool)

    def bad(key, v, want):
        raise UserError(f"{where}: {key} is {json_type(v)} ({str(v)[:40]}), expected {want}")

    if not isinstance(meta, dict):
        raise UserError(f"{where}: the file is {json_type(meta)}, expected a JSON object (a codebook.json "
                        f"written by this project)")
    for key in ("config", "image_size", "channels", "stats"):
        if key not in meta:
            raise UserError(f"{where}: no {key!r}; not a codebook written by this project")
    check_fields(meta["config"], CodebookConfig, where, "config.")
    size = meta["image_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(integer(n) and n >= 1 for n in size)):
        bad("image_size", size, "a list of two positive integers")
    if not integer(meta["channels"]):
        bad("channels", meta["channels"], "an integer")
    if not (meta.get("inertia") is None or number(meta["inertia"])):
        bad("inertia", meta["inertia"], "a number or null")
    if "sha256" in meta and not isinstance(meta["sha256"], str):
        bad("sha256", meta["sha256"], "a string")
    if not isinstance(meta["stats"], dict):
        bad("stats", meta["stats"], "an object")
    for g, v in meta["stats"].items():
        if not (isinstance(v, dict) and isinstance(v.get("mean"), list) and all(number(x) for x in v["mean"])
                and number(v.get("std")) and v["std"] > 0):
            raise UserError(f'{where}: stats.{g} is {str(v)[:60]}, expected an object {{"mean": [numbers], '
                            f'"std": a positive number}}')
    return meta


def uint8_to_tensor(images):
    """uint8 (N, H, W, C) array -> float (N, C, H, W) in [0, 1]."""
    import numpy as np
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def psnr(a, b):
    """Mean PSNR in dB over images in [0, 1]: a, b (N, ...)."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()
