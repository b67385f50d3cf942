"""Measuring class-conditional generation with an independent judge: conditional accuracy (the share of
samples asked to be class c that a classifier on real pixels, not the GPT, calls c), diversity (mean
pairwise pixel distance of the samples of a class against that of real images of the class), and k-NN
precision and recall in pixel space (Kynkaanniemi et al. 2019), each beside its ceiling (the judge on
real images and on their codebook reconstructions; reconstructions of real training images as a
perfect generator of this codebook).

A judge is any callable: float images (N, C, H, W) in [0, 1] -> class probabilities (N, num_classes).
load_judge() makes one from the LeNet CNN saved by classifiers.save_cnn (python baselines.py
--save_judge DIR).
"""
import numpy as np
import torch
from tqdm import tqdm

from imagegpt import drawing
from imagegpt.data_config import data_settings
from imagegpt.errors import UserError
from imagegpt.sources import load_source
from imagegpt.splits import split_roles
from imagegpt.token_format import list_classes

KNN_K = 3   # neighbours for the precision / recall radii


def load_judge(folder, class_names):
    """The CNN in `folder` (cnn.json + cnn.safetensors, classifiers.save_cnn) -> judge callable; its
    class names must be the checkpoint's."""
    try:
        from imagegpt import classifiers
    except ImportError:
        raise UserError("the judge needs classifiers.py (the baselines' CNN, issue 12) beside this module") from None
    model, meta = classifiers.load_cnn(folder)
    if meta["class_names"] != list(class_names):
        raise UserError(f"{folder}/cnn.json: the judge's classes ({list_classes(meta['class_names'])}) are not "
                        f"the checkpoint's ({list_classes(class_names)})")

    def judge(images):
        return classifiers.cnn_logits(model, images).float().softmax(-1)
    return judge


def to_float(images):
    """uint8 (N, H, W, C) -> float (N, C, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


# ----------------------------------------------------------------------------- the measures

def judged_accuracy(judge, images, labels, num_classes):
    """Share of images the judge assigns to their label: overall and per class."""
    labels = torch.as_tensor(labels)
    pred = judge(images).argmax(-1)
    hit = (pred == labels).double()
    per = [hit[labels == c].mean().item() if (labels == c).any() else None for c in range(num_classes)]
    return {"accuracy": hit.mean().item(), "per_class": per, "predictions": pred.tolist()}


def _pixels(images):
    return images.reshape(len(images), -1).double()


def mean_pairwise_distance(images):
    """Mean Euclidean pixel distance over all pairs of distinct images (N >= 2)."""
    x = _pixels(images)
    if len(x) < 2:
        raise UserError("mean pairwise distance needs at least two images")
    d = torch.cdist(x, x)
    return (d.sum() / (len(x) * (len(x) - 1))).item()


def knn_radii(x, k):
    """Distance from each row of x to its k-th nearest other row."""
    d = torch.cdist(x, x)
    d.fill_diagonal_(float("inf"))
    return d.topk(k, dim=1, largest=False).values[:, -1]


def precision_recall(real, fake, k=KNN_K):
    """Improved precision and recall (Kynkaanniemi et al. 2019) in pixel space: precision is the share
    of fake images inside the k-NN ball of at least one real image (realism), recall the share of
    real images inside the k-NN ball of at least one fake image (coverage)."""
    r, f = _pixels(real), _pixels(fake)
    if len(r) <= k or len(f) <= k:
        raise UserError(f"precision/recall with k = {k} needs more than {k} real and {k} generated images")
    d = torch.cdist(f, r)                                          # (fake, real)
    precision = (d <= knn_radii(r, k)[None, :]).any(1).double().mean().item()
    recall = (d <= knn_radii(f, k)[:, None]).any(0).double().mean().item()
    return precision, recall


def diversity(images, labels, real, real_labels, num_classes):
    """Per class: mean pairwise distance of the images and of the real images, and their ratio."""
    labels, real_labels = torch.as_tensor(labels), torch.as_tensor(real_labels)
    out = []
    for c in range(num_classes):
        a, b = images[labels == c], real[real_labels == c]
        if len(a) < 2 or len(b) < 2:
            out.append(None)
            continue
        mine, theirs = mean_pairwise_distance(a), mean_pairwise_distance(b)
        out.append({"samples": mine, "real": theirs, "ratio": mine / theirs})
    return out


def quality(judge, images, labels, real, real_labels, num_classes, k=KNN_K):
    """All measures of a set of images meant to be of classes `labels`, against the real images."""
    acc = judged_accuracy(judge, images, labels, num_classes)
    div = diversity(images, labels, real, real_labels, num_classes)
    precision, recall = precision_recall(real, images, k)
    ratios = [d["ratio"] for d in div if d]
    return {"judge_accuracy": acc["accuracy"], "judge_per_class": acc["per_class"],
            "diversity_per_class": div, "diversity_ratio_mean": float(np.mean(ratios)),
            "diversity_ratio_min": float(np.min(ratios)), "precision": precision, "recall": recall}


# ----------------------------------------------------------------------------- drawing

def draw(model, vocab, book, classes, scale, generator, batch_size=64, progress=False, **sampling):
    """One drawing per entry of `classes` (imagegpt.drawing, guidance `scale`) -> (images (N, C, H, W),
    the drawings, each read by the model's own classifier)."""
    prompts = [drawing.prompt(vocab, c) for c in classes]
    res = drawing.draw(model, vocab, book.seq_len, prompts, book.seq_len + 2, scale, batch_size,
                       generator=generator, progress=progress, **sampling)
    return torch.stack([book.decode_ids(r["ids"], vocab) for r in res]), res


def generation_report(model, vocab, book, judge, real, real_labels, reference, reference_labels, scales,
                      per_class, seed=0, k=KNN_K, batch_size=64, progress=False, split="test", **sampling):
    """Conditional samples (per_class of every class) at each guidance scale, judged and compared with
    the real images (float (N, C, H, W), e.g. the test split); the ceilings: the judge on the real
    images and on their codebook reconstructions, and the same measures for `reference` (real images
    other than `real`, e.g. training images) decoded through the codebook: a perfect generator of this
    codebook."""
    C = vocab.num_classes
    classes = [c for c in range(C) for _ in range(per_class)]
    recon = book.decode(book.encode(real))
    out = {"classes_asked": per_class, "knn_k": k, "sampling": {"seed": seed, **sampling},
           "real": {"n": len(real), "split": split, "judge": judged_accuracy(judge, real, real_labels, C)},
           "reconstructions": {"judge": judged_accuracy(judge, recon, real_labels, C)}}
    for v in (out["real"]["judge"], out["reconstructions"]["judge"]):
        v.pop("predictions")
    ref = book.decode(book.encode(reference))
    out["codebook_generator"] = quality(judge, ref, reference_labels, real, real_labels, C, k)
    out["scales"] = {}
    for s in tqdm(scales, desc="guidance scales", leave=False, disable=not progress):
        g = torch.Generator(device=model.device).manual_seed(seed)
        images, res = draw(model, vocab, book, classes, s, g, batch_size=batch_size, progress=progress, **sampling)
        q = quality(judge, images, classes, real, real_labels, C, k)
        q["gpt_reads_asked_class"] = sum(r["pred"] == c for r, c in zip(res, classes)) / len(res)
        q["well_formed"] = sum(vocab.is_cond_complete(r["ids"], book.seq_len) for r in res) / len(res)
        out["scales"][str(s)] = q
    return out


def summary(report, names):
    """The report as a readable table: one row per guidance scale, then the ceilings."""
    pct = lambda v: f"{100 * v:5.1f}"
    split = report["real"].get("split", "test")
    head = (f"{'guidance':>9} {'judge acc %':>11} {'worst class':>12} {'diversity':>10} {'min div':>8} "
            f"{'precision':>9} {'recall':>7} {'GPT reads':>9} {'complete':>8}")
    lines = [f"{report['classes_asked']} samples per class; diversity = mean pairwise pixel distance of the samples "
             f"of a class / that of the real {split} digits of the class; precision/recall: k = {report['knn_k']} "
             f"in pixel space against the {report['real']['n']} real {split} digits", head]
    for s, q in report["scales"].items():
        worst = min(range(len(names)), key=lambda c: q["judge_per_class"][c])
        lines.append(f"{s:>9} {pct(q['judge_accuracy']):>11} {names[worst] + ' ' + pct(q['judge_per_class'][worst]):>12} "
                     f"{q['diversity_ratio_mean']:10.3f} {q['diversity_ratio_min']:8.3f} {q['precision']:9.3f} "
                     f"{q['recall']:7.3f} {pct(q['gpt_reads_asked_class']):>9} {pct(q['well_formed']):>8}")
    cg = report["codebook_generator"]
    lines.append(f"{'codebook':>9} {pct(cg['judge_accuracy']):>11} {'':>12} {cg['diversity_ratio_mean']:10.3f} "
                 f"{cg['diversity_ratio_min']:8.3f} {cg['precision']:9.3f} {cg['recall']:7.3f}"
                 "   (real training digits through the codebook: a perfect generator of these tokens)")
    lines.append(f"judge accuracy on the real {split} digits {pct(report['real']['judge']['accuracy']).strip()} %, "
                 f"on their codebook reconstructions {pct(report['reconstructions']['judge']['accuracy']).strip()} %")
    lines.append("judge accuracy per class (%):")
    lines.append(f"{'guidance':>9} " + "".join(f"{n:>6}" for n in names))
    for s, q in report["scales"].items():
        lines.append(f"{s:>9} " + "".join(f"{pct(a):>6}" for a in q["judge_per_class"]))
    return "\n".join(lines)


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
