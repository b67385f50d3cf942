"""Sample token sequences (images and their labels) from a trained checkpoint.

    python sample.py                                   # 16 new digits from runs/demo/best, start "<IMG>"
    python sample.py --top_p 0.9 --temperature 0.8 --num_samples 32 --out_jsonl samples.jsonl
    python sample.py --greedy --start "<IMG> <Z_000> <Z_000>"
    python sample.py --complete 10 --fraction 0.5      # finish the first half of 10 validation images

Decoding is incremental with the model's key/value cache (the prefix is never recomputed), batched,
and each row stops at <EOS> (a complete image ends '</IMG> <CLS> <CLS_y> <EOS>'), at
--max_new_tokens, or at the model's block size. For every row the model's own class prediction is
read where <CLS> was fed: the argmax over the label tokens of the logits at that position.
Outputs: the token sequences (stdout, or --out_jsonl), and a PNG grid of the decoded images
(--out_png, default <ckpt>/samples.png or <ckpt>/completions.png).
"""
import os
import random

import torch

import checkpoint
from cli import add_ckpt, add_device, parser, run_cli
from data import read_sequences
from generation import generate
from plots import save_grid
from tokens import TAIL
from util import (UserError, check_file, check_finite, check_memory, check_outputs, check_seed, resolve_device,
                  write_jsonl)


def record(r, vocab, seq_len, **meta):
    """A generated row -> a JSONL record. 'label' is the label token the model wrote (well-formed
    sequences only, so they can be read back as data); 'pred'/'prob' its prediction at <CLS>."""
    ok = vocab.is_complete(r["ids"], seq_len)
    return {"tokens": vocab.decode(r["ids"]), "label": r["ids"][-2] - vocab.label_offset if ok else None,
            "pred": r["pred"], "prob": r["prob"], "well_formed": ok, "stop": r["stop"],
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
    ap.add_argument("--temperature", type=float, default=1.0, help="logits are divided by this; 0 = greedy")
    ap.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus: keep the most likely tokens "
                                                             "up to this cumulative probability (1 = off)")
    ap.add_argument("--greedy", action="store_true", help="always take the most likely token")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--start", default="<IMG>", help='prompt tokens (default: "%(default)s")')
    ap.add_argument("--complete", type=int, metavar="N",
                    help="completion mode: finish N validation images from their first --fraction of codes")
    ap.add_argument("--fraction", type=float, default=0.5, help="share of each image's codes kept (default: %(default)s)")
    ap.add_argument("--data", metavar="FILE.jsonl", help="--complete: images from this sequence file "
                                                         "(default: <data_dir>/val.jsonl of the checkpoint)")
    ap.add_argument("--repair_v1", action="store_true", help="--complete: fill in v1 tails '<CLS> <CLS> <EOS>' "
                                                             "of the --data file from its label field")
    ap.add_argument("--out_jsonl", help="write the sequences here instead of printing them")
    ap.add_argument("--out_png", help="image grid (default: <ckpt>/samples.png, or <ckpt>/completions.png)")
    ap.add_argument("--batch_size", type=int, default=64, help="rows decoded together (default: %(default)s)")
    add_device(ap)
    return ap


def check_args(a):
    if a.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {a.num_samples}")
    if a.max_new_tokens is not None and a.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {a.max_new_tokens}")
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
    if a.greedy and (a.temperature != 1.0 or a.top_k or a.top_p != 1.0):
        raise UserError("--greedy always takes the most likely token: --temperature, --top_k and --top_p "
                        "do not apply to it")
    if a.complete is not None and a.start != "<IMG>":
        raise UserError("--complete starts from the first codes of validation images: --start does not apply to it")


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
    ok = vocab.is_complete(r["ids"], seq_len)
    codes = len(vocab.image_codes(r["ids"]))
    pred = f"predicted {names[r['pred']]} (p={r['prob']:.3f})" if r["pred"] is not None else "no <CLS>, no prediction"
    return f"sample {i}: {pred}; {codes} codes, {'complete image' if ok else 'not a complete image'}, stop: {r['stop']}"


def main(argv=None):
    a = build_parser().parse_args(argv)
    check_args(a)
    out_png = a.out_png or os.path.join(a.ckpt, "completions.png" if a.complete else "samples.png")
    check_file(out_png, "PNG grid")
    if a.out_jsonl:
        check_file(a.out_jsonl, "JSONL file")
    check_outputs(out_png, a.out_jsonl)
    ck = checkpoint.load(a.ckpt, resolve_device(a.device))
    model, vocab, book, names = ck.model, ck.vocab, ck.codebook, ck.class_names
    seq_len, block = book.seq_len, model.config.block_size
    check_sizes(a, model, book, vocab)
    if block < seq_len + 1 + TAIL:
        print(f"note: the model's block size {block} is shorter than a complete image ({seq_len + 1 + TAIL} "
              f"tokens: it was trained on cut images), so no row can be a complete image")
    gen = torch.Generator(device=model.device).manual_seed(a.seed)
    opts = dict(temperature=a.temperature, top_k=a.top_k or None, top_p=a.top_p, greedy=a.greedy,
                generator=gen, batch_size=a.batch_size, progress=True)
    max_new = a.max_new_tokens or block
    settings = {"seed": a.seed, "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "greedy": a.greedy}

    if a.complete is None:
        prompt = vocab.parse(a.start, "--start")
        if len(prompt) >= block:
            raise UserError(f"--start has {len(prompt)} tokens; the model's block size {block} leaves no room to generate")
        res = generate(model, [prompt] * a.num_samples, vocab, max_new, **opts)
        recs = [record(r, vocab, seq_len, index=i, start=a.start, **settings) for i, r in enumerate(res)]
        images = torch.stack([book.decode_ids(r["ids"], vocab) for r in res])
        caps = [f"{names[r['pred']]} {100 * r['prob']:.0f}%" if r["pred"] is not None else "-" for r in res]
        size = save_grid(images, caps, out_png, scale=grid_scale(book.image_size[1]))
        lines = [describe(i, r, names, vocab, seq_len) for i, r in enumerate(res)]
    else:
        path = a.data or ck.split_file("val")
        seqs, labels = read_sequences(path, vocab, repair_v1=a.repair_v1)
        chosen = pick_examples(labels, a.complete, vocab.num_classes, a.seed)
        if len(chosen) < a.complete:
            print(f"note: {path} has only {len(chosen)} sequences")
        prompts = []
        for i in chosen:
            codes = seqs[i][1:-TAIL]
            keep = round(a.fraction * len(codes))
            prompts.append([vocab.img_id] + codes[:keep])
        if max(len(p) for p in prompts) >= block:
            raise UserError(f"the kept part of the images fills the model's block size {block}; lower --fraction")
        res = generate(model, prompts, vocab, max_new, **opts)
        recs, cells, caps, lines = [], [], [], []
        hits = 0
        for n, (i, p, r) in enumerate(zip(chosen, prompts, res)):
            y = labels[i]
            hits += r["pred"] == y
            recs.append(record(r, vocab, seq_len, index=n, source=f"{path}#{i + 1}", true_label=y,
                               kept_codes=len(p) - 1, **settings))
            cells += [book.decode_ids(seqs[i], vocab), book.decode_ids(p, vocab), book.decode_ids(r["ids"], vocab)]
            pred = f"{names[r['pred']]} {100 * r['prob']:.0f}%" if r["pred"] is not None else "-"
            total = len(seqs[i]) - 1 - TAIL
            caps += [f"true {names[y]}", f"kept {len(p) - 1}/{total}", f"pred {pred}"]
            lines.append(f"{path}#{i + 1} (true {names[y]}, kept {len(p) - 1}/{total} codes): "
                         + describe(n, r, names, vocab, seq_len).split(": ", 1)[1])
        per_row = 2 if len(chosen) > 1 else 1
        size = save_grid(torch.stack(cells), caps, out_png, ncol=3 * per_row, scale=grid_scale(book.image_size[1]))
        lines.append(f"the prediction at <CLS> after completion matches the true label for {hits}/{len(chosen)} images")

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


if __name__ == "__main__":
    run_cli(main)
