"""The Hugging Face GPT-2 folder: writing one from a checkpoint (config, Conv1D-transposed weights,
word-level tokenizer, generation config, codebook, model card) and reading one back. Its checks against
transformers are in imagegpt/export_checks.py, its model card in model_card.py, the upload in hub.py.

The folder loads with `transformers` unchanged, no custom code:

    AutoModelForCausalLM.from_pretrained(folder)    # GPT2LMHeadModel
    AutoTokenizer.from_pretrained(folder)           # fast word-level tokenizer over vocab.json

It holds config.json (model_type gpt2), model.safetensors (GPT-2 names, Conv1D weights transposed
relative to nn.Linear, lm_head tied and so not stored), tokenizer.json, tokenizer_config.json,
special_tokens_map.json, generation_config.json (with the model's drawing defaults, so that generate()
samples as sample.py does), vocab.json, codebook.json + codebook.safetensors (tokens -> images),
train_config.json and metrics.json from the checkpoint, and README.md (model card).
Special tokens: bos = <IMG>, eos = <EOS>, pad = <PAD>, unk = <UNK>, cls = <CLS>.
"""
import math
import os

import torch

from safetensors.torch import save_file

from imagegpt.data_config import DataConfig
from imagegpt.device import check_memory, human_bytes
from imagegpt.errors import UserError
from imagegpt.files import (
    atomic_dir,
    check_finite_tensors,
    output_problem,
    read_json,
    read_weights,
    write_json,
    write_text,
)
from imagegpt.draw_settings import defaults
from imagegpt.metrics import check_metrics
from imagegpt.model_card import GUIDANCE_KEY, model_card
from imagegpt.onnx_export import export_onnx, quantize_int8
from imagegpt.settings import check_fields
from imagegpt.token_format import SPECIALS, check_class_names
from imagegpt.web_export import write_runtime_files
from model import GPT, GPTConfig
from tokenizer import load_tokens

# our nn.Linear weights stored by GPT-2 as Conv1D, i.e. transposed: (in_features, out_features)
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# GELU in its tanh form, as in our model.MLP; transformers has it under these names
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
LN_EPS = 1e-5
SPECIAL_ROLES = {"pad_token": "<PAD>", "unk_token": "<UNK>", "bos_token": "<IMG>",
                 "eos_token": "<EOS>", "cls_token": "<CLS>"}
EXTRA_SPECIAL = ["</IMG>"]   # the one special token without a standard role
FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
         "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "codebook.json",
         "codebook.safetensors", "README.md")


# ----------------------------------------------------------------------------- our model -> GPT-2

def gpt2_config(mcfg, vocab, class_names):
    """Our GPTConfig -> the dict of a transformers GPT2Config (config.json); the class names go where
    transformers keeps names of labels (id2label, label2id: label c is the token <CLS_c>)."""
    if not mcfg.bias:
        raise UserError("the model has no biases (bias: false); the GPT-2 format needs them, "
                        "so it cannot be exported")
    if mcfg.vocab_size != len(vocab):
        raise UserError(f"the model has {mcfg.vocab_size} token embeddings, vocab.json {len(vocab)} tokens")
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": mcfg.vocab_size,
        "n_positions": mcfg.block_size,
        "n_embd": mcfg.n_embd,
        "n_layer": mcfg.n_layer,
        "n_head": mcfg.n_head,
        "n_inner": None,                      # 4 * n_embd, as ours
        "activation_function": "gelu_new",    # GELU, tanh approximation
        "resid_pdrop": mcfg.dropout,
        "embd_pdrop": mcfg.dropout,
        "attn_pdrop": mcfg.dropout,
        "layer_norm_epsilon": LN_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": vocab.img_id,
        "eos_token_id": vocab.eos_id,
        "pad_token_id": vocab.pad_id,
        "unk_token_id": vocab.unk_id,
        "dtype": "float32",
        "id2label": {str(c): name for c, name in enumerate(class_names)},
        "label2id": {name: c for c, name in enumerate(class_names)},
    }


def to_gpt2_state_dict(model):
    """Our state dict -> GPT-2 tensor names ("transformer." prefix as transformers 5 saves them;
    the tied lm_head is not stored), nn.Linear weights transposed to Conv1D's (in, out) layout."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        v = v.detach().float().cpu()
        out[k] = (v.t() if k.endswith(CONV1D) else v).contiguous()
    return out


def tokenizer_json(vocab):
    """A tokenizers.Tokenizer: word-level model over our vocabulary, whitespace splitting, the six
    markers as special added tokens, and a decoder that joins tokens with single spaces."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers   # only an export needs it
    except ImportError:
        raise UserError("the export needs the tokenizers package (pip install tokenizers)") from None
    tok = Tokenizer(models.WordLevel(vocab.to_dict(), unk_token="<UNK>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # WordPiece's decoder puts a space before every token that does not start with its prefix; no
    # token of ours starts with "##", so this joins with single spaces (cleanup off keeps them).
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    if tok.get_vocab_size() != len(vocab):
        raise UserError(f"tokenizer has {tok.get_vocab_size()} tokens, the vocabulary {len(vocab)}")
    return tok.to_str(pretty=True)


def tokenizer_config(block_size):
    return {"tokenizer_class": "PreTrainedTokenizerFast", **SPECIAL_ROLES,
            "additional_special_tokens": EXTRA_SPECIAL, "model_max_length": block_size,
            "clean_up_tokenization_spaces": False, "padding_side": "right"}


def generation_config(ck):
    """generation_config.json: the token ids generate() needs, and the model's drawing defaults
    (draw_settings.defaults: a conditional model's are those of a drawing of a chosen class) in
    transformers' fields; the guidance scale, which transformers has no field for, under GUIDANCE_KEY."""
    vocab, d = ck.vocab, defaults(ck.conditional)
    return {"bos_token_id": vocab.img_id, "eos_token_id": vocab.eos_id, "pad_token_id": vocab.pad_id,
            "max_length": ck.model.config.block_size, "do_sample": not d.greedy, "temperature": d.temperature,
            "top_k": d.top_k, "top_p": d.top_p, GUIDANCE_KEY: d.guidance}


def is_export(folder):
    try:
        cfg = read_json(os.path.join(folder, "config.json"))
    except UserError:
        return False
    return isinstance(cfg, dict) and cfg.get("model_type") == "gpt2" and \
        os.path.exists(os.path.join(folder, "tokenizer.json"))


def default_out(ckpt_folder):
    """Where an export goes by default: hf/ next to the checkpoint folder (runs/demo/final -> runs/demo/hf)."""
    return os.path.join(os.path.dirname(os.path.abspath(ckpt_folder)), "hf")


def check_out(out):
    """An existing output folder is replaced only if it is empty or an earlier export."""
    if os.path.exists(out) and not (os.path.isdir(out) and (not os.listdir(out) or is_export(out))):
        raise UserError(f"{out}: exists and is not an earlier export; choose another --out or remove it")
    problem = output_problem(out)
    if problem:
        raise UserError(f"{out}: cannot write the export ({problem})")


def write_export(ck, out, repo_id=None, onnx=None):
    """Write the transformers folder for the checkpoint.Checkpoint `ck` to `out` (atomically).
    onnx "fp32": also onnx/model.onnx (imagegpt/onnx_export.py); "int8": that and onnx/model_quantized.onnx."""
    out = os.path.abspath(out)
    check_out(out)
    vocab, book, mcfg = ck.vocab, ck.codebook, ck.model.config
    config = gpt2_config(mcfg, vocab, ck.class_names)   # refuses a model without biases before writing anything
    tokenizer = tokenizer_json(vocab)
    with atomic_dir(out, "export") as tmp:
        save_file(to_gpt2_state_dict(ck.model), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        write_json(os.path.join(tmp, "config.json"), config)
        write_json(os.path.join(tmp, "generation_config.json"), generation_config(ck))
        write_text(os.path.join(tmp, "tokenizer.json"), tokenizer)
        write_json(os.path.join(tmp, "tokenizer_config.json"), tokenizer_config(mcfg.block_size))
        write_json(os.path.join(tmp, "special_tokens_map.json"),
                   {**SPECIAL_ROLES, "additional_special_tokens": EXTRA_SPECIAL})
        vocab.save(os.path.join(tmp, "vocab.json"))
        book.save(tmp)
        if ck.settings:
            write_json(os.path.join(tmp, "train_config.json"), ck.settings)
        if ck.metrics is not None:
            write_json(os.path.join(tmp, "metrics.json"), ck.metrics)
        if onnx:
            export_onnx(ck.model, tmp)
            if onnx == "int8":
                quantize_int8(tmp)
            write_runtime_files(ck, tmp)   # onnx/tokenizer.onnx, detokenizer.onnx, model.json (imagegpt/web_export.py)
        write_text(os.path.join(tmp, "README.md"), model_card(ck, repo_id, onnx))
    return out


# ----------------------------------------------------------------------------- GPT-2 folder -> our model

def _model_config(cfg, where):
    """Validate a GPT-2 config.json against what our model can represent -> GPTConfig."""
    def need(key, ok, what):
        if not ok(cfg.get(key)):
            raise UserError(f"{where}: {key} is {cfg.get(key)!r}; {what}")
    if cfg.get("model_type") != "gpt2":
        raise UserError(f"{where}: model_type is {cfg.get('model_type')!r}, expected 'gpt2'")
    pos_int = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        need(key, pos_int, "expected a positive integer")
    if cfg["n_embd"] % cfg["n_head"]:
        raise UserError(f"{where}: n_embd {cfg['n_embd']} is not divisible by n_head {cfg['n_head']}")
    need("activation_function", lambda v: v in TANH_GELU,
         f"this project's model uses GELU with the tanh approximation ({' or '.join(TANH_GELU)})")
    need("n_inner", lambda v: v in (None, 4 * cfg["n_embd"]), f"expected null or 4 * n_embd = {4 * cfg['n_embd']}")
    need("layer_norm_epsilon", lambda v: isinstance(v, (int, float)) and math.isclose(v, LN_EPS, rel_tol=1e-6),
         f"this project's LayerNorm uses {LN_EPS}")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False), ("tie_word_embeddings", True)):
        if cfg.get(key, want) != want:
            raise UserError(f"{where}: {key} is {cfg[key]!r}; this project's model needs {want!r}")
    dropout = cfg.get("resid_pdrop", 0.1)
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise UserError(f"{where}: resid_pdrop is {dropout!r}; expected a probability")
    mcfg = GPTConfig(vocab_size=cfg["vocab_size"], block_size=cfg["n_positions"], n_layer=cfg["n_layer"],
                     n_head=cfg["n_head"], n_embd=cfg["n_embd"], dropout=float(dropout), bias=True)
    n = mcfg.num_params_estimate()
    check_memory(4 * n, f"{where}: a model of {n:,} parameters ({human_bytes(4 * n)} of fp32 weights)")
    return mcfg


def from_gpt2_state_dict(sd, model, where):
    """GPT-2 tensors (with or without the "transformer." prefix) -> our state dict, checked."""
    own = model.state_dict()
    out, head = {}, None
    for k, v in sd.items():
        if k == "lm_head.weight":
            head = v
            continue
        name = k if k.startswith("transformer.") else "transformer." + k
        if name.endswith((".attn.bias", ".attn.masked_bias")) and name not in own:
            continue                               # causal-mask buffers of old GPT-2 checkpoints
        out[name] = v
    want = set(own) - {"lm_head.weight"}
    missing, extra = sorted(want - set(out)), sorted(set(out) - want)
    if missing or extra:
        hint = " (the GPT-2 format has biases on every layer)" if any(m.endswith("bias") for m in missing) else ""
        raise UserError(f"{where}: weights do not fit config.json: missing {missing[:3]}"
                        f"{' ...' if len(missing) > 3 else ''}, unexpected {extra[:3]}{hint}")
    for k, v in out.items():
        if not v.is_floating_point():
            raise UserError(f"{where}: {k} has dtype {v.dtype}, expected floating point weights")
        v = v.float()
        if k.endswith(CONV1D):
            v = v.t()
        if v.shape != own[k].shape:
            shape = tuple(v.t().shape) if k.endswith(CONV1D) else tuple(v.shape)
            need = tuple(own[k].t().shape) if k.endswith(CONV1D) else tuple(own[k].shape)
            raise UserError(f"{where}: {k} has shape {shape}, config.json needs {need}")
        out[k] = v.contiguous()
    check_finite_tensors(out, where)
    if head is not None and not torch.equal(head.float(), out["transformer.wte.weight"]):
        raise UserError(f"{where}: lm_head.weight differs from transformer.wte.weight; "
                        "this project's model ties them")
    return out


def read_export(folder):
    """Read a GPT-2 folder written by write_export() (or a GPT-2 model over our vocabulary with the
    codebook files added) -> (GPT, Vocab, Codebook, training settings dict, metrics or None, class names
    or None). Any mismatch is a one-line UserError."""
    if not os.path.isdir(folder):
        raise UserError(f"{folder}: no such folder")
    where = os.path.join(folder, "config.json")
    cfg = read_json(where, "config.json")
    if not isinstance(cfg, dict):
        raise UserError(f"{where}: expected a JSON object")
    mcfg = _model_config(cfg, where)
    def check_size(vocab):
        if len(vocab) != mcfg.vocab_size:
            raise UserError(f"{folder}: vocab.json has {len(vocab)} tokens, config.json says vocab_size "
                            f"{mcfg.vocab_size}")
    vocab, book = load_tokens(folder, check_size)
    path = os.path.join(folder, "model.safetensors")
    extra = " (sharded and pickled weights are not read; save with safetensors in one file)" \
        if any(os.path.exists(os.path.join(folder, f)) for f in ("model.safetensors.index.json", "pytorch_model.bin")) \
        else ""
    sd = read_weights(path, extra)
    model = GPT(mcfg)
    model.load_state_dict(from_gpt2_state_dict(sd, model, path), strict=False)
    optional = lambda name: (read_json(os.path.join(folder, name), name)
                             if os.path.exists(os.path.join(folder, name)) else None)
    settings, metrics = optional("train_config.json"), optional("metrics.json")
    if settings is not None:
        check_fields(settings, DataConfig, os.path.join(folder, "train_config.json"))
    if metrics is not None:
        check_metrics(metrics, os.path.join(folder, "metrics.json"))
    names = None
    if "id2label" in cfg:   # exports made before the class names travelled have none
        labels = cfg["id2label"]
        names = [labels.get(str(c)) for c in range(vocab.num_classes)] if isinstance(labels, dict) else labels
        names = check_class_names(names, vocab, f"{where}: id2label")
    return model, vocab, book, settings or {}, metrics, names


