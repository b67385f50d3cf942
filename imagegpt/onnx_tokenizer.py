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

onnx and onnxruntime are imported in the functions that build or run the graphs: an export loads them,
no other command does.
"""
import math
import os

import numpy as np
import torch

from imagegpt import palette
from imagegpt.errors import UserError
from imagegpt.files import atomic_path
from imagegpt.token_format import COLOUR_TOKENS
from tokenizer import PaletteCodebook, uint8_to_tensor

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

    def op(self, op_type, *inputs, out=None, unused=0, **attrs):
        """A node; its output is named `out` (a graph output) or gets a fresh name. unused: how many more
        outputs the operator has that the graph does not read (TopK's indices)."""
        from onnx import helper
        self.n += 1
        out = out or f"t{self.n}_{op_type.lower()}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out] + [f"{out}_{i}" for i in range(1, unused + 1)],
                                           **attrs))
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


def _nearest(g, x, table):
    """Rows x (n, D) -> the index of the nearest row of table (k, D), int64 (n,): argmin(|c|^2 - 2 x.c),
    as tokenizer.assign."""
    c = table.float()
    dist = g.op("Gemm", x, g.const(c.T.contiguous().numpy()), g.const(c.pow(2).sum(1).numpy()), alpha=-2.0, beta=1.0)
    return g.op("ArgMin", dist, axis=1, keepdims=0)


def _patch_codes(g, x, book, out=None):
    """Float images x (N, H, W, C) in [0, 1] -> the patch codes (N, L) of Codebook `book` (as Codebook.encode),
    named `out` where given."""
    (H, W), C, p = book.image_size, book.channels, book.cfg.patch_size
    grid, L = book.grid, book.seq_len
    groups = book._groups(book.cfg)
    parts = []
    fixed = [grp for grp in groups if grp in ("position", "time")]
    if fixed:   # these groups do not depend on the pixels: Codebook.features of any image, as a constant
        width = sum(book.stats[grp][0].numel() for grp in fixed)
        const = book.features(torch.zeros(1, C, H, W))[0, :, :width].numpy()          # (L, width)
        batch = g.op("Slice", g.op("Shape", x), g.ints([0]), g.ints([1]))
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
    flat = g.op("Reshape", feats, g.ints([-1, book.centroids.shape[1]]))
    return g.op("Reshape", _nearest(g, flat, book.centroids), g.ints([-1, L]), out=out)


def _dot3(g, a, b):
    """(..., 3) . (..., 3) -> (..., 1): a0 b0 + a1 b1 + a2 b2 in this order (palette.dot3)."""
    term = lambda k: g.op("Mul", g.slice(a, k, k + 1, -1), g.slice(b, k, k + 1, -1))
    return g.op("Add", g.op("Add", term(0), term(1)), term(2))


def _mix(g, pixels, ground, figure):
    """palette.mix: pixels (N, P, 3), ground and figure (N, 1, 3) -> alpha (N, P, 1)."""
    v = g.op("Sub", figure, ground)
    num = _dot3(g, g.op("Sub", pixels, ground), v)
    return g.op("Clip", g.op("Div", num, g.op("Max", _dot3(g, v, v), g.const(np.float32(palette.EPS)))),
                g.const(np.float32(0)), g.const(np.float32(1)))


def _pure_mean(g, pixels64, mask, old):
    """palette.pure_mean: the mean of pixels (N, P, 3) (float64) where mask (N, P, 1) holds, else old (N, 1, 3)."""
    from onnx import TensorProto
    m = g.op("Cast", mask, to=TensorProto.DOUBLE)
    n = g.op("ReduceSum", m, g.ints([1]), keepdims=1)                                       # (N, 1, 1)
    s = g.op("ReduceSum", g.op("Mul", pixels64, m), g.ints([1]), keepdims=1)               # (N, 1, 3)
    mean = g.op("Cast", g.op("Div", s, g.op("Max", n, g.const(1.0, np.float64))), to=TensorProto.FLOAT)
    return g.op("Where", g.op("Greater", n, g.const(0.0, np.float64)), mean, old)


def _two_colours(g, x, H, W):
    """palette.two_colours on float images x (N, H, W, 3) -> ground, figure (N, 1, 3), alpha (N, H, W, 1)."""
    from onnx import TensorProto
    rows = [g.op("Reshape", g.slice(x, r, r + 1, 1), g.ints([-1, W, 3])) for r in (0, H - 1)]
    cols = [g.op("Reshape", g.slice(g.slice(x, 1, H - 1, 1), c, c + 1, 2), g.ints([-1, H - 2, 3]))
            for c in (0, W - 1)] if H > 2 else []
    frame = g.op("Concat", *rows, *cols, axis=1)                                           # (N, n, 3)
    n = 2 * W + 2 * max(H - 2, 0)
    lowest = g.op("TopK", frame, g.ints([(n - 1) // 2 + 1]), axis=1, largest=0, sorted=1, unused=1)   # augment.background's median
    ground = g.slice(lowest, (n - 1) // 2, (n - 1) // 2 + 1, 1)                           # (N, 1, 3)
    pixels = g.op("Reshape", x, g.ints([0, H * W, 3]))                                     # raster order
    off = g.op("Sub", pixels, ground)
    far = g.op("ArgMax", _dot3(g, off, off), axis=1, keepdims=1)                           # (N, 1, 1): the first farthest
    figure = g.op("GatherElements", pixels, g.op("Expand", far, g.ints([1, 1, 3])), axis=1)
    pixels64 = g.op("Cast", pixels, to=TensorProto.DOUBLE)
    for _ in range(palette.REFINE):
        a = _mix(g, pixels, ground, figure)
        ground, figure = (_pure_mean(g, pixels64, g.op("Less", a, g.const(np.float32(palette.PURE))), ground),
                          _pure_mean(g, pixels64, g.op("Greater", a, g.const(np.float32(1 - palette.PURE))), figure))
    return ground, figure, g.op("Reshape", _mix(g, pixels, ground, figure), g.ints([-1, H, W, 1]))


def _colour_codes(g, colour, book):
    """PaletteCodebook.colour_codes: colours (N, 1, 3) -> code indices (N, 2)."""
    flat = g.op("Reshape", colour, g.ints([-1, 3]))
    k = _nearest(g, flat, book.palette)
    rest = g.op("Sub", flat, g.op("Gather", g.const(book.palette.float().numpy()), k, axis=0))
    d = _nearest(g, rest, book.fine)
    K, P = book.cfg.num_codes, book.cfg.palette
    col = lambda t, offset: g.op("Unsqueeze", g.op("Add", t, g.ints(offset)), g.ints([1]))
    return g.op("Concat", col(k, K), col(d, K + P), axis=1)


def tokenizer_graph(book):
    """The ONNX model (a ModelProto) of the codebook's encode for images (N, H, W, C) uint8 (either kind)."""
    from onnx import TensorProto
    (H, W), C = book.image_size, book.channels
    if H < 2 or W < 2:
        raise UserError(f"image size {H}x{W}: the tokenizer graph needs at least 2 x 2 pixels (gradients)")
    g = _Graph()
    x = g.op("Div", g.op("Cast", "images", to=TensorProto.FLOAT), g.const(255.0))      # (N, H, W, C) in [0, 1]
    if isinstance(book, PaletteCodebook):
        ground, figure, alpha = _two_colours(g, x, H, W)
        codes = [_colour_codes(g, ground, book), _colour_codes(g, figure, book), _patch_codes(g, alpha, book.pattern)]
        g.op("Concat", *codes, axis=1, out="codes")
    else:
        _patch_codes(g, x, book, out="codes")
    L = book.seq_len
    return g.model("tokenizer", [_io("images", TensorProto.UINT8, ["batch_size", H, W, C])],
                   [_io("codes", TensorProto.INT64, ["batch_size", L])],
                   "images (batch_size, H, W, C) uint8 -> codes (batch_size, L) int64 (imagegpt-tokens codebook)",
                   {"image_size": f"{H},{W}", "channels": C, "patch_size": book.cfg.patch_size,
                    "num_codes": book.code_space})


def _patch_image(g, codes, book, out=None):
    """Codebook.decode: codes (N, L) int64 (-1: missing) -> images (N, H, W, C) float32 in [0, 1], named `out`
    where given."""
    from onnx import TensorProto
    (H, W), C, p = book.image_size, book.channels, book.cfg.patch_size
    gh, gw = book.grid
    cols = g.op("Gather", g.const(book.colours.float().numpy()), g.op("Max", codes, g.ints(0)), axis=0)   # (N, L, C*p*p)
    known = g.op("Unsqueeze", g.op("Cast", g.op("GreaterOrEqual", codes, g.ints(0)), to=TensorProto.FLOAT), g.ints([2]))
    x = g.op("Reshape", g.op("Mul", cols, known), g.ints([-1, gh, gw, C, p, p]))
    x = g.op("Reshape", g.op("Transpose", x, perm=[0, 1, 4, 2, 5, 3]), g.ints([-1, H, W, C]))
    return g.op("Clip", x, g.const(0.0), g.const(1.0), out=out)


def _colour(g, codes, book, at):
    """PaletteCodebook.colour: the colour of the code indices at positions at, at + 1 -> (N, 1, 1, 3)."""
    from onnx import TensorProto
    K, P = book.cfg.num_codes, book.cfg.palette
    out = None
    for pos, table, offset in ((at, book.palette, K), (at + 1, book.fine, K + P)):
        i = g.op("Sub", g.slice(codes, pos, pos + 1, 1), g.ints(offset))                      # (N, 1)
        ok = g.op("And", g.op("GreaterOrEqual", i, g.ints(0)), g.op("Less", i, g.ints(P)))
        pick = g.op("Gather", g.const(table.float().numpy()), g.op("Clip", i, g.ints(0), g.ints(P - 1)), axis=0)
        part = g.op("Mul", pick, g.op("Unsqueeze", g.op("Cast", ok, to=TensorProto.FLOAT), g.ints([2])))  # (N, 1, 3)
        out = part if out is None else g.op("Add", out, part)
    return g.op("Unsqueeze", out, g.ints([1]))


def detokenizer_graph(book):
    """The ONNX model of the codebook's decode: codes (N, L) int64 (-1: missing) -> images (N, H, W, C) float32."""
    from onnx import TensorProto
    (H, W), C, L = book.image_size, book.channels, book.seq_len
    g = _Graph()
    if isinstance(book, PaletteCodebook):
        K = book.cfg.num_codes
        patterns = g.slice("codes", COLOUR_TOKENS, L, 1)
        patterns = g.op("Where", g.op("Less", patterns, g.ints(K)), patterns, g.ints(-1))
        alpha = _patch_image(g, patterns, book.pattern)                                    # (N, H, W, 1)
        ground, figure = _colour(g, "codes", book, 0), _colour(g, "codes", book, 2)
        painted = g.op("Add", ground, g.op("Mul", alpha, g.op("Sub", figure, ground)))
        g.op("Clip", painted, g.const(0.0), g.const(1.0), out="images")
    else:
        _patch_image(g, "codes", book, out="images")
    return g.model("detokenizer", [_io("codes", TensorProto.INT64, ["batch_size", L])],
                   [_io("images", TensorProto.FLOAT, ["batch_size", H, W, C])],
                   "codes (batch_size, L) int64, -1 = missing -> images (batch_size, H, W, C) float32 in [0, 1]",
                   {"image_size": f"{H},{W}", "channels": C, "patch_size": book.cfg.patch_size,
                    "num_codes": book.code_space})


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
    tok, detok = (session(os.path.join(folder, "onnx", f)) for f in (TOKENIZER, DETOKENIZER))
    images = np.ascontiguousarray(images, dtype=np.uint8)
    want = book.encode(uint8_to_tensor(images)).numpy() if len(images) else np.zeros((0, book.seq_len), np.int64)
    got = np.concatenate([tok.run(None, {"images": images[i:i + batch]})[0] for i in range(0, len(images), batch)]) \
        if len(images) else want
    decode = lambda codes: book.decode(torch.from_numpy(codes)).permute(0, 2, 3, 1).numpy()
    pix = max((float(np.abs(detok.run(None, {"codes": want[i:i + batch]})[0] - decode(want[i:i + batch])).max())
               for i in range(0, len(want), batch)), default=0.0)
    every = np.arange(-1, book.code_space)
    every = np.resize(every, (math.ceil(len(every) / book.seq_len), book.seq_len))   # each code (and -1) at least once
    pix_all = float(np.abs(detok.run(None, {"codes": every})[0] - decode(every)).max())
    return {"images": len(images), "codes": int(want.size), "codes_differing": int((got != want).sum()),
            "images_differing": int((got != want).any(1).sum()), "max_abs_pixel_diff": pix,
            "max_abs_pixel_diff_all_codes": pix_all}
