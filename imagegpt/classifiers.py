"""Pixel-space classifiers that are not the GPT: k-NN, logistic regression and a small CNN (and its files).

Images are float tensors (N, C, H, W) in [0, 1], labels long tensors (N,). Everything is plain torch
and deterministic for a seed on the CPU (for a fixed number of threads):
- k-NN: cosine or Euclidean (L2) distance, uniform vote, a tie between classes goes to the smallest
  class index (as scikit-learn's KNeighborsClassifier does);
- multinomial logistic regression: mean cross entropy + l2/2 * ||W||^2 (bias not penalised), solved
  to convergence with L-BFGS in float64; the same model as scikit-learn's
  LogisticRegression(C = 1 / (l2 * n));
- a LeNet-5-like CNN (conv 5x5 - max pool - conv 5x5 - max pool - fc - fc - fc, about 62 k parameters
  on 28 x 28 grey images) trained with AdamW and a cosine learning rate; saved as
  cnn.safetensors + cnn.json (no pickles) by save_cnn and read back, validated, by load_cnn.
"""
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from imagegpt.errors import UserError
from imagegpt.files import atomic_path, read_json, read_weights, write_json

METRICS = ("cosine", "l2")


def flat(images):
    """(N, C, H, W) -> (N, C*H*W) float64: the pixel vectors the k-NN and the linear model see."""
    return images.reshape(len(images), -1).double()


# ----------------------------------------------------------------------------- k-NN

def knn_neighbours(ref, query, kmax, metric, chunk=256):
    """Indices (Q, kmax) of the kmax nearest rows of ref (R, D) for each row of query (Q, D), nearest
    first. metric: "cosine" (1 - cosine similarity) or "l2" (Euclidean distance)."""
    if metric not in METRICS:
        raise UserError(f"k-NN metric {metric!r}: expected one of {', '.join(METRICS)}")
    if not 1 <= kmax <= len(ref):
        raise UserError(f"k-NN: k = {kmax} needs at least {kmax} reference images, got {len(ref)}")
    ref, query = ref.double(), query.double()
    if metric == "cosine":
        ref = F.normalize(ref, dim=1)
        query = F.normalize(query, dim=1)
        bias = torch.zeros(len(ref), dtype=ref.dtype)
    else:  # ||q - r||^2 = ||q||^2 - 2 q.r + ||r||^2; ||q||^2 is the same for every r of a row
        bias = ref.pow(2).sum(1)
    out = []
    for i in range(0, len(query), chunk):
        score = torch.addmm(bias, query[i:i + chunk], ref.T, alpha=-2 if metric == "l2" else -1)
        out.append(score.topk(kmax, dim=1, largest=False, sorted=True).indices)
    return torch.cat(out) if out else torch.zeros(0, kmax, dtype=torch.long)


def knn_vote(ref_labels, neighbours, k, num_classes):
    """Majority vote of the first k neighbours (Q, >= k) -> predicted labels (Q,); a tie between classes
    goes to the smallest class index."""
    votes = F.one_hot(ref_labels[neighbours[:, :k]], num_classes).sum(1)
    return votes.argmax(1)  # argmax returns the first of equal maxima


def knn_predict(ref, ref_labels, query, k, metric, num_classes):
    return knn_vote(ref_labels, knn_neighbours(flat(ref), flat(query), k, metric), k, num_classes)


# ----------------------------------------------------------------------------- logistic regression

@dataclass
class LogReg:
    weight: torch.Tensor   # (num_classes, D) float64
    bias: torch.Tensor     # (num_classes,)

    def logits(self, images):
        return torch.addmm(self.bias, flat(images), self.weight.T)

    def predict(self, images):
        return self.logits(images).argmax(1)


def fit_logreg(images, labels, num_classes, l2, max_iter=1000):
    """Multinomial logistic regression on pixels: minimises mean cross entropy + l2/2 * ||W||^2 with
    L-BFGS (strong Wolfe line search) from zero weights, in float64. Deterministic."""
    if l2 <= 0:
        raise UserError(f"logistic regression: the L2 weight must be > 0, got {l2}")
    x, y = flat(images), labels.long()
    w = torch.zeros(num_classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(torch.addmm(b, x, w.T), y) + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return LogReg(w.detach(), b.detach())


# ----------------------------------------------------------------------------- the CNN

@dataclass
class CNNConfig:
    channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    conv1: int = 6       # LeNet-5 widths
    conv2: int = 16
    fc1: int = 120
    fc2: int = 84


def feature_size(image_size):
    """Side of the last feature map: conv 5x5 (padding 2) - pool 2 - conv 5x5 - pool 2."""
    return (image_size // 2 - 4) // 2


class LeNet(nn.Module):
    """LeNet-5 with ReLU and max pooling; input (N, C, H, W) in [0, 1], H = W = cfg.image_size."""

    def __init__(self, cfg):
        super().__init__()
        if feature_size(cfg.image_size) < 1:
            raise UserError(f"the CNN needs images of at least 12 x 12 pixels, got {cfg.image_size} x {cfg.image_size}")
        self.cfg = cfg
        s = feature_size(cfg.image_size)
        self.conv1 = nn.Conv2d(cfg.channels, cfg.conv1, 5, padding=2)
        self.conv2 = nn.Conv2d(cfg.conv1, cfg.conv2, 5)
        self.fc1 = nn.Linear(cfg.conv2 * s * s, cfg.fc1)
        self.fc2 = nn.Linear(cfg.fc1, cfg.fc2)
        self.fc3 = nn.Linear(cfg.fc2, cfg.num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


@dataclass
class CNNTraining:
    epochs: int = 12
    batch_size: int = 64
    lr: float = 3e-3           # peak; cosine decay to 0 over all steps, after a linear warmup
    warmup_steps: int = 100
    weight_decay: float = 1e-4


def train_cnn(images, labels, cfg, train=CNNTraining(), seed=0, progress=None):
    """Train a LeNet from scratch on images (N, C, H, W), labels (N,). Deterministic for a seed on the
    CPU: the seed fixes the initial weights and the batch order (the global RNG is left as it was).
    progress(n) is called with the number of images of each step."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LeNet(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    n = len(images)
    per_epoch = math.ceil(n / train.batch_size)
    total = max(1, train.epochs * per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, train.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * s / total)))
    labels = labels.long()
    model.train()
    for _ in range(train.epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, train.batch_size):
            idx = order[i:i + train.batch_size]
            loss = F.cross_entropy(model(images[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress:
                progress(len(idx))
    model.eval()
    return model


@torch.no_grad()
def cnn_logits(model, images, batch=1000):
    model.eval()
    out = [model(images[i:i + batch].float()) for i in range(0, len(images), batch)]
    return torch.cat(out) if out else torch.zeros(0, model.cfg.num_classes)


def cnn_predict(model, images):
    return cnn_logits(model, images).argmax(1)


# -- files: cnn.json (format, architecture, class names, anything the caller adds) + cnn.safetensors

CNN_FORMAT = "imagegpt-tokens-cnn"


def save_cnn(model, folder, class_names=None, info=None):
    """Write folder/cnn.safetensors (weights) and folder/cnn.json (architecture, class names, input
    convention, and `info`: how it was trained and scored). Each file is written atomically."""
    cfg = model.cfg
    names = list(class_names) if class_names is not None else [str(c) for c in range(cfg.num_classes)]
    if len(names) != cfg.num_classes:
        raise UserError(f"save_cnn: {len(names)} class names for {cfg.num_classes} classes")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UserError(f"{folder}: is a file; the CNN is saved into a folder")
    with atomic_path(os.path.join(folder, "cnn.safetensors")) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, tmp)
    write_json(os.path.join(folder, "cnn.json"),
               {"format": CNN_FORMAT, "version": 1, "architecture": asdict(cfg), "class_names": names,
                "input": "float (N, C, H, W) in [0, 1]: pixel value / 255", "info": info or {}})


def load_cnn(folder):
    """Read a CNN written by save_cnn -> (model in eval mode, the cnn.json contents). Any problem (a
    missing or foreign file, weights that do not fit the architecture) is a one-line UserError."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such folder (expected cnn.json and cnn.safetensors from save_cnn)")
    where = os.path.join(folder, "cnn.json")
    meta = read_json(where, "cnn.json")
    if not isinstance(meta, dict) or meta.get("format") != CNN_FORMAT or meta.get("version") != 1:
        raise UserError(f'{where}: not a CNN file of this project (expected "format": "{CNN_FORMAT}", "version": 1)')
    arch = meta.get("architecture")
    try:
        if not isinstance(arch, dict) or set(arch) != set(CNNConfig.__dataclass_fields__):
            raise TypeError(f"expected the keys {', '.join(CNNConfig.__dataclass_fields__)}")
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in arch.values()):
            raise TypeError("every value must be a positive integer")
        cfg = CNNConfig(**arch)
    except TypeError as e:
        raise UserError(f'{where}: "architecture" is not valid ({e})') from None
    names = meta.get("class_names")
    if not isinstance(names, list) or len(names) != cfg.num_classes or not all(isinstance(n, str) for n in names):
        raise UserError(f'{where}: "class_names" must be a list of {cfg.num_classes} strings')
    model = LeNet(cfg)
    path = os.path.join(folder, "cnn.safetensors")
    tensors = read_weights(path)
    own = model.state_dict()
    if set(tensors) != set(own):
        raise UserError(f"{path}: holds {', '.join(sorted(tensors)) or 'no tensors'}; the architecture in "
                        f"cnn.json needs {', '.join(sorted(own))}")
    for k, v in tensors.items():
        if v.shape != own[k].shape or not v.is_floating_point():
            raise UserError(f"{path}: {k} is {v.dtype} {tuple(v.shape)}, the architecture in cnn.json needs "
                            f"float {tuple(own[k].shape)}")
        if not torch.isfinite(v).all():
            raise UserError(f"{path}: {k} holds NaN or infinite values")
    model.load_state_dict({k: v.float() for k, v in tensors.items()})
    model.eval()
    return model, meta
