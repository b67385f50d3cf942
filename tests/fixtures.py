from imagegpt.settings import build

"""Small data written by the tests themselves."""
import json
import os
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository


def write_images(root, n=60, size=8, seed=0):
    """n grey images whose class (0..2) is the row band of a bright 2x2 square, as PNGs in root/cK/."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        y = i % 3
        im = (rng.random((size, size)) * 40).astype(np.uint8)
        r, c = 1 + 2 * y + rng.integers(0, 2), 1 + rng.integers(0, size - 3)
        im[r:r + 2, c:c + 2] = 200 + rng.integers(0, 55)
        os.makedirs(os.path.join(root, f"c{y}"), exist_ok=True)
        Image.fromarray(im).save(os.path.join(root, f"c{y}", f"{i:03d}.png"))


CLASSES = ["cat", "dog", "eel"]


def make_tiny_run(root, seed=0):
    """A random-init checkpoint with its own 4x4 codebook (8 codes, 2x2 patches), 3 classes, a data
    folder with test.jsonl and report.json, a log.jsonl, and the images as a class folder tree."""
    from imagegpt import checkpoint
    from imagegpt.token_format import Vocab
    from imagegpt.train_config import TrainConfig
    from model import GPT, GPTConfig
    from tokenizer import Codebook, CodebookConfig
    root = str(root)
    g = torch.Generator().manual_seed(seed)
    imgs = (torch.rand(24, 1, 4, 4, generator=g) * 255).round() / 255
    book = Codebook.fit(imgs, CodebookConfig(patch_size=2, num_codes=8, fit_samples=1000, kmeans_iters=5))
    vocab = Vocab(8, 3)
    labels = [i % 3 for i in range(24)]
    data_dir = os.path.join(root, "data")
    os.makedirs(data_dir)
    with open(os.path.join(data_dir, "test.jsonl"), "w") as f:
        for c, y in zip(book.encode(imgs).tolist(), labels):
            f.write(json.dumps({"tokens": vocab.image_tokens(c, y), "label": y, "meta": {}}) + "\n")
    with open(os.path.join(data_dir, "report.json"), "w") as f:
        json.dump({"classes": CLASSES}, f)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=len(vocab), block_size=16, n_layer=2, n_head=2, n_embd=16))
    run = os.path.join(root, "run")
    ckpt = os.path.join(run, "best")
    checkpoint.save(ckpt, model, build(TrainConfig, data_dir=data_dir, out_dir=run), vocab, book, class_names=CLASSES)
    with open(os.path.join(run, "log.jsonl"), "w") as f:
        for s, (tl, vl, acc) in enumerate([(2.9, 2.7, 0.3), (2.5, 2.4, 0.5), (2.2, 2.3, 0.6)], 1):
            f.write(json.dumps({"step": 10 * s, "train_loss": tl, "val_loss": vl, "val_accuracy": acc,
                                "val_token_accuracy": acc / 2}) + "\n")
    img_dir = os.path.join(root, "images")
    arr = (imgs[:, 0] * 255).round().byte().numpy()
    for i, y in enumerate(labels):
        os.makedirs(os.path.join(img_dir, CLASSES[y]), exist_ok=True)
        Image.fromarray(arr[i], "L").save(os.path.join(img_dir, CLASSES[y], f"{i:02d}.png"))
    return SimpleNamespace(root=root, ckpt=ckpt, run=run, data_dir=data_dir, img_dir=img_dir,
                           val=os.path.join(data_dir, "test.jsonl"), vocab=vocab, book=book, labels=labels)


def png_size(path):
    with Image.open(path) as im:
        return im.size
