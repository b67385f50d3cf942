"""Sample token sequences (images and their labels) from a trained checkpoint.

    python sample.py                                   # 16 new images from runs/demo/final, start "<IMG>"
    python sample.py --top_p 0.9 --temperature 0.8 --num_samples 32 --out_jsonl samples.jsonl
    python sample.py --greedy --start "<IMG> <Z_000> <Z_000>"
    python sample.py draw --class 7 --num_samples 16   # draw sevens (a model trained with cond_fraction > 0)
    python sample.py draw --grid --num_samples 10 --guidance 3   # one row per class, guidance 3
    python sample.py complete --num_samples 10 --fraction 0.5    # finish the first half of 10 test images
    python sample.py complete --num_samples 10 --class 3         # finish the top half of 10 images as threes

Three sub-commands: free (the default: sampling from a prompt), draw (a chosen class, or a grid of every
class) and complete (finishing real images). The older spellings still work: `--class 7` and `--grid`
draw, `--complete N` completes N images.

Decoding is incremental with the model's key/value cache (the prefix is never recomputed), batched,
and each row stops at <EOS> (a complete image ends '</IMG> <CLS> <CLS_y> <EOS>'), at
--max_new_tokens, or at the model's block size. For every row the model's own class prediction is
read where <CLS> was fed: the argmax over the label tokens of the logits at that position.
Drawing a chosen class starts from '<CLS_y> <IMG>' and ends '</IMG> <EOS>'; with classifier-free
guidance (--guidance SCALE; 1 = plain conditional sampling) every step samples from uncond + SCALE *
(cond - uncond), the unconditional prompt being '<UNK> <IMG>' (the class not stated), both decoded in
one batch. A drawing is then read by the model's own classifier (its '<IMG> codes </IMG> <CLS>' prefix,
where no class is stated) for the caption (imagegpt/drawing.py). The drawing settings are one object
(imagegpt/draw_settings.py). Outputs: the token sequences (stdout, or --out_jsonl), and a PNG grid of
the decoded images (--out_png, default <ckpt>/samples.png, <ckpt>/grid.png or <ckpt>/completions.png).
"""
import os
import sys

import torch

from imagegpt import checkpoint, draw_settings, drawing_modes
from imagegpt.cli import (
    add_backend,
    add_ckpt,
    add_commands,
    add_device,
    add_threads,
    parser,
    run_cli,
    shared,
    with_command,
)
from imagegpt.device import bf16_autocast, resolve_device, use_threads
from imagegpt.errors import UserError
from imagegpt.files import check_file, check_outputs, write_jsonl
from imagegpt.plots import save_grid

COMMANDS = (("free", "sample from a prompt (--start, default '<IMG>')", "Sample rows freely from a prompt."),
            ("draw", "draw a chosen class (--class) or every class (--grid)",
             "Draw a chosen class (a model trained with cond_fraction > 0), with classifier-free guidance."),
            ("complete", "finish the first --fraction of --num_samples test images",
             "Finish real images from their first --fraction of codes (as --class, if given)."))
OLD_FLAGS = {"--complete": ("complete", ["--num_samples"]), "--class": ("draw", ["--class"]),
             "--digit": ("draw", ["--digit"]), "--grid": ("draw", ["--grid"])}
PNG = {"free": "samples.png", "draw": "samples.png", "complete": "completions.png"}   # each sub-command's grid
                                                                                     # (draw --grid: grid.png)


def add_outputs(p):
    """How many rows, drawn how, and where they go."""
    p.add_argument("--num_samples", type=int, default=16, help="rows to draw (draw --grid: per class; complete: "
                                                               "images to finish) (default: %(default)s)")
    draw_settings.add_options(p, seed=1337)
    p.add_argument("--out_jsonl", help="write the sequences here instead of printing them")
    p.add_argument("--out_png", help="image grid (default: <ckpt>/samples.png, <ckpt>/grid.png or "
                                     "<ckpt>/completions.png)")


def build_parser():
    ap = parser(__doc__, prog="sample.py")
    common = shared(add_ckpt, add_outputs, add_device, add_backend, add_threads)   # every sub-command's
    cmd = add_commands(ap, COMMANDS, {name: [common] for name in PNG})
    cmd["free"].add_argument("--start", default="<IMG>", help="prompt tokens (default: %(default)s)")
    for name in ("draw", "complete"):
        cmd[name].add_argument("--class", "--digit", dest="label", metavar="CLASS",
                               help="draw this class (a class name or index): prompt '<CLS_y> <IMG>'; complete: "
                                    "finish the images as this class (--digit is the older name)")
    cmd["draw"].add_argument("--grid", action="store_true", help="draw --num_samples of every class, one row per class")
    cmd["complete"].add_argument("--fraction", type=float, default=0.5,
                                 help="share of each image's codes kept (default: %(default)s)")
    cmd["complete"].add_argument("--data", metavar="FILE.jsonl", help="images from this sequence file "
                                                                      "(default: <data_dir>/test.jsonl of the checkpoint)")
    cmd["complete"].add_argument("--repair_v1", action="store_true",
                                 help="fill in v1 tails '<CLS> <CLS> <EOS>' of the --data file from its label field")
    return ap


def parse(argv):
    """The command line -> (parsed args, their DrawSettings), every value checked before any work."""
    args = build_parser().parse_args(with_command(sys.argv[1:] if argv is None else argv, list(PNG), "free", OLD_FLAGS))
    if args.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {args.num_samples}")
    if args.threads < 0:
        raise UserError(f"--threads must be 0 (auto) or a positive number, got {args.threads}")
    for_a_class = getattr(args, "label", None) is not None or getattr(args, "grid", False)
    if args.guidance is not None and not for_a_class:
        raise UserError("--guidance needs a class to guide towards: --class or --grid")
    if args.command == "draw" and args.grid == (args.label is not None):
        raise UserError("sample.py draw: give --class CLASS (one class) or --grid (every class), one of them")
    if args.command == "complete" and not 0 <= args.fraction <= 1:
        raise UserError(f"--fraction must be in [0, 1], got {args.fraction}")
    return args, draw_settings.from_args(args, for_a_class)


def main(argv=None):
    args, settings = parse(argv)
    out_png = args.out_png or os.path.join(args.ckpt, "grid.png" if getattr(args, "grid", False) else PNG[args.command])
    check_file(out_png, "PNG grid")
    if args.out_jsonl:
        check_file(args.out_jsonl, "JSONL file")
    check_outputs(out_png, args.out_jsonl)
    use_threads(args.threads)
    ck = checkpoint.load(args.ckpt, resolve_device(args.device), args.backend)
    with bf16_autocast(args.bf16, ck.model.device, decode_width=ck.model.config.n_embd):
        sheet = make_sheet(args, ck, settings)
    size = save_grid(torch.stack(sheet.cells), sheet.captions, out_png, ncol=sheet.ncol,
                     scale=drawing_modes.grid_scale(ck))
    if args.out_jsonl:
        write_jsonl(args.out_jsonl, sheet.records)
    show(sheet, not args.out_jsonl)
    done = sum(r["well_formed"] for r in sheet.records)
    print(f"{done}/{len(sheet.records)} rows are complete images; wrote {out_png} ({size[0]}x{size[1]})"
          + (f" and {args.out_jsonl}" if args.out_jsonl else ""))
    return 0


def make_sheet(args, ck, settings):
    """The sub-command's drawings (imagegpt/drawing_modes.py) -> their Sheet."""
    n = args.num_samples * (ck.vocab.num_classes if getattr(args, "grid", False) else 1)
    drawing_modes.check_sizes(ck, settings, n)
    note = drawing_modes.block_note(ck)
    if note:
        print(note)
    if args.command == "free":
        return drawing_modes.free(ck, settings, args.start, args.num_samples)
    label = None if args.label is None else ck.class_index(args.label, "--class")
    if args.command == "complete":
        if label is not None:
            ck.check_conditional()
        path = args.data or ck.split_file("test")
        return drawing_modes.complete(ck, settings, path, args.num_samples, args.fraction, label, args.repair_v1)
    ck.check_conditional()
    if args.grid:
        asked = [c for c in range(ck.vocab.num_classes) for _ in range(args.num_samples)]
        return drawing_modes.classes(ck, settings, asked, ncol=args.num_samples)
    return drawing_modes.classes(ck, settings, [label] * args.num_samples)


def show(sheet, tokens):
    """Print the sheet's lines (with each row's tokens when they are not written to a file)."""
    for line in sheet.notes:
        print(line)
    for line, rec in zip(sheet.lines, sheet.records):
        print(line)
        if tokens:
            print("  " + rec["tokens"])
    for line in sheet.lines[len(sheet.records):]:
        print(line)


if __name__ == "__main__":
    run_cli(main)
