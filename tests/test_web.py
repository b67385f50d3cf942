"""The model outside this repository: the image tokenizer as ONNX against tokenizer.py, the torch-free
client (README, model card) in a virtual environment without torch against eval.py, and the static
page of `hf_export.py --web` served by `python -m http.server` (no serve.py) in Debian's chromium,
driven by Playwright: a grey model of digits and a colour model of named classes.

The models are small GPTs with random (perturbed) weights over codebooks fitted here: 10 digits on the
built-in digits, and circles, squares, triangles and stars in colour (imagegpt/shapes.py). What is compared is exact
plumbing (the same codes, the same prediction, complete drawings), which needs no trained model.
WEB_TEST_CKPT / WEB_TEST_COLOUR_CKPT=DIR use trained checkpoints instead, and WEB_SCREENSHOTS=DIR keeps
the screenshots there (web.png, web_colour.png).
"""
import base64
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from fixtures import ROOT
from PIL import Image
from test_onnx import tiny_model
from test_serve import CHROMIUM, CHROMIUM_ARGS, draw, free_port

import eval as ev
import hf_export
from imagegpt import checkpoint, onnx_tokenizer, shapes, web_export
from imagegpt.client_parity import client_parity, torch_free_python
from imagegpt.data_config import DataConfig
from imagegpt.split_images import real_split
from imagegpt.errors import UserError
from imagegpt.metrics import class_probs
from imagegpt.onnx_runtime import OnnxGPT
from imagegpt.prepare import ensure_prepared
from imagegpt.settings import build
from imagegpt.token_format import Vocab
from imagegpt.train_config import TrainConfig
from tokenizer import CodebookConfig, fit_codebook, load_codebook, uint8_to_tensor


def exported(root, **data):
    """Prepare a data folder (a small codebook), save a conditional checkpoint of a random GPT on it and
    export it with --web -> namespace(ckpt, hf, site, data_dir, export_s)."""
    root = str(root)
    settings = dict(data_dir=os.path.join(root, "data"), num_codes=32, kmeans_iters=3, fit_samples=20000,
                    augment=0, **data)
    settings.setdefault("test_fraction", 0.2)
    report = ensure_prepared(build(DataConfig, **settings), log=lambda *a: None)
    vocab, book = Vocab.load(os.path.join(settings["data_dir"], "vocab.json")), load_codebook(settings["data_dir"])
    ckpt = os.path.join(root, "run", "final")
    checkpoint.save(ckpt, tiny_model(0, len(vocab), book.seq_len + 5),
                    build(TrainConfig, out_dir=os.path.join(root, "run"), cond_fraction=0.5, **settings), vocab, book,
                    class_names=report["classes"])
    hf, site = os.path.join(root, "hf"), os.path.join(root, "site")
    t = time.monotonic()
    assert hf_export.main(["--ckpt", ckpt, "--out", hf, "--web", site]) == 0
    return SimpleNamespace(ckpt=ckpt, hf=hf, site=site, data_dir=settings["data_dir"], export_s=time.monotonic() - t)


@pytest.fixture(scope="module")
def grey(tmp_path_factory):
    """Digits: the built-in images, 28 x 28 grey, 4 x 4 patches, 32 codes, a test split of 250 digits
    (WEB_TEST_CKPT: a trained one)."""
    root = tmp_path_factory.mktemp("web_grey")
    if os.environ.get("WEB_TEST_CKPT"):
        return from_checkpoint(os.environ["WEB_TEST_CKPT"], root)
    return exported(root, test_fraction=0.05)


@pytest.fixture(scope="module")
def colour(tmp_path_factory):
    """Shapes (imagegpt/shapes.py): circles, squares, triangles and stars, 32 x 32 colour, shape apart from
    colour (a palette codebook, as config/colour.yaml), with the position feature too (WEB_TEST_COLOUR_CKPT:
    a trained one)."""
    root = tmp_path_factory.mktemp("web_colour")
    if os.environ.get("WEB_TEST_COLOUR_CKPT"):
        return from_checkpoint(os.environ["WEB_TEST_COLOUR_CKPT"], root)
    shapes.write_folder(os.path.join(root, "shapes"), "colour", per_class=10)
    return exported(root, source=f"folder:{os.path.join(root, 'shapes')}", image_size=32, channels=3, w_position=0.3,
                    palette=16)


def from_checkpoint(ckpt, root):
    hf, site = str(root / "hf"), str(root / "site")
    assert hf_export.main(["--ckpt", ckpt, "--out", hf, "--web", site]) == 0
    return SimpleNamespace(ckpt=ckpt, hf=hf, site=site, data_dir=checkpoint.load(ckpt).data_dir, export_s=None)


# ----------------------------------------------------------------------------- the tokenizer graphs

@pytest.mark.parametrize("channels, patch, size, weights", [
    (1, 4, 28, {}),                                              # the demo's codebook
    (3, 2, 8, {"w_position": 0.3, "w_time": 0.2}),               # colour, every feature group
    (1, 1, 6, {"w_position": 1.0}),                              # one pixel per token, as the original
    (3, 4, 16, {"w_gradient": 0.0}),
    (1, 2, 4, {"w_colour": 0.0, "w_position": 0.5}),             # gradients and position only
    (3, 4, 16, {"palette": 8, "w_gradient": 0.0}),               # shape apart from colour (the colour recipe)
    (3, 2, 10, {"palette": 4, "w_position": 0.3}),               # ... with every pattern feature group
    (3, 1, 5, {"palette": 4}),                                   # an odd frame; one pixel per pattern
    (3, 1, 2, {"palette": 2}),                                   # a frame that is the whole image
])
def test_tokenizer_graphs_give_the_codebooks_codes_and_pixels(tmp_path, channels, patch, size, weights):
    g = torch.Generator().manual_seed(size)
    fit = (torch.rand(64, channels, size, size, generator=g) * 255).round() / 255
    book = fit_codebook(fit, CodebookConfig(patch_size=patch, num_codes=16, fit_samples=4000, kmeans_iters=5, **weights))
    tok, detok = onnx_tokenizer.export_tokenizer(book, str(tmp_path))
    for path in (tok, detok):
        onnx.checker.check_model(path, full_check=True)
    images = np.random.default_rng(size).integers(0, 256, (300, size, size, channels), dtype=np.uint8)
    r = onnx_tokenizer.tokenizer_parity(book, str(tmp_path), images)
    assert r["codes"] == 300 * book.seq_len and r["codes_differing"] == 0 and r["images_differing"] == 0
    assert r["max_abs_pixel_diff"] == 0 and r["max_abs_pixel_diff_all_codes"] == 0
    # the graphs' layout, as documented: uint8 (batch, H, W, C) -> int64 (batch, L) -> float32 (batch, H, W, C)
    s = onnxruntime.InferenceSession(tok, providers=["CPUExecutionProvider"])
    (i,), (o,) = s.get_inputs(), s.get_outputs()
    assert (i.name, i.type, i.shape) == ("images", "tensor(uint8)", ["batch_size", size, size, channels])
    assert (o.name, o.type, o.shape) == ("codes", "tensor(int64)", ["batch_size", book.seq_len])
    codes = s.run(None, {"images": images[:5]})[0]
    assert np.array_equal(codes, book.encode(uint8_to_tensor(images[:5])).numpy())
    d = onnxruntime.InferenceSession(detok, providers=["CPUExecutionProvider"])
    codes[:, -3:] = -1                                           # missing codes are black, as Codebook.decode
    out = d.run(None, {"codes": codes})[0]
    assert out.shape == (5, size, size, channels) and out.dtype == np.float32
    assert np.array_equal(out, book.decode(torch.from_numpy(codes)).permute(0, 2, 3, 1).numpy())


def test_the_export_writes_the_three_graphs_model_json_and_the_parity(grey):
    names = sorted(os.listdir(os.path.join(grey.hf, "onnx")))        # --web implies --onnx --quantize int8
    assert names == ["detokenizer.onnx", "export.json", "model.json", "model.onnx", "model_quantized.onnx", "tokenizer.onnx"]
    info = json.load(open(os.path.join(grey.hf, "onnx", "export.json")))
    parity = info["tokenizer"]["parity"]
    n = len(real_split(checkpoint.load(grey.ckpt).settings, "test")[2])
    assert parity["data"] == f"the test split of builtin ({n} images)"
    assert parity["images"] == n and parity["codes"] == 49 * n and parity["codes_differing"] == 0
    assert parity["max_abs_pixel_diff"] == 0 and parity["max_abs_pixel_diff_all_codes"] == 0
    facts = json.load(open(os.path.join(grey.hf, "onnx", "model.json")))
    ck = checkpoint.load(grey.ckpt)
    assert facts["classes"] == [str(c) for c in range(10)] and facts["image_size"] == [28, 28] and facts["channels"] == 1
    assert facts["tokens"]["code_offset"] == ck.vocab.code_offset and facts["tokens"]["label_offset"] == ck.vocab.label_offset
    assert facts["conditional"] is True and facts["seq_len"] == 49 and facts["graphs"]["model"] == "model.onnx"
    card = open(os.path.join(grey.hf, "README.md")).read()
    assert web_export.client("onnx/", "image.png", 9) in card
    # the static folder: the page, the graphs, model.json and onnxruntime-web's files, nothing else
    site_facts = json.load(open(os.path.join(grey.site, "model.json")))
    choice = site_facts["graph_choice"]
    files = sorted(os.path.relpath(os.path.join(d, f), grey.site) for d, _, fs in os.walk(grey.site) for f in fs)
    assert files == sorted(["index.html", "model.json", "onnx/detokenizer.onnx", f"onnx/{choice['graph']}",
                            "onnx/tokenizer.onnx", "ort/ort-wasm-simd-threaded.wasm", "ort/ort.wasm.bundle.min.mjs",
                            "static/app.js", "static/browser.js", "static/service.js", "static/style.css"])
    # int8 where it keeps the results: judged on the test split, as the rule says
    assert site_facts["graphs"]["model"] == choice["graph"] and choice["data"] == parity["data"]
    keeps = choice["agreement"] >= web_export.INT8_AGREEMENT and \
        choice["accuracy"]["int8"] >= choice["accuracy"]["fp32"] - web_export.INT8_ACCURACY_LOSS
    assert choice["graph"] == ("model_quantized.onnx" if keeps else "model.onnx")
    page = open(os.path.join(grey.site, "index.html")).read()
    assert '<body data-backend="browser">' in page and "http" not in page.replace("http-equiv", "")
    assert site_facts["onnxruntime_web"] == json.load(open(os.path.join(ROOT, "package.json")))["dependencies"]["onnxruntime-web"]


def test_the_readmes_test_command_is_cis_and_installs_the_page_runtime():
    """The README's second set-up command is .ci/run's, and it runs npm ci (onnxruntime-web for --web)."""
    line = lambda text: next(ln for ln in text.splitlines() if ln.startswith("([ -x /usr/bin/chromium ]"))
    readme = line(open(os.path.join(ROOT, "README.md")).read())
    assert readme == line(open(os.path.join(ROOT, ".ci", "run")).read())
    assert "&& npm ci &&" in readme and readme.endswith("python -m pytest -q tests")


def test_readme_shows_the_client():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert web_export.client("runs/demo/hf/onnx/", "digit.png", 7) in readme


def test_web_export_errors_are_one_line_and_write_nothing(grey, tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="is not an earlier static export"):
        hf_export.main(["--ckpt", grey.ckpt, "--out", str(tmp_path / "hf"), "--web", str(foreign)])
    assert not (tmp_path / "hf").exists() and os.listdir(foreign) == ["notes.txt"]
    shutil.copy(os.path.join(ROOT, "package-lock.json"), tmp_path)
    with pytest.raises(UserError, match=r"onnxruntime-web is not installed: run `npm ci`"):
        web_export.ort_dist(str(tmp_path))
    (tmp_path / "node_modules" / "onnxruntime-web").mkdir(parents=True)
    (tmp_path / "node_modules" / "onnxruntime-web" / "package.json").write_text('{"version": "0.0.1"}')
    with pytest.raises(UserError, match=r"is version 0.0.1, package-lock.json pins 1\.\d+\.\d+: run `npm ci` again"):
        web_export.ort_dist(str(tmp_path))
    fp32_only = tmp_path / "fp32"
    shutil.copytree(grey.hf, fp32_only)
    os.remove(fp32_only / "onnx" / "model_quantized.onnx")
    with pytest.raises(UserError, match="model_quantized.onnx: missing; export with --onnx --quantize int8"):
        web_export.write_site(str(fp32_only), str(tmp_path / "site"), int8=True)
    assert not (tmp_path / "site").exists()
    web_export.write_site(grey.hf, grey.site)                    # an earlier static export is replaced


# ----------------------------------------------------------------------------- the client without torch

def test_the_client_without_torch_predicts_what_eval_predicts(grey, tmp_path):
    python = torch_free_python(str(tmp_path))
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    ck = checkpoint.load(grey.ckpt)
    images, labels = real_split(ck.settings, "test")[2:]
    pngs = []
    for i, img in enumerate(images):
        pngs.append(str(tmp_path / f"{i:04d}_{labels[i]}.png"))
        Image.fromarray(img[..., 0]).save(pngs[-1])
    script = web_export.client(os.path.join(grey.hf, "onnx") + "/", pngs[0], 7) + f"""
import sys
assert "torch" not in sys.modules
preds = [max(p := classify(f), key=p.get) for f in {pngs!r}]
drawn = np.asarray(draw(3, seed=1))
print(json.dumps({{"preds": preds, "drawn": drawn.shape, "mean": float(drawn.mean())}}))
"""
    (tmp_path / "client.py").write_text(script)
    done = subprocess.run([python, "client.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    assert os.path.exists(tmp_path / "drawn.png") and got["drawn"] == [28, 28] and got["mean"] > 0
    # eval.py on the checkpoint's test split (the prepared test.jsonl), in PyTorch
    out = tmp_path / "eval.json"
    assert ev.main(["--ckpt", grey.ckpt, "--bf16", "false", "--out", str(out)]) == 0
    e = json.load(open(out))
    preds = [int(p) for p in got["preds"]]
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (labels, preds), 1)
    assert confusion.tolist() == e["confusion"] and np.mean(np.array(preds) == labels) == e["accuracy"]
    want = class_probs(ck, ck.encode_images(images)).argmax(1).tolist()
    assert preds == want                                          # image by image, not only in total


def test_client_parity_compares_the_client_with_pytorch_image_by_image(grey, tmp_path):
    """The record's check (reproduce.py export): the README's client without torch on the test images."""
    r = client_parity(grey.ckpt, grey.hf, str(tmp_path / "client"), limit=30)
    assert r["images"] == 30 and r["same_class"] == 30 and r["differing"] == []
    assert r["client_accuracy"] == r["torch_accuracy"] and r["client_seconds"] > 0


# ----------------------------------------------------------------------------- the static page in a browser

class StaticServer:
    """python -m http.server serving a folder on a free loopback port (no serve.py)."""

    def __init__(self, folder):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "http.server", "-d", folder, "-b", "127.0.0.1",
                                      str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(self.url + "/model.json", timeout=2)
                return
            except httpx.TransportError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "http.server did not start"
                time.sleep(0.1)

    def close(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)


@contextlib.contextmanager
def static_page(site):
    """The static folder served by python -m http.server's handler, opened in Chromium -> the page, once
    it is ready. Afterwards: no error in the page, and no request outside its own origin."""
    from playwright.sync_api import sync_playwright
    server, errors, requests = StaticServer(site), [], []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1000, "height": 900})
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                page.on("request", lambda r: requests.append(r.url))
                page.goto(server.url + "/")
                page.wait_for_selector("body[data-ready='1']", timeout=60000)
                yield page
                assert not errors, errors
            finally:
                browser.close()
    finally:
        server.close()
    outside = [u for u in requests if not u.startswith((server.url + "/", "data:", "blob:"))]
    assert not outside, outside
    assert any(u.endswith("/ort/ort-wasm-simd-threaded.wasm") for u in requests)   # the export's own copy


def read_png(data_url, channels):
    im = Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1])))
    return np.array(im.convert("L" if channels == 1 else "RGB")).reshape(im.height, im.width, channels)


def python_model(ck, site):
    """The model the page runs, in Python: the checkpoint's GPT in PyTorch when the page runs model.onnx,
    the same int8 graph in onnxruntime when it runs model_quantized.onnx."""
    graph = json.load(open(os.path.join(site, "model.json")))["graphs"]["model"]
    return ck.model if graph == "model.onnx" else OnnxGPT(os.path.join(site, "onnx", graph), threads=1)


def check_reading(page, ck, model):
    """The page's reading of what it shows equals the Python model's on the same pixels: the codes, the
    probabilities (to float tolerance), the prediction, and the picture decoded from the codes."""
    px = read_png(page.get_attribute("#seen", "data-input"), ck.codebook.channels)
    assert px.shape == (*ck.codebook.image_size, ck.codebook.channels)
    prefix = ck.encode_images(px[None])[0]
    assert page.get_attribute("#seen", "data-tokens") == ck.vocab.decode(prefix)
    want = class_probs(ck.with_model(model), [prefix])[0]
    got = [p for _, p in page.eval_on_selector_all("#bars .bar", "rows => rows.map(r => [r.dataset.class, +r.dataset.p])")]
    assert np.abs(np.array(got) - want.numpy()).max() < 1e-5
    assert page.inner_text("#pred") == ck.class_names[int(want.argmax())]
    seen = read_png(page.get_attribute("#seen", "src"), ck.codebook.channels)
    decoded = (ck.codebook.decode_ids(prefix, ck.vocab).permute(1, 2, 0) * 255).round().byte().numpy()
    assert np.array_equal(seen, decoded)
    return px


def check_drawings(page, ck, asked):
    """8 drawings of the class asked for (None: any, for a model trained without conditioning), each a
    complete image (of it), each captioned with a class name."""
    page.fill("#count", "8")
    if asked is not None:
        page.select_option("#class", str(asked))
    page.click("#generate")
    page.wait_for_selector("#results[data-count='8']", timeout=60000)
    figs = page.eval_on_selector_all("#results figure", "fs => fs.map(f => [f.dataset.wellFormed, f.dataset.tokens, "
                                     "f.querySelector('figcaption').textContent, f.querySelector('img').naturalWidth])")
    L = ck.codebook.seq_len
    for well, tokens, caption, width in figs:
        ids = ck.vocab.encode(tokens)
        assert well == "true" and caption.split(" \u00b7 ")[0] in ck.class_names and width == ck.codebook.image_size[1]
        if asked is None:
            assert ck.vocab.is_complete(ids, L)
        else:
            assert ck.vocab.is_cond_complete(ids, L) and ids[0] == ck.vocab.label_id(asked)
    return figs


def test_static_page_with_a_digit_model_in_chromium(grey, tmp_path):
    ck = checkpoint.load(grey.ckpt)
    model = python_model(ck, grey.site)
    shots = os.environ.get("WEB_SCREENSHOTS") or str(tmp_path)
    with static_page(grey.site) as page:
        assert page.inner_text("h1") == "Draw a digit" and page.title() == "imagegpt-tokens: draw a digit"
        assert "onnxruntime-web, 1 thread" in page.inner_text("#model-facts")   # no COOP/COEP here: 1 thread
        assert page.is_hidden("#colours") and page.is_hidden("#api-link")
        assert len(page.query_selector_all("#bars .bar")) == 10 and page.inner_text("#class-word") == "of digit"

        draw(page, [[(0.5, 0.15), (0.5, 0.5), (0.5, 0.85)]])                  # a "1"
        page.wait_for_selector("#probs[data-state='done']", timeout=30000)
        check_reading(page, ck, model)

        conditional = json.load(open(os.path.join(grey.site, "model.json")))["conditional"]   # WEB_TEST_CKPT: either
        assert page.is_disabled("#class") != conditional
        check_drawings(page, ck, 7 if conditional else None)
        assert f"8 {'7s' if conditional else 'digits'} drawn by the model" in page.inner_text("#results-title")
        page.screenshot(path=os.path.join(shots, "web.png"), full_page=True)

        page.click("#complete")
        page.wait_for_selector("#results[data-count='4']", timeout=60000)
        assert "given: 24 of 49 tokens" in page.inner_text("#given")
        for tokens in page.eval_on_selector_all("#results figure", "fs => fs.map(f => f.dataset.tokens)"):
            ids = ck.vocab.encode(tokens)
            assert ck.vocab.is_cond_complete(ids, 49) if conditional else ck.vocab.is_complete(ids, 49)

        # an image file instead of a drawing: kept whole, resized, read as the Python model reads it
        img = np.zeros((56, 56), np.uint8)
        img[8:48, 24:32] = 255
        Image.fromarray(img).save(tmp_path / "one.png")
        page.click("#clear")
        page.wait_for_selector("#probs[data-state='empty']")
        page.set_input_files("#file", str(tmp_path / "one.png"))
        page.wait_for_selector("#probs[data-state='done']", timeout=30000)
        px = check_reading(page, ck, model)
        assert px[4:24, 12:16].mean() > 200 and px[:, :8].max() == 0              # stretched, not cropped


def test_static_page_with_a_colour_model_of_named_classes_in_chromium(colour, tmp_path):
    ck = checkpoint.load(colour.ckpt)
    model = python_model(ck, colour.site)
    shots = os.environ.get("WEB_SCREENSHOTS") or str(tmp_path)
    with static_page(colour.site) as page:
        assert ck.class_names == ["circle", "square", "star", "triangle"]     # the folders, sorted
        assert page.inner_text("h1") == "Draw a circle, a square, a star or a triangle"
        assert "digit" not in page.inner_text("body").lower()
        assert page.is_visible("#brush") and page.is_visible("#background")
        assert page.inner_text("#class-word") == "of class"
        assert [o for o in page.eval_on_selector_all("#class option", "os => os.map(o => o.textContent)")] == \
            ["any"] + ck.class_names

        # a picture file, classified in the page as the Python model classifies its pixels
        shape = np.zeros((64, 64, 3), np.uint8)
        shape[12:52, 12:52] = (40, 200, 90)
        Image.fromarray(shape).save(tmp_path / "square.png")
        page.set_input_files("#file", str(tmp_path / "square.png"))
        page.wait_for_selector("#probs[data-state='done']", timeout=30000)
        px = check_reading(page, ck, model)
        assert tuple(px[8, 8]) == (40, 200, 90)

        # drawn with a colour brush on a chosen background
        page.click("#clear")
        page.fill("#brush", "#ff3300")
        page.fill("#background", "#102040")
        draw(page, [[(0.2, 0.8), (0.5, 0.2), (0.8, 0.8), (0.2, 0.8)]])        # a triangle
        page.wait_for_selector("#probs[data-state='done']", timeout=30000)
        px = check_reading(page, ck, model)
        assert tuple(px[0, 0]) == (16, 32, 64) and (px.reshape(-1, 3) == (255, 51, 0)).all(1).any()

        check_drawings(page, ck, ck.class_names.index("triangle"))
        assert "drawings of a triangle" in page.inner_text("#results-title")
        page.screenshot(path=os.path.join(shots, "web_colour.png"), full_page=True)
