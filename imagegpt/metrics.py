"""Measuring a model on token sequences: loss, perplexity and next-token accuracy over real tokens
(image tokens and the label token apart), classification accuracy (overall, per class, top-k,
confusion matrix), class probabilities for classification prefixes, and the most likely next tokens."""
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from tqdm import tqdm

from imagegpt.augment import tta_views
from imagegpt.errors import UserError
from imagegpt.files import json_type
from imagegpt.token_format import fit_prefix

NUMBERS = ("loss", "perplexity", "token_accuracy", "image_loss", "image_perplexity", "image_token_accuracy",
           "label_loss", "label_perplexity", "label_token_accuracy", "accuracy")


@torch.no_grad()
def evaluate(ck, data, batch_size=64, ctx=nullcontext(), topk=(1, 2, 3), progress=False):
    """Metrics of the checkpoint's model (ck.model, ck.vocab) over all real (non -100) next tokens of
    `data`, split into image tokens and the label token.

    data: (x, y, cls_pos): x, y (N, T) inputs and next-token targets; cls_pos (N,) the index of <CLS> in
    each row (sequences.make_batch). Classification takes the logits at <CLS> and picks the largest among
    the label tokens only.
    """
    model, vocab = ck.model, ck.vocab
    x, y, cls_pos = data
    was_training = model.training
    model.eval()
    device = model.device
    C, lo = vocab.num_classes, vocab.label_offset
    s = dict(all_loss=0.0, all_n=0, all_hit=0, img_loss=0.0, img_n=0, img_hit=0,
             lab_loss=0.0, lab_hit=0)
    conf = torch.zeros(C, C, dtype=torch.long)
    topk_hit = {k: 0 for k in topk if k <= C}
    for i in tqdm(range(0, len(x), batch_size), desc="evaluating", leave=False, disable=not progress):
        xb, yb, cb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device), cls_pos[i:i + batch_size].to(device)
        with ctx:
            logits, _ = model(xb)
        logits = logits.float()
        ce = F.cross_entropy(logits.transpose(1, 2), yb, ignore_index=-100, reduction="none")  # (B, T)
        real = yb != -100
        hit = (logits.argmax(-1) == yb) & real
        img = real & (yb >= vocab.code_offset) & (yb < lo)
        s["all_loss"] += ce[real].sum().item()
        s["all_n"] += real.sum().item()
        s["all_hit"] += hit.sum().item()
        s["img_loss"] += ce[img].sum().item()
        s["img_n"] += img.sum().item()
        s["img_hit"] += hit[img].sum().item()
        rows = torch.arange(len(xb), device=device)
        s["lab_loss"] += ce[rows, cb].sum().item()
        s["lab_hit"] += hit[rows, cb].sum().item()
        truth = (yb[rows, cb] - lo).cpu()
        probs = vocab.label_probs(logits[rows, cb]).cpu()  # (B, C) over the label tokens only
        pred = probs.argmax(-1)
        conf += confusion(truth, pred, C)
        ranked = probs.argsort(-1, descending=True)
        for k in topk_hit:
            topk_hit[k] += (ranked[:, :k] == truth[:, None]).any(1).sum().item()
    model.train(was_training)
    n = len(x)
    ppl = lambda loss, cnt: math.exp(loss / max(cnt, 1))
    return {
        "n_sequences": n,
        "loss": s["all_loss"] / max(s["all_n"], 1),
        "perplexity": ppl(s["all_loss"], s["all_n"]),
        "token_accuracy": s["all_hit"] / max(s["all_n"], 1),
        "image_loss": s["img_loss"] / max(s["img_n"], 1),
        "image_perplexity": ppl(s["img_loss"], s["img_n"]),
        "image_token_accuracy": s["img_hit"] / max(s["img_n"], 1),
        "label_loss": s["lab_loss"] / max(n, 1),
        "label_perplexity": ppl(s["lab_loss"], n),
        "label_token_accuracy": s["lab_hit"] / max(n, 1),   # argmax over the whole vocabulary
        "topk_accuracy": {str(k): v / max(n, 1) for k, v in topk_hit.items()},
        **confusion_summary(conf),                           # argmax over the label tokens only
    }


def confusion(truth, pred, num_classes):
    """The confusion matrix (C, C) long of true and predicted classes (rows: true class, columns: predicted)."""
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    return conf.index_put_((torch.as_tensor(truth), torch.as_tensor(pred)), torch.ones(len(pred), dtype=torch.long),
                           accumulate=True)


def confusion_summary(conf):
    """A confusion matrix (C, C) long (rows: true class, columns: predicted) -> accuracy, per-class
    accuracy and the matrix as lists."""
    return {"accuracy": conf.diag().sum().item() / max(conf.sum().item(), 1),
            "per_class_accuracy": (conf.diag().double() / conf.sum(1).clamp_min(1)).tolist(),
            "confusion": conf.tolist()}


def check_metrics(m, where):
    """metrics.json as read from disk -> the same dict, if it has the structure evaluate() writes
    (keys it lacks are fine; a key of the wrong JSON type is a UserError naming it)."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    def bad(key, v, want):
        raise UserError(f"{where}: {key} is {json_type(v)} ({str(v)[:40]}), expected {want}")

    if not isinstance(m, dict):
        raise UserError(f"{where}: the file is {json_type(m)}, expected a JSON object of metrics")
    for k in NUMBERS:
        if k in m and not number(m[k]):
            bad(k, m[k], "a number")
    if "n_sequences" in m and not (isinstance(m["n_sequences"], int) and not isinstance(m["n_sequences"], bool)):
        bad("n_sequences", m["n_sequences"], "an integer")
    top = m.get("topk_accuracy", {})
    if not isinstance(top, dict) or not all(number(v) for v in top.values()):
        bad("topk_accuracy", top, "an object of numbers")
    per = m.get("per_class_accuracy", [])
    if not isinstance(per, list) or not all(number(v) for v in per):
        bad("per_class_accuracy", per, "a list of numbers")
    conf = m.get("confusion", [])
    if not isinstance(conf, list) or not all(isinstance(r, list) and all(number(v) for v in r) for r in conf):
        bad("confusion", conf, "a list of lists of numbers")
    return m


@torch.no_grad()
def class_probs(ck, prefixes, batch_size=64, progress=False):
    """The checkpoint's classifier (ck.model, ck.vocab): prefixes ending in <CLS> (any lengths) -> (N, C)
    probabilities over the label tokens only,
    from the logits at <CLS> (what evaluate() scores). A batch's prefixes are padded on the right to the
    longest; the model computes the last block and the output layer at each row's <CLS> alone
    (GPT.forward's logits_at), which is what the rest of the positions would only have been thrown away for."""
    model, vocab = ck.model, ck.vocab
    device = model.device
    block = model.config.block_size
    prefixes = [fit_prefix(p, block) for p in prefixes]
    C = vocab.num_classes
    out = []
    for i in tqdm(range(0, len(prefixes), batch_size), desc="classifying", leave=False, disable=not progress):
        chunk = prefixes[i:i + batch_size]
        T = max(len(p) for p in chunk)
        x = torch.full((len(chunk), T), vocab.pad_id, dtype=torch.long)
        for j, p in enumerate(chunk):
            x[j, :len(p)] = torch.tensor(p)
        last = torch.tensor([len(p) - 1 for p in chunk], device=device)
        logits, _ = model(x.to(device), logits_at=last)      # (B, 1, V): the logits at <CLS> alone
        out.append(vocab.label_probs(logits[:, 0]).cpu())
    return torch.cat(out) if out else torch.zeros(0, C)


def augmented_class_probs(ck, images, copies, jitter, batch_size=64, progress=False):
    """Test-time augmentation: float images (N, C, H, W) -> (N, C) class probabilities, the normalised
    geometric mean of class_probs over the images and `copies` versions of each moved within the limits
    of `jitter` (augment.tta_views, tokenised with the checkpoint's codebook). copies 0: class_probs of the
    images alone."""
    logp = 0
    views = tta_views(images, copies, jitter)
    for x in tqdm(views, total=copies + 1, desc="test-time views", leave=False, disable=not progress):
        prefixes = [ck.vocab.prefix_ids(row) for row in ck.codebook.encode(x).tolist()]
        logp = logp + class_probs(ck, prefixes, batch_size).double().clamp_min(1e-30).log()
    return (logp / (copies + 1)).softmax(-1).float()


@torch.no_grad()
def next_tokens(ck, ids, k=5):
    """Top-k next tokens after a prompt: [(token, id, probability)], from the full-vocabulary softmax of
    the checkpoint's model."""
    model, vocab = ck.model, ck.vocab
    if len(ids) > model.config.block_size:
        raise UserError(f"prompt has {len(ids)} tokens, the model's block size is {model.config.block_size}")
    logits, _ = model(torch.tensor([ids], device=model.device))
    probs = logits[0, -1].float().softmax(-1).cpu()
    p, i = probs.topk(min(k, len(probs)))
    return [(vocab.tokens[j], j, q) for j, q in zip(i.tolist(), p.tolist())]
