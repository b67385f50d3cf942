"""How a run moves its weights: AdamW over the model's two parameter groups (model.param_groups), the
learning rate of each step (linear warmup, then cosine decay) and the moving average of the weights."""
import math
from contextlib import contextmanager

import torch


def make_optimizer(model, cfg, procs):
    """AdamW with the run's settings (weight decay on matrices and embeddings only; fused on CUDA)."""
    return model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), "cuda" if procs.cuda else "cpu")


def get_lr(step, total, cfg):
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    ratio = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(ratio, 1.0))) * (cfg.lr - cfg.min_lr)


class WeightAverage:
    """The exponential moving average of a model's parameters (cfg.ema > 0). After optimizer step t
    (1, 2, ...): avg += (1 - d) (w - avg) with d = min(decay, (1 + t) / (10 + t)), so that the first,
    random weights fade out quickly. The average lives beside the model; applied() puts it in the model
    for an evaluation or a save and then restores the trained weights, bit for bit."""

    def __init__(self, model, decay):
        self.decay = decay
        self.start_from(model)

    def start_from(self, model):
        self.avg = [p.detach().clone() for p in model.parameters()]

    @torch.no_grad()
    def update(self, model, step):
        d = min(self.decay, (1 + step) / (10 + step))
        for a, p in zip(self.avg, model.parameters()):
            a.lerp_(p, 1 - d)

    @contextmanager
    def applied(self, model):
        """Inside: the model holds the average; yields {name: a copy of the trained parameter}, which
        the trainer state keeps."""
        named = list(model.named_parameters())
        trained = {n: p.detach().clone() for n, p in named}
        with torch.no_grad():
            for (_, p), a in zip(named, self.avg):
                p.copy_(a)
        try:
            yield trained
        finally:
            with torch.no_grad():
                for n, p in named:
                    p.copy_(trained[n])
