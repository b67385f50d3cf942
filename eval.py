"""Evaluate a checkpoint: loss, perplexity, next-token and classification accuracy; classify images
or sequences; show the most likely next tokens; draw training curves.

    python eval.py                                    # runs/demo/final on its test split (test.jsonl)
    python eval.py --ckpt runs/v2/best --data other.jsonl [--repair_v1]
    python eval.py --ckpt runs/demo/seed-*/final      # each on its test split, then mean +- std, 95 % interval
    python eval.py --split dev --tta 16               # the development split; also with test-time augmentation
    python eval.py --images my_digits/                # root/<class>/*.png, tokenised with the codebook
    python eval.py --classify a.png b.png folder/ seqs.jsonl
    python eval.py --next "<IMG> <Z_000> <Z_000>" --top_k 5
    python eval.py --curves runs/demo                 # runs/demo/curves.png from runs/demo/log.jsonl
    python eval.py --generation --judge runs/judge    # class-conditional drawing, judged by a CNN

Evaluation prints a summary and writes all metrics to --out (default <ckpt>/eval.json) and the
confusion matrix to <out without .json>_confusion.png. By default it reads the checkpoint's test split
(<data_dir>/test.jsonl: held-out images that no training decision reads) and says which split and which
checkpoint (and how that checkpoint was chosen) in its output and its JSON. --split dev reads the
development split instead (<data_dir>/dev.jsonl), the one to compare settings on.

--tta K adds classification with test-time augmentation: each image is also classified as K randomly
moved versions of it (drawn as training draws its copies, with the checkpoint's max_shift, max_rotate,
max_scale, max_shear and max_elastic), and the class probabilities are averaged in log space. It needs the images,
not only their tokens: the checkpoint's own split (read again from its data source, and checked to
tokenise to exactly the split file's sequences) or --images.

--generation (a model trained with cond_fraction > 0) draws --per_class samples of every class at each
guidance scale of --scales and scores them with an independent judge (the CNN that `python baselines.py
--save_judge DIR` saves, trained on real pixels): the share the judge calls the asked class (overall,
per class), diversity (mean pairwise pixel distance of a class's samples / that of the real test digits
of the class) and k-NN precision / recall in pixel space against the real test digits (with --real dev:
the development split, to choose sampling settings); beside them the
ceilings: the judge on the real test digits and on their codebook reconstructions, and the same
measures for real training digits passed through the codebook. Written to --out (default
<ckpt>/generation.json).
"""
import os

import numpy as np
import torch
from tqdm import tqdm

from imagegpt import checkpoint
from imagegpt.augment import MOVE_LIMITS
from imagegpt.cli import add_backend, add_ckpt, add_device, parser, run_cli
from imagegpt.data_config import data_settings
from imagegpt import drawing
from imagegpt.device import bf16_autocast, resolve_device
from imagegpt.drawing_report import generation_report, load_judge, real_split, to_float
from imagegpt.drawing_report import summary as generation_summary
from imagegpt.errors import UserError
from imagegpt.files import check_file, check_outputs, write_bytes
from imagegpt.metrics import (
    augmented_class_probs,
    class_probs,
    confusion_summary,
    evaluate,
    next_tokens,
)
from imagegpt.plots import confusion_png, plot_curves
from imagegpt.provenance import precision, write_result
from imagegpt.sequences import make_batch, read_sequences
from imagegpt.sources import IMAGE_EXTS, load_folder, read_image
from imagegpt.stats import seed_summary
from imagegpt.token_format import list_classes
from tokenizer import uint8_to_tensor


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
    """-> (list of id sequences, description of the source, their uint8 images (N, H, W, C) or None) for
    the chosen evaluation data; the images of the checkpoint's own split are read only for --tta."""
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
                            f"checkpoint (classes: {list_classes(names)})")
        labels = [index[folder_names[y]] for y in labels.tolist()]
        seqs = [p + [vocab.label_id(y), vocab.eos_id] for p, y in zip(ck.encode_images(images), labels)]
        return seqs, f"{args.images} ({len(seqs)} images, tokenised with the checkpoint's codebook)", images
    if args.data:
        seqs, _ = read_sequences(args.data, vocab, repair_v1=args.repair_v1)
        return seqs, args.data, None
    path = ck.split_file(args.split)
    seqs, _ = read_sequences(path, vocab, repair_v1=args.repair_v1)
    role = ("the test split: held out, read by no training decision" if args.split == "test" else
            "the development split: carved from the training images, for comparing settings")
    images = None
    if args.tta:
        images = real_split(ck.settings, args.split)[2]
        if len(images) != len(seqs) or any(s[:len(p)] != p for s, p in zip(seqs, ck.encode_images(images))):
            raise UserError(f"{path}: its sequences are not the tokens of the {args.split} images of the checkpoint's "
                            f"data source any more (the source or its split changed); --tta needs those images")
    return seqs, f"{path} ({role})", images


def tta_metrics(ck, images, truth, copies, batch_size):
    """Classification of uint8 images (N, H, W, C) with test-time augmentation (copies views each) ->
    {copies, max_shift, max_rotate, max_scale, max_shear, max_elastic, accuracy, per_class_accuracy, confusion}."""
    cfg = data_settings(ck.settings)
    probs = augmented_class_probs(ck.model, ck.codebook, ck.vocab, uint8_to_tensor(images), copies, cfg, batch_size,
                                  progress=True)
    C = ck.vocab.num_classes
    conf = torch.zeros(C, C, dtype=torch.long).index_put_((truth, probs.argmax(1)), torch.ones(len(truth), dtype=torch.long),
                                                          accumulate=True)
    return {"copies": copies, **{k: getattr(cfg, k) for k in MOVE_LIMITS}, **confusion_summary(conf)}


def model_seeds(cks):
    """The training seeds of checkpoints (for the provenance; a checkpoint that does not record its seed
    adds none)."""
    seeds = [ck.settings.get("seed") for ck in cks]
    return [s for s in seeds if isinstance(s, int) and not isinstance(s, bool)]


def dtype(args, ck):
    """The precision this evaluation computes in (for the provenance)."""
    return precision(args.bf16, ck.model.device, backend=args.backend)


def outputs(args, folder):
    """The metrics JSON and confusion PNG of one evaluation (checked before any work)."""
    default = "eval.json" if args.split == "test" or args.data or args.images else "eval_dev.json"
    out = args.out if args.out and len(args.ckpt) == 1 else os.path.join(folder, default)
    png = os.path.splitext(out)[0] + "_confusion.png"
    check_file(out, "metrics file")
    check_file(png, "confusion matrix PNG")
    check_outputs(out, png)
    return out, png


def run_eval(args, ck):
    out, png = outputs(args, ck.folder)
    seqs, source, images = load_eval_data(args, ck)
    block = ck.model.config.block_size
    cut = sum(len(s) > block for s in seqs)
    x, y, cls_pos = make_batch(seqs, block, ck.vocab.pad_id)
    metrics = evaluate(ck.model, x, y, cls_pos, ck.vocab, batch_size=args.batch_size, topk=(1, 2, 3, 5), progress=True)
    chosen = (ck.metrics or {}).get("chosen", "not recorded (a checkpoint written before this was recorded)")
    report = {"checkpoint": ck.folder, "checkpoint_chosen": chosen, "data": source, "classes": ck.class_names,
              "truncated_sequences": cut, "block_size": block, **metrics, "confusion_png": png}
    if args.tta:
        truth = y[torch.arange(len(y)), cls_pos] - ck.vocab.label_offset
        report["tta"] = tta_metrics(ck, images, truth, args.tta, args.batch_size)
    image = confusion_png(metrics["confusion"], ck.class_names,
                          f"{ck.folder}: accuracy {100 * metrics['accuracy']:.2f} % on {metrics['n_sequences']}")
    write_result(out, report, config=args, seeds=model_seeds([ck]), dtype=dtype(args, ck))
    write_bytes(png, image)
    print(f"checkpoint {ck.folder} ({chosen}) on {source}")
    if cut:
        print(f"note: {cut} sequences are longer than the block size {block}; their image tokens were cut "
              f"(the label tail is kept), as in training")
    print(summary(metrics, ck.class_names))
    if args.tta:
        t = report["tta"]
        limits = ", ".join(f"{k} {t[k]:g}" for k in MOVE_LIMITS)
        print(f"with test-time augmentation ({t['copies']} moved views of each image, {limits}): "
              f"accuracy {100 * t['accuracy']:.2f} %")
    print(f"wrote {out} and {png}")
    return report


def run_evals(args):
    """Several checkpoints (one per seed): each evaluated as run_eval does, then summarised; --out,
    if given, is the summary JSON."""
    if args.out:
        check_file(args.out, "summary JSON")
    for folder in args.ckpt:
        outputs(args, folder)
    device = resolve_device(args.device)
    reports, seeds = [], []
    with bf16_autocast(args.bf16, device):
        for f in args.ckpt:
            ck = checkpoint.load(f, device, args.backend)
            seeds += model_seeds([ck])
            reports.append(run_eval(args, ck))
    rows = {k: seed_summary([r[k] for r in reports]) for k in ("accuracy", "image_perplexity", "loss")}
    a = rows["accuracy"]
    print(f"{len(reports)} checkpoints: accuracy {100 * a['mean']:.2f} % +- {100 * a['std']:.2f} (sample std; 95 % "
          f"interval of the mean {100 * a['ci95'][0]:.2f} .. {100 * a['ci95'][1]:.2f}); image-token perplexity "
          f"{rows['image_perplexity']['mean']:.3f} +- {rows['image_perplexity']['std']:.3f}")
    if args.tta:
        rows["tta_accuracy"] = t = seed_summary([r["tta"]["accuracy"] for r in reports])
        print(f"with test-time augmentation ({args.tta} views): accuracy {100 * t['mean']:.2f} % +- {100 * t['std']:.2f} "
              f"(95 % interval of the mean {100 * t['ci95'][0]:.2f} .. {100 * t['ci95'][1]:.2f})")
    if args.out:
        write_result(args.out, {"checkpoints": args.ckpt, "data": [r["data"] for r in reports],
                                "per_checkpoint": [{k: r[k] for k in ("checkpoint", "accuracy", "image_perplexity", "loss",
                                                                      "tta") if k in r} for r in reports], **rows},
                     config=args, seeds=seeds, dtype=precision(args.bf16, device, backend=args.backend))
        print(f"wrote {args.out}")
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
    args.top_k = 5 if args.top_k is None else args.top_k
    if args.top_k < 1:
        raise UserError(f"--top_k must be at least 1, got {args.top_k}")
    print(f"prompt: {len(ids)} tokens, ending in {vocab.tokens[ids[-1]]}")
    print(f"{'rank':>4}  {'token':<12}{'id':>5}  {'prob':>8}")
    for r, (tok, i, p) in enumerate(next_tokens(ck.model, ids, vocab, args.top_k), 1):
        print(f"{r:>4}  {tok:<12}{i:>5}  {p:8.4f}")
    return 0


def parse_scales(text):
    try:
        scales = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--scales {text!r}: expected comma-separated numbers such as 1,2,3,4,5") from None
    if not scales or any(not v >= 0 for v in scales):
        raise UserError(f"--scales {text!r}: guidance scales must be >= 0")
    return scales


def run_generation(args, ck):
    if not args.judge:
        raise UserError("--generation needs --judge DIR (a CNN saved by python baselines.py --save_judge DIR)")
    ck.check_conditional("it has no drawings of a chosen class to report")
    if args.per_class < 2:
        raise UserError(f"--per_class must be at least 2, got {args.per_class}")
    scales = parse_scales(args.scales)
    out = args.out or os.path.join(ck.folder, "generation.json")
    check_file(out, "generation report")
    judge = load_judge(args.judge, ck.class_names)
    tr_img, tr_lab, te_img, te_lab = real_split(ck.settings, args.real)
    ref = np.concatenate([np.flatnonzero(tr_lab == c)[:args.per_class] for c in range(ck.vocab.num_classes)])
    sampling = dict(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p)
    report = generation_report(ck.model, ck.vocab, ck.codebook, judge, to_float(te_img), te_lab, to_float(tr_img[ref]),
                               tr_lab[ref], scales, args.per_class, seed=args.seed, batch_size=args.batch_size,
                               progress=True, split=args.real, **sampling)
    report = {"checkpoint": ck.folder, "judge": args.judge, "compared_with": f"the {args.real} split: "
              f"{len(te_lab)} {'held-out' if args.real == 'test' else 'development'} images of "
              f"{ck.settings.get('source')}", **report}
    write_result(out, report, config=args, seeds=model_seeds([ck]), dtype=dtype(args, ck))
    print(f"checkpoint {ck.folder}, judge {args.judge}")
    print(generation_summary(report, ck.class_names))
    print(f"wrote {out}")
    return 0


def build_parser():
    ap = parser(__doc__, prog="eval.py")
    add_ckpt(ap, many=True)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="FILE.jsonl",
                     help="evaluate on this sequence file (default: the checkpoint's test split, <data_dir>/test.jsonl)")
    src.add_argument("--images", metavar="DIR", help="evaluate on an image folder DIR/<class name>/*.png|jpg...")
    src.add_argument("--split", choices=("test", "dev"), default="test",
                     help="evaluate on the checkpoint's test split (test.jsonl) or its development split (dev.jsonl, "
                          "to compare settings; default: %(default)s)")
    ap.add_argument("--tta", type=int, default=0, metavar="K",
                    help="also classify with test-time augmentation: K moved (shifted / rotated, scaled / sheared as in "
                         "training) views of each image "
                         "(default: 0, off; needs images: the checkpoint's own split or --images)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--classify", nargs="+", metavar="PATH",
                      help="print the predicted class and its probability for images, folders of images "
                           "and .jsonl sequence files")
    mode.add_argument("--next", metavar="PROMPT", help='print the top-k next tokens after a prompt, e.g. "<IMG> <Z_000>"')
    mode.add_argument("--curves", metavar="RUN_DIR", help="draw RUN_DIR/log.jsonl as training curves (PNG)")
    mode.add_argument("--generation", action="store_true", help="measure class-conditional drawing with --judge")
    ap.add_argument("--top_k", type=int, default=None, help="--next: how many next tokens to show (default: 5); "
                                                            "--generation: sample from the k most likely (default: off)")
    ap.add_argument("--judge", metavar="DIR", help="--generation: the judge CNN (cnn.json + cnn.safetensors)")
    ap.add_argument("--per_class", type=int, default=100, help="--generation: samples per class (default: %(default)s)")
    ap.add_argument("--scales", default="1,2,3,4,5", help="--generation: guidance scales (default: %(default)s)")
    ap.add_argument("--real", choices=("test", "dev"), default="test",
                    help="--generation: the real digits the drawings are compared with: the test split (the "
                         "report) or the development split (to choose sampling settings; default: %(default)s)")
    ap.add_argument("--temperature", type=float, default=drawing.TEMPERATURE,
                    help="--generation: sampling temperature (default: %(default)s, as sample.py --digit)")
    ap.add_argument("--top_p", type=float, default=1.0, help="--generation: nucleus sampling (1 = off)")
    ap.add_argument("--seed", type=int, default=0, help="--generation: sampling seed (default: %(default)s)")
    ap.add_argument("--repair_v1", action="store_true", help="fill in v1 tails '<CLS> <CLS> <EOS>' from the label field")
    ap.add_argument("--out", help="evaluation: metrics JSON (default: <ckpt>/eval.json; the confusion matrix "
                                  "goes to <out>_confusion.png); --curves: the PNG (default: RUN_DIR/curves.png)")
    ap.add_argument("--batch_size", type=int, default=64, help="sequences per forward pass (default: %(default)s)")
    add_device(ap)
    add_backend(ap)
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.top_k is not None and args.next is None and not args.generation:
        raise UserError("--top_k is for --next (how many next tokens it shows) and --generation (sampling); "
                        "evaluation reports top-1, 2, 3 and 5 accuracy")
    if args.repair_v1 and (args.images or args.next is not None or args.curves):
        raise UserError("--repair_v1 is for sequence files (--data, or .jsonl files given to --classify)")
    if args.curves:
        out = args.out or os.path.join(args.curves, "curves.png")
        check_file(out, "curves PNG")
        w, h = plot_curves(os.path.join(args.curves, "log.jsonl"), out)
        print(f"wrote {out} ({w}x{h})")
        return 0
    if (args.data or args.images) and (args.classify or args.next or args.generation):
        raise UserError("--data/--images choose the evaluation data; they do not combine with --classify, --next "
                        "or --generation")
    if args.judge and not args.generation:
        raise UserError("--judge is for --generation")
    if args.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.tta < 0:
        raise UserError(f"--tta must be 0 (off) or a number of views, got {args.tta}")
    if args.tta and (args.data or args.classify or args.next or args.generation):
        raise UserError("--tta classifies images: it is for evaluation on the checkpoint's own split or --images, "
                        "not --data sequences, --classify, --next or --generation")
    if len(args.ckpt) > 1:
        if args.classify or args.next or args.generation:
            raise UserError("several --ckpt are for evaluation; --classify, --next and --generation take one")
        return run_evals(args)
    ck = checkpoint.load(args.ckpt[0], resolve_device(args.device), args.backend)
    with bf16_autocast(args.bf16, ck.model.device):
        if args.classify:
            return run_classify(args, ck)
        if args.next is not None:
            return run_next(args, ck)
        if args.generation:
            return run_generation(args, ck)
        run_eval(args, ck)
    return 0


if __name__ == "__main__":
    run_cli(main)
