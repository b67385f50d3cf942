"""Small data written by the tests themselves."""
import os

import numpy as np
from PIL import Image


def write_images(root, n=60, size=8, seed=0):
    """n grey images whose class (0..2) is the row band of a bright 2x2 square, as PNGs in root/cK/."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        y = i % 3
        im = (rng.random((size, size)) * 40).astype(np.uint8)
        r, c = 1 + 2 * y + rng.integers(0, 2), 1 + rng.integers(0, size - 3)
        im[r:r + 2, c:c + 2] = 200 + rng.integers(0, 55)
        os.makedirs(os.path.join(root, f"c{y}"), exist_ok=True)
        Image.fromarray(im).save(os.path.join(root, f"c{y}", f"{i:03d}.png"))
