"""The benchmark's report: the summary table (one row per measure, ours against the peer, the ratio, the
target it must meet) from bench.py's figures, and the whole report as text with the machine and notes."""
import math

from imagegpt.device import describe_threads
from imagegpt.thread_bench import WORK

# targets on the CPU (issues 7 and 16): key -> (comparison, value, description)
TARGETS = {
    "train_long_defaults": (">=", 1.6, "training tokens/s vs HF GPT-2 at each side's defaults, length 512"),
    "train_default_defaults": (">=", 1.6, "training tokens/s vs HF GPT-2 at each side's defaults, default length"),
    "train_long_fp32": (">=", 1.5, "training tokens/s vs HF GPT-2, both fp32, length 512"),
    "mfu_train_long_fp32": (">=", 0.80, "achieved FLOP/s vs measured fp32 matmul peak"),
    "sample_demo_b1": (">=", 3.0, "sampling images/s vs HF generate(), demo model, batch 1"),
    "sample_demo_b16": (">=", 2.0, "sampling images/s vs HF generate(), demo model, batch 16"),
    "sample_b1": (">=", 1.8, "sampling images/s vs HF generate(), v2 model, batch 1"),
    "kmeans_time": ("<=", 0.5, "k-means time vs scikit-learn, the same iterations"),
    "kmeans_inertia": ("<=", 1.02, "k-means inertia vs scikit-learn"),
}

# the threads table (issue 37): the threads the commands choose now (auto) against torch's default (idle: within
# 5 %) and against one thread (beside another job: never slower, within 5 % of noise)
THREAD_TARGET = 0.95


def _verdict(key, value, cuda):
    """(the target of a ratio as text, whether it is met), (None, None) where there is none."""
    if key.startswith("threads_") and value is not None and not cuda:
        # idle: within 5 % of torch's default; beside another job: not slower than one thread (5 % of noise)
        if key.endswith("_idle") or (key.endswith("_vs_one") and "_idle" not in key):
            return f">= {THREAD_TARGET:g}x", value >= THREAD_TARGET
        return None, None
    if key not in TARGETS or cuda or value is None or not math.isfinite(value):
        return None, None
    op, target, _ = TARGETS[key]
    return f"{op} {target:g}x" if not key.startswith("mfu") else f">= {100 * target:.0f} %", \
        (value >= target if op == ">=" else value <= target)


def _mb(b):
    return f"{b / 2 ** 20:.0f} MB"


class Table:
    """The summary rows, each with the target of its ratio and whether it is met (on the CPU)."""

    def __init__(self, cuda):
        self.cuda, self.rows = cuda, []

    def add(self, key, measure, ours, theirs, ratio, ratio_text):
        target, met = _verdict(key, ratio, self.cuda)
        self.rows.append({"key": key, "measure": measure, "ours": ours, "theirs": theirs, "ratio": ratio,
                          "ratio_text": ratio_text, "target": target, "met": met})


NAMES = {"fp32": "fp32", "bf16": "bf16 autocast"}


def rows(out):
    """The summary table: list of dicts (measure, ours, theirs, ratio, target, met, key)."""
    table = Table(out["machine"]["device"].startswith("cuda"))
    for section in (train_rows, mfu_rows, sample_rows, classify_rows, web_rows, thread_rows, kmeans_rows, memory_rows):
        section(table, out)
    return table.rows


def train_rows(table, out):
    for r in out.get("train", []):
        where = f"length {r['length']}, batch {r['batch']}"
        for k, (o, t) in r["pairs"].items():
            how = (f"defaults: ours {NAMES[o.split('_')[1]]}, HF {NAMES[t.split('_')[1]]}" if k == "defaults"
                   else f"both {NAMES[k]}") + (", ours compiled" if r["compile_ours"] else "")
            table.add(f"{r['key']}_{k}", f"training tokens/s, {where}, {how} (vs HF GPT-2)",
                      f"{r['tokens_per_s'][o]:.0f}", f"{r['tokens_per_s'][t]:.0f}", r["ratio"][k], f"{r['ratio'][k]:.2f}x")
            if "ratio_bound" in r:
                gemm = r["gemm_seconds"][o.split("_")[1]]
                table.add(f"{r['key']}_{k}_bound", f"the most that ratio could be: HF's step over our step's "
                          f"linear-layer products alone ({1000 * gemm:.0f} ms, each run alone; {where}, {k})",
                          f"{r['batch'] * r['length'] / gemm:.0f}", f"{r['tokens_per_s'][t]:.0f}", r["ratio_bound"][k],
                          f"{r['ratio_bound'][k]:.2f}x")


def mfu_rows(table, out):
    for r in out.get("train", []):
        for p, mfu in r["mfu"].items():
            peak = out["matmul_peak"][p]
            half = r["flops_per_token"]["computed"] == r["flops_per_token"]["causal"]
            table.add(f"mfu_{r['key']}_{p}", f"achieved FLOP/s of our {NAMES[p]} training step, length {r['length']}, "
                      f"the FLOPs its kernels compute (attention over the {'causal half' if half else 'full square'}; "
                      f"nanoGPT's full-square count in brackets), vs the {peak['dtype']} matmul ceiling (the best of a "
                      f"{peak['n']}^2 product and the step's own products, each run alone)",
                      f"{r['achieved_flops'][p] / 1e9:.1f} GFLOP/s", f"{peak['ceiling_flops'] / 1e9:.1f} GFLOP/s", mfu,
                      f"{100 * mfu:.0f} % ({100 * r['mfu_full'][p]:.0f} %)")


def sample_rows(table, out):
    for r in out.get("sample", []):
        m = r["model"]
        size = ("demo model" if r["key"].startswith("sample_demo") else "model") + f" {m['n_layer']}x{m['n_head']}x{m['n_embd']}"
        table.add(r["key"], f"sampling images/s, {size}, batch {r['batch']}, {r['new_tokens']} new tokens, ours at its "
                  f"default ({r['ours_precision']}) (vs HF generate(), fp32)" + ("" if r["same_tokens"] else " [tokens differ]"),
                  f"{r['images_per_s']['ours']:.1f}", f"{r['images_per_s']['theirs']:.1f}", r["ratio"], f"{r['ratio']:.2f}x")
        for k, ratio in r["ratio_other"].items():
            what = {"ours_other": f"ours in {r['ours_other_precision']} (not the default)",
                    "onnx": "onnxruntime fp32 through our loop", "onnx_int8": "onnxruntime int8 through our loop"}[k]
            differ = not r["same_tokens_as_hf"][k]
            table.add(f"{r['key']}_{k}", f"sampling images/s, {size}, batch {r['batch']}, {what} (vs HF generate())"
                      + (" [tokens differ]" if differ else ""),
                      f"{r['images_per_s'][k]:.1f}", f"{r['images_per_s']['theirs']:.1f}", ratio, f"{ratio:.2f}x")


def classify_rows(table, out):
    for r in out.get("classify", []):
        for k, ratio in r["ratio"].items():
            side = {"ours": "ours (PyTorch)", "onnx": "onnxruntime fp32", "onnx_int8": "onnxruntime int8"}[k]
            size = "demo model" if r["key"].startswith("classify_demo") else "model"
            table.add(f"{r['key']}_{k}", f"classification images/s, {size}, {side}, batch {r['batch']} (vs an HF forward)",
                      f"{r['images_per_s'][k]:.0f}", f"{r['images_per_s']['theirs']:.0f}", ratio, f"{ratio:.2f}x")


def web_rows(table, out):
    web = {r["key"]: r for r in out.get("web", {}).get("rows", [])}
    for key, r in web.items():
        if r["side"].startswith("the page through serve.py"):
            continue
        peer = web.get(f"service_t{r['threads']}")
        where = f"{r['side']}, {r['threads']} thread{'s' if r['threads'] > 1 else ''} (vs serve.py, PyTorch, the same threads)"
        for q in ("p50", "p99"):
            mine, theirs = r["classify_ms"][q], peer["classify_ms"][q] if peer else float("nan")
            table.add(f"web_{key}_classify_{q}", f"classification latency {q}, ms per drawing, {where}; lower is better",
                      f"{mine:.1f}", f"{theirs:.1f}", mine / theirs, f"{mine / theirs:.2f}x")
        for b, dps in r["drawings_per_s"].items():
            theirs = peer["drawings_per_s"][b] if peer else float("nan")
            table.add(f"web_{key}_draw_b{b}", f"drawings/s, batch {b}, {where}", f"{dps:.1f}", f"{theirs:.1f}",
                      dps / theirs, f"{dps / theirs:.2f}x")


def thread_rows(table, out):
    for r in out.get("threads", {}).get("rows", []):
        n, ms = r["threads"], r["ms"]
        what = f"ms per {WORK[r['work']]}, demo GPT, {r['where']}: the threads chosen now ({n['auto']})"
        key = f"threads_{r['work']}_{r['job']}"
        same = lambda m: " (the same setting, timed once)" if r.get("auto_is") == m else ""
        table.add(key, f"{what} vs torch's default ({n['default']}, before){same('default')}", f"{ms['auto']:.1f}",
                  f"{ms['default']:.1f}", ms["default"] / ms["auto"], f"{ms['default'] / ms['auto']:.2f}x")
        table.add(f"{key}_vs_one", f"{what} vs one thread{same('one')}", f"{ms['auto']:.1f}", f"{ms['one']:.1f}",
                  ms["one"] / ms["auto"], f"{ms['one'] / ms['auto']:.2f}x")


def kmeans_rows(table, out):
    if "kmeans" in out:
        r = out["kmeans"]
        table.add("kmeans_time", f"k-means seconds, {r['n']} x {r['dim']}, k={r['k']} (vs scikit-learn; lower is better)",
                  f"{r['seconds']['ours']:.1f} s", f"{r['seconds']['theirs']:.1f} s", r["time_ratio"],
                  f"{r['time_ratio']:.2f}x")
        table.add("kmeans_inertia", "k-means final inertia (vs scikit-learn; lower is better)",
                  f"{r['inertia']['ours']:.1f}", f"{r['inertia']['theirs']:.1f}", r["inertia_ratio"],
                  f"{r['inertia_ratio']:.4f}x")


def memory_rows(table, out):
    for sec, what in (("train", "training step"), ("sample", "sampling")):
        for r in out.get(sec, []):
            m = r["peak_memory_bytes"]
            pairs = r["pairs"] if sec == "train" else {"": ("ours", "theirs")}
            for k, (o, t) in pairs.items():
                extra = f"length {r['length']}, {k}" if sec == "train" else f"batch {r['batch']}"
                table.add(f"memory_{r['key']}" + (f"_{k}" if k else ""), f"peak memory, {what}, {extra} ({r['memory_method']})",
                          _mb(m[o]), _mb(m[t]), m[o] / m[t] if m[t] else float("nan"), f"{m[o] / m[t]:.2f}x" if m[t] else "-")


def format_report(out):
    m = out["machine"]
    lines = []
    dev = m.get("gpu") or f"{m.get('cpu', '?')} ({m['cpu_count']} cores"
    if not m.get("gpu"):
        dev += f", {', '.join(m.get('cpu_flags', []))})" if m.get("cpu_flags") else ")"
    lines.append(f"machine: {dev}; {m['platform']}")
    attn = next((r["hf_attention"] for r in out.get("train", []) + out.get("sample", [])), None)
    threads = describe_threads(m["threads_choice"]) if m.get("threads_choice") else m["threads"]
    lines.append(f"software: python {m['python']}, torch {m['torch']} ({m['device']}, threads {threads}), "
                 f"transformers {m['transformers']}" + (f" (GPT-2 attention: {attn})" if attn else "")
                 + f", scikit-learn {m['sklearn']}, onnxruntime {m.get('onnxruntime')}")
    k = m.get("kernels")
    if k:
        lines.append(f"kernels: ATen {k['aten']}; fp32 matmul {k['fp32_matmul']}; oneDNN {k['onednn']['isa']} "
                     f"(fp32 {k['onednn']['fp32']}, bf16 {k['onednn']['bf16']}); onnxruntime MLAS fp32 "
                     f"{k['onnxruntime_mlas']['fp32']}, int8 {k['onnxruntime_mlas']['int8']} (derived from the flags)"
                     + (f"; environment {k['env']}" if k.get("env") else ""))
    if m.get("load_average"):
        lines.append(f"load average (1/5/15 min): {m['load_average']} at the start, {m.get('load_average_end')} at the end")
    if out.get("command"):
        lines.append(f"command: {out['command']}   ({out['seconds_total']} s)")
    lines.append("")
    lines.append("| measure | ours | peer | ratio | target | met |")
    lines.append("|---|---:|---:|---:|---|---|")
    for r in out["rows"]:
        met = "" if r["met"] is None else ("yes" if r["met"] else "**no**")
        lines.append(f"| {r['measure']} | {r['ours']} | {r['theirs']} | {r['ratio_text']} | {r['target'] or ''} | {met} |")
    notes = []
    for r in out.get("train", []):
        f = r["first_loss"]
        notes.append(f"length {r['length']}: first-step loss, fp32: ours {f['ours_fp32']:.5f}, HF {f['theirs_fp32']:.5f} "
                     f"(|diff| {abs(f['ours_fp32'] - f['theirs_fp32']):.1e})"
                     + (f"; bf16: ours {f['ours_bf16']:.5f}, HF {f['theirs_bf16']:.5f}" if "ours_bf16" in f else "")
                     + f"; FLOPs per token {r['flops_per_token']['full']:,} (full-square attention, the MFU's count), "
                     f"{r['flops_per_token']['causal']:,} (causal half)")
    if "kmeans" in out:
        k = out["kmeans"]
        notes.append(f"k-means data: {k['features']}; {k['distinct_vectors']} distinct of {k['n']}; "
                     f"{k['rule']}: iterations run, ours {k['iters']['ours']}, scikit-learn {k['iters']['theirs']}")
    if "web" in out:
        w = out["web"]
        notes.append(f"web: {w['checkpoint']} in {w['browser']} with onnxruntime-web {w['onnxruntime_web']}; "
                     f"{w['classify_calls']} classifications and {w['draw_reps']} drawing calls per row, of "
                     f"{'a test image of its data' if w['image'] == 'given' else 'a blank image'}; 2 threads in the "
                     f"browser served with COOP/COEP headers (a plain static host gives the page 1 thread)")
    for r in out.get("train", [])[:1]:
        if r.get("cuda_checks"):
            notes.append("CUDA checks: " + ", ".join(f"{k} {v}" for k, v in r["cuda_checks"].items()))
    for r in out.get("sample", []):
        notes.append(f"{r['key']}: generated {r['generated']['ours']} vs {r['generated']['theirs']}, "
                     f"same tokens: {r['same_tokens']}")
    if notes:
        lines.append("")
        lines += ["- " + n for n in notes]
    return "\n".join(lines)
