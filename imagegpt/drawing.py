"""Drawing: images the model writes, asked for a class or not, from nothing or from the start of an
image, and what the model itself reads in each. sample.py, the service and the drawing report all
draw through here; none of them builds prompts or reads a drawing on its own.

A drawing starts from its prompt:
    '<CLS_y> <IMG> codes...'   draw class y (a model trained with class-conditioned sequences)
    '<IMG> codes...'           draw anything (the model writes the label at the end)
where the codes, if any, are the kept start of an image to complete. Classifier-free guidance
(scale s != 1) decodes beside each prompt that states a class the same prompt with the class unstated
('<UNK> <IMG> codes...') and samples from uncond + s * (cond - uncond). Decoding is held to the token
format (Vocab.format_mask: codes until the image is whole, then its tail), so every drawing is a
complete image. Its caption is the model's own reading of it: for a drawing that states its class,
the classifier's prediction at '<IMG> codes </IMG> <CLS>' (where no class is stated); for the others
the prediction at the <CLS> they wrote.
"""
from imagegpt.decoding import generate
from imagegpt.metrics import class_probs
from imagegpt.token_format import COLOUR_TOKENS


def prompt(vocab, label=None, kept=()):
    """The prompt of one drawing: '<CLS_label> <IMG>' (label None: '<IMG>'), then `kept`: the code tokens
    (ids) of an image's start, to complete it."""
    return ([vocab.img_id] if label is None else vocab.cond_prompt(label)) + list(kept)


def kept(vocab, codes, fraction):
    """The start of an image that a completion keeps, of its code tokens `codes`: the first `fraction`
    of them (rounded half to even; at least one for a fraction above 0); with a palette, its colours and
    the first `fraction` of its patterns."""
    head = COLOUR_TOKENS if vocab.palette else 0
    n = round(fraction * (len(codes) - head))
    return codes[:head + (max(1, n) if fraction > 0 else n)]


def unconditional(vocab, prompts):
    """The guidance prompts: each prompt that states a class with the class unstated ('<UNK>'), the
    others as they are (guidance then leaves them unchanged)."""
    return [[vocab.unk_id] + p[1:] if vocab.is_conditioned(p) else p for p in prompts]


def draw(ck, prompts, settings, progress=False):
    """Continue each prompt (an id list) with the checkpoint's model into a complete image in the token
    format, drawn as `settings` (DrawSettings) say, with guidance for the prompts that state a class, and
    caption each result with the model's own reading -> generate()'s result dicts (ids, new, stop, pred,
    prob, ...), pred and prob filled for every complete drawing."""
    uncond = None if settings.guidance == 1 else unconditional(ck.vocab, prompts)
    rows = generate(ck, prompts, settings, uncond=uncond, image_len=ck.codebook.seq_len, progress=progress)
    read(ck, rows, settings.batch_size)
    return rows


def read(ck, rows, batch_size=64):
    """Fill pred and prob of the rows that state their class (which hold no <CLS> of their own) with the
    model's classifier on '<IMG> codes </IMG> <CLS>'."""
    vocab = ck.vocab
    stated = [r for r in rows if vocab.is_conditioned(r["ids"])]
    if stated:
        prefixes = [vocab.prefix_ids(vocab.image_codes(r["ids"])) for r in stated]
        for r, p in zip(stated, class_probs(ck, prefixes, batch_size)):
            r["pred"], r["prob"] = int(p.argmax()), p.max().item()


def outcome(ck, ids):
    """What a sequence drawn by the checkpoint's model is -> (its label: the class it states, or the label
    token it wrote; None unless it is a complete image; whether it is a complete image)."""
    vocab, seq_len = ck.vocab, ck.codebook.seq_len
    if vocab.is_conditioned(ids):
        complete = vocab.is_cond_complete(ids, seq_len)
        stated = vocab.is_label(ids[0])
        return (ids[0] - vocab.label_offset if complete and stated else None), complete
    complete = vocab.is_complete(ids, seq_len)
    return (ids[-2] - vocab.label_offset if complete else None), complete
