"""A run's folder: log.jsonl (one line per evaluation), best/ and final/ checkpoints (final/ resumable,
bitwise), curves.png; what a resume may change, and the line a diverged run ends with."""
import json
import os
from dataclasses import dataclass, field

import torch

from imagegpt import checkpoint
from imagegpt.data_config import data_fields
from imagegpt.errors import UserError
from imagegpt.files import atomic_path, read_json, resolve_dir, tidy_dir
from imagegpt.plots import plot_curves
from imagegpt.settings import check_fields, flat
from imagegpt.train_config import TrainConfig


@dataclass
class Progress:
    """What the loop carries from step to step and saves in final/trainer_state.pt."""
    step: int = 0
    best: float = None          # best validation accuracy so far
    tokens: int = 0             # real target tokens trained on
    history: list = field(default_factory=list)   # training losses since the last evaluation


@torch.no_grad()
def load_trained_weights(model, weights, path):
    """Put the trained weights a trainer state keeps (when final/ holds their average) into the model."""
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


def diverged(folder, p, what, cfg):
    """The one line for a run that met a non-finite loss or weights: what is kept on disk."""
    kept = f"{folder.final} keeps step {folder.saved_step}" if folder.saved_step is not None else \
        "no checkpoint of this run was written"
    return (f"step {p.step}: {what}; training diverged and was stopped ({kept}; final/ and best/ never get "
            f"non-finite weights); lower lr (now {cfg.lr:g}) or keep grad_clip on")


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
