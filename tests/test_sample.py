"""generation.py and sample.py: the filters, cached decoding against full recomputation, seeds, the CLI."""
import json
import os
import subprocess
import sys

import pytest
import torch
from fixtures import ROOT, png_size

import sample as sp
from imagegpt import decoding as gen
from imagegpt.checkpoint import Checkpoint
from imagegpt.draw_settings import DrawSettings as S
from imagegpt.errors import UserError
from imagegpt.token_format import Vocab
from model import GPT, GPTConfig

INF = float("-inf")
VOCAB = Vocab(8, 3)   # 17 tokens: specials 0..5, <Z_000..007> 6..13, <CLS_0..2> 14..16


def kept(filtered):
    return set((filtered != INF).nonzero().flatten().tolist())


# ----------------------------------------------------------------------------- top-k

def test_top_k_keeps_the_k_largest_and_all_ties_at_the_kth_value():
    x = torch.tensor([1.0, 3.0, 3.0, 2.0, 0.0])
    assert kept(gen.top_k_filter(x, 1)) == {1, 2}        # k-th value 3 is shared: both kept
    assert kept(gen.top_k_filter(x, 2)) == {1, 2}
    assert kept(gen.top_k_filter(x, 3)) == {1, 2, 3}
    assert kept(gen.top_k_filter(x, 4)) == {0, 1, 2, 3}
    for k in (0, None, 5, 99):
        assert torch.equal(gen.top_k_filter(x, k), x)
    f = gen.top_k_filter(x, 3)
    assert torch.equal(f[[1, 2, 3]], x[[1, 2, 3]])       # kept logits are unchanged
    rows = gen.top_k_filter(torch.tensor([[0.0, 1.0, 2.0, 3.0], [3.0, 2.0, 2.0, 0.0]]), 2)
    assert (rows != INF).tolist() == [[False, False, True, True], [True, True, True, False]]
    assert torch.equal(x, torch.tensor([1.0, 3.0, 3.0, 2.0, 0.0]))   # input untouched


# ----------------------------------------------------------------------------- top-p

def logits_of(probs):
    return torch.tensor(probs, dtype=torch.float64).log().float()


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    x = logits_of([0.2, 0.5, 0.3])                       # order must not matter
    assert kept(gen.top_p_filter(x, 0.5)) == {1}          # 0.5 alone reaches 0.5
    assert kept(gen.top_p_filter(x, 0.5001)) == {1, 2}
    assert kept(gen.top_p_filter(x, 0.8)) == {1, 2}       # 0.5 + 0.3 reaches 0.8 (despite float rounding)
    assert kept(gen.top_p_filter(x, 0.8001)) == {0, 1, 2}
    assert kept(gen.top_p_filter(x, 0.3)) == {1}
    f = gen.top_p_filter(x, 0.8)
    assert torch.equal(f[[1, 2]], x[[1, 2]])             # kept logits are unchanged


def test_top_p_exact_boundaries_despite_float_rounding():
    # every 3-token distribution in hundredths: p = the top two's mass keeps exactly two tokens,
    # a hair more keeps all three (float32 logits give sums like 0.38 + 0.32 = 0.69999...)
    for a in range(34, 99):
        for b in range(1, a):
            c = 100 - a - b
            if 0 < c < b:
                x = logits_of([c / 100, a / 100, b / 100])
                assert kept(gen.top_p_filter(x, (a + b) / 100)) == {1, 2}, (a, b, c)
                assert kept(gen.top_p_filter(x, (a + b) / 100 + 1e-5)) == {0, 1, 2}, (a, b, c)


def test_top_p_one_keeps_everything_and_tiny_p_keeps_the_argmax():
    x = torch.tensor([0.0, -80.0, -95.0, 2.0])           # tokens too unlikely to move a float cumsum
    assert torch.equal(gen.top_p_filter(x, 1.0), x)
    assert torch.equal(gen.top_p_filter(x, None), x)
    for p in (1e-12, 1e-3, 0.5):
        assert kept(gen.top_p_filter(x, p)) == {3}
    assert kept(gen.top_p_filter(logits_of([0.3, 0.3, 0.4]), 1e-12)) == {2}


def test_top_p_ties_at_the_boundary_are_all_kept():
    x = logits_of([0.2, 0.4, 0.2, 0.2])
    assert kept(gen.top_p_filter(x, 0.4)) == {1}
    assert kept(gen.top_p_filter(x, 0.5)) == {0, 1, 2, 3}  # one more 0.2 is needed: all three tie
    assert kept(gen.top_p_filter(torch.tensor([1.0, 1.0, 0.0]), 1e-9)) == {0, 1}   # tied argmax


def test_top_p_batched_and_masked_inputs():
    x = torch.stack([logits_of([0.6, 0.3, 0.1]), logits_of([0.1, 0.3, 0.6])])
    f = gen.top_p_filter(x, 0.85)
    assert (f != INF).tolist() == [[True, True, False], [False, True, True]]
    m = torch.tensor([0.0, INF, 0.0, -1.0])
    assert kept(gen.top_p_filter(m, 0.99)) == {0, 2, 3}
    assert kept(gen.top_p_filter(gen.top_k_filter(m, 2), 0.99)) == {0, 2}


def test_choose_next_respects_the_filters():
    g = torch.Generator().manual_seed(0)
    x = logits_of([0.5, 0.3, 0.2]).expand(4000, 3)
    counts = torch.bincount(gen.choose_next(x, S(top_p=0.8), g), minlength=3).tolist()
    assert counts[2] == 0 and counts[0] > counts[1] > 1000
    assert gen.choose_next(x, S(top_k=1), g).unique().tolist() == [0]
    assert gen.choose_next(x, S(temperature=0)).unique().tolist() == [0]
    assert gen.choose_next(x, S(greedy=True)).unique().tolist() == [0]


# ----------------------------------------------------------------------------- decoding

@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=len(VOCAB), block_size=16, n_layer=2, n_head=2, n_embd=32)).eval()


IMG, END, CLS, EOS = VOCAB.img_id, VOCAB.img_end_id, VOCAB.cls_id, VOCAB.eos_id
Z = [VOCAB.code_id(k) for k in range(8)]
PROMPTS = [[IMG], [IMG, Z[3]], [IMG], [IMG, Z[1], Z[2]], [IMG, Z[3]], [IMG],
           [IMG, Z[0], Z[1], Z[2], Z[3], END, CLS], [IMG, Z[5], Z[6], Z[7], Z[0], Z[1], Z[2], Z[3], Z[4], Z[5], Z[6], Z[7]]]


def decode(model, prompts, settings=S(), **kw):
    """decoding.generate with this module's vocabulary, the model as a checkpoint without a codebook."""
    return gen.generate(Checkpoint(model, VOCAB, None), prompts, settings, **kw)


def full_last_logits(model, ids):
    return model(torch.tensor([ids]))[0][0, -1]


@torch.no_grad()
def test_cached_decoding_matches_full_recomputation_at_every_step(model):
    res = decode(model, PROMPTS * 2, S(max_new_tokens=10, temperature=1.5, seed=3, batch_size=3), record_logits=True)
    stops, generated_cls = set(), 0
    for prompt, r in zip(PROMPTS * 2, res):
        ids, L = r["ids"], len(prompt)
        assert ids[:L] == prompt and r["new"] == len(ids) - L == len(r["logits"])
        assert r["new"] == min(10, 16 - L) or r["stop"] == "eos"
        assert EOS not in ids[L:-1] and (r["stop"] != "eos" or ids[-1] == EOS)
        stops.add(r["stop"])
        for s in range(r["new"]):
            assert torch.allclose(r["logits"][s], full_last_logits(model, ids[:L + s]), atol=1e-5, rtol=0)
        # the class prediction comes from the logits where the first <CLS> was fed (every token
        # but the last generated one is fed)
        fed = ids[:-1] if r["new"] else ids
        if CLS in fed:
            pos = ids.index(CLS)
            generated_cls += pos >= L
            want = full_last_logits(model, ids[:pos + 1])[VOCAB.label_offset:].softmax(-1)
            assert r["pred"] == int(want.argmax()) and r["prob"] == pytest.approx(want.max().item(), abs=1e-5)
            assert r["label_probs"] == pytest.approx(want.tolist(), abs=1e-5)
        else:
            assert r["pred"] is None
    assert stops == {"eos", "max_new_tokens", "block_size"}   # all three ways to stop were exercised
    assert generated_cls >= 1                               # and a <CLS> sampled by the model was scored


@torch.no_grad()
def test_greedy_is_deterministic_and_equals_argmax_of_full_recomputation(model):
    a = decode(model, PROMPTS, S(max_new_tokens=12, greedy=True))
    b = decode(model, PROMPTS, S(max_new_tokens=12, greedy=True, batch_size=1))
    assert [r["ids"] for r in a] == [r["ids"] for r in b]
    for prompt, r in zip(PROMPTS, a):
        ids = list(prompt)                                   # reference: full forward each step
        while len(ids) < min(len(prompt) + 12, 16):
            ids.append(int(full_last_logits(model, ids).argmax()))
            if ids[-1] == EOS:
                break
        assert r["ids"] == ids


@torch.no_grad()
def test_sampling_with_a_seed_is_reproducible(model):
    run = lambda seed: [r["ids"] for r in decode(model, PROMPTS, S(max_new_tokens=10, top_k=8, top_p=0.95, seed=seed))]
    assert run(7) == run(7)
    assert run(7) != run(8)


@torch.no_grad()
def test_rows_stop_on_their_own_and_finished_prompts_add_nothing(model):
    """A batch whose rows finish at different steps (a prompt that already ends in <EOS>, rows that
    sample <EOS>, rows that run to the limit): each row's tokens and logits end where it stopped."""
    prompts = [[IMG, Z[1], EOS], [IMG], [IMG], [IMG, Z[2]]]
    res = decode(model, prompts * 3, S(max_new_tokens=8, temperature=3.0, seed=11), record_logits=True)
    assert res[0]["ids"] == prompts[0] and res[0]["new"] == 0 and res[0]["stop"] == "eos"
    assert res[0]["logits"].shape == (0, len(VOCAB))
    for prompt, r in zip(prompts * 3, res):
        new = r["ids"][len(prompt):]
        assert len(new) == r["new"] == len(r["logits"]) and EOS not in new[:-1]
        assert (r["stop"] == "eos") == (prompt[-1] == EOS or new[-1:] == [EOS])
    assert {r["stop"] for r in res} == {"eos", "max_new_tokens"}


def test_decoding_under_bf16_autocast_keeps_its_cache_in_bf16(model):
    """Under autocast the cache takes the autocast dtype (the keys and values come out in it), so a
    bf16 decoding step attends bf16 to bf16; the greedy tokens follow a full bf16 forward."""
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        assert model.new_cache(1, 4).kv[0].dtype == torch.bfloat16
        r = decode(model, [[IMG, Z[1]]], S(max_new_tokens=6, greedy=True), record_logits=True)[0]
        assert r["logits"].dtype == torch.float32 and r["new"] == 6
        for s in range(r["new"]):
            full = full_last_logits(model, r["ids"][:2 + s]).float()
            assert (r["logits"][s] - full).abs().max() < 0.05
    assert model.new_cache(1, 4).kv[0].dtype == torch.float32


def test_bf16_auto_decodes_narrow_models_in_fp32_on_a_cpu():
    """--bf16 auto: bf16 for training and evaluation where supported; for decoding on a CPU only from
    BF16_DECODE_MIN_WIDTH up (narrower models decode slower in bf16); true still insists."""
    import contextlib

    from imagegpt.device import BF16_DECODE_MIN_WIDTH, bf16_autocast, native_cpu_bf16
    narrow, wide = BF16_DECODE_MIN_WIDTH // 2, BF16_DECODE_MIN_WIDTH
    assert isinstance(bf16_autocast("auto", "cpu", decode_width=narrow), contextlib.nullcontext)
    assert isinstance(bf16_autocast("false", "cpu", decode_width=wide), contextlib.nullcontext)
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():   # bf16 kernels, native or emulated
        assert isinstance(bf16_autocast("true", "cpu", decode_width=narrow), torch.autocast)
        native = native_cpu_bf16()                        # auto takes bf16 where the CPU computes it natively
        assert isinstance(bf16_autocast("auto", "cpu", decode_width=wide), torch.autocast if native else contextlib.nullcontext)
        assert isinstance(bf16_autocast("auto", "cpu"), torch.autocast if native else contextlib.nullcontext)


def test_generate_rejects_bad_prompts(model):
    with pytest.raises(UserError, match="block size"):
        decode(model, [[IMG] * 17], S(max_new_tokens=5))
    with pytest.raises(UserError, match="empty"):
        decode(model, [[]], S(max_new_tokens=5))
    r = decode(model, [[IMG] * 16], S(max_new_tokens=5))[0]        # a full block: nothing to add
    assert r["new"] == 0 and r["stop"] == "block_size"


def test_format_mask_follows_the_token_format():
    labels = set(range(VOCAB.label_offset, VOCAB.label_offset + 3))
    allowed = lambda prompt, steps=9: [set(r.nonzero().flatten().tolist()) for r in VOCAB.format_mask(prompt, 4, steps)]
    assert allowed([IMG, Z[1]]) == [set(Z)] * 3 + [{END}, {CLS}, labels, {EOS}, {VOCAB.pad_id}, {VOCAB.pad_id}]
    cond = VOCAB.cond_prompt(2)
    assert allowed(cond, 7) == [set(Z)] * 4 + [{END}, {EOS}, {VOCAB.pad_id}]
    assert allowed([VOCAB.unk_id, IMG] + Z[:4], 2) == [{END}, {EOS}]
    everything = [set(range(len(VOCAB)))] * 3
    for free in ([CLS], [IMG, Z[0], END], [IMG] + Z[:5], [Z[0], IMG]):   # not an image begun in the format
        assert allowed(free, 3) == everything


@torch.no_grad()
def test_decoding_in_the_format_makes_every_row_a_complete_image(model):
    """An untrained model writes malformed rows; with image_len each row is a complete image (plain or
    conditioned), its codes and label still sampled, and a seed still reproduces it."""
    prompts = [[IMG], [IMG, Z[2]], VOCAB.cond_prompt(1), VOCAB.cond_prompt(None)] * 4
    run = lambda **kw: decode(model, prompts, S(max_new_tokens=14, temperature=1.5, seed=3), **kw)
    free = run()
    assert not all(VOCAB.is_complete(r["ids"], 4) or VOCAB.is_cond_complete(r["ids"], 4) for r in free)
    shaped = run(image_len=4)
    assert [r["ids"] for r in shaped] == [r["ids"] for r in run(image_len=4)]
    for p, r in zip(prompts, shaped):
        assert (VOCAB.is_cond_complete if VOCAB.is_conditioned(p) else VOCAB.is_complete)(r["ids"], 4), r["ids"]
        assert r["stop"] == "eos"
    plain = [r for p, r in zip(prompts, shaped) if not VOCAB.is_conditioned(p)]
    assert len({r["ids"][-2] for r in plain}) > 1 and all(r["pred"] is not None for r in plain)
    guided = decode(model, prompts[2:4], S(max_new_tokens=14, temperature=1.5, guidance=4.0, seed=3),
                    uncond=[VOCAB.cond_prompt(None)] * 2, image_len=4)
    assert all(VOCAB.is_cond_complete(r["ids"], 4) for r in guided)


def test_well_formed():
    seq = [IMG] + Z[:4] + [END, CLS, VOCAB.label_id(2), EOS]
    assert VOCAB.is_complete(seq, 4)
    assert not VOCAB.is_complete(seq, 5)
    assert not VOCAB.is_complete(seq[:-1], 3)
    assert not VOCAB.is_complete([IMG] + Z[:3] + [CLS] + [END, CLS, VOCAB.label_id(2), EOS], 4)


# ----------------------------------------------------------------------------- command line

def test_sample_cli_outputs(tiny, tmp_path, capsys):
    png, jl = str(tmp_path / "s.png"), str(tmp_path / "s.jsonl")
    args = ["--ckpt", tiny.ckpt, "--num_samples", "4", "--seed", "5", "--top_p", "0.9", "--out_png", png]
    assert sp.main(args + ["--out_jsonl", jl]) == 0
    out = capsys.readouterr().out
    assert png_size(png) == (2 * 88, 2 * 100)     # 4x4 images drawn 21x: 88x100 cells, 2x2 grid
    recs = [json.loads(line) for line in open(jl)]
    assert len(recs) == 4 and all(r["tokens"].startswith("<IMG>") for r in recs)
    assert out.count("sample ") == 4 and "<IMG>" not in out        # sequences went to the file
    for r in recs:
        ids = tiny.vocab.encode(r["tokens"])
        assert r["well_formed"] == tiny.vocab.is_complete(ids, 4)
        assert (r["label"] is not None) == r["well_formed"]
        assert r["pred"] is None or 0 <= r["pred"] < 3
    assert sp.main(args) == 0                                      # same seed: same sequences, printed
    printed = [ln.strip() for ln in capsys.readouterr().out.splitlines() if ln.startswith("  <")]
    assert printed == [r["tokens"] for r in recs]


def test_completion_cli(tiny, tmp_path, capsys):
    png, jl = str(tmp_path / "c.png"), str(tmp_path / "c.jsonl")
    assert sp.main(["--ckpt", tiny.ckpt, "--complete", "3", "--greedy", "--out_png", png, "--out_jsonl", jl]) == 0
    assert png_size(png) == (6 * 88, 2 * 100)     # (original, kept part, completion) x 2 per row
    recs = [json.loads(line) for line in open(jl)]
    assert [r["meta"]["true_label"] for r in recs] == [0, 1, 2]    # round-robin over the classes
    val = [json.loads(line)["tokens"].split() for line in open(tiny.val)]
    for r in recs:
        assert r["meta"]["kept_codes"] == 2
        src = val[int(r["meta"]["source"].rsplit("#", 1)[1]) - 1]
        assert r["tokens"].split()[:3] == src[:3]                # the kept half is the real one
    assert "matches the true label" in capsys.readouterr().out


def test_sample_cli_bad_arguments(tiny, tmp_path):
    png = tmp_path / "x.png"
    for bad, msg in ((["--top_p", "0"], "top_p"), (["--temperature", "-1"], "temperature"),
                     (["--start", "<IMG> <CLS_3>"], "unknown token '<CLS_3>'"),
                     (["--start", " ".join(["<IMG>"] * 16)], "block size")):
        with pytest.raises(UserError, match=msg):
            sp.main(["--ckpt", tiny.ckpt, "--out_png", str(png)] + bad)
    assert not png.exists()


def test_help_and_one_line_error_subprocess(tiny):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "sample.py", "--help"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and all(command in r.stdout for command in ("free", "draw", "complete"))
    for command, flags in (("free", ("--num_samples", "--max_new_tokens", "--temperature", "--top_k", "--top_p",
                                     "--seed", "--start", "--greedy", "--out_png", "--out_jsonl")),
                           ("draw", ("--class", "--grid", "--guidance")), ("complete", ("--fraction", "--class"))):
        r = subprocess.run([sys.executable, "sample.py", command, "--help"], cwd=ROOT, capture_output=True, text=True,
                           env=env)
        assert r.returncode == 0 and all(flag in r.stdout for flag in flags), command
    r = subprocess.run([sys.executable, "sample.py", "--ckpt", tiny.ckpt, "--start", "<IMG> <Z_9>"],
                       cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: --start: unknown token '<Z_9>'")
    assert not os.path.exists(os.path.join(tiny.ckpt, "samples.png"))
