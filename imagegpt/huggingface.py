"""The Hugging Face GPT-2 folder: writing one from a checkpoint (config, Conv1D-transposed weights,
word-level tokenizer, generation config, codebook, model card), reading one back, checking parity
with transformers, and uploading to the Hub.

The folder loads with `transformers` unchanged, no custom code:

    AutoModelForCausalLM.from_pretrained(folder)    # GPT2LMHeadModel
    AutoTokenizer.from_pretrained(folder)           # fast word-level tokenizer over vocab.json

It holds config.json (model_type gpt2), model.safetensors (GPT-2 names, Conv1D weights transposed
relative to nn.Linear, lm_head tied and so not stored), tokenizer.json, tokenizer_config.json,
special_tokens_map.json, generation_config.json, vocab.json, codebook.json + codebook.safetensors
(tokens -> images), train_config.json and metrics.json from the checkpoint, and README.md (model card).
Special tokens: bos = <IMG>, eos = <EOS>, pad = <PAD>, unk = <UNK>, cls = <CLS>.
"""
import math
import os

import torch

from imagegpt.data_config import DataConfig
from imagegpt.decoding import generate
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
from imagegpt.metrics import check_metrics
from imagegpt.onnx_export import export_onnx, quantize_int8
from imagegpt.settings import check_fields
from imagegpt.token_format import COLOUR_TOKENS, SPECIALS, Vocab, check_class_names
from imagegpt.web_export import CLIENT, write_runtime_files
from model import GPT, GPTConfig
from tokenizer import check_vocab, load_codebook

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
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
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


def generation_config(vocab, block_size):
    return {"bos_token_id": vocab.img_id, "eos_token_id": vocab.eos_id, "pad_token_id": vocab.pad_id,
            "max_length": block_size}


def _fmt(x):
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def model_card(mcfg, vocab, book, metrics, train, n_params, repo_id=None, onnx=None, class_names=None):
    """README.md: YAML metadata, what the model is, the stored metrics, and usage snippets."""
    names = class_names or [str(c) for c in range(vocab.num_classes)]
    lines = card_intro(mcfg, vocab, book, n_params, names) + card_evaluation(metrics, train, names)
    lines += card_usage(vocab, book, repo_id)
    if onnx:
        lines += card_onnx(vocab, onnx) + card_client(vocab)
    if train.get("cond_fraction"):
        lines += card_drawing(vocab, book, train)
    return "\n".join(lines)


def card_intro(mcfg, vocab, book, n_params, names):
    L, C = book.seq_len, vocab.num_classes
    tags = ["gpt2", "image-generation", "image-classification", "image-tokens", "kmeans-codebook",
            "nanogpt"]
    lines = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags:"]
    lines += [f"- {t}" for t in tags]
    lines += ["---", "", "# A small GPT that reads and writes images as tokens", "",
              f"A GPT-2-architecture causal language model ({n_params / 1e6:.2f} M parameters: "
              f"{mcfg.n_layer} layers, {mcfg.n_head} heads, {mcfg.n_embd} wide, context {mcfg.block_size}) "
              "trained from scratch on images turned into token sequences by a k-means codebook. The class "
              "label is the last real token, so one model both classifies and generates images.", "",
              f"Classes ({len(names)}, label c is the token `<CLS_c>`; also in config.json's `id2label`): "
              + ", ".join(f"{c} `{n}`" for c, n in enumerate(names)) + ".", "",
              "## Token format", "",
              card_image(book, vocab, L) + " "
              f"Vocabulary ({len(vocab)} ids): 0..5 `<PAD> <UNK> <IMG> </IMG> <CLS> <EOS>`, "
              f"{vocab.code_offset}..{vocab.label_offset - 1} `{vocab.tokens[vocab.code_offset]}` ... "
              f"`{vocab.tokens[vocab.label_offset - 1]}`, {vocab.label_offset}..{len(vocab) - 1} "
              f"`<CLS_0>` ... `<CLS_{C - 1}>`. The tokenizer splits on whitespace; "
              "bos = `<IMG>`, eos = `<EOS>`, pad = `<PAD>`.", "",
              "`codebook.json` and `codebook.safetensors` hold the codebook, so token sequences (real or "
              "generated) can be rendered to images again with the project's `tokenizer.py` "
              "(`load_codebook(folder).decode_ids(ids, Vocab.load(folder + '/vocab.json'))`).", ""]
    return lines


def card_image(book, vocab, L):
    """The model card's sentence on how one image is written, for either kind of codebook."""
    patches = (f"{book.grid[0]} x {book.grid[1]} patches of {book.cfg.patch_size} x {book.cfg.patch_size} pixels of "
               f"a {book.image_size[0]} x {book.image_size[1]} image")
    if not vocab.palette:
        return (f"One image is `<IMG> <Z_k> x {L} </IMG> <CLS> <CLS_y> <EOS>`: {L} codes ({patches} with "
                f"{book.channels} channel(s), raster order) from a codebook of {vocab.num_codes} entries, then the label.")
    n = L - COLOUR_TOKENS
    return (f"One image is `<IMG> <C_a> <D_b> <C_c> <D_d> <Z_k> x {n} </IMG> <CLS> <CLS_y> <EOS>`: shape apart from "
            f"colour. First its two colours, the ground's and the figure's, each the nearest of {vocab.palette} palette "
            f"colours `<C_k>` plus the nearest of {vocab.palette} corrections `<D_k>`; then {n} colour-free pattern codes "
            f"({patches}, raster order; each says where the pixels lie between the two colours) from "
            f"{vocab.num_codes} patterns; then the label.")


def card_evaluation(metrics, train, names):
    lines = ["## Evaluation", ""]
    if metrics:
        n = metrics.get("n_sequences")
        split = {"dev": "the development split (carved from the training images)"}.get(
            metrics.get("split"), "the split it was evaluated on during training")
        chosen = f" This checkpoint: {metrics['chosen']}." if metrics.get("chosen") else ""
        lines += [f"On {split} ({n} sequences; data source `{train.get('source', '?')}`); the held-out test split is reported by the "
                  f"project's `eval.py`, not here.{chosen} Classification takes "
                  "the logits at `<CLS>` and picks the largest among the label tokens only.", "",
                  "| metric | value |", "|---|---|"]
        names = [("accuracy", "classification accuracy"), ("perplexity", "perplexity (all real tokens)"),
                 ("token_accuracy", "next-token accuracy"), ("image_perplexity", "image-token perplexity"),
                 ("image_token_accuracy", "image-token accuracy"), ("label_perplexity", "label-token perplexity"),
                 ("loss", "loss (nats/token)")]
        lines += [f"| {label} | {_fmt(metrics[k])} |" for k, label in names if k in metrics]
        for k, v in (metrics.get("topk_accuracy") or {}).items():
            lines.append(f"| top-{k} classification accuracy | {_fmt(v)} |")
        per = metrics.get("per_class_accuracy")
        if per:
            lines += ["", "Per class: " + ", ".join(f"{n}: {a:.3f}" for n, a in zip(names, per)) + "."]
    else:
        lines.append("No evaluation metrics were stored with this checkpoint.")
    if train:
        keys = ("epochs", "batch_size", "lr", "max_length", "patch_size", "num_codes", "augment")
        lines += ["", "## Training", "", "Plain PyTorch (nanoGPT style), cross entropy over all real next "
                  "tokens: " + ", ".join(f"{k} {train[k]}" for k in keys if k in train) + "."]
    return lines


def card_usage(vocab, book, repo_id):
    L, C = book.seq_len, vocab.num_classes
    where = repo_id or "path/to/this/folder"
    return ["", "## Usage", "", "```python", "import torch",
           "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
           f'repo = "{where}"',
           "tok = AutoTokenizer.from_pretrained(repo)",
           "model = AutoModelForCausalLM.from_pretrained(repo).eval()", "",
           "# sample an image and its label: <IMG> <Z_...> ... </IMG> <CLS> <CLS_y> <EOS>",
           'prompt = tok("<IMG>", return_tensors="pt").input_ids',
           "torch.manual_seed(0)",
           "out = model.generate(prompt, do_sample=True, top_p=0.9)  # stops at <EOS>",
           "print(tok.decode(out[0]))", "",
           "# classify: the logits at <CLS> over the label tokens only",
           f"labels = tok.convert_tokens_to_ids([f\"<CLS_{{c}}>\" for c in range({C})])",
           f"image = out[0, :{L + 1}].tolist()  # <IMG> and the {L} code tokens (use a real image's here)",
           'ids = torch.tensor([image + tok.convert_tokens_to_ids(["</IMG>", "<CLS>"])])',
           "with torch.no_grad():",
           "    scores = model(ids).logits[0, -1, labels]",
           'print("class", scores.argmax().item(), scores.softmax(-1).tolist())',
           "```", ""]


def card_onnx(vocab, onnx):
    C = vocab.num_classes
    graphs = "`onnx/model.onnx`" + (" and `onnx/model_quantized.onnx` (int8 weights)" if onnx == "int8" else "")
    return ["## ONNX", "",
           f"{graphs}: the decoder with its key/value cache, with the inputs and outputs of a Hugging Face "
           "GPT-2 decoder with past (`input_ids`, `attention_mask`, `position_ids`, "
           "`past_key_values.{i}.key/value` -> `logits`, `present.{i}.key/value`); `onnx/export.json` "
           "lists opset and shapes. Classify with onnxruntime and numpy only:", "",
           "```python", "import json, numpy as np, onnxruntime as ort",
           'vocab = json.load(open("vocab.json"))',
           's = ort.InferenceSession("onnx/model.onnx")',
           f"ids = np.array([[vocab[t] for t in \"<IMG> {' '.join(['<Z_000>'] * 3)} </IMG> <CLS>\".split()]])"
           "  # a real image's codes here",
           "past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in s.get_inputs()[3:]}",
           'logits = s.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids), '
           '"position_ids": np.arange(ids.shape[1])[None], **past})[0]',
           f'print("class", logits[0, -1, vocab["<CLS_0>"]:vocab["<CLS_0>"] + {C}].argmax())',
           "```", ""]


def card_client(vocab):
    """The torch-free client: onnxruntime, numpy and Pillow, with the image tokenizer's graphs."""
    return ["### Without PyTorch", "",
            "`onnx/tokenizer.onnx` turns an image of the model's size into its codes and `onnx/detokenizer.onnx` "
            "codes back into an image, exactly as the project's codebook does; `onnx/model.json` holds the "
            "classes, the image size and the token layout. Classify an image file and draw a chosen class "
            "with guidance (`pip install onnxruntime numpy pillow`):", "",
            "```python", CLIENT.format(folder="onnx/", image="image.png", label=vocab.num_classes - 1), "```", ""]


def card_drawing(vocab, book, train):
    L = book.seq_len
    return ["## Draw a chosen class", "",
           "This model was also trained on class-conditioned sequences that state the class before the "
           "image and have no label after it: `<CLS_y> <IMG> <Z_k> ... </IMG> <EOS>`, and (for a share "
           f"{train.get('cond_drop')} of them) `<UNK> <IMG> ... </IMG> <EOS>`, where `<UNK>` (id "
           f"{vocab.unk_id}) means \"no class stated\". The classifier above never sees a stated class. "
           f"To draw a 7, prompt `<CLS_7> <IMG>` (`model.generate(cond, do_sample=True)` is plain "
           "conditional sampling); classifier-free guidance decodes the unconditional prompt "
           "`<UNK> <IMG>` beside it and samples from `uncond + scale * (cond - uncond)`:", "",
           "```python", GUIDANCE_SNIPPET.format(L=L), "```", ""]


# the model card's guidance example; tests run it against an export (`model`, `tok` and `torch` defined)
GUIDANCE_SNIPPET = """\
digit, scale = 7, 3.0
ids = tok([f"<CLS_{{digit}}> <IMG>", "<UNK> <IMG>"], return_tensors="pt").input_ids   # cond, uncond
eos = tok.convert_tokens_to_ids("<EOS>")
torch.manual_seed(0)
with torch.no_grad():
    for _ in range({L} + 2):                     # {L} codes, </IMG>, <EOS>
        cond, uncond = model(ids).logits[:, -1]
        guided = uncond + scale * (cond - uncond)
        nxt = torch.multinomial(guided.softmax(-1), 1)
        ids = torch.cat([ids, nxt.expand(2, 1)], 1)        # the same token for both rows
        if nxt.item() == eos:
            break
print(tok.decode(ids[0]))   # <CLS_7> <IMG> <Z_...> ... </IMG> <EOS>; draw it with the codebook"""


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
    from safetensors.torch import save_file
    out = os.path.abspath(out)
    check_out(out)
    vocab, book, mcfg = ck.vocab, ck.codebook, ck.model.config
    config = gpt2_config(mcfg, vocab, ck.class_names)   # refuses a model without biases before writing anything
    tokenizer = tokenizer_json(vocab)
    with atomic_dir(out, "export") as tmp:
        save_file(to_gpt2_state_dict(ck.model), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        write_json(os.path.join(tmp, "config.json"), config)
        write_json(os.path.join(tmp, "generation_config.json"), generation_config(vocab, mcfg.block_size))
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
        write_text(os.path.join(tmp, "README.md"),
                   model_card(mcfg, vocab, book, ck.metrics, ck.settings, ck.model.num_params(), repo_id, onnx,
                              ck.class_names))
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
    vocab = Vocab.load(os.path.join(folder, "vocab.json"))
    if len(vocab) != mcfg.vocab_size:
        raise UserError(f"{folder}: vocab.json has {len(vocab)} tokens, config.json says vocab_size "
                        f"{mcfg.vocab_size}")
    path = os.path.join(folder, "model.safetensors")
    extra = " (sharded and pickled weights are not read; save with safetensors in one file)" \
        if any(os.path.exists(os.path.join(folder, f)) for f in ("model.safetensors.index.json", "pytorch_model.bin")) \
        else ""
    sd = read_weights(path, extra)
    model = GPT(mcfg)
    model.load_state_dict(from_gpt2_state_dict(sd, model, path), strict=False)
    book = load_codebook(folder)
    check_vocab(book, vocab, folder)
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


# ----------------------------------------------------------------------------- parity check

@torch.no_grad()
def check_parity(model, folder, vocab, batch=4, seed=0):
    """Load `folder` with transformers and compare with our model: max |logit difference| on random
    sequences, greedy generation, and the tokenizer's ids. Needs transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf, load_info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    hf.eval()
    tok = AutoTokenizer.from_pretrained(folder)
    model = model.eval()
    T = model.config.block_size
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(len(vocab), (batch, T), generator=g)
    diff = (hf(x, attention_mask=torch.ones_like(x)).logits - model(x)[0]).abs().max().item()
    prompt = torch.cat([torch.full((batch, 1), vocab.img_id),
                        torch.randint(vocab.code_offset, vocab.label_offset, (batch, 3), generator=g)], 1)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()   # generate() drops the all-ones mask on later steps, then warns of padding
    try:
        theirs = hf.generate(prompt, do_sample=False, max_length=T, attention_mask=torch.ones_like(prompt))
    finally:
        hf_logging.set_verbosity(level)
    rows = [r["ids"] for r in generate(model, prompt.tolist(), vocab, T - prompt.shape[1], greedy=True)]
    width = max(len(r) for r in rows)   # generate() pads rows that ended early, as here
    ours = torch.tensor([r + [vocab.pad_id] * (width - len(r)) for r in rows])
    seq = vocab.decode(x[0].tolist())
    return {"max_abs_logit_diff": diff, "greedy_equal": torch.equal(theirs, ours),
            "greedy_tokens": int(ours.shape[1] - prompt.shape[1]),
            "tokenizer_equal": tok(seq)["input_ids"] == x[0].tolist() and tok.decode(x[0].tolist()) == seq,
            "load_problems": {k: v for k, v in load_info.items() if v}}


# ----------------------------------------------------------------------------- upload

def check_repo_id(repo_id):
    if not isinstance(repo_id, str) or not repo_id or repo_id.count("/") > 1 or \
            any(not part or part.startswith((".", "-")) or any(c.isspace() for c in part)
                for part in repo_id.split("/")):
        raise UserError(f"--push_to_hub: {repo_id!r} is not a repository id (name or owner/name)")


def upload_plan(folder, repo_id, private=False):
    """What push_to_hub() sends: {"repo_id", "private", "files": paths relative to folder}."""
    check_repo_id(repo_id)
    files = sorted(os.path.relpath(os.path.join(d, f), folder).replace(os.sep, "/")
                   for d, _, fs in os.walk(folder) for f in fs)
    missing = [f for f in FILES if f not in files]
    if missing:
        raise UserError(f"{folder}: not a complete export (missing {', '.join(missing)})")
    return {"repo_id": repo_id, "private": bool(private), "files": files}


def hub_token():
    """The token from HF_TOKEN or a stored `hf auth login`; a UserError when there is none."""
    try:
        import huggingface_hub
    except ImportError:
        raise UserError("--push_to_hub needs huggingface_hub (pip install huggingface_hub)") from None
    token = huggingface_hub.get_token()
    if not token:
        raise UserError("no Hugging Face token: set HF_TOKEN or run `hf auth login`, then retry")
    return token


def push_to_hub(folder, repo_id, private=False, token=None, log=print):
    """Create the repository (if needed) and upload the folder; returns the plan that was sent."""
    plan = upload_plan(folder, repo_id, private)
    token = token or hub_token()
    import huggingface_hub
    api = huggingface_hub.HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=plan["private"], repo_type="model", exist_ok=True)
        repo_id = getattr(url, "repo_id", None) or repo_id
        api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                          allow_patterns=plan["files"], commit_message="Upload image GPT (GPT-2 format)")
    except Exception as e:  # HTTP errors, no network, bad token: all one line
        msg = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise UserError(f"upload to {repo_id} failed: {msg}") from None
    log(f"uploaded {len(plan['files'])} files to https://huggingface.co/{repo_id}"
        f"{' (private)' if plan['private'] else ''}")
    return plan
