import json
from dataclasses import dataclass

import pytest
import torch

from imagegpt.errors import UserError
from imagegpt.token_format import Vocab
from imagegpt.kmeans import assign, kmeans
from tokenizer import Codebook, CodebookConfig, load_codebook, pixel_features, psnr

# ----------------------------------------------------------------------------- vocabulary

def rule_vocab(K=500, C=10):
    """The layout of DESIGN.md written out by hand (what the original project's vocab.json holds)."""
    d = {"<PAD>": 0, "<UNK>": 1, "<IMG>": 2, "</IMG>": 3, "<CLS>": 4, "<EOS>": 5}
    for k in range(K):
        d[f"<Z_{k:03d}>"] = 6 + k
    for c in range(C):
        d[f"<CLS_{c}>"] = 6 + K + c
    return d


def test_default_layout_has_the_516_original_ids():
    v = Vocab(500, 10)
    assert len(v) == 516
    assert v.to_dict() == rule_vocab()
    assert [v.ids[t] for t in ("<PAD>", "<UNK>", "<IMG>", "</IMG>", "<CLS>", "<EOS>")] == list(range(6))
    assert (v.ids["<Z_000>"], v.ids["<Z_017>"], v.ids["<Z_499>"]) == (6, 23, 505)
    assert (v.ids["<CLS_0>"], v.ids["<CLS_9>"]) == (506, 515)
    assert (v.pad_id, v.unk_id, v.img_id, v.img_end_id, v.cls_id, v.eos_id) == (0, 1, 2, 3, 4, 5)
    assert v.code_id(0) == 6 and v.code_id(499) == 505
    assert v.label_id(0) == 506 and v.label_id(9) == 515
    assert not v.is_code(5) and v.is_code(6) and v.is_code(505) and not v.is_code(506)
    assert sorted(v.ids.values()) == list(range(516))


def test_original_vocab_json_loads_with_identical_ids(tmp_path):
    d = rule_vocab()
    assert len(d) == 516
    # key order in the file must not matter; write it shuffled, the way another tool might
    items = sorted(d.items(), key=lambda kv: (kv[1] * 7919) % 516)
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(dict(items), ensure_ascii=False, indent=2), encoding="utf-8")
    v = Vocab.load(path)
    assert (v.num_codes, v.num_classes) == (500, 10)
    assert v.ids == d
    assert all(v.tokens[i] == t for t, i in d.items())


@pytest.mark.parametrize("K,C", [(16, 3), (1, 2), (1000, 10), (1001, 5), (500, 100)])
def test_other_sizes_follow_the_rule(tmp_path, K, C):
    v = Vocab(K, C)
    assert len(v) == 6 + K + C
    assert v.tokens[:6] == ["<PAD>", "<UNK>", "<IMG>", "</IMG>", "<CLS>", "<EOS>"]
    width = max(3, len(str(K - 1)))
    assert v.tokens[6] == "<Z_" + "0" * width + ">"
    assert v.tokens[6 + K - 1] == f"<Z_{K - 1:0{width}d}>"
    assert v.tokens[6 + K:] == [f"<CLS_{c}>" for c in range(C)]
    assert v.label_id(C - 1) == len(v) - 1
    if K <= 1000:
        assert v.to_dict() == rule_vocab(K, C)
    v.save(tmp_path / "vocab.json")
    w = Vocab.load(tmp_path / "vocab.json")
    assert (w.num_codes, w.num_classes, w.ids) == (K, C, v.ids)


def test_encode_decode_round_trip():
    v = Vocab(500, 10)
    s = "<IMG> <Z_017> <Z_342> <Z_000> </IMG> <CLS> <CLS_3> <EOS>"
    ids = v.encode(s)
    assert ids == [2, 23, 348, 6, 3, 4, 509, 5]
    assert v.decode(ids) == s
    assert v.encode(s.split()) == ids
    assert v.image_tokens([17, 342, 0], 3) == s
    assert v.encode(v.image_tokens(torch.tensor([1, 2]), torch.tensor(9)))[-2] == v.label_id(9)
    with pytest.raises(KeyError):
        v.encode("<IMG> <Z_500>")


@pytest.mark.parametrize("change", ["wrong_id", "swapped", "missing", "extra", "not_int"])
def test_bad_vocab_json_names_the_file(tmp_path, change):
    d = rule_vocab()
    if change == "wrong_id":
        d["<Z_017>"] = 999
    elif change == "swapped":
        d["<CLS>"], d["<EOS>"] = 5, 4
    elif change == "missing":
        del d["<UNK>"]
    elif change == "extra":
        d["<MASK>"] = 516
    else:
        d["<PAD>"] = "0"
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(d))
    with pytest.raises(UserError) as e:
        Vocab.load(path)
    assert str(path) in str(e.value)
    if change == "wrong_id":
        assert "<Z_017>" in str(e.value) and "999" in str(e.value) and "23" in str(e.value)


def test_vocab_file_errors(tmp_path):
    with pytest.raises(UserError, match="no such"):
        Vocab.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"<PAD>": 0,')
    with pytest.raises(UserError, match="bad.json:1"):
        Vocab.load(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(UserError, match="bad.json"):
        Vocab.load(bad)


# ----------------------------------------------------------------------------- k-means

def test_assign_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(300, 5, generator=g), torch.randn(7, 5, generator=g)
    labels, d = assign(x, c, chunk=64)
    ref = torch.cdist(x, c).pow(2)
    assert torch.equal(labels, ref.argmin(1))
    assert torch.allclose(d, ref.min(1).values, atol=1e-4)


def separated_clusters(seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 0.0], [0.0, 0.0, 10.0], [10.0, 10.0, 10.0]])
    x = (centers[:, None, :] + 0.01 * torch.randn(5, 40, 3, generator=g)).reshape(-1, 3)
    return x, centers


def test_kmeans_finds_separated_clusters():
    x, centers = separated_clusters()
    c, inertia = kmeans(x, 5, iters=20, seed=0)
    assert c.shape == (5, 3)
    assert inertia < 0.1   # 200 points with noise variance 3e-4 each: about 0.06
    assert torch.cdist(centers, c).min(1).values.max() < 0.05   # every true centre found
    assert torch.cdist(c, centers).min(1).values.max() < 0.05   # and nothing else


def test_kmeans_is_deterministic_for_a_seed():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(500, 4, generator=g)
    a, ia = kmeans(x, 12, iters=5, seed=3)
    b, ib = kmeans(x, 12, iters=5, seed=3)
    assert torch.equal(a, b) and ia == ib
    c, _ = kmeans(x, 12, iters=5, seed=4)
    assert not torch.equal(a, c)


def test_kmeans_more_clusters_than_distinct_points():
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]).repeat(4, 1)   # 12 points, 3 distinct
    progress = []
    c, inertia = kmeans(x, 5, iters=5, seed=0, progress=lambda *a: progress.append(a))
    assert c.shape == (5, 2) and torch.isfinite(c).all()
    assert inertia == 0.0
    assert {tuple(r) for r in c.tolist()} == {(0.0, 0.0), (1.0, 1.0), (2.0, 2.0)}
    start = [("k-means++ start", i, 4) for i in range(5)]   # announced, then its 4 steps
    assert progress[:5] == start and progress[5] == ("Lloyd iterations", 0, 5)
    assert 1 <= len(progress[6:]) <= 5 and [i for _, i, _ in progress[6:]] == list(range(1, len(progress) - 5))


def test_kmeans_repeated_rows_count_as_weights():
    # identical rows are merged and weighted: the data repeated 3 times gives the same centroids
    # and three times the inertia
    g = torch.Generator().manual_seed(2)
    x = torch.randn(400, 3, generator=g).round(decimals=1)     # rounding makes some rows repeat
    a, ia = kmeans(x, 10, iters=8, seed=0)
    b, ib = kmeans(x.repeat(3, 1), 10, iters=8, seed=0)
    assert torch.allclose(a, b, atol=1e-5)
    assert ib == pytest.approx(3 * ia, rel=1e-5)
    ref = torch.cdist(x, a).pow(2).min(1).values.sum().item()   # the returned inertia is the real one
    assert ia == pytest.approx(ref, rel=1e-4)


def test_kmeans_too_few_points():
    with pytest.raises(UserError, match="at least 5"):
        kmeans(torch.zeros(3, 2), 5)


# ----------------------------------------------------------------------------- codebook

def blobs(n=60, size=12, channels=1, seed=0):
    """n images with two soft blobs each, random place, size and colour; float (n, C, size, size)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    imgs = torch.zeros(n, channels, size, size)
    for i in range(n):
        for _ in range(2):
            cy, cx = torch.rand(2, generator=g) * (size - 1)
            r = 1.5 + 2 * torch.rand(1, generator=g)
            col = 0.3 + 0.7 * torch.rand(channels, generator=g)
            imgs[i] += col[:, None, None] * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r ** 2))
    return imgs.clamp(0, 1)


def small_cfg(**kw):
    return CodebookConfig(**{**dict(patch_size=2, num_codes=16, fit_samples=3000, kmeans_iters=10), **kw})


@pytest.fixture(scope="module")
def grey():
    return blobs()


def test_pixel_features():
    img = torch.arange(6.0).repeat(4, 1)[None, None] / 10   # (1, 1, 4, 6), a horizontal ramp
    f = pixel_features(img, 2)
    assert f["position"].shape == (1, 6, 2) and f["time"].shape == (1, 6, 1)
    assert f["colour"].shape == (1, 6, 4) and f["gradient"].shape == (1, 6, 8)
    assert torch.allclose(f["position"][0, 0], torch.tensor([0.5 / 5, 0.5 / 3]))
    assert torch.allclose(f["position"][0, -1], torch.tensor([4.5 / 5, 2.5 / 3]))
    assert torch.equal(f["time"], torch.zeros(1, 6, 1))
    assert torch.allclose(f["colour"][0, 1], torch.tensor([0.2, 0.3, 0.2, 0.3]))   # patch (row 0, col 1)
    assert torch.allclose(f["gradient"][0, :, :4], torch.full((6, 4), 0.1))   # Gx
    assert torch.allclose(f["gradient"][0, :, 4:], torch.zeros(6, 4))        # Gy


@pytest.mark.parametrize("channels,patch,bound", [(1, 2, 22.0), (1, 1, 22.0), (3, 2, 19.0)])
def test_codebook_round_trip_fidelity(channels, patch, bound):
    x = blobs(channels=channels)
    book = Codebook.fit(x, small_cfg(patch_size=patch))
    L = (12 // patch) ** 2
    assert book.grid == (12 // patch, 12 // patch) and book.seq_len == L
    assert book.centroids.shape[0] == 16 and book.colours.shape == (16, channels * patch * patch)
    codes = book.encode(x)
    assert codes.shape == (60, L) and codes.dtype == torch.long
    assert 0 <= codes.min() and codes.max() < 16
    assert len(codes.unique()) >= 12                  # the codes are actually used
    recon = book.decode(codes)
    assert recon.shape == x.shape and 0 <= recon.min() and recon.max() <= 1
    # measured: 24.1 / 26.1 / 21.2 dB; black images score ~10 dB, the mean image ~12.7 dB
    assert psnr(recon, x) > bound
    assert psnr(recon, x) > psnr(x.mean(0, keepdim=True).expand_as(x), x) + 5


@pytest.mark.parametrize("patch", [1, 2])
def test_centroid_colour_images_decode_exactly(grey, patch):
    # colour features only: an image made of the codes' own colours encodes back to the same codes
    book = Codebook.fit(grey, small_cfg(patch_size=patch, w_gradient=0.0, kmeans_iters=30))
    used = book.encode(grey).flatten().unique()
    g = torch.Generator().manual_seed(1)
    codes = used[torch.randint(len(used), (5, book.seq_len), generator=g)]
    im = book.decode(codes)
    assert torch.equal(book.encode(im), codes)
    assert (book.decode(book.encode(im)) - im).abs().max() < 1e-6
    # with the default gradient weight the same images still come back close
    book = Codebook.fit(grey, small_cfg(patch_size=patch))
    im = book.decode(book.encode(grey[:5]))
    assert psnr(book.decode(book.encode(im)), im) > 15


def test_codebook_is_deterministic(grey):
    a = Codebook.fit(grey, small_cfg())
    b = Codebook.fit(grey, small_cfg())
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.colours, b.colours)
    assert torch.equal(a.encode(grey), b.encode(grey))
    c = Codebook.fit(grey, small_cfg(codebook_seed=1))
    assert not torch.equal(a.centroids, c.centroids)
    assert not torch.equal(a.encode(grey), c.encode(grey))


def test_the_codebook_hash_names_its_contents(tmp_path, grey):
    """sha256 covers what decides codes and pixels: equal after a save and load, different for another
    fit; a codebook whose files no longer match their hash is refused; one saved before the hash loads."""
    from safetensors.torch import load_file, save_file
    book = Codebook.fit(grey, small_cfg())
    book.save(tmp_path / "a")
    meta = json.loads((tmp_path / "a" / "codebook.json").read_text())
    assert meta["sha256"] == book.sha256 == load_codebook(tmp_path / "a").sha256 and len(book.sha256) == 64
    assert Codebook.fit(grey, small_cfg(codebook_seed=1)).sha256 != book.sha256
    tensors = load_file(tmp_path / "a" / "codebook.safetensors")
    tensors["colours"] = tensors["colours"].flip(0).contiguous()          # two codes' pixels swapped
    save_file(tensors, tmp_path / "a" / "codebook.safetensors")
    with pytest.raises(UserError, match="its sha256 does not match the codebook's contents"):
        load_codebook(tmp_path / "a")
    del meta["sha256"]
    (tmp_path / "a" / "codebook.json").write_text(json.dumps(meta))
    assert load_codebook(tmp_path / "a").sha256 != book.sha256             # no hash stored: read as it is


def test_codebook_save_load_round_trip(tmp_path, grey):
    book = Codebook.fit(grey, small_cfg())
    book.save(tmp_path)
    assert (tmp_path / "codebook.json").exists() and (tmp_path / "codebook.safetensors").exists()
    meta = json.loads((tmp_path / "codebook.json").read_text())
    assert meta["image_size"] == [12, 12] and meta["channels"] == 1
    back = load_codebook(tmp_path)
    assert back.cfg == book.cfg and back.image_size == (12, 12) and back.channels == 1
    assert torch.equal(back.centroids, book.centroids) and torch.equal(back.colours, book.colours)
    assert back.stats.keys() == book.stats.keys()
    assert torch.equal(back.encode(grey), book.encode(grey))
    assert torch.equal(back.decode(book.encode(grey)), book.decode(book.encode(grey)))


def test_codebook_fitted_with_a_larger_config_still_loads(tmp_path, grey):
    # data.prepare passes its DataConfig (a CodebookConfig with more fields); the saved codebook
    # must still load (regression: codebook.json used to hold the extra fields and failed to load)
    @dataclass
    class Bigger(CodebookConfig):
        source: str = "folder:x"

    book = Codebook.fit(grey, Bigger(**vars(small_cfg())))
    book.save(tmp_path)
    assert "source" not in json.loads((tmp_path / "codebook.json").read_text())["config"]
    back = load_codebook(tmp_path)
    assert back.cfg == small_cfg()
    assert torch.equal(back.encode(grey), book.encode(grey))


def test_codebook_load_errors(tmp_path, grey):
    with pytest.raises(UserError, match="codebook.json"):
        load_codebook(tmp_path)
    book = Codebook.fit(grey, small_cfg())
    book.save(tmp_path)
    meta = json.loads((tmp_path / "codebook.json").read_text())
    meta["config"]["num_codes"] = 8
    (tmp_path / "codebook.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="16 centroids"):
        load_codebook(tmp_path)
    (tmp_path / "codebook.safetensors").unlink()
    with pytest.raises(UserError, match="safetensors"):
        load_codebook(tmp_path)


def test_codebook_input_errors(grey):
    with pytest.raises(UserError, match="divisible"):
        Codebook.fit(grey, small_cfg(patch_size=5))
    with pytest.raises(UserError, match="weights"):
        Codebook.fit(grey, small_cfg(w_colour=0.0, w_gradient=0.0))
    with pytest.raises(UserError, match=r"fitted on 10 patches \(.* at most fit_samples 10\), fewer than num_codes 16: "
                                         r"pass --num_codes 10 or fewer"):
        Codebook.fit(grey, small_cfg(fit_samples=10))
    with pytest.raises(UserError, match=r"fitted on 72 patches \(2 training images, .*fewer than num_codes 100"):
        Codebook.fit(grey[:2], small_cfg(num_codes=100))
    book = Codebook.fit(grey, small_cfg())
    with pytest.raises(UserError, match="expects"):
        book.encode(torch.zeros(2, 1, 10, 10))
    with pytest.raises(UserError, match="expects"):
        book.encode(torch.zeros(2, 3, 12, 12))
    assert book.encode(grey[:0]).shape == (0, 36)


def test_decode_ids_partial_and_generated_sequences(grey):
    book = Codebook.fit(grey, small_cfg())       # 6 x 6 grid of 2 x 2 patches
    v = Vocab(16, 10)
    codes = book.encode(grey[:1])[0]
    full = v.encode(v.image_tokens(codes, 3))
    assert torch.allclose(book.decode_ids(full, v), book.decode(codes[None])[0])
    assert torch.allclose(book.decode_ids(torch.tensor(full), v), book.decode(codes[None])[0])

    # truncated (generation stopped early): the first 10 cells drawn, the rest black
    img = book.decode_ids(full[:11], v)
    expect = book.decode(torch.cat([codes[:10], torch.full((26,), -1)])[None])[0]
    assert torch.allclose(img, expect)
    assert img[:, 4:, :].abs().max() == 0      # rows of patches 2..5 are empty

    # stray non-code tokens are skipped; nothing after </IMG> is drawn; extra codes are ignored
    noisy = [v.img_id, v.code_id(codes[0]), v.cls_id, v.pad_id, v.label_id(2), v.unk_id, v.eos_id] + \
        [v.code_id(c) for c in codes[1:]] + [v.img_end_id] + [v.code_id(5)] * 10
    assert torch.allclose(book.decode_ids(noisy, v), book.decode(codes[None])[0])
    too_many = [v.img_id] + [v.code_id(c) for c in codes] + [v.code_id(5)] * 7
    assert torch.allclose(book.decode_ids(too_many, v), book.decode(codes[None])[0])

    # a sequence cut before <IMG> (a continuation) still draws its codes
    cut = [v.code_id(c) for c in codes[:6]]
    assert torch.allclose(book.decode_ids(cut, v), book.decode(torch.cat([codes[:6], torch.full((30,), -1)])[None])[0])

    # codes beyond the codebook (a larger vocabulary) are ignored; nothing at all -> black
    big = Vocab(40, 10)
    assert book.decode_ids([big.img_id, big.code_id(30), big.img_end_id], big).abs().max() == 0
    assert book.decode_ids([], v).shape == (1, 12, 12)
    assert book.decode(torch.full((2, 36), -1)).abs().max() == 0


def test_psnr():
    a = torch.zeros(2, 1, 4, 4)
    assert psnr(a, a) == pytest.approx(100.0)
    assert psnr(a, a + 0.1) == pytest.approx(20.0, abs=1e-4)
    assert psnr(a, torch.ones_like(a)) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- colour: shape apart from colour

def two_colour_images(masks, colours):
    """float masks (N, H, W) in [0, 1] and colour pairs (N, 2, 3) -> images (N, 3, H, W): the ground where
    the mask is 0, the figure where it is 1, mixed in between (soft edges)."""
    g, f = colours[:, 0, :, None, None], colours[:, 1, :, None, None]
    return ((g + masks[:, None] * (f - g)) * 255).round() / 255


def square_masks(n, size=16, seed=0):
    """n soft-edged squares of random size and place (the frame stays ground)."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    out = []
    for _ in range(n):
        c = 4 + torch.rand(2, generator=g) * (size - 8)
        r = 2 + torch.rand(1, generator=g) * 2
        d = torch.maximum((xs - c[0]).abs(), (ys - c[1]).abs())
        out.append((r + 0.5 - d).clamp(0, 1))
    return torch.stack(out)


def colour_pairs(n, seed):
    """n (ground, figure) colour pairs far apart."""
    g = torch.Generator().manual_seed(seed)
    pairs = torch.rand(n, 2, 3, generator=g)
    pairs[:, 1] = (pairs[:, 0] + 0.3 + 0.4 * torch.rand(n, 3, generator=g)) % 1
    return pairs


def test_two_colours_finds_ground_figure_and_the_mix():
    from imagegpt.palette import two_colours
    masks = square_masks(20)
    pairs = colour_pairs(20, 1)
    images = two_colour_images(masks, pairs)
    ground, figure, alpha = two_colours(images)
    assert (ground - pairs[:, 0]).abs().max() < 3 / 255 and (figure - pairs[:, 1]).abs().max() < 3 / 255
    assert (alpha - masks).abs().max() < 0.02                                # the mask, up to 8-bit rounding
    flat = torch.full((2, 3, 8, 8), 0.4)                                     # one colour: all ground
    ground, figure, alpha = two_colours(flat)
    assert (alpha == 0).all() and torch.allclose(ground, torch.full((2, 3), 0.4))


def test_the_palette_codebook_gives_one_shape_the_same_patterns_in_any_colours(tmp_path):
    from tokenizer import PaletteCodebook, fit_codebook
    masks = square_masks(200)
    fit = two_colour_images(masks, colour_pairs(200, 2))
    cfg = CodebookConfig(patch_size=4, num_codes=32, palette=64, w_gradient=0.0, kmeans_iters=10)
    book = fit_codebook(fit, cfg)
    assert isinstance(book, PaletteCodebook) and book.seq_len == 4 + 16 and book.code_space == 32 + 2 * 64
    a, b = (two_colour_images(masks[:10], colour_pairs(10, s)) for s in (3, 4))   # the same shapes, other colours
    ca, cb = book.encode(a), book.encode(b)
    assert torch.equal(ca[:, 4:], cb[:, 4:]) and not torch.equal(ca[:, :4], cb[:, :4])
    K, P = 32, 64                                                            # the layout of token_format
    assert ((ca[:, 0::2][:, :2] >= K) & (ca[:, 0::2][:, :2] < K + P)).all()            # <C_k> colours
    assert ((ca[:, 1::2][:, :2] >= K + P) & (ca[:, 1::2][:, :2] < K + 2 * P)).all()    # <D_k> corrections
    assert (ca[:, 4:] < K).all()                                                        # <Z_k> patterns
    assert psnr(book.decode(ca), a) > 25 and psnr(book.decode(book.encode(fit)), fit) > 25   # (32 patterns only)
    # a missing colour is black, a missing or misplaced pattern is the ground
    bad = ca[:1].clone()
    bad[0, 4:] = torch.tensor([-1, 0] * 8)
    bad[0, 4] = K + 1                                                        # a colour where a pattern belongs
    out = book.decode(bad)
    assert torch.allclose(out[0, :, 0, 0], book.colour(bad[:, 0:2])[0].clamp(0, 1))
    book.save(tmp_path)
    again = load_codebook(tmp_path)
    assert isinstance(again, PaletteCodebook) and again.sha256 == book.sha256 and torch.equal(again.encode(a), ca)
    meta = json.loads((tmp_path / "codebook.json").read_text())
    assert meta["config"]["palette"] == 64 and meta["channels"] == 3


def test_a_grey_codebook_file_does_not_name_the_palette(tmp_path, grey):
    Codebook.fit(grey, small_cfg()).save(tmp_path)
    assert "palette" not in json.loads((tmp_path / "codebook.json").read_text())["config"]


def test_palette_codebook_files_that_do_not_fit_are_one_line_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    from tokenizer import check_vocab, fit_codebook
    fit = two_colour_images(square_masks(40), colour_pairs(40, 5))
    book = fit_codebook(fit, CodebookConfig(patch_size=4, num_codes=8, palette=4, kmeans_iters=3))
    book.save(tmp_path)
    t = load_file(tmp_path / "codebook.safetensors")
    save_file({**t, "palette": t["palette"][:3]}, tmp_path / "codebook.safetensors")
    with pytest.raises(UserError, match=r"palette is \(3, 3\), its settings say \(4, 3\) \(palette 4\)"):
        load_codebook(tmp_path)
    book.save(tmp_path)
    meta = json.loads((tmp_path / "codebook.json").read_text())
    (tmp_path / "codebook.json").write_text(json.dumps({**meta, "channels": 1}))
    with pytest.raises(UserError, match="a palette codebook reads colour images, its channels say 1"):
        load_codebook(tmp_path)
    with pytest.raises(UserError, match=r"vocab.json has 8 code tokens, the codebook there 8 codes and 4 palette "
                                        r"colours; the two were not made together"):
        check_vocab(book, Vocab(8, 3), str(tmp_path))
    check_vocab(book, Vocab(8, 3, palette=4), str(tmp_path))
    with pytest.raises(UserError, match=r"the palette is fitted on the 2 colours of each of 1 training images, fewer "
                                        r"than palette 4"):
        fit_codebook(fit[:1], CodebookConfig(patch_size=4, num_codes=8, palette=4, fit_samples=100))


def test_a_palette_vocabulary_lays_out_colours_before_the_labels(tmp_path):
    v = Vocab(5, 2, palette=3)
    assert v.tokens == ["<PAD>", "<UNK>", "<IMG>", "</IMG>", "<CLS>", "<EOS>", "<Z_000>", "<Z_001>", "<Z_002>",
                        "<Z_003>", "<Z_004>", "<C_000>", "<C_001>", "<C_002>", "<D_000>", "<D_001>", "<D_002>",
                        "<CLS_0>", "<CLS_1>"]
    assert (v.code_space, v.label_offset) == (11, 17) and v.is_code(16) and not v.is_code(17)
    v.save(tmp_path / "vocab.json")
    again = Vocab.load(tmp_path / "vocab.json")
    assert (again.num_codes, again.palette, again.num_classes) == (5, 3, 2)
    assert v.code_ranges(6) == [(5, 8), (8, 11), (5, 8), (8, 11), (0, 5), (0, 5)]
    assert Vocab(5, 2).code_ranges(3) == [(0, 5)] * 3
    # drawing follows the layout: a <C_k> and a <D_k> per colour, then patterns, then the tail
    mask = v.format_mask([v.img_id], 6, 8)
    allowed = [torch.nonzero(row).flatten().tolist() for row in mask]
    assert allowed[:6] == [[11, 12, 13], [14, 15, 16], [11, 12, 13], [14, 15, 16], [6, 7, 8, 9, 10], [6, 7, 8, 9, 10]]
    assert allowed[6:] == [[v.img_end_id], [v.cls_id]]
    mask = v.format_mask(v.cond_prompt(1) + [v.code_id(5)], 6, 2)         # after the ground's palette colour
    assert torch.nonzero(mask[0]).flatten().tolist() == [14, 15, 16]
