"""The codebook's settings (CodebookConfig, one sentence per field) and the checks of codebook.json, the file
that stores them with the codebook's shapes and standardisation."""
from dataclasses import asdict, dataclass

from imagegpt.errors import UserError
from imagegpt.files import json_type
from imagegpt.settings import check_fields


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
    palette: int = 0
    """colour images: 0 codes each patch's colours with its shape; P > 0 keeps shape apart from colour (each image's
    two colours as P palette tokens <C_k> and P corrections <D_k>, its shape as num_codes colour-free patterns)"""


def settings_dict(cfg):
    """The codebook's settings as codebook.json stores them: `palette` only where it is set, so that a
    grey codebook's file and hash are what they were before the setting existed."""
    d = asdict(cfg)
    if not d["palette"]:
        del d["palette"]
    return d


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
