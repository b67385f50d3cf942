"""Evaluating a checkpoint (eval.py's work): the data it is scored on (its own split, a sequence file or an
image folder), the report of imagegpt.metrics on it (with test-time augmentation), its readable summary,
several checkpoints (one per seed) summarised, and the classification of files."""
import os

import numpy as np
import torch
from tqdm import tqdm

from imagegpt.augment import MOVE_LIMITS
from imagegpt.data_config import data_settings
from imagegpt.errors import UserError
from imagegpt.metrics import augmented_class_probs, class_probs, confusion, confusion_summary, evaluate
from imagegpt.sequences import make_batch, read_sequences
from imagegpt.sources import IMAGE_EXTS, load_folder, read_image
from imagegpt.split_images import real_split
from imagegpt.stats import seed_summary
from imagegpt.token_format import list_classes
from tokenizer import uint8_to_tensor

TOPK = (1, 2, 3, 5)   # the top-k accuracies an evaluation reports


def metrics_text(m, names):
    """A readable multi-line summary of evaluate() metrics."""
    pct = lambda v: f"{100 * v:6.2f} %"
    lines = [f"{m['n_sequences']} sequences",
             f"{'':14}{'loss':>8}{'ppl':>10}{'token acc':>12}",
             f"{'all tokens':14}{m['loss']:8.4f}{m['perplexity']:10.3f}{pct(m['token_accuracy']):>12}",
             f"{'image tokens':14}{m['image_loss']:8.4f}{m['image_perplexity']:10.3f}{pct(m['image_token_accuracy']):>12}",
             f"{'label token':14}{m['label_loss']:8.4f}{m['label_perplexity']:10.3f}{pct(m['label_token_accuracy']):>12}"
             "   (argmax over the whole vocabulary)",
             f"classification accuracy {pct(m['accuracy']).strip()}   (argmax over the label tokens at <CLS>)   "
             + "   ".join(f"top-{k} {pct(v).strip()}" for k, v in m["topk_accuracy"].items() if k != "1")]
    return "\n".join(lines + confusion_lines(m, names))


def confusion_lines(m, names):
    """The confusion matrix of evaluate() metrics as text, with each class's count and accuracy."""
    conf = m["confusion"]
    w = max(5, max(len(n) for n in names) + 1, len(str(max(max(r) for r in conf))) + 1)
    lines = ["confusion matrix (rows: true class, columns: predicted class; acc = per-class accuracy)",
             f"{'':>{w}} |" + "".join(f"{n:>{w}}" for n in names) + f" |{'n':>6}{'acc':>8}",
             "-" * (w + 2 + w * len(names) + 16)]
    for c, row in enumerate(conf):
        lines.append(f"{names[c]:>{w}} |" + "".join(f"{v:>{w}}" for v in row)
                     + f" |{sum(row):>6}{100 * m['per_class_accuracy'][c]:>7.1f}%")
    return lines


# ----------------------------------------------------------------------------- the data

def load_data(ck, images=None, data=None, split="test", repair_v1=False, tta=False):
    """What an evaluation reads -> (sequences, what they are, their uint8 images or None): the image folder
    `images`, else the sequence file `data`, else the checkpoint's own `split` (its images read again only
    for test-time augmentation, tta)."""
    if images:
        return folder_data(ck, images)
    if data:
        return read_sequences(data, ck.vocab, repair_v1=repair_v1)[0], data, None
    return split_data(ck, split, repair_v1, tta)


def folder_data(ck, root):
    """An image folder root/<class name>/*.png -> (sequences tokenised with the checkpoint's codebook, what
    they are, their uint8 images); every folder must name a class of the checkpoint."""
    H, W = ck.codebook.image_size
    if H != W:
        raise UserError(f"--images: the codebook's images are {H}x{W}; image folders need square images")
    images, labels, folder_names, _ = load_folder(root, H, ck.codebook.channels)
    index = {n: c for c, n in enumerate(ck.class_names)}
    unknown = [n for n in folder_names if n not in index]
    if unknown:
        raise UserError(f"{os.path.join(root, unknown[0])}: {unknown[0]!r} is not a class of this "
                        f"checkpoint (classes: {list_classes(ck.class_names)})")
    labels = [index[folder_names[y]] for y in labels.tolist()]
    seqs = [p + [ck.vocab.label_id(y), ck.vocab.eos_id] for p, y in zip(ck.encode_images(images), labels)]
    return seqs, f"{root} ({len(seqs)} images, tokenised with the checkpoint's codebook)", images


def split_data(ck, split, repair_v1=False, tta=False):
    """The checkpoint's own split ("test" or "dev") -> (its sequences, what they are, its uint8 images, read
    again from the data source only for test-time augmentation (tta) and checked to tokenise to the file's)."""
    path = ck.split_file(split)
    seqs, _ = read_sequences(path, ck.vocab, repair_v1=repair_v1)
    role = ("the test split: held out, read by no training decision" if split == "test" else
            "the development split: carved from the training images, for comparing settings")
    images = None
    if tta:
        images = real_split(ck.settings, split)[2]
        if len(images) != len(seqs) or any(s[:len(p)] != p for s, p in zip(seqs, ck.encode_images(images))):
            raise UserError(f"{path}: its sequences are not the tokens of the {split} images of the checkpoint's "
                            f"data source any more (the source or its split changed); --tta needs those images")
    return seqs, f"{path} ({role})", images


# ----------------------------------------------------------------------------- the report

def tta_metrics(ck, images, truth, copies, batch_size):
    """Classification of uint8 images (N, H, W, C) with test-time augmentation (copies views each) ->
    {copies, max_shift, max_rotate, max_scale, max_shear, max_elastic, accuracy, per_class_accuracy, confusion}."""
    cfg = data_settings(ck.settings)
    probs = augmented_class_probs(ck, uint8_to_tensor(images), copies, cfg, batch_size, progress=True)
    conf = confusion(truth, probs.argmax(1), ck.vocab.num_classes)
    return {"copies": copies, **{k: getattr(cfg, k) for k in MOVE_LIMITS}, **confusion_summary(conf)}


def report(ck, data, png, tta=0, batch_size=64):
    """The evaluation of the checkpoint on data = (sequences, what they are, their images or None): metrics
    (imagegpt.metrics.evaluate, top-k of TOPK), with tta > 0 also classification with that many moved views
    of each image; png: where its confusion matrix goes (recorded in the report)."""
    seqs, source, images = data
    block = ck.model.config.block_size
    x, y, cls_pos = make_batch(seqs, block, ck.vocab.pad_id)
    metrics = evaluate(ck, (x, y, cls_pos), batch_size=batch_size, topk=TOPK, progress=True)
    chosen = (ck.metrics or {}).get("chosen", "not recorded (a checkpoint written before this was recorded)")
    out = {"checkpoint": ck.folder, "checkpoint_chosen": chosen, "data": source, "classes": ck.class_names,
           "truncated_sequences": sum(len(s) > block for s in seqs), "block_size": block, **metrics,
           "confusion_png": png}
    if tta:
        truth = y[torch.arange(len(y)), cls_pos] - ck.vocab.label_offset
        out["tta"] = tta_metrics(ck, images, truth, tta, batch_size)
    return out


def model_seeds(cks):
    """The training seeds of checkpoints (for the provenance; a checkpoint that does not record its seed
    adds none)."""
    seeds = [ck.settings.get("seed") for ck in cks]
    return [s for s in seeds if isinstance(s, int) and not isinstance(s, bool)]


def across_seeds(reports):
    """Reports of several checkpoints (one per seed) -> mean, std and 95 % interval of each figure."""
    rows = {k: seed_summary([r[k] for r in reports]) for k in ("accuracy", "image_perplexity", "loss")}
    if all("tta" in r for r in reports):
        rows["tta_accuracy"] = seed_summary([r["tta"]["accuracy"] for r in reports])
    return rows


# ----------------------------------------------------------------------------- classifying files

def classify_items(paths, vocab, repair_v1):
    """Paths -> list of (name, kind, payload): images ('img', path) or sequences ('seq', (ids, label))."""
    items = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.lower().endswith(IMAGE_EXTS))
            if not found:
                raise UserError(f"{path}: no image files ({'/'.join(IMAGE_EXTS)}) in this folder or below")
            items += [(f, "img", f) for f in found]
        elif path.lower().endswith(".jsonl"):
            seqs, labels = read_sequences(path, vocab, repair_v1=repair_v1)
            items += [(f"{path}#{i + 1}", "seq", (s, y)) for i, (s, y) in enumerate(zip(seqs, labels))]
        elif path.lower().endswith(IMAGE_EXTS):
            if not os.path.isfile(path):
                raise UserError(f"{path}: no such image file")
            items.append((path, "img", path))
        elif not os.path.exists(path):
            raise UserError(f"{path}: no such file or folder")
        else:
            raise UserError(f"{path}: expected an image ({'/'.join(IMAGE_EXTS)}), a .jsonl sequence file or a folder")
    return items


def classify(ck, items, batch_size=64):
    """classify_items' items -> (name, true class or None, predicted class, its probability) each: images
    read, resized and tokenised with the checkpoint's codebook, sequences read at their <CLS>."""
    book = ck.codebook
    img_items = [it for it in items if it[1] == "img"]
    prefixes = {}
    if img_items:
        images = np.stack([read_image(p, book.image_size, book.channels)
                           for _, _, p in tqdm(img_items, desc="reading images", leave=False)])
        for (name, _, _), pre in zip(img_items, ck.encode_images(images)):
            prefixes[name] = pre
    for name, kind, payload in items:
        if kind == "seq":
            prefixes[name] = payload[0][:-2]  # '<IMG> ... </IMG> <CLS>'
    probs = class_probs(ck, [prefixes[name] for name, _, _ in items], batch_size, progress=True)
    out = []
    for (name, kind, payload), p in zip(items, probs):
        c = int(p.argmax())
        out.append((name, payload[1] if kind == "seq" else None, c, p[c].item()))
    return out
