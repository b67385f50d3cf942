import gzip
import itertools
import json
import math
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from fixtures import ROOT
from PIL import Image

import data
from imagegpt import data_config, sources
from imagegpt.augment import WARP_GRID, augment, copy_params, transform
from imagegpt.cli import parser
from imagegpt.data_config import DataConfig, check_data_config
from imagegpt.split_images import real_split
from imagegpt.errors import UserError
from imagegpt.plots import save_grid
from imagegpt.prepare import ensure_prepared, prepare
from imagegpt.sequences import make_batch, read_sequences
from imagegpt.settings import add_options, apply_options, build, changed, coerce, flat
from imagegpt.sources import (
    load_builtin,
    load_csv,
    load_folder,
    load_idx,
    load_source,
    read_pixel_csv,
)
from imagegpt.splits import folds, stratified_split
from imagegpt.token_format import Vocab, truncate
from imagegpt.train_config import TrainConfig
from tokenizer import Codebook, load_codebook
from tokenizer import uint8_to_tensor as to_tensor

# ----------------------------------------------------------------------------- fixtures written by the tests

def write_idx(path, arr, gz=False):
    """Write a uint8 array in the IDX format: magic 0x0000080N (N = ndim), big-endian sizes, data."""
    arr = np.asarray(arr, dtype=np.uint8)
    raw = struct.pack(">I", 0x00000800 | arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()
    with (gzip.open if gz else open)(str(path) + (".gz" if gz else ""), "wb") as f:
        f.write(raw)


def digit_images(n, size=8, seed=0):
    """n little images whose class (0..2) is where a bright square sits; uint8 (n, size, size)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    imgs = (rng.random((n, size, size)) * 40).astype(np.uint8)
    for i, y in enumerate(labels):
        r = 1 + y * 2 + rng.integers(0, 2)
        c = 1 + rng.integers(0, size - 3)
        imgs[i, r:r + 2, c:c + 2] = 200 + rng.integers(0, 55)
    return imgs, labels


def write_folder(root, n=48, size=8, seed=0):
    imgs, labels = digit_images(n, size, seed)
    for i, (im, y) in enumerate(zip(imgs, labels)):
        os.makedirs(root / f"class{y}", exist_ok=True)
        Image.fromarray(im).save(root / f"class{y}" / f"{i:03d}.png")
    return imgs, labels


def write_pixel_csv(path, img, scale01=True):
    """The original per-image CSV: one row per pixel, colour in [0, 1] (or 0..255)."""
    H, W = img.shape[:2]
    rgb = img.reshape(H, W, -1).astype(float)
    if rgb.shape[-1] == 1:
        rgb = rgb.repeat(3, -1)
    if scale01:
        rgb = rgb / 255
    g = img.reshape(H, W, -1).mean(-1)
    gy, gx = np.gradient(g)
    rows = ["pixel_id,x,y,t,R,G,B,A,Gx,Gy"]
    for y in range(H):
        for x in range(W):
            r, gg, b = rgb[y, x]
            rows.append(f"{y * W + x},{x},{y},0,{r},{gg},{b},1.0,{gx[y, x]},{gy[y, x]}")
    path.write_text("\n".join(rows) + "\n")


# ----------------------------------------------------------------------------- sources

@pytest.mark.parametrize("gz_train,gz_test", [(True, False), (False, True), (False, False)])
def test_idx_source(tmp_path, gz_train, gz_test):
    rng = np.random.default_rng(0)
    xtr, ytr = rng.integers(0, 256, (7, 28, 28)), np.array([0, 1, 2, 3, 4, 5, 9])
    xte, yte = rng.integers(0, 256, (3, 28, 28)), np.array([7, 8, 0])
    write_idx(tmp_path / "train-images-idx3-ubyte", xtr, gz_train)
    write_idx(tmp_path / "train-labels-idx1-ubyte", ytr, gz_train)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", xte, gz_test)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", yte, gz_test)
    images, labels, names, meta = load_idx(str(tmp_path))
    assert images.shape == (10, 28, 28, 1) and images.dtype == np.uint8
    assert np.array_equal(images[..., 0], np.concatenate([xtr, xte]))
    assert labels.tolist() == ytr.tolist() + yte.tolist() and labels.dtype == np.int64
    assert names == [str(c) for c in range(10)]
    assert meta[0]["source"].startswith("train-images") and meta[7] == {
        "source": "t10k-images-idx3-ubyte" + (".gz" if gz_test else ""), "index": 0}
    # through load_source: resized and made RGB as configured
    cfg = build(DataConfig, source=f"idx:{tmp_path}", image_size=14, channels=3)
    images, labels, _, _ = load_source(cfg)
    assert images.shape == (10, 14, 14, 3)
    assert np.array_equal(images[..., 0], images[..., 2])


def test_idx_errors(tmp_path):
    with pytest.raises(UserError, match="no MNIST IDX files"):
        load_idx(str(tmp_path))
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 4, 4)))
    with pytest.raises(UserError, match="train-labels-idx1-ubyte"):
        load_idx(str(tmp_path))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3))
    with pytest.raises(UserError, match="N x H x W"):
        load_idx(str(tmp_path))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">I", 0x00000D01) + struct.pack(">I", 2) + b"\0\0")
    with pytest.raises(UserError, match="magic"):
        load_idx(str(tmp_path))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x00000801, 5) + b"\0\0")
    with pytest.raises(UserError, match="truncated"):
        load_idx(str(tmp_path))
    os.remove(tmp_path / "train-labels-idx1-ubyte")
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="cannot read"):
        load_idx(str(tmp_path))


def test_folder_source(tmp_path):
    (tmp_path / "b_dog").mkdir()
    (tmp_path / "a_cat").mkdir()
    (tmp_path / "empty").mkdir()
    Image.new("L", (10, 10), 200).save(tmp_path / "a_cat" / "grey.png")
    Image.new("RGB", (20, 14), (255, 0, 0)).save(tmp_path / "a_cat" / "red.PNG")
    Image.new("RGBA", (5, 7), (0, 0, 255, 255)).save(tmp_path / "b_dog" / "blue.png")
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "b_dog" / "green.jpg", quality=100)
    (tmp_path / "b_dog" / "notes.txt").write_text("not an image")
    images, labels, names, meta = load_folder(str(tmp_path), 8, 1)
    assert names == ["a_cat", "b_dog", "empty"]
    assert images.shape == (4, 8, 8, 1) and images.dtype == np.uint8
    assert labels.tolist() == [0, 0, 1, 1]
    assert [m["source"] for m in meta] == [os.path.join("a_cat", "grey.png"), os.path.join("a_cat", "red.PNG"),
                                           os.path.join("b_dog", "blue.png"), os.path.join("b_dog", "green.jpg")]
    assert (images[0] == 200).all()                        # grey, resized from 10x10
    assert (images[1] == 76).all()                         # red -> luma 0.299 * 255
    assert (images[2] == 29).all()                         # blue -> luma 0.114 * 255
    rgb, _, _, _ = load_folder(str(tmp_path), 6, 3)
    assert rgb.shape == (4, 6, 6, 3)
    assert (rgb[1] == [255, 0, 0]).all() and (rgb[2] == [0, 0, 255]).all() and (rgb[0] == 200).all()
    assert abs(rgb[3].astype(int) - [0, 255, 0]).max() <= 3
    # through load_source with the configured size
    images, labels, names, _ = load_source(build(DataConfig, source=f"folder:{tmp_path}", image_size=12))
    assert images.shape == (4, 12, 12, 1)


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        load_folder(str(tmp_path / "nope"), 8, 1)
    (tmp_path / "a").mkdir()
    with pytest.raises(UserError, match="class sub-folders"):
        load_folder(str(tmp_path), 8, 1)
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match="broken.png"):
        load_folder(str(tmp_path), 8, 1)


def test_csv_source(tmp_path):
    imgs, labels = digit_images(4, size=28)
    for i, (im, y) in enumerate(zip(imgs, labels[:4])):
        (tmp_path / f"digit_{y}").mkdir(exist_ok=True)
        write_pixel_csv(tmp_path / f"digit_{y}" / f"img{i}.csv", im, scale01=(i % 2 == 0))
    images, got, names, meta = load_csv(str(tmp_path), 28, 1)
    assert names == ["digit_0", "digit_1", "digit_2"]
    assert got.tolist() == [0, 0, 1, 2]                    # files sorted by class folder
    order = [0, 3, 1, 2]                                   # img0, img3 in digit_0; img1; img2
    assert images.shape == (4, 28, 28, 1)
    assert np.array_equal(images[..., 0], imgs[order])     # both colour scales read back exactly
    assert meta[1]["source"] == os.path.join("digit_0", "img3.csv")
    small, _, _, _ = load_csv(str(tmp_path), 14, 1)
    assert small.shape == (4, 14, 14, 1)
    rgb = read_pixel_csv(tmp_path / "digit_1" / "img1.csv", 3)
    assert rgb.shape == (28, 28, 3) and np.array_equal(rgb[..., 1], imgs[1])
    via = load_source(build(DataConfig, source=f"csv:{tmp_path}", image_size=28))[0]
    assert np.array_equal(via, images)


def test_csv_errors(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("id,x,y\n0,0,0\n")
    with pytest.raises(UserError, match="x.csv:1"):
        read_pixel_csv(p, 1)
    p.write_text("pixel_id,x,y,t,R,G,B,A,Gx,Gy\n0,0,0,0,1,1,1,1,0,0\n1,1,0,0,zero,0,0,1,0,0\n")
    with pytest.raises(UserError, match="x.csv:3"):
        read_pixel_csv(p, 1)
    p.write_text("pixel_id,x,y,t,R,G,B,A,Gx,Gy\n")
    with pytest.raises(UserError, match="no pixel rows"):
        read_pixel_csv(p, 1)
    p.write_bytes(b"pixel_id,x,y,t,R,G,B,A,Gx,Gy\n\xff\xfe\n")
    with pytest.raises(UserError, match="UTF-8"):
        read_pixel_csv(p, 1)


def test_builtin_source():
    images, labels, names, meta = load_builtin()
    assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [500] * 10
    assert names == [str(c) for c in range(10)]
    assert images.max() == 255 and images.min() == 0
    assert 20 < images.mean() < 60                        # dark background, bright strokes
    assert meta[17] == {"source": "builtin", "index": 17}
    assert len({im.tobytes() for im in images}) == 5000


def test_bad_source_spec():
    for spec in ("nope", "idx", "folder:", "builtin:x"):
        with pytest.raises(UserError, match="expected builtin"):
            load_source(build(DataConfig, source=spec))


# ----------------------------------------------------------------------------- split, augmentation

def test_stratified_split():
    labels = np.repeat(np.arange(4), [50, 10, 25, 3])
    np.random.default_rng(0).shuffle(labels)
    tr, va = stratified_split(labels, 0.2, seed=0)
    assert np.bincount(labels[va], minlength=4).tolist() == [10, 2, 5, 1]
    assert np.bincount(labels[tr], minlength=4).tolist() == [40, 8, 20, 2]
    assert len(np.intersect1d(tr, va)) == 0
    assert np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(len(labels)))
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(va) > 0)
    tr2, va2 = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(tr, tr2) and np.array_equal(va, va2)
    tr3, va3 = stratified_split(labels, 0.2, seed=1)
    assert not np.array_equal(va, va3)
    assert np.bincount(labels[va3], minlength=4).tolist() == [10, 2, 5, 1]
    # the built-in 5,000 digits: 4,000 / 1,000, 100 per class in validation
    tr, va = stratified_split(np.repeat(np.arange(10), 500))
    assert (len(tr), len(va)) == (4000, 1000)


def test_folds_of_a_split_are_disjoint_stratified_and_fold_0_is_the_split():
    labels = np.repeat(np.arange(4), 40)
    np.random.default_rng(0).shuffle(labels)
    held = [stratified_split(labels, 0.1, seed=3, fold=f) for f in range(folds(0.1))]
    assert folds(0.1) == 10 and folds(0.25) == 4 and folds(0.3) == 3 and folds(0.0) == 1
    assert all(np.bincount(labels[va], minlength=4).tolist() == [4] * 4 for _, va in held)
    assert np.array_equal(np.sort(np.concatenate([va for _, va in held])), np.arange(len(labels)))
    assert all(np.array_equal(np.sort(np.concatenate([tr, va])), np.arange(len(labels))) for tr, va in held)
    assert all(np.array_equal(a, b) for a, b in zip(held[0], stratified_split(labels, 0.1, seed=3)))
    with pytest.raises(UserError, match="only folds 0 to 9 exist"):
        stratified_split(labels, 0.1, seed=3, fold=10)


def test_dev_fold_checks():
    check_data_config(build(DataConfig, dev_fraction=0.1, dev_fold=9))
    for fraction, fold, want in ((0.1, 10, "below 10"), (0.25, 4, "below 4"), (0.1, -1, "below 10"),
                                 (0.0, 1, "needs a development split")):
        with pytest.raises(UserError, match=want):
            check_data_config(build(DataConfig, dev_fraction=fraction, dev_fold=fold))


def test_augment():
    x = to_tensor(digit_images(6, size=12)[0][..., None])
    still = build(DataConfig, max_shift=0.0, max_rotate=0.0)
    same = augment(x, 2, still, seed=0)
    assert same.shape == (12, 1, 12, 12)
    assert torch.allclose(same[:6], x, atol=1e-5) and torch.allclose(same[6:], x, atol=1e-5)
    a = augment(x, 3, DataConfig(), seed=0)
    assert a.shape == (18, 1, 12, 12) and 0 <= a.min() and a.max() <= 1
    assert not torch.allclose(a[:6], x, atol=1e-2)
    assert torch.equal(a, augment(x, 3, DataConfig(), seed=0))
    assert not torch.equal(a, augment(x, 3, DataConfig(), seed=1))
    assert augment(x, 0, DataConfig(), seed=0).shape == (0, 1, 12, 12)
    # scale and shear alone move the images too
    assert not torch.allclose(augment(x, 2, changed(still, max_scale=0.3), seed=0)[:6], x, atol=1e-2)
    assert not torch.allclose(augment(x, 2, changed(still, max_shear=20.0), seed=0)[:6], x, atol=1e-2)
    assert not torch.allclose(augment(x, 2, changed(still, max_elastic=1.5), seed=0)[:6], x, atol=1e-2)


def test_copies_with_permuted_colours_take_each_order_of_the_channels():
    from imagegpt.augment import COLOUR_ORDERS, FixedCopies, recolour
    x = torch.rand(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    still = build(DataConfig, max_shift=0.0, max_rotate=0.0, channels=3, permute_colours=True)
    copies = augment(x, 6, still, seed=0)                                     # no move: only the colours change
    for c in range(1, 7):
        assert torch.allclose(copies[(c - 1) * 4:c * 4], x[:, list(COLOUR_ORDERS[c % 6])], atol=1e-5), c
    assert torch.allclose(copies[20:], x, atol=1e-5)                          # copy 6 keeps the image's own order
    assert sorted(COLOUR_ORDERS) == sorted(itertools.permutations(range(3)))
    per_row = recolour(x, torch.tensor([0, 1, 2, 3]))                         # one copy number per image
    assert all(torch.equal(per_row[i], x[i, list(COLOUR_ORDERS[i])]) for i in range(4))
    fixed = FixedCopies(4, 2, still, seed=0)
    assert torch.allclose(fixed(x[1:3], 2, [1, 2]), x[1:3][:, list(COLOUR_ORDERS[2])], atol=1e-5)
    assert torch.allclose(augment(x, 2, changed(still, permute_colours=False), seed=0)[:4], x, atol=1e-5)
    for bad, msg in (({"permute_colours": True}, "permute_colours reorders the R, G, B channels of colour images; it "
                                                 "needs channels 3, got 1"),
                     ({"palette": 8}, "palette .* must be 0, or above 0 with colour images .*got palette 8 with "
                                      "channels 1"),
                     ({"palette": -1, "channels": 3}, "got palette -1 with channels 3")):
        with pytest.raises(UserError, match=msg):
            check_data_config(build(DataConfig, **bad))


def test_moved_copies_uncover_the_images_background_not_black():
    from imagegpt.augment import transform
    x = torch.empty(2, 3, 16, 16)
    x[0] = torch.tensor([0.2, 0.5, 0.9])[:, None, None]     # a blue ground with a red square
    x[1] = 0.0                                               # the digits' black ground: as before
    x[:, :, 5:11, 5:11] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]
    moved = transform(x, torch.tensor([[0.6, 3.0, -3.0, 0.8, 0.0]] * 2))
    corners = moved[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert torch.allclose(corners[0], torch.tensor([0.2, 0.5, 0.9])[:, None].expand(3, 4), atol=1e-6)
    assert torch.equal(corners[1], torch.zeros(3, 4))
    black = torch.nn.functional.grid_sample(x[1:], torch.nn.functional.affine_grid(
        torch.tensor([[[math.cos(0.6) / 0.8, -math.sin(0.6) / 0.8, -6 / 16],
                       [math.sin(0.6) / 0.8, math.cos(0.6) / 0.8, 6 / 16]]]), (1, 3, 16, 16), align_corners=False),
        align_corners=False)
    assert torch.allclose(moved[1:], black, atol=1e-6)     # zero fill where the frame is black
    assert moved[0, 0].max() > 0.9 and (moved[0, 0] > 0.5).sum() > 10   # the square moved, not lost


def test_copy_params_scale_and_shear_leave_the_rotations_and_shifts():
    plain = copy_params(50, 3, DataConfig(), seed=4)
    more = copy_params(50, 3, build(DataConfig, max_scale=0.2, max_shear=10.0), seed=4)
    assert plain.shape == more.shape == (3, 50, 5)
    assert torch.equal(plain[..., :3], more[..., :3])    # the fixed copies made before scale and shear existed
    assert torch.equal(plain[..., 3], torch.ones(3, 50)) and torch.equal(plain[..., 4], torch.zeros(3, 50))
    assert plain[..., 0].abs().max() <= math.radians(10) and plain[..., 1:3].abs().max() <= 2
    assert ((more[..., 3] - 1).abs().max() <= 0.2 + 1e-6) and (more[..., 3] - 1).abs().max() > 0.15
    assert more[..., 4].abs().max() <= math.radians(10) + 1e-6 and more[..., 4].abs().max() > math.radians(8)


def test_transform_scales_and_shears_about_the_centre():
    x = torch.zeros(1, 1, 16, 16)
    x[..., 6:10, 6:10] = 1                          # a 4 x 4 square at the centre
    move = lambda angle=0.0, dx=0.0, dy=0.0, scale=1.0, shear=0.0: torch.tensor([[angle, dx, dy, scale, shear]])
    assert torch.allclose(transform(x, move()), x, atol=1e-6)
    big = transform(x, move(scale=2.0))             # twice as large: 8 x 8, still centred
    assert big.sum().item() == pytest.approx(64, abs=1) and torch.equal(big, big.flip(-1)) and torch.equal(big, big.flip(-2))
    assert big[0, 0, 5:11, 5:11].min() > 0.99 and big[0, 0, :3].max() == 0
    assert transform(x, move(scale=0.5)).sum().item() == pytest.approx(4, abs=0.5)
    bar = torch.zeros(1, 1, 16, 16)
    bar[..., 2:14, 7:9] = 1                          # a vertical bar through the centre
    slant = transform(bar, move(shear=math.atan(0.5)))
    cols = torch.arange(16.0)
    centre = lambda row: (slant[0, 0, row] * cols).sum() / slant[0, 0, row].sum()
    assert centre(3).item() == pytest.approx(7.5 - 0.5 * (3 - 7.5), abs=0.3)     # half a pixel per row
    assert centre(12).item() == pytest.approx(7.5 - 0.5 * (12 - 7.5), abs=0.3)
    assert slant.sum().item() == pytest.approx(bar.sum().item(), rel=0.02)   # a shear keeps the area



def test_copy_params_warp_leaves_the_other_moves():
    plain = copy_params(50, 3, build(DataConfig, max_scale=0.1, max_shear=5.0), seed=4)
    warped = copy_params(50, 3, build(DataConfig, max_scale=0.1, max_shear=5.0, max_elastic=1.5), seed=4)
    assert plain.shape == (3, 50, 5) and warped.shape == (3, 50, 5 + 2 * WARP_GRID ** 2)
    assert torch.equal(warped[..., :5], plain)        # the copies made before the warp existed
    assert warped[..., 5:].abs().max() <= 1.5 + 1e-6 and warped[..., 5:].abs().max() > 1.4
    assert warped[..., 5:].std() > 0.5                # each control point drawn on its own


def test_transform_warps_smoothly():
    x = torch.zeros(1, 1, 16, 16)
    x[..., 4:12, 7:9] = 1                             # a vertical bar
    none = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    lattice = torch.zeros(1, 2, WARP_GRID, WARP_GRID)
    lattice[:, 0] = 3.0                               # every control point 3 px to the right: a shift
    shifted = transform(x, torch.cat([none, lattice.flatten(1)], 1))
    assert torch.allclose(shifted, transform(x, torch.tensor([[0.0, 3.0, 0.0, 1.0, 0.0]])), atol=1e-5)
    assert torch.allclose(transform(x, torch.cat([none, torch.zeros(1, 2 * WARP_GRID ** 2)], 1)), x, atol=1e-6)
    lattice = torch.zeros(1, 2, WARP_GRID, WARP_GRID)
    lattice[:, 0] = torch.linspace(-2, 2, WARP_GRID)[:, None]   # the top 2 px left, the bottom 2 px right
    bent = transform(x, torch.cat([none, lattice.flatten(1)], 1))
    cols = torch.arange(16.0)
    centre = lambda row: ((bent[0, 0, row] * cols).sum() / bent[0, 0, row].sum()).item()
    assert centre(4) < 7.5 - 0.5 and centre(11) > 7.5 + 0.5 and centre(4) < centre(7) < centre(11)
    assert bent.sum().item() == pytest.approx(x.sum().item(), rel=0.05)   # bent, not cut


# ----------------------------------------------------------------------------- prepare

def tiny_cfg(tmp, **kw):
    base = dict(source=f"folder:{tmp / 'images'}", data_dir=str(tmp / "prepared"), image_size=8,
                patch_size=2, num_codes=16, kmeans_iters=5)
    return build(DataConfig, **{**base, **kw})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("prep")
    imgs, labels = write_folder(tmp / "images", n=48)
    cfg = tiny_cfg(tmp)
    report = prepare(cfg)
    order = np.argsort(labels, kind="stable")   # the loader reads class by class, files sorted
    return tmp, cfg, report, imgs[order], labels[order], order


def test_prepare_writes_everything(prepared):
    tmp, cfg, report, imgs, labels, order = prepared
    d = tmp / "prepared"
    for name in ("train.jsonl", "test.jsonl", "vocab.json", "codebook.json", "codebook.safetensors", "report.json"):
        assert (d / name).is_file(), name
    vocab = Vocab.load(d / "vocab.json")
    assert (vocab.num_codes, vocab.num_classes, len(vocab)) == (16, 3, 25)
    assert report["classes"] == ["class0", "class1", "class2"]
    assert report["counts"] == {"train": [13, 13, 13], "dev": [0, 0, 0], "test": [3, 3, 3], "train_augmented": 0}
    assert report["sequence_length"] == 16 + 5
    assert json.loads((d / "report.json").read_text())["counts"] == report["counts"]
    assert report["test_psnr_db"] > 15 and report["train_psnr_db"] > 15
    assert report["distinct_images"] == 48 and 1 <= report["codes_used"] <= 16
    tr_seqs, tr_labels = read_sequences(d / "train.jsonl", vocab)
    va_seqs, va_labels = read_sequences(d / "test.jsonl", vocab)
    assert (len(tr_seqs), len(va_seqs)) == (39, 9)
    assert all(len(s) == 21 for s in tr_seqs + va_seqs)
    assert np.bincount(tr_labels).tolist() == [13, 13, 13] and np.bincount(va_labels).tolist() == [3, 3, 3]
    recs = [json.loads(line) for line in (d / "test.jsonl").read_text().splitlines()]
    assert all(r["meta"]["split"] == "test" for r in recs)
    assert not (d / "dev.jsonl").exists()       # no development split without dev_fraction
    # the validation records are exactly the split's validation images, encoded by the saved codebook
    tr, va = stratified_split(labels, cfg.test_fraction, cfg.split_seed)
    assert [r["meta"]["source"] for r in recs] == [os.path.join(f"class{labels[i]}", f"{order[i]:03d}.png") for i in va]
    book = load_codebook(d)
    assert book.image_size == (8, 8) and book.seq_len == 16
    codes = book.encode(to_tensor(imgs[va][..., None]))
    assert [s[1:-4] for s in va_seqs] == (codes + vocab.code_offset).tolist()


def test_codebook_is_fitted_on_training_images_only(prepared):
    tmp, cfg, report, imgs, labels, order = prepared
    book = load_codebook(tmp / "prepared")
    tr, va = stratified_split(labels, cfg.test_fraction, cfg.split_seed)
    x = to_tensor(imgs[..., None])
    on_train = Codebook.fit(x[tr], cfg.codebook)
    assert torch.equal(book.centroids, on_train.centroids)
    assert torch.equal(book.colours, on_train.colours)
    on_all = Codebook.fit(x, cfg.codebook)
    assert not torch.equal(book.centroids, on_all.centroids)


def test_dev_split_is_carved_from_training_images_and_the_test_split_stays(prepared):
    """dev_fraction > 0: dev.jsonl holds a stratified share of the training images (the codebook is
    fitted on the rest), and test.jsonl, the test split, holds the same images as without it."""
    tmp, cfg, report, imgs, labels, order = prepared
    dcfg = changed(cfg, dev_fraction=0.25, data_dir=str(tmp / "with_dev"))
    rep = prepare(dcfg)
    assert rep["counts"]["dev"] == [3, 3, 3] and rep["counts"]["train"] == [10, 10, 10]
    assert rep["counts"]["test"] == report["counts"]["test"]
    src = lambda d, f: {json.loads(line)["meta"]["source"] for line in (tmp / d / f).read_text().splitlines()}
    dev, train, test = src("with_dev", "dev.jsonl"), src("with_dev", "train.jsonl"), src("with_dev", "test.jsonl")
    assert test == src("prepared", "test.jsonl") and len(test) == 9
    assert len(dev) == 9 and not dev & train and not dev & test and not train & test
    tr, _ = stratified_split(labels, cfg.test_fraction, cfg.split_seed)
    sub, _ = stratified_split(labels[tr], 0.25, cfg.split_seed + 1)
    on_train = Codebook.fit(to_tensor(imgs[tr[sub]][..., None]), dcfg.codebook)   # training minus dev only
    assert torch.equal(load_codebook(tmp / "with_dev").centroids, on_train.centroids)


def test_another_dev_fold_is_another_dev_split_with_the_same_test_split(prepared):
    """dev_fold 1: a development split disjoint from fold 0's, drawn from the same training images, and
    the same test split (cross-validation over the training images never touches the test images)."""
    tmp, cfg, report, _, _, _ = prepared
    src = lambda d, f: {json.loads(line)["meta"]["source"] for line in (tmp / d / f).read_text().splitlines()}
    sets = {}
    for fold in (0, 1):
        name = f"fold{fold}"
        rep = prepare(changed(cfg, dev_fraction=0.25, dev_fold=fold, data_dir=str(tmp / name)))
        assert rep["counts"]["dev"] == [3, 3, 3] and rep["counts"]["train"] == [10, 10, 10]
        sets[fold] = {f: src(name, f) for f in ("train.jsonl", "dev.jsonl", "test.jsonl")}
    a, b = sets[0], sets[1]
    assert not a["dev.jsonl"] & b["dev.jsonl"] and a["test.jsonl"] == b["test.jsonl"] == src("prepared", "test.jsonl")
    assert a["train.jsonl"] | a["dev.jsonl"] == b["train.jsonl"] | b["dev.jsonl"]
    # what eval --split dev and --generation read back from a checkpoint's settings: the same images
    keys = lambda images: {im.tobytes() for im in images}
    dev = [keys(real_split(flat(changed(cfg, dev_fraction=0.25, dev_fold=f)), "dev")[2]) for f in (0, 1)]
    test = [keys(real_split(flat(changed(cfg, dev_fraction=0.25, dev_fold=f)), "test")[2]) for f in (0, 1)]
    assert len(dev[0]) == len(dev[1]) == 9 and not dev[0] & dev[1] and test[0] == test[1]
    with pytest.raises(UserError, match=r"other data settings \(dev_fold\)"):
        ensure_prepared(changed(cfg, dev_fraction=0.25, dev_fold=0, data_dir=str(tmp / "fold1")), log=print)


def test_ensure_prepared_reuses_or_refuses(prepared):
    tmp, cfg, report, _, _, _ = prepared
    train = tmp / "prepared" / "train.jsonl"
    before = train.stat().st_mtime_ns
    logs = []
    again = ensure_prepared(changed(cfg), log=logs.append)
    assert logs == [] and again["counts"] == report["counts"]
    assert train.stat().st_mtime_ns == before
    with pytest.raises(UserError, match="num_codes"):
        ensure_prepared(changed(cfg, num_codes=8), log=logs.append)
    with pytest.raises(UserError, match=r"other data settings \(patch_size\)"):
        ensure_prepared(changed(cfg, patch_size=4), log=logs.append)
    assert logs == [] and train.stat().st_mtime_ns == before


def test_ensure_prepared_prepares_a_new_folder(tmp_path):
    write_folder(tmp_path / "images", n=30)
    cfg = tiny_cfg(tmp_path, augment=2, max_shift=1.0)
    logs = []
    rep = ensure_prepared(cfg, log=logs.append)
    assert len(logs) == 1 and "preparing" in logs[0]
    assert rep["counts"] == {"train": [8, 8, 8], "dev": [0, 0, 0], "test": [2, 2, 2], "train_augmented": 48}
    vocab = Vocab.load(tmp_path / "prepared" / "vocab.json")
    seqs, labels = read_sequences(tmp_path / "prepared" / "train.jsonl", vocab)
    assert len(seqs) == 24 * 3
    assert np.bincount(labels).tolist() == [24, 24, 24]
    recs = [json.loads(line) for line in (tmp_path / "prepared" / "train.jsonl").read_text().splitlines()]
    assert [r["meta"].get("augmented") for r in recs] == [None] * 24 + [1] * 24 + [2] * 24
    assert [r["meta"]["source"] for r in recs[24:48]] == [r["meta"]["source"] for r in recs[:24]]
    assert [r["label"] for r in recs[48:]] == [r["label"] for r in recs[:24]]
    assert len(read_sequences(tmp_path / "prepared" / "test.jsonl", vocab)[0]) == 6
    assert ensure_prepared(cfg, log=logs.append) == rep and len(logs) == 1


def test_prepare_from_idx(tmp_path):
    imgs, labels = digit_images(40, size=28)
    write_idx(tmp_path / "train-images-idx3-ubyte", imgs, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels, gz=True)
    cfg = build(DataConfig, source=f"idx:{tmp_path}", data_dir=str(tmp_path / "out"), image_size=12,
                     patch_size=3, num_codes=16, kmeans_iters=5)
    rep = prepare(cfg)
    assert rep["counts"] == {"train": [11, 10, 10], "dev": [0, 0, 0], "test": [3, 3, 3], "train_augmented": 0}
    assert rep["sequence_length"] == 16 + 5
    vocab = Vocab.load(tmp_path / "out" / "vocab.json")
    assert len(read_sequences(tmp_path / "out" / "test.jsonl", vocab)[0]) == 9


def test_prepare_too_few_images(tmp_path):
    write_folder(tmp_path / "images", n=3)
    with pytest.raises(UserError, match="too few"):
        prepare(tiny_cfg(tmp_path))


# ----------------------------------------------------------------------------- reading sequence files

V = Vocab(16, 3)
GOOD = {"tokens": "<IMG> <Z_001> <Z_015> </IMG> <CLS> <CLS_2> <EOS>", "label": 2, "meta": {}}


def rec(**kw):
    return json.dumps({**GOOD, **kw})


BAD_LINES = [
    ("not json at all", "invalid JSON"),
    (rec()[:-5], "invalid JSON"),                                          # truncated line
    ("[1, 2, 3]", "JSON object"),
    (json.dumps({"label": 2}), '"tokens"'),
    (rec(tokens=["<IMG>"]), '"tokens"'),
    (json.dumps({"tokens": GOOD["tokens"]}), '"label"'),
    (rec(label="2"), '"label"'),
    (rec(label=2.0), '"label"'),
    (rec(label=True), '"label"'),
    (rec(label=3), "out of range 0..2"),
    (rec(label=-1), "out of range"),
    (rec(tokens="<IMG> <Z_016> </IMG> <CLS> <CLS_2> <EOS>"), "unknown token '<Z_016>'"),
    (rec(tokens="<Z_001> <Z_015> </IMG> <CLS> <CLS_2> <EOS>"), "start with <IMG>"),
    (rec(tokens="<IMG> </IMG> <CLS> <EOS>"), "start with <IMG>"),                   # too short
    (rec(tokens="<IMG> <Z_001> <Z_015> </IMG> <CLS> <CLS_2>"), "expected the tail"),
    (rec(tokens="<IMG> <Z_001> <Z_015> <CLS> <CLS_2> <EOS> <EOS>"), "expected the tail"),
    (rec(tokens="<IMG> <Z_001> </IMG> <CLS> <Z_003> <EOS>"), "expected the tail"),
    (rec(tokens="<IMG> <Z_001> <Z_015> </IMG> <CLS> <CLS_1> <EOS>"), "tail says <CLS_1> but the label field is 2"),
    (rec(tokens="<IMG> <Z_001> <CLS_0> <Z_015> </IMG> <CLS> <CLS_2> <EOS>"), "found <CLS_0>"),
    (rec(tokens="<IMG> <Z_001> <IMG> </IMG> <CLS> <CLS_2> <EOS>"), "found <IMG>"),
    (rec(tokens="<IMG> <PAD> <Z_001> </IMG> <CLS> <CLS_2> <EOS>"), "found <PAD>"),
]


@pytest.mark.parametrize("line,msg", BAD_LINES)
def test_read_sequences_rejects_with_file_and_line(tmp_path, line, msg):
    p = tmp_path / "seqs.jsonl"
    p.write_text(rec() + "\n\n" + line + "\n" + rec() + "\n")   # the bad record is on line 3
    with pytest.raises(UserError) as e:
        read_sequences(p, V)
    assert f"{p}:3: " in str(e.value)
    assert msg in str(e.value)


def test_read_sequences_non_utf8_and_empty(tmp_path):
    p = tmp_path / "seqs.jsonl"
    p.write_bytes(rec().encode() + b"\n" + b'{"tokens": "\xff\xfe", "label": 1}\n')
    with pytest.raises(UserError, match=f"{p}:2: not UTF-8"):
        read_sequences(p, V)
    for content in (b"", b"\n  \n"):
        p.write_bytes(content)
        with pytest.raises(UserError) as e:
            read_sequences(p, V)
        assert "empty" in str(e.value) and str(p) in str(e.value)
        assert not re.search(re.escape(str(p)) + r":\d", str(e.value))
    with pytest.raises(UserError, match="cannot read"):
        read_sequences(tmp_path / "missing.jsonl", V)


def test_read_sequences_valid_and_v1_repair(tmp_path):
    p = tmp_path / "seqs.jsonl"
    v1 = rec(tokens="<IMG> <Z_001> <Z_015> </IMG> <CLS> <CLS> <EOS>", label=1)
    p.write_text(rec() + "\n" + v1 + "\n" + rec(tokens="<IMG> </IMG> <CLS> <CLS_0> <EOS>", label=0))
    with pytest.raises(UserError) as e:
        read_sequences(p, V)
    assert f"{p}:2: " in str(e.value) and "--repair_v1" in str(e.value)
    seqs, labels = read_sequences(p, V, repair_v1=True)
    assert labels == [2, 1, 0]
    assert seqs[0] == V.encode(GOOD["tokens"])
    assert seqs[1] == V.encode("<IMG> <Z_001> <Z_015> </IMG> <CLS> <CLS_1> <EOS>")
    assert seqs[2] == [V.img_id, V.img_end_id, V.cls_id, V.label_id(0), V.eos_id]
    # a v1 file with the original 516-entry vocabulary
    big = Vocab(500, 10)
    p.write_text(json.dumps({"tokens": "<IMG> <Z_499> <Z_000> </IMG> <CLS> <CLS> <EOS>", "label": 9}) + "\n")
    seqs, labels = read_sequences(p, big, repair_v1=True)
    assert seqs == [[2, 505, 6, 3, 4, 515, 5]] and labels == [9]


# ----------------------------------------------------------------------------- batches

def seq(n_codes, label, vocab=V):
    return vocab.encode(vocab.image_tokens([k % vocab.num_codes for k in range(n_codes)], label))


def test_truncate_keeps_the_tail():
    s = seq(20, 1)
    assert truncate(s, 100) == s and truncate(s, 25) == s
    t = truncate(s, 10)
    assert len(t) == 10
    assert t[:6] == s[:6] and t[-4:] == [V.img_end_id, V.cls_id, V.label_id(1), V.eos_id]
    assert t[0] == V.img_id and all(V.is_code(i) for i in t[1:-4])
    assert truncate(s, 6) == s[:2] + s[-4:]
    with pytest.raises(UserError, match="max_length 4"):
        truncate(s, 4)


def test_make_batch_one_shift_pads_and_cls_pos():
    seqs = [seq(10, 0), seq(3, 2), seq(30, 1)]
    x, y, cls_pos = make_batch(seqs, max_length=20)
    kept = [truncate(s, 20) for s in seqs]
    assert [len(s) for s in kept] == [15, 8, 20]
    assert x.shape == y.shape == (3, 19) and x.dtype == y.dtype == torch.long
    for i, s in enumerate(kept):
        n = len(s) - 1
        assert x[i, :n].tolist() == s[:-1] and y[i, :n].tolist() == s[1:]
        assert (x[i, n:] == V.pad_id).all() and (y[i, n:] == -100).all()
        assert torch.equal(y[i, :n - 1], x[i, 1:n])              # exactly one shift
        assert x[i, cls_pos[i]] == V.cls_id
        assert y[i, cls_pos[i]] == V.label_id([0, 2, 1][i])
        assert y[i, cls_pos[i] + 1] == V.eos_id
    assert (y != -100).sum() == sum(len(s) - 1 for s in kept)
    x, y, _ = make_batch([seq(3, 2)], max_length=512, pad_id=7)
    assert x.shape == (1, 7) and (y != -100).all()
    with pytest.raises(UserError, match="too short"):
        make_batch(seqs, max_length=5)


# ----------------------------------------------------------------------------- pictures, CLI, config

@pytest.mark.parametrize("channels", [1, 3])
def test_save_grid_png_size(tmp_path, channels):
    imgs = torch.rand(5, channels, 8, 8, generator=torch.Generator().manual_seed(0))
    out = tmp_path / "grid.png"
    size = save_grid(imgs, ["a", "b", "c", "d", "e"], out)
    ncol, nrow = 3, 2                        # ceil(sqrt(5)) columns
    assert size == (ncol * (8 * 3 + 4), nrow * (8 * 3 + 16))
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == size
        cell = np.asarray(im.convert("RGB"))[2:2 + 24, 2:2 + 24]
    ref = (imgs[0].clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    ref = ref.repeat(3, 0).repeat(3, 1)       # nearest x3
    assert np.array_equal(cell, np.broadcast_to(ref, (24, 24, 3)))
    assert save_grid(imgs[:2], None, tmp_path / "g2.png", ncol=1, scale=2) == (20, 2 * 32)


def run_data(*args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), *args], capture_output=True,
                          text=True, cwd=cwd or ROOT, env=env, timeout=120)


def test_cli_help_and_bad_option(tmp_path):
    r = run_data("--help")
    assert r.returncode == 0 and "prepare" in r.stdout
    r = run_data("prepare", "--help")
    assert r.returncode == 0 and "num_codes" in r.stdout and "patch_size" in r.stdout
    r = run_data("prepare", "--bogus", "1", cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert "--bogus" in lines[0] and "num_codes" in lines[0]
    assert not (tmp_path / "data").exists()


def run_main(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["data.py", *args])
    assert data.main() == 0
    return capsys.readouterr().out


def test_cli_prepare_render_reconstruct(tmp_path, monkeypatch, capsys):
    # in-process (the subprocess test above covers the process boundary)
    write_folder(tmp_path / "images", n=30)
    out = run_main(monkeypatch, capsys, "prepare", "--source", f"folder:{tmp_path / 'images'}",
                   "--data_dir", str(tmp_path / "p"), "--image_size", "8", "--patch_size", "2",
                   "--num_codes", "16", "--kmeans_iters", "5", "--augment", "1")
    rep = json.loads(out.splitlines()[0])
    assert rep["counts"]["train_augmented"] == 24 and rep["sequence_length"] == 21
    made = json.loads((tmp_path / "p" / "report.json").read_text())["config"]
    assert (made["num_codes"], made["image_size"], made["augment"]) == (16, 8, 1)
    grid = tmp_path / "grid.png"
    out = run_main(monkeypatch, capsys, "render", str(tmp_path / "p" / "test.jsonl"), "--n", "4", "--out", str(grid))
    assert "wrote" in out
    with Image.open(grid) as im:
        assert im.size == (2 * (8 * 3 + 4), 2 * (8 * 3 + 16))
    rec_png = tmp_path / "recon.png"
    out = run_main(monkeypatch, capsys, "reconstruct", str(tmp_path / "p"), "--n", "3", "--out", str(rec_png))
    assert "PSNR" in out
    with Image.open(rec_png) as im:
        w, h = im.size          # 3 real + 3 decoded in 8 columns, each as wide as its caption ("c0 real") needs
        assert h == 8 * 3 + 16 and w % 8 == 0 and w >= 8 * (8 * 3 + 4)


def test_a_training_config_prepares_data_that_reads_back_as_data_settings(tmp_path, monkeypatch, capsys):
    # train.py's TrainConfig holds a DataConfig; what prepare writes must read back as data settings only
    # (regression: report.json once held every training field and `reconstruct` crashed)
    write_folder(tmp_path / "images", n=30)
    cfg = build(TrainConfig, lr=1e-3, **flat(tiny_cfg(tmp_path))).data
    rep = ensure_prepared(cfg, log=lambda m: None)
    assert list(rep["config"]) == data_config.data_fields()
    assert build(DataConfig, **rep["config"]) == tiny_cfg(tmp_path)
    assert load_codebook(tmp_path / "prepared").cfg.num_codes == 16
    assert ensure_prepared(cfg, log=None) == rep
    run_main(monkeypatch, capsys, "reconstruct", str(tmp_path / "prepared"), "--out", str(tmp_path / "r.png"))


def override(cfg, argv):
    """What data.py prepare does with its --key value options."""
    p = parser("", prog="data.py prepare")
    add_options(p, type(cfg))
    return apply_options(cfg, p.parse_args(argv))


def test_settings_from_the_command_line_and_coerce():
    cfg = override(DataConfig(), ["--num_codes", "16", "--w_colour", "0.5", "--source", "idx:x",
                                  "--val_fraction", "1e-1"])
    assert (cfg.codebook.num_codes, cfg.codebook.w_colour, cfg.source, cfg.test_fraction) == (16, 0.5, "idx:x", 0.1)
    assert isinstance(cfg.codebook.num_codes, int) and isinstance(cfg.codebook.w_colour, float)
    with pytest.raises(UserError) as e:
        override(DataConfig(), ["--num_code", "16"])
    assert "--num_code" in str(e.value) and "valid options" in str(e.value) and "\n" not in str(e.value)
    assert all(k in str(e.value) for k in ("--num_codes", "--patch_size", "--source", "--max_rotate"))
    with pytest.raises(UserError, match="unrecognized arguments: num_codes 16"):
        override(DataConfig(), ["num_codes", "16"])
    with pytest.raises(UserError, match="command line: num_codes expects int, got 'abc'"):
        override(DataConfig(), ["--num_codes", "abc"])
    with pytest.raises(UserError, match="num_codes expects int"):
        override(DataConfig(), ["--num_codes", "1.5"])
    with pytest.raises(UserError, match="w_colour expects float"):
        override(DataConfig(), ["--w_colour", "heavy"])
    with pytest.raises(UserError, match="expected one argument"):
        override(DataConfig(), ["--num_codes"])
    # YAML values
    assert coerce("n", 3.0, int, "y") == 3 and coerce("n", 7, int, "y") == 7
    assert coerce("f", 1, float, "y") == 1.0 and coerce("s", 12, str, "y") == "12"
    assert coerce("b", "yes", bool, "y") is True and coerce("b", "0", bool, "y") is False
    assert coerce("b", False, bool, "y") is False
    for key, value, typ in [("n", 3.5, int), ("n", True, int), ("n", None, int), ("f", True, float),
                            ("f", None, float), ("s", True, str), ("s", None, str), ("s", [1], str),
                            ("b", "maybe", bool)]:
        with pytest.raises(UserError, match=f"y: {key} expects {typ.__name__}"):
            coerce(key, value, typ, "y")
    assert data_config.data_fields()[:2] == ["patch_size", "num_codes"] and "source" in data_config.data_fields()


# ----------------------------------------------------------------------------- Hugging Face datasets

def hf_dataset(n=30, size=10, seed=0):
    """A small image classification data set as `datasets` holds them: PIL images (colour, another
    size than the model's), a ClassLabel column with names."""
    import datasets
    rng = np.random.default_rng(seed)
    imgs, labels = [], []
    for i in range(n):
        y = i % 3
        a = (rng.random((size, size, 3)) * 40).astype(np.uint8)
        a[2 * y + 1:2 * y + 4, 2:8] = 220
        imgs.append(Image.fromarray(a, "RGB"))
        labels.append(y)
    feats = datasets.Features({"img": datasets.Image(), "digit": datasets.ClassLabel(names=["a", "b", "c"])})
    return datasets.Dataset.from_dict({"img": imgs, "digit": labels}, features=feats), imgs, labels


def test_hf_colour_images_of_other_sizes_and_modes_are_converted(tmp_path):
    """A colour data set of non-square images of another size, mixing colour, grey, palette and
    transparent images: each is converted to the channels asked for and resized to image_size x
    image_size (the aspect is not kept), as image folders are; 32-bit, missing and unlabelled images
    are refused in one line naming the row."""
    import datasets
    rng = np.random.default_rng(0)
    modes = ["RGB", "L", "P", "RGBA", "LA", "CMYK"]
    imgs = [Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).convert(modes[i % 6]) for i in range(12)]
    feats = datasets.Features({"picture": datasets.Image(), "kind": datasets.ClassLabel(names=["red", "green"])})
    datasets.Dataset.from_dict({"picture": imgs, "kind": [i % 2 for i in range(12)]}, features=feats) \
        .save_to_disk(str(tmp_path / "mixed"))
    images, labels, names, _ = sources.load_hf(str(tmp_path / "mixed"), 16, 3)
    assert images.shape == (12, 16, 16, 3) and names == ["red", "green"] and labels.tolist() == [0, 1] * 6
    for i in range(12):
        want = np.asarray(imgs[i].convert("RGB").resize((16, 16), Image.Resampling.BILINEAR))
        assert np.array_equal(images[i], want), modes[i % 6]
    grey = sources.load_hf(str(tmp_path / "mixed"), 16, 1)[0]
    assert grey.shape == (12, 16, 16, 1) and np.array_equal(grey[1, :, :, 0], np.asarray(imgs[1].resize((16, 16), Image.Resampling.BILINEAR)))
    deep = [Image.fromarray(np.full((4, 4), 70000, np.int32), "I")] + imgs[:2]
    datasets.Dataset.from_dict({"picture": deep, "kind": [0, 1, 0]}, features=feats).save_to_disk(str(tmp_path / "deep"))
    with pytest.raises(UserError, match=r"row 0: 32-bit integer pixels \(mode I\); expected an 8- or 16-bit"):
        sources.load_hf(str(tmp_path / "deep"), 16, 3)
    datasets.Dataset.from_dict({"picture": [imgs[0], None], "kind": [0, 1]}, features=feats) \
        .save_to_disk(str(tmp_path / "none"))
    with pytest.raises(UserError, match=r"row 1: no image in column 'picture'"):
        sources.load_hf(str(tmp_path / "none"), 16, 3)
    datasets.Dataset.from_dict({"picture": imgs[:2], "kind": [0, -1]}, features=feats) \
        .save_to_disk(str(tmp_path / "unlabelled"))
    with pytest.raises(UserError, match=r"row 1: label -1 is no class of kind .*choose a labelled split"):
        sources.load_hf(str(tmp_path / "unlabelled"), 16, 3)


def test_hf_source_reads_a_saved_dataset_and_its_splits(tmp_path):
    import datasets
    ds, imgs, labels = hf_dataset()
    ds.save_to_disk(str(tmp_path / "one"))
    images, got, names, meta = sources.load_hf(str(tmp_path / "one"), 8, 1)
    assert names == ["a", "b", "c"] and got.tolist() == labels and images.shape == (30, 8, 8, 1)
    want = np.asarray(imgs[4].convert("L").resize((8, 8), Image.Resampling.BILINEAR))
    assert np.array_equal(images[4, :, :, 0], want)                  # converted as image folders are
    datasets.DatasetDict({"train": ds, "test": ds.select(range(6))}).save_to_disk(str(tmp_path / "dict"))
    assert len(sources.load_hf(str(tmp_path / "dict") + ":test", 8, 1)[1]) == 6
    assert len(sources.load_hf(str(tmp_path / "dict"), 8, 3)[0]) == 30   # the train split by default
    with pytest.raises(UserError, match=r"no split 'valid'; it has train, test"):
        sources.load_hf(str(tmp_path / "dict") + ":valid", 8, 1)
    plain = datasets.Dataset.from_dict({"x": [1, 2]})
    plain.save_to_disk(str(tmp_path / "plain"))
    with pytest.raises(UserError, match="expected an Image column and a ClassLabel"):
        sources.load_hf(str(tmp_path / "plain"), 8, 1)
    # prepare reads it like any other source, split and codebook included
    cfg = build(DataConfig, source=f"hf:{tmp_path / 'one'}", data_dir=str(tmp_path / "prepared"), image_size=8,
                     patch_size=2, num_codes=8, kmeans_iters=3)
    rep = prepare(cfg)
    assert rep["classes"] == ["a", "b", "c"] and rep["counts"]["test"] == [2, 2, 2]


def test_hf_label_columns_without_classlabel(tmp_path):
    import datasets
    img = Image.new("RGB", (5, 7), (200, 10, 10))
    for values, want_names, want in [(["cat", "dog", "cat"], ["cat", "dog"], [0, 1, 0]),
                                     ([10, 2, 2], ["2", "10"], [1, 0, 0]),        # numbers in their order
                                     ([True, False, True], ["False", "True"], [1, 0, 1])]:
        ds = datasets.Dataset.from_dict({"image": [img] * 3, "label": values})
        folder = str(tmp_path / f"ds{len(os.listdir(tmp_path))}")
        ds.save_to_disk(folder)
        _, labels, names, _ = sources.load_hf(folder, 4, 3)
        assert names == want_names and labels.tolist() == want, values
    odd = datasets.Dataset.from_dict({"image": [img] * 2, "labels": [[0, 1], [1]]})
    odd.save_to_disk(str(tmp_path / "multi"))
    with pytest.raises(UserError, match=r"row 0: label \[0, 1\] in column 'labels' is not a class"):
        sources.load_hf(str(tmp_path / "multi"), 4, 3)


# ----------------------------------------------------------------------------- images the project makes itself

def test_shapes_folders_are_deterministic_and_read_like_a_users_images(tmp_path, monkeypatch, capsys):
    from imagegpt import shapes
    for kind, (size, classes) in shapes.KINDS.items():
        a, b = tmp_path / f"{kind}-a", tmp_path / f"{kind}-b"
        assert f"wrote {a}" in run_main(monkeypatch, capsys, "shapes", str(a), "--kind", kind, "--per_class", "3")
        shapes.write_folder(str(b), kind, 3, seed=0)
        files = sorted(os.path.relpath(os.path.join(d, f), a) for d, _, fs in os.walk(a) for f in fs)
        assert len(files) == 3 * len(classes) and sorted(os.listdir(a)) == sorted(classes)
        assert all(open(a / f, "rb").read() == open(b / f, "rb").read() for f in files)   # the same seed, the same bytes
        colour = kind in shapes.COLOUR_KINDS
        images, labels, names, _ = sources.load_folder(str(a), size, 3 if colour else 1)
        assert names == sorted(classes) and images.shape[0] == 3 * len(classes)
        with Image.open(a / files[0]) as im:
            assert im.size == (size, size) and im.mode == ("RGB" if colour else "L")
        if kind == "strokes":   # white strokes on black, as the digits
            assert (images[..., 0] < 30).mean() > 0.6 and images.max() > 200
        else:                   # a shape of another colour than its background
            corner = images[:, :1, :1].astype(int)
            assert (np.abs(images - corner).sum(-1).max(axis=(1, 2)) > 150).all()
    with pytest.raises(UserError, match="exists; choose a new folder"):
        shapes.write_folder(str(tmp_path / "strokes-a"), "strokes", 3)
    # the painted digits: each built-in digit's grey level mixes its two colours (0: the ground, 255: the figure)
    painted, labels = shapes.painted_digits(2, np.random.default_rng(0))
    grey, all_labels = sources.load_builtin()[:2]
    assert painted.shape == (20, 28, 28, 3) and labels.tolist() == [c for c in range(10) for _ in range(2)]
    for im, y in zip(painted, labels):
        ground = (im == im[0, 0]).all(-1)
        match = [g for g in grey[all_labels == y] if ground[g[..., 0] == 0].all() and not ground[g[..., 0] > 128].any()]
        assert match, "each painted image is a built-in digit of its class: the ground where it is 0, not where it is bright"
    with pytest.raises(UserError, match="the built-in digits have .* per class at least; --per_class 9999 is more"):
        shapes.painted_digits(9999, np.random.default_rng(0))
