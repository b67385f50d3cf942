"""Evaluate a checkpoint: loss, perplexity, next-token and classification accuracy.

    python eval.py                       # best checkpoint of the default run, on its validation split
"""
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F


@torch.no_grad()
def evaluate(model, x, y, cls_pos, vocab, batch_size=64, ctx=nullcontext(), topk=(1, 2, 3)):
    """Metrics over all real (non -100) next tokens, split into image tokens and the label token.

    x, y (N, T): inputs and next-token targets; cls_pos (N,): index of <CLS> in each row.
    Classification takes the logits at <CLS> and picks the largest among the label tokens only.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    C, lo = vocab.num_classes, vocab.label_offset
    s = dict(all_loss=0.0, all_n=0, all_hit=0, img_loss=0.0, img_n=0, img_hit=0,
             lab_loss=0.0, lab_hit=0)
    conf = torch.zeros(C, C, dtype=torch.long)
    topk_hit = {k: 0 for k in topk if k <= C}
    probs_all, pred_all = [], []
    for i in range(0, len(x), batch_size):
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
        probs = logits[rows, cb, lo:lo + C].softmax(-1).cpu()  # (B, C) over the label tokens only
        pred = probs.argmax(-1)
        conf.index_put_((truth, pred), torch.ones_like(pred), accumulate=True)
        ranked = probs.argsort(-1, descending=True)
        for k in topk_hit:
            topk_hit[k] += (ranked[:, :k] == truth[:, None]).any(1).sum().item()
        probs_all.append(probs)
        pred_all.append(pred)
    model.train(was_training)
    n = len(x)
    per_class = (conf.diag() / conf.sum(1).clamp_min(1)).tolist()
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
        "accuracy": conf.diag().sum().item() / max(n, 1),    # argmax over the label tokens only
        "topk_accuracy": {str(k): v / max(n, 1) for k, v in topk_hit.items()},
        "per_class_accuracy": per_class,
        "confusion": conf.tolist(),                          # rows: true class, columns: predicted
        "_probs": torch.cat(probs_all) if probs_all else torch.zeros(0, C),
        "_pred": torch.cat(pred_all) if pred_all else torch.zeros(0, dtype=torch.long),
    }


def public(metrics):
    """Drop the tensors (keys starting with _) so the metrics can be written as JSON."""
    return {k: v for k, v in metrics.items() if not k.startswith("_")}
