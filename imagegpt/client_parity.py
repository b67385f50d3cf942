"""The client without torch against the PyTorch model: the README's client (web_export.client) run by a
Python that has only onnxruntime, numpy and Pillow, on a checkpoint's test images written as PNG files.

torch_free_python() makes that Python (a virtual environment whose packages are linked from this one's,
so no network is needed); client_parity() runs the client on every test image of a checkpoint's
export and compares its class, image by image, with the PyTorch model's on the same pixels.
"""
import glob
import json
import os
import subprocess
import time
import venv

import numpy as np
from PIL import Image

from imagegpt import checkpoint
from imagegpt.errors import UserError
from imagegpt.metrics import class_probs
from imagegpt.split_images import real_split
from imagegpt.web_export import client

CLIENT_PACKAGES = ("numpy", "numpy.libs", "numpy-*.dist-info", "onnxruntime", "onnxruntime-*.dist-info",
                   "PIL", "pillow.libs", "pillow-*.dist-info")


def torch_free_python(root):
    """A virtual environment under root whose site-packages hold only onnxruntime, numpy and Pillow (linked
    from this environment's, so that it needs no network) -> its python."""
    env, deps = os.path.join(root, "client-venv"), os.path.join(root, "client-packages")
    venv.create(env, with_pip=False)
    os.makedirs(deps)
    here = os.path.dirname(os.path.dirname(np.__file__))
    for pattern in CLIENT_PACKAGES:
        for path in glob.glob(os.path.join(here, pattern)):
            os.symlink(path, os.path.join(deps, os.path.basename(path)))
    if not {"numpy", "onnxruntime", "PIL"} <= set(os.listdir(deps)):
        raise UserError(f"{here}: numpy, onnxruntime and Pillow must be installed here for the client's environment")
    python = os.path.join(env, "bin", "python")
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "client-packages.pth"), "w") as f:
        f.write(deps + "\n")
    return python


def client_parity(ckpt, export, work, limit=0):
    """The README's client on the test images of `ckpt` (the first `limit`, 0: all), with the graphs of
    `export` (hf_export.py --onnx), in a torch-free Python; work: an empty folder for the PNG files and
    the environment -> {images, client_accuracy, torch_accuracy, same_class, differing, client_seconds}."""
    ck = checkpoint.load(ckpt)
    images, labels = real_split(ck.settings, "test")[2:]
    if limit:
        images, labels = images[:limit], labels[:limit]
    os.makedirs(work, exist_ok=True)
    pngs = []
    for i, img in enumerate(images):
        pngs.append(os.path.join(work, f"{i:05d}.png"))
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(pngs[-1])
    python = torch_free_python(work)
    script = client(os.path.join(os.path.abspath(export), "onnx") + "/", pngs[0], 0) + f"""
import sys
assert "torch" not in sys.modules
print(json.dumps([max(p := classify(f), key=p.get) for f in {pngs!r}]))
"""
    with open(os.path.join(work, "client.py"), "w") as f:
        f.write(script)
    t = time.monotonic()
    done = subprocess.run([python, "client.py"], cwd=work, capture_output=True, text=True)
    seconds = time.monotonic() - t
    if done.returncode != 0:
        raise UserError(f"{work}/client.py: the client failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    index = {n: c for c, n in enumerate(ck.class_names)}
    theirs = np.array([index[n] for n in json.loads(done.stdout.splitlines()[-1])])
    ours = class_probs(ck, ck.encode_images(images)).argmax(1).numpy()
    labels = np.asarray(labels)
    return {"checkpoint": ckpt, "export": export, "images": len(labels),
            "client_accuracy": float((theirs == labels).mean()), "torch_accuracy": float((ours == labels).mean()),
            "same_class": int((theirs == ours).sum()), "differing": np.flatnonzero(theirs != ours).tolist(),
            "client_seconds": round(seconds, 1)}
