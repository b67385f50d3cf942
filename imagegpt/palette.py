"""Shape apart from colour: a colour image as two colours and a mix per pixel.

Most images whose class lies in a shape (a figure on a ground, a pen stroke, an icon) are two colours
and the soft edges between them. Each image is read as
    ground   the colour of its ground: each channel's median over the one-pixel frame, then refined;
    figure   the colour farthest from the ground, then refined;
    mix      per pixel, where it lies between them: alpha = (x - ground).(figure - ground) / |figure - ground|^2,
             clamped to [0, 1] (0: the ground, 1: the figure);
and rebuilt as ground + alpha * (figure - ground). The mix is free of the colours: the same shape
painted in other colours has the same mix, which is what the pattern codes of tokenizer.PaletteCodebook
are fitted on. Refining: REFINE times, each colour becomes the mean of the pixels that are clearly
its own (alpha below PURE for the ground, above 1 - PURE for the figure), so that the soft edges do
not pull the two colours towards each other.

Every step is written so that imagegpt/onnx_tokenizer.py can repeat it operation for operation in
float32: the dot products over the three channels are added in one order, and the sums of the
refining means are taken in float64, where the sum of any image's pixels is exact (so the order in
which a runtime adds them does not matter).
"""
import torch

from imagegpt.augment import background

REFINE = 3     # rounds of refining the two colours
PURE = 0.05    # a pixel with alpha below this is the ground's, above 1 - PURE the figure's (softer
               # edge pixels would pull the colours towards each other)
EPS = 1e-6     # |figure - ground|^2 below this: one colour (alpha 0 everywhere)


def dot3(a, b):
    """(N, 3, ...) . (N, 3, ...) -> (N, ...): a0 b0 + a1 b1 + a2 b2, added in this order."""
    return a[:, 0] * b[:, 0] + a[:, 1] * b[:, 1] + a[:, 2] * b[:, 2]


def mix(pixels, ground, figure):
    """pixels (N, 3, P), ground and figure (N, 3) -> alpha (N, P) in [0, 1]."""
    v = figure - ground
    return (dot3(pixels - ground[..., None], v[..., None]) / dot3(v, v).clamp_min(EPS)[:, None]).clamp(0, 1)


def pure_mean(pixels, mask, old):
    """The mean of the pixels (N, 3, P) where mask (N, P) holds, per image; `old` (N, 3) where none does.
    Summed in float64 (exact for any image's pixels), divided there, then rounded to float32 once."""
    n = mask.sum(1, dtype=torch.float64)
    s = (pixels.double() * mask[:, None].double()).sum(2)
    return torch.where(n[:, None] > 0, (s / n.clamp_min(1)[:, None]).float(), old)


def two_colours(images):
    """float (N, 3, H, W) in [0, 1] -> ground (N, 3), figure (N, 3), alpha (N, H, W) (see the module)."""
    N, C, H, W = images.shape
    pixels = images.reshape(N, C, H * W)
    ground = background(images)[..., 0, 0]
    off = pixels - ground[..., None]
    far = dot3(off, off).argmax(1)                                     # the first pixel farthest from the ground
    figure = pixels.gather(2, far[:, None, None].expand(N, C, 1))[..., 0]
    for _ in range(REFINE):
        a = mix(pixels, ground, figure)
        ground, figure = pure_mean(pixels, a < PURE, ground), pure_mean(pixels, a > 1 - PURE, figure)
    return ground, figure, mix(pixels, ground, figure).reshape(N, H, W)


def paint(ground, figure, alpha):
    """ground, figure (N, 3) and alpha (N, 1, H, W) -> images (N, 3, H, W) in [0, 1]."""
    g, f = ground[..., None, None], figure[..., None, None]
    return (g + alpha * (f - g)).clamp(0, 1)
