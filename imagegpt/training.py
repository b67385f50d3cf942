"""The training loop: the GPT trained on token sequences as a causal language model, evaluated on the
development split and saved as it goes.

train(cfg) reads top to bottom, as nanoGPT's train.py: set up the processes, load the data, build the
model and optimizer, open the run folder (or resume it), then loop over optimizer steps: the batch, the
learning rate, the step, and every eval_every steps an evaluation and a save. The parts live beside it:
the settings (train_config.py), the processes (processes.py), the data (train_data.py), the start of a
fine-tune (finetune.py), the optimizer, schedule and weight average (optimizer.py), the run folder
(run_folder.py), several seeds (seed_runs.py). The data order, initial weights and dropout depend only on
the seed, so a resumed run on the CPU ends bitwise equal to an uninterrupted one.
"""
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from imagegpt.batches import epoch_steps
from imagegpt.checkpoint import Checkpoint
from imagegpt.device import ThreadAdapter, bf16_autocast, use_threads
from imagegpt.errors import UserError
from imagegpt.files import check_dir, lock_folder
from imagegpt.finetune import build_model
from imagegpt.metrics import evaluate
from imagegpt.optimizer import WeightAverage, get_lr, make_optimizer
from imagegpt.processes import Processes, any_process, setup_processes, step_counts
from imagegpt.run_folder import Progress, RunFolder, check_resume, diverged
from imagegpt.train_config import TrainConfig, check_fits
from imagegpt.train_data import Data, load_data, too_short
from imagegpt.token_format import TAIL

THREAD_CHECK_SECONDS = 30.0   # how often a run with threads 0 (auto) re-checks what the machine offers


@dataclass
class Run:
    """A run under way: what evaluate_and_save() needs, carried whole instead of a dozen arguments."""
    cfg: TrainConfig
    procs: Processes
    data: Data
    raw: torch.nn.Module        # the model trained (not compiled, not wrapped for DDP)
    opt: torch.optim.Optimizer
    folder: RunFolder
    progress: Progress          # step, best accuracy, tokens, losses since the last evaluation
    total: int                  # optimizer steps of the whole schedule
    ctx: object                 # the autocast context of the forward passes
    ema: WeightAverage = None   # the moving average of the weights (cfg.ema > 0)
    t0: float = 0.0             # when the loop started


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


def _train(cfg, procs, resume, log):
    log = log if procs.master else (lambda *a, **k: None)
    threads = ThreadAdapter(use_threads(cfg.threads, "config: threads", log), THREAD_CHECK_SECONDS)
    ctx = bf16_autocast(cfg.bf16, procs.device)
    check_length(cfg)

    # the data, the number of steps
    data = load_data(cfg, procs, log)
    per_step = cfg.batch_size * cfg.grad_accum * procs.world     # sequences per optimizer step
    steps_per_epoch = data.train.n // per_step
    if steps_per_epoch == 0:
        raise UserError(f"{cfg.data.data_dir}: {data.train.n} training sequences are fewer than one step "
                        f"({per_step} = batch_size x grad_accum x processes)")
    total = steps_per_epoch * cfg.epochs

    # the model, the optimizer, the run folder (or where a resumed run stopped)
    torch.manual_seed(cfg.seed)
    raw = build_model(cfg, data, log).to(procs.device)
    opt = make_optimizer(raw, cfg, procs)
    folder = RunFolder(cfg.out_dir, procs.master)
    ema = WeightAverage(raw, cfg.ema) if cfg.ema else None
    p = folder.resume(raw, opt, procs, ema) if resume else folder.start()
    run = Run(cfg, procs, data, raw, opt, folder, p, total, ctx, ema)
    if resume:
        log(f"resumed {folder.final} at step {p.step}/{total}")
    log(f"model: {raw.num_params() / 1e6:.2f} M parameters; {data.train.n} train{' (augmented on the fly)' if cfg.data.augment_on_the_fly else ''} / "
        f"{len(data.dev[0]) if data.dev else 'no'} dev sequences of <= {data.width} tokens; {total} "
        f"steps of {per_step} sequences on {procs.device}{' x ' + str(procs.world) if procs.ddp else ''}")
    model = torch.compile(raw) if procs.cuda and cfg.compile else raw
    if procs.ddp:
        model = DDP(model, device_ids=[torch.cuda.current_device()] if procs.cuda else None)

    # the loop
    stop = StopFlag()
    run.t0 = time.time()
    bar = None   # started after this run's first step, so that its set-up (workers, first batch) is no step
    saved_at, perm_epoch, t_last, tok_last = None, -1, time.time(), p.tokens
    while p.step < total and not stop.set:
        epoch, k = divmod(p.step, steps_per_epoch)
        if epoch != perm_epoch:  # batches depend only on (seed, epoch, row): resumes replay them exactly
            steps = epoch_steps(data.train, epoch, k, cfg, procs, (data.block, data.width, data.vocab.pad_id))
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
            raise UserError(diverged(folder, p, f"the training loss is {loss}", cfg))
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
            rec = evaluate_and_save(run, threads=threads.take_used())
            saved_at = p.step
            if procs.master:
                tqdm.write(f"step {p.step}: train loss {rec['train_loss']:.4f}" + (
                    f"  dev loss {rec['dev_loss']:.4f}  dev ppl {rec['dev_perplexity']:.2f}  dev acc "
                    f"{rec['dev_accuracy']:.4f}" if "dev_loss" in rec else ""))
    if bar:
        bar.close()
    stop.restore()

    # the end: a stopped run saves where it is; the curves; the processes part
    if stop.set and p.step < total:
        if saved_at != p.step:  # not saved by an evaluation at this very step
            evaluate_and_save(run, interrupted=True)
        log(f"interrupted: saved {folder.final} at step {p.step}; continue with --resume")
    if procs.master:
        folder.plot()
    if procs.ddp:   # every process here before any tears down; the DDP wrapper goes first, so that no
        torch.distributed.barrier()   # gloo work object outlives its group (a rare abort at exit otherwise)
        del model
        torch.distributed.destroy_process_group()
    return {"step": p.step, "best_accuracy": p.best, "seconds": time.time() - run.t0, "log": folder.log_path,
            "interrupted": p.step < total}


def check_length(cfg):
    """A max_length shorter than every sequence the data settings make, refused before preparing the data."""
    seq = (cfg.data.image_size // cfg.data.codebook.patch_size) ** 2 + 1 + TAIL       # what prepare will write
    if 0 < cfg.max_length < seq and not cfg.allow_truncation:
        raise UserError(too_short(cfg.max_length, seq, f"image_size {cfg.data.image_size} in patches of "
                                  f"{cfg.data.codebook.patch_size}", "every sequence"))


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


def evaluate_and_save(run, interrupted=False, threads=None):
    """Metrics on the development split (when there is one), a log line and best/ (when they
    improved), and final/ with the trainer state. An interrupted run saves its state only (no log
    line, no best/), as if it had not stopped. Without a development split there is no best/. With a
    weight average (ema) the metrics and checkpoints are the average's; the trainer state keeps the
    trained weights. Weights that are not finite are never saved: the run stops (see diverged())."""
    raw, p, cfg, data = run.raw, run.progress, run.cfg, run.data
    if not all(bool(t.isfinite().all()) for t in raw.parameters()):
        raise UserError(diverged(run.folder, p, "the weights are not finite (NaN or inf)", cfg))
    state = {"step": p.step, "tokens": p.tokens, "done": p.step == run.total}
    with run.ema.applied(raw) if run.ema else nullcontext() as trained:
        if trained is not None:
            state["weights"] = trained
        metrics = evaluate(Checkpoint(raw, data.vocab, data.book), data.dev, ctx=run.ctx) if data.dev else None
        if metrics:
            metrics["split"] = "dev"
        rec = log_record(run, metrics, threads)
        improved = metrics is not None and not interrupted and (p.best is None or metrics["accuracy"] > p.best)
        if not interrupted:  # an interrupted run keeps them, so the next evaluation averages the same steps
            p.history.clear()
        if improved:
            p.best = metrics["accuracy"]
        if run.procs.master:
            if not interrupted:
                run.folder.append_log(rec)
            state.update(optimizer=run.opt.state_dict(), best=p.best, rng=torch.get_rng_state(),
                         history=list(p.history))
            if run.procs.cuda:
                state["cuda_rng"] = torch.cuda.get_rng_state()
            run.folder.save(raw, cfg, data, metrics, state, improved)
    return rec


def log_record(run, metrics, threads=None):
    """The log.jsonl line of an evaluation: step, epoch, tokens, learning rate, the training loss since the
    last one, the time, the threads used, the development metrics."""
    p, cfg = run.progress, run.cfg
    return {"step": p.step, "epoch": p.step * cfg.epochs / run.total, "tokens": p.tokens,
            "lr": get_lr(max(p.step - 1, 0), run.total, cfg),
            "train_loss": sum(p.history) / len(p.history) if p.history else None, "time": time.time() - run.t0,
            **({"threads": threads} if threads else {}),
            **{f"dev_{k}": metrics[k] for k in ("loss", "perplexity", "token_accuracy", "image_perplexity",
                                                "accuracy") if metrics}}
