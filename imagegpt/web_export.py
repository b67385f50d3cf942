"""The model outside this repository: what a runtime needs besides the GPT's graph (the image tokenizer
as ONNX, model.json, the parity of both with tokenizer.py), the torch-free client, and the static page.

    write_runtime_files(ck, folder)   -> folder/onnx/tokenizer.onnx, detokenizer.onnx, model.json, and the
                                         tokenizer's parity in folder/onnx/export.json (hf_export.py --onnx)
    choose_graph(ck, export)          the GPT graph for the page: int8 where it keeps the results
    write_site(export, out, int8)     -> out/: a folder any static file server serves (hf_export.py --web)
    client(folder, image, label)      the client in the README and the model card: onnxruntime, numpy and
                                         Pillow only (the plain file client.py.template)

The static folder:
    index.html      static/index.html, run in the browser (<body data-backend="browser">)
    static/         the page's JavaScript and CSS: the same files serve.py serves
    model.json      the model's facts: classes, image size, channels, token layout, drawing defaults
    onnx/           tokenizer.onnx, model_quantized.onnx where int8 keeps the results (else model.onnx),
                    detokenizer.onnx
    ort/            onnxruntime-web's WebAssembly build (its ES module and .wasm), copied from
                    node_modules/ after `npm ci` (the version pinned in package.json and package-lock.json)
"""
import os
import shutil
import string

import numpy as np

from imagegpt import draw_settings
from imagegpt.errors import UserError
from imagegpt.files import atomic_dir, read_json, write_json, write_text
from imagegpt.metrics import class_probs
from imagegpt.onnx_export import GRAPH, INFO, QUANTIZED
from imagegpt.onnx_runtime import OnnxGPT
from imagegpt.onnx_tokenizer import DETOKENIZER, TOKENIZER, export_tokenizer, tokenizer_parity
from imagegpt.split_images import test_images
from imagegpt.token_format import COLOUR_TOKENS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))     # the repository
STATIC = os.path.join(ROOT, "static")
ORT = "onnxruntime-web"
ORT_FILES = ("ort.wasm.bundle.min.mjs", "ort-wasm-simd-threaded.wasm")   # the module (its glue inside) and the binary
MODEL_JSON = "model.json"
FORMAT = "imagegpt-tokens model.json 1"
PAGE_BACKEND = '<body data-backend="service">'


def model_facts(ck, graph=GRAPH):
    """model.json: what a runtime outside this repository needs to know about the model."""
    v, book, cfg = ck.vocab, ck.codebook, ck.model.config
    return {
        "format": FORMAT,
        "classes": list(ck.class_names),
        "image_size": list(book.image_size), "channels": book.channels, "patch_size": book.cfg.patch_size,
        "seq_len": book.seq_len, "block_size": cfg.block_size, "vocab_size": len(v),
        "n_layer": cfg.n_layer, "n_head": cfg.n_head, "head_dim": cfg.n_embd // cfg.n_head,
        "parameters": ck.model.num_params(),
        "tokens": {"pad": v.pad_id, "unk": v.unk_id, "img": v.img_id, "img_end": v.img_end_id, "cls": v.cls_id,
                   "eos": v.eos_id, "code_offset": v.code_offset, "num_codes": v.num_codes, "palette": v.palette,
                   "colour_tokens": COLOUR_TOKENS if v.palette else 0,
                   "label_offset": v.label_offset, "num_classes": v.num_classes},
        "code_ranges": [list(r) for r in v.code_ranges(book.seq_len)],
        "conditional": ck.conditional, "guidance": draw_settings.FOR_A_CLASS.guidance,
        "temperature": draw_settings.FOR_A_CLASS.temperature,
        "graphs": {"tokenizer": TOKENIZER, "model": graph, "detokenizer": DETOKENIZER},
    }


def write_runtime_files(ck, folder):
    """folder/onnx/: tokenizer.onnx and detokenizer.onnx (imagegpt/onnx_tokenizer.py), model.json, and in
    export.json the graphs' parity with tokenizer.py on the checkpoint's test images (without them, on
    random images and every code). Returns the parity."""
    export_tokenizer(ck.codebook, folder)
    images, _, data = test_images(ck)
    if images is None:
        H, W = ck.codebook.image_size
        images = np.random.default_rng(0).integers(0, 256, (256, H, W, ck.codebook.channels), dtype=np.uint8)
        data = f"256 random images: {data}"
    parity = {"data": data, **tokenizer_parity(ck.codebook, folder, images)}
    info_path = os.path.join(folder, "onnx", INFO)
    info = read_json(info_path, INFO)
    info["tokenizer"] = {
        "graphs": [TOKENIZER, DETOKENIZER],
        "tokenizer": "images uint8 (batch_size, H, W, C), the model's size, channels last -> codes int64 "
                     "(batch_size, L): code k of each patch (token id code_offset + k), raster order",
        "detokenizer": "codes int64 (batch_size, L), -1 = missing (black) -> images float32 (batch_size, H, W, C) in [0, 1]",
        "parity": parity,
    }
    write_json(info_path, info)
    write_json(os.path.join(folder, "onnx", MODEL_JSON), model_facts(ck))
    return parity


# ----------------------------------------------------------------------------- the static page

def ort_dist(root=ROOT):
    """node_modules/onnxruntime-web/dist, checked to be the version package-lock.json pins."""
    lock_path = os.path.join(root, "package-lock.json")
    want = (read_json(lock_path, "package-lock.json").get("packages", {}).get(f"node_modules/{ORT}") or {}).get("version")
    pkg = os.path.join(root, "node_modules", ORT, "package.json")
    if not os.path.exists(pkg):
        raise UserError(f"{ORT} is not installed: run `npm ci` in {root} first (it installs the version pinned in "
                        f"package-lock.json, {want})")
    have = read_json(pkg, "package.json").get("version")
    if have != want:
        raise UserError(f"node_modules/{ORT} is version {have}, package-lock.json pins {want}: run `npm ci` again")
    dist = os.path.join(root, "node_modules", ORT, "dist")
    missing = [f for f in ORT_FILES if not os.path.isfile(os.path.join(dist, f))]
    if missing:
        raise UserError(f"{dist}: {', '.join(missing)} missing; run `npm ci` again")
    return dist, have


def check_site_out(out):
    """An existing folder is replaced only if it is empty or an earlier static export."""
    if os.path.exists(out) and not (os.path.isdir(out) and (not os.listdir(out) or is_site(out))):
        raise UserError(f"{out}: exists and is not an earlier static export (--web); choose another folder or remove it")


def is_site(folder):
    try:
        facts = read_json(os.path.join(folder, MODEL_JSON))
    except UserError:
        return False
    return isinstance(facts, dict) and facts.get("format") == FORMAT and os.path.isfile(os.path.join(folder, "index.html"))


INT8_AGREEMENT = 0.99    # int8 keeps the results: the same class for at least this share of the test images
INT8_ACCURACY_LOSS = 0.002   # and an accuracy at most this much lower than float32's (1 image in 500)


def choose_graph(ck, export):
    """The GPT graph the page runs: onnx/model_quantized.onnx (int8 weights: smaller, and faster in
    WebAssembly) where it keeps the results, that is where its classification of the checkpoint's test
    images agrees with onnx/model.onnx's on at least INT8_AGREEMENT of them and its accuracy is at most
    INT8_ACCURACY_LOSS lower; onnx/model.onnx otherwise, and where there are no test images to tell.
    Returns what was decided and on what: {"graph", "why", "data", "accuracy", "agreement"}."""
    images, labels, data = test_images(ck)
    if images is None or not os.path.isfile(os.path.join(export, "onnx", QUANTIZED)):
        why = data if images is None else f"no {QUANTIZED} in the export"
        return {"graph": GRAPH, "why": f"float32: int8 is not judged ({why})", "data": data}
    prefixes = ck.encode_images(images)
    # one image per call, as the page classifies (int8 quantises activations per call, so batches differ)
    preds = {k: class_probs(ck.with_model(OnnxGPT(os.path.join(export, "onnx", g), threads=1)), prefixes,
                            batch_size=1).argmax(1).numpy() for k, g in (("fp32", GRAPH), ("int8", QUANTIZED))}
    acc = {k: float((p == labels).mean()) for k, p in preds.items()}
    agree = float((preds["fp32"] == preds["int8"]).mean())
    keeps = agree >= INT8_AGREEMENT and acc["int8"] >= acc["fp32"] - INT8_ACCURACY_LOSS
    why = (f"int8 {'keeps' if keeps else 'does not keep'} the results on {data}: accuracy {100 * acc['int8']:.2f} % "
           f"against {100 * acc['fp32']:.2f} % in float32, the same class for {100 * agree:.1f} % of the images")
    return {"graph": QUANTIZED if keeps else GRAPH, "why": why, "data": data, "accuracy": acc, "agreement": agree}


def write_site(export, out, int8=False, static=STATIC, root=ROOT, choice=None):
    """The static page of an export folder written with --onnx (its onnx/ graphs and model.json) -> out/
    (written atomically). int8: the page runs onnx/model_quantized.onnx instead of model.onnx (the
    tokenizer graphs stay float32: they must give tokenizer.py's codes); choice: how that was decided
    (choose_graph), kept in model.json. Returns {file: bytes}."""
    out = os.path.abspath(out)
    check_site_out(out)
    dist, version = ort_dist(root)
    graph = QUANTIZED if int8 else GRAPH
    src = os.path.join(export, "onnx")
    for f in (MODEL_JSON, TOKENIZER, DETOKENIZER, graph):
        if not os.path.isfile(os.path.join(src, f)):
            raise UserError(f"{os.path.join(src, f)}: missing; export with --onnx{' --quantize int8' if int8 else ''} first")
    facts = read_json(os.path.join(src, MODEL_JSON), MODEL_JSON)
    draw_settings.from_json(facts, os.path.join(src, MODEL_JSON), for_a_class=True)   # the page draws with them
    facts["graphs"]["model"] = graph
    facts["onnxruntime_web"] = version
    if choice:
        facts["graph_choice"] = choice
    with open(os.path.join(static, "index.html"), encoding="utf-8") as f:
        page = f.read()
    if page.count(PAGE_BACKEND) != 1:
        raise UserError(f"{static}/index.html: expected one {PAGE_BACKEND!r} to switch to the browser backend")
    with atomic_dir(out, "static page") as tmp:
        write_text(os.path.join(tmp, "index.html"), page.replace(PAGE_BACKEND, '<body data-backend="browser">'))
        shutil.copytree(static, os.path.join(tmp, "static"), ignore=shutil.ignore_patterns("index.html"))
        os.makedirs(os.path.join(tmp, "onnx"))
        for f in (TOKENIZER, DETOKENIZER, graph):
            shutil.copyfile(os.path.join(src, f), os.path.join(tmp, "onnx", f))
        os.makedirs(os.path.join(tmp, "ort"))
        for f in ORT_FILES:
            shutil.copyfile(os.path.join(dist, f), os.path.join(tmp, "ort", f))
        write_json(os.path.join(tmp, MODEL_JSON), facts)
    return {os.path.relpath(os.path.join(d, f), out): os.path.getsize(os.path.join(d, f))
            for d, _, fs in os.walk(out) for f in fs}


# ----------------------------------------------------------------------------- the client

CLIENT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "client.py.template")


def client(folder, image, label):
    """The torch-free client (README, model card; tests run it in a virtual environment without torch): an
    image file -> class probabilities, and a drawing of a chosen class with guidance, from the plain file
    CLIENT with its $folder (the onnx/ folder of an export), $image and $label (the example's image file
    and class index) filled in."""
    with open(CLIENT, encoding="utf-8") as f:
        return string.Template(f.read()).substitute(folder=folder, image=image, label=label).rstrip("\n")
