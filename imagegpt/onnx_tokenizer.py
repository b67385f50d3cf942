"""The image tokenizer as ONNX graphs, so that the export needs no code of this repository to turn an
image into tokens and tokens back into an image:

    export_tokenizer(codebook, folder)   -> folder/onnx/tokenizer.onnx and folder/onnx/detokenizer.onnx
    tokenizer_parity(codebook, folder, images)   -> the graphs against tokenizer.Codebook on images

The graphs are written node by node from the codebook's arrays and do what Codebook.encode and
Codebook.decode do, operation for operation in float32 (the same order of the same operations, so the
same roundings):

    tokenizer.onnx    input   images  uint8   (batch_size, H, W, C)   the model's size, channels last, 0..255
                                                                    (numpy.asarray of a decoded PNG)
                      output  codes   int64   (batch_size, L)         the code k of each patch (token <Z_k>,
                                                                    id code_offset + k), raster order
    detokenizer.onnx  input   codes   int64   (batch_size, L)         -1: a missing code, drawn black
                      output  images  float32 (batch_size, H, W, C)   in [0, 1]

Inside tokenizer.onnx: pixels / 255; the intensity (the mean of the channels) and its gradients (central
differences inside the image, one-sided at its edges, as torch.gradient); the colour and gradient values
of each p x p patch; each feature group standardised and weighted with the codebook's statistics; the
position and time groups, which do not depend on the pixels, as a constant; then the nearest centroid,
argmin(|c|^2 - 2 x.c). The resize, crop and centring of a drawing stay with the caller (the page, the
client in the README): the graph takes images that already have the model's size.
"""
import math
import os

import numpy as np
import torch

from imagegpt.errors import UserError
from imagegpt.files import atomic_path

TOKENIZER = "tokenizer.onnx"
DETOKENIZER = "detokenizer.onnx"
OPSET = 18


class _Graph:
    """A small helper to write an ONNX graph node by node: constants, nodes with fresh output names."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, value, dtype=np.float32):
        from onnx import numpy_helper
        self.n += 1
        name = f"c{self.n}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name

    def ints(self, values):
        return self.const(values, np.int64)

    def op(self, op_type, *inputs, out=None, **attrs):
        """A node; its output is named `out` (a graph output) or gets a fresh name."""
        from onnx import helper
        self.n += 1
        out = out or f"t{self.n}_{op_type.lower()}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def slice(self, x, start, end, axis):
        return self.op("Slice", x, self.ints([start]), self.ints([end]), self.ints([axis]))

    def model(self, name, inputs, outputs, doc, meta):
        from onnx import helper
        graph = helper.make_graph(self.nodes, name, inputs, outputs, initializer=self.inits)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="imagegpt-tokens")
        proto.ir_version = 8                 # onnxruntime 1.16+ and onnxruntime-web read it
        proto.doc_string = doc
        for k, v in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, str(v)
        return proto


def _io(name, elem, shape):
    from onnx import helper
    return helper.make_tensor_value_info(name, elem, shape)


def _patches(g, x, grid, p, c):
    """(N, H, W, c) -> (N, L, c*p*p): each patch's values in F.unfold's order (channel, row, column)."""
    gh, gw = grid
    x = g.op("Reshape", x, g.ints([-1, gh, p, gw, p, c]))
    x = g.op("Transpose", x, perm=[0, 1, 3, 5, 2, 4])
    return g.op("Reshape", x, g.ints([-1, gh * gw, c * p * p]))


def _gradient(g, x, axis, n):
    """torch.gradient of x along axis (length n >= 2), spacing 1, edge order 1: (x[i+1] - x[i-1]) / 2
    inside, one-sided differences at the two ends."""
    first = g.op("Sub", g.slice(x, 1, 2, axis), g.slice(x, 0, 1, axis))
    last = g.op("Sub", g.slice(x, n - 1, n, axis), g.slice(x, n - 2, n - 1, axis))
    if n == 2:
        return g.op("Concat", first, last, axis=axis)
    inner = g.op("Div", g.op("Sub", g.slice(x, 2, n, axis), g.slice(x, 0, n - 2, axis)), g.const(2.0))
    return g.op("Concat", first, inner, last, axis=axis)


def _standardised(g, f, book, group):
    """(f - mean) / std * (weight / sqrt(dim)), as Codebook.features, in float32."""
    mean, std = book.stats[group]
    dim = mean.numel()
    scale = getattr(book.cfg, "w_" + group) / math.sqrt(dim)
    f = g.op("Sub", f, g.const(mean.float().numpy()))
    return g.op("Mul", g.op("Div", f, g.const(np.float32(std))), g.const(np.float32(scale)))


def tokenizer_graph(book):
    """The ONNX model (a ModelProto) of Codebook.encode for images (N, H, W, C) uint8."""
    from onnx import TensorProto
    (H, W), C, p = book.image_size, book.channels, book.cfg.patch_size
    if H < 2 or W < 2:
        raise UserError(f"image size {H}x{W}: the tokenizer graph needs at least 2 x 2 pixels (gradients)")
    grid, L = book.grid, book.seq_len
    groups = book._groups(book.cfg)
    g = _Graph()
    x = g.op("Div", g.op("Cast", "images", to=TensorProto.FLOAT), g.const(255.0))      # (N, H, W, C) in [0, 1]
    parts = []
    fixed = [grp for grp in groups if grp in ("position", "time")]
    if fixed:   # these groups do not depend on the pixels: Codebook.features of any image, as a constant
        width = sum(book.stats[grp][0].numel() for grp in fixed)
        const = book.features(torch.zeros(1, C, H, W))[0, :, :width].numpy()          # (L, width)
        batch = g.op("Slice", g.op("Shape", "images"), g.ints([0]), g.ints([1]))
        shape = g.op("Concat", batch, g.ints([L, width]), axis=0)
        parts.append(g.op("Expand", g.const(const), shape))
    if "colour" in groups:
        parts.append(_standardised(g, _patches(g, x, grid, p, C), book, "colour"))
    if "gradient" in groups:
        chans = [g.slice(x, c, c + 1, 3) for c in range(C)]
        total = chans[0]
        for ch in chans[1:]:                                                            # ((R + G) + B) / 3
            total = g.op("Add", total, ch)
        inten = g.op("Div", total, g.const(float(C))) if C > 1 else total             # (N, H, W, 1)
        grad = g.op("Concat", _gradient(g, inten, 2, W), _gradient(g, inten, 1, H), axis=3)   # (N, H, W, 2): Gx, Gy
        parts.append(_standardised(g, _patches(g, grad, grid, p, 2), book, "gradient"))
    feats = g.op("Concat", *parts, axis=2) if len(parts) > 1 else parts[0]             # (N, L, D)
    c = book.centroids.float()
    flat = g.op("Reshape", feats, g.ints([-1, c.shape[1]]))
    dist = g.op("Gemm", flat, g.const(c.T.contiguous().numpy()), g.const(c.pow(2).sum(1).numpy()),
                alpha=-2.0, beta=1.0)                                                   # |c|^2 - 2 x.c, as tokenizer.assign
    g.op("Reshape", g.op("ArgMin", dist, axis=1, keepdims=0), g.ints([-1, L]), out="codes")
    return g.model("tokenizer", [_io("images", TensorProto.UINT8, ["batch_size", H, W, C])],
                   [_io("codes", TensorProto.INT64, ["batch_size", L])],
                   "images (batch_size, H, W, C) uint8 -> codes (batch_size, L) int64 (imagegpt-tokens codebook)",
                   {"image_size": f"{H},{W}", "channels": C, "patch_size": p, "num_codes": len(c)})


def detokenizer_graph(book):
    """The ONNX model of Codebook.decode: codes (N, L) int64 (-1: missing) -> images (N, H, W, C) float32."""
    from onnx import TensorProto
    (H, W), C, p = book.image_size, book.channels, book.cfg.patch_size
    gh, gw = book.grid
    L = book.seq_len
    g = _Graph()
    cols = g.op("Gather", g.const(book.colours.float().numpy()), g.op("Max", "codes", g.ints(0)), axis=0)   # (N, L, C*p*p)
    known = g.op("Unsqueeze", g.op("Cast", g.op("GreaterOrEqual", "codes", g.ints(0)), to=TensorProto.FLOAT), g.ints([2]))
    x = g.op("Reshape", g.op("Mul", cols, known), g.ints([-1, gh, gw, C, p, p]))
    x = g.op("Reshape", g.op("Transpose", x, perm=[0, 1, 4, 2, 5, 3]), g.ints([-1, H, W, C]))
    g.op("Clip", x, g.const(0.0), g.const(1.0), out="images")
    return g.model("detokenizer", [_io("codes", TensorProto.INT64, ["batch_size", L])],
                   [_io("images", TensorProto.FLOAT, ["batch_size", H, W, C])],
                   "codes (batch_size, L) int64, -1 = missing -> images (batch_size, H, W, C) float32 in [0, 1]",
                   {"image_size": f"{H},{W}", "channels": C, "patch_size": p, "num_codes": len(book.colours)})


def export_tokenizer(book, folder):
    """Write folder/onnx/tokenizer.onnx and folder/onnx/detokenizer.onnx (checked by onnx's checker).
    Returns their paths."""
    import onnx
    out = []
    for name, proto in ((TOKENIZER, tokenizer_graph(book)), (DETOKENIZER, detokenizer_graph(book))):
        onnx.checker.check_model(proto, full_check=True)
        path = os.path.join(folder, "onnx", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp:
            onnx.save(proto, tmp)
        out.append(path)
    return out


def session(path, threads=1):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = threads, 1, 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def tokenizer_parity(book, folder, images, batch=256):
    """tokenizer.onnx and detokenizer.onnx in onnxruntime against Codebook.encode / decode on uint8 images
    (N, H, W, C) -> {"images", "codes", "codes_differing", "images_differing", "max_abs_pixel_diff",
    "max_abs_pixel_diff_all_codes"}: the codes of every image, and the pixels of the decoded codes of every
    image and of every code of the codebook (with a missing one)."""
    from tokenizer import uint8_to_tensor
    tok, detok = (session(os.path.join(folder, "onnx", f)) for f in (TOKENIZER, DETOKENIZER))
    images = np.ascontiguousarray(images, dtype=np.uint8)
    want = book.encode(uint8_to_tensor(images)).numpy() if len(images) else np.zeros((0, book.seq_len), np.int64)
    got = np.concatenate([tok.run(None, {"images": images[i:i + batch]})[0] for i in range(0, len(images), batch)]) \
        if len(images) else want
    decode = lambda codes: book.decode(torch.from_numpy(codes)).permute(0, 2, 3, 1).numpy()
    pix = max((float(np.abs(detok.run(None, {"codes": want[i:i + batch]})[0] - decode(want[i:i + batch])).max())
               for i in range(0, len(want), batch)), default=0.0)
    every = np.arange(-1, len(book.colours))
    every = np.resize(every, (math.ceil(len(every) / book.seq_len), book.seq_len))   # each code (and -1) at least once
    pix_all = float(np.abs(detok.run(None, {"codes": every})[0] - decode(every)).max())
    return {"images": len(images), "codes": int(want.size), "codes_differing": int((got != want).sum()),
            "images_differing": int((got != want).any(1).sum()), "max_abs_pixel_diff": pix,
            "max_abs_pixel_diff_all_codes": pix_all}
