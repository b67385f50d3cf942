"""Train the GPT on token sequences as a causal language model (the label is the last real token).

    python train.py config/demo.yaml [--key value ...] [--resume]
    torchrun --nproc_per_node=2 train.py config/v2.yaml       # DDP (NCCL on CUDA, gloo on CPU)

Every field of TrainConfig (below, and the data fields of data.DataConfig) can be set in the YAML
file or overridden with --key value. If the sequence files are missing they are prepared first.
The run folder (out_dir) gets log.jsonl (one JSON line per evaluation), best/ (best validation
accuracy) and final/ (latest state, resumable with --resume). Ctrl-C saves final/ and exits 0.
"""
import glob
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
from data import (DataConfig, check_data_config, coerce, data_fields, ensure_prepared, make_batch,
                  override, read_sequences)
from eval import evaluate, public
from model import GPT, GPTConfig
from tokenizer import Codebook, Vocab
from util import UserError, atomic_path, check_dir, run_cli


@dataclass
class TrainConfig(DataConfig):
    out_dir: str = "runs/demo"
    init_from: str = ""          # "" = from scratch, or a checkpoint folder to start from
    # model (GPT-2 architecture); block_size = max_length
    n_layer: int = 6
    n_head: int = 8
    n_embd: int = 384
    dropout: float = 0.0
    max_length: int = 512        # longer sequences lose image tokens, never the label tail
    # optimisation
    batch_size: int = 16         # sequences per micro-batch and process
    grad_accum: int = 1          # micro-batches per optimizer step
    epochs: int = 30
    lr: float = 1e-4             # peak, after linear warmup; cosine decay to min_lr
    min_lr: float = 1e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0       # 0 = off
    label_weight: float = 1.0    # loss weight of the label token relative to each image token
    eval_every: int = 0          # optimizer steps between evaluations; 0 = once per epoch
    seed: int = 1337
    device: str = "auto"         # auto = cuda if available, else cpu
    compile: bool = True         # torch.compile (CUDA only)
    bf16: bool = True            # bf16 autocast (CUDA only; the CPU trains in fp32)


def load_config(path=None, overrides=()):
    """YAML file (flat mapping) plus --key value overrides -> TrainConfig, type-checked."""
    cfg = TrainConfig()
    valid = [f.name for f in fields(cfg)]
    if path:
        import yaml
        try:
            with open(path, encoding="utf-8") as f:
                raw = yaml.safe_load(f)
        except OSError as e:
            raise UserError(f"{path}: cannot read config ({e.strerror})") from None
        except UnicodeDecodeError:
            raise UserError(f"{path}: not UTF-8 text (expected a YAML config)") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f":{mark.line + 1}" if mark else ""
            raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
        raw = raw or {}
        if not isinstance(raw, dict):
            raise UserError(f"{path}: expected a mapping of key: value")
        for k, v in raw.items():
            if k not in valid:
                raise UserError(f"{path}: unknown key {k!r}; valid keys: {', '.join(valid)}")
            setattr(cfg, k, coerce(k, v, type(getattr(cfg, k)), path))
    override(cfg, list(overrides))
    if not cfg.data_dir:  # derive a folder name from the data settings, so changing them never collides
        data = json.dumps({k: getattr(cfg, k) for k in data_fields() if k != "data_dir"}, sort_keys=True)
        kind = cfg.source.partition(":")[0]
        cfg.data_dir = f"data/{kind}-p{cfg.patch_size}-k{cfg.num_codes}-{hashlib.sha1(data.encode()).hexdigest()[:8]}"
    for k in ("n_layer", "n_head", "n_embd", "max_length", "batch_size", "grad_accum", "epochs"):
        if getattr(cfg, k) < 1:
            raise UserError(f"config: {k} must be at least 1, got {getattr(cfg, k)}")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"config: n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
    for k in ("lr", "min_lr", "weight_decay", "grad_clip", "label_weight", "warmup_steps", "eval_every"):
        if not getattr(cfg, k) >= 0:
            raise UserError(f"config: {k} must be >= 0, got {getattr(cfg, k)}")
    for k in ("dropout", "beta1", "beta2"):
        if not 0 <= getattr(cfg, k) < 1:
            raise UserError(f"config: {k} must be in [0, 1), got {getattr(cfg, k)}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.device):
        raise UserError(f"config: device must be auto, cpu or cuda[:N], got {cfg.device!r}")
    check_data_config(cfg)
    return cfg


def get_lr(step, total, cfg):
    """Linear warmup to cfg.lr, then cosine decay to cfg.min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    ratio = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(ratio, 1.0))) * (cfg.lr - cfg.min_lr)


def load_split(cfg, name, vocab):
    seqs, labels = read_sequences(os.path.join(cfg.data_dir, f"{name}.jsonl"), vocab,
                                  v1_hint="training needs the v2 tail </IMG> <CLS> <CLS_y> <EOS>: prepare "
                                          "the data again with data.py prepare")
    x, y, cls_pos = make_batch(seqs, cfg.max_length, vocab.pad_id)
    return x, y, cls_pos


def build_model(cfg, vocab, log):
    if cfg.init_from:
        model, info = checkpoint.load(cfg.init_from)
        if info["vocab"].to_dict() != vocab.to_dict():
            raise UserError(f"{cfg.init_from}: its vocabulary differs from {cfg.data_dir}/vocab.json")
        if model.config.block_size < cfg.max_length:
            raise UserError(f"{cfg.init_from}: block size {model.config.block_size} < max_length {cfg.max_length}")
        log(f"starting from {cfg.init_from}")
        return model.train()
    return GPT(GPTConfig(vocab_size=len(vocab), block_size=cfg.max_length, n_layer=cfg.n_layer,
                         n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout, bias=True))


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


def train(cfg, resume=False, log=print):
    ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("config: device is cuda but no CUDA device is available")
    rank, world = 0, 1
    if ddp:
        import torch.distributed as dist
        dist.init_process_group(backend="nccl" if cfg.device.startswith("cuda") else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg.device.startswith("cuda"):
            cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(cfg.device)
    master = rank == 0
    log = log if master else (lambda *a, **k: None)
    cuda = cfg.device.startswith("cuda")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and cfg.bf16 else nullcontext()

    # ---- data (rank 0 prepares it if missing; the others wait)
    if master:
        check_dir(cfg.out_dir, "run folder (out_dir)")  # before any work
        ensure_prepared(cfg, device=cfg.device, log=log)
    if ddp:
        dist.barrier()
    vocab = Vocab.load(os.path.join(cfg.data_dir, "vocab.json"))
    book = Codebook.load(cfg.data_dir)
    if book.cfg.num_codes != vocab.num_codes:
        raise UserError(f"{cfg.data_dir}/vocab.json has {vocab.num_codes} code tokens, the codebook there "
                        f"{book.cfg.num_codes} codes; prepare the data again")
    xtr, ytr, ctr = load_split(cfg, "train", vocab)
    xva, yva, cva = load_split(cfg, "val", vocab)
    wtr = (ytr != -100).float()                                  # per-token loss weights (N, T)
    wtr[torch.arange(len(wtr)), ctr] = cfg.label_weight
    per_step = cfg.batch_size * cfg.grad_accum * world           # sequences per optimizer step
    steps_per_epoch = len(xtr) // per_step
    if steps_per_epoch == 0:
        raise UserError(f"{cfg.data_dir}: {len(xtr)} training sequences are fewer than one step "
                        f"({per_step} = batch_size x grad_accum x processes)")
    total = steps_per_epoch * cfg.epochs

    # ---- model and optimizer
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, vocab, log).to(cfg.device)
    opt = model.configure_optimizers(cfg.weight_decay, cfg.lr, (cfg.beta1, cfg.beta2), "cuda" if cuda else "cpu")
    step, best, tokens, history = 0, None, 0, []
    final_dir, best_dir = os.path.join(cfg.out_dir, "final"), os.path.join(cfg.out_dir, "best")
    log_path = os.path.join(cfg.out_dir, "log.jsonl")
    if master:  # what a killed earlier run may have left: temporary files and folders
        checkpoint.tidy(final_dir)
        checkpoint.tidy(best_dir)
        for tmp in glob.glob(os.path.join(glob.escape(cfg.out_dir), ".tmp-*")):
            os.remove(tmp)
    if resume:
        state = checkpoint.load_trainer_state(final_dir)
        resumed, _ = checkpoint.load(final_dir, cfg.device)
        model.load_state_dict(resumed.state_dict())
        opt.load_state_dict(state["optimizer"])
        step, best, tokens = int(state["step"]), state["best"], int(state["tokens"])
        history.extend(state.get("history", []))  # train losses since the last evaluation
        torch.set_rng_state(state["rng"])
        if cuda and "cuda_rng" in state:
            torch.cuda.set_rng_state(state["cuda_rng"])
        if master and os.path.exists(log_path):  # drop log lines written after that checkpoint
            keep = []
            with open(log_path, "rb") as f:
                for ln in f:
                    try:
                        rec = json.loads(ln)
                    except ValueError:  # a line cut short by a kill in mid-write: it is redone
                        continue
                    if isinstance(rec, dict) and isinstance(rec.get("step"), (int, float)) and rec["step"] <= step:
                        keep.append(ln.rstrip(b"\r\n") + b"\n")
            with atomic_path(log_path) as tmp:  # a kill while rewriting keeps the old log
                with open(tmp, "wb") as f:
                    f.writelines(keep)
        log(f"resumed {final_dir} at step {step}/{total}")
    elif master and os.path.exists(log_path):
        os.remove(log_path)
    log(f"model: {checkpoint.raw_model(model).num_params() / 1e6:.2f} M parameters; {len(xtr)} train / "
        f"{len(xva)} val sequences of <= {xtr.shape[1] + 1} tokens; {total} steps of {per_step} sequences "
        f"on {cfg.device}{' x ' + str(world) if ddp else ''}")
    raw = model
    if cuda and cfg.compile:
        model = torch.compile(model)
    if ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[torch.cuda.current_device()] if cuda else None)

    saved_at = None

    def save(done, interrupted=False):
        nonlocal best, saved_at
        metrics = public(evaluate(raw, xva, yva, cva, vocab, ctx=ctx))
        rec = {"step": step, "epoch": step / steps_per_epoch, "tokens": tokens, "lr": get_lr(max(step - 1, 0), total, cfg),
               "train_loss": sum(history) / len(history) if history else None, "time": time.time() - t0,
               **{f"val_{k}": metrics[k] for k in ("loss", "perplexity", "token_accuracy", "image_perplexity", "accuracy")}}
        if not interrupted:  # an interrupted run keeps them, so the next evaluation averages the same steps
            history.clear()
        # an interrupted run saves its state only: no log line, no best/, as if it had not stopped
        improved = not interrupted and (best is None or metrics["accuracy"] > best)
        if improved:
            best = metrics["accuracy"]
        if master and not interrupted:
            try:
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")
            except OSError as e:
                raise UserError(f"{log_path}: cannot write ({e.strerror or e})") from None
        if master:
            state = {"optimizer": opt.state_dict(), "step": step, "best": best, "tokens": tokens,
                     "rng": torch.get_rng_state(), "done": done,
                     "history": list(history)}
            if cuda:
                state["cuda_rng"] = torch.cuda.get_rng_state()
            if improved:  # best/ before final/: a kill between the two redoes this step, best/ included
                checkpoint.save(best_dir, raw, cfg, vocab, book, metrics)
            checkpoint.save(final_dir, raw, cfg, vocab, book, metrics, state)
        saved_at = step
        return rec

    os.makedirs(cfg.out_dir, exist_ok=True) if master else None
    stop = StopFlag()
    t0 = time.time()
    bar = tqdm(total=total, initial=step, desc="training", disable=not master, dynamic_ncols=True)
    perm, perm_epoch, t_last, tok_last = None, -1, time.time(), tokens
    while step < total and not stop.set:
        epoch, k = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:  # data order depends only on (seed, epoch): resumes replay it exactly
            perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            perm_epoch = epoch
        idx = perm[k * per_step:(k + 1) * per_step]              # this step's global batch
        denom = wtr[idx].sum()                                   # loss = weighted mean over the global batch
        lr = get_lr(step, total, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        mine = idx.view(world, -1)[rank].view(cfg.grad_accum, -1)
        loss_sum = torch.zeros((), device=cfg.device)
        for m in range(cfg.grad_accum):
            xb, yb, wb = xtr[mine[m]].to(cfg.device), ytr[mine[m]].to(cfg.device), wtr[mine[m]].to(cfg.device)
            sync = nullcontext() if not ddp or m == cfg.grad_accum - 1 else model.no_sync()
            with sync:
                with ctx:
                    logits, _ = model(xb)
                ce = F.cross_entropy(logits.float().transpose(1, 2), yb, ignore_index=-100, reduction="none")
                loss = (ce * wb).sum() / denom.to(cfg.device)
                (loss * world).backward()                        # DDP averages gradients over processes
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ddp:
            dist.all_reduce(loss_sum)
            flag = torch.tensor(float(stop.set), device=cfg.device)
            dist.all_reduce(flag)  # every process stops at the same step if any got Ctrl-C
            stop.set = flag.item() > 0
        step += 1
        tokens += int((ytr[idx] != -100).sum())
        history.append(loss_sum.item())
        bar.update(1)
        if step % 10 == 0 or step == total:
            now = time.time()
            bar.set_postfix(loss=f"{history[-1]:.3f}", tok_s=f"{(tokens - tok_last) / (now - t_last):.0f}")
            t_last, tok_last = now, tokens
        if (cfg.eval_every and step % cfg.eval_every == 0) or (not cfg.eval_every and step % steps_per_epoch == 0) \
                or step == total:
            rec = save(done=step == total)
            bar.write(f"step {step}: train loss {rec['train_loss']:.4f}  val loss {rec['val_loss']:.4f}  "
                      f"val ppl {rec['val_perplexity']:.2f}  val acc {rec['val_accuracy']:.4f}") if master else None
    bar.close()
    stop.restore()
    if stop.set and step < total:
        if saved_at != step:  # not saved by an evaluation at this very step
            save(done=False, interrupted=True)
        log(f"interrupted: saved {final_dir} at step {step}; continue with --resume")
    if master and os.path.exists(log_path):
        from eval import plot_curves
        plot_curves(log_path, os.path.join(cfg.out_dir, "curves.png"))
    if ddp:
        dist.destroy_process_group()
    return {"step": step, "best_accuracy": best, "seconds": time.time() - t0, "log": log_path}


def main():
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        print("keys (default):")
        for f in fields(TrainConfig):
            print(f"  --{f.name} ({f.default!r})")
        return 0
    resume = "--resume" in args
    args = [a for a in args if a != "--resume"]
    path = args[0] if args and not args[0].startswith("--") else None
    cfg = load_config(path, args[1:] if path else args)
    out = train(cfg, resume=resume)
    if out["best_accuracy"] is not None:
        print(f"done: {out['step']} steps in {out['seconds']:.0f} s; best val accuracy {out['best_accuracy']:.4f}; "
              f"checkpoints in {cfg.out_dir}/best and {cfg.out_dir}/final")
    return 0


if __name__ == "__main__":
    run_cli(main)
