"""Sample token sequences (images and their labels) from a trained checkpoint.

    python sample.py                                   # 16 new images from runs/demo/final, start "<IMG>"
    python sample.py --top_p 0.9 --temperature 0.8 --num_samples 32 --out_jsonl samples.jsonl
    python sample.py --greedy --start "<IMG> <Z_000> <Z_000>"
    python sample.py --complete 10 --fraction 0.5      # finish the first half of 10 test images
    python sample.py --class 7 --num_samples 16        # draw sevens (a model trained with cond_fraction > 0)
    python sample.py --grid --num_samples 10 --guidance 3   # one row per class, guidance 3
    python sample.py --complete 10 --class 3           # finish the top half of 10 images as threes

Decoding is incremental with the model's key/value cache (the prefix is never recomputed), batched,
and each row stops at <EOS> (a complete image ends '</IMG> <CLS> <CLS_y> <EOS>'), at
--max_new_tokens, or at the model's block size. For every row the model's own class prediction is
read where <CLS> was fed: the argmax over the label tokens of the logits at that position.
Drawing a chosen class (--class, --grid) starts from '<CLS_y> <IMG>' and ends '</IMG> <EOS>';
with classifier-free guidance (--guidance SCALE; 1 = plain conditional sampling) every step
samples from uncond + SCALE * (cond - uncond), the unconditional prompt being '<UNK> <IMG>' (the class
not stated), both decoded in one batch. A drawing is then read by the model's own classifier (its
'<IMG> codes </IMG> <CLS>' prefix, where no class is stated) for the caption (imagegpt/drawing.py).
Outputs: the token sequences (stdout, or --out_jsonl), and a PNG grid of the decoded images
(--out_png, default <ckpt>/samples.png, <ckpt>/grid.png or <ckpt>/completions.png).
"""
import os
import random

import torch

from imagegpt import checkpoint, drawing
from imagegpt.cli import add_backend, add_ckpt, add_device, add_threads, parser, run_cli
from imagegpt.device import bf16_autocast, check_memory, resolve_device, use_threads
from imagegpt.errors import UserError, check_finite, check_seed
from imagegpt.files import check_file, check_outputs, write_jsonl
from imagegpt.plots import save_grid
from imagegpt.sequences import read_sequences
from imagegpt.token_format import TAIL


def record(r, vocab, seq_len, **meta):
    """A generated row -> a JSONL record. 'label' is the class the row states or the label token it
    wrote (complete images only, so they can be read back as data); 'pred'/'prob' the model's reading."""
    label, complete = drawing.outcome(r["ids"], vocab, seq_len)
    return {"tokens": vocab.decode(r["ids"]), "label": label,
            "pred": r["pred"], "prob": r["prob"], "well_formed": complete, "stop": r["stop"],
            "codes": len(vocab.image_codes(r["ids"])), "meta": meta}


# ----------------------------------------------------------------------------- command line

def grid_scale(width):
    return max(3, -(-84 // width))  # cells at least 84 pixels wide so that captions fit


def pick_examples(labels, n, num_classes, seed):
    """n indices, round-robin over the classes (each class in a seeded random order)."""
    rng = random.Random(seed)
    per = [[i for i, y in enumerate(labels) if y == c] for c in range(num_classes)]
    for lst in per:
        rng.shuffle(lst)
    out = []
    while len(out) < min(n, len(labels)):
        for lst in per:
            if lst and len(out) < n:
                out.append(lst.pop())
    return out


def build_parser():
    ap = parser(__doc__, prog="sample.py")
    add_ckpt(ap)
    ap.add_argument("--num_samples", type=int, default=16, help="sequences to draw (default: %(default)s)")
    ap.add_argument("--max_new_tokens", type=int, default=None,
                    help="most tokens to add per row (default: up to the model's block size)")
    ap.add_argument("--temperature", type=float, default=None,
                    help=f"logits are divided by this; 0 = greedy (default: 1, or {drawing.TEMPERATURE} when drawing a "
                         f"chosen class with --class or --grid)")
    ap.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (default: 0 = off)")
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus: keep the most likely tokens "
                                                             "up to this cumulative probability (default: 1 = off)")
    ap.add_argument("--greedy", action="store_true", help="always take the most likely token")
    ap.add_argument("--seed", type=int, default=1337, help="seed of the sampling and of the images --complete "
                                                           "picks (default: %(default)s)")
    ap.add_argument("--start", default=None, help='prompt tokens (default: "<IMG>")')
    ap.add_argument("--class", "--digit", dest="label", metavar="CLASS",
                    help="draw this class (a class name or index): prompt '<CLS_y> <IMG>'; with --complete, finish "
                         "images as this class (--digit is the older name)")
    ap.add_argument("--grid", action="store_true", help="draw --num_samples of every class, one row per class")
    ap.add_argument("--guidance", "--cfg", dest="guidance", type=float, metavar="SCALE",
                    help=f"classifier-free guidance scale for --class/--grid (default: {drawing.GUIDANCE}; 1 = plain "
                         f"conditional sampling; --cfg is the older name)")
    ap.add_argument("--complete", type=int, metavar="N",
                    help="completion mode: finish N test images from their first --fraction of codes")
    ap.add_argument("--fraction", type=float, default=0.5, help="share of each image's codes kept (default: %(default)s)")
    ap.add_argument("--data", metavar="FILE.jsonl", help="--complete: images from this sequence file "
                                                         "(default: <data_dir>/test.jsonl of the checkpoint)")
    ap.add_argument("--repair_v1", action="store_true", help="--complete: fill in v1 tails '<CLS> <CLS> <EOS>' "
                                                             "of the --data file from its label field")
    ap.add_argument("--out_jsonl", help="write the sequences here instead of printing them")
    ap.add_argument("--out_png", help="image grid (default: <ckpt>/samples.png, <ckpt>/grid.png or <ckpt>/completions.png)")
    ap.add_argument("--batch_size", type=int, default=64, help="rows decoded together (default: %(default)s)")
    add_device(ap)
    add_backend(ap)
    add_threads(ap)
    return ap


def check_args(a):
    if a.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {a.num_samples}")
    if a.threads < 0:
        raise UserError(f"--threads must be 0 (auto) or a positive number, got {a.threads}")
    if a.max_new_tokens is not None and a.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {a.max_new_tokens}")
    if a.greedy and (a.temperature is not None or a.top_k or a.top_p != 1.0):
        raise UserError("--greedy always takes the most likely token: --temperature, --top_k and --top_p "
                        "do not apply to it")
    if a.temperature is None:
        a.temperature = drawing.TEMPERATURE if a.label is not None or a.grid else 1.0
    if not a.temperature >= 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {a.temperature}")
    check_finite(a.temperature, "--temperature")
    check_seed(a.seed, "--seed")
    if a.top_k < 0:
        raise UserError(f"--top_k must be >= 0 (0 = off), got {a.top_k}")
    if not 0 < a.top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {a.top_p}")
    if a.complete is not None and a.complete < 1:
        raise UserError(f"--complete must be at least 1, got {a.complete}")
    if not 0 <= a.fraction <= 1:
        raise UserError(f"--fraction must be in [0, 1], got {a.fraction}")
    if a.batch_size < 1:
        raise UserError(f"--batch_size must be at least 1, got {a.batch_size}")
    if a.data and a.complete is None:
        raise UserError("--data is for --complete (the images to finish)")
    if a.repair_v1 and a.complete is None:
        raise UserError("--repair_v1 is for --complete (the sequence file it reads)")
    if a.grid and (a.label is not None or a.complete is not None):
        raise UserError("--grid draws every class; it does not combine with --class or --complete")
    if a.start is not None and (a.label is not None or a.grid or a.complete is not None):
        raise UserError("--start is the prompt of free sampling; --class, --grid and --complete make their own")
    if a.guidance is not None and a.label is None and not a.grid:
        raise UserError("--guidance needs a class to guide towards: --class or --grid")
    if a.guidance is not None and not a.guidance >= 0:
        raise UserError(f"--guidance must be >= 0 (1 = plain conditional sampling), got {a.guidance}")


def check_sizes(a, model, book, vocab):
    """Refuse, before generating, what could not fit in memory: the key/value cache and logits of one
    batch, and every row's tokens, decoded image and cell of the PNG grid."""
    c, n = model.config, a.num_samples if a.complete is None else a.complete
    rows = min(a.batch_size, n)
    batch = 4 * rows * c.block_size * (2 * c.n_layer * c.n_embd + len(vocab))
    C, (H, W), s = book.channels, book.image_size, grid_scale(book.image_size[1])
    per_row = 4 * C * H * W + 3 * (H * s + 16) * (W * s + 4) + 40 * c.block_size
    check_memory(batch + n * per_row, f"{n} rows of up to {c.block_size} tokens, decoded into a PNG grid "
                 f"({rows} at a time)", model.device, hint="lower --num_samples or --batch_size")


def describe(i, r, names, vocab, seq_len):
    complete = drawing.outcome(r["ids"], vocab, seq_len)[1]
    codes = len(vocab.image_codes(r["ids"]))
    pred = f"predicted {names[r['pred']]} (p={r['prob']:.3f})" if r["pred"] is not None else "no <CLS>, no prediction"
    return f"sample {i}: {pred}; {codes} codes, {'complete image' if complete else 'not a complete image'}, stop: {r['stop']}"


def main(argv=None):
    a = build_parser().parse_args(argv)
    check_args(a)
    out_png = a.out_png or os.path.join(a.ckpt, "completions.png" if a.complete else "grid.png" if a.grid
                                        else "samples.png")
    check_file(out_png, "PNG grid")
    if a.out_jsonl:
        check_file(a.out_jsonl, "JSONL file")
    check_outputs(out_png, a.out_jsonl)
    use_threads(a.threads)
    ck = checkpoint.load(a.ckpt, resolve_device(a.device), a.backend)
    with bf16_autocast(a.bf16, ck.model.device, decode_width=ck.model.config.n_embd):
        return run(a, ck, out_png)


def run(a, ck, out_png):
    """Draw as the options say, write the grid (and the JSONL) and print what was drawn."""
    book, block = ck.codebook, ck.model.config.block_size
    check_sizes(a, ck.model, book, ck.vocab)
    if block < book.seq_len + 1 + TAIL:
        print(f"note: the model's block size {block} is shorter than a complete image ({book.seq_len + 1 + TAIL} "
              f"tokens: it was trained on cut images), so no row can be a complete image")
    label = None if a.label is None else ck.class_index(a.label, "--class")
    if label is not None or a.grid:
        ck.check_conditional()
    sampling = dict(temperature=a.temperature, top_k=a.top_k or None, top_p=a.top_p, greedy=a.greedy,
                    generator=torch.Generator(device=ck.model.device).manual_seed(a.seed), progress=True)
    settings = {"seed": a.seed, "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "greedy": a.greedy}
    if label is not None or a.grid:
        settings["guidance"] = a.guidance = drawing.GUIDANCE if a.guidance is None else a.guidance
    mode = complete_images if a.complete is not None else draw_classes if label is not None or a.grid \
        else sample_freely
    recs, cells, captions, ncol, lines = mode(a, ck, label, sampling, settings)
    size = save_grid(torch.stack(cells), captions, out_png, ncol=ncol, scale=grid_scale(book.image_size[1]))
    if a.out_jsonl:
        write_jsonl(a.out_jsonl, recs)
    for line, rec in zip(lines, recs):
        print(line)
        if not a.out_jsonl:
            print("  " + rec["tokens"])
    for line in lines[len(recs):]:
        print(line)
    done = sum(r["well_formed"] for r in recs)
    print(f"{done}/{len(recs)} rows are complete images; wrote {out_png} ({size[0]}x{size[1]})"
          + (f" and {a.out_jsonl}" if a.out_jsonl else ""))
    return 0


def decode(a, ck, prompts, sampling, guidance=1.0):
    return drawing.draw(ck.model, ck.vocab, ck.codebook.seq_len, prompts, a.max_new_tokens or ck.model.config.block_size,
                        guidance, a.batch_size, **sampling)


def draw_classes(a, ck, label, sampling, settings):
    """--class / --grid: --num_samples drawings of the class (of every class, one row each)."""
    vocab, names, seq_len = ck.vocab, ck.class_names, ck.codebook.seq_len
    asked = [c for c in range(vocab.num_classes) for _ in range(a.num_samples)] if a.grid else [label] * a.num_samples
    res = decode(a, ck, [drawing.prompt(vocab, c) for c in asked], sampling, a.guidance)
    recs = [record(r, vocab, seq_len, index=i, asked=names[c], **settings) for i, (c, r) in enumerate(zip(asked, res))]
    cells = [ck.codebook.decode_ids(r["ids"], vocab) for r in res]
    captions = [f"{names[c]}: reads {names[r['pred']]}" for c, r in zip(asked, res)]
    lines = [f"asked {names[c]}, " + describe(i, r, names, vocab, seq_len).replace("predicted", "the model reads", 1)
             for i, (c, r) in enumerate(zip(asked, res))]
    hits = sum(r["pred"] == c for c, r in zip(asked, res))
    lines.append(f"the model's own classifier reads the asked class in {hits}/{len(res)} drawings (guidance {a.guidance})")
    return recs, cells, captions, a.num_samples if a.grid else None, lines


def sample_freely(a, ck, label, sampling, settings):
    """--num_samples rows from the prompt --start (default '<IMG>')."""
    vocab, names, seq_len = ck.vocab, ck.class_names, ck.codebook.seq_len
    start = a.start or "<IMG>"
    prompt = vocab.parse(start, "--start")
    if len(prompt) >= ck.model.config.block_size:
        raise UserError(f"--start has {len(prompt)} tokens; the model's block size {ck.model.config.block_size} "
                        f"leaves no room to generate")
    res = decode(a, ck, [prompt] * a.num_samples, sampling)
    recs = [record(r, vocab, seq_len, index=i, start=start, **settings) for i, r in enumerate(res)]
    cells = [ck.codebook.decode_ids(r["ids"], vocab) for r in res]
    captions = [f"{names[r['pred']]} {100 * r['prob']:.0f}%" if r["pred"] is not None else "-" for r in res]
    return recs, cells, captions, None, [describe(i, r, names, vocab, seq_len) for i, r in enumerate(res)]


def complete_images(a, ck, label, sampling, settings):
    """--complete N: the first --fraction of N test images (or --data), finished by the model (as the
    class --class, if given); each shown as the real image, the kept part and the completion."""
    vocab, names, seq_len, book = ck.vocab, ck.class_names, ck.codebook.seq_len, ck.codebook
    path = a.data or ck.split_file("test")
    seqs, labels = read_sequences(path, vocab, repair_v1=a.repair_v1)
    chosen = pick_examples(labels, a.complete, vocab.num_classes, a.seed)
    if len(chosen) < a.complete:
        print(f"note: {path} has only {len(chosen)} sequences")
    prompts = []
    for i in chosen:
        codes = seqs[i][1:-TAIL]
        prompts.append(drawing.prompt(vocab, label, drawing.kept(vocab, codes, a.fraction)))
    if max(len(p) for p in prompts) >= ck.model.config.block_size:
        raise UserError(f"the kept part of the images fills the model's block size {ck.model.config.block_size}; "
                        f"lower --fraction")
    res = decode(a, ck, prompts, sampling, a.guidance if label is not None else 1.0)
    recs, cells, captions, lines = [], [], [], []
    hits = 0
    for n, (i, p, r) in enumerate(zip(chosen, prompts, res)):
        hits += r["pred"] == (labels[i] if label is None else label)
        kept, total = len(vocab.image_codes(p)), len(seqs[i]) - 1 - TAIL
        recs.append(record(r, vocab, seq_len, index=n, source=f"{path}#{i + 1}", true_label=labels[i],
                           kept_codes=kept, **settings))
        cells += [book.decode_ids(seqs[i], vocab), book.decode_ids(p, vocab), book.decode_ids(r["ids"], vocab)]
        pred = f"{names[r['pred']]} {100 * r['prob']:.0f}%" if r["pred"] is not None else "-"
        captions += [f"true {names[labels[i]]}", f"kept {kept}/{total}",
                     f"pred {pred}" if label is None else f"as {names[label]}: {pred}"]
        lines.append(f"{path}#{i + 1} (true {names[labels[i]]}, kept {kept}/{total} codes"
                     f"{'' if label is None else ', asked ' + names[label]}): "
                     + describe(n, r, names, vocab, seq_len).split(": ", 1)[1])
    lines.append(f"the prediction at <CLS> after completion matches the true label for {hits}/{len(chosen)} images"
                 if label is None else f"the model's own classifier reads {names[label]} in {hits}/{len(chosen)} "
                 f"completions (guidance {a.guidance})")
    return recs, cells, captions, 3 * (2 if len(chosen) > 1 else 1), lines


if __name__ == "__main__":
    run_cli(main)
