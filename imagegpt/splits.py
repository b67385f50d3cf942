"""The three roles of a data set's images, never mixed: training, development (carved from the
training images) and test (held out). Stratified by class and deterministic for a seed."""
import numpy as np

from imagegpt.errors import UserError


def folds(fraction):
    """How many disjoint held-out parts of this share there are (dev_fold runs from 0 to this - 1)."""
    return int(1 / fraction + 1e-9) if fraction > 0 else 1


def stratified_split(labels, fraction=0.2, seed=0, fold=0):
    """Deterministic per-class shuffle; of each class, the k = round(n_c * fraction) images from
    position fold * k on are validation (fold 0: the first k), so folds 0, 1, ... are disjoint.
    Returns sorted (train indices, val indices)."""
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(len(idx) * fraction))
        if (fold + 1) * k > len(idx):
            raise UserError(f"fold {fold} of a {fraction:g} split: class {c} has {len(idx)} images, {k} per "
                            f"fold, so only folds 0 to {len(idx) // k - 1} exist")
        val.append(idx[fold * k:(fold + 1) * k])
        train.append(np.concatenate([idx[:fold * k], idx[(fold + 1) * k:]]))
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def split_roles(labels, cfg):
    """The three roles of a source's images -> sorted index arrays (train, dev, test): test is the held-out
    fraction (split_seed), whatever the other settings; with dev_fraction > 0, dev is fold dev_fold of the
    remaining training images (split_seed + 1) and train the rest; else dev is empty."""
    train, test = stratified_split(labels, cfg.test_fraction, cfg.split_seed)
    if not cfg.dev_fraction > 0:
        return train, train[:0], test
    sub, dev = stratified_split(labels[train], cfg.dev_fraction, cfg.split_seed + 1, cfg.dev_fold)
    return train[sub], train[dev], test
