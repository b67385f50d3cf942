"""Labelled images the project makes itself, for trying colour and fine-tuning on other classes with
nothing to download. Two kinds, each deterministic for a seed:

    strokes   grey 28 x 28, white pen strokes on black like the MNIST digits: circle, cross, triangle,
              square, zigzag, each drawn by a wobbly hand (position, size, slant and pen width vary);
    colour    32 x 32 colour: a filled circle, square, triangle or star, of a random colour on a random
              background colour that differs from it, at a random place, size and angle;
    digits    28 x 28 colour: the built-in MNIST digits (0 to 9, at most 500 per class), each painted in a
              random colour on a random background colour (its grey level mixes the two), so that the
              class lies in the shape and the colours carry none.

Each image is drawn at 4 times its size and shrunk with antialiasing, so edges are soft as in real
images. write_folder() writes them as a class-folder tree (root/<class>/<n>.png) that `--source
folder:ROOT` reads, like a user's own images.
"""
import math
import os

import numpy as np
from PIL import Image, ImageDraw

from imagegpt.errors import UserError
from imagegpt.files import atomic_dir

KINDS = {"strokes": (28, ["circle", "cross", "triangle", "square", "zigzag"]),
         "colour": (32, ["circle", "square", "triangle", "star"]),
         "digits": (28, [str(d) for d in range(10)])}
COLOUR_KINDS = ("colour", "digits")   # the kinds of colour images (the others are grey)
SCALE = 4   # drawn at SCALE x the size, then shrunk


def draw(kind, label, rng):
    """One image of class index `label` of `kind` -> uint8 (H, W) for strokes, (H, W, 3) for colour."""
    size, names = KINDS[kind]
    big = size * SCALE
    if kind == "strokes":
        im = Image.new("L", (big, big), 0)
        pen = ImageDraw.Draw(im)
        width = int(rng.uniform(0.07, 0.11) * big)
        for line in stroke_figure(names[label], rng):
            pts = [(big * (0.5 + x), big * (0.5 + y)) for x, y in line]
            pen.line(pts, fill=255, width=width, joint="curve")
            for x, y in (pts[0], pts[-1]):   # round pen ends
                pen.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=255)
    else:
        back, front = colour_pair(rng)
        im = Image.new("RGB", (big, big), back)
        ImageDraw.Draw(im).polygon([(big * (0.5 + x), big * (0.5 + y)) for x, y in filled_figure(names[label], rng)],
                                   fill=front)
    return np.asarray(im.resize((size, size), Image.Resampling.LANCZOS))


def ring(n, radius, start=0.0, squash=1.0):
    """n points on an ellipse (x radius `radius`, y radius `radius * squash`), from angle `start`."""
    a = start + np.arange(n) * 2 * math.pi / n
    return np.stack([radius * np.cos(a), radius * squash * np.sin(a)], 1)


def stroke_figure(name, rng):
    """A figure of pen strokes in [-0.5, 0.5]^2 -> list of polylines [(x, y), ...], wobbled by hand."""
    r = rng.uniform(0.22, 0.32)
    if name == "circle":
        pts = ring(24, r, rng.uniform(0, 2 * math.pi), rng.uniform(0.75, 1.2))
        lines = [np.concatenate([pts, pts[:1 + rng.integers(0, 3)]])]         # closed, a little overlap
    elif name == "cross":
        lines = [np.array([[-r, -r], [r, r]]), np.array([[r, -r], [-r, r]])] if rng.random() < 0.5 else \
            [np.array([[0, -r], [0, r]]), np.array([[-r, 0], [r, 0]])]
    elif name == "triangle":
        pts = ring(3, r, rng.uniform(0, 2 * math.pi))
        lines = [np.concatenate([pts, pts[:1]])]
    elif name == "square":
        pts = ring(4, r * 1.2, math.pi / 4 + rng.uniform(-0.3, 0.3))
        lines = [np.concatenate([pts, pts[:1]])]
    else:   # zigzag
        n = rng.integers(4, 7)
        xs = np.linspace(-r, r, n)
        lines = [np.stack([xs, np.where(np.arange(n) % 2, r, -r) * rng.uniform(0.5, 0.9)], 1)]
    slant = rng.uniform(-0.3, 0.3)
    shift = rng.uniform(-0.08, 0.08, 2)
    out = []
    for line in lines:
        line = densify(line, 6)
        line = line + rng.normal(0, 0.012, line.shape)                     # a wobbly hand
        line = line @ np.array([[1, 0], [slant, 1]]) + shift              # slant, place
        out.append([tuple(p) for p in line])
    return out


def densify(line, k):
    """k points along each segment of a polyline (so that wobble bends the strokes)."""
    t = np.linspace(0, 1, k, endpoint=False)[:, None]
    pts = [a + t * (b - a) for a, b in zip(line[:-1], line[1:])]
    return np.concatenate(pts + [line[-1:]])


def filled_figure(name, rng):
    """The outline of a filled figure in [-0.5, 0.5]^2 -> list of (x, y)."""
    r = rng.uniform(0.2, 0.34)
    angle = rng.uniform(0, 2 * math.pi)
    if name == "circle":
        pts = ring(48, r, 0.0, rng.uniform(0.8, 1.0))
    elif name == "square":
        pts = ring(4, r * 1.25, angle)
    elif name == "triangle":
        pts = ring(3, r * 1.2, angle)
    else:   # a five-pointed star
        outer, inner = ring(5, r * 1.25, angle), ring(5, r * 0.5, angle + math.pi / 5)
        pts = np.stack([outer, inner], 1).reshape(-1, 2)
    room = 0.5 - np.abs(pts).max()
    return [tuple(p) for p in pts + rng.uniform(-room, room, 2) * 0.9]


def colour_pair(rng):
    """(background, shape colour) as RGB tuples, far enough apart to see the shape."""
    while True:
        back, front = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        if np.abs(back.astype(int) - front).sum() > 200:
            return tuple(int(v) for v in back), tuple(int(v) for v in front)


def painted_digits(per_class, rng):
    """per_class built-in digits of each class (a seeded choice), each painted in a random colour pair:
    uint8 (10 * per_class, 28, 28, 3), labels, class after class."""
    from imagegpt.sources import load_builtin
    grey, labels = load_builtin()[:2]
    if per_class > np.bincount(labels).min():
        raise UserError(f"shapes: the built-in digits have {np.bincount(labels).min()} per class at least; "
                        f"--per_class {per_class} is more")
    pick = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(10)])
    mix = grey[pick].astype(np.float64) / 255                                     # (n, 28, 28, 1)
    pairs = np.array([colour_pair(rng) for _ in pick], np.float64)               # (n, 2, 3): back, front
    out = pairs[:, None, None, 0] + mix * (pairs[:, None, None, 1] - pairs[:, None, None, 0])
    return np.rint(out).astype(np.uint8), labels[pick]


def write_folder(root, kind, per_class, seed=0):
    """per_class images of every class of `kind` as root/<class>/<n>.png (written whole or not at all)."""
    if kind not in KINDS:
        raise UserError(f"shapes: kind must be {' or '.join(KINDS)}, got {kind!r}")
    if per_class < 1:
        raise UserError(f"shapes: --per_class must be at least 1, got {per_class}")
    if os.path.exists(root) and (not os.path.isdir(root) or os.listdir(root)):
        raise UserError(f"{root}: exists; choose a new folder for the images (nothing is replaced)")
    names = KINDS[kind][1]
    rng = np.random.default_rng(seed)
    painted = painted_digits(per_class, rng)[0] if kind == "digits" else None
    with atomic_dir(root, "image folder") as tmp:
        for c, name in enumerate(names):
            os.makedirs(os.path.join(tmp, name))
            for i in range(per_class):
                im = painted[c * per_class + i] if painted is not None else draw(kind, c, rng)
                Image.fromarray(im).save(os.path.join(tmp, name, f"{i:05d}.png"))
    return names
