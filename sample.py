"""Sample token sequences (images and their labels) from a trained checkpoint.

    python sample.py                                   # 16 new digits from runs/demo/final, start "<IMG>"
    python sample.py --top_p 0.9 --temperature 0.8 --num_samples 32 --out_jsonl samples.jsonl
    python sample.py --greedy --start "<IMG> <Z_000> <Z_000>"
    python sample.py --complete 10 --fraction 0.5      # finish the first half of 10 validation images
    python sample.py --digit 7 --num_samples 16        # draw sevens (a model trained with cond_fraction > 0)
    python sample.py --grid --num_samples 10 --cfg 3   # a 10 x 10 picture: one row per class, guidance 3
    python sample.py --complete 10 --digit 3           # finish the top half of 10 images as threes

Decoding is incremental with the model's key/value cache (the prefix is never recomputed), batched,
and each row stops at <EOS> (a complete image ends '</IMG> <CLS> <CLS_y> <EOS>'), at
--max_new_tokens, or at the model's block size. For every row the model's own class prediction is
read where <CLS> was fed: the argmax over the label tokens of the logits at that position.
Class-conditional drawing (--digit, --grid) starts from '<CLS_d> <IMG>' and ends '</IMG> <EOS>';
with classifier-free guidance (--cfg SCALE; 1 = plain conditional sampling) every step
samples from uncond + SCALE * (cond - uncond), the unconditional prompt being '<UNK> <IMG>' (the class
not stated), both decoded in one batch. A drawing is then read by the model's own classifier (its
'<IMG> codes </IMG> <CLS>' prefix, where no class is stated) for the caption.
Outputs: the token sequences (stdout, or --out_jsonl), and a PNG grid of the decoded images
(--out_png, default <ckpt>/samples.png, <ckpt>/grid.png or <ckpt>/completions.png).
"""
import os
import random

import torch

from imagegpt import checkpoint
from imagegpt.cli import add_backend, add_ckpt, add_device, parser, run_cli
from imagegpt.decoding import DEFAULT_GUIDANCE, DRAW_TEMPERATURE, generate
from imagegpt.device import bf16_autocast, check_memory, resolve_device
from imagegpt.errors import UserError, check_finite, check_seed
from imagegpt.files import check_file, check_outputs, write_jsonl
from imagegpt.metrics import class_probs
from imagegpt.plots import save_grid
from imagegpt.sequences import read_sequences
from imagegpt.token_format import TAIL


def record(r, vocab, seq_len, **meta):
    """A generated row -> a JSONL record. 'label' is the label token the model wrote (well-formed
    sequences only, so they can be read back as data); 'pred'/'prob' its prediction at <CLS>."""
    ok = vocab.is_complete(r["ids"], seq_len)
    label = r["ids"][-2] - vocab.label_offset if ok else None
    if vocab.is_conditioned(r["ids"]):  # '<CLS_d>|<UNK> <IMG> codes </IMG> <EOS>': the asked class is the label
        ok = vocab.is_cond_complete(r["ids"], seq_len)
        label = r["ids"][0] - vocab.label_offset if ok and vocab.is_label(r["ids"][0]) else None
    return {"tokens": vocab.decode(r["ids"]), "label": label,
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
    ap.add_argument("--temperature", type=float, default=None,
                    help=f"logits are divided by this; 0 = greedy (default: 1, or {DRAW_TEMPERATURE} when drawing a "
                         f"chosen class with --digit or --grid)")
    ap.add_argument("--top_k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    ap.add_argument("--top_p", type=float, default=1.0, help="nucleus: keep the most likely tokens "
                                                             "up to this cumulative probability (1 = off)")
    ap.add_argument("--greedy", action="store_true", help="always take the most likely token")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--start", default=None, help='prompt tokens (default: "<IMG>")')
    ap.add_argument("--digit", metavar="CLASS", help="draw this class (a class name or index): prompt "
                                                     "'<CLS_d> <IMG>'; with --complete, finish images as this class")
    ap.add_argument("--grid", action="store_true", help="draw --num_samples of every class, one row per class")
    ap.add_argument("--cfg", type=float, metavar="SCALE", help="classifier-free guidance scale for --digit/--grid "
                    f"(default: {DEFAULT_GUIDANCE}; 1 = plain conditional sampling)")
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
    add_backend(ap)
    return ap


def check_args(a):
    if a.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {a.num_samples}")
    if a.max_new_tokens is not None and a.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {a.max_new_tokens}")
    if a.greedy and (a.temperature is not None or a.top_k or a.top_p != 1.0):
        raise UserError("--greedy always takes the most likely token: --temperature, --top_k and --top_p "
                        "do not apply to it")
    if a.temperature is None:
        a.temperature = DRAW_TEMPERATURE if a.digit is not None or a.grid else 1.0
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
    if a.grid and (a.digit is not None or a.complete is not None):
        raise UserError("--grid draws every class; it does not combine with --digit or --complete")
    if a.start is not None and (a.digit is not None or a.grid or a.complete is not None):
        raise UserError("--start is the prompt of free sampling; --digit, --grid and --complete make their own")
    if a.cfg is not None and a.digit is None and not a.grid:
        raise UserError("--cfg (guidance) needs a class to guide towards: --digit or --grid")
    if a.cfg is not None and not a.cfg >= 0:
        raise UserError(f"--cfg must be >= 0 (1 = plain conditional sampling), got {a.cfg}")


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


def class_index(text, names):
    """--digit: a class name or index -> index."""
    if text in names:
        return names.index(text)
    if text.isdigit() and int(text) < len(names):
        return int(text)
    raise UserError(f"--digit {text!r}: not a class of this checkpoint (classes: {' '.join(names)})")


def check_conditioned(ck):
    """A model trained without class-conditioned sequences has never seen '<CLS_d> <IMG>'."""
    frac = ck.settings.get("cond_fraction", 0)
    if ck.settings and not frac:
        raise UserError(f"{ck.folder} was trained without class-conditioned sequences (cond_fraction 0), so it "
                        f"cannot be asked for a class; train one with cond_fraction > 0 (config/demo_cond.yaml)")


def own_reading(model, vocab, res, batch_size):
    """Fill pred/prob of conditioned rows: the model's own classifier on '<IMG> codes </IMG> <CLS>'."""
    rows = [r for r in res if vocab.is_conditioned(r["ids"])]
    if rows:
        probs = class_probs(model, [vocab.prefix_ids(vocab.image_codes(r["ids"])) for r in rows], vocab, batch_size)
        for r, p in zip(rows, probs):
            r["pred"], r["prob"] = int(p.argmax()), p.max().item()


def describe(i, r, names, vocab, seq_len):
    ok = vocab.is_cond_complete(r["ids"], seq_len) if vocab.is_conditioned(r["ids"]) else vocab.is_complete(r["ids"], seq_len)
    codes = len(vocab.image_codes(r["ids"]))
    pred = f"predicted {names[r['pred']]} (p={r['prob']:.3f})" if r["pred"] is not None else "no <CLS>, no prediction"
    return f"sample {i}: {pred}; {codes} codes, {'complete image' if ok else 'not a complete image'}, stop: {r['stop']}"


def main(argv=None):
    a = build_parser().parse_args(argv)
    check_args(a)
    out_png = a.out_png or os.path.join(a.ckpt, "completions.png" if a.complete else "grid.png" if a.grid
                                        else "samples.png")
    check_file(out_png, "PNG grid")
    if a.out_jsonl:
        check_file(a.out_jsonl, "JSONL file")
    check_outputs(out_png, a.out_jsonl)
    ck = checkpoint.load(a.ckpt, resolve_device(a.device), a.backend)
    with bf16_autocast(a.bf16, ck.model.device, decode_width=ck.model.config.n_embd):
        return draw(a, ck, out_png)


def draw(a, ck, out_png):
    """Sample as the options say, write the outputs and print what was drawn."""
    model, vocab, book, names = ck.model, ck.vocab, ck.codebook, ck.class_names
    seq_len, block = book.seq_len, model.config.block_size
    check_sizes(a, model, book, vocab)
    if block < seq_len + 1 + TAIL:
        print(f"note: the model's block size {block} is shorter than a complete image ({seq_len + 1 + TAIL} "
              f"tokens: it was trained on cut images), so no row can be a complete image")
    gen = torch.Generator(device=model.device).manual_seed(a.seed)
    opts = dict(temperature=a.temperature, top_k=a.top_k or None, top_p=a.top_p, greedy=a.greedy,
                generator=gen, batch_size=a.batch_size, progress=True, image_len=seq_len)
    max_new = a.max_new_tokens or block
    settings = {"seed": a.seed, "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "greedy": a.greedy}
    digit = None if a.digit is None else class_index(a.digit, names)
    if digit is not None or a.grid:
        check_conditioned(ck)
        scale = DEFAULT_GUIDANCE if a.cfg is None else a.cfg
        settings["cfg"] = scale
        guided = lambda prompts: dict(uncond=None if scale == 1 else [[vocab.unk_id] + p[1:] for p in prompts],
                                      cfg_scale=scale)

    if a.complete is None and (digit is not None or a.grid):
        asked = [c for c in range(vocab.num_classes) for _ in range(a.num_samples)] if a.grid else [digit] * a.num_samples
        prompts = [vocab.cond_prompt(c) for c in asked]
        res = generate(model, prompts, vocab, max_new, **opts, **guided(prompts))
        own_reading(model, vocab, res, a.batch_size)
        recs = [record(r, vocab, seq_len, index=i, asked=names[c], **settings) for i, (c, r) in enumerate(zip(asked, res))]
        images = torch.stack([book.decode_ids(r["ids"], vocab) for r in res])
        caps = [f"{names[c]}: reads {names[r['pred']]}" for c, r in zip(asked, res)]
        size = save_grid(images, caps, out_png, ncol=a.num_samples if a.grid else None,
                         scale=grid_scale(book.image_size[1]))
        lines = [f"asked {names[c]}, " + describe(i, r, names, vocab, seq_len).replace("predicted", "the model reads", 1)
                 for i, (c, r) in enumerate(zip(asked, res))]
        hits = sum(r["pred"] == c for c, r in zip(asked, res))
        lines.append(f"the model's own classifier reads the asked class in {hits}/{len(res)} drawings (guidance {scale})")
    elif a.complete is None:
        start = a.start or "<IMG>"
        prompt = vocab.parse(start, "--start")
        if len(prompt) >= block:
            raise UserError(f"--start has {len(prompt)} tokens; the model's block size {block} leaves no room to generate")
        res = generate(model, [prompt] * a.num_samples, vocab, max_new, **opts)
        recs = [record(r, vocab, seq_len, index=i, start=start, **settings) for i, r in enumerate(res)]
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
            prompts.append(([vocab.img_id] if digit is None else vocab.cond_prompt(digit)) + codes[:keep])
        if max(len(p) for p in prompts) >= block:
            raise UserError(f"the kept part of the images fills the model's block size {block}; lower --fraction")
        res = generate(model, prompts, vocab, max_new, **opts, **(guided(prompts) if digit is not None else {}))
        own_reading(model, vocab, res, a.batch_size)
        recs, cells, caps, lines = [], [], [], []
        hits = 0
        for n, (i, p, r) in enumerate(zip(chosen, prompts, res)):
            y = labels[i] if digit is None else digit
            hits += r["pred"] == y
            recs.append(record(r, vocab, seq_len, index=n, source=f"{path}#{i + 1}", true_label=labels[i],
                               kept_codes=len(vocab.image_codes(p)), **settings))
            cells += [book.decode_ids(seqs[i], vocab), book.decode_ids(p, vocab), book.decode_ids(r["ids"], vocab)]
            pred = f"{names[r['pred']]} {100 * r['prob']:.0f}%" if r["pred"] is not None else "-"
            total = len(seqs[i]) - 1 - TAIL
            kept = len(vocab.image_codes(p))
            caps += [f"true {names[labels[i]]}", f"kept {kept}/{total}",
                     f"pred {pred}" if digit is None else f"as {names[digit]}: {pred}"]
            lines.append(f"{path}#{i + 1} (true {names[labels[i]]}, kept {kept}/{total} codes"
                         f"{'' if digit is None else ', asked ' + names[digit]}): "
                         + describe(n, r, names, vocab, seq_len).split(": ", 1)[1])
        per_row = 2 if len(chosen) > 1 else 1
        size = save_grid(torch.stack(cells), caps, out_png, ncol=3 * per_row, scale=grid_scale(book.image_size[1]))
        lines.append(f"the prediction at <CLS> after completion matches the true label for {hits}/{len(chosen)} images"
                     if digit is None else f"the model's own classifier reads {names[digit]} in {hits}/{len(chosen)} "
                     f"completions (guidance {scale})")

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
