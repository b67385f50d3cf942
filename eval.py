"""Evaluate a checkpoint: loss, perplexity, next-token and classification accuracy; classify images
or sequences; show the most likely next tokens; draw training curves; judge its drawings.

    python eval.py                                    # runs/demo/final on its test split (test.jsonl)
    python eval.py --ckpt runs/v2/best --data other.jsonl [--repair_v1]
    python eval.py --ckpt runs/demo/seed-*/final      # each on its test split, then mean +- std, 95 % interval
    python eval.py --split dev --tta 16               # the development split; also with test-time augmentation
    python eval.py --images my_digits/                # root/<class>/*.png, tokenised with the codebook
    python eval.py classify a.png b.png folder/ seqs.jsonl
    python eval.py next "<IMG> <Z_000> <Z_000>" --top_k 5
    python eval.py curves runs/demo                   # runs/demo/curves.png from runs/demo/log.jsonl
    python eval.py generation --judge runs/judge      # class-conditional drawing, judged by a CNN

Five sub-commands: metrics (the default), classify, next, curves and generation. The older spellings
still work: --classify, --next, --curves and --generation as flags.

metrics prints a summary and writes all metrics to --out (default <ckpt>/eval.json) and the
confusion matrix to <out without .json>_confusion.png. By default it reads the checkpoint's test split
(<data_dir>/test.jsonl: held-out images that no training decision reads) and says which split and which
checkpoint (and how that checkpoint was chosen) in its output and its JSON. --split dev reads the
development split instead (<data_dir>/dev.jsonl), the one to compare settings on.

--tta K adds classification with test-time augmentation: each image is also classified as K randomly
moved versions of it (drawn as training draws its copies, with the checkpoint's max_shift, max_rotate,
max_scale, max_shear and max_elastic), and the class probabilities are averaged in log space. It needs the images,
not only their tokens: the checkpoint's own split (read again from its data source, and checked to
tokenise to exactly the split file's sequences) or --images.

generation (a model trained with cond_fraction > 0) draws --per_class samples of every class at each
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
import sys

from imagegpt import checkpoint, draw_settings, evaluation
from imagegpt.augment import MOVE_LIMITS
from imagegpt.cli import add_backend, add_ckpt, add_commands, add_device, parser, run_cli, shared, with_command
from imagegpt.device import bf16_autocast, resolve_device
from imagegpt.drawing_report import judged_report, report_text
from imagegpt.errors import UserError
from imagegpt.files import check_file, check_outputs, write_bytes
from imagegpt.metrics import next_tokens
from imagegpt.plots import confusion_png, plot_curves
from imagegpt.provenance import precision, write_result

COMMANDS = (("metrics", "metrics on the test split, the development split, a sequence file or an image folder",
             "Loss, perplexity, next-token and classification accuracy (the default sub-command)."),
            ("classify", "print the predicted class and its probability for images, folders and .jsonl files",
             "Classify images (any size, resized to the model's), folders of images and .jsonl sequence files."),
            ("next", "print the top-k next tokens after a prompt", "The most likely next tokens after a prompt."),
            ("curves", "draw RUN_DIR/log.jsonl as training curves (PNG)", "Training curves of a run folder."),
            ("generation", "measure class-conditional drawing with --judge",
             "Drawings of every class judged by an independent CNN, beside the ceilings."))
OLD_FLAGS = {f"--{name}": (name, []) for name in ("classify", "next", "curves", "generation")}


def model_options(many=False):
    """The options of every sub-command that loads a checkpoint."""
    batch = lambda p: p.add_argument("--batch_size", type=int, default=64,
                                     help="sequences per forward pass (default: %(default)s)")
    return shared(lambda p: add_ckpt(p, many=many), batch, add_device, add_backend)


def build_parser():
    ap = parser(__doc__, prog="eval.py")
    one = model_options()
    cmd = add_commands(ap, COMMANDS, {"metrics": [model_options(many=True)], "classify": [one], "next": [one],
                                      "generation": [one]})
    m = cmd["metrics"]
    src = m.add_mutually_exclusive_group()
    src.add_argument("--data", metavar="FILE.jsonl",
                     help="evaluate on this sequence file (default: the checkpoint's test split, <data_dir>/test.jsonl)")
    src.add_argument("--images", metavar="DIR", help="evaluate on an image folder DIR/<class name>/*.png|jpg...")
    src.add_argument("--split", choices=("test", "dev"), default="test",
                     help="evaluate on the checkpoint's test split (test.jsonl) or its development split (dev.jsonl, "
                          "to compare settings; default: %(default)s)")
    m.add_argument("--tta", type=int, default=0, metavar="K",
                   help="also classify with test-time augmentation: K moved (shifted / rotated, scaled / sheared as in "
                        "training) views of each image (default: 0, off; needs images: the checkpoint's own split or "
                        "--images)")
    m.add_argument("--out", help="metrics JSON (default: <ckpt>/eval.json, or eval_dev.json for --split dev; the "
                                 "confusion matrix goes to <out>_confusion.png); several --ckpt: the summary JSON")
    for name in ("metrics", "classify"):
        cmd[name].add_argument("--repair_v1", action="store_true",
                               help="fill in v1 tails '<CLS> <CLS> <EOS>' of sequence files from the label field")
    cmd["classify"].add_argument("paths", nargs="+", metavar="PATH", help="images, folders of images, .jsonl files")
    cmd["next"].add_argument("prompt", metavar="PROMPT", help='a prompt, e.g. "<IMG> <Z_000>"')
    cmd["next"].add_argument("--top_k", type=int, default=5, help="how many next tokens to show (default: %(default)s)")
    cmd["curves"].add_argument("run_dir", metavar="RUN_DIR", help="a run folder (its log.jsonl)")
    cmd["curves"].add_argument("--out", help="the PNG (default: RUN_DIR/curves.png)")
    g = cmd["generation"]
    g.add_argument("--judge", metavar="DIR", required=True, help="the judge CNN (cnn.json + cnn.safetensors) that "
                                                                  "python baselines.py --save_judge DIR saves")
    g.add_argument("--per_class", type=int, default=100, help="samples per class (default: %(default)s)")
    g.add_argument("--scales", default="1,2,3,4,5", help="guidance scales (default: %(default)s)")
    g.add_argument("--real", choices=("test", "dev"), default="test",
                   help="the real digits the drawings are compared with: the test split (the report) or the "
                        "development split (to choose sampling settings; default: %(default)s)")
    draw_settings.add_options(g, ("temperature", "top_k", "top_p", "seed"), temperature=draw_settings.TEMPERATURE)
    g.add_argument("--out", help="the report (default: <ckpt>/generation.json)")
    return ap


def parse(argv):
    """The command line -> parsed args, every value checked before any work."""
    args = build_parser().parse_args(with_command(sys.argv[1:] if argv is None else argv,
                                                  [c[0] for c in COMMANDS], "metrics", OLD_FLAGS))
    if getattr(args, "batch_size", 1) < 1:
        raise UserError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.command == "metrics":
        if args.repair_v1 and args.images:
            raise UserError("--repair_v1 is for sequence files (--data, or .jsonl files given to classify)")
        if args.tta < 0:
            raise UserError(f"--tta must be 0 (off) or a number of views, got {args.tta}")
        if args.tta and args.data:
            raise UserError("--tta classifies images: it is for evaluation on the checkpoint's own split or --images, "
                            "not --data sequences")
    if args.command == "next" and args.top_k < 1:
        raise UserError(f"--top_k must be at least 1, got {args.top_k}")
    if args.command == "generation":
        if args.per_class < 2:
            raise UserError(f"--per_class must be at least 2, got {args.per_class}")
        args.scales = parse_scales(args.scales)
        args.settings = draw_settings.from_args(args, for_a_class=True)
    return args


def parse_scales(text):
    try:
        scales = [float(v) for v in text.split(",")]
    except ValueError:
        raise UserError(f"--scales {text!r}: expected comma-separated numbers such as 1,2,3,4,5") from None
    if not scales or any(not v >= 0 for v in scales):
        raise UserError(f"--scales {text!r}: guidance scales must be >= 0")
    return scales


def main(argv=None):
    args = parse(argv)
    if args.command == "curves":
        out = args.out or os.path.join(args.run_dir, "curves.png")
        check_file(out, "curves PNG")
        w, h = plot_curves(os.path.join(args.run_dir, "log.jsonl"), out)
        print(f"wrote {out} ({w}x{h})")
        return 0
    if args.command == "metrics" and len(args.ckpt) > 1:
        return run_evals(args)
    ck = checkpoint.load(args.ckpt[0] if args.command == "metrics" else args.ckpt, resolve_device(args.device),
                         args.backend)
    with bf16_autocast(args.bf16, ck.model.device):
        {"metrics": run_eval, "classify": run_classify, "next": run_next, "generation": run_generation}[args.command](
            args, ck)
    return 0


# ----------------------------------------------------------------------------- metrics

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
    data = evaluation.load_data(ck, args.images, args.data, args.split, args.repair_v1, tta=bool(args.tta))
    report = evaluation.report(ck, data, png, args.tta, args.batch_size)
    image = confusion_png(report["confusion"], ck.class_names,
                          f"{ck.folder}: accuracy {100 * report['accuracy']:.2f} % on {report['n_sequences']}")
    write_result(out, report, config=args, seeds=evaluation.model_seeds([ck]), dtype=dtype(args, ck.model.device))
    write_bytes(png, image)
    print(f"checkpoint {ck.folder} ({report['checkpoint_chosen']}) on {report['data']}")
    if report["truncated_sequences"]:
        print(f"note: {report['truncated_sequences']} sequences are longer than the block size {report['block_size']}; "
              f"their image tokens were cut (the label tail is kept), as in training")
    print(evaluation.metrics_text(report, ck.class_names))
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
            seeds += evaluation.model_seeds([ck])
            reports.append(run_eval(args, ck))
    rows = evaluation.across_seeds(reports)
    a, p = rows["accuracy"], rows["image_perplexity"]
    print(f"{len(reports)} checkpoints: accuracy {100 * a['mean']:.2f} % +- {100 * a['std']:.2f} (sample std; 95 % "
          f"interval of the mean {100 * a['ci95'][0]:.2f} .. {100 * a['ci95'][1]:.2f}); image-token perplexity "
          f"{p['mean']:.3f} +- {p['std']:.3f}")
    if args.tta:
        t = rows["tta_accuracy"]
        print(f"with test-time augmentation ({args.tta} views): accuracy {100 * t['mean']:.2f} % +- {100 * t['std']:.2f} "
              f"(95 % interval of the mean {100 * t['ci95'][0]:.2f} .. {100 * t['ci95'][1]:.2f})")
    if args.out:
        write_result(args.out, {"checkpoints": args.ckpt, "data": [r["data"] for r in reports],
                                "per_checkpoint": [{k: r[k] for k in ("checkpoint", "accuracy", "image_perplexity", "loss",
                                                                      "tta") if k in r} for r in reports], **rows},
                     config=args, seeds=seeds, dtype=dtype(args, device))
        print(f"wrote {args.out}")
    return 0


def dtype(args, device):
    """The precision this evaluation computes in (for the provenance)."""
    return precision(args.bf16, device, backend=args.backend)


# ----------------------------------------------------------------------------- the other sub-commands

def run_classify(args, ck):
    items = evaluation.classify_items(args.paths, ck.vocab, args.repair_v1)
    rows = evaluation.classify(ck, items, args.batch_size)
    names = ck.class_names
    w = min(max(len(name) for name, _, _, _ in rows), 60)
    print(f"{'input':<{w}}  {'true':>5}  {'predicted':>9}  {'prob':>6}")
    labelled = [(true, c) for _, true, c, _ in rows if true is not None]
    for name, true, c, p in rows:
        print(f"{name:<{w}}  {names[true] if true is not None else '-':>5}  {names[c]:>9}  {p:6.3f}")
    if labelled:
        right = sum(true == c for true, c in labelled)
        print(f"accuracy on the {len(labelled)} labelled sequences: {100 * right / len(labelled):.2f} %")
    return 0


def run_next(args, ck):
    ids = ck.vocab.parse(args.prompt, "next")
    print(f"prompt: {len(ids)} tokens, ending in {ck.vocab.tokens[ids[-1]]}")
    print(f"{'rank':>4}  {'token':<12}{'id':>5}  {'prob':>8}")
    for r, (tok, i, p) in enumerate(next_tokens(ck, ids, args.top_k), 1):
        print(f"{r:>4}  {tok:<12}{i:>5}  {p:8.4f}")
    return 0


def run_generation(args, ck):
    ck.check_conditional("it has no drawings of a chosen class to report")
    out = args.out or os.path.join(ck.folder, "generation.json")
    check_file(out, "generation report")
    report = judged_report(ck, args.judge, args.real, args.per_class, args.scales, args.settings, progress=True)
    write_result(out, report, config=args, seeds=evaluation.model_seeds([ck]), dtype=dtype(args, ck.model.device))
    print(f"checkpoint {ck.folder}, judge {args.judge}")
    print(report_text(report, ck.class_names))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
