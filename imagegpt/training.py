"""Training: the settings (TrainConfig), the run folder (log, best/ and final/ checkpoints, exact
resume), and the loop that trains the GPT on token sequences as a causal language model.

train(cfg) reads top to bottom: set up the processes, load the data, build the model and optimiser,
open the run folder (or resume it), then loop over optimizer steps, evaluating and saving as it goes.
The data order, initial weights and dropout depend only on the seed, so a resumed run on the CPU ends
bitwise equal to an uninterrupted one.
"""
import hashlib
import json
import math
import os
import re
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from imagegpt import checkpoint
from imagegpt.batches import epoch_steps, open_rows
from imagegpt.data_config import DataConfig, check_data_config, data_fields
from imagegpt.device import BF16, ThreadAdapter, bf16_autocast, check_memory, resolve_device, use_threads
from imagegpt.errors import UserError, check_seed
from imagegpt.files import (
    atomic_path,
    check_dir,
    lock_folder,
    read_json,
    resolve_dir,
    tidy_dir,
)
from imagegpt.metrics import evaluate
from imagegpt.plots import plot_curves
from imagegpt.prepare import ensure_prepared
from imagegpt.provenance import precision, write_result
from imagegpt.sequences import make_batch
from imagegpt.settings import changed, check_fields, flat, read_yaml, update
from imagegpt.stats import seed_summary
from imagegpt.token_format import TAIL, Vocab, check_class_names
from model import GPT, GPTConfig
from tokenizer import Codebook, check_vocab, load_codebook


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


def seed_configs(cfg, n):
    """n copies of cfg with the seeds cfg.seed, cfg.seed + 1, ..., each in its own out_dir/seed-<seed>
    (the same data folder: the split and the codebook do not depend on the training seed)."""
    return [changed(cfg, seed=cfg.seed + k, out_dir=os.path.join(cfg.out_dir, f"seed-{cfg.seed + k}"))
            for k in range(n)]


def train_seeds(cfg, n, resume=False, allow_changes=False, log=print):
    """Train the configuration with n seeds (seed_configs; with resume, a started run continues and a
    complete one is kept) and write out_dir/seeds.json: each run's development accuracy of final/,
    and their mean, standard deviation and 95 % interval. -> that summary. A run stopped by Ctrl-C
    stops the series there (the summary then has no interval; --resume goes on)."""
    runs = []
    for c in seed_configs(cfg, n):
        log(f"seed {c.seed}: {c.out_dir}")
        started = os.path.exists(os.path.join(c.out_dir, "final", "trainer_state.pt"))
        out = train(c, resume=resume and started, log=log, allow_changes=allow_changes)
        final = read_json(os.path.join(c.out_dir, "final", "metrics.json"), "metrics.json")
        runs.append({"seed": c.seed, "out_dir": c.out_dir, "final_dev_accuracy": final.get("accuracy"),
                     "interrupted": out["interrupted"]})
        if out["interrupted"]:
            log(f"the series stops at seed {c.seed}; continue it with --resume")
            break
    accs = [r["final_dev_accuracy"] for r in runs if not r["interrupted"] and isinstance(r["final_dev_accuracy"], float)]
    summary = {"runs": runs, "final_dev_accuracy": seed_summary(accs) if len(accs) == n else None}
    write_result(os.path.join(cfg.out_dir, "seeds.json"), summary, config=cfg, seeds=[r["seed"] for r in runs],
                 dtype=precision(cfg.bf16, resolve_device(cfg.device, "config: device")))
    return summary


def get_lr(step, total, cfg):
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    ratio = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(ratio, 1.0))) * (cfg.lr - cfg.min_lr)


# ----------------------------------------------------------------------------- set-up

@dataclass
class Processes:
    """Where this process trains: its device, and its place among the DDP processes (torchrun)."""
    device: str
    rank: int = 0
    world: int = 1

    @property
    def ddp(self):
        return self.world > 1

    @property
    def master(self):
        return self.rank == 0

    @property
    def cuda(self):
        return self.device.startswith("cuda")


def setup_processes(cfg):
    """Resolve the device, join the DDP process group under torchrun (NCCL on CUDA, gloo on CPU)."""
    device = resolve_device(cfg.device, "config: device")
    procs = Processes(device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch.distributed as dist
        dist.init_process_group(backend="nccl" if procs.cuda else "gloo")
        procs.rank, procs.world = dist.get_rank(), dist.get_world_size()
        if procs.cuda:
            procs.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(procs.device)
    if procs.cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return procs


def load_split(cfg, name, vocab, conditioned=False, book=None):
    """The whole split `name` of cfg.data.data_dir (token arrays, or JSONL) -> x, y (N, T) next-token inputs and
    targets, cls_pos (N,); with conditioned=True and cfg.cond_fraction > 0 the class-conditioned copies
    follow the plain sequences."""
    rows = open_rows(cfg, name, vocab, book, conditioned)
    return make_batch(rows.get(np.arange(rows.n), 0), cfg.max_length, vocab.pad_id)


def block_size(cfg, splits, where):
    """The sequence length to train with: cfg.max_length, or with 0 the longest sequence of `splits`
    (name -> rows). A max_length that would cut sequences is refused, naming how many and what it would
    take, unless cfg.allow_truncation."""
    longest = max(r.longest for r in splits.values())
    block = cfg.max_length or longest
    if block >= longest or cfg.allow_truncation:
        return block
    cut = " and ".join(f"{int((r.lengths > block).sum())} of {r.n} {name}" for name, r in splits.items())
    raise UserError(too_short(block, longest, where, f"{cut} sequences"))


def too_short(block, longest, where, cut):
    return (f"config: max_length {block} is shorter than the sequences of {where} ({longest} tokens): it would "
            f"cut {cut} (up to {longest - block} image tokens each, the bottom of the image); set max_length: "
            f"{longest} (or 0, the data's length), or allow_truncation: true to train on the cut images")


@dataclass
class Data:
    vocab: Vocab
    book: Codebook
    train: object  # the training rows (batches.open_rows): gathered step by step, never all at once
    dev: tuple     # the development split (x, y, cls_pos), or None: then training evaluates nothing
    block: int = 0          # the sequence length trained with (the model's block size)
    width: int = 0          # the width of every training row (min(block, longest sequence))
    class_names: list = None   # from report.json: the checkpoints carry them


def load_data(cfg, procs, log):
    """Prepare the data folder if needed (rank 0; the others wait), open the training rows and read the
    development split. The test split (val.*) is never read here: no training decision sees it."""
    if procs.master:
        ensure_prepared(cfg.data, device=procs.device, log=log)
    if procs.ddp:
        torch.distributed.barrier()
    vocab = Vocab.load(os.path.join(cfg.data.data_dir, "vocab.json"))
    book = load_codebook(cfg.data.data_dir)
    check_vocab(book, vocab, cfg.data.data_dir)
    splits = {"train": open_rows(cfg, "train", vocab, book, conditioned=True)}
    if any(os.path.exists(os.path.join(cfg.data.data_dir, "dev" + ext)) for ext in (".tokens.npy", ".jsonl")):
        splits["dev"] = open_rows(cfg, "dev", vocab)
    block = block_size(cfg, splits, cfg.data.data_dir)
    cut = sum(int((r.lengths > block).sum()) for r in splits.values()) if block < max(
        r.longest for r in splits.values()) else 0
    if cut:
        log(f"note: max_length {block} cuts the image tokens of {cut} sequences (allow_truncation: true)")
    dev = splits.get("dev")
    dev = make_batch(dev.get(np.arange(dev.n), 0), block, vocab.pad_id) if dev else None
    report = os.path.join(cfg.data.data_dir, "report.json")
    rep = read_json(report, "report.json")
    names = check_class_names(rep.get("classes") if isinstance(rep, dict) else None, vocab, f"{report}: classes")
    return Data(vocab, book, splits["train"], dev, block, min(block, splits["train"].longest), names)


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


class StopFlag:
    """The first Ctrl-C (SIGINT) asks the loop to save and stop at the next step; a second one aborts."""

    def __init__(self):
        self.set, self.previous = False, None
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            pass

    def _handle(self, *_):
        if self.set:
            raise KeyboardInterrupt
        self.set = True

    def restore(self):
        """Put back the handler that was there before (train() may be called from a library)."""
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


# ----------------------------------------------------------------------------- the run folder

@dataclass
class Progress:
    """What the loop carries from step to step and saves in final/trainer_state.pt."""
    step: int = 0
    best: float = None          # best validation accuracy so far
    tokens: int = 0             # real target tokens trained on
    history: list = field(default_factory=list)   # training losses since the last evaluation


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


@torch.no_grad()
def load_trained_weights(model, weights, path):
    params = dict(model.named_parameters())
    if set(weights) != set(params) or any(weights[n].shape != p.shape for n, p in params.items()):
        raise UserError(f"{path}: its trained weights do not fit this run's model")
    for n, p in params.items():
        p.copy_(weights[n])


class RunFolder:
    """out_dir: log.jsonl (one JSON line per evaluation), best/ (best accuracy on the development
    split, when there is one), final/ (the latest state, resumable), curves.png. Only rank 0 writes."""

    def __init__(self, out_dir, master):
        self.dir, self.master = out_dir, master
        self.saved_step = None    # the step of the checkpoint this run last wrote (or resumed) in final/
        self.log_path = os.path.join(out_dir, "log.jsonl")
        self.final, self.best = os.path.join(out_dir, "final"), os.path.join(out_dir, "best")
        if master:
            os.makedirs(out_dir, exist_ok=True)
            tidy_dir(self.final)  # what a killed earlier run may have left: temporary files and folders
            tidy_dir(self.best)
            for name in os.listdir(out_dir):
                if name.startswith(".tmp-"):
                    os.remove(os.path.join(out_dir, name))

    def start(self):
        """A fresh run: an earlier log in this folder is replaced."""
        if self.master and os.path.exists(self.log_path):
            os.remove(self.log_path)
        return Progress()

    def resume(self, model, opt, procs, ema=None):
        """Load final/ into model and optimizer and restore the RNGs -> Progress; log lines written
        after that checkpoint (by a run killed later) are dropped. final/'s weights are the average
        when the run kept one (they restart ema); the trainer state's are the ones trained on."""
        state = checkpoint.load_trainer_state(self.final)
        saved = checkpoint.load(self.final, procs.device)
        try:
            model.load_state_dict(saved.model.state_dict())
        except RuntimeError as e:
            raise UserError(f"{saved.folder}: its weights do not fit this run's model "
                            f"({str(e).strip().splitlines()[-1].strip()[:200]})") from None
        if ema:
            ema.start_from(model)
        if "weights" in state:
            load_trained_weights(model, state["weights"], f"{saved.folder}/trainer_state.pt")
        try:
            opt.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"])
        except (ValueError, KeyError, RuntimeError, TypeError) as e:
            raise UserError(f"{saved.folder}/trainer_state.pt: does not fit this run's model and optimizer "
                            f"({str(e).strip()[:200]})") from None
        progress = Progress(int(state["step"]), state["best"], int(state["tokens"]), list(state.get("history", [])))
        self.saved_step = progress.step
        if procs.cuda and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
        if self.master and os.path.exists(self.log_path):
            keep = []
            with open(self.log_path, "rb") as f:
                for ln in f:
                    try:
                        rec = json.loads(ln)
                    except ValueError:  # a line cut short by a kill in mid-write: it is redone
                        continue
                    if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)) \
                            and rec["step"] <= progress.step:
                        keep.append(ln.rstrip(b"\r\n") + b"\n")
            with atomic_path(self.log_path) as tmp:  # a kill while rewriting keeps the old log
                with open(tmp, "wb") as f:
                    f.writelines(keep)
        return progress

    def append_log(self, rec):
        try:
            with open(self.log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:
            raise UserError(f"{self.log_path}: cannot write ({e.strerror or e})") from None

    def save(self, model, cfg, data, metrics, state, improved):
        """best/ (if improved) before final/: a kill between the two redoes this step, best/ included.
        Each checkpoint's metrics.json says how it was chosen."""
        note = lambda how: {**(metrics or {}), "step": state["step"], "chosen": how,
                            **({"weights": f"exponential moving average (decay {cfg.ema:g})"} if cfg.ema else {})}
        if improved:
            checkpoint.save(self.best, model, cfg, data.vocab, data.book,
                            note("best: the highest development-split accuracy during training"),
                            class_names=data.class_names)
        checkpoint.save(self.final, model, cfg, data.vocab, data.book,
                        note("final: the last step saved (the end of the schedule once done)"), state,
                        class_names=data.class_names)
        self.saved_step = state["step"]

    def plot(self):
        if os.path.exists(self.log_path):
            plot_curves(self.log_path, os.path.join(self.dir, "curves.png"))


# ----------------------------------------------------------------------------- the loop

def step_counts(micro, procs):
    """(loss weight sum, real target tokens) of the global batch: this process's micro-batches (x, y, w),
    summed over the processes. Integers, exact in float32."""
    t = torch.tensor([sum(float(w.sum()) for _, _, w in micro), sum(int((y != -100).sum()) for _, y, _ in micro)],
                     dtype=torch.float64, device=procs.device)
    if procs.ddp:
        torch.distributed.all_reduce(t)
    return t[0].float(), int(t[1])


def train_step(model, opt, micro, denom, cfg, procs, ctx):
    """One optimizer step on this process's grad_accum micro-batches (x, y, w) of the global batch:
    loss = label-weighted mean over the global batch's real targets (denom: their weight sum). -> mean loss."""
    loss_sum = torch.zeros((), device=procs.device)
    for m, (xb, yb, wb) in enumerate(micro):
        xb, yb, wb = xb.to(procs.device), yb.to(procs.device), wb.to(procs.device)
        sync = nullcontext() if not procs.ddp or m == cfg.grad_accum - 1 else model.no_sync()
        with sync:
            with ctx:
                logits, _ = model(xb)
            ce = F.cross_entropy(logits.float().transpose(1, 2), yb, ignore_index=-100, reduction="none")
            loss = (ce * wb).sum() / denom
            (loss * procs.world).backward()                     # DDP averages gradients over processes
        loss_sum += loss.detach()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    if procs.ddp:
        torch.distributed.all_reduce(loss_sum)
    return loss_sum.item()


def evaluate_and_save(raw, opt, data, run, p, cfg, procs, ctx, total, t0, ema=None, interrupted=False, threads=None):
    """Metrics on the development split (when there is one), a log line and best/ (when they
    improved), and final/ with the trainer state. An interrupted run saves its state only (no log
    line, no best/), as if it had not stopped. Without a development split there is no best/. With a
    weight average (ema) the metrics and checkpoints are the average's; the trainer state keeps the
    trained weights. Weights that are not finite are never saved: the run stops (see diverged())."""
    if not all(bool(t.isfinite().all()) for t in raw.parameters()):
        raise UserError(diverged(run, p, "the weights are not finite (NaN or inf)", cfg))
    state = {"step": p.step, "tokens": p.tokens, "done": p.step == total}
    with ema.applied(raw) if ema else nullcontext() as trained:
        if trained is not None:
            state["weights"] = trained
        metrics = evaluate(raw, *data.dev, data.vocab, ctx=ctx) if data.dev else None
        if metrics:
            metrics["split"] = "dev"
        rec = {"step": p.step, "epoch": p.step * cfg.epochs / total, "tokens": p.tokens,
               "lr": get_lr(max(p.step - 1, 0), total, cfg),
               "train_loss": sum(p.history) / len(p.history) if p.history else None, "time": time.time() - t0,
               **({"threads": threads} if threads else {}),
               **{f"dev_{k}": metrics[k] for k in ("loss", "perplexity", "token_accuracy", "image_perplexity",
                                                   "accuracy") if metrics}}
        improved = metrics is not None and not interrupted and (p.best is None or metrics["accuracy"] > p.best)
        if not interrupted:  # an interrupted run keeps them, so the next evaluation averages the same steps
            p.history.clear()
        if improved:
            p.best = metrics["accuracy"]
        if procs.master:
            if not interrupted:
                run.append_log(rec)
            state.update(optimizer=opt.state_dict(), best=p.best, rng=torch.get_rng_state(), history=list(p.history))
            if procs.cuda:
                state["cuda_rng"] = torch.cuda.get_rng_state()
            run.save(raw, cfg, data, metrics, state, improved)
    return rec


def diverged(run, p, what, cfg):
    """The one line for a run that met a non-finite loss or weights: what is kept on disk."""
    kept = f"{run.final} keeps step {run.saved_step}" if run.saved_step is not None else \
        "no checkpoint of this run was written"
    return (f"step {p.step}: {what}; training diverged and was stopped ({kept}; final/ and best/ never get "
            f"non-finite weights); lower lr (now {cfg.lr:g}) or keep grad_clip on")


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


# what --resume may never change (the weights and the data are made for them), and what it changes only
# when asked (the run would not be the one that was started); the rest (where and how it runs) is free
RESUME_FIXED = ("n_layer", "n_head", "n_embd", "max_length")
RESUME_FREE = ("out_dir", "init_from", "device", "compile", "bf16", "allow_truncation", "num_workers", "threads")


def check_resume(cfg, folder, allow_changes, log):
    """Compare the settings of a resumed run with those saved in folder/config.json, before any work:
    model-shape and data changes are refused; schedule changes (lr, epochs, ...) too, unless
    allow_changes, when they are listed and the run goes on with them."""
    path = os.path.join(resolve_dir(folder), "config.json")
    if not os.path.exists(path):
        checkpoint.load_trainer_state(folder)   # nothing to resume: say so before preparing any data
        return
    saved = read_json(path, "checkpoint config.json")
    if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict) \
            or not isinstance(saved.get("model"), dict):
        raise UserError(f'{path}: expected a JSON object with "model" and "train" objects (a checkpoint '
                        f'config of this project)')
    if isinstance(saved["train"].get("bf16"), bool):   # runs saved before bf16 took auto/true/false
        saved["train"]["bf16"] = str(saved["train"]["bf16"]).lower()
    checkpoint.model_config(saved, path)     # the model's shape, every value checked
    old = {**check_fields(saved["train"], TrainConfig, path, "train."), **saved["model"]}
    now = flat(cfg)
    block = saved["model"].get("block_size")
    same = lambda k: (old[k] or block) == (now[k] or block) if k == "max_length" else old[k] == now[k]
    diff = [k for k in now if k in old and k not in RESUME_FREE and not same(k)]
    show = lambda ks: ", ".join(f"{k} {old[k]!r} -> {now[k]!r}" for k in ks)
    fixed = [k for k in diff if k in RESUME_FIXED or k in data_fields() and k != "data_dir"]
    if fixed:
        raise UserError(f"{path}: cannot resume with other model or data settings: {show(fixed)}; the "
                        f"checkpoint's weights and data are made for the saved ones (start a new run in "
                        f"another out_dir)")
    if diff and not allow_changes:
        raise UserError(f"{path}: --resume with other training settings than the run's: {show(diff)}; it "
                        f"would not continue the same run; pass --allow_changes to go on with them")
    if diff:
        log(f"resuming with changed settings (--allow_changes): {show(diff)}")


def train(cfg, resume=False, log=print, allow_changes=False):
    """Train (or, with resume, continue) the run in cfg.out_dir, which this process locks first."""
    procs = setup_processes(cfg)
    lock = None
    if procs.master:
        check_dir(cfg.out_dir, "run folder (out_dir)")  # before any work
        check_fits(cfg, procs.device)
        lock = lock_folder(cfg.out_dir, "run folder (out_dir)",
                           "; wait for that run to end or choose another out_dir")
    try:
        if resume:
            check_resume(cfg, os.path.join(cfg.out_dir, "final"), allow_changes, log)
        elif procs.master and os.path.exists(os.path.join(cfg.out_dir, "final", "config.json")):
            log(f"note: {cfg.out_dir} holds an earlier run; this new one replaces its log, best/ and final/ "
                f"(continue a run with --resume)")
        threads = torch.get_num_threads()
        try:
            return _train(cfg, procs, resume, log)
        finally:
            torch.set_num_threads(threads)   # as the caller had them (the run chose its own)
    finally:
        if lock:
            lock.release()


THREAD_CHECK_SECONDS = 30.0   # how often a run with threads 0 (auto) re-checks what the machine offers


def _train(cfg, procs, resume, log):
    log = log if procs.master else (lambda *a, **k: None)
    threads = ThreadAdapter(use_threads(cfg.threads, "config: threads", log), THREAD_CHECK_SECONDS)
    ctx = bf16_autocast(cfg.bf16, procs.device)
    seq = (cfg.data.image_size // cfg.data.codebook.patch_size) ** 2 + 1 + TAIL       # what prepare will write
    if 0 < cfg.max_length < seq and not cfg.allow_truncation:     # said before preparing the data
        raise UserError(too_short(cfg.max_length, seq, f"image_size {cfg.data.image_size} in patches of "
                                  f"{cfg.data.codebook.patch_size}", "every sequence"))

    data = load_data(cfg, procs, log)
    per_step = cfg.batch_size * cfg.grad_accum * procs.world     # sequences per optimizer step
    steps_per_epoch = data.train.n // per_step
    if steps_per_epoch == 0:
        raise UserError(f"{cfg.data.data_dir}: {data.train.n} training sequences are fewer than one step "
                        f"({per_step} = batch_size x grad_accum x processes)")
    total = steps_per_epoch * cfg.epochs

    torch.manual_seed(cfg.seed)
    raw = build_model(cfg, data, log).to(procs.device)
    opt = raw.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), "cuda" if procs.cuda else "cpu")
    run = RunFolder(cfg.out_dir, procs.master)
    ema = WeightAverage(raw, cfg.ema) if cfg.ema else None
    p = run.resume(raw, opt, procs, ema) if resume else run.start()
    if resume:
        log(f"resumed {run.final} at step {p.step}/{total}")
    log(f"model: {raw.num_params() / 1e6:.2f} M parameters; {data.train.n} train{' (augmented on the fly)' if cfg.data.augment_on_the_fly else ''} / "
        f"{len(data.dev[0]) if data.dev else 'no'} dev sequences of <= {data.width} tokens; {total} "
        f"steps of {per_step} sequences on {procs.device}{' x ' + str(procs.world) if procs.ddp else ''}")
    model = torch.compile(raw) if procs.cuda and cfg.compile else raw
    if procs.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[torch.cuda.current_device()] if procs.cuda else None)

    stop = StopFlag()
    t0 = time.time()
    bar = None   # started after this run's first step, so that its set-up (workers, first batch) is no step
    saved_at, perm_epoch, t_last, tok_last = None, -1, time.time(), p.tokens
    while p.step < total and not stop.set:
        epoch, k = divmod(p.step, steps_per_epoch)
        if epoch != perm_epoch:  # batches depend only on (seed, epoch, row): resumes replay them exactly
            steps = epoch_steps(data.train, epoch, k, cfg, procs.rank, procs.world, data.block, data.width,
                                data.vocab.pad_id)
            perm_epoch = epoch
        micro = next(steps)                                      # this process's share of the step's batch
        denom, n_tokens = step_counts(micro, procs)
        for g in opt.param_groups:
            g["lr"] = get_lr(p.step, total, cfg)
        loss = train_step(model, opt, micro, denom, cfg, procs, ctx)
        if procs.ddp:                                           # all stop at the same step on Ctrl-C
            stop.set = any_process(stop.set, procs.device)
        p.step += 1
        if ema:
            ema.update(raw, p.step)
        if not math.isfinite(loss):                             # nothing of this step is saved
            if bar:
                bar.close()
            stop.restore()
            raise UserError(diverged(run, p, f"the training loss is {loss}", cfg))
        p.tokens += n_tokens
        p.history.append(loss)
        if threads.check() and procs.master:
            tqdm.write(f"step {p.step}: {threads.note()}")
        if bar is None:
            bar = tqdm(total=total, initial=p.step, desc="training", disable=not procs.master, dynamic_ncols=True)
        else:
            bar.update(1)
        if p.step % 10 == 0 or p.step == total:
            now = time.time()
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{(p.tokens - tok_last) / (now - t_last):.0f}")
            t_last, tok_last = now, p.tokens
        if p.step == total or (p.step % cfg.eval_every == 0 if cfg.eval_every else p.step % steps_per_epoch == 0):
            rec = evaluate_and_save(raw, opt, data, run, p, cfg, procs, ctx, total, t0, ema, threads=threads.take_used())
            saved_at = p.step
            if procs.master:
                tqdm.write(f"step {p.step}: train loss {rec['train_loss']:.4f}" + (
                    f"  dev loss {rec['dev_loss']:.4f}  dev ppl {rec['dev_perplexity']:.2f}  dev acc "
                    f"{rec['dev_accuracy']:.4f}" if "dev_loss" in rec else ""))
    if bar:
        bar.close()
    stop.restore()
    if stop.set and p.step < total:
        if saved_at != p.step:  # not saved by an evaluation at this very step
            evaluate_and_save(raw, opt, data, run, p, cfg, procs, ctx, total, t0, ema, interrupted=True)
        log(f"interrupted: saved {run.final} at step {p.step}; continue with --resume")
    if procs.master:
        run.plot()
    if procs.ddp:   # every process here before any tears down; the DDP wrapper goes first, so that no
        torch.distributed.barrier()   # gloo work object outlives its group (a rare abort at exit otherwise)
        del model
        torch.distributed.destroy_process_group()
    return {"step": p.step, "best_accuracy": p.best, "seconds": time.time() - t0, "log": run.log_path,
            "interrupted": p.step < total}


def any_process(flag, device):
    """True on every DDP process if `flag` is True on any (a Ctrl-C reaches each at its own time)."""
    t = torch.tensor(float(flag), device=device)
    torch.distributed.all_reduce(t)
    return t.item() > 0
