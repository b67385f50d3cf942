"""Token sequences as data: reading a JSONL sequence file (every record validated, errors name the
file and line) and turning id lists into next-token inputs and targets."""
import json

import torch

from imagegpt.errors import UserError
from imagegpt.token_format import V1_HINT, cls_index, has_label_tail, truncate


def read_sequences(path, vocab, repair_v1=False, v1_hint=V1_HINT):
    """Read and validate a JSONL sequence file -> (list of id lists, list of labels).
    Stops at the first bad record with `file:line: what is wrong`. v1_hint: what the message about a
    v1 tail tells the user to do (commands without --repair_v1 say something else)."""
    seqs, labels = [], []
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        for n, raw in enumerate(f, 1):
            where = f"{path}:{n}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{where}: not UTF-8 text") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg}); expected "
                                f'{{"tokens": "...", "label": N, "meta": {{...}}}}') from None
            ids, label = vocab.check_record(rec, where, repair_v1, v1_hint)
            seqs.append(ids)
            labels.append(label)
    if not seqs:
        raise UserError(f"{path}: no records (the file is empty)")
    return seqs, labels


def make_batch(seqs, max_length, pad_id=0, width=None):
    """List of id lists -> x (B, T), y (B, T) with y[:, t] = the token after x[:, t] (the one and
    only shift), padding labelled -100, and cls_pos (B,): the index of <CLS> in each row (-1 for a
    class-conditioned sequence, which has no <CLS>). T = width - 1 (a batch of a split padded as the
    whole split would be), by default the longest sequence after truncation to max_length, less one."""
    seqs = [truncate(s, max_length) for s in seqs]
    T = (width or max(len(s) for s in seqs)) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        t = torch.tensor(s)
        x[i, :len(s) - 1] = t[:-1]
        y[i, :len(s) - 1] = t[1:]
    cls_pos = torch.tensor([cls_index(len(s)) if has_label_tail(s) else -1 for s in seqs])
    return x, y, cls_pos
