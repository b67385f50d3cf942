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
import argparse
import json
import os
import random

import torch
import torch.nn.functional as F
from tqdm import tqdm

from util import UserError, atomic_path, run_cli

TOP_P_TOL = 1e-6  # a cumulative probability within this of p counts as reaching p (float32 logits
                  # give probabilities good to about 1e-7, so an exact boundary needs a margin)


# ----------------------------------------------------------------------------- sampling filters

def top_k_filter(logits, k):
    """Keep the k largest logits along the last dim, set the rest to -inf.

    Ties: every token whose logit equals the k-th largest value is kept, so more than k tokens
    survive when the k-th value is shared (nanoGPT's rule; the result never depends on token ids).
    k None or <= 0, or k >= vocabulary size, keeps everything."""
    if k is None or k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits, p):
    """Nucleus filter along the last dim: keep the smallest set of most probable tokens whose
    cumulative probability reaches p (within TOP_P_TOL); set the rest to -inf.

    Always keeps at least the most probable token (so a tiny p keeps exactly the argmax); p >= 1
    (or None) keeps every token. Ties: if the probability of the last token needed is shared by
    other tokens, they are all kept (the same rule as top_k_filter)."""
    if p is None or p >= 1:
        return logits
    probs = logits.double().softmax(-1)
    sorted_p = probs.sort(-1, descending=True).values
    before = F.pad(sorted_p.cumsum(-1)[..., :-1], (1, 0))      # mass of the tokens ranked above
    keep = before < p - TOP_P_TOL
    keep[..., 0] = True
    threshold = sorted_p.masked_fill(~keep, float("inf")).amin(-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def pick(logits, temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None):
    """Next token for each row of logits (B, V): argmax if greedy (or temperature 0), else sample
    from softmax(logits / temperature) after top-k, then top-p filtering."""
    if greedy or temperature == 0:
        return logits.argmax(-1)
    logits = top_p_filter(top_k_filter(logits.float() / temperature, top_k), top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------- decoding

def label_prediction(logits, vocab):
    """Logits (V,) at a <CLS> position -> (class, probability, probabilities over the labels)."""
    probs = logits[vocab.label_offset:vocab.label_offset + vocab.num_classes].float().softmax(-1).cpu()
    c = int(probs.argmax())
    return c, probs[c].item(), probs.tolist()


@torch.no_grad()
def generate(model, prompts, vocab, max_new_tokens, temperature=1.0, top_k=None, top_p=None, greedy=False,
             generator=None, batch_size=64, record_logits=False, progress=False):
    """Continue each prompt (a list of token ids) with incremental decoding through the KV cache.

    Prompts of equal length are decoded together (the cache has no padding mask, so rows of a batch
    must stay aligned); results come back in the order of `prompts`. A row stops after <EOS>, after
    max_new_tokens, or when the block size is full; finished rows are fed <PAD> until the batch ends,
    and their outputs are ignored. Returns one dict per prompt:
        ids       prompt + generated tokens
        new       number of generated tokens
        stop      'eos', 'max_new_tokens' or 'block_size'
        pred, prob, label_probs   the class prediction from the logits where <CLS> was fed (prompt or
                  generated; the first <CLS>), or None when no <CLS> was fed
        logits    (new, V) the raw logits each new token was chosen from (only with record_logits)
    """
    device = next(model.parameters()).device
    block = model.config.block_size
    results = [None] * len(prompts)
    groups = {}
    for i, p in enumerate(prompts):
        if not p:
            raise UserError("a prompt is empty; it needs at least one token (e.g. <IMG>)")
        if len(p) > block:
            raise UserError(f"a prompt has {len(p)} tokens, more than the model's block size {block}")
        groups.setdefault(len(p), []).append(i)
    was_training = model.training
    model.eval()
    for L, rows in sorted(groups.items()):
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            out = _generate_aligned(model, [prompts[i] for i in chunk], vocab, min(max_new_tokens, block - L),
                                    max_new_tokens, temperature, top_k, top_p, greedy, generator,
                                    record_logits, progress, device)
            for i, r in zip(chunk, out):
                results[i] = r
    model.train(was_training)
    return results


def _generate_aligned(model, prompts, vocab, steps, max_new_tokens, temperature, top_k, top_p, greedy,
                      generator, record_logits, progress, device):
    B, L = len(prompts), len(prompts[0])
    cache = model.new_cache(B, max(L + steps - 1, L))   # the last sampled token is never fed
    logits, _ = model(torch.tensor(prompts, device=device), cache=cache)   # prefill: (B, L, V)
    cls_logits = [None] * B
    for b, p in enumerate(prompts):
        if vocab.cls_id in p:
            cls_logits[b] = logits[b, p.index(vocab.cls_id)]
    last = logits[:, -1]
    new = [[] for _ in range(B)]
    rec = [[] for _ in range(B)]
    done = [p[-1] == vocab.eos_id for p in prompts]
    stop = ["eos" if d else None for d in done]
    for step in tqdm(range(steps), desc="sampling", leave=False, disable=not progress):
        if all(done):
            break
        tok = pick(last, temperature, top_k, top_p, greedy, generator).tolist()   # one transfer per step
        for b in range(B):
            if done[b]:
                tok[b] = vocab.pad_id
                continue
            if record_logits:
                rec[b].append(last[b].float().cpu())
            new[b].append(tok[b])
            if tok[b] == vocab.eos_id:
                done[b], stop[b] = True, "eos"
        if all(done) or step == steps - 1:
            break
        logits, _ = model(torch.tensor(tok, device=device)[:, None], cache=cache)
        last = logits[:, -1]
        for b in range(B):
            if tok[b] == vocab.cls_id and cls_logits[b] is None:
                cls_logits[b] = last[b]
    results = []
    for b in range(B):
        r = {"ids": prompts[b] + new[b], "new": len(new[b]),
             "stop": stop[b] or ("max_new_tokens" if len(new[b]) >= max_new_tokens else "block_size"),
             "pred": None, "prob": None, "label_probs": None}
        if cls_logits[b] is not None:
            r["pred"], r["prob"], r["label_probs"] = label_prediction(cls_logits[b], vocab)
        if record_logits:
            r["logits"] = torch.stack(rec[b]) if rec[b] else torch.zeros(0, len(vocab))
        results.append(r)
    return results


def well_formed(ids, vocab, seq_len):
    """Is this a complete v2 sequence: <IMG>, seq_len codes, </IMG> <CLS> <CLS_y> <EOS>?"""
    return (len(ids) == seq_len + 5 and ids[0] == vocab.img_id and all(vocab.is_code(i) for i in ids[1:-4])
            and ids[-4] == vocab.img_end_id and ids[-3] == vocab.cls_id and ids[-1] == vocab.eos_id
            and vocab.label_offset <= ids[-2] < vocab.label_offset + vocab.num_classes)


def n_codes(ids, vocab):
    """Code tokens of the image part (before the first </IMG>)."""
    end = ids.index(vocab.img_end_id) if vocab.img_end_id in ids else len(ids)
    return sum(vocab.is_code(i) for i in ids[:end])


def record(r, vocab, seq_len, **meta):
    """A generated row -> a JSONL record. 'label' is the label token the model wrote (well-formed
    sequences only, so they can be read back as data); 'pred'/'prob' its prediction at <CLS>."""
    ok = well_formed(r["ids"], vocab, seq_len)
    return {"tokens": vocab.decode(r["ids"]), "label": r["ids"][-2] - vocab.label_offset if ok else None,
            "pred": r["pred"], "prob": r["prob"], "well_formed": ok, "stop": r["stop"],
            "codes": n_codes(r["ids"], vocab), "meta": meta}


# ----------------------------------------------------------------------------- command line

def grid_scale(width):
    return max(3, -(-84 // width))  # cells at least 84 pixels wide so that captions fit


def write_jsonl(path, recs):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in recs:
                f.write(json.dumps(rec) + "\n")


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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", default="runs/demo/best", help="checkpoint folder (default: %(default)s)")
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
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    return ap


def check_args(a):
    if a.num_samples < 1:
        raise UserError(f"--num_samples must be at least 1, got {a.num_samples}")
    if a.max_new_tokens is not None and a.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be at least 1, got {a.max_new_tokens}")
    if not a.temperature >= 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {a.temperature}")
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


def describe(i, r, names, vocab, seq_len):
    ok = well_formed(r["ids"], vocab, seq_len)
    codes = n_codes(r["ids"], vocab)
    pred = f"predicted {names[r['pred']]} (p={r['prob']:.3f})" if r["pred"] is not None else "no <CLS>, no prediction"
    return f"sample {i}: {pred}; {codes} codes, {'complete image' if ok else 'not a complete image'}, stop: {r['stop']}"


def main(argv=None):
    import checkpoint
    from data import read_sequences, save_grid
    from eval import check_out, class_names, parse_tokens, pick_device, val_file
    a = build_parser().parse_args(argv)
    check_args(a)
    out_png = a.out_png or os.path.join(a.ckpt, "completions.png" if a.complete else "samples.png")
    check_out(out_png, "PNG grid")
    if a.out_jsonl:
        check_out(a.out_jsonl, "JSONL file")
    model, info = checkpoint.load(a.ckpt, pick_device(a.device))
    vocab, book = info["vocab"], info["codebook"]
    names = class_names(info)
    seq_len, block = book.seq_len, model.config.block_size
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(a.seed)
    opts = dict(temperature=a.temperature, top_k=a.top_k or None, top_p=a.top_p, greedy=a.greedy,
                generator=gen, batch_size=a.batch_size, progress=True)
    max_new = a.max_new_tokens or block
    settings = {"seed": a.seed, "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "greedy": a.greedy}

    if a.complete is None:
        prompt = parse_tokens(a.start, vocab, "--start")
        if len(prompt) >= block:
            raise UserError(f"--start has {len(prompt)} tokens; the model's block size {block} leaves no room to generate")
        res = generate(model, [prompt] * a.num_samples, vocab, max_new, **opts)
        recs = [record(r, vocab, seq_len, index=i, start=a.start, **settings) for i, r in enumerate(res)]
        images = torch.stack([book.decode_ids(r["ids"], vocab) for r in res])
        caps = [f"{names[r['pred']]} {100 * r['prob']:.0f}%" if r["pred"] is not None else "-" for r in res]
        size = save_grid(images, caps, out_png, scale=grid_scale(book.image_size[1]))
        lines = [describe(i, r, names, vocab, seq_len) for i, r in enumerate(res)]
    else:
        path = a.data or val_file(info)
        seqs, labels = read_sequences(path, vocab, repair_v1=a.repair_v1)
        chosen = pick_examples(labels, a.complete, vocab.num_classes, a.seed)
        if len(chosen) < a.complete:
            print(f"note: {path} has only {len(chosen)} sequences")
        prompts = []
        for i in chosen:
            codes = seqs[i][1:-4]
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
            caps += [f"true {names[y]}", f"kept {len(p) - 1}/{len(seqs[i]) - 5}", f"pred {pred}"]
            lines.append(f"{path}#{i + 1} (true {names[y]}, kept {len(p) - 1}/{len(seqs[i]) - 5} codes): "
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
