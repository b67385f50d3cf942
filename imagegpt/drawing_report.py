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
from dataclasses import replace
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

from imagegpt import classifiers, drawing
from imagegpt.errors import UserError
from imagegpt.split_images import real_split
from imagegpt.token_format import list_classes
from tokenizer import uint8_to_tensor

KNN_K = 3   # neighbours for the precision / recall radii


def load_judge(folder, class_names):
    """The CNN in `folder` (cnn.json + cnn.safetensors, classifiers.save_cnn) -> judge callable; its
    class names must be the checkpoint's."""
    model, meta = classifiers.load_cnn(folder)
    if meta["class_names"] != list(class_names):
        raise UserError(f"{folder}/cnn.json: the judge's classes ({list_classes(meta['class_names'])}) are not "
                        f"the checkpoint's ({list_classes(class_names)})")

    def judge(images):
        return classifiers.cnn_logits(model, images).float().softmax(-1)
    return judge


class Images(NamedTuple):
    """Real images and their labels: float (N, C, H, W) in [0, 1] and (N,) class indices; split: which."""
    images: torch.Tensor
    labels: np.ndarray
    split: str = ""


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


def quality(judge, images, labels, real, num_classes, k=KNN_K):
    """All measures of a set of images meant to be of classes `labels`, against the `real` Images."""
    acc = judged_accuracy(judge, images, labels, num_classes)
    div = diversity(images, labels, real.images, real.labels, num_classes)
    precision, recall = precision_recall(real.images, images, k)
    ratios = [d["ratio"] for d in div if d]
    return {"judge_accuracy": acc["accuracy"], "judge_per_class": acc["per_class"],
            "diversity_per_class": div, "diversity_ratio_mean": float(np.mean(ratios)),
            "diversity_ratio_min": float(np.min(ratios)), "precision": precision, "recall": recall}


# ----------------------------------------------------------------------------- drawing

def draw_classes(ck, classes, settings, progress=False):
    """One drawing per entry of `classes` (imagegpt.drawing, as `settings` say) -> (images (N, C, H, W), the
    drawings, each read by the model's own classifier)."""
    book = ck.codebook
    prompts = [drawing.prompt(ck.vocab, c) for c in classes]
    res = drawing.draw(ck, prompts, replace(settings, max_new_tokens=book.seq_len + 2), progress=progress)
    return torch.stack([book.decode_ids(r["ids"], ck.vocab) for r in res]), res


def generation_report(ck, judge, real, reference, scales, per_class, settings, progress=False):
    """Conditional drawings (per_class of every class) at each guidance scale of `scales`, drawn as
    `settings` say otherwise, judged and compared with the `real` Images (e.g. the test split); the
    ceilings: the judge on the real images and on their codebook reconstructions, and the
    same measures for the `reference` Images (real images other than `real`, e.g. training images) decoded
    through the codebook: a perfect generator of this codebook."""
    book, C, k = ck.codebook, ck.vocab.num_classes, KNN_K
    classes = [c for c in range(C) for _ in range(per_class)]
    recon = book.decode(book.encode(real.images))
    out = {"classes_asked": per_class, "knn_k": k,
           "sampling": {"seed": settings.seed, "temperature": settings.temperature, "top_k": settings.top_k or None,
                        "top_p": settings.top_p},
           "real": {"n": len(real.images), "split": real.split or "test",
                    "judge": judged_accuracy(judge, real.images, real.labels, C)},
           "reconstructions": {"judge": judged_accuracy(judge, recon, real.labels, C)}}
    for v in (out["real"]["judge"], out["reconstructions"]["judge"]):
        v.pop("predictions")
    ref = book.decode(book.encode(reference.images))
    out["codebook_generator"] = quality(judge, ref, reference.labels, real, C, k)
    out["scales"] = {}
    for s in tqdm(scales, desc="guidance scales", leave=False, disable=not progress):
        images, res = draw_classes(ck, classes, replace(settings, guidance=s), progress=progress)
        q = quality(judge, images, classes, real, C, k)
        q["gpt_reads_asked_class"] = sum(r["pred"] == c for r, c in zip(res, classes)) / len(res)
        q["well_formed"] = sum(ck.vocab.is_cond_complete(r["ids"], book.seq_len) for r in res) / len(res)
        out["scales"][str(s)] = q
    return out


def judged_report(ck, judge_dir, real, per_class, scales, settings, progress=False):
    """The drawing report of eval.py generation: the judge CNN of judge_dir (load_judge), the real images of
    the checkpoint's split `real` ("test", or "dev" to choose sampling settings) and per_class training
    images of each class as the reference -> generation_report's dict, headed by what was compared."""
    judge = load_judge(judge_dir, ck.class_names)
    tr_img, tr_lab, te_img, te_lab = real_split(ck.settings, real)
    ref = np.concatenate([np.flatnonzero(tr_lab == c)[:per_class] for c in range(ck.vocab.num_classes)])
    report = generation_report(ck, judge, Images(uint8_to_tensor(te_img), te_lab, real),
                               Images(uint8_to_tensor(tr_img[ref]), tr_lab[ref]), scales, per_class, settings,
                               progress=progress)
    return {"checkpoint": ck.folder, "judge": judge_dir, "compared_with": f"the {real} split: {len(te_lab)} "
            f"{'held-out' if real == 'test' else 'development'} images of {ck.settings.get('source')}", **report}


def report_text(report, names):
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
