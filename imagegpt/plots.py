"""Pictures: grids of images with captions, the confusion matrix, training curves (PNG files)."""
import io
import json
import math
import os

import torch
from PIL import Image, ImageDraw

from imagegpt.errors import UserError
from imagegpt.files import atomic_path, json_type, write_bytes

LOG_NUMBERS = ("epoch", "tokens", "lr", "train_loss", "time", "val_loss", "val_perplexity", "val_token_accuracy",
               "val_image_perplexity", "val_accuracy")   # what a log line holds besides "step" (null: none yet)


CAPTION_WIDTH = 300   # pixels: a cell widens to fit its caption up to this; a longer one is cut with "..."


def save_grid(images, captions, path, ncol=None, scale=3):
    """images (N, C, H, W) float in [0, 1] -> one PNG grid, each cell with its caption under it; the cells
    are as wide as the widest caption (up to CAPTION_WIDTH pixels), so that class names are read whole."""
    N, C, H, W = images.shape
    ncol = ncol or min(N, max(1, int(math.ceil(math.sqrt(N)))))
    nrow = int(math.ceil(N / ncol))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    captions = [fit_caption(draw, str(c), CAPTION_WIDTH) for c in captions] if captions else captions
    widest = max((draw.textlength(c) for c in captions), default=0) if captions else 0
    cw, ch = max(W * scale, math.ceil(widest) + 2) + 4, H * scale + 16
    sheet = Image.new("RGB", (ncol * cw, nrow * ch), "white")
    draw = ImageDraw.Draw(sheet)
    arr = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    for i in range(N):
        im = Image.fromarray(arr[i, :, :, 0] if C == 1 else arr[i], "L" if C == 1 else "RGB")
        im = im.resize((W * scale, H * scale), Image.Resampling.NEAREST)
        r, c = divmod(i, ncol)
        sheet.paste(im, (c * cw + 2, r * ch + 2))
        if captions:
            draw.text((c * cw + 3, r * ch + H * scale + 3), captions[i], fill="black")
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return sheet.size


def fit_caption(draw, text, width):
    """text, cut to end in '...' where it is wider than `width` pixels in draw's font."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + "...") > width:
        text = text[:-1]
    return text + "..."


def _png_bytes(fig):
    from matplotlib.backends.backend_agg import FigureCanvasAgg   # matplotlib: here, for the commands' start-up
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)  # no bbox 'tight': the size is figsize * dpi exactly
    return buf.getvalue()


CONFUSION_SIZE = (640, 560)  # pixels
CURVES_SIZE = (1100, 420)


def confusion_png(conf, names, title=""):
    """Confusion matrix (rows true, columns predicted) -> PNG bytes of CONFUSION_SIZE pixels."""
    from matplotlib.figure import Figure   # as _png_bytes
    conf = torch.as_tensor(conf)
    C = len(names)
    fig = Figure(figsize=(CONFUSION_SIZE[0] / 100, CONFUSION_SIZE[1] / 100), dpi=100)
    ax = fig.add_subplot()
    rate = conf.double() / conf.sum(1, keepdim=True).clamp_min(1)
    im = ax.imshow(rate.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = list(range(C))
    ax.set_xticks(ticks, [str(n) for n in names], fontsize=8 if C <= 20 else 5)
    ax.set_yticks(ticks, [str(n) for n in names], fontsize=8 if C <= 20 else 5)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if C <= 20:
        for t in range(C):
            for p in range(C):
                if conf[t, p]:
                    ax.text(p, t, str(int(conf[t, p])), ha="center", va="center", fontsize=8,
                            color="white" if rate[t, p] > 0.5 else "black")
    ax.set_title(title or "confusion matrix", fontsize=10)
    fig.subplots_adjust(left=0.1, right=0.9, bottom=0.1, top=0.92)
    return _png_bytes(fig)


def read_log(log_path):
    if not os.path.exists(log_path):
        raise UserError(f"{log_path}: no such training log")
    recs = []
    with open(log_path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except UnicodeDecodeError:
                raise UserError(f"{log_path}:{n}: not UTF-8 text") from None
            except json.JSONDecodeError as e:
                raise UserError(f"{log_path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)) \
                    or isinstance(rec["step"], bool):
                raise UserError(f'{log_path}:{n}: expected a JSON object with a numeric "step"')
            for k in LOG_NUMBERS:
                v = rec.get(k)
                if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                    raise UserError(f"{log_path}:{n}: {k} is {json_type(v)} ({str(v)[:40]}), expected a number")
            recs.append(rec)
    if not recs:
        raise UserError(f"{log_path}: no records (has training evaluated yet?)")
    return recs


def plot_curves(log_path, png_path):
    """Training loss, development loss and development accuracy over optimizer steps, from a run's
    log.jsonl, drawn to png_path (CURVES_SIZE pixels). Returns the (width, height) written. Logs of
    earlier versions named the evaluated split "val"; they draw the same way."""
    from matplotlib.figure import Figure   # as _png_bytes
    recs = read_log(log_path)
    split = "val" if any("val_loss" in r for r in recs) else "dev"
    name = {"dev": "development", "val": "validation"}[split]

    def series(key):
        pts = [(r["step"], r[key]) for r in recs if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    fig = Figure(figsize=(CURVES_SIZE[0] / 100, CURVES_SIZE[1] / 100), dpi=100)
    a1, a2 = fig.subplots(1, 2)
    for key, label, style in (("train_loss", "training objective (label-weighted, mean since last eval)", "-o"),
                              (f"{split}_loss", f"{name} loss", "-o")):
        xs, ys = series(key)
        if xs:
            a1.plot(xs, ys, style, label=label, markersize=3)
    a1.set_xlabel("step")
    a1.set_ylabel("cross entropy per token")
    a1.set_title("loss")
    a1.grid(alpha=0.3)
    if a1.lines:
        a1.legend(fontsize=8)
    for key, label in ((f"{split}_accuracy", "classification accuracy"), (f"{split}_token_accuracy", "next-token accuracy")):
        xs, ys = series(key)
        if xs:
            a2.plot(xs, ys, "-o", label=label, markersize=3)
    a2.set_ylim(0, 1)
    a2.set_xlabel("step")
    a2.set_ylabel(f"{name} accuracy")
    a2.set_title(f"{name} split")
    a2.grid(alpha=0.3)
    if a2.lines:
        a2.legend(fontsize=8)
    fig.suptitle(log_path, fontsize=9)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.13, top=0.85, wspace=0.25)
    write_bytes(png_path, _png_bytes(fig))
    return CURVES_SIZE
