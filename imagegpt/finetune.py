"""The start of a run from a trained checkpoint (init_from): its model, checked to read the data's codes, and
with its label tokens rebuilt where the data's classes differ (a fine-tune onto other classes)."""
from dataclasses import replace

import torch

from imagegpt import checkpoint
from imagegpt.errors import UserError
from model import GPT


def build_model(cfg, data, log):
    """The model to train: cfg.model's shape over the data's vocabulary with data.block positions, or
    the checkpoint cfg.init_from, which must read the data's codes: its codebook must be the one that
    tokenised the data (the same sha256). Its classes may differ from the data's (fine_tuned)."""
    if not cfg.init_from:
        return GPT(replace(cfg.model, vocab_size=len(data.vocab), block_size=data.block))
    ck = checkpoint.load(cfg.init_from)
    if ck.codebook.sha256 != data.book.sha256:
        raise UserError(f"{cfg.init_from}: its codebook is not the one that tokenised {cfg.data.data_dir} (its codes "
                        f"would mean other patches); tokenise the images with it: add --codebook_from {cfg.init_from} "
                        f"and a new --data_dir (python data.py prepare --codebook_from ... alone does the same)")
    if ck.model.config.block_size < data.block:
        raise UserError(f"{cfg.init_from}: block size {ck.model.config.block_size} < max_length {data.block}")
    if ck.vocab.to_dict() == data.vocab.to_dict() and ck.class_names == data.class_names:
        log(f"starting from {cfg.init_from}")
        return ck.model.train()
    log(f"starting from {cfg.init_from}, its {ck.vocab.num_classes} classes replaced by the data's "
        f"{len(data.class_names)} ({relabel_note(ck.class_names, data.class_names)})")
    return fine_tuned(ck, data.vocab, data.class_names, cfg.seed).train()


def fine_tuned(ck, vocab, names, seed):
    """The checkpoint's GPT over a vocabulary with other classes (the same codes): every weight kept but
    the label tokens' embeddings (also the output rows, tied), which are rebuilt for `names`. A class the
    checkpoint also has (by name) keeps its row; a new class starts at the mean of the checkpoint's label
    rows plus N(0, 0.02^2) noise (seeded), so that it begins where labels live and the classes differ."""
    old = ck.model.transformer.wte.weight.detach()
    model = GPT(replace(ck.model.config, vocab_size=len(vocab)))
    state = {k: v for k, v in ck.model.state_dict().items() if not k.endswith(("wte.weight", "lm_head.weight"))}
    model.load_state_dict(state, strict=False)
    labels = old[ck.vocab.label_offset:ck.vocab.label_offset + ck.vocab.num_classes]
    g = torch.Generator().manual_seed(seed)
    rows = [labels[ck.class_names.index(n)] if n in ck.class_names else
            labels.mean(0) + 0.02 * torch.randn(labels.shape[1], generator=g) for n in names]
    with torch.no_grad():
        model.transformer.wte.weight.copy_(torch.cat([old[:vocab.label_offset], torch.stack(rows)]))
    return model


def relabel_note(old, new):
    kept = [n for n in new if n in old]
    return f"{len(kept)} kept by name, {len(new) - len(kept)} new" if kept else "all new"
