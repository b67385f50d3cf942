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
import os

import numpy as np
from tqdm import tqdm

import checkpoint
from cli import add_ckpt, add_device, parser, run_cli
from data import IMAGE_EXTS, load_folder, make_batch, read_image, read_sequences
from metrics import class_probs, evaluate, next_tokens
from plots import confusion_png, plot_curves
from util import UserError, check_file, check_outputs, resolve_device, write_bytes, write_json


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


def load_eval_data(args, ck):
    """-> (list of id sequences, description of the source) for the chosen evaluation data."""
    vocab, book, names = ck.vocab, ck.codebook, ck.class_names
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
        seqs = [p + [vocab.label_id(y), vocab.eos_id] for p, y in zip(ck.encode_images(images), labels)]
        return seqs, f"{args.images} ({len(seqs)} images, tokenised with the checkpoint's codebook)"
    path = args.data or ck.split_file("val")
    seqs, _ = read_sequences(path, vocab, repair_v1=args.repair_v1)
    return seqs, path


def run_eval(args, ck):
    out = args.out or os.path.join(ck.folder, "eval.json")
    png = os.path.splitext(out)[0] + "_confusion.png"
    check_file(out, "metrics file")
    check_file(png, "confusion matrix PNG")
    check_outputs(out, png)
    seqs, source = load_eval_data(args, ck)
    block = ck.model.config.block_size
    cut = sum(len(s) > block for s in seqs)
    x, y, cls_pos = make_batch(seqs, block, ck.vocab.pad_id)
    metrics = evaluate(ck.model, x, y, cls_pos, ck.vocab, batch_size=args.batch_size, topk=(1, 2, 3, 5), progress=True)
    report = {"checkpoint": ck.folder, "data": source, "classes": ck.class_names,
              "truncated_sequences": cut, "block_size": block, **metrics, "confusion_png": png}
    image = confusion_png(metrics["confusion"], ck.class_names,
                          f"{ck.folder}: accuracy {100 * metrics['accuracy']:.2f} % on {metrics['n_sequences']}")
    write_json(out, report)
    write_bytes(png, image)
    print(f"checkpoint {ck.folder} on {source}")
    if cut:
        print(f"note: {cut} sequences are longer than the block size {block}; their image tokens were cut "
              f"(the label tail is kept), as in training")
    print(summary(metrics, ck.class_names))
    print(f"wrote {out} and {png}")
    return 0


def collect_classify_items(paths, vocab, repair_v1):
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


def run_classify(args, ck):
    names, book = ck.class_names, ck.codebook
    items = collect_classify_items(args.classify, ck.vocab, args.repair_v1)
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
    order = [name for name, _, _ in items]
    probs = class_probs(ck.model, [prefixes[n] for n in order], ck.vocab, args.batch_size, progress=True)
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


def run_next(args, ck):
    vocab = ck.vocab
    ids = vocab.parse(args.next, "--next")
    if args.top_k < 1:
        raise UserError(f"--top_k must be at least 1, got {args.top_k}")
    print(f"prompt: {len(ids)} tokens, ending in {vocab.tokens[ids[-1]]}")
    print(f"{'rank':>4}  {'token':<12}{'id':>5}  {'prob':>8}")
    for r, (tok, i, p) in enumerate(next_tokens(ck.model, ids, vocab, args.top_k), 1):
        print(f"{r:>4}  {tok:<12}{i:>5}  {p:8.4f}")
    return 0


def build_parser():
    ap = parser(__doc__, prog="eval.py")
    add_ckpt(ap)
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
    add_device(ap)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.top_k != 5 and args.next is None:
        raise UserError("--top_k is for --next (how many next tokens it shows); evaluation reports top-1, 2, 3 "
                        "and 5 accuracy")
    if args.repair_v1 and (args.images or args.next is not None or args.curves):
        raise UserError("--repair_v1 is for sequence files (--data, or .jsonl files given to --classify)")
    if args.curves:
        out = args.out or os.path.join(args.curves, "curves.png")
        check_file(out, "curves PNG")
        w, h = plot_curves(os.path.join(args.curves, "log.jsonl"), out)
        print(f"wrote {out} ({w}x{h})")
        return 0
    if (args.data or args.images) and (args.classify or args.next):
        raise UserError("--data/--images choose the evaluation data; they do not combine with --classify or --next")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    ck = checkpoint.load(args.ckpt, resolve_device(args.device))
    if args.classify:
        return run_classify(args, ck)
    if args.next is not None:
        return run_next(args, ck)
    return run_eval(args, ck)


if __name__ == "__main__":
    run_cli(main)
