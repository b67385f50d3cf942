"""Train and score the baselines on the project's split: k-NN, logistic regression, codebook k-NN, a small CNN.
(With --tokenisation: the table that chose the tokenisation, measured on the development split.)

    python baselines.py                          # the built-in digits, 3 seeds -> runs/baselines/baselines.json
    python baselines.py --seeds 5 --save_judge runs/judge
    python baselines.py --tokenisation           # the tokenisation table -> runs/baselines/tokenisation.json
    python baselines.py --source folder:my_images --image_size 28 --augment 6 --quick

Every setting is chosen on a development split carved from the training images; the test split (the
held-out images docs/results.md reports on) is scored once, at the end, after refitting on all training
images. Any data setting (DataConfig: source, image_size, channels, test_fraction, split_seed, augment,
max_shift, max_rotate, max_scale, max_shear, max_elastic, and the codebook's) can be given as --key value;
the defaults are the CPU demo's (config/demo.yaml: 6 augmented copies, 4 x 4 patches, 500 codes). See
imagegpt/baseline_protocol.py for the protocol.
"""
import json
import sys
import time

import torch

from imagegpt.baseline_protocol import (
    TOKENISATIONS,
    SuiteConfig,
    check_suite,
    markdown_table,
    quick,
    run_baselines,
    tokenisation_markdown,
    tokenisation_table,
)
from imagegpt.classifiers import CNNTraining
from imagegpt.cli import parser, run_cli
from imagegpt.data_config import DataConfig, check_data_config
from imagegpt.errors import UserError
from imagegpt.files import check_dir, check_file, write_text
from imagegpt.provenance import write_result
from imagegpt.settings import add_options, apply_options, build, changed
from imagegpt.sources import load_source

NOT_DATA = ("data_dir", "codebook_seed", "dev_fraction", "dev_fold")   # DataConfig fields baselines.py sets itself
# (no folder; the seed; its own development split: --dev_fraction, fold 0)


def build_parser():
    ap = parser(__doc__, prog="baselines.py")
    ap.add_argument("--seeds", type=int, default=3, help="runs of the seed-dependent baselines (CNN, codebook)")
    ap.add_argument("--first_seed", type=int, default=0, help="the seeds are first_seed, first_seed + 1, ...")
    ap.add_argument("--dev_fraction", type=float, default=0.2,
                    help="share of the training images held out as the development split")
    ap.add_argument("--epochs", type=int, default=CNNTraining.epochs, help="CNN epochs")
    ap.add_argument("--batch_size", type=int, default=CNNTraining.batch_size, help="CNN batch size")
    ap.add_argument("--lr", type=float, default=CNNTraining.lr, help="CNN peak learning rate (AdamW, cosine)")
    ap.add_argument("--weight_decay", type=float, default=CNNTraining.weight_decay, help="CNN AdamW weight decay")
    ap.add_argument("--tta", type=int, default=SuiteConfig.tta,
                    help="test-time views of the CNN's test-time-augmentation row (as eval.py --tta; default: %(default)s)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: the CNN's small batches gain nothing from more, and "
                         "stall badly when the cores are shared; results are reproducible per thread count)")
    ap.add_argument("--quick", action="store_true", help="a fast smoke run (2 CNN epochs, fewer candidates)")
    ap.add_argument("--tokenisation", action="store_true", help="instead of the baselines: the tokenisation "
                    "table (patch sizes, feature groups, K), measured on the development split -> "
                    "runs/baselines/tokenisation.json unless --out")
    ap.add_argument("--candidates", default="", help="with --tokenisation: the rows to measure instead of the "
                    "digits' table, as settings separated by ';', each row 'key=value,key=value' (e.g. "
                    "'num_codes=500;patch_size=2,num_codes=1000'); '' is a row of the settings as given")
    ap.add_argument("--out", default=None, help="the JSON report (default: runs/baselines/baselines.json, or "
                    "runs/baselines/tokenisation.json with --tokenisation)")
    ap.add_argument("--table", default="", help="also write the Markdown table to this file")
    ap.add_argument("--save_judge", default="", help="save the first seed's final CNN to this folder "
                    "(cnn.safetensors + cnn.json; classifiers.load_cnn reads it)")
    add_options(ap, DataConfig, skip=NOT_DATA)   # the codebook seed is the run's seed; no data folder is used
    return ap


def candidate_rows(text):
    """'key=value,key=value;key=value' -> [(row label, {key: value})] for the tokenisation table."""
    rows = []
    for part in text.split(";"):
        change = {}
        for item in filter(None, (s.strip() for s in part.split(","))):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise UserError(f"--candidates: {item!r} is not key=value")
            change[key.strip()] = value.strip()
        rows.append((", ".join(f"`{k}: {v}`" for k, v in change.items()) or "the settings as given", change))
    return rows


def main(argv=None):
    args = build_parser().parse_args(argv)
    cfg = apply_options(build(DataConfig, augment=6), args, skip=NOT_DATA)
    if args.candidates and not args.tokenisation:
        raise UserError("--candidates is for --tokenisation (the rows of its table)")
    if args.candidates:
        for _, change in candidate_rows(args.candidates):   # every value checked before the work
            check_data_config(changed(cfg, **change))
    args.out = args.out or f"runs/baselines/{'tokenisation' if args.tokenisation else 'baselines'}.json"
    check_data_config(cfg)
    for path in filter(None, (args.out, args.table)):  # fail before the work, not after it
        check_file(path, "output file")
    if args.save_judge:
        check_dir(args.save_judge, "judge folder")
    suite = SuiteConfig(dev_fraction=args.dev_fraction, seeds=args.seeds, first_seed=args.first_seed, tta=args.tta,
                        cnn=CNNTraining(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                        weight_decay=args.weight_decay))
    if args.quick:
        suite, cfg = quick(suite, cfg)
    check_suite(suite)
    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    images, labels, names, _ = load_source(cfg)
    if args.tokenisation:
        rows = candidate_rows(args.candidates) if args.candidates else \
            TOKENISATIONS[1:4] if args.quick else TOKENISATIONS
        rows = tokenisation_table(images, labels, cfg, args.dev_fraction, rows=rows)
        table = tokenisation_markdown(rows)
        write_result(args.out, {"command": "python " + " ".join(sys.argv), "rows": rows,
                                "wall_seconds": round(time.time() - t0, 1)},
                     config=args, dtype="fp32")
        if args.table:
            write_text(args.table, table + "\n")
        print(table)
        print(f"\nwrote {args.out} ({time.time() - t0:.0f} s)")
        return 0
    report, _ = run_baselines(images, labels, names, cfg, suite, save_judge=args.save_judge or None)
    report["command"] = "python " + " ".join(sys.argv)
    report["wall_seconds"] = round(time.time() - t0, 1)
    table = markdown_table(report)
    write_result(args.out, report, config=args,
                 seeds=list(range(suite.first_seed, suite.first_seed + suite.seeds)), dtype="fp32")
    if args.table:
        write_text(args.table, table + "\n")
    print(table)
    print(f"\nwrote {args.out} ({report['wall_seconds']:.0f} s)" +
          (f"; judge CNN in {args.save_judge}" if args.save_judge else ""))
    print(json.dumps({k: round(v["test_accuracy"]["mean"], 4) for k, v in report["baselines"].items()}))
    return 0


if __name__ == "__main__":
    run_cli(main)
