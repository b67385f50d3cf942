"""Checkpoint folders, written atomically and read without pickles.

A checkpoint is a self-contained folder:
    model.safetensors        weights (the tied lm_head is stored once, as transformer.wte.weight)
    config.json              {"model": GPTConfig, "train": TrainConfig fields}
    vocab.json, codebook.json, codebook.safetensors
    metrics.json             validation metrics when it was written
    trainer_state.pt         optimizer, step, RNG state (resumable checkpoints only; weights_only load)
The folder is built under a temporary name and swapped in with renames, so a crash leaves either the
old or the new checkpoint on disk, never a mix.
"""
import glob
import os
import pickle
import shutil
import tempfile
import warnings
from dataclasses import asdict, fields

import torch

from model import GPT, GPTConfig
from tokenizer import Codebook, Vocab
from util import UserError, not_safetensors, output_problem, read_json, umask, write_json


def save(folder, model, train_cfg, vocab, codebook, metrics=None, trainer_state=None):
    from safetensors.torch import save_file
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    try:
        os.makedirs(parent, exist_ok=True)
        tidy(folder)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}.tmp-")
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes a private folder
    except OSError as e:
        raise UserError(f"{folder}: cannot write checkpoint ({output_problem(folder) or e.strerror})") from None
    try:
        sd = {k: v.detach().cpu().contiguous() for k, v in raw_model(model).state_dict().items()
              if k != "lm_head.weight"}
        save_file(sd, os.path.join(tmp, "model.safetensors"))
        write_json(os.path.join(tmp, "config.json"),
                   {"model": asdict(raw_model(model).config), "train": asdict(train_cfg)})
        vocab.save(os.path.join(tmp, "vocab.json"))
        codebook.save(tmp)
        if metrics is not None:
            write_json(os.path.join(tmp, "metrics.json"), metrics)
        if trainer_state is not None:
            torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))
        old = folder + ".old"
        if os.path.exists(folder):
            if os.path.exists(old):
                shutil.rmtree(old)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:  # a full disk, permissions: one line naming the checkpoint, the old one kept
        raise UserError(f"{folder}: cannot write checkpoint ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tidy(folder):
    """Remove what a save() of `folder` that was killed may have left: its temporary folders, and
    `folder.old` once `folder` is complete. Only one process writes a given checkpoint folder."""
    folder = os.path.abspath(folder)
    for tmp in glob.glob(os.path.join(os.path.dirname(folder), f".{glob.escape(os.path.basename(folder))}.tmp-*")):
        shutil.rmtree(tmp, ignore_errors=True)
    if os.path.exists(os.path.join(folder, "config.json")):
        shutil.rmtree(folder + ".old", ignore_errors=True)


def resolve(folder):
    """The folder to read: a crash between the two renames of save() leaves only `folder.old`."""
    if not os.path.exists(os.path.join(folder, "config.json")) and os.path.exists(folder + ".old"):
        return folder + ".old"
    return folder


def model_config(cfg, where):
    """The "model" part of a checkpoint's config.json -> GPTConfig, every value type- and range-checked
    (a hand-edited or foreign config must not reach torch as a string or a negative size)."""
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise UserError(f'{where}: not a checkpoint config of this project (expected a JSON object with '
                        f'"model" and "train" objects)')
    if not isinstance(cfg.get("train", {}), dict):
        raise UserError(f'{where}: "train" is {type(cfg["train"]).__name__}, expected a JSON object')
    try:
        mcfg = GPTConfig(**cfg["model"])
    except TypeError as e:
        raise UserError(f"{where}: not a checkpoint config of this project ({e})") from None
    for f in fields(GPTConfig):
        v = getattr(mcfg, f.name)
        if f.name == "bias":
            ok, want = isinstance(v, bool), "true or false"
        elif f.name == "dropout":
            ok, want = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 1, "a number in [0, 1)"
        else:
            ok, want = isinstance(v, int) and not isinstance(v, bool) and v >= 1, "a positive integer"
        if not ok:
            raise UserError(f"{where}: model.{f.name} is {v!r}, expected {want}")
    if mcfg.n_embd % mcfg.n_head:
        raise UserError(f"{where}: model.n_embd {mcfg.n_embd} is not divisible by model.n_head {mcfg.n_head}")
    return mcfg


def raw_model(model):
    """Unwrap DistributedDataParallel and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def load(folder, device="cpu"):
    """-> (model in eval mode, info dict with 'config', 'vocab', 'codebook', 'metrics', 'folder').
    A Hugging Face GPT-2 folder (config.json with model_type gpt2, see hf_export.py) reads the same way."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    folder = resolve(folder)
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such checkpoint folder")
    cfg = read_json(os.path.join(folder, "config.json"), "checkpoint config.json")
    if isinstance(cfg, dict) and cfg.get("model_type") == "gpt2":  # a folder written by hf_export.py
        from hf_export import load_folder  # lazy, so the two modules never import each other at load
        return load_folder(folder, device)
    mcfg = model_config(cfg, f"{folder}/config.json")
    path = os.path.join(folder, "model.safetensors")
    try:
        sd = load_file(path)
    except FileNotFoundError:
        raise UserError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(not_safetensors(path, e)) from None
    vocab = Vocab.load(os.path.join(folder, "vocab.json"))
    if len(vocab) != mcfg.vocab_size:
        raise UserError(f"{folder}/vocab.json has {len(vocab)} tokens, the model expects {mcfg.vocab_size}")
    model = GPT(mcfg)
    load_weights(model, sd, path)
    metrics_path = os.path.join(folder, "metrics.json")
    metrics = read_json(metrics_path, "metrics.json") if os.path.exists(metrics_path) else None
    book = Codebook.load(folder)
    if book.cfg.num_codes != vocab.num_codes:
        raise UserError(f"{folder}: the codebook has {book.cfg.num_codes} codes, vocab.json {vocab.num_codes}")
    info = {"config": cfg, "vocab": vocab, "codebook": book, "metrics": metrics, "folder": folder}
    return model.to(device).eval(), info


def load_weights(model, sd, where):
    """Load a state dict saved by save() (lm_head tied, so absent) with clear shape errors."""
    own = model.state_dict()
    want = set(own) - {"lm_head.weight"}
    if set(sd) != want:
        missing, extra = sorted(want - set(sd)), sorted(set(sd) - want)
        raise UserError(f"{where}: weights do not fit the model config "
                        f"(missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in sd.items():
        if v.shape != own[k].shape:
            raise UserError(f"{where}: {k} has shape {tuple(v.shape)}, the config needs {tuple(own[k].shape)}")
    model.load_state_dict(sd, strict=False)


def load_trainer_state(folder):
    path = os.path.join(resolve(folder), "trainer_state.pt")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: one line only
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; this checkpoint cannot be resumed") from None
    except pickle.UnpicklingError as e:  # torch's own text would suggest weights_only=False: never
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise UserError(f"{path}: cannot load trainer state: refused, it holds Python objects other than "
                        f"tensors and plain data{' (' + why[:160] + ')' if why else ''}") from None
    except Exception as e:  # pickle refusals, truncation, foreign files: all one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise UserError(f"{path}: cannot load trainer state ({first[:200]})") from None
