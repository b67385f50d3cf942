"""bench.py: a smoke run at tiny sizes (structure of the JSON, positive ratios; no timing claims)."""
import json
import math

import pytest

import sklearn  # noqa: F401  (bench.py compares with scikit-learn and transformers: both must be there)
import torch
import transformers  # noqa: F401  (see above)

import bench
from model import GPTConfig
from util import UserError

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--vocab_size", "36",
        "--batch", "2", "--lengths", "12,6", "--sample_batches", "1,3", "--new_tokens", "4",
        "--kmeans_n", "600", "--kmeans_k", "6", "--kmeans_iters", "5", "--kmeans_data", "random",
        "--matmul_n", "64", "--reps", "2", "--warmup", "1", "--device", "cpu", "--threads", "1"]
# (one thread: on a machine whose other cores are busy, tiny steps on all cores wait on preempted threads)


THREADS_BEFORE = torch.get_num_threads()


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    assert bench.main(TINY + ["--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_json_structure(result):
    assert {"command", "machine", "model", "train", "matmul_peak", "sample", "kmeans", "rows"} <= set(result)
    assert result["command"].startswith("python bench.py")
    m = result["machine"]
    assert m["torch"] and m["threads"] == 1 and m["device"] == "cpu"
    assert [r["length"] for r in result["train"]] == [12, 6]
    assert [r["key"] for r in result["train"]] == ["train_long", "train_default"]
    assert [r["batch"] for r in result["sample"]] == [1, 3]
    assert result["matmul_peak"]["samples"] == 4       # one per repetition of each training length
    for r in result["train"] + result["sample"]:
        sides = {"ours", "theirs"} | ({"onnx", "onnx_int8"} if r in result["sample"] else set())
        assert set(r["raw_seconds"]) == sides and len(r["raw_seconds"]["ours"]) == 2
        assert set(r["peak_memory_bytes"]) == {"ours", "theirs"}
        assert all(v >= 0 for v in r["peak_memory_bytes"].values())
    keys = [r["key"] for r in result["rows"]]
    for k in ("train_long", "train_default", "mfu", "sample_b1", "sample_b3", "sample_b1_onnx", "sample_b3_onnx_int8",
              "classify_b1_ours", "classify_b3_onnx",
              "kmeans_time", "kmeans_inertia"):
        assert k in keys


def test_ratios_are_positive_numbers(result):
    for r in result["train"]:
        assert positive(r["ratio"]) and positive(r["mfu"]) and positive(r["achieved_flops"])
        assert all(positive(v) for v in r["tokens_per_s"].values())
    for r in result["sample"]:
        assert positive(r["ratio"]) and all(positive(v) for v in r["tokens_per_s"].values())
    k = result["kmeans"]
    assert positive(k["time_ratio"]) and positive(k["inertia_ratio"])
    assert positive(result["matmul_peak"]["median_flops"])
    for row in result["rows"]:
        if not row["key"].startswith("memory"):
            assert positive(row["ratio"]), row


def test_same_work_on_both_sides(result):
    for r in result["train"]:   # same weights and batch: the same first loss
        assert abs(r["first_loss"]["ours"] - r["first_loss"]["theirs"]) < 1e-4
    for r in result["sample"]:  # greedy, EOS off: the same tokens, all of them
        assert r["same_tokens"] and r["generated"]["ours"] == [r["batch"], 1 + r["new_tokens"]]
        assert r["same_tokens_ort"]["onnx"]     # fp32 onnxruntime: the same greedy tokens too
    for r in result["classify"]:                # the same class probabilities on every side
        assert set(r["ratio"]) == {"ours", "onnx", "onnx_int8"} and all(positive(v) for v in r["ratio"].values())
        assert r["max_prob_diff"]["ours"] < 1e-5 and r["max_prob_diff"]["onnx"] < 1e-4
    k = result["kmeans"]
    assert k["n"] == 600 and k["dim"] == 5 and k["k"] == 6


def test_threads_are_restored(result):
    assert torch.get_num_threads() == THREADS_BEFORE


def test_flops_formula_matches_torch_flop_counter():
    """The 6 N part counted independently: torch's FlopCounterMode over a real training step counts the
    matmuls (it leaves the CPU attention kernel out, which is the 12 L T d part of the formula)."""
    from torch.utils.flop_counter import FlopCounterMode
    from model import GPT
    cfg = GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=4, n_embd=48)
    model, T = GPT(cfg), 32
    x = torch.randint(100, (3, T), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter:
        model(x, x)[1].backward()
    attention = 12 * cfg.n_layer * T * cfg.n_embd
    assert bench.flops_per_token(cfg, T) - attention == counter.get_total_flops() / (3 * T)


def test_bad_arguments():
    for bad in (["--only", "train,nothing"], ["--lengths", "600"], ["--lengths", "a"], ["--vocab_size", "10"]):
        with pytest.raises(UserError):
            bench.run(bench.build_parser().parse_args(bad))
