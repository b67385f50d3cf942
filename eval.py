"""Evaluate a checkpoint: loss, perplexity, next-token and classification accuracy; classify images
or sequences; show the most likely next tokens; draw training curves.

    python eval.py                                    # runs/demo/best on its validation split
    python eval.py --ckpt runs/v2/best --data other.jsonl [--repair_v1]
    python eval.py --images my_digits/                # root/<class>/*.png, tokenised with the codebook
    python eval.py --classify a.png b.png folder/ seqs.jsonl
    python eval.py --next "<IMG> <Z_000> <Z_000>" --top_k 5
    python eval.py --curves runs/demo                 # runs/demo/curves.png from runs/demo/log.jsonl

Evaluation prints a summary and writes all metrics to --out (default <ckpt>/eval.json) and the
confusion matrix to <out without .json>_confusion.png.
"""
import argparse
import io
import json
import math
import os
import sys
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm import tqdm

from util import UserError, atomic_path, read_json, run_cli, write_json

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")  # as data.IMAGE_EXTS


@torch.no_grad()
def evaluate(model, x, y, cls_pos, vocab, batch_size=64, ctx=nullcontext(), topk=(1, 2, 3), progress=False):
    """Metrics over all real (non -100) next tokens, split into image tokens and the label token.

    x, y (N, T): inputs and next-token targets; cls_pos (N,): index of <CLS> in each row.
    Classification takes the logits at <CLS> and picks the largest among the label tokens only.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    C, lo = vocab.num_classes, vocab.label_offset
    s = dict(all_loss=0.0, all_n=0, all_hit=0, img_loss=0.0, img_n=0, img_hit=0,
             lab_loss=0.0, lab_hit=0)
    conf = torch.zeros(C, C, dtype=torch.long)
    topk_hit = {k: 0 for k in topk if k <= C}
    probs_all, pred_all = [], []
    for i in tqdm(range(0, len(x), batch_size), desc="evaluating", leave=False, disable=not progress):
        xb, yb, cb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device), cls_pos[i:i + batch_size].to(device)
        with ctx:
            logits, _ = model(xb)
        logits = logits.float()
        ce = F.cross_entropy(logits.transpose(1, 2), yb, ignore_index=-100, reduction="none")  # (B, T)
        real = yb != -100
        hit = (logits.argmax(-1) == yb) & real
        img = real & (yb >= vocab.code_offset) & (yb < lo)
        s["all_loss"] += ce[real].sum().item()
        s["all_n"] += real.sum().item()
        s["all_hit"] += hit.sum().item()
        s["img_loss"] += ce[img].sum().item()
        s["img_n"] += img.sum().item()
        s["img_hit"] += hit[img].sum().item()
        rows = torch.arange(len(xb), device=device)
        s["lab_loss"] += ce[rows, cb].sum().item()
        s["lab_hit"] += hit[rows, cb].sum().item()
        truth = (yb[rows, cb] - lo).cpu()
        probs = logits[rows, cb, lo:lo + C].softmax(-1).cpu()  # (B, C) over the label tokens only
        pred = probs.argmax(-1)
        conf.index_put_((truth, pred), torch.ones_like(pred), accumulate=True)
        ranked = probs.argsort(-1, descending=True)
        for k in topk_hit:
            topk_hit[k] += (ranked[:, :k] == truth[:, None]).any(1).sum().item()
        probs_all.append(probs)
        pred_all.append(pred)
    model.train(was_training)
    n = len(x)
    per_class = (conf.diag().double() / conf.sum(1).clamp_min(1)).tolist()
    ppl = lambda loss, cnt: math.exp(loss / max(cnt, 1))
    return {
        "n_sequences": n,
        "loss": s["all_loss"] / max(s["all_n"], 1),
        "perplexity": ppl(s["all_loss"], s["all_n"]),
        "token_accuracy": s["all_hit"] / max(s["all_n"], 1),
        "image_loss": s["img_loss"] / max(s["img_n"], 1),
        "image_perplexity": ppl(s["img_loss"], s["img_n"]),
        "image_token_accuracy": s["img_hit"] / max(s["img_n"], 1),
        "label_loss": s["lab_loss"] / max(n, 1),
        "label_perplexity": ppl(s["lab_loss"], n),
        "label_token_accuracy": s["lab_hit"] / max(n, 1),   # argmax over the whole vocabulary
        "accuracy": conf.diag().sum().item() / max(n, 1),    # argmax over the label tokens only
        "topk_accuracy": {str(k): v / max(n, 1) for k, v in topk_hit.items()},
        "per_class_accuracy": per_class,
        "confusion": conf.tolist(),                          # rows: true class, columns: predicted
        "_probs": torch.cat(probs_all) if probs_all else torch.zeros(0, C),
        "_pred": torch.cat(pred_all) if pred_all else torch.zeros(0, dtype=torch.long),
    }


def public(metrics):
    """Drop the tensors (keys starting with _) so the metrics can be written as JSON."""
    return {k: v for k, v in metrics.items() if not k.startswith("_")}


# ----------------------------------------------------------------------------- shared helpers
# (sample.py uses these too)

def pick_device(name):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available")
    if not (name == "cpu" or name.startswith("cuda")):
        raise UserError(f"--device {name}: expected auto, cpu or cuda[:N]")
    return name


def train_config(info):
    train = info["config"].get("train") if isinstance(info["config"], dict) else None
    return train if isinstance(train, dict) else {}


def val_file(info):
    """The validation split of the data the checkpoint was trained on: <data_dir>/val.jsonl."""
    data_dir = train_config(info).get("data_dir")
    if not data_dir:
        raise UserError(f"{info['folder']}/config.json records no data_dir; pass --data FILE.jsonl")
    path = os.path.join(data_dir, "val.jsonl")
    if not os.path.exists(path):
        raise UserError(f"{path}: missing (the checkpoint's validation split); run from the repository "
                        f"root, prepare the data again, or pass --data FILE.jsonl")
    return path


def class_names(info):
    """Class names from <data_dir>/report.json when it matches the vocabulary, else '0', '1', ..."""
    C = info["vocab"].num_classes
    data_dir = train_config(info).get("data_dir")
    path = os.path.join(data_dir, "report.json") if data_dir else None
    if path and os.path.exists(path):
        try:
            names = read_json(path, "report.json").get("classes")
        except UserError:
            names = None
        if isinstance(names, list) and len(names) == C:
            return [str(n) for n in names]
    return [str(c) for c in range(C)]


def parse_tokens(text, vocab, what="prompt"):
    """'<IMG> <Z_001> ...' -> ids; unknown tokens and empty prompts are one-line errors."""
    toks = text.split()
    if not toks:
        raise UserError(f"{what} is empty; give tokens such as '<IMG> <Z_000>'")
    for t in toks:
        if t not in vocab.ids:
            codes = f"{vocab.tokens[vocab.code_offset]}..{vocab.tokens[vocab.label_offset - 1]}"
            raise UserError(f"{what}: unknown token {t!r}; valid tokens are <PAD> <UNK> <IMG> </IMG> <CLS> "
                            f"<EOS>, {codes} and <CLS_0>..<CLS_{vocab.num_classes - 1}>")
    return vocab.encode(toks)


def check_out(path, what="output"):
    """Fail before any work if an output path cannot be a file (it is a folder, or under a file)."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder; the {what} must be a file path")
    d = os.path.dirname(os.path.abspath(path))
    while d and not os.path.exists(d):
        d = os.path.dirname(d)
    if d and not os.path.isdir(d):
        raise UserError(f"{path}: cannot write the {what} ({d} is a file)")


def read_image(path, size, channels):
    """One image file -> uint8 (H, W, C), converted and resized like data.load_folder."""
    from data import read_image
    return read_image(path, size, channels)


def image_prefixes(images, book, vocab):
    """uint8 images (N, H, W, C) -> token-id prefixes '<IMG> codes </IMG> <CLS>' (no label)."""
    from data import to_tensor
    codes = book.encode(to_tensor(images))
    return [[vocab.img_id] + [vocab.code_id(int(k)) for k in row] + [vocab.img_end_id, vocab.cls_id]
            for row in codes.tolist()]


def fit_prefix(prefix, block_size):
    """Cut an '<IMG> ... </IMG> <CLS>' prefix to block_size by dropping image tokens (as data.truncate)."""
    if len(prefix) <= block_size:
        return prefix
    return prefix[:block_size - 2] + prefix[-2:]


@torch.no_grad()
def class_probs(model, prefixes, vocab, batch_size=64, progress=False):
    """Prefixes ending in <CLS> (any lengths) -> (N, C) probabilities over the label tokens only,
    from the logits at <CLS> (what evaluate() scores)."""
    device = next(model.parameters()).device
    block = model.config.block_size
    prefixes = [fit_prefix(p, block) for p in prefixes]
    lo, C = vocab.label_offset, vocab.num_classes
    out = []
    for i in tqdm(range(0, len(prefixes), batch_size), desc="classifying", leave=False, disable=not progress):
        chunk = prefixes[i:i + batch_size]
        T = max(len(p) for p in chunk)
        x = torch.full((len(chunk), T), vocab.pad_id, dtype=torch.long)
        for j, p in enumerate(chunk):
            x[j, :len(p)] = torch.tensor(p)
        logits, _ = model(x.to(device))
        last = torch.tensor([len(p) - 1 for p in chunk], device=device)
        out.append(logits[torch.arange(len(chunk), device=device), last, lo:lo + C].float().softmax(-1).cpu())
    return torch.cat(out) if out else torch.zeros(0, C)


@torch.no_grad()
def next_tokens(model, ids, vocab, k=5):
    """Top-k next tokens after a prompt: [(token, id, probability)], from the full-vocabulary softmax."""
    if len(ids) > model.config.block_size:
        raise UserError(f"prompt has {len(ids)} tokens, the model's block size is {model.config.block_size}")
    device = next(model.parameters()).device
    logits, _ = model(torch.tensor([ids], device=device))
    probs = logits[0, -1].float().softmax(-1).cpu()
    p, i = probs.topk(min(k, len(probs)))
    return [(vocab.tokens[j], j, q) for j, q in zip(i.tolist(), p.tolist())]


# ----------------------------------------------------------------------------- pictures

def _png_bytes(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)  # no bbox 'tight': the size is figsize * dpi exactly
    return buf.getvalue()


def _write_bytes(path, data):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


CONFUSION_SIZE = (640, 560)  # pixels
CURVES_SIZE = (1100, 420)


def confusion_png(conf, names, title=""):
    """Confusion matrix (rows true, columns predicted) -> PNG bytes of CONFUSION_SIZE pixels."""
    from matplotlib.figure import Figure
    conf = torch.as_tensor(conf)
    C = len(names)
    fig = Figure(figsize=(CONFUSION_SIZE[0] / 100, CONFUSION_SIZE[1] / 100), dpi=100)
    ax = fig.add_subplot()
    rate = conf.double() / conf.sum(1, keepdim=True).clamp_min(1)
    im = ax.imshow(rate.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = list(range(C))
    ax.set_xticks(ticks, [str(n) for n in names], fontsize=8 if C <= 20 else 5)
    ax.set_yticks(ticks, [str(n) for n in names], fontsize=8 if C <= 20 else 5)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if C <= 20:
        for t in range(C):
            for p in range(C):
                if conf[t, p]:
                    ax.text(p, t, str(int(conf[t, p])), ha="center", va="center", fontsize=8,
                            color="white" if rate[t, p] > 0.5 else "black")
    ax.set_title(title or "confusion matrix", fontsize=10)
    fig.subplots_adjust(left=0.1, right=0.9, bottom=0.1, top=0.92)
    return _png_bytes(fig)


def read_log(log_path):
    if not os.path.exists(log_path):
        raise UserError(f"{log_path}: no such training log")
    recs = []
    with open(log_path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except UnicodeDecodeError:
                raise UserError(f"{log_path}:{n}: not UTF-8 text") from None
            except json.JSONDecodeError as e:
                raise UserError(f"{log_path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
                raise UserError(f'{log_path}:{n}: expected a JSON object with a numeric "step"')
            recs.append(rec)
    if not recs:
        raise UserError(f"{log_path}: no records (has training evaluated yet?)")
    return recs


def plot_curves(log_path, png_path):
    """Train/validation loss and validation accuracy over optimizer steps, from a run's log.jsonl,
    drawn to png_path (CURVES_SIZE pixels). Returns the (width, height) written."""
    from matplotlib.figure import Figure
    recs = read_log(log_path)

    def series(key):
        pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig = Figure(figsize=(CURVES_SIZE[0] / 100, CURVES_SIZE[1] / 100), dpi=100)
    a1, a2 = fig.subplots(1, 2)
    for key, label, style in (("train_loss", "training objective (label-weighted, mean since last eval)", "-o"),
                              ("val_loss", "validation loss", "-o")):
        xs, ys = series(key)
        if xs:
            a1.plot(xs, ys, style, label=label, markersize=3)
    a1.set_xlabel("step")
    a1.set_ylabel("cross entropy per token")
    a1.set_title("loss")
    a1.grid(alpha=0.3)
    a1.legend(fontsize=8)
    for key, label in (("val_accuracy", "classification accuracy"), ("val_token_accuracy", "next-token accuracy")):
        xs, ys = series(key)
        if xs:
            a2.plot(xs, ys, "-o", label=label, markersize=3)
    a2.set_ylim(0, 1)
    a2.set_xlabel("step")
    a2.set_ylabel("validation accuracy")
    a2.set_title("validation accuracy")
    a2.grid(alpha=0.3)
    a2.legend(fontsize=8)
    fig.suptitle(log_path, fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.85, wspace=0.25)
    _write_bytes(png_path, _png_bytes(fig))
    return CURVES_SIZE


# ----------------------------------------------------------------------------- summary

def summary(m, names):
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
    conf = m["confusion"]
    w = max(5, max(len(n) for n in names) + 1, len(str(max(max(r) for r in conf))) + 1)
    lines.append("confusion matrix (rows: true class, columns: predicted class; acc = per-class accuracy)")
    lines.append(f"{'':>{w}} |" + "".join(f"{n:>{w}}" for n in names) + f" |{'n':>6}{'acc':>8}")
    lines.append("-" * (w + 2 + w * len(names) + 16))
    for c, row in enumerate(conf):
        lines.append(f"{names[c]:>{w}} |" + "".join(f"{v:>{w}}" for v in row)
                     + f" |{sum(row):>6}{100 * m['per_class_accuracy'][c]:>7.1f}%")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- modes

def load_eval_data(args, info, names):
    """-> (list of id sequences, description of the source) for the chosen evaluation data."""
    from data import load_folder, read_sequences
    vocab, book = info["vocab"], info["codebook"]
    if args.images:
        H, W = book.image_size
        if H != W:
            raise UserError(f"--images: the codebook's images are {H}x{W}; image folders need square images")
        images, labels, folder_names, _ = load_folder(args.images, H, book.channels)
        index = {n: c for c, n in enumerate(names)}
        unknown = [n for n in folder_names if n not in index]
        if unknown:
            raise UserError(f"{os.path.join(args.images, unknown[0])}: {unknown[0]!r} is not a class of this "
                            f"checkpoint (classes: {' '.join(names)})")
        labels = [index[folder_names[y]] for y in labels.tolist()]
        seqs = [p + [vocab.label_id(y), vocab.eos_id] for p, y in zip(image_prefixes(images, book, vocab), labels)]
        return seqs, f"{args.images} ({len(seqs)} images, tokenised with the checkpoint's codebook)"
    path = args.data or val_file(info)
    seqs, _ = read_sequences(path, vocab, repair_v1=args.repair_v1)
    return seqs, path


def run_eval(args, model, info):
    from data import make_batch
    vocab = info["vocab"]
    names = class_names(info)
    out = args.out or os.path.join(info["folder"], "eval.json")
    png = os.path.splitext(out)[0] + "_confusion.png"
    check_out(out, "metrics file")
    check_out(png, "confusion matrix PNG")
    seqs, source = load_eval_data(args, info, names)
    block = model.config.block_size
    cut = sum(len(s) > block for s in seqs)
    x, y, cls_pos = make_batch(seqs, block, vocab.pad_id)
    m = evaluate(model, x, y, cls_pos, vocab, batch_size=args.batch_size, topk=(1, 2, 3, 5), progress=True)
    metrics = public(m)
    report = {"checkpoint": info["folder"], "data": source, "classes": names,
              "truncated_sequences": cut, "block_size": block, **metrics,
              "confusion_png": png}
    image = confusion_png(metrics["confusion"], names,
                          f"{info['folder']}: accuracy {100 * metrics['accuracy']:.2f} % on {metrics['n_sequences']}")
    write_json(out, report)
    _write_bytes(png, image)
    print(f"checkpoint {info['folder']} on {source}")
    if cut:
        print(f"note: {cut} sequences are longer than the block size {block}; their image tokens were cut "
              f"(the label tail is kept), as in training")
    print(summary(metrics, names))
    print(f"wrote {out} and {png}")
    return 0


def collect_classify_items(paths, vocab, repair_v1):
    """Paths -> list of (name, kind, payload): images ('img', path) or sequences ('seq', (ids, label))."""
    from data import read_sequences
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


def run_classify(args, model, info):
    import numpy as np
    vocab, book = info["vocab"], info["codebook"]
    names = class_names(info)
    items = collect_classify_items(args.classify, vocab, args.repair_v1)
    img_items = [it for it in items if it[1] == "img"]
    prefixes = {}
    if img_items:
        images = np.stack([read_image(p, book.image_size, book.channels)
                           for _, _, p in tqdm(img_items, desc="reading images", leave=False)])
        for (name, _, _), pre in zip(img_items, image_prefixes(images, book, vocab)):
            prefixes[name] = pre
    for name, kind, payload in items:
        if kind == "seq":
            s = payload[0]
            prefixes[name] = s[:-2]  # '<IMG> ... </IMG> <CLS>'
    order = [name for name, _, _ in items]
    probs = class_probs(model, [prefixes[n] for n in order], vocab, args.batch_size, progress=True)
    w = min(max(len(n) for n in order), 60)
    print(f"{'input':<{w}}  {'true':>5}  {'predicted':>9}  {'prob':>6}")
    right = labelled = 0
    for (name, kind, payload), p in zip(items, probs):
        c = int(p.argmax())
        true = names[payload[1]] if kind == "seq" else "-"
        if kind == "seq":
            labelled += 1
            right += c == payload[1]
        print(f"{name:<{w}}  {true:>5}  {names[c]:>9}  {p[c].item():6.3f}")
    if labelled:
        print(f"accuracy on the {labelled} labelled sequences: {100 * right / labelled:.2f} %")
    return 0


def run_next(args, model, info):
    vocab = info["vocab"]
    ids = parse_tokens(args.next, vocab, "--next")
    if args.top_k < 1:
        raise UserError(f"--top_k must be at least 1, got {args.top_k}")
    print(f"prompt: {len(ids)} tokens, ending in {vocab.tokens[ids[-1]]}")
    print(f"{'rank':>4}  {'token':<12}{'id':>5}  {'prob':>8}")
    for r, (tok, i, p) in enumerate(next_tokens(model, ids, vocab, args.top_k), 1):
        print(f"{r:>4}  {tok:<12}{i:>5}  {p:8.4f}")
    return 0


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="runs/demo/best", help="checkpoint folder (default: %(default)s)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="FILE.jsonl",
                     help="evaluate on this sequence file (default: <data_dir>/val.jsonl of the checkpoint)")
    src.add_argument("--images", metavar="DIR", help="evaluate on an image folder DIR/<class name>/*.png|jpg...")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--classify", nargs="+", metavar="PATH",
                      help="print the predicted class and its probability for images, folders of images "
                           "and .jsonl sequence files")
    mode.add_argument("--next", metavar="PROMPT", help='print the top-k next tokens after a prompt, e.g. "<IMG> <Z_000>"')
    mode.add_argument("--curves", metavar="RUN_DIR", help="draw RUN_DIR/log.jsonl as training curves (PNG)")
    ap.add_argument("--top_k", type=int, default=5, help="how many next tokens --next shows (default: %(default)s)")
    ap.add_argument("--repair_v1", action="store_true", help="fill in v1 tails '<CLS> <CLS> <EOS>' from the label field")
    ap.add_argument("--out", help="evaluation: metrics JSON (default: <ckpt>/eval.json; the confusion matrix "
                                  "goes to <out>_confusion.png); --curves: the PNG (default: RUN_DIR/curves.png)")
    ap.add_argument("--batch_size", type=int, default=64)
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.curves:
        out = args.out or os.path.join(args.curves, "curves.png")
        check_out(out, "curves PNG")
        w, h = plot_curves(os.path.join(args.curves, "log.jsonl"), out)
        print(f"wrote {out} ({w}x{h})")
        return 0
    if (args.data or args.images) and (args.classify or args.next):
        raise UserError("--data/--images choose the evaluation data; they do not combine with --classify or --next")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    import checkpoint
    model, info = checkpoint.load(args.ckpt, pick_device(args.device))
    if args.classify:
        return run_classify(args, model, info)
    if args.next is not None:
        return run_next(args, model, info)
    return run_eval(args, model, info)


if __name__ == "__main__":
    run_cli(main)
