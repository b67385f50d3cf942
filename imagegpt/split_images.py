"""The real images of a checkpoint's splits, read again from its data source: what its drawings are judged
against (the drawing report), what test-time augmentation classifies (eval.py) and what an export checks
its graphs on (web_export)."""
import numpy as np

from imagegpt.data_config import data_settings
from imagegpt.errors import UserError
from imagegpt.sources import load_source
from imagegpt.splits import split_roles


def real_split(settings, split="test"):
    """The real images a checkpoint was trained on and is compared with, from its data settings ->
    (train images, train labels, compared images, compared labels), uint8 (N, H, W, C), split as
    prepare.prepare splits: with split "test" the held-out test_fraction (whatever dev_fraction was); with
    "dev" the development split carved from the training images (which then exclude it), so that
    sampling settings can be chosen without reading the test split."""
    cfg = data_settings(settings)
    images, labels, _, _ = load_source(cfg)
    tr, dev, te = split_roles(labels, cfg)
    if split == "dev":
        if not cfg.dev_fraction > 0:
            raise UserError("this checkpoint was trained without a development split (dev_fraction 0); compare "
                            "with the test split instead")
        te = dev
    else:
        tr = np.sort(np.concatenate([tr, dev]))
    return images[tr], labels[tr], images[te], labels[te]


def test_images(ck):
    """The checkpoint's test images (uint8 N, H, W, C) and labels, read again from its data source, and what
    they are; (None, None, why not) when they cannot be read or do not fit the codebook."""
    book = ck.codebook
    try:
        cfg = data_settings(ck.settings)
        if (cfg.image_size, cfg.image_size, cfg.channels) != (*book.image_size, book.channels):
            return None, None, (f"the checkpoint's data settings ({cfg.image_size} x {cfg.image_size} x {cfg.channels}) "
                                f"do not give the codebook's images ({book.image_size[0]} x {book.image_size[1]} x "
                                f"{book.channels})")
        images, labels = real_split(ck.settings, "test")[2:]
    except (UserError, OSError, KeyError, TypeError, ValueError) as e:
        return None, None, f"the checkpoint's test split could not be read ({str(e).splitlines()[0][:160]})"
    return images, labels, f"the test split of {ck.settings.get('source', '?')} ({len(images)} images)"
