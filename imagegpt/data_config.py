"""The data settings (DataConfig): where the images come from, their size, the split, the augmented
copies and the codebook, and the checks of values no run can use."""
from dataclasses import dataclass, field
from typing import ClassVar

from imagegpt.augment import MOVE_LIMITS, WARP_GRID
from imagegpt.device import check_memory
from imagegpt.errors import UserError, check_seed
from imagegpt.settings import build, flat, known, names
from imagegpt.splits import folds
from imagegpt.codebook_config import CodebookConfig


@dataclass
class DataConfig:
    """Where the images come from, how they are split and copied, and the codebook that tokenises them."""
    aliases: ClassVar = {"val_fraction": "test_fraction"}   # the original project's name for the test split
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    source: str = "builtin"
    """where the labelled images come from: builtin, idx:DIR, folder:DIR, csv:DIR or hf:NAME_OR_PATH[:SPLIT]"""
    data_dir: str = "data/mnist5k"
    """the prepared data folder (token sequences, vocabulary, codebook); '' derives a name from the data settings"""
    codebook_from: str = ""
    """tokenise with the codebook of this checkpoint, data folder or export instead of fitting one (to fine-tune it)"""
    image_size: int = 28
    """images are resized to image_size x image_size pixels"""
    channels: int = 1
    """1 for grey images, 3 for colour (RGB)"""
    test_fraction: float = 0.2
    """share of each class held out as the test split (test.jsonl), read only by the final report"""
    split_seed: int = 0
    """seed of the stratified split and of the augmented copies"""
    augment: int = 0
    """extra randomly moved copies of each training image (shifted, rotated, scaled, sheared, warped)"""
    augment_on_the_fly: bool = False
    """draw the copies afresh every epoch while training instead of writing them once (the same steps)"""
    max_shift: float = 2.0
    """largest shift of a copy, in pixels (across and down)"""
    max_rotate: float = 10.0
    """largest rotation of a copy, in degrees"""
    max_scale: float = 0.0
    """copies are scaled by a factor in [1 - max_scale, 1 + max_scale]"""
    max_shear: float = 0.0
    """largest horizontal shear of a copy, in degrees"""
    max_elastic: float = 0.0
    """a smooth random warp of each copy: the points of a 4 x 4 lattice move by up to this many pixels"""
    permute_colours: bool = False
    """colour images whose colours carry no class: each copy also takes another order of its R, G, B channels"""
    dev_fraction: float = 0.0
    """share of the training images held out as the development split (dev.jsonl: curves, best/, comparing settings)"""
    dev_fold: int = 0
    """which of the disjoint development splits (0 .. 1 / dev_fraction - 1), for cross-validation"""


def data_fields():
    """The flat names of the data settings (codebook settings first), as report.json's "config" lists them."""
    return names(DataConfig)


def data_settings(values):
    """A DataConfig from the data settings in a flat mapping (a checkpoint's settings, report.json's
    "config"); settings it lacks keep their defaults, other keys are left alone."""
    return build(DataConfig, known(DataConfig, values))


def check_data_config(cfg, where="config"):
    """Values the type check lets through but no run can use: one clear line before any work."""
    v = flat(cfg)
    for k in ("image_size", "patch_size", "num_codes", "fit_samples"):
        if v[k] < 1:
            raise UserError(f"{where}: {k} must be at least 1, got {v[k]}")
    for k in ("kmeans_iters", "augment", *MOVE_LIMITS):
        if v[k] < 0:
            raise UserError(f"{where}: {k} must be >= 0, got {v[k]}")
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
    if cfg.codebook.palette < 0 or (cfg.codebook.palette and cfg.channels != 3):
        raise UserError(f"{where}: palette (shape apart from colour) must be 0, or above 0 with colour images "
                        f"(channels 3), got palette {cfg.codebook.palette} with channels {cfg.channels}")
    if cfg.permute_colours and cfg.channels != 3:
        raise UserError(f"{where}: permute_colours reorders the R, G, B channels of colour images; it needs channels 3, "
                        f"got {cfg.channels}")
    if cfg.image_size < cfg.codebook.patch_size:
        raise UserError(f"{where}: image_size {cfg.image_size} is smaller than patch_size {cfg.codebook.patch_size}: "
                        f"a token's patch must fit in the image")
    if cfg.image_size % cfg.codebook.patch_size:
        raise UserError(f"{where}: image_size {cfg.image_size} is not divisible by patch_size {cfg.codebook.patch_size}")
    if not 0 < cfg.test_fraction < 1:
        raise UserError(f"{where}: test_fraction must be between 0 and 1, got {cfg.test_fraction}")
    if not 0 <= cfg.dev_fraction < 1:
        raise UserError(f"{where}: dev_fraction must be in [0, 1), got {cfg.dev_fraction}")
    if cfg.dev_fold and not cfg.dev_fraction > 0:
        raise UserError(f"{where}: dev_fold {cfg.dev_fold} needs a development split (dev_fraction > 0)")
    if not 0 <= cfg.dev_fold < folds(cfg.dev_fraction):
        raise UserError(f"{where}: dev_fold must be 0 or more and, with dev_fraction {cfg.dev_fraction:g}, below "
                        f"{folds(cfg.dev_fraction)} (the disjoint development splits there are), got {cfg.dev_fold}")
    for k in ("split_seed", "codebook_seed"):
        check_seed(v[k], f"{where}: {k}")
    check_memory(image_bytes(cfg), f"{where}: one {cfg.image_size} x {cfg.image_size} image with "
                 f"{cfg.channels} channel(s) and its patch features", hint="lower image_size")


def image_bytes(cfg, n=1):
    """A lower bound of the memory that preparing n images takes: the float images and their patch
    features (colour and gradient groups, weighted copies), 4 bytes each."""
    return 4 * n * cfg.image_size ** 2 * (3 * cfg.channels + 7)
