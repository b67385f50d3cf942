"""The training settings (TrainConfig: its data, its model, how it is optimised, evaluated and saved; one
sentence per field, shown by train.py --help), read from a YAML file and the command line, and the checks
of values no run can use (memory included), before any work."""
import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import ClassVar

from imagegpt.data_config import DataConfig, check_data_config
from imagegpt.device import BF16, check_memory
from imagegpt.errors import UserError, check_seed
from imagegpt.settings import flat, read_yaml, update
from imagegpt.token_format import TAIL
from model import GPTConfig


@dataclass
class TrainConfig:
    """A training run: its data, its model, and how it is optimised, evaluated and saved."""
    not_settings: ClassVar = ("vocab_size", "block_size", "bias")   # the run sets them (data, max_length, export)
    data: DataConfig = field(default_factory=DataConfig)
    out_dir: str = "runs/demo"
    """the run folder: log.jsonl, curves.png, best/ and final/ checkpoints"""
    init_from: str = ""
    """a checkpoint folder (or export) to start from instead of random weights ('': from scratch)"""
    model: GPTConfig = field(default_factory=GPTConfig)
    max_length: int = 0
    """the model's block size; 0: the data's sequence length (a shorter one needs allow_truncation)"""
    allow_truncation: bool = False
    """allow a max_length shorter than the sequences: image tokens are cut from the end, never the label"""
    batch_size: int = 16
    """sequences per micro-batch and process"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    epochs: int = 30
    """passes over the training sequences"""
    lr: float = 1e-4
    """peak learning rate, reached after warmup_steps, then cosine decay to min_lr"""
    min_lr: float = 1e-5
    """learning rate at the end of the cosine decay"""
    warmup_steps: int = 100
    """optimizer steps of linear warmup"""
    weight_decay: float = 0.1
    """AdamW weight decay (matrices and embeddings only)"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.95
    """AdamW beta2"""
    grad_clip: float = 1.0
    """clip the gradient norm to this (0: off)"""
    ema: float = 0.0
    """> 0: evaluate and save a moving average of the weights with this decay per step (0.999: the last ~1,000 steps)"""
    label_weight: float = 1.0
    """loss weight of the label token relative to each image token"""
    cond_fraction: float = 0.0
    """also train on class-first copies '<CLS_y> <IMG> ... </IMG> <EOS>' of this share of the sequences (drawing a chosen class)"""
    cond_drop: float = 0.1
    """share of those copies whose class is replaced by <UNK> (unconditional, for classifier-free guidance)"""
    eval_every: int = 0
    """optimizer steps between evaluations on the development split; 0: once per epoch"""
    num_workers: int = 0
    """DataLoader worker processes gathering the batches (0: in the training process); the batches do not depend on it"""
    seed: int = 1337
    """seed of the initial weights, the batch order and dropout"""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda or cuda:N"""
    threads: int = 0
    """torch's CPU threads; 0: chosen from what the machine offers (its CPUs, cgroup quota, other processes' load; IMAGEGPT_THREADS or OMP_NUM_THREADS override it) and re-checked every 30 s, N: fixed (a CPU run is bitwise reproducible only with a fixed count)"""
    compile: bool = True
    """torch.compile the model (CUDA only)"""
    bf16: str = "auto"
    """bf16 autocast: auto (where the GPU or CPU supports it), true or false"""


def load_config(path=None, overrides=None):
    """YAML file (flat mapping) plus overrides ({key: value} from the command line) -> TrainConfig,
    type- and range-checked."""
    cfg = TrainConfig()
    for raw, where in ((read_yaml(path) if path else {}, path), (dict(overrides or {}), "command line")):
        if isinstance(raw.get("bf16"), bool):   # YAML true/false: the switch's two fixed values
            raw["bf16"] = str(raw["bf16"]).lower()
        update(cfg, raw, where)
    cfg.bf16 = cfg.bf16.lower()
    if not cfg.data.data_dir:  # derive a folder name from the data settings, so changing them never collides
        data = json.dumps({k: v for k, v in flat(cfg.data).items() if k != "data_dir"}, sort_keys=True)
        kind, book = cfg.data.source.partition(":")[0], cfg.data.codebook
        cfg.data.data_dir = f"data/{kind}-p{book.patch_size}-k{book.num_codes}-{hashlib.sha1(data.encode()).hexdigest()[:8]}"
    check_train_config(cfg)
    return cfg


def check_train_config(cfg):
    """Values the type check lets through but no run can use: one clear line before any work."""
    v = flat(cfg)
    if cfg.bf16 not in BF16:
        raise UserError(f"config: bf16 must be auto, true or false, got {cfg.bf16!r}")
    for k in ("n_layer", "n_head", "n_embd", "batch_size", "grad_accum", "epochs"):
        if v[k] < 1:
            raise UserError(f"config: {k} must be at least 1, got {v[k]}")
    if cfg.max_length < 0:
        raise UserError(f"config: max_length must be >= 0 (0: the data's sequence length), got {cfg.max_length}")
    check_seed(cfg.seed, "config: seed")
    if cfg.model.n_embd % cfg.model.n_head:
        raise UserError(f"config: n_embd {cfg.model.n_embd} is not divisible by n_head {cfg.model.n_head}")
    for k in ("lr", "min_lr", "weight_decay", "grad_clip", "label_weight", "warmup_steps", "eval_every", "num_workers",
              "threads"):
        if not v[k] >= 0:
            raise UserError(f"config: {k} must be >= 0, got {v[k]}")
    for k in ("cond_fraction", "cond_drop"):
        if not 0 <= v[k] <= 1:
            raise UserError(f"config: {k} must be in [0, 1], got {v[k]}")
    for k in ("dropout", "beta1", "beta2", "ema"):
        if not 0 <= v[k] < 1:
            raise UserError(f"config: {k} must be in [0, 1), got {v[k]}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise UserError(f"config: device must be auto, cpu or cuda[:N], got {cfg.device!r}")
    check_data_config(cfg.data)


def check_fits(cfg, device):
    """Refuse, before any work, a model and batch whose training (fp32 weights, gradients, AdamW's two
    moments, and at least the activations and logits of one micro-batch) could not fit in memory."""
    seq = (cfg.data.image_size // cfg.data.codebook.patch_size) ** 2 + 1 + TAIL        # what prepare writes
    block = cfg.max_length or seq
    vocab = 6 + cfg.data.codebook.num_codes + 2                                    # at least two classes
    n = GPTConfig(vocab_size=vocab, block_size=block, n_layer=cfg.model.n_layer, n_head=cfg.model.n_head,
                  n_embd=cfg.model.n_embd).num_params_estimate()
    T = min(block, seq)
    act = 4 * cfg.batch_size * T * (16 * cfg.model.n_layer * cfg.model.n_embd + 3 * vocab)
    check_memory(16 * n + act, f"config: training {n:,} parameters (weights, gradients, AdamW state) on "
                 f"batches of {cfg.batch_size} x {T} tokens", device,
                 hint="lower n_embd, n_layer, max_length, num_codes or batch_size")
