"""The image codebooks: images <-> codes (k-means over per-patch features), of two kinds.

Codebook (grey images, and colour ones with `palette: 0`): every p x p patch of an image becomes a
multi-dimensional feature vector in the original's groups (position x, y; time t; colour; gradient Gx,
Gy); each group is standardised and weighted, and the patch is mapped to the nearest of K centroids
found by k-means (imagegpt/kmeans.py). Each code remembers the mean colour of its patches, so any code
grid decodes to an image.

PaletteCodebook (colour images, `palette: P`): shape apart from colour. Each image is its two colours
and a colour-free mix per pixel (imagegpt/palette.py); the colours become palette tokens, the mix a
grid of pattern codes from a Codebook fitted on the mixes as on grey images.

load_codebook(folder) and fit_codebook(images, cfg) pick the kind from the settings.
"""
import hashlib
import json
import math
import os
from dataclasses import fields

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import save_file

from imagegpt.codebook_config import CodebookConfig, check_meta, settings_dict
from imagegpt.device import check_memory
from imagegpt.errors import UserError
from imagegpt.files import (
    atomic_path,
    check_finite_tensors,
    load_safetensors,
    read_json,
    safetensors_error,
    write_json,
)
from imagegpt.kmeans import assign, kmeans
from imagegpt.palette import paint, two_colours
from imagegpt.token_format import COLOUR_TOKENS, Vocab

GROUPS = ("position", "time", "colour", "gradient")


# ----------------------------------------------------------------------------- codebook

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


class _Book:
    """What both kinds of codebook share: decoding any sequence, classification prefixes, the files."""

    def decode_ids(self, ids, vocab):
        """Any token-id sequence (real or generated) -> one image (C, H, W): the code tokens of its
        image part fill the sequence's image positions in order; missing ones stay black (a palette
        codebook: a missing colour is black, a missing pattern the ground)."""
        codes = [k for k in vocab.image_codes(ids) if k < self.code_space][:self.seq_len]
        return self.decode(torch.tensor([codes + [-1] * (self.seq_len - len(codes))]))[0]

    def prefixes(self, images, vocab):
        """uint8 images (N, H, W, C) -> classification prefixes '<IMG> codes </IMG> <CLS>' (id lists)."""
        return [vocab.prefix_ids(row) for row in self.encode(uint8_to_tensor(images)).tolist()]

    # -- files: codebook.json (settings, shapes, standardisation stats, sha256) + codebook.safetensors

    @property
    def sha256(self):
        """A hash of everything that decides the codes of an image and the pixels of a code (settings,
        image size, standardisation, centroids, colours, palette): two codebooks tokenise alike if and
        only if it is equal. Stored in codebook.json; --init_from compares it with the data's."""
        h = hashlib.sha256(json.dumps(self._meta(), sort_keys=True).encode())
        for t in self.tensors().values():
            h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def save(self, folder):
        meta = {**self._meta(), "inertia": self.inertia, "sha256": self.sha256}
        with atomic_path(os.path.join(folder, "codebook.safetensors")) as tmp:
            save_file(self.tensors(), tmp)
        write_json(os.path.join(folder, "codebook.json"), meta)


class Codebook(_Book):
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

    @property
    def code_space(self):
        """How many code indices there are: the image tokens of the vocabulary (<Z_k>)."""
        return self.cfg.num_codes

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

    def tensors(self):
        """The arrays of codebook.safetensors, in the order the hash reads them."""
        return {"centroids": self.centroids.contiguous(), "colours": self.colours.contiguous()}

    def _meta(self):
        return {"config": settings_dict(self.cfg), "image_size": list(self.image_size), "channels": self.channels,
                "stats": {g: {"mean": m.tolist(), "std": s} for g, (m, s) in self.stats.items()}}

    @classmethod
    def from_files(cls, meta, tensors, folder, channels=None):
        """The codebook of codebook.json's checked `meta` and codebook.safetensors' `tensors`, its shapes
        checked (channels: of the images it reads, when not meta's: a palette codebook's patterns read 1)."""
        cfg = CodebookConfig(**meta["config"])
        stats = {g: (torch.tensor(v["mean"], dtype=torch.float32), float(v["std"])) for g, v in meta["stats"].items()}
        book = cls(cfg, meta["image_size"], channels or int(meta["channels"]), stats, tensors["centroids"],
                   tensors["colours"], meta.get("inertia"))
        if book.centroids.shape[0] != cfg.num_codes:
            raise UserError(f"{folder}: codebook has {book.centroids.shape[0]} centroids, "
                            f"its settings say {cfg.num_codes}")
        book._check(folder)
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


class PaletteCodebook(_Book):
    """Colour images with shape apart from colour (the module docstring): an image's ground colour and
    figure colour, each a palette code <C_k> and a correction <D_k> (both found by k-means over the
    training images' colours, the corrections over what the palette leaves), then its mix as a grid
    of pattern codes <Z_k> from a Codebook fitted on the training images' mixes as on grey images.
    Code indices: patterns 0..K-1, palette colours K..K+P-1, corrections K+P..K+2P-1, in the order
    token_format.Vocab gives the tokens; an image's codes are ground, its correction, figure, its
    correction, then the patterns in raster order (token_format.COLOUR_TOKENS colours first)."""
    channels = 3

    def __init__(self, cfg, image_size, pattern, palette, fine):
        self.cfg, self.image_size, self.pattern = cfg, tuple(image_size), pattern
        self.palette, self.fine = palette, fine      # (P, 3) colours; (P, 3) corrections added to them
        self.inertia = pattern.inertia

    @property
    def grid(self):
        return self.pattern.grid

    @property
    def seq_len(self):
        return COLOUR_TOKENS + self.pattern.seq_len

    @property
    def code_space(self):
        return self.cfg.num_codes + 2 * self.cfg.palette

    @classmethod
    def fit(cls, images, cfg, device="cpu", progress=None):
        """Fit on training images (N, 3, H, W) float in [0, 1]: the patterns on their mixes, the palette
        on their ground and figure colours, the corrections on what the palette leaves of them."""
        ground, figure, alpha = two_colours(images.float())
        pattern = Codebook.fit(alpha[:, None], cfg, device=device, progress=progress)
        cfg = pattern.cfg
        colours = torch.cat([ground, figure]).to(device)
        if len(colours) < cfg.palette:
            raise UserError(f"the palette is fitted on the 2 colours of each of {len(images)} training images, fewer "
                            f"than palette {cfg.palette}: pass --palette {len(colours)} or fewer, or more images")
        step = lambda what: progress and (lambda phase, done, total: progress(f"{what}: {phase}", done, total))
        palette = kmeans(colours, cfg.palette, cfg.kmeans_iters, cfg.codebook_seed, progress=step("palette"))[0]
        rest = colours - palette[assign(colours, palette)[0]]
        fine = kmeans(rest, cfg.palette, cfg.kmeans_iters, cfg.codebook_seed, progress=step("corrections"))[0]
        return cls(cfg, images.shape[2:], pattern, palette.cpu(), fine.cpu())

    def colour_codes(self, colours):
        """colours (N, 3) -> code indices (N, 2): the nearest palette colour, then the nearest correction
        of what it leaves."""
        k = assign(colours, self.palette)[0]
        d = assign(colours - self.palette[k], self.fine)[0]
        return torch.stack([self.cfg.num_codes + k, self.cfg.num_codes + self.cfg.palette + d], 1)

    def encode(self, images, batch=1024):
        """images (N, 3, H, W) -> codes (N, seq_len) long: ground colour, figure colour, patterns."""
        if tuple(images.shape[1:]) != (3, *self.image_size):
            raise UserError(f"images are {tuple(images.shape[1:])}, the codebook expects "
                            f"{(3, *self.image_size)} (C, H, W)")
        out = []
        for i in range(0, len(images), batch):
            ground, figure, alpha = two_colours(images[i:i + batch].float())
            out.append(torch.cat([self.colour_codes(ground), self.colour_codes(figure),
                                  self.pattern.encode(alpha[:, None])], 1))
        return torch.cat(out) if out else torch.zeros(0, self.seq_len, dtype=torch.long)

    def colour(self, codes):
        """code indices (N, 2) (palette colour, correction) -> colours (N, 3); a missing code (-1) or one
        of another kind adds nothing (a missing colour is black)."""
        K, P = self.cfg.num_codes, self.cfg.palette
        pick = lambda table, i: table[i.clamp(0, P - 1)] * ((i >= 0) & (i < P))[:, None]
        return pick(self.palette, codes[:, 0] - K) + pick(self.fine, codes[:, 1] - K - P)

    def decode(self, codes):
        """codes (N, seq_len) long (-1 = missing) -> images (N, 3, H, W) float in [0, 1]; a pattern
        position holding a missing code or a colour's is the ground."""
        codes = torch.as_tensor(codes, dtype=torch.long)
        patterns = codes[:, COLOUR_TOKENS:]
        alpha = self.pattern.decode(patterns.masked_fill(patterns >= self.cfg.num_codes, -1))
        return paint(self.colour(codes[:, 0:2]), self.colour(codes[:, 2:4]), alpha)

    def to(self, device):
        if str(device) == "cpu":
            return self
        return PaletteCodebook(self.cfg, self.image_size, self.pattern.to(device), self.palette.to(device),
                               self.fine.to(device))

    def tensors(self):
        return {**self.pattern.tensors(), "palette": self.palette.contiguous(), "palette_fine": self.fine.contiguous()}

    def _meta(self):
        return {**self.pattern._meta(), "channels": 3}

    @classmethod
    def from_files(cls, meta, tensors, folder):
        """As Codebook.from_files: the patterns (a Codebook of 1-channel mixes) and the palette's arrays."""
        where = os.path.join(folder, "codebook.json")
        if meta["channels"] != 3:
            raise UserError(f"{where}: a palette codebook reads colour images, its channels say {meta['channels']}")
        pattern = Codebook.from_files(meta, tensors, folder, channels=1)
        P = pattern.cfg.palette
        for name in ("palette", "palette_fine"):
            if tuple(tensors[name].shape) != (P, 3):
                raise UserError(f"{os.path.join(folder, 'codebook.safetensors')}: {name} is "
                                f"{tuple(tensors[name].shape)}, its settings say ({P}, 3) (palette {P})")
        return cls(pattern.cfg, meta["image_size"], pattern, tensors["palette"], tensors["palette_fine"])


def check_vocab(book, vocab, folder):
    """The vocabulary and the codebook of one folder agree (the same codes, the same palette), or one line."""
    has = lambda K, P: f"{K} code tokens" + (f" and {P} palette colours" if P else "")
    if (vocab.num_codes, vocab.palette) != (book.cfg.num_codes, book.cfg.palette):
        raise UserError(f"{os.path.join(folder, 'vocab.json')} has {has(vocab.num_codes, vocab.palette)}, the codebook "
                        f"there {has(book.cfg.num_codes, book.cfg.palette).replace(' tokens', 's')}; the two were "
                        f"not made together (prepare the data again)")


def load_tokens(folder, check_first=None):
    """A folder's vocabulary and codebook -> (Vocab, codebook), checked to agree (check_vocab): the one place
    a checkpoint, an export or a prepared data folder is read for them. check_first(vocab): the caller's
    check of the vocabulary (its size against the model's), made before the codebook is read."""
    vocab = Vocab.load(os.path.join(folder, "vocab.json"))
    if check_first:
        check_first(vocab)
    book = load_codebook(folder)
    check_vocab(book, vocab, folder)
    return vocab, book


def fit_codebook(images, cfg, device="cpu", progress=None):
    """A codebook fitted on training images (N, C, H, W) float in [0, 1]: a PaletteCodebook where
    cfg.palette is set, else a Codebook (Codebook.fit: cfg may carry more settings)."""
    return (PaletteCodebook if cfg.palette else Codebook).fit(images, cfg, device=device, progress=progress)


def load_codebook(folder):
    """folder/codebook.json and codebook.safetensors -> the codebook they hold, of either kind: types,
    shapes, finite values and its sha256 checked, every problem one line."""
    path = os.path.join(folder, "codebook.json")
    meta = check_meta(read_json(path, "codebook.json"), path)
    try:
        tensors = load_safetensors(os.path.join(folder, "codebook.safetensors"))
        book = (PaletteCodebook if meta["config"].get("palette") else Codebook).from_files(meta, tensors, folder)
    except FileNotFoundError:
        raise UserError(f"{folder}: codebook.safetensors is missing") from None
    except SafetensorError as e:
        raise UserError(safetensors_error(os.path.join(folder, "codebook.safetensors"), e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{folder}: not a codebook written by this project ({e})") from None
    stats = book.pattern.stats if isinstance(book, PaletteCodebook) else book.stats
    check_finite_tensors({**book.tensors(), **{f"stats.{g}.mean": m for g, (m, _) in stats.items()}},
                         os.path.join(folder, "codebook.safetensors"))
    if "sha256" in meta and meta["sha256"] != book.sha256:   # codebooks saved before the hash have none
        raise UserError(f"{path}: its sha256 does not match the codebook's contents (codebook.json or "
                        f"codebook.safetensors was changed or mixed up with another codebook's)")
    return book


def uint8_to_tensor(images):
    """uint8 (N, H, W, C) array -> float (N, C, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def psnr(a, b):
    """Mean PSNR in dB over images in [0, 1]: a, b (N, ...)."""
    mse = (a - b).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean().item()
