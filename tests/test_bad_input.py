"""Bad input, command by command: every command (data.py, train.py, eval.py, sample.py, hf_export.py)
is handed broken files and impossible settings, and each time it must

  - exit with a non-zero status (2 for a mistake in the input, 1 for an OSError such as a full disk),
  - print exactly one line on stderr, "error: ...", naming the file (and the line, where there is one)
    and what was expected; progress bars are not counted (what a terminal shows after the carriage
    returns), but the message must get a line of its own,
  - print no Python traceback,
  - leave no partial output: the output paths do not exist afterwards, and the case's own folder and
    the shared data and run folders are unchanged (no temporary files either).

The table below builds each case's broken input in its own folder. One case per command runs as a real
`python <script>.py ...` subprocess; the rest call the script's main() in this process through
cli.run_cli with sys.argv patched (the same code path, without ~3 s of torch import each). A shared
fixture prepares one tiny data folder (60 grey 8x8 images, 3 classes, 2x2 patches, 8 codes) and trains
one tiny checkpoint (2 layers, 32 wide, 6 steps) once for the whole module.
"""
import contextlib
import errno
import gzip
import importlib
import io
import json
import os
import pickle
import re
import shutil
import struct
import subprocess
import sys
import traceback
import warnings
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fixtures import ROOT, write_images
from PIL import Image

from imagegpt import checkpoint, cli
from imagegpt.settings import build, changed
from imagegpt.token_format import Vocab
from imagegpt.train_config import TrainConfig
from imagegpt.training import train
from model import GPT, GPTConfig

BAR = re.compile(r"^[^:]*: *\d+%\|")   # a tqdm progress bar line


def terminal_lines(stderr):
    """What a terminal shows of stderr: for each line the text after its last carriage return, without
    blank lines and progress bars. A message printed right after a bar that was not closed shares its
    line and is dropped here, so that case fails the one-line check, as it should."""
    lines = [ln.split("\r")[-1].strip() for ln in stderr.split("\n")]
    return [ln for ln in lines if ln and not BAR.match(ln)]


# ----------------------------------------------------------------------------- shared fixture

class Evil:
    """Unpickling this runs a shell command that creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


TINY = dict(image_size=8, patch_size=2, num_codes=8, kmeans_iters=3, n_layer=2, n_head=2, n_embd=32,
            max_length=32, batch_size=8, epochs=1, eval_every=3, lr=1e-3, warmup_steps=2, seed=1, device="cpu")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("bad"))
    images, data, run = (os.path.join(tmp, n) for n in ("images", "data", "run"))
    write_images(images)
    cfg = build(TrainConfig, source=f"folder:{images}", data_dir=data, out_dir=run, **TINY)
    train(changed(cfg), log=lambda *a: None)
    afile = os.path.join(tmp, "afile")
    with open(afile, "w") as f:
        f.write("a regular file\n")
    with open(os.path.join(data, "test.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    train_args = [a for k, v in TINY.items() for a in (f"--{k}", str(v))] + ["--source", f"folder:{images}"]
    return SimpleNamespace(tmp=tmp, images=images, data=data, run=run, final=os.path.join(run, "final"),
                           val=os.path.join(data, "test.jsonl"), recs=recs, afile=afile, train_args=train_args,
                           marker=os.path.join(tmp, "pwned"))


# ----------------------------------------------------------------------------- broken inputs

def write_lines(path, lines):
    """lines: dicts (as JSON), str or bytes, each ending in a newline."""
    with open(path, "wb") as f:
        for ln in lines:
            ln = json.dumps(ln) if isinstance(ln, dict) else ln
            f.write((ln.encode() if isinstance(ln, str) else ln) + b"\n")
    return path


def bad_jsonl(e, d, kind):
    """A sequence file broken in one way -> (path, [parts of the expected message])."""
    good, rec = json.dumps(e.recs[0]), e.recs[1]
    toks = rec["tokens"].split()
    p = os.path.join(d, f"{kind}.jsonl")
    lines, line, what = {
        "truncated": ([good, good, good[:40]], 3, "invalid JSON"),              # a write cut short
        "no_tokens": ([good, {"label": 1, "meta": {}}], 2, 'string field "tokens"'),
        "no_label": ([good, {"tokens": rec["tokens"]}], 2, 'integer field "label"'),
        "unknown_token": ([good, dict(rec, tokens=" ".join(toks[:1] + ["<Z_499>"] + toks[2:]))], 2,
                          "unknown token '<Z_499>'"),                             # from a 500-code vocabulary
        "label_range": ([dict(rec, label=7)], 1, "label 7 is out of range 0..2"),
        "v1_tail": ([good, dict(rec, tokens=" ".join(toks[:-2] + ["<CLS>", "<EOS>"]))], 2, "v1 tail"),
        "no_tail": ([dict(rec, tokens=" ".join(toks[:-4]))], 1, "expected the tail </IMG> <CLS>"),
        "label_mismatch": ([dict(rec, label=(rec["label"] + 1) % 3)], 1, "but the label field is"),
        "not_object": (["[1, 2, 3]"], 1, "expected a JSON object"),
        "not_utf8": ([good, b'{"tokens": "caf\xe9"}'], 2, "not UTF-8"),
        "empty": ([], None, "no records (the file is empty)"),
    }[kind]
    write_lines(p, lines)
    return p, [f"{p}:{line}: " if line else f"{p}: ", what]


def copy_ckpt(e, d):
    ck = os.path.join(d, "ckpt")
    shutil.copytree(e.final, ck)
    return ck


def edit_json(path, fn):
    with open(path) as f:
        obj = json.load(f)
    obj = fn(obj) or obj
    with open(path, "w") as f:
        json.dump(obj, f)


def bad_ckpt(e, d, kind):
    """A copy of the trained checkpoint broken in one way -> (folder, [parts of the expected message])."""
    ck = copy_ckpt(e, d)
    w, cfg, voc = (os.path.join(ck, f) for f in ("model.safetensors", "config.json", "vocab.json"))
    size = os.path.getsize(w)
    if kind == "weights_truncated":
        os.truncate(w, size // 2)
        return ck, [w, "not a readable safetensors file"]
    if kind == "weights_random":
        with open(w, "wb") as f:
            f.write(np.random.default_rng(0).bytes(size))
        return ck, [w, "not a readable safetensors file"]
    if kind == "weights_pickle":  # a pickle renamed: must be refused without being unpickled
        with open(w, "wb") as f:
            pickle.dump(Evil(e.marker), f)
        return ck, [w, "is a Python pickle, not safetensors; pickled weights are never loaded"]
    if kind == "weights_torch_save":
        torch.save({"transformer.wte.weight": torch.zeros(3), "x": Evil(e.marker)}, w)
        return ck, [w, "is a zip archive (the torch.save format), not safetensors"]
    if kind == "weights_missing":
        os.remove(w)
        return ck, [w, "missing"]
    if kind == "weights_foreign":  # a valid safetensors file of some other model
        from safetensors.torch import save_file
        save_file({"encoder.layer.0.weight": torch.zeros(4, 4)}, w)
        return ck, [w, "weights do not fit the model config"]
    if kind == "config_shape":
        edit_json(cfg, lambda c: c["model"].update(n_layer=3))
        return ck, [w, "weights do not fit the model config", "missing ['transformer.h.2"]
    if kind == "config_unknown_key":
        edit_json(cfg, lambda c: c["model"].update(n_experts=4))
        return ck, [cfg, "unexpected keyword argument 'n_experts'"]
    if kind == "config_wrong_type":
        edit_json(cfg, lambda c: c["model"].update(n_layer="2"))
        return ck, [cfg, "model.n_layer is '2', expected a positive integer"]
    if kind == "config_negative":
        edit_json(cfg, lambda c: c["model"].update(n_head=-2))
        return ck, [cfg, "model.n_head is -2, expected a positive integer"]
    if kind == "config_train_list":
        edit_json(cfg, lambda c: c.update(train=[1, 2]))
        return ck, [cfg, '"train" is list, expected a JSON object']
    if kind == "config_truncated":
        with open(cfg, "r+") as f:
            line = f.read(30).count("\n") + 1
            f.truncate(30)
        return ck, [f"{cfg}:{line}: invalid JSON", "expected a checkpoint config.json"]
    if kind == "config_foreign":
        with open(cfg, "w") as f:
            json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32}, f)
        return ck, [cfg, "not a checkpoint config of this project"]
    if kind == "vocab_mismatch":  # a vocabulary with one more code than the model has embeddings
        Vocab(9, 3).save(voc)
        return ck, [voc, "has 18 tokens, the model expects 17"]
    if kind == "vocab_layout":
        edit_json(voc, lambda v: v.update({"<Z_000>": 7, "<Z_001>": 6}))
        return ck, [voc, "token <Z_000> has id 7, expected 6"]
    if kind == "codebook_truncated":
        os.truncate(os.path.join(ck, "codebook.safetensors"), 20)
        return ck, [os.path.join(ck, "codebook.safetensors"), "not a readable safetensors file"]
    if kind == "codebook_mismatch":  # settings that do not fit its arrays (say, copied from another run)
        edit_json(os.path.join(ck, "codebook.json"), lambda b: b.update(channels=3))
        return ck, [os.path.join(ck, "codebook.json"), "do not fit its settings"]
    if kind == "not_a_folder":
        return e.afile, [e.afile, "no such checkpoint folder"]
    if kind in ("weights_nan", "weights_inf", "codebook_nan"):   # what a diverged run would have saved
        from safetensors.torch import load_file, save_file
        f = w if kind != "codebook_nan" else os.path.join(ck, "codebook.safetensors")
        sd = load_file(f)
        name = "transformer.h.1.mlp.c_fc.weight" if kind != "codebook_nan" else "centroids"
        sd[name][0, 0] = float("nan") if kind != "weights_inf" else float("inf")
        save_file(sd, f)
        return ck, [f, f"{name} holds non-finite values (NaN or inf)"]
    if kind in JSON_KINDS:
        file, edit, expect = JSON_KINDS[kind]
        edit_json(os.path.join(ck, file), edit)
        return ck, [os.path.join(ck, file), expect]
    if kind == "config_huge":
        edit_json(cfg, lambda c: c["model"].update(n_embd=2 ** 20, n_head=1))
        return ck, [cfg, "a model of", "parameters", "more than the"]
    raise KeyError(kind)


def _set(key, value):
    """An edit of a JSON object: obj[key] = value (key may be 'a.b' for a nested object)."""
    def edit(obj):
        *path, last = key.split(".")
        for k in path:
            obj = obj[k]
        obj[last] = value
    return edit


# files of a checkpoint with a value of the wrong JSON type: kind -> (file, edit, expected part)
JSON_KINDS = {
    "json_config_data_dir_number": ("config.json", _set("train.data_dir", 5),
                                    "train.data_dir is a number (5), expected a string"),
    "json_config_source_list": ("config.json", _set("train.source", ["builtin"]),
                                "train.source is a list (['builtin']), expected a string"),
    "json_config_image_size_string": ("config.json", _set("train.image_size", "8"),
                                      "train.image_size is a string (8), expected an integer"),
    "json_config_model_list": ("config.json", _set("model", [2, 2, 32]), "not a checkpoint config of this project"),
    "json_metrics_list": ("metrics.json", lambda m: [m], "the file is a list, expected a JSON object of metrics"),
    "json_metrics_accuracy_string": ("metrics.json", _set("accuracy", "high"),
                                     "accuracy is a string (high), expected a number"),
    "json_metrics_topk_list": ("metrics.json", _set("topk_accuracy", [0.5]), "topk_accuracy is a list"),
    "json_metrics_per_class_string": ("metrics.json", _set("per_class_accuracy", "all good"),
                                      "per_class_accuracy is a string"),
    "json_metrics_confusion_object": ("metrics.json", _set("confusion", {"0": [1]}), "confusion is an object"),
    "json_metrics_n_string": ("metrics.json", _set("n_sequences", "12"), "n_sequences is a string (12), expected an integer"),
    "json_codebook_list": ("codebook.json", lambda b: [b], "the file is a list, expected a JSON object"),
    "json_codebook_config_list": ("codebook.json", _set("config", [2, 8]), "config is a list"),
    "json_codebook_patch_string": ("codebook.json", _set("config.patch_size", "2"),
                                   "config.patch_size is a string (2), expected an integer"),
    "json_codebook_weight_string": ("codebook.json", _set("config.w_colour", "1"),
                                    "config.w_colour is a string (1), expected a number"),
    "json_codebook_image_size_number": ("codebook.json", _set("image_size", 8),
                                        "image_size is a number (8), expected a list of two positive integers"),
    "json_codebook_channels_string": ("codebook.json", _set("channels", "1"), "channels is a string (1), expected an integer"),
    "json_codebook_stats_list": ("codebook.json", _set("stats", [1, 2]), "stats is a list ([1, 2]), expected an object"),
    "json_codebook_std_string": ("codebook.json", _set("stats.colour.std", "x"), "stats.colour is {'mean': ["),
    "json_codebook_mean_number": ("codebook.json", _set("stats.colour.mean", 0.5), "stats.colour is {'mean': 0.5"),
    "json_codebook_inertia_string": ("codebook.json", _set("inertia", "low"), "inertia is a string (low), expected a number or null"),
    "json_codebook_huge_image": ("codebook.json", _set("image_size", [2 ** 20, 2 ** 20]),
                                 "one image and its patch features needs at least"),
    "json_vocab_list": ("vocab.json", lambda v: list(v), "expected a JSON object mapping token -> integer id"),
    "json_vocab_id_string": ("vocab.json", _set("<PAD>", "0"), "expected a JSON object mapping token -> integer id"),
}


def png_header(path, width, height):
    """A PNG that claims to be width x height pixels (a decompression bomb as far as its header goes)."""
    def chunk(t, data):
        return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                + chunk(b"IEND", b""))


def bad_image(e, d, kind):
    """An image folder root/c0/<odd image> + root/c1/<a good image> -> (root, odd file, expected parts)."""
    root = os.path.join(d, "imgs")
    for c in ("c0", "c1", "c2"):
        os.makedirs(os.path.join(root, c))
        shutil.copy(os.path.join(e.images, c, os.listdir(os.path.join(e.images, c))[0]), os.path.join(root, c, "ok.png"))
    good = os.path.join(e.images, "c0", "000.png")
    name = {"float_tiff": "odd.tif"}.get(kind, "odd.png")
    p = os.path.join(root, "c0", name)
    if kind == "corrupt_png":
        with open(good, "rb") as f:
            data = f.read()
        with open(p, "wb") as f:
            f.write(data[:len(data) // 2])
        what = "cannot read image"
    elif kind == "text_png":
        with open(p, "w") as f:
            f.write("not a picture\n")
        what = "cannot read image (cannot identify image file"
    elif kind == "bomb_png":
        png_header(p, 20000, 20000)
        what = "exceeds limit"
    elif kind == "float_tiff":
        Image.fromarray(np.random.default_rng(0).random((8, 8)).astype(np.float32)).save(p)
        what = "floating-point pixels (mode F); expected an 8- or 16-bit"
    else:
        raise KeyError(kind)
    return root, p, [p, what]


def idx_file(path, arr, cut=0):
    raw = bytes([0, 0, 8, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.astype(np.uint8).tobytes()
    raw = raw[:len(raw) - cut]
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)


def bad_idx(d, kind):
    """A folder of MNIST IDX files broken in one way -> (folder, expected parts)."""
    root = os.path.join(d, "idx")
    os.makedirs(root)
    x = np.random.default_rng(0).integers(0, 256, (30, 8, 8))
    y = np.arange(30) % 3
    img, lab = os.path.join(root, "train-images-idx3-ubyte"), os.path.join(root, "train-labels-idx1-ubyte")
    if kind == "truncated":
        idx_file(img, x, cut=10)
        idx_file(lab, y)
        return root, [img, "IDX data has 1910 bytes, its header says 1920", "truncated or corrupt"]
    if kind == "truncated_gz":
        idx_file(img + ".gz", x)
        with open(img + ".gz", "r+b") as f:
            f.truncate(os.path.getsize(img + ".gz") // 2)
        idx_file(lab, y)
        return root, [img + ".gz", "cannot read IDX file"]
    if kind == "truncated_header":
        with open(img, "wb") as f:
            f.write(bytes([0, 0, 8, 3, 0, 0, 0]))
        idx_file(lab, y)
        return root, [img, "truncated IDX header"]
    if kind == "count_mismatch":
        idx_file(img, x)
        idx_file(lab, y[:20])
        return root, [img, "expected N x H x W images and N labels"]
    if kind == "bad_magic":
        with open(img, "wb") as f:
            f.write(b"PK\x03\x04" + bytes(100))
        idx_file(lab, y)
        return root, [img, "not an IDX file of unsigned bytes (bad magic number)"]
    if kind == "no_labels":
        idx_file(img, x)
        return root, [root, "found train images but not the labels"]
    if kind == "label_gap":   # labels 0 and 2 only: class 1 would be in the vocabulary without an image
        idx_file(img, x)
        idx_file(lab, (np.arange(30) % 2) * 2)
        return root, [f"idx:{root}: no images of class 1 (labels 0..2)"]
    raise KeyError(kind)


def data_copy(e, d, edit=None):
    """A copy of the prepared data folder (so train.py finds report.json and does not prepare)."""
    p = os.path.join(d, "data")
    shutil.copytree(e.data, p)
    if edit:
        edit(p)
    return p


def other_codebook_ckpt(e, d):
    """A consistent checkpoint whose codebook (fitted on other images) is not the data's."""
    from tokenizer import Codebook, load_codebook
    book = load_codebook(e.data)
    book = Codebook.fit(torch.rand(40, book.channels, *book.image_size, generator=torch.Generator().manual_seed(5)),
                        book.cfg)
    vocab = Vocab(book.cfg.num_codes, 3)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(vocab), block_size=32, n_layer=2, n_head=2, n_embd=32))
    ck = os.path.join(d, "other")
    checkpoint.save(ck, model, TrainConfig(), vocab, book)
    return ck


# ----------------------------------------------------------------------------- the table
# Each case: (id, script, build(e, d) -> (argv, [expected parts of the message], [outputs that must not
# exist afterwards])). Cases whose id ends in "!" run as a real subprocess.

def out(d, name):
    return os.path.join(d, "out", name)


def J(script, kinds, argv, tag="jsonl"):
    """Cases that hand the command a broken JSONL file; argv(e, d, path) -> (argv, outputs)."""
    def make(kind):
        def build(e, d):
            p, expect = bad_jsonl(e, d, kind)
            args, outs = argv(e, d, p)
            return args, expect, outs
        return (f"{script}-{tag}-{kind}", script, build)
    return [make(k) for k in kinds]


def K(script, kinds, argv, tag="ckpt"):
    """Cases that hand the command a broken checkpoint; argv(e, d, ckpt) -> (argv, outputs)."""
    def make(kind):
        def build(e, d):
            ck, expect = bad_ckpt(e, d, kind)
            args, outs = argv(e, d, ck)
            return args, expect, outs
        return (f"{script}-{tag}-{kind}", script, build)
    return [make(k) for k in kinds]


def I(script, kinds, argv, tag="image"):
    """Cases with an odd image in an image folder; argv(e, d, root, file) -> (argv, outputs)."""
    def make(kind):
        def build(e, d):
            root, p, expect = bad_image(e, d, kind)
            args, outs = argv(e, d, root, p)
            return args, expect, outs
        return (f"{script}-{tag}-{kind}", script, build)
    return [make(k) for k in kinds]


def X(script, kinds, argv, tag="idx"):
    """Cases with broken MNIST IDX files; argv(e, d, folder) -> (argv, outputs)."""
    def make(kind):
        def build(e, d):
            root, expect = bad_idx(d, kind)
            args, outs = argv(e, d, root)
            return args, expect, outs
        return (f"{script}-{tag}-{kind}", script, build)
    return [make(k) for k in kinds]


def O(script, cases, argv, tag):
    """Cases that add options to a working command line: (name, [options], [expected parts])."""
    def make(name, opts, expect):
        def build(e, d):
            args, outs = argv(e, d)
            return args + opts, expect, outs
        return (f"{script}-{tag}-{name}", script, build)
    return [make(*c) for c in cases]


def C(id, script, build):
    return [(id, script, build)]


def first(cases):
    """Mark a case to run as a real subprocess (its id ends in '!')."""
    (id, script, build), = cases
    return [(id + "!", script, build)]


PREP = ["--image_size", "8", "--patch_size", "2", "--num_codes", "8", "--kmeans_iters", "2"]


def prepare_args(d, source):
    return ["prepare", "--source", source, "--data_dir", out(d, "prepared"), *PREP], [out(d, "prepared")]


def eval_args(e, d, ck=None, **kw):
    a = ["--ckpt", ck or e.final, "--out", out(d, "eval.json")]
    for k, v in kw.items():
        a += [f"--{k}", v]
    return a, [out(d, "eval.json"), out(d, "eval_confusion.png")]


def sample_args(e, d, ck=None, *extra):
    return (["--ckpt", ck or e.final, "--num_samples", "2", "--out_png", out(d, "s.png"),
             "--out_jsonl", out(d, "s.jsonl"), *extra], [out(d, "s.png"), out(d, "s.jsonl")])


def train_args(e, d, data=None, *extra):
    return [*e.train_args, "--data_dir", data or e.data, "--out_dir", out(d, "run"), *extra], [out(d, "run")]


def hf_args(e, d, ck=None, *extra):
    return ["--ckpt", ck or e.final, "--out", out(d, "hf"), *extra], [out(d, "hf")]


def train_with_data(name, edit, expect):
    """train.py on a copy of the prepared data folder with one file spoilt by edit(folder)."""
    def build(e, d):
        data = data_copy(e, d, edit)
        args, outs = train_args(e, d, data)
        return args, expect(data), outs
    return [(f"train-data-{name}", "train", build)]


def jsonl_only(folder):
    """Leave the training split as JSONL only (as prepared before the token arrays), which training reads."""
    for f in ("train.tokens.npy", "train.index.npz"):
        os.remove(os.path.join(folder, f))


def train_jsonl(kinds):
    """train.py on a prepared data folder whose train.jsonl (its only training file) is broken in one way."""
    def make(kind):
        def build(e, d):
            bad, expect = bad_jsonl(e, d, kind)
            data = data_copy(e, d, lambda p: (shutil.copy(bad, os.path.join(p, "train.jsonl")), jsonl_only(p)))
            os.remove(bad)
            args, outs = train_args(e, d, data)
            expect = [x.replace(bad, os.path.join(data, "train.jsonl")) for x in expect]
            if kind == "v1_tail":  # train.py has no --repair_v1: the message must not suggest it
                expect.append("prepare the data again with data.py prepare")
            return args, expect, outs
        return (f"train-jsonl-{kind}", "train", build)
    return [make(k) for k in kinds]


def truncated_train_jsonl(e, d):
    def edit(p):
        with open(os.path.join(p, "train.jsonl")) as f:
            lines = f.read().splitlines()[:5]
        write_lines(os.path.join(p, "train.jsonl"), lines + [lines[0][:25]])   # a write cut short
        jsonl_only(p)
    data = data_copy(e, d, edit)
    args, outs = train_args(e, d, data)
    return args, [os.path.join(data, "train.jsonl") + ":6: invalid JSON"], outs


def resume_from(kind):
    """train.py --resume on a run folder whose final/ checkpoint is broken (or absent)."""
    def build(e, d):
        final = os.path.join(d, "run", "final")
        if kind == "no_checkpoint":
            os.makedirs(os.path.join(d, "run"))
            expect = [os.path.join(final, "trainer_state.pt"), "missing; this checkpoint cannot be resumed"]
        else:
            if kind == "trainer_state_pickle":
                ck = copy_ckpt(e, d)
                with open(os.path.join(ck, "trainer_state.pt"), "wb") as f:
                    pickle.dump({"step": 3, "x": Evil(e.marker)}, f)
                expect = [os.path.join(ck, "trainer_state.pt"), "refused, it holds Python objects"]
            else:
                ck, expect = bad_ckpt(e, d, kind)
            os.makedirs(os.path.join(d, "run"))
            os.rename(ck, final)
            expect = [x.replace(ck, final) for x in expect]
        return [*e.train_args, "--data_dir", e.data, "--out_dir", os.path.join(d, "run"), "--resume"], expect, []
    return [(f"train-resume-{kind}", "train", build)]


def write_file(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    return path


def csv_bad_row(e, d):
    p = write_file(os.path.join(d, "csv", "c0", "a.csv"),
                   b"pixel_id,x,y,t,R,G,B,A,Gx,Gy\n0,0,0,0,1,1,1,1,0,0\n1,1,0,0,1,1\n")
    args, outs = prepare_args(d, f"csv:{os.path.join(d, 'csv')}")
    return args, [f"{p}:3: expected 10 numbers"], outs


def unknown_class_folder(e, d):
    root = os.path.join(d, "imgs")
    shutil.copytree(e.images, root)
    os.rename(os.path.join(root, "c2"), os.path.join(root, "zebra"))
    args, outs = eval_args(e, d, images=root)
    return args, [os.path.join(root, "zebra"), "'zebra' is not a class of this checkpoint"], outs


def broken_log(content, expect):
    def build(e, d):
        log = write_file(os.path.join(d, "r", "log.jsonl"), content)
        return ["--curves", os.path.dirname(log), "--out", out(d, "c.png")], [log + expect], [out(d, "c.png")]
    return build


def other_codebook(e, d):
    ck = other_codebook_ckpt(e, d)
    args, outs = train_args(e, d, None, "--init_from", ck)
    return args, [ck, f"its codebook is not the one that tokenised {e.data}", f"--codebook_from {ck}"], outs


def gpt2_folder(e, d, pickled=False, activation=None):
    """A Hugging Face GPT-2 folder (exported from the tiny checkpoint), then spoilt."""
    from imagegpt import checkpoint, huggingface
    f = huggingface.write_export(checkpoint.load(e.final), os.path.join(d, "gpt2"))
    if pickled:  # what an old transformers save looks like: pytorch_model.bin, no safetensors
        os.remove(os.path.join(f, "model.safetensors"))
        with open(os.path.join(f, "pytorch_model.bin"), "wb") as fh:
            pickle.dump(Evil(e.marker), fh)
    if activation:
        edit_json(os.path.join(f, "config.json"), lambda c: c.update(activation_function=activation))
    return f


def export_gpt2(**kw):
    def build(e, d):
        f = gpt2_folder(e, d, **kw)
        args, outs = hf_args(e, d, f)
        expect = [os.path.join(f, "model.safetensors"), "missing (sharded and pickled weights are not read"] \
            if kw.get("pickled") else [os.path.join(f, "config.json"), "activation_function is 'relu'"]
        return args, expect, outs
    return build


def under_file(script, argv, what):
    """An output path whose parent is a regular file (chmod cannot stop root; this stops everyone)."""
    def build(e, d):
        p = os.path.join(e.afile, what)
        return argv(e, d, p), [p, f"{e.afile} is a file"], []
    return [(f"{script}-output-under-a-file-{what.replace('.', '-')}", script, build)]


ALL_JSONL = ["truncated", "no_tokens", "no_label", "unknown_token", "label_range", "v1_tail", "no_tail",
             "label_mismatch", "not_object", "not_utf8", "empty"]
CKPT_ALL = ["weights_random", "weights_pickle", "weights_torch_save", "weights_missing", "weights_foreign",
            "config_shape", "config_unknown_key", "config_wrong_type", "config_negative", "config_train_list",
            "config_truncated", "config_foreign", "vocab_mismatch", "vocab_layout", "codebook_truncated",
            "codebook_mismatch", "not_a_folder"]
IMAGES = ["corrupt_png", "text_png", "bomb_png", "float_tiff"]

CASES = [
    # ------------------------------------------------------------------ data.py
    *first(X("data", ["truncated"], lambda e, d, root: prepare_args(d, f"idx:{root}"))),
    *X("data", ["truncated_gz", "truncated_header", "count_mismatch", "bad_magic", "no_labels"],
       lambda e, d, root: prepare_args(d, f"idx:{root}")),
    *I("data", IMAGES, lambda e, d, root, p: prepare_args(d, f"folder:{root}")),
    *C("data-csv-bad-row", "data", csv_bad_row),
    *O("data", [
        ("unknown-option", ["--colour_space", "hsv"], ["data.py prepare: unrecognized arguments: --colour_space hsv; valid options:"]),
        ("wrong-type", ["--patch_size", "two"], ["command line: patch_size expects int, got 'two'"]),
        ("channels", ["--channels", "2"], ["channels must be 1 (grey) or 3 (RGB), got 2"]),
        ("patch-does-not-divide", ["--patch_size", "3"], ["image_size 8 is not divisible by patch_size 3"]),
        ("patch-larger-than-image", ["--patch_size", "16"], ["image_size 8 is smaller than patch_size 16: a token's "
                                                             "patch must fit in the image"]),
        ("palette-on-grey", ["--palette", "8"], ["palette (shape apart from colour) must be 0, or above 0 with colour "
                                                 "images (channels 3), got palette 8 with channels 1"]),
        ("permute-colours-on-grey", ["--permute_colours", "true"], ["permute_colours reorders the R, G, B channels of "
                                                                    "colour images; it needs channels 3, got 1"]),
        ("zero-codes", ["--num_codes", "0"], ["num_codes must be at least 1, got 0"]),
        ("val-fraction", ["--val_fraction", "1.5"], ["test_fraction must be between 0 and 1, got 1.5"]),
        ("unknown-source", ["--source", "zip:foo"], ["source 'zip:foo': expected builtin, idx:DIR, folder:DIR, csv:DIR or hf:NAME_OR_PATH[:SPLIT]"]),
    ], lambda e, d: prepare_args(d, f"folder:{e.images}"), tag="prepare"),
    *under_file("data", lambda e, d, p: ["prepare", "--source", f"folder:{e.images}", "--data_dir", p, *PREP], "prepared"),
    *C("data-prepare-data-dir-is-a-file", "data", lambda e, d: (
        ["prepare", "--source", f"folder:{e.images}", "--data_dir", e.afile, *PREP], [e.afile, "is a file"], [])),
    *J("data", ["truncated", "not_utf8", "no_tail", "empty"], lambda e, d, p: (
        ["render", p, "--codebook", e.data, "--out", out(d, "grid.png")], [out(d, "grid.png")]), tag="render"),
    *K("data", ["codebook_mismatch", "codebook_truncated"], lambda e, d, ck: (
        ["render", e.val, "--codebook", ck, "--out", out(d, "grid.png")], [out(d, "grid.png")]), tag="render"),
    *under_file("data", lambda e, d, p: ["render", e.val, "--out", p], "grid.png"),
    *C("data-render-n-zero", "data", lambda e, d: (
        ["render", e.val, "--out", out(d, "grid.png"), "--n", "0"], ["--n must be at least 1, got 0"], [out(d, "grid.png")])),
    *C("data-reconstruct-no-report", "data", lambda e, d: (
        ["reconstruct", d, "--out", out(d, "r.png")], [os.path.join(d, "report.json"), "no such report.json"], [out(d, "r.png")])),

    # ------------------------------------------------------------------ train.py
    *C("train-jsonl-truncated!", "train", truncated_train_jsonl),
    *train_jsonl(["no_label", "unknown_token", "label_range", "v1_tail", "not_utf8", "empty"]),
    *train_with_data("dev-truncated", lambda p: write_lines(os.path.join(p, "dev.jsonl"), ['{"tokens": "<IMG>", "lab']),
                     lambda p: [os.path.join(p, "dev.jsonl") + ":1: invalid JSON"]),
    *train_with_data("report-not-an-object", lambda p: write_lines(os.path.join(p, "report.json"), ["[1, 2]"]),
                     lambda p: [os.path.join(p, "report.json"), "expected a JSON object"]),
    *train_with_data("vocab-does-not-match-codebook", lambda p: Vocab(9, 3).save(os.path.join(p, "vocab.json")),
                     lambda p: [os.path.join(p, "vocab.json"), "has 9 code tokens, the codebook there 8 codes"]),
    *train_with_data("vocab-palette-does-not-match-codebook",
                     lambda p: Vocab(8, 3, palette=4).save(os.path.join(p, "vocab.json")),
                     lambda p: [os.path.join(p, "vocab.json"), "has 8 code tokens and 4 palette colours, the codebook "
                                "there 8 codes; the two were not made together"]),
    *train_with_data("codebook-missing", lambda p: os.remove(os.path.join(p, "codebook.safetensors")),
                     lambda p: [p, "codebook.safetensors is missing"]),
    *C("train-yaml-wrong-type", "train", lambda e, d: (
        [write_file(os.path.join(d, "cfg.yaml"), b"n_layer: [2]\n"), "--out_dir", out(d, "run")],
        [os.path.join(d, "cfg.yaml"), "n_layer expects int, got [2]"], [out(d, "run")])),
    *C("train-yaml-unknown-key", "train", lambda e, d: (
        [write_file(os.path.join(d, "cfg.yaml"), b"n_layer: 2\nlayers: 4\n"), "--out_dir", out(d, "run")],
        [os.path.join(d, "cfg.yaml"), "unknown key 'layers'; valid keys:"], [out(d, "run")])),
    *O("train", [
        ("negative-lr", ["--lr", "-1"], ["config: lr must be >= 0, got -1.0"]),
        ("dropout", ["--dropout", "2"], ["config: dropout must be in [0, 1), got 2.0"]),
        ("device", ["--device", "tpu"], ["config: device must be auto, cpu or cuda[:N], got 'tpu'"]),
        ("channels", ["--channels", "4"], ["channels must be 1 (grey) or 3 (RGB), got 4"]),
        ("unknown", ["--n_layers", "4"], ["train.py: unrecognized arguments: --n_layers"]),
        ("wrong-type", ["--epochs", "many"], ["command line: epochs expects int, got 'many'"]),
    ], lambda e, d: train_args(e, d), tag="option"),
    *under_file("train", lambda e, d, p: [*e.train_args, "--data_dir", e.data, "--out_dir", p], "run"),
    *under_file("train", lambda e, d, p: [*e.train_args, "--data_dir", p, "--out_dir", out(d, "run")], "data"),
    *[c for k in ("no_checkpoint", "weights_truncated", "weights_pickle", "config_wrong_type", "vocab_layout",
                  "trainer_state_pickle") for c in resume_from(k)],
    *K("train", ["weights_random", "weights_pickle", "config_negative"],
       lambda e, d, ck: train_args(e, d, None, "--init_from", ck), tag="init-from"),
    *C("train-init-from-other-codebook", "train", other_codebook),

    # ------------------------------------------------------------------ eval.py
    *first(K("eval", ["weights_truncated"], lambda e, d, ck: eval_args(e, d, ck))),
    *K("eval", CKPT_ALL, lambda e, d, ck: eval_args(e, d, ck)),
    *J("eval", ALL_JSONL, lambda e, d, p: eval_args(e, d, data=p), tag="data"),
    *I("eval", IMAGES, lambda e, d, root, p: eval_args(e, d, images=root), tag="images"),
    *C("eval-images-unknown-class", "eval", unknown_class_folder),
    *first(I("eval", ["corrupt_png"], lambda e, d, root, p: (["--ckpt", e.final, "--classify", root], []), tag="classify")),
    *I("eval", ["bomb_png", "float_tiff", "text_png"], lambda e, d, root, p: (["--ckpt", e.final, "--classify", p], []),
       tag="classify"),
    *C("eval-classify-not-an-image", "eval", lambda e, d: (
        ["--ckpt", e.final, "--classify", write_file(os.path.join(d, "notes.txt"), b"hello")],
        [os.path.join(d, "notes.txt"), "expected an image"], [])),
    *C("eval-classify-missing-file", "eval", lambda e, d: (
        ["--ckpt", e.final, "--classify", os.path.join(d, "gone.png")], [os.path.join(d, "gone.png"), "no such image file"], [])),
    *J("eval", ["v1_tail", "label_range"], lambda e, d, p: (["--ckpt", e.final, "--classify", p], []), tag="classify"),
    *under_file("eval", lambda e, d, p: ["--ckpt", e.final, "--data", e.val, "--out", p], "m.json"),
    *C("eval-curves-bad-line", "eval", broken_log(b'{"step": 1}\n{"step": 2, "tr\n', ":2: invalid JSON")),
    *C("eval-curves-not-utf8", "eval", broken_log(b'{"step": 1}\n\xff\xfe\n', ":2: not UTF-8")),
    *under_file("eval", lambda e, d, p: ["--curves", e.run, "--out", p], "curves.png"),
    *C("eval-next-unknown-token", "eval", lambda e, d: (
        ["--ckpt", e.final, "--next", "<IMG> <Z_042>"], ["next: unknown token '<Z_042>'"], [])),

    # ------------------------------------------------------------------ sample.py
    *first(K("sample", ["weights_truncated"], lambda e, d, ck: sample_args(e, d, ck))),
    *K("sample", ["weights_pickle", "weights_foreign", "config_wrong_type", "vocab_mismatch", "codebook_mismatch"],
       lambda e, d, ck: sample_args(e, d, ck)),
    *J("sample", ["truncated", "unknown_token", "v1_tail", "label_range", "not_utf8", "empty"],
       lambda e, d, p: sample_args(e, d, None, "--complete", "2", "--data", p), tag="complete"),
    *O("sample", [
        ("start-unknown-token", ["--start", "<IMG> <Z_500>"], ["--start: unknown token '<Z_500>'"]),
        ("top-p", ["--top_p", "0"], ["--top_p must be in (0, 1], got 0.0"]),
    ], lambda e, d: sample_args(e, d), tag="option"),
    *under_file("sample", lambda e, d, p: ["--ckpt", e.final, "--out_png", p], "s.png"),
    *under_file("sample", lambda e, d, p: ["--ckpt", e.final, "--out_png", out(d, "s.png"), "--out_jsonl", p], "s.jsonl"),
    *C("sample-out-png-is-a-folder", "sample", lambda e, d: (
        ["--ckpt", e.final, "--out_png", d], [d, "is a folder; the PNG grid must be a file path"], [])),

    # ------------------------------------------------------------------ hf_export.py
    *first(K("hf_export", ["weights_truncated"], lambda e, d, ck: hf_args(e, d, ck))),
    *K("hf_export", ["weights_random", "weights_pickle", "config_wrong_type", "config_train_list", "vocab_layout",
                     "vocab_mismatch", "codebook_mismatch"], lambda e, d, ck: hf_args(e, d, ck)),
    *under_file("hf_export", lambda e, d, p: ["--ckpt", e.final, "--out", p], "hf"),
    *C("hf_export-out-not-an-export", "hf_export", lambda e, d: (
        ["--ckpt", e.final, "--out", e.data], [e.data, "exists and is not an earlier export"], [])),
    *C("hf_export-bad-repo-id", "hf_export", lambda e, d: (
        [*hf_args(e, d)[0], "--push_to_hub", "me/my model"], ["'me/my model' is not a repository id"], hf_args(e, d)[1])),
    *C("hf_export-gpt2-folder-pickled-weights", "hf_export", export_gpt2(pickled=True)),
    *C("hf_export-gpt2-folder-relu", "hf_export", export_gpt2(activation="relu")),
]


# ----------------------------------------------------------------------------- round two (issue 18)
# Kinds: non-finite weights and losses, sizes that cannot fit, JSON files with the wrong types, one line
# whatever the file names, outputs checked before any work, settings that were silently accepted,
# sequences cut by max_length, resuming with other settings.

def run_copy(e, d):
    """A copy of the trained run folder (log, best/, final/), for --resume."""
    run = os.path.join(d, "run")
    shutil.copytree(e.run, run)
    return run


def resume_changed(name, opts, expect):
    """train.py --resume on a copy of the run with some settings other than the run's."""
    def build(e, d):
        run = run_copy(e, d)
        args = [*e.train_args, "--data_dir", e.data, "--out_dir", run, "--resume", *opts]
        return args, [os.path.join(run, "final", "config.json"), *expect], []
    return [(f"train-resume-changed-{name}", "train", build)]


def resume_config_lr_string(e, d):
    """train.py --resume whose final/config.json holds a string where the learning rate should be."""
    run = run_copy(e, d)
    cfg = os.path.join(run, "final", "config.json")
    edit_json(cfg, _set("train.lr", "fast"))
    return [*e.train_args, "--data_dir", e.data, "--out_dir", run, "--resume"], \
        [cfg, "train.lr is a string (fast), expected a number"], []


def trainer_state(kind):
    """train.py --resume whose final/trainer_state.pt holds plain data of the wrong structure."""
    state = {"list": [1, 2, 3], "step_string": {"step": "3"}, "no_rng": None}[kind]

    def build(e, d):
        run = run_copy(e, d)
        path = os.path.join(run, "final", "trainer_state.pt")
        s = state
        if kind == "no_rng":
            s = torch.load(path, weights_only=True)
            del s["rng"]
        elif kind == "step_string":
            s = dict(torch.load(path, weights_only=True), step="3")
        torch.save(s, path)
        expect = {"list": "holds a list, expected the trainer state", "step_string": "step is str, expected a step count",
                  "no_rng": "rng is nothing, expected a uint8 tensor"}[kind]
        return [*e.train_args, "--data_dir", e.data, "--out_dir", run, "--resume"], [path, expect], []
    return [(f"train-resume-trainer-state-{kind.replace('_', '-')}", "train", build)]


def image_tree(e, d, classes=("c0", "c1", "c2"), extra=None):
    """root/<class>/ with the first 10 images of each class of the shared folder; extra(root) spoils it."""
    root = os.path.join(d, "imgs")
    for c in classes:
        os.makedirs(os.path.join(root, c))
        src = os.path.join(e.images, c if c in ("c0", "c1", "c2") else "c0")
        for f in sorted(os.listdir(src))[:10]:
            shutil.copy(os.path.join(src, f), os.path.join(root, c, f))
    if extra:
        extra(root)
    return root


def folder_case(id, script, classes, extra, expect, argv):
    def build(e, d):
        root = image_tree(e, d, classes, extra)
        args, outs = argv(e, d, root)
        return args, [p.replace("ROOT", root) for p in expect], outs
    return [(id, script, build)]


def prep_folder(e, d, root):
    return prepare_args(d, f"folder:{root}")


def train_folder(e, d, root):
    return [*e.train_args, "--source", f"folder:{root}", "--data_dir", out(d, "data"), "--out_dir", out(d, "run")], \
        [out(d, "data"), out(d, "run")]


def csv_case(name, rows, expect):
    def build(e, d):
        p = [write_file(os.path.join(d, "csv", c, "a.csv"), b"pixel_id,x,y,t,R,G,B,A,Gx,Gy\n" + rows)
             for c in ("c0", "c1")][0]                                     # the first one read
        args, outs = prepare_args(d, f"csv:{os.path.join(d, 'csv')}")
        return args, [p, expect], outs
    return [(f"data-csv-{name}", "data", build)]


def report_case(name, edit, expect):
    """data.py reconstruct on a copy of the data folder whose report.json is spoilt by edit."""
    def build(e, d):
        data = data_copy(e, d, lambda p: edit_json(os.path.join(p, "report.json"), edit))
        return ["reconstruct", data, "--out", out(d, "r.png")], [os.path.join(data, "report.json"), expect], \
            [out(d, "r.png")]
    return [(f"data-reconstruct-report-{name}", "data", build)]


def report_classes(e, d):
    """eval.py on a checkpoint written before checkpoints carried their class names, whose data folder's
    report.json has classes that are not names."""
    data = data_copy(e, d, lambda p: edit_json(os.path.join(p, "report.json"), _set("classes", [{"a": 1}, 2, 3])))
    ck = copy_ckpt(e, d)
    edit_json(os.path.join(ck, "config.json"), lambda c: {**{k: v for k, v in c.items() if k != "classes"},
                                                          "train": {**c["train"], "data_dir": data}})
    args, outs = eval_args(e, d, ck)
    return args, [os.path.join(data, "report.json"), "classes must be a list of class names"], outs


def config_classes(e, d):
    """eval.py on a checkpoint whose own class names are damaged (not a list of distinct names)."""
    ck = copy_ckpt(e, d)
    edit_json(os.path.join(ck, "config.json"), _set("classes", ["a", "a", 3]))
    args, outs = eval_args(e, d, ck)
    return args, [os.path.join(ck, "config.json"), "classes is ['a', 'a', 3], expected 3 distinct class names"], outs


def export_case(kind):
    """A Hugging Face export of the tiny checkpoint, spoilt in one way -> (folder, expected parts)."""
    def spoil(e, d):
        from imagegpt import huggingface
        f = huggingface.write_export(checkpoint.load(e.final), os.path.join(d, "gpt2"))
        if kind == "nan":
            from safetensors.torch import load_file, save_file
            sd = load_file(os.path.join(f, "model.safetensors"))
            sd["transformer.wte.weight"][3, 1] = float("nan")
            save_file(sd, os.path.join(f, "model.safetensors"))
            return f, [os.path.join(f, "model.safetensors"), "transformer.wte.weight holds non-finite values"]
        if kind == "train_config_list":
            write_file(os.path.join(f, "train_config.json"), b"[1, 2]")
            return f, [os.path.join(f, "train_config.json"), "the file is a list, expected a JSON object"]
        if kind == "train_config_data_dir":
            edit_json(os.path.join(f, "train_config.json"), _set("data_dir", 7))
            return f, [os.path.join(f, "train_config.json"), "data_dir is a number (7), expected a string"]
        if kind == "metrics_string":
            edit_json(os.path.join(f, "metrics.json"), _set("loss", "low"))
            return f, [os.path.join(f, "metrics.json"), "loss is a string (low), expected a number"]
        if kind == "huge":
            edit_json(os.path.join(f, "config.json"), _set("n_embd", 2 ** 20))
            return f, [os.path.join(f, "config.json"), "a model of", "more than the"]
        raise KeyError(kind)
    return spoil


def E(script, kinds, argv):
    """Cases on a spoilt export folder; argv(e, d, folder) -> (argv, outputs)."""
    def make(kind):
        def build(e, d):
            f, expect = export_case(kind)(e, d)
            args, outs = argv(e, d, f)
            return args, expect, outs
        return (f"{script}-export-{kind.replace('_', '-')}", script, build)
    return [make(k) for k in kinds]


def odd_name(name):
    """A file name with a control character or bytes that are not UTF-8 (as Python passes them in argv)."""
    return name.replace("NL", "\n").replace("CR", "\r").replace("ESC", "\x1b").replace("FF", "\udcff")


def shown(name):
    """How errors.printable writes such a name in a message."""
    return name.replace("NL", "\\n").replace("CR", "\\r").replace("ESC", "\\x1b").replace("FF", "\\xff")


def named(id, script, name, argv, what):
    """A command handed a path whose name has odd characters: still one line, the name escaped."""
    def build(e, d):
        p = os.path.join(d, odd_name(name))
        args, outs = argv(e, d, p)
        return args, [os.path.join(d, shown(name)), what], outs
    return [(id, script, build)]


def named_bad_jsonl(e, d, p):
    write_lines(p, ['{"tokens": 5}'])
    return p


def bench_args(d, *extra):
    return ["--quick", "--only", "kmeans", "--kmeans_data", "random", "--kmeans_n", "2000", "--kmeans_k", "4",
            "--json", out(d, "bench.json"), *extra], [out(d, "bench.json")]


BIG = str(2 ** 64)

CASES += [
    # ------------------------------------------------------------------ 1. non-finite weights and losses
    *first(K("sample", ["weights_nan"], lambda e, d, ck: sample_args(e, d, ck), tag="nonfinite")),
    *K("sample", ["weights_inf", "codebook_nan"], lambda e, d, ck: sample_args(e, d, ck), tag="nonfinite"),
    *K("eval", ["weights_nan", "weights_inf", "codebook_nan"], lambda e, d, ck: eval_args(e, d, ck), tag="nonfinite"),
    *K("hf_export", ["weights_nan", "codebook_nan"], lambda e, d, ck: hf_args(e, d, ck), tag="nonfinite"),
    *K("train", ["weights_nan"], lambda e, d, ck: train_args(e, d, None, "--init_from", ck), tag="nonfinite-init-from"),
    *[c for k in ("weights_nan", "codebook_nan") for c in resume_from(k)],
    *K("data", ["codebook_nan"], lambda e, d, ck: (
        ["render", e.val, "--codebook", ck, "--out", out(d, "grid.png")], [out(d, "grid.png")]), tag="render-nonfinite"),
    *E("eval", ["nan"], lambda e, d, f: eval_args(e, d, f, data=e.val)),
    *E("hf_export", ["nan"], lambda e, d, f: hf_args(e, d, f)),
    *O("train", [
        ("lr-1e30", ["--lr", "1e30"], ["the training loss is ", "training diverged and was stopped",
                                       "no checkpoint of this run was written"]),
        ("lr-inf", ["--lr", "inf"], ["command line: lr must be a finite number, got 'inf'"]),
        ("min-lr-nan", ["--min_lr", "nan"], ["command line: min_lr must be a finite number, got 'nan'"]),
        ("label-weight-inf", ["--label_weight", "inf"], ["label_weight must be a finite number"]),
        ("max-shift-inf", ["--max_shift", "inf"], ["max_shift must be a finite number"]),
    ], lambda e, d: train_args(e, d), tag="nonfinite"),
    *C("train-yaml-lr-inf", "train", lambda e, d: (
        [write_file(os.path.join(d, "cfg.yaml"), b"lr: .inf\n"), "--out_dir", out(d, "run")],
        [os.path.join(d, "cfg.yaml"), "lr must be a finite number, got inf"], [out(d, "run")])),
    *O("sample", [("temperature-inf", ["--temperature", "inf"], ["--temperature must be a finite number, got inf"])],
       lambda e, d: sample_args(e, d), tag="nonfinite"),

    # ------------------------------------------------------------------ 4. sizes that cannot fit, seeds
    *O("train", [
        ("n-embd-huge", ["--n_embd", str(2 ** 20)], ["config: training", "parameters", "more than the",
                                                      "lower n_embd, n_layer, max_length, num_codes or batch_size"]),
        ("n-layer-huge", ["--n_layer", str(10 ** 9)], ["config: training", "more than the"]),
        ("max-length-huge", ["--max_length", str(10 ** 12)], ["config: training", "more than the"]),
        ("batch-huge", ["--batch_size", str(10 ** 13)], ["on batches of 10000000000000 x 21 tokens", "more than the"]),
        ("num-codes-huge", ["--num_codes", str(10 ** 11)], ["config: training", "more than the"]),
        ("image-size-huge", ["--image_size", str(2 ** 22)], ["one 4194304 x 4194304 image", "more than the",
                                                             "lower image_size"]),
        ("seed-beyond-64-bits", ["--seed", BIG], [f"config: seed must be an integer in 0..{2 ** 63 - 1}, got {BIG}"]),
        ("seed-negative", ["--seed", "-1"], ["config: seed must be an integer in 0..", "got -1"]),
        ("split-seed-huge", ["--split_seed", str(2 ** 70)], ["config: split_seed must be an integer in 0.."]),
        ("codebook-seed-negative", ["--codebook_seed", "-5"], ["config: codebook_seed must be an integer in 0.."]),
        ("max-scale-one", ["--max_scale", "1"], ["config: max_scale must be below 1 and max_shear below 60 degrees"]),
        ("max-shear-negative", ["--max_shear", "-3"], ["config: max_shear must be >= 0, got -3"]),
        ("max-elastic-negative", ["--max_elastic", "-1"], ["config: max_elastic must be >= 0, got -1"]),
        ("max-elastic-beyond-lattice", ["--max_elastic", "9"], ["config: max_elastic must be at most image_size / 4",
                                                               "got 9"]),
        ("dev-fold-beyond-folds", ["--dev_fraction", "0.25", "--dev_fold", "4"],
         ["config: dev_fold must be 0 or more and, with dev_fraction 0.25, below 4", "got 4"]),
    ], lambda e, d: train_args(e, d, out(d, "data")), tag="size"),
    *O("data", [
        ("image-size-huge", ["--image_size", str(2 ** 22)], ["one 4194304 x 4194304 image", "more than the"]),
        ("augment-huge", ["--augment", str(10 ** 9)], ["training images x 1000000001 (augment 1000000000)",
                                                       "more than the", "lower augment or image_size"]),
        ("split-seed-huge", ["--split_seed", BIG], ["config: split_seed must be an integer in 0.."]),
        ("codebook-seed-negative", ["--codebook_seed", "-1"], ["config: codebook_seed must be an integer in 0.."]),
        ("dev-fold-without-dev-split", ["--dev_fraction", "0", "--dev_fold", "1"],
         ["config: dev_fold 1 needs a development split (dev_fraction > 0)"]),
    ], lambda e, d: prepare_args(d, f"folder:{e.images}"), tag="size"),
    *csv_case("huge-coordinate", b"0,0,0,0,1,1,1,1,0,0\n1,1000000000000,1000000000,0,1,1,1,1,0,0\n",
              "pixel coordinates up to x=1000000000000, y=1000000000"),
    *O("sample", [
        ("num-samples-huge", ["--num_samples", str(10 ** 12)], ["1000000000000 rows of up to 32 tokens", "more than the",
                                                                "lower --num_samples or --batch_size"]),
        ("batch-and-samples-huge", ["--num_samples", str(10 ** 8), "--batch_size", str(10 ** 8)], ["more than the"]),
        ("seed-beyond-64-bits", ["--seed", BIG], [f"--seed must be an integer in 0..{2 ** 63 - 1}, got {BIG}"]),
        ("seed-negative", ["--seed", "-3"], ["--seed must be an integer in 0.."]),
    ], lambda e, d: sample_args(e, d), tag="size"),
    *K("eval", ["config_huge"], lambda e, d, ck: eval_args(e, d, ck), tag="size"),
    *K("sample", ["config_huge"], lambda e, d, ck: sample_args(e, d, ck), tag="size"),
    *K("hf_export", ["config_huge"], lambda e, d, ck: hf_args(e, d, ck), tag="size"),
    *E("eval", ["huge"], lambda e, d, f: eval_args(e, d, f, data=e.val)),
    *K("eval", ["json_codebook_huge_image"], lambda e, d, ck: eval_args(e, d, ck, images=e.images), tag="size"),
    *O("bench", [
        ("n-embd-huge", ["--only", "train", "--n_embd", str(2 ** 20)], ["the train benchmark at these sizes needs",
                                                                         "more than the"]),
        ("batch-huge", ["--only", "train", "--batch", str(10 ** 12)], ["the train benchmark", "more than the"]),
        ("block-huge", ["--only", "sample", "--block_size", str(10 ** 11)], ["the sample benchmark", "more than the"]),
        ("sample-batch-huge", ["--only", "sample", "--sample_batches", str(10 ** 10)], ["the sample benchmark"]),
        ("matmul-huge", ["--only", "train", "--matmul_n", str(10 ** 7)], ["the train benchmark", "more than the"]),
        ("kmeans-huge", ["--kmeans_n", str(10 ** 13)], ["the kmeans benchmark", "more than the"]),
        ("reps-negative", ["--reps", "-2"], ["--reps must be at least 1, got -2"]),
        ("warmup-negative", ["--warmup", "-1"], ["--warmup must be >= 0, got -1"]),
        ("kmeans-k-zero", ["--kmeans_k", "0"], ["--kmeans_k must be at least 1, got 0"]),
    ], lambda e, d: bench_args(d), tag="size"),

    # ------------------------------------------------------------------ 5. JSON files with the wrong types
    *K("eval", ["json_config_data_dir_number", "json_config_source_list", "json_config_image_size_string",
                "json_config_model_list", "json_metrics_list", "json_metrics_accuracy_string",
                "json_codebook_list", "json_codebook_config_list", "json_codebook_patch_string",
                "json_codebook_stats_list", "json_codebook_std_string", "json_vocab_list"],
       lambda e, d, ck: eval_args(e, d, ck), tag="ckpt"),
    *K("hf_export", ["json_config_data_dir_number", "json_metrics_topk_list", "json_metrics_per_class_string",
                     "json_metrics_confusion_object", "json_metrics_n_string", "json_codebook_weight_string",
                     "json_codebook_image_size_number", "json_codebook_inertia_string", "json_vocab_id_string"],
       lambda e, d, ck: hf_args(e, d, ck), tag="ckpt"),
    *K("sample", ["json_config_model_list", "json_metrics_accuracy_string", "json_codebook_channels_string",
                  "json_codebook_mean_number"], lambda e, d, ck: sample_args(e, d, ck), tag="ckpt"),
    *K("data", ["json_codebook_list", "json_codebook_patch_string", "json_codebook_stats_list", "json_vocab_list"],
       lambda e, d, ck: (["render", e.val, "--codebook", ck, "--out", out(d, "grid.png")], [out(d, "grid.png")]),
       tag="render"),
    *K("train", ["json_metrics_list", "json_codebook_config_list"],
       lambda e, d, ck: train_args(e, d, None, "--init_from", ck), tag="init-from"),
    *[c for k in ("json_config_source_list", "json_metrics_accuracy_string") for c in resume_from(k)],
    *C("train-resume-config-lr-string", "train", resume_config_lr_string),
    *trainer_state("list"), *trainer_state("step_string"), *trainer_state("no_rng"),
    *report_case("source-number", _set("config.source", 5), "config.source is a number (5), expected a string"),
    *report_case("config-list", _set("config", [1, 2]), "config is a list, expected a JSON object"),
    *report_case("image-size-string", _set("config.image_size", "8"), "config.image_size is a string (8), expected an integer"),
    *report_case("val-fraction", _set("config.val_fraction", 5), "test_fraction must be between 0 and 1, got 5"),
    *report_case("no-config", lambda r: r.pop("config"), 'expected a JSON object with the data settings under "config"'),
    *C("data-reconstruct-report-a-string", "data", lambda e, d: (
        ["reconstruct", data_copy(e, d, lambda p: write_lines(os.path.join(p, "report.json"), ['"prepared"'])),
         "--out", out(d, "r.png")],
        [os.path.join(d, "data", "report.json"), 'expected a JSON object with the data settings'], [out(d, "r.png")])),
    *C("eval-report-classes-not-names", "eval", report_classes),
    *C("eval-config-classes-not-names", "eval", config_classes),
    *E("eval", ["train_config_list", "metrics_string"], lambda e, d, f: eval_args(e, d, f, data=e.val)),
    *E("hf_export", ["train_config_data_dir", "train_config_list"], lambda e, d, f: hf_args(e, d, f)),
    *C("eval-curves-loss-string", "eval", broken_log(b'{"step": 1, "train_loss": "abc"}\n',
                                                     ":1: train_loss is a string (abc), expected a number")),
    *C("eval-curves-accuracy-list", "eval", broken_log(b'{"step": 1}\n{"step": 2, "val_accuracy": [0.5]}\n',
                                                       ":2: val_accuracy is a list ([0.5]), expected a number")),
    *C("eval-curves-step-bool", "eval", broken_log(b'{"step": true}\n', ':1: expected a JSON object with a numeric "step"')),

    # ------------------------------------------------------------------ 6. one line, whatever the flags and names
    *O("bench", [
        ("unknown-option", ["--fast"], ["bench.py: unrecognized arguments: --fast; valid options:"]),
        ("not-an-int", ["--reps", "many"], ["bench.py: argument --reps: invalid int value: 'many'"]),
        ("bad-choice", ["--kmeans_data", "mnist"], ["argument --kmeans_data: invalid choice: 'mnist'"]),
        ("missing-value", ["--threads"], ["argument --threads: expected one argument"]),
    ], lambda e, d: bench_args(d), tag="flag"),
    *C("data-no-subcommand", "data", lambda e, d: ([], ["data.py: the following arguments are required: cmd"], [])),
    *C("data-unknown-subcommand", "data", lambda e, d: (["draw"], ["argument cmd: invalid choice: 'draw'"], [])),
    *C("data-render-no-file", "data", lambda e, d: (["render", "--out", out(d, "g.png")],
                                                    ["data.py render: the following arguments are required: file"],
                                                    [out(d, "g.png")])),
    *C("data-reconstruct-n-not-int", "data", lambda e, d: (["reconstruct", e.data, "--n", "ten", "--out", out(d, "r.png")],
                                                           ["data.py reconstruct: argument --n: invalid int value: 'ten'"],
                                                           [out(d, "r.png")])),
    *C("data-render-unknown-option", "data", lambda e, d: (["render", e.val, "--rows", "3"],
                                                           ["data.py render: unrecognized arguments: --rows 3; valid options:"], [])),
    *C("hf_export-unknown-option", "hf_export", lambda e, d: (["--fp16"], ["hf_export.py: unrecognized arguments: --fp16"], [])),
    *C("eval-missing-value", "eval", lambda e, d: (["--batch_size"], ["eval.py metrics: argument --batch_size: expected one argument"], [])),
    *C("sample-not-a-float", "sample", lambda e, d: (["--temperature", "warm"], ["argument --temperature: invalid float value: 'warm'"], [])),
    *C("train-two-configs", "train", lambda e, d: (["a.yaml", "b.yaml"], ["train.py: unrecognized arguments: b.yaml"], [])),
    *named("eval-data-newline-in-name!", "eval", "badNLname.jsonl",
           lambda e, d, p: eval_args(e, d, data=named_bad_jsonl(e, d, p)), ':1: expected a JSON object with a string field "tokens"'),
    *named("eval-data-carriage-return-in-name", "eval", "a CR b.jsonl",
           lambda e, d, p: eval_args(e, d, data=named_bad_jsonl(e, d, p)), ":1: expected a JSON object"),
    *named("eval-data-undecodable-name!", "eval", "cafFF.jsonl",
           lambda e, d, p: eval_args(e, d, data=named_bad_jsonl(e, d, p)), ":1: expected a JSON object"),
    *named("sample-ckpt-newline-in-name", "sample", "ckNLpt", lambda e, d, p: sample_args(e, d, p),
           "no such checkpoint folder"),
    *named("sample-ckpt-undecodable-name", "sample", "ckFFpt", lambda e, d, p: sample_args(e, d, p),
           "no such checkpoint folder"),
    *named("hf_export-ckpt-escape-in-name", "hf_export", "ESC[31mred", lambda e, d, p: hf_args(e, d, p),
           "no such checkpoint folder"),
    *named("data-render-newline-in-name", "data", "seqsNL.jsonl",
           lambda e, d, p: (["render", named_bad_jsonl(e, d, p), "--codebook", e.data, "--out", out(d, "g.png")],
                            [out(d, "g.png")]), ":1: expected a JSON object"),
    *named("data-prepare-undecodable-folder", "data", "imgFFs", lambda e, d, p: prepare_args(d, f"folder:{p}"),
           "no such folder"),
    *named("train-config-newline-in-name", "train", "cfgNL.yaml",
           lambda e, d, p: ([write_file(p, b"layers: 4\n"), "--out_dir", out(d, "run")], [out(d, "run")]),
           "unknown key 'layers'"),
    *named("train-out-dir-under-a-file-with-odd-name", "train", "fileCRFF",
           lambda e, d, p: ([*e.train_args, "--data_dir", e.data, "--out_dir", os.path.join(write_file(p, b"x"), "run")], []),
           "is a file"),
    *named("eval-curves-undecodable-name", "eval", "runFF",
           lambda e, d, p: (["--curves", p, "--out", out(d, "c.png")], [out(d, "c.png")]), "no such training log"),

    # ------------------------------------------------------------------ 7. every output checked before any work
    *C("sample-jsonl-same-as-png", "sample", lambda e, d: (
        ["--ckpt", e.final, "--out_png", out(d, "s.png"), "--out_jsonl", out(d, "s.png")],
        [out(d, "s.png"), "given for two outputs"], [out(d, "s.png")])),
    *C("sample-jsonl-same-file-other-spelling", "sample", lambda e, d: (
        ["--ckpt", e.final, "--out_png", out(d, "s.png"), "--out_jsonl", os.path.join(d, "out", ".", "s.png")],
        ["given for two outputs (the same file as"], [out(d, "s.png")])),
    *C("sample-jsonl-is-a-folder", "sample", lambda e, d: (
        ["--ckpt", e.final, "--out_png", out(d, "s.png"), "--out_jsonl", d],
        [d, "is a folder; the JSONL file must be a file path"], [out(d, "s.png")])),
    *C("sample-jsonl-ends-in-slash", "sample", lambda e, d: (
        ["--ckpt", e.final, "--out_png", out(d, "s.png"), "--out_jsonl", out(d, "new") + "/"],
        ["is a folder; the JSONL file must be a file path"], [out(d, "s.png"), out(d, "new")])),
    *C("sample-complete-jsonl-under-a-file", "sample", lambda e, d: (
        ["--ckpt", e.final, "--complete", "2", "--out_png", out(d, "c.png"), "--out_jsonl", os.path.join(e.afile, "c.jsonl")],
        [e.afile, "is a file"], [out(d, "c.png")])),
    *C("eval-out-ends-in-slash", "eval", lambda e, d: (
        ["--ckpt", e.final, "--data", e.val, "--out", out(d, "m") + "/"], ["is a folder; the metrics file must be"],
        [out(d, "m")])),
    *C("eval-curves-out-is-a-folder", "eval", lambda e, d: (
        ["--curves", e.run, "--out", d], [d, "is a folder; the curves PNG must be a file path"], [])),
    *under_file("data", lambda e, d, p: ["reconstruct", e.data, "--out", p], "recon.png"),
    *C("data-reconstruct-out-is-a-folder", "data", lambda e, d: (
        ["reconstruct", e.data, "--out", d], [d, "is a folder; the PNG grid must be a file path"], [])),
    *C("data-render-out-ends-in-slash", "data", lambda e, d: (
        ["render", e.val, "--out", out(d, "g") + "/"], ["is a folder; the PNG grid must be a file path"], [out(d, "g")])),
    *C("hf_export-out-is-a-file", "hf_export", lambda e, d: (
        ["--ckpt", e.final, "--out", e.afile], [e.afile, "exists and is not an earlier export"], [])),
    *under_file("bench", lambda e, d, p: bench_args(d)[0][:-1] + [p], "bench.json"),
    *C("bench-json-is-a-folder", "bench", lambda e, d: (
        [*bench_args(d)[0][:-1], d], [d, "is a folder; the JSON file must be a file path"], [])),
    *C("bench-json-ends-in-slash", "bench", lambda e, d: (
        [*bench_args(d)[0][:-1], out(d, "b") + "/"], ["is a folder; the JSON file must be a file path"], [out(d, "b")])),
    *C("train-out-dir-is-a-file", "train", lambda e, d: (
        [*e.train_args, "--data_dir", e.data, "--out_dir", e.afile], [e.afile, "is a file; the run folder"], [])),

    # ------------------------------------------------------------------ 8. silently accepted before, refused now
    *folder_case("data-prepare-single-class", "data", ("c0",), None,
                 ["all 10 images are of one class ('c0'); a classifier needs images of at least 2 classes"], prep_folder),
    *folder_case("train-single-class", "train", ("c1",), None, ["a classifier needs images of at least 2 classes"],
                 train_folder),
    *folder_case("data-prepare-empty-class-folder", "data", ("c0", "c1"), lambda r: os.makedirs(os.path.join(r, "c2")),
                 ["ROOT/c2: class folder without image files; add images or remove it"], prep_folder),
    *folder_case("data-prepare-class-folder-of-text-files", "data", ("c0", "c1"),
                 lambda r: write_file(os.path.join(r, "notes", "readme.txt"), b"x"),
                 ["ROOT/notes: class folder without image files"], prep_folder),
    *folder_case("train-empty-class-folder", "train", ("c0", "c1", "c2"), lambda r: os.makedirs(os.path.join(r, "c9")),
                 ["ROOT/c9: class folder without image files"], train_folder),
    *folder_case("eval-images-stray-image", "eval", ("c0", "c1"),
                 lambda r: shutil.copy(os.path.join(r, "c0", sorted(os.listdir(os.path.join(r, "c0")))[0]),
                                       os.path.join(r, "x.png")),
                 ["ROOT/x.png: not in a class folder"], lambda e, d, root: eval_args(e, d, images=root)),
    *X("data", ["label_gap"], lambda e, d, root: prepare_args(d, f"idx:{root}")),
    *folder_case("data-prepare-images-outside-class-folders", "data", ("c0", "c1"),
                 lambda r: shutil.copy(os.path.join(r, "c0", sorted(os.listdir(os.path.join(r, "c0")))[0]),
                                       os.path.join(r, "stray.png")),
                 ["ROOT/stray.png: not in a class folder (1 such file(s)"], prep_folder),
    *C("train-yaml-duplicated-lr", "train", lambda e, d: (
        [write_file(os.path.join(d, "cfg.yaml"), b"lr: 1.0e-3\nepochs: 2\nlr: 3.0e-4\n"), "--out_dir", out(d, "run")],
        [os.path.join(d, "cfg.yaml") + ":3: invalid YAML (duplicated key 'lr')"], [out(d, "run")])),
    *C("train-yaml-duplicated-key-far-apart", "train", lambda e, d: (
        [write_file(os.path.join(d, "cfg.yaml"), b"out_dir: a\n# the model\nn_layer: 2\nn_head: 2\nout_dir: b\n"),
         "--out_dir", out(d, "run")],
        [os.path.join(d, "cfg.yaml") + ":5: invalid YAML (duplicated key 'out_dir')"], [out(d, "run")])),
    *C("data-reconstruct-n-negative", "data", lambda e, d: (
        ["reconstruct", e.data, "--n", "-3", "--out", out(d, "r.png")], ["--n must be at least 1, got -3"], [out(d, "r.png")])),
    *C("data-reconstruct-n-zero", "data", lambda e, d: (
        ["reconstruct", e.data, "--n", "0", "--out", out(d, "r.png")], ["--n must be at least 1, got 0"], [out(d, "r.png")])),
    *C("data-render-n-negative", "data", lambda e, d: (
        ["render", e.val, "--n", "-3", "--out", out(d, "g.png")], ["--n must be at least 1, got -3"], [out(d, "g.png")])),
    *csv_case("nan-value", b"0,0,0,0,nan,1,1,1,0,0\n", "a value is not a finite number (nan or inf)"),
    *O("sample", [
        ("greedy-with-temperature", ["--greedy", "--temperature", "0.5"], ["--greedy always takes the most likely token"]),
        ("greedy-with-top-k", ["--greedy", "--top_k", "3"], ["--temperature, --top_k and --top_p do not apply"]),
        ("greedy-with-top-p", ["--greedy", "--top_p", "0.9"], ["--greedy always takes the most likely token"]),
        ("complete-with-start", ["--complete", "2", "--start", "<IMG> <Z_000>"], ["sample.py complete: unrecognized arguments: --start"]),
    ], lambda e, d: sample_args(e, d), tag="silent"),
    *O("eval", [
        ("top-k-without-next", ["--top_k", "3"], ["eval.py metrics: unrecognized arguments: --top_k 3"]),
        ("repair-v1-with-images", ["--images", "imgs", "--repair_v1"], ["--repair_v1 is for sequence files"]),
    ], lambda e, d: eval_args(e, d), tag="silent"),
    *C("eval-curves-with-top-k", "eval", lambda e, d: (["--curves", e.run, "--top_k", "2", "--out", out(d, "c.png")],
                                                      ["eval.py curves: unrecognized arguments: --top_k 2"], [out(d, "c.png")])),
    *O("train", [("allow-changes-without-resume", ["--allow_changes"], ["--allow_changes is for --resume"])],
       lambda e, d: train_args(e, d), tag="silent"),

    # ------------------------------------------------------------------ 9. sequences cut by max_length
    *O("train", [
        ("max-length-cuts-every-image", ["--max_length", "12"], [
            "config: max_length 12 is shorter than the sequences of image_size 8 in patches of 2 (21 tokens): it would "
            "cut every sequence (up to 9 image tokens each", "set max_length: 21 (or 0, the data's length), or "
            "allow_truncation: true"]),
        ("max-length-one-short", ["--max_length", "20"], ["max_length 20 is shorter", "up to 1 image tokens each"]),
        ("max-length-negative", ["--max_length", "-1"], ["config: max_length must be >= 0 (0: the data's sequence length)"]),
        ("image-size-longer-than-max-length", ["--image_size", "16", "--max_length", "32"], [
            "max_length 32 is shorter than the sequences of image_size 16 in patches of 2 (69 tokens)"]),
    ], lambda e, d: train_args(e, d, out(d, "data")), tag="cut"),
    *C("train-max-length-colour-images", "train", lambda e, d: (
        [*e.train_args, "--data_dir", out(d, "data"), "--out_dir", out(d, "run"), "--image_size", "32", "--channels", "3",
         "--patch_size", "4", "--max_length", "64"],
        ["max_length 64 is shorter than the sequences of image_size 32 in patches of 4 (69 tokens)", "set max_length: 69"],
        [out(d, "data"), out(d, "run")])),

    # ------------------------------------------------------------------ 3. resuming with other settings
    *resume_changed("n-layer", ["--n_layer", "3"], ["cannot resume with other model or data settings: n_layer 2 -> 3"]),
    *resume_changed("width-and-heads", ["--n_embd", "64", "--n_head", "4"],
                    ["other model or data settings: n_head 2 -> 4, n_embd 32 -> 64"]),
    *resume_changed("max-length", ["--max_length", "24"], ["other model or data settings: max_length 32 -> 24"]),
    *resume_changed("num-codes", ["--num_codes", "16"], ["other model or data settings: num_codes 8 -> 16"]),
    *resume_changed("patch-and-image-size", ["--patch_size", "4", "--image_size", "16"],
                    ["other model or data settings: patch_size 2 -> 4, image_size 8 -> 16"]),
    *resume_changed("augment", ["--augment", "2"], ["other model or data settings: augment 0 -> 2"]),
    *resume_changed("model-and-lr", ["--lr", "0.002", "--n_layer", "4"], ["other model or data settings: n_layer 2 -> 4;"]),
    *resume_changed("lr", ["--lr", "0.002"], ["--resume with other training settings than the run's: lr 0.001 -> 0.002",
                                              "pass --allow_changes to go on with them"]),
    *resume_changed("epochs-and-warmup", ["--epochs", "4", "--warmup_steps", "5"],
                    ["other training settings than the run's: epochs 1 -> 4, warmup_steps 2 -> 5"]),
    *resume_changed("seed", ["--seed", "2"], ["other training settings than the run's: seed 1 -> 2"]),
    *resume_changed("batch-size", ["--batch_size", "4"], ["other training settings than the run's: batch_size 8 -> 4"]),
    *resume_changed("label-weight", ["--label_weight", "5"], ["label_weight 1.0 -> 5.0"]),
    *resume_changed("dropout", ["--dropout", "0.1"], ["other training settings than the run's: dropout 0.0 -> 0.1"]),
    *resume_changed("data-dir", ["--data_dir", "elsewhere"], ["data_dir"]),
]


# ----------------------------------------------------------------------------- running and checking

def run_subprocess(script, argv):
    r = subprocess.run([sys.executable, f"{script}.py", *argv], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    return r.returncode, r.stdout, r.stderr


def run_inprocess(script, argv):
    """The script's main() through cli.run_cli, as `python script.py argv` would run it."""
    mod = importlib.import_module(script)
    err, so = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = [f"{script}.py", *argv]
    try:
        with contextlib.redirect_stdout(so), contextlib.redirect_stderr(err), \
                warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")           # as in a fresh `python script.py`
            for cat in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", cat)
            try:
                cli.run_cli(mod.main)
                code = 0
            finally:  # warnings go to stderr, where a user would see them
                for w in caught:
                    err.write(warnings.formatwarning(w.message, w.category, w.filename, w.lineno))
    except SystemExit as ex:
        code = ex.code
    except BaseException:  # what a subprocess would print as a traceback
        err.write(traceback.format_exc())
        code = "traceback"
    finally:
        sys.argv = saved
    return code, so.getvalue(), err.getvalue()


def snapshot(*folders):
    """Every file and folder under `folders` with its size and modification time."""
    seen = {}
    for top in folders:
        for d, dirs, files in os.walk(top):
            for name in dirs + files:
                p = os.path.join(d, name)
                st = os.lstat(p)
                seen[p] = (st.st_size if name in files else None, st.st_mtime_ns)
    return seen


def check_failure(code, stdout, stderr, expect):
    assert code not in (0, None, "traceback"), f"exit {code!r}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    lines = terminal_lines(stderr)
    assert len(lines) == 1, f"expected one line on stderr, got {lines}\nraw: {stderr[-2000:]!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    for part in expect:
        assert part in line, f"{part!r} not in {line!r}"
    return line


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(env, tmp_path, case):
    name, script, build = case
    d = str(tmp_path)
    argv, expect, outputs = build(env, d)
    assert all(os.path.abspath(o).startswith(d) for o in outputs)
    shared = (env.data, env.run, env.images)
    before = snapshot(d, *shared)
    code, stdout, stderr = (run_subprocess if name.endswith("!") else run_inprocess)(script, argv)
    check_failure(code, stdout, stderr, expect)
    assert code == 2, f"a mistake in the input exits with 2, got {code}"
    for o in outputs:
        assert not os.path.exists(o), f"partial output left behind: {o}"
    assert snapshot(d, *shared) == before, "files were created, changed or left behind"
    assert not os.path.exists(env.marker), "a pickle was unpickled"


def count_cases():
    n = {}
    for c in CASES:
        n[c[1]] = n.get(c[1], 0) + 1
    return n


# ----------------------------------------------------------------------------- full disk, closed pipe

def no_space(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("script", ["data", "train", "eval", "sample", "hf_export"])
def test_full_disk_is_one_line_and_leaves_nothing(env, tmp_path, monkeypatch, script):
    """Every write fails as on a full disk (fsync raises ENOSPC): one line naming what could not be
    written, no temporary files, no output. train.py here has to prepare its data folder first."""
    d = str(tmp_path)
    argv, outputs, expect = {
        "data": lambda: (*prepare_args(d, f"folder:{env.images}"), [out(d, "prepared"), "cannot write the prepared files"]),
        "train": lambda: (train_args(env, d, out(d, "data"))[0], [out(d, "data"), out(d, "run")],
                          [out(d, "data"), "cannot write the prepared files"]),
        "eval": lambda: (*eval_args(env, d, data=env.val), [out(d, "eval.json")]),
        "sample": lambda: (*sample_args(env, d), [out(d, "s.png")]),
        "hf_export": lambda: (*hf_args(env, d), [out(d, "hf"), "cannot write export"]),
    }[script]()
    before = snapshot(env.data, env.run)
    monkeypatch.setattr(os, "fsync", no_space)
    code, stdout, stderr = run_inprocess(script, argv)
    monkeypatch.undo()
    check_failure(code, stdout, stderr, expect + ["No space left on device"])
    assert code in (1, 2)
    for o in outputs:
        assert not os.path.exists(o), f"partial output left behind: {o}"
    left = [f for _, ds, fs in os.walk(d) for f in ds + fs]
    assert not [f for f in left if f not in ("out",)], f"files left behind: {left}"
    assert snapshot(env.data, env.run) == before


def test_full_disk_during_training_keeps_no_checkpoint(env, tmp_path, monkeypatch):
    """The data is there, the disk fills up at the first checkpoint: one line naming the checkpoint,
    no checkpoint folder and no temporary folder left behind (log.jsonl keeps its line: appending
    needs no fsync, and a fresh start or --resume deals with it)."""
    d = str(tmp_path)
    argv, _ = train_args(env, d)
    monkeypatch.setattr(os, "fsync", no_space)
    code, stdout, stderr = run_inprocess("train", argv)
    monkeypatch.undo()
    run = out(d, "run")
    check_failure(code, stdout, stderr, [os.path.join(run, "final"), "cannot write checkpoint (No space left on device)"])
    assert sorted(os.listdir(run)) == ["log.jsonl"], os.listdir(run)   # no final/, best/, .tmp-*


def test_closed_pipe_is_quiet(env, tmp_path):
    """`python eval.py ... | head -0`: the reader is gone before anything is printed. No traceback, no
    'Exception ignored' at exit; the exit status is 141, as for a tool killed by SIGPIPE."""
    p = subprocess.Popen([sys.executable, "eval.py", "--ckpt", env.final, "--data", env.val, "--out",
                          str(tmp_path / "m.json")], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err[-2000:]
    assert terminal_lines(err) == [], err[-2000:]


# ----------------------------------------------------------------------------- odd but valid images

def test_odd_images_are_converted_not_refused(env, tmp_path):
    """16-bit grey, CMYK, 1-bit, RGBA of another size and a 1x1 image are read like the 8-bit grey
    image they show (16-bit values scaled by 1/257, not clipped at 255)."""
    from imagegpt.sources import read_image
    grey = (np.arange(64).reshape(8, 8) * 4).astype(np.uint8)
    files = {
        "i16.png": Image.fromarray(grey.astype(np.uint16) * 257),
        "cmyk.tif": Image.fromarray(grey).convert("CMYK"),
        "rgba.png": Image.fromarray(grey).convert("RGBA"),
    }
    for name, im in files.items():
        im.save(tmp_path / name)
        got = read_image(str(tmp_path / name), (8, 8), 1)
        assert got.shape == (8, 8, 1) and np.abs(got[..., 0].astype(int) - grey).max() <= 1, name
    Image.new("L", (1, 1), 200).save(tmp_path / "dot.png")
    assert (read_image(str(tmp_path / "dot.png"), (8, 8), 1) == 200).all()
    Image.new("1", (16, 16), 1).save(tmp_path / "bits.png")
    assert (read_image(str(tmp_path / "bits.png"), (8, 8), 3) == 255).all()
    # a phone's photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to show it)
    stored = np.zeros((8, 8), np.uint8)
    stored[0, 0] = 255                                # top left as stored: top right as shown
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    shown = read_image(str(tmp_path / "phone.png"), (8, 8), 1)[..., 0]
    assert shown[0, 7] == 255 and shown.sum() == 255


# ----------------------------------------------------------------------------- no code execution from files

def test_no_pickle_loads_in_the_code():
    """Nothing in the project unpickles a file: every torch.load is weights_only=True, no pickle.load,
    no numpy allow_pickle, no yaml.load (only yaml.safe_load)."""
    bad = []
    for name in sorted(os.listdir(ROOT)):
        if not name.endswith(".py"):
            continue
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            src = f.read()
        for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", src):
            if "weights_only=True" not in m.group(0):
                bad.append(f"{name}: {m.group(0)}")
        for pat in (r"pickle\.loads?\(", r"allow_pickle\s*=\s*True", r"yaml\.load\(", r"yaml\.unsafe_load",
                    r"\b(dill|joblib|cloudpickle|shelve|marshal)\b"):
            bad += [f"{name}: {m.group(0)}" for m in re.finditer(pat, src)]
    assert not bad, bad


ENTRY_POINTS = {  # -> argv given the checkpoint folder c (a copy of final/ inside run folder r) and the case folder d
    "eval.py --ckpt": ("eval", lambda e, d, r, c: ["--ckpt", c, "--data", e.val, "--out", out(d, "m.json")]),
    "sample.py --ckpt": ("sample", lambda e, d, r, c: ["--ckpt", c, "--out_png", out(d, "s.png")]),
    "hf_export.py --ckpt": ("hf_export", lambda e, d, r, c: ["--ckpt", c, "--out", out(d, "hf")]),
    "train.py --resume": ("train", lambda e, d, r, c: [*e.train_args, "--data_dir", e.data, "--out_dir", r, "--resume"]),
    "train.py --init_from": ("train", lambda e, d, r, c: [*e.train_args, "--data_dir", e.data, "--out_dir", out(d, "r2"),
                                                          "--init_from", c]),
}


PICKLED = [(entry, victim) for entry in ENTRY_POINTS for victim in ("model.safetensors", "codebook.safetensors",
                                                                     "trainer_state.pt")
           if victim != "trainer_state.pt" or entry == "train.py --resume"]   # only --resume reads it


@pytest.mark.parametrize("entry,victim", PICKLED, ids=[f"{e}-{v}" for e, v in PICKLED])
def test_crafted_pickle_is_refused(env, tmp_path, entry, victim):
    """A file of the checkpoint replaced by a pickle whose loading would run `touch marker`: every
    command that reads weights refuses it in one line, and the marker never appears. (trainer_state.pt
    is read only by --resume, with torch.load(weights_only=True); that case runs the real command.)"""
    d = str(tmp_path)
    run = os.path.join(d, "run")
    os.makedirs(run)
    ck = os.path.join(run, "final")
    shutil.copytree(env.final, ck)
    marker = os.path.join(d, "marker")
    with open(os.path.join(ck, victim), "wb") as f:
        pickle.dump({"weights": Evil(marker)}, f, protocol=2)
    script, argv = ENTRY_POINTS[entry]
    before = snapshot(d)
    real = entry == "train.py --resume" and victim == "trainer_state.pt"   # the torch.load path, for real
    code, stdout, stderr = (run_subprocess if real else run_inprocess)(script, argv(env, d, run, ck))
    line = check_failure(code, stdout, stderr, [os.path.join(ck, victim)])
    assert code == 2
    assert "is a Python pickle, not safetensors" in line or "refused, it holds Python objects" in line, line
    assert not os.path.exists(marker), "the pickle was loaded: code from a file ran"
    assert snapshot(d) == before
