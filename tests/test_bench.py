"""bench.py: a smoke run at tiny sizes (structure of the JSON, positive ratios; no timing claims)."""
import json
import math

import pytest
import sklearn  # noqa: F401  (bench.py compares with scikit-learn and transformers: both must be there)
import torch
import transformers  # noqa: F401  (see above)

import bench
from imagegpt import bench_report, flops
from imagegpt.device import native_cpu_bf16
from imagegpt.errors import UserError
from model import GPTConfig

TINY = ["--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--vocab_size", "36",
        "--batch", "2", "--lengths", "12,6", "--sample_batches", "1,3", "--new_tokens", "4",
        "--kmeans_n", "600", "--kmeans_k", "6", "--kmeans_iters", "5", "--kmeans_data", "random",
        "--matmul_n", "64", "--reps", "2", "--warmup", "1", "--device", "cpu", "--threads", "1",
        "--only", "train,sample,kmeans"]
# (one thread: on a machine whose other cores are busy, tiny steps on all cores wait on preempted threads)


THREADS_BEFORE = torch.get_num_threads()


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    torch.set_num_threads(THREADS_BEFORE)   # torch's own default, as a fresh `python bench.py` has (an earlier test
    assert bench.main(TINY + ["--json", str(out)]) == 0   # of the suite may have run a command that set them)
    return json.loads(out.read_text())


BF16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()   # the project machines: AVX-512 with bf16
PRECISIONS = ["fp32", "bf16"] if BF16 else ["fp32"]


def test_json_structure(result):
    assert {"command", "machine", "model", "train", "matmul_peak", "sample", "kmeans", "rows"} <= set(result)
    assert result["command"].startswith("python bench.py")
    m = result["machine"]
    assert m["torch"] and m["threads"] == 1 and m["device"] == "cpu"
    assert m["threads_choice"] == {"source": "--threads", "threads": 1, "default": THREADS_BEFORE}   # who chose them
    k = m["kernels"]                                                      # the kernels taken, on every CPU kind
    assert k["aten"] == torch.backends.cpu.get_cpu_capability() and k["fp32_matmul"].startswith("MKL sgemm")
    assert k["onednn"]["isa"] and set(k["onnxruntime_mlas"]) == {"fp32", "int8"}
    assert m["cpu_vendor"] and isinstance(m["cpu_flags"], list) and m["onnxruntime"]
    assert [r["length"] for r in result["train"]] == [12, 6]
    assert [r["key"] for r in result["train"]] == ["train_long", "train_default"]
    assert [r["key"] for r in result["sample"]] == ["sample_b1", "sample_b3"]
    assert set(result["matmul_peak"]) == set(PRECISIONS)
    for p in result["matmul_peak"].values():
        assert p["samples"] == 4                        # the square: one per repetition and length
        assert len(p["model_gemms"]) == 2 * 5 * 3       # per length, 5 linear layers x (forward, dX, dW)
        assert p["ceiling_flops"] == max([p["max_flops"]] + list(p["model_gemms"].values()))
    for r in result["train"]:   # ours and HF, each in fp32 and (where supported) bf16, in one alternation
        sides = {f"{who}_{p}" for who in ("ours", "theirs") for p in PRECISIONS}
        assert set(r["raw_seconds"]) == set(r["peak_memory_bytes"]) == sides
        assert all(len(t) == 2 for t in r["raw_seconds"].values())
        auto = native_cpu_bf16()   # train.py's default: bf16 where the CPU has bf16 instructions, else fp32
        assert r["pairs"]["defaults"] == ["ours_bf16" if BF16 and auto else "ours_fp32", "theirs_fp32"]   # (JSON lists)
        assert set(r["pairs"]) == {"defaults"} | set(PRECISIONS) and r["cuda_checks"] is None
    for r in result["sample"]:
        sides = {"ours", "theirs", "onnx", "onnx_int8"} | ({"ours_other"} if BF16 else set())
        assert set(r["raw_seconds"]) == sides and len(r["raw_seconds"]["ours"]) == 2
        assert r["ours_precision"] == "fp32"   # sample.py's default for a model this narrow on a CPU
        assert set(r["peak_memory_bytes"]) == {"ours", "theirs"}
    for r in result["train"] + result["sample"]:
        assert all(v >= 0 for v in r["peak_memory_bytes"].values())
    keys = [r["key"] for r in result["rows"]]
    for k in ("train_long_defaults", "train_default_defaults", "train_long_fp32", "mfu_train_long_fp32",
              "sample_b1", "sample_b3", "sample_b1_onnx", "sample_b3_onnx_int8",
              "classify_b1_ours", "classify_b3_onnx", "kmeans_time", "kmeans_inertia", "memory_train_long_defaults"):
        assert k in keys, k
    if BF16:
        assert {"train_long_bf16", "mfu_train_long_bf16", "sample_b1_ours_other"} <= set(keys)


def test_ratios_are_positive_numbers(result):
    for r in result["train"]:
        for d in (r["ratio"], r["mfu"], r["mfu_causal"], r["achieved_flops"], r["tokens_per_s"], r["gemm_seconds"],
                  r["ratio_bound"]):
            assert d and all(positive(v) for v in d.values())
    for r in result["sample"]:
        assert positive(r["ratio"]) and all(positive(v) for v in r["images_per_s"].values())
    k = result["kmeans"]
    assert positive(k["time_ratio"]) and positive(k["inertia_ratio"])
    assert all(positive(p["median_flops"]) for p in result["matmul_peak"].values())
    for row in result["rows"]:
        if not row["key"].startswith("memory"):
            assert positive(row["ratio"]), row


def test_flops_are_counted_both_ways(result):
    """The MFU counts the FLOPs our kernels compute: on the CPU at these lengths (<= SHORT_ATTENTION) the
    explicit attention matmuls over the full T x T square (nanoGPT's convention); the causal count takes half
    of that attention term: 6 L T d less per token. The ceiling is the matmul peak's, over the square and the
    step's own products."""
    cfg = GPTConfig(vocab_size=36, block_size=16, n_layer=1, n_head=2, n_embd=16)
    for r in result["train"]:
        T, fpt = r["length"], r["flops_per_token"]
        assert fpt["full"] == flops.flops_per_token(cfg, T) == fpt["computed"]
        assert fpt["full"] - fpt["causal"] == 6 * cfg.n_layer * T * cfg.n_embd
        for p, mfu in r["mfu"].items():
            assert mfu == pytest.approx(r["achieved_flops"][p] / result["matmul_peak"][p]["ceiling_flops"])
            assert r["mfu_causal"][p] == pytest.approx(mfu * fpt["causal"] / fpt["full"])
    assert flops.computed_flops_per_token(cfg, 600, torch.device("cpu")) == flops.flops_per_token(cfg, 600, causal=True)
    assert flops.computed_flops_per_token(cfg, 12, torch.device("cuda")) == flops.flops_per_token(cfg, 12, causal=True)


def test_same_work_on_both_sides(result):
    for r in result["train"]:   # same weights and batch: the same first loss, in fp32 and in bf16
        f = r["first_loss"]
        assert abs(f["ours_fp32"] - f["theirs_fp32"]) < 1e-4
        if BF16:
            assert abs(f["ours_bf16"] - f["theirs_bf16"]) < 2e-2
    for r in result["sample"]:  # greedy, EOS off: the same tokens, all of them
        assert r["same_tokens"] and r["generated"]["ours"] == [r["batch"], 1 + r["new_tokens"]]
        assert r["same_tokens_as_hf"]["onnx"]   # fp32 onnxruntime: the same greedy tokens too
    for r in result["classify"]:                # the same class probabilities on every side
        assert set(r["ratio"]) == {"ours", "onnx", "onnx_int8"} and all(positive(v) for v in r["ratio"].values())
        assert r["max_prob_diff"]["ours"] < 1e-5 and r["max_prob_diff"]["onnx"] < 1e-4
    k = result["kmeans"]   # the same rule: the same number of Lloyd iterations on both sides
    assert k["max_iters"] == 5 and k["iters"]["ours"] == k["iters"]["theirs"] == 5
    k = result["kmeans"]
    assert k["n"] == 600 and k["dim"] == 5 and k["k"] == 6


def test_threads_are_restored(result):
    assert torch.get_num_threads() == THREADS_BEFORE


def test_flops_formula_matches_torch_flop_counter(monkeypatch):
    """The whole formula counted independently: torch's FlopCounterMode over a real training step counts
    every matmul. On the CPU a sequence this short attends through model.causal_attention's explicit
    matmuls over the full T x T square, which is the 12 L T d part; above SHORT_ATTENTION the CPU flash
    kernel, which the counter leaves out, attends instead, and the count is the 6 N part alone. The
    counter knows torch's own products only, so cpu_linear keeps them there (the same products)."""
    from torch.utils.flop_counter import FlopCounterMode

    from imagegpt import cpu_linear
    from model import GPT, SHORT_ATTENTION
    monkeypatch.setattr(cpu_linear, "onednn_fp32", lambda: False)
    cfg = GPTConfig(vocab_size=100, block_size=SHORT_ATTENTION + 8, n_layer=2, n_head=4, n_embd=48)
    model = GPT(cfg)
    for T, attention in ((32, 12 * cfg.n_layer * 32 * cfg.n_embd), (SHORT_ATTENTION + 8, 0)):
        x = torch.randint(100, (3, T), generator=torch.Generator().manual_seed(0))
        with FlopCounterMode(display=False) as counter:
            model(x, x)[1].backward()
        assert flops.flops_per_token(cfg, T) - 12 * cfg.n_layer * T * cfg.n_embd + attention == \
            counter.get_total_flops() / (3 * T)


def test_gpu_preset_dry_run_on_the_cpu(tmp_path):
    """--preset gpu (the README's GPU table) expands to its arguments and runs end to end; here on the
    CPU at tiny sizes (the demo-size sampling rows at their real size, 2 new tokens)."""
    argv = bench.expand_preset(["--preset", "gpu", "--device", "cpu", "--json", str(tmp_path / "gpu.json")])
    assert argv[:2] == ["--device", "cuda"] and argv[-2:] == ["--json", str(tmp_path / "gpu.json")]
    a = bench.build_parser().parse_args(argv)
    assert a.device == "cpu" and a.only == "train,sample,sample_demo" and a.sample_batches == "1,16,256"
    tiny = TINY[:TINY.index("--kmeans_n")] + ["--matmul_n", "64", "--reps", "1", "--warmup", "1", "--threads", "1"]
    tiny[tiny.index("--sample_batches") + 1], tiny[tiny.index("--new_tokens") + 1] = "1,2", "2"
    assert bench.main(["--preset", "gpu"] + tiny + ["--device", "cpu", "--json", str(tmp_path / "gpu.json")]) == 0
    out = json.loads((tmp_path / "gpu.json").read_text())
    assert set(out) >= {"train", "sample", "classify", "matmul_peak"} and "kmeans" not in out
    assert [r["key"] for r in out["sample"]] == ["sample_b1", "sample_b2", "sample_demo_b1", "sample_demo_b2"]
    demo = bench.demo_config(36)
    assert out["sample"][-1]["model"] == {"n_layer": demo.n_layer, "n_head": demo.n_head, "n_embd": demo.n_embd,
                                          "block_size": demo.block_size}
    with pytest.raises(UserError, match="--preset"):
        bench.expand_preset(["--preset", "tpu"])


def test_bad_arguments():
    for bad in (["--only", "train,nothing"], ["--lengths", "600"], ["--lengths", "a"], ["--vocab_size", "10"],
                ["--thread_jobs", "idle,cats"], ["--threads", "-1"]):
        with pytest.raises(UserError):
            bench.check_args(bench.build_parser().parse_args(bad))


def test_the_threads_table(monkeypatch):
    """--only threads: each work timed at torch's default, one and the chosen thread count, idle and beside
    another job (a process of its own, stopped after); the rows compare the chosen count with the default
    (idle: within 5 %) and with one thread (beside a job: not slower). One call each: structure only."""
    from imagegpt import thread_bench
    started = []
    real = thread_bench.Job.__enter__
    monkeypatch.setattr(thread_bench.Job, "__enter__", lambda self: started.append(real(self)) or self)
    monkeypatch.setattr(thread_bench, "demo_work", lambda seed=0: {"train": lambda: None, "classify": lambda: None,
                                                                   "draw": lambda: None})
    before = torch.get_num_threads()
    t = thread_bench.measure(2, jobs=("idle", "busy"), work=("train", "classify"), reps=1, settle=0.1,
                             log=lambda *a: None)
    assert torch.get_num_threads() == before
    assert [(r["job"], r["work"]) for r in t["rows"]] == [("idle", "train"), ("idle", "classify"), ("busy", "train"),
                                                         ("busy", "classify")]
    for r in t["rows"]:
        assert r["threads"]["default"] == 2 and r["threads"]["one"] == 1 and r["threads"]["auto"] >= 1
        assert all(len(v) == 1 for v in r["raw_ms"].values()) and set(r["ms"]) == {"default", "one", "auto"}
        if r["auto_is"]:      # the chosen count is one of the others: that very setting, timed once
            assert r["threads"]["auto"] == r["threads"][r["auto_is"]] and r["ms"]["auto"] == r["ms"][r["auto_is"]]
    assert started[1].proc.poll() is not None      # the busy loop was stopped
    out = {"machine": {"device": "cpu"}, "threads": t}
    for r in t["rows"]:
        r["ms"] = {"default": 10.0, "one": 8.0, "auto": 8.0}
    table = {r["key"]: r for r in bench_report.rows(out)}
    assert table["threads_train_idle"]["ratio"] == 1.25 and table["threads_train_idle"]["met"] is True
    assert table["threads_train_busy_vs_one"]["met"] is True and table["threads_train_busy"]["met"] is None
    assert table["threads_classify_idle_vs_one"]["met"] is None
