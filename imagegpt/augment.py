"""Augmentation: random moves of images (rotation, shift, scale, shear, a smooth warp), and other orders
of their colour channels, for the fixed copies that prepare writes, the copies drawn afresh each epoch,
and the views of test-time augmentation (moves only)."""
import math

import torch
import torch.nn.functional as F

MOVE_LIMITS = ("max_shift", "max_rotate", "max_scale", "max_shear", "max_elastic")   # how far copies and views move


def augment(images, copies, jitter, seed):
    """float (N, C, H, W) -> (copies * N, C, H, W): the fixed copies, randomly moved as copy_params draws
    (and recoloured, with permute_colours)."""
    params = copy_params(len(images), copies, jitter, seed)
    return torch.cat([make_copy(images, p, c + 1, jitter) for c, p in enumerate(params)]) if copies else images[:0]


def make_copy(images, params, copy, jitter):
    """Copy number `copy` (>= 1; an int or one per image) of float images (N, C, H, W): moved by params
    (transform), then, with jitter.permute_colours, with its colour channels in the copy's order (recolour)."""
    moved = transform(images, params)
    return recolour(moved, copy) if jitter.permute_colours else moved


class FixedCopies:
    """The fixed copies of n images (prepare writes them once): copy c (1..copies) of image i is moved by
    copy_params' row [c - 1, i] and, with permute_colours, recoloured (make_copy)."""

    def __init__(self, n, copies, jitter, seed):
        self.params, self.jitter = copy_params(n, copies, jitter, seed), jitter

    def __call__(self, images, c, rows):
        """Copy c of images (len(rows), C, H, W), which are the images of index `rows`."""
        return make_copy(images, self.params[c - 1, rows], c, self.jitter)


COLOUR_ORDERS = ((0, 1, 2), (1, 2, 0), (2, 0, 1), (0, 2, 1), (2, 1, 0), (1, 0, 2))   # R, G, B in the six orders


def recolour(images, copy):
    """float (N, 3, H, W) -> the same with the channels of copy c in the order COLOUR_ORDERS[c % 6] (copy 0,
    the image itself, keeps its colours; copies 1 to 5 take the five other orders, copy 6 the first again).
    copy: an int, or one per image (N,)."""
    order = torch.tensor(COLOUR_ORDERS)[torch.as_tensor(copy) % len(COLOUR_ORDERS)]
    if order.dim() == 1:
        return images[:, order]
    return images.gather(1, order.to(images.device)[:, :, None, None].expand(images.shape))


WARP_GRID = 4   # max_elastic: the warp's lattice of control points, WARP_GRID x WARP_GRID over the image


def move_width(jitter):
    """The columns of one move: angle, shift x, shift y, scale, shear, then with max_elastic the warp's
    displacements (x then y, WARP_GRID x WARP_GRID each)."""
    return 5 + 2 * WARP_GRID ** 2 if jitter.max_elastic else 5


def copy_params(n, copies, jitter, seed):
    """The random moves of the fixed copies: float (copies, n, move_width(jitter)), each row (angle in radians,
    shift x and y in pixels, scale factor, shear in radians[, warp displacements in pixels]) as transform
    takes it, uniform within the limits of `jitter` (a DataConfig, or anything with its max_rotate,
    max_shift, max_scale, max_shear and max_elastic). One generator seeded with `seed` draws the angles and
    shifts copy after copy, then the scales and shears, then the warps, so that turning the later ones on
    leaves the earlier ones as they were."""
    g = torch.Generator().manual_seed(seed)
    u = torch.empty(copies, n, move_width(jitter))
    for c in range(copies):
        u[c, :, 0] = torch.rand(n, generator=g) * 2 - 1
        u[c, :, 1:3] = torch.rand(n, 2, generator=g) * 2 - 1
    u[:, :, 3:5] = torch.rand(copies, n, 2, generator=g) * 2 - 1
    u[:, :, 5:] = torch.rand(copies, n, u.shape[2] - 5, generator=g) * 2 - 1
    return moves(u, jitter)


def moves(u, jitter):
    """Uniform draws u (..., move_width(jitter)) in [-1, 1] -> the moves transform takes, the same shape:
    angle (radians), shift x and y (pixels), scale factor, shear (radians)[, warp displacements (pixels)],
    each within the limits of `jitter`."""
    return torch.cat([torch.stack([u[..., 0] * math.radians(jitter.max_rotate), u[..., 1] * jitter.max_shift,
                                   u[..., 2] * jitter.max_shift, 1 + u[..., 3] * jitter.max_scale,
                                   u[..., 4] * math.radians(jitter.max_shear)], -1),
                      u[..., 5:] * jitter.max_elastic], -1)


TTA_SEED = 1   # the draws of test-time augmentation (training's fixed copies draw with split_seed)


def tta_views(images, copies, jitter, seed=TTA_SEED):
    """Test-time augmentation: float images (N, C, H, W) -> the images themselves, then `copies` randomly
    moved versions of them, drawn as training draws its augmented copies (copy_params, one at a time)."""
    yield images
    for p in copy_params(len(images), copies, jitter, seed):
        yield transform(images, p)


def transform(images, params):
    """float (N, C, H, W) moved by params (N, 5 or 5 + 2 WARP_GRID^2) (copy_params): sheared horizontally,
    scaled and rotated about the centre, then shifted, then warped when the row has warp columns (each
    output pixel also moved by a displacement interpolated bicubically from the WARP_GRID x WARP_GRID
    lattice, corners on the image's corners); bilinear. The pixels that come from outside the image take
    its background: each channel's median over the image's outermost pixels (black for the digits, the
    backdrop's colour for an image on a coloured ground). Each image's result depends on its own row."""
    N, C, H, W = images.shape
    angles, shifts, scales, shears = params[:, 0], params[:, 1:3], params[:, 3], params[:, 4]
    cos, sin, k = angles.cos() / scales, angles.sin() / scales, shears.tan()
    # the output pixel p samples the input at A p + t, A = rotation x shear / scale (what the grid wants)
    theta = torch.stack([torch.stack([cos, k * cos - sin, -2 * shifts[:, 0] / W], 1),
                         torch.stack([sin, k * sin + cos, -2 * shifts[:, 1] / H], 1)], 1)
    grid = F.affine_grid(theta, (N, C, H, W), align_corners=False)
    if params.shape[1] > 5:   # the warp: pixels -> the grid's units (2 / W per pixel across, 2 / H down)
        lattice = params[:, 5:].reshape(N, 2, WARP_GRID, WARP_GRID)
        warp = F.interpolate(lattice, size=(H, W), mode="bicubic", align_corners=True)
        grid = grid - warp.permute(0, 2, 3, 1) * grid.new_tensor([2 / W, 2 / H])
    bg = background(images)
    return F.grid_sample(images - bg, grid, align_corners=False, padding_mode="zeros") + bg


def background(images):
    """float (N, C, H, W) -> (N, C, 1, 1): each channel's median over the image's one-pixel frame."""
    frame = torch.cat([images[:, :, 0], images[:, :, -1], images[:, :, 1:-1, 0], images[:, :, 1:-1, -1]], -1)
    return frame.median(-1).values[..., None, None]
