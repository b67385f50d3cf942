"""The model card (README.md) of a Hugging Face export: what the model is, its token format, the metrics it
was stored with, its drawing defaults, and usage snippets (transformers, ONNX, the torch-free client,
drawing a chosen class with guidance)."""
from imagegpt.draw_settings import defaults
from imagegpt.token_format import COLOUR_TOKENS
from imagegpt.web_export import client

GUIDANCE_KEY = "imagegpt_guidance"   # generation_config.json: the guidance scale (transformers has no such field)


def _fmt(x):
    return f"{x:.4f}" if isinstance(x, float) else str(x)


def model_card(ck, repo_id=None, onnx=None):
    """README.md of the checkpoint's export: YAML metadata, what the model is, the stored metrics, the
    drawing defaults generate() takes from generation_config.json, and usage snippets."""
    vocab, book, train = ck.vocab, ck.codebook, ck.settings
    lines = card_intro(ck.model.config, vocab, book, ck.model.num_params(), ck.class_names)
    lines += card_evaluation(ck.metrics, train, ck.class_names) + card_usage(vocab, book, repo_id)
    lines += card_generation(ck)
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


def card_generation(ck):
    """How generate() draws by default: generation_config.json holds the model's drawing defaults."""
    d = defaults(ck.conditional)
    guidance = (f"The guidance scale of a drawing of a chosen class ({d.guidance:g}) is stored under the key "
                f"`{GUIDANCE_KEY}`: transformers has no field that means it (its `guidance_scale` would guide against "
                "the prompt's last token, not against `<UNK> <IMG>`), so `generate()` leaves it alone; the guidance "
                "example below and `onnx/model.json` use it." if ck.conditional else
                f"`{GUIDANCE_KEY}` (no transformers field) is {d.guidance:g}: this model was trained without "
                "class-conditioned sequences, so it draws no chosen class and takes no guidance.")
    return ["### Drawing defaults", "",
            f"`generation_config.json` holds this model's drawing settings, so `model.generate(prompt)` samples "
            f"with them unless told otherwise: `do_sample` {str(not d.greedy).lower()}, `temperature` "
            f"{d.temperature:g}, `top_k` {d.top_k} (off; transformers' own default would be 50), `top_p` {d.top_p:g}. "
            + guidance, ""]


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
            "```python", client("onnx/", "image.png", vocab.num_classes - 1), "```", ""]


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
