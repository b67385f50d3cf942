"""What sample.py draws, as a sheet: free sampling from a prompt, drawings of chosen classes (one class, or a
grid with a row per class), and completions of real images; each gives the drawn rows as JSONL records,
the cells and captions of a PNG grid and the lines to print. Every drawing goes through imagegpt.drawing.

    sheet = free(ck, settings, "<IMG>", 16)            # or classes(ck, settings, asked), complete(...)
    save_grid(torch.stack(sheet.cells), sheet.captions, path, ncol=sheet.ncol, scale=grid_scale(ck))
"""
import random
from dataclasses import dataclass, field

from imagegpt import drawing
from imagegpt.device import check_memory
from imagegpt.errors import UserError
from imagegpt.sequences import read_sequences
from imagegpt.token_format import TAIL


@dataclass
class Sheet:
    """The drawings of one call: a JSONL record each, the grid's cells and captions (ncol: its columns,
    None: square), and the lines to print (notes first; then one per record, then the summaries)."""
    records: list
    cells: list
    captions: list
    ncol: int
    lines: list
    notes: list = field(default_factory=list)


def record(ck, r, **meta):
    """A generated row -> a JSONL record. 'label' is the class the row states or the label token it
    wrote (complete images only, so they can be read back as data); 'pred'/'prob' the model's reading."""
    label, complete = drawing.outcome(ck, r["ids"])
    return {"tokens": ck.vocab.decode(r["ids"]), "label": label,
            "pred": r["pred"], "prob": r["prob"], "well_formed": complete, "stop": r["stop"],
            "codes": len(ck.vocab.image_codes(r["ids"])), "meta": meta}


def describe(ck, i, r):
    """One printed line of a drawn row: the model's reading, its codes, whether it is complete, why it stopped."""
    names = ck.class_names
    complete = drawing.outcome(ck, r["ids"])[1]
    codes = len(ck.vocab.image_codes(r["ids"]))
    pred = f"predicted {names[r['pred']]} (p={r['prob']:.3f})" if r["pred"] is not None else "no <CLS>, no prediction"
    return f"sample {i}: {pred}; {codes} codes, {'complete image' if complete else 'not a complete image'}, stop: {r['stop']}"


def grid_scale(ck):
    """How much the grid enlarges each image: cells at least 84 pixels wide so that captions fit."""
    return max(3, -(-84 // ck.codebook.image_size[1]))


def check_sizes(ck, settings, n):
    """Refuse, before drawing, what could not fit in memory: the key/value cache and logits of one batch,
    and every row's tokens, decoded image and cell of the PNG grid (n rows)."""
    c, book = ck.model.config, ck.codebook
    rows = min(settings.batch_size, n)
    batch = 4 * rows * c.block_size * (2 * c.n_layer * c.n_embd + len(ck.vocab))
    C, (H, W), s = book.channels, book.image_size, grid_scale(ck)
    per_row = 4 * C * H * W + 3 * (H * s + 16) * (W * s + 4) + 40 * c.block_size
    check_memory(batch + n * per_row, f"{n} rows of up to {c.block_size} tokens, decoded into a PNG grid "
                 f"({rows} at a time)", ck.model.device, hint="lower --num_samples or --batch_size")


def block_note(ck):
    """A note when the model's block is too short for a complete image (else None)."""
    block, seq_len = ck.model.config.block_size, ck.codebook.seq_len
    if block < seq_len + 1 + TAIL:
        return (f"note: the model's block size {block} is shorter than a complete image ({seq_len + 1 + TAIL} "
                f"tokens: it was trained on cut images), so no row can be a complete image")
    return None


def free(ck, settings, start, n):
    """n rows sampled from the prompt `start` (tokens, e.g. '<IMG>')."""
    prompt = ck.vocab.parse(start, "--start")
    if len(prompt) >= ck.model.config.block_size:
        raise UserError(f"--start has {len(prompt)} tokens; the model's block size {ck.model.config.block_size} "
                        f"leaves no room to generate")
    res = drawing.draw(ck, [prompt] * n, settings, progress=True)
    names = ck.class_names
    recs = [record(ck, r, index=i, start=start, **settings.meta(False)) for i, r in enumerate(res)]
    cells = [ck.codebook.decode_ids(r["ids"], ck.vocab) for r in res]
    captions = [f"{names[r['pred']]} {100 * r['prob']:.0f}%" if r["pred"] is not None else "-" for r in res]
    return Sheet(recs, cells, captions, None, [describe(ck, i, r) for i, r in enumerate(res)])


def classes(ck, settings, asked, ncol=None):
    """A drawing of each class index in `asked` (ncol: the grid's columns, e.g. one row per class)."""
    vocab, names = ck.vocab, ck.class_names
    res = drawing.draw(ck, [drawing.prompt(vocab, c) for c in asked], settings, progress=True)
    recs = [record(ck, r, index=i, asked=names[c], **settings.meta(True)) for i, (c, r) in enumerate(zip(asked, res))]
    cells = [ck.codebook.decode_ids(r["ids"], vocab) for r in res]
    captions = [f"{names[c]}: reads {names[r['pred']]}" for c, r in zip(asked, res)]
    lines = [f"asked {names[c]}, " + describe(ck, i, r).replace("predicted", "the model reads", 1)
             for i, (c, r) in enumerate(zip(asked, res))]
    hits = sum(r["pred"] == c for c, r in zip(asked, res))
    lines.append(f"the model's own classifier reads the asked class in {hits}/{len(res)} drawings "
                 f"(guidance {settings.guidance})")
    return Sheet(recs, cells, captions, ncol, lines)


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


def complete(ck, settings, path, n, fraction, label=None, repair_v1=False):
    """The first `fraction` of n images of the sequence file `path` (picked round-robin over the classes with
    settings.seed), finished by the model (as the class `label`, if given); each shown as the real image,
    the kept part and the completion."""
    vocab = ck.vocab
    seqs, labels = read_sequences(path, vocab, repair_v1=repair_v1)
    chosen = pick_examples(labels, n, vocab.num_classes, settings.seed)
    notes = [f"note: {path} has only {len(chosen)} sequences"] if len(chosen) < n else []
    prompts = [drawing.prompt(vocab, label, drawing.kept(vocab, seqs[i][1:-TAIL], fraction)) for i in chosen]
    if max(len(p) for p in prompts) >= ck.model.config.block_size:
        raise UserError(f"the kept part of the images fills the model's block size {ck.model.config.block_size}; "
                        f"lower --fraction")
    res = drawing.draw(ck, prompts, settings, progress=True)
    sheet = Sheet([], [], [], 3 * (2 if len(chosen) > 1 else 1), [], notes)
    hits = 0
    for k, (i, p, r) in enumerate(zip(chosen, prompts, res)):
        hits += r["pred"] == (labels[i] if label is None else label)
        add_completion(ck, sheet, (k, f"{path}#{i + 1}", seqs[i], labels[i]), p, r, label, settings)
    names = ck.class_names
    sheet.lines.append(f"the prediction at <CLS> after completion matches the true label for {hits}/{len(chosen)} "
                       f"images" if label is None else f"the model's own classifier reads {names[label]} in "
                       f"{hits}/{len(chosen)} completions (guidance {settings.guidance})")
    return sheet


def add_completion(ck, sheet, real, prompt, r, label, settings):
    """One completion on the sheet: its record, three cells (real, kept, completed) and its line.
    real: (index, source, its sequence, its label)."""
    vocab, names, book = ck.vocab, ck.class_names, ck.codebook
    k, source, seq, true = real
    kept, total = len(vocab.image_codes(prompt)), len(seq) - 1 - TAIL
    sheet.records.append(record(ck, r, index=k, source=source, true_label=true, kept_codes=kept,
                                **settings.meta(label is not None)))
    sheet.cells += [book.decode_ids(seq, vocab), book.decode_ids(prompt, vocab), book.decode_ids(r["ids"], vocab)]
    pred = f"{names[r['pred']]} {100 * r['prob']:.0f}%" if r["pred"] is not None else "-"
    sheet.captions += [f"true {names[true]}", f"kept {kept}/{total}",
                       f"pred {pred}" if label is None else f"as {names[label]}: {pred}"]
    sheet.lines.append(f"{source} (true {names[true]}, kept {kept}/{total} codes"
                       f"{'' if label is None else ', asked ' + names[label]}): " + describe(ck, k, r).split(": ", 1)[1])
