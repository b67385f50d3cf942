"""bench.py: a smoke run at tiny sizes (structure of the JSON, positive ratios; no timing claims)."""
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
pytest.importorskip("transformers")
pytest.importorskip("sklearn")
import torch  # noqa: E402

import bench  # noqa: E402
from model import GPTConfig  # noqa: E402
from util import UserError  # noqa: E402

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
        assert set(r["raw_seconds"]) == {"ours", "theirs"} and len(r["raw_seconds"]["ours"]) == 2
        assert set(r["peak_memory_bytes"]) == {"ours", "theirs"}
        assert all(v >= 0 for v in r["peak_memory_bytes"].values())
    keys = [r["key"] for r in result["rows"]]
    for k in ("train_long", "train_default", "mfu", "sample_b1", "sample_b3", "kmeans_time", "kmeans_inertia"):
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
    k = result["kmeans"]
    assert k["n"] == 600 and k["dim"] == 5 and k["k"] == 6


def test_threads_are_restored(result):
    assert torch.get_num_threads() == THREADS_BEFORE


def test_flops_formula():
    cfg = GPTConfig(vocab_size=516, n_layer=6, n_head=8, n_embd=384)
    n = 6 * 12 * 384 ** 2 + 516 * 384
    assert bench.flops_per_token(cfg, 512) == 6 * n + 12 * 6 * 512 * 384


def test_bad_arguments():
    for bad in (["--only", "train,nothing"], ["--lengths", "600"], ["--lengths", "a"], ["--vocab_size", "10"]):
        with pytest.raises(UserError):
            bench.run(bench.build_parser().parse_args(bad))
