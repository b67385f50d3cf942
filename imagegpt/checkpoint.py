"""The checkpoint: a trained model with its vocabulary, codebook, settings and metrics, as one
object (Checkpoint) and as a folder, written atomically and read without pickles.

A checkpoint is a self-contained folder:
    model.safetensors        weights (the tied lm_head is stored once, as transformer.wte.weight)
    config.json              {"model": GPTConfig, "train": the other settings of the run, flat,
                              "classes": the class names, in label order}
    vocab.json, codebook.json, codebook.safetensors
    metrics.json             validation metrics when it was written
    trainer_state.pt         optimizer, step, RNG state, and the trained weights when model.safetensors
                             holds their moving average (resumable checkpoints only; weights_only load)
A Hugging Face GPT-2 folder written by huggingface.write_export() loads the same way.
"""
import os
import pickle
import warnings
from dataclasses import asdict, dataclass, field, fields, replace

import torch
from safetensors.torch import save_file

from imagegpt import huggingface, prepare
from imagegpt.data_config import DataConfig
from imagegpt.device import check_memory, human_bytes
from imagegpt.errors import UserError
from imagegpt.files import (
    atomic_dir,
    check_finite_tensors,
    read_json,
    read_weights,
    resolve_dir,
    write_json,
)
from imagegpt.metrics import check_metrics
from imagegpt.onnx_export import GRAPH, QUANTIZED
from imagegpt.onnx_runtime import OnnxGPT
from imagegpt.settings import check_fields, flat, names
from imagegpt.token_format import Vocab, check_class_names, list_classes
from model import GPT, GPTConfig
from tokenizer import Codebook, load_tokens


@dataclass
class Checkpoint:
    model: GPT
    vocab: Vocab
    codebook: Codebook
    settings: dict = field(default_factory=dict)   # the flat settings it was trained with ({}: unknown)
    metrics: dict = None                           # the metrics stored with it, if any
    folder: str = ""
    class_names: list = None                       # carried in config.json (older: <data_dir>/report.json)

    def __post_init__(self):
        if self.class_names is None:
            self.class_names = [str(c) for c in range(self.vocab.num_classes)]

    @property
    def conditional(self):
        """Can it draw a chosen class? (Trained with class-conditioned sequences: cond_fraction > 0.)"""
        return bool(self.settings.get("cond_fraction"))

    def check_conditional(self, why="it cannot be asked for a class"):
        """Refuse a class for a model known to be trained without conditioning; one of unknown settings
        (an export of other origin) is let through."""
        if self.settings and not self.conditional:
            raise UserError(f"{self.folder} was trained without class-conditioned sequences (cond_fraction 0), so "
                            f"{why}; train one with cond_fraction > 0 (config/demo_cond.yaml)")

    @property
    def data_dir(self):
        d = self.settings.get("data_dir")
        return d if isinstance(d, str) and d else None

    def split_file(self, name="test"):
        """<data_dir>/<name>.jsonl: a split of the data the checkpoint was trained on (prepare.split_file)."""
        if not self.data_dir:
            raise UserError(f"{self.folder}/config.json records no data_dir; pass --data FILE.jsonl")
        path = prepare.split_file(self.data_dir, name)
        if not os.path.exists(path):
            raise UserError(f"{path}: missing (the checkpoint's {name} split); run from the repository "
                            f"root, prepare the data again, or pass --data FILE.jsonl")
        return path

    def class_index(self, text, what="class"):
        """A class name or index (as the user typed it) -> its index."""
        text = str(text)
        if text in self.class_names:
            return self.class_names.index(text)
        if text.isdigit() and int(text) < len(self.class_names):
            return int(text)
        raise UserError(f"{what} {text!r}: not a class of this checkpoint (classes: {list_classes(self.class_names)}; "
                        f"or an index 0 .. {len(self.class_names) - 1})")

    def encode_images(self, images):
        """uint8 images (N, H, W, C) of the codebook's size -> classification prefixes (id lists)."""
        return self.codebook.prefixes(images, self.vocab)

    def with_model(self, model):
        """The same checkpoint run by another model of the same shape (its ONNX graph in onnxruntime)."""
        return replace(self, model=model)


def save(folder, model, settings, vocab, codebook, metrics=None, trainer_state=None, class_names=None):
    """Write a checkpoint folder; `settings` is the run's TrainConfig: config.json keeps the model's shape
    under "model", the run's other settings, flat, under "train", and the class names (default '0', '1',
    ...) under "classes", so that the checkpoint names its classes wherever it is copied."""
    with atomic_dir(folder, "checkpoint") as tmp:
        sd = {k: v.detach().cpu().contiguous() for k, v in raw_model(model).state_dict().items()
              if k != "lm_head.weight"}
        save_file(sd, os.path.join(tmp, "model.safetensors"))
        write_json(os.path.join(tmp, "config.json"),
                   {"model": asdict(raw_model(model).config), "train": run_settings(settings),
                    "classes": list(class_names or [str(c) for c in range(vocab.num_classes)])})
        vocab.save(os.path.join(tmp, "vocab.json"))
        codebook.save(tmp)
        if metrics is not None:
            write_json(os.path.join(tmp, "metrics.json"), metrics)
        if trainer_state is not None:
            torch.save(trainer_state, os.path.join(tmp, "trainer_state.pt"))


def check_size(vocab, mcfg, message):
    """A vocabulary the model's embedding fits, or UserError(message)."""
    if len(vocab) != mcfg.vocab_size:
        raise UserError(message)


def run_settings(settings):
    """The flat settings of a run (a TrainConfig) but the model's, which config.json keeps under "model"."""
    model = set(names(GPTConfig))
    return {k: v for k, v in flat(settings).items() if k not in model}


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
    check_model_fits(mcfg, where)
    return mcfg


def check_model_fits(mcfg, where, device="cpu"):
    """Refuse, before building it, a model whose weights alone (fp32) could not fit in memory."""
    n = mcfg.num_params_estimate()
    check_memory(4 * n, f"{where}: a model of {n:,} parameters ({human_bytes(4 * n)} of fp32 weights)", device)


def raw_model(model):
    """Unwrap DistributedDataParallel and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


BACKENDS = ("torch", "onnx", "onnx-int8")


def load(folder, device="cpu", backend="torch"):
    """A checkpoint folder (or a Hugging Face GPT-2 export) -> Checkpoint, the model in eval mode.
    backend "onnx" / "onnx-int8": the model is the folder's onnx/model.onnx (model_quantized.onnx)
    run by onnxruntime on the CPU (an export made with `hf_export.py --onnx`), with the same interface."""
    folder = resolve_dir(folder)
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such checkpoint folder")
    cfg = read_json(os.path.join(folder, "config.json"), "checkpoint config.json")
    if isinstance(cfg, dict) and cfg.get("model_type") == "gpt2":
        model, vocab, book, settings, metrics, names = huggingface.read_export(folder)
    else:
        mcfg = model_config(cfg, f"{folder}/config.json")
        check_fields(cfg.get("train", {}), DataConfig, f"{folder}/config.json", "train.")
        path = os.path.join(folder, "model.safetensors")
        sd = read_weights(path)
        vocab, book = load_tokens(folder, lambda v: check_size(v, mcfg, f"{folder}/vocab.json has {len(v)} tokens, "
                                                                        f"the model expects {mcfg.vocab_size}"))
        model = GPT(mcfg)
        load_weights(model, sd, path)
        metrics_path = os.path.join(folder, "metrics.json")
        metrics = check_metrics(read_json(metrics_path, "metrics.json"), metrics_path) \
            if os.path.exists(metrics_path) else None
        settings = cfg.get("train") or {}
        names = check_class_names(cfg["classes"], vocab, f"{folder}/config.json") if "classes" in cfg else None
    model = model.to(device) if backend == "torch" else onnx_model(folder, backend, model)  # onnxruntime: CPU
    ck = Checkpoint(model.eval(), vocab, book, settings if isinstance(settings, dict) else {},
                    metrics, folder, names)
    if names is None:   # written before checkpoints carried their class names
        ck.class_names = names_from_data(ck)
    return ck


def onnx_model(folder, backend, model):
    """The onnxruntime stand-in for `model` from folder/onnx/, checked against the weights' config."""
    if backend not in BACKENDS:
        raise UserError(f"--backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    path = os.path.join(folder, "onnx", QUANTIZED if backend == "onnx-int8" else GRAPH)
    if not os.path.isfile(path):
        how = " --quantize int8" if backend == "onnx-int8" else ""
        raise UserError(f"{path}: missing; write it with python hf_export.py --ckpt CHECKPOINT --onnx{how} "
                        f"and pass the export folder as --ckpt")
    onnx = OnnxGPT(path)
    if onnx.config != model.config:
        raise UserError(f"{path}: the graph's model ({onnx.config}) differs from {folder}'s weights ({model.config})")
    return onnx


def names_from_data(ck):
    """The class names of a checkpoint written before checkpoints carried them: from its data folder's
    report.json when it is there and matches the vocabulary, else '0', '1', ..."""
    path = os.path.join(ck.data_dir, "report.json") if ck.data_dir else None
    if path and os.path.exists(path):
        try:
            names = read_json(path, "report.json").get("classes")
        except (UserError, AttributeError):
            names = None
        if isinstance(names, list) and len(names) == ck.vocab.num_classes:
            if not all(isinstance(n, (str, int)) and not isinstance(n, bool) for n in names):
                raise UserError(f"{path}: classes must be a list of class names (strings), got {str(names)[:80]}")
            return [str(n) for n in names]
    return [str(c) for c in range(ck.vocab.num_classes)]


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
    check_finite_tensors(sd, where)
    model.load_state_dict(sd, strict=False)


def load_trainer_state(folder):
    path = os.path.join(resolve_dir(folder), "trainer_state.pt")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing: one line only
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; this checkpoint cannot be resumed") from None
    except pickle.UnpicklingError as e:  # torch's own text would suggest weights_only=False: never
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln), "")
        raise UserError(f"{path}: cannot load trainer state: refused, it holds Python objects other than "
                        f"tensors and plain data{' (' + why[:160] + ')' if why else ''}") from None
    except Exception as e:  # pickle refusals, truncation, foreign files: all one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        raise UserError(f"{path}: cannot load trainer state ({first[:200]})") from None
    return check_trainer_state(state, path)


def check_trainer_state(state, path):
    """What save() wrote as trainer_state.pt: a dict with the optimizer state, step, best accuracy,
    tokens, the RNG state, the losses since the last evaluation and (runs with a weight average) the
    trained weights; anything else is one line."""
    integer = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0
    want = {"optimizer": (lambda v: isinstance(v, dict), "the optimizer's state dict"),
            "step": (integer, "a step count"), "tokens": (integer, "a token count"),
            "best": (lambda v: v is None or isinstance(v, (int, float)) and not isinstance(v, bool), "a number or None"),
            "rng": (lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8, "a uint8 tensor (the RNG state)"),
            "history": (lambda v: isinstance(v, list), "a list of losses"),
            "weights": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                                             for k, t in v.items()), "a dict of named tensors")}
    if not isinstance(state, dict):
        raise UserError(f"{path}: holds a {type(state).__name__}, expected the trainer state this project saves")
    for k, (ok, what) in want.items():
        if k in ("history", "weights") and k not in state:
            continue
        if k not in state or not ok(state[k]):
            got = "nothing" if k not in state else type(state[k]).__name__
            raise UserError(f"{path}: {k} is {got}, expected {what}; not a trainer state of this project")
    return state
