"""Data at scale: synthetic digits made from the built-in 5,000 by random shifts and rotations, written as
an MNIST IDX source, prepared at several sizes; measured: prepare's throughput (images tokenised per
second, and the share of the time spent reading images), prepare's end-to-end wall time, and for the
training process started on each prepared folder its peak memory (RSS) over a fixed number of steps and
its time from process start to the first step.

    python scale.py                                  # 10,000 and 1,000,000 images -> runs/scale/scale.json
    python scale.py --sizes 2000,20000 --steps 5     # a quick look

Every measured command is a real subprocess: `python data.py prepare --source idx:DIR ...` (with
OMP_NUM_THREADS=1: its k-means on one thread, its tokenising one process per core) and
`python train.py ... --eval_every 1` (the demo model: 4 layers x 128, batch 32; each step writes a log
line, the first one timing the first step; after --steps steps the run is interrupted with Ctrl-C, as a
user would; --repeats starts per size, medians reported). The synthetic images and prepared folders are kept in --work_dir (about 1.5 GB for a
million images) unless --clean.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

from imagegpt.augment import copy_params, transform
from imagegpt.cli import parser, run_cli
from imagegpt.data_config import DataConfig
from imagegpt.errors import UserError
from imagegpt.files import check_dir, check_file
from imagegpt.provenance import write_result
from imagegpt.scale_report import table
from imagegpt.measure import status_kb
from imagegpt.sources import load_builtin, write_idx
from tokenizer import uint8_to_tensor

ROOT = os.path.dirname(os.path.abspath(__file__))
MODEL = ["--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--batch_size", "32", "--lr", "1e-3",
         "--warmup_steps", "10", "--epochs", "1", "--device", "cpu", "--bf16", "false"]


def make_source(folder, n, seed=0, chunk=8192):
    """n digits drawn from the built-in 5,000, each shifted (up to 3 px) and rotated (up to 15 degrees) at
    random, as folder/train-images-idx3-ubyte and train-labels-idx1-ubyte."""
    images, labels, _, _ = load_builtin()
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(images), n)
    moves = copy_params(n, 1, DataConfig(max_shift=3.0, max_rotate=15.0), seed)[0]

    def chunks():
        for i in tqdm(range(0, n, chunk), desc=f"making {n:,} images", leave=False):
            j = slice(i, min(i + chunk, n))
            yield (transform(uint8_to_tensor(images[pick[j]]), moves[j]) * 255).round().clamp(0, 255).byte().numpy()
    write_idx(folder, labels[pick], chunks())


def peak_rss(pid):
    """The peak resident memory of a running process (VmHWM), in MiB."""
    return status_kb("VmHWM", pid) / 1024


def train_probe(src, data_dir, out_dir, steps, log):
    """Start train.py on a prepared folder; -> seconds from its start to the first logged step, of which
    before the training loop (interpreter, imports, opening the data, building the model), and its peak
    RSS after `steps` steps (MiB); then stop it with Ctrl-C."""
    shutil.rmtree(out_dir, ignore_errors=True)
    args = [sys.executable, "train.py", "--source", f"idx:{src}", "--data_dir", data_dir, "--dev_fraction", "0",
            "--out_dir", out_dir, "--eval_every", "1"] + MODEL
    path = os.path.join(out_dir, "log.jsonl")
    lines = lambda: open(path).read().count("\n") if os.path.exists(path) else 0
    t0 = time.time()
    p = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    try:
        while lines() < steps:
            if p.poll() is not None:
                raise UserError(f"train.py on {data_dir} ended early: {p.stderr.read()[-500:]}")
            if first is None and lines() >= 1:
                first = time.time() - t0
            time.sleep(0.01)
        rss = peak_rss(p.pid)
        p.send_signal(signal.SIGINT)
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    with open(path) as f:
        in_loop = json.loads(f.readline())["time"]   # from the loop's start to the first log line
    log(f"  train.py: first step after {first:.2f} s ({first - in_loop:.2f} s before the loop), peak RSS "
        f"{rss:.0f} MiB after {steps} steps")
    return first, first - in_loop, rss


def measure(n, work, steps, repeats, log):
    src, data_dir = os.path.join(work, f"src-{n}"), os.path.join(work, f"data-{n}")
    if not os.path.exists(os.path.join(src, "train-labels-idx1-ubyte")):
        make_source(src, n)
    shutil.rmtree(data_dir, ignore_errors=True)
    load = os.getloadavg()[0]
    t0 = time.time()
    # one torch thread in prepare's main process (its k-means): the tokenising runs one process per core
    # anyway, and on a shared machine two threads that wait for each other made the fit 3 to 10x slower
    r = subprocess.run([sys.executable, "data.py", "prepare", "--source", f"idx:{src}", "--data_dir", data_dir,
                        "--dev_fraction", "0"], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.time() - t0
    if r.returncode:
        raise UserError(f"data.py prepare on {src} failed: {r.stderr.strip()[-500:]}")
    with open(os.path.join(data_dir, "report.json")) as f:
        rep = json.load(f)
    log(f"{n:,} images: prepared in {wall:.1f} s ({rep['images_per_second']:,} images/s tokenised, reading "
        f"{100 * rep['read_share']:.1f} %, k-means {rep['seconds_fit']} s; load average {load:.2f})")
    probes = [train_probe(src, data_dir, os.path.join(work, f"run-{n}"), steps, log) for _ in range(repeats)]
    first, start, rss = (float(np.median(v)) for v in zip(*probes))
    return {"images": n, "train_images": sum(rep["counts"]["train"]), "prepare_seconds": round(wall, 1),
            "images_per_second": rep["images_per_second"], "tokenise_processes": rep["tokenise_processes"],
            "read_share": rep["read_share"], "seconds_fit": rep["seconds_fit"], "seconds_tokenise": rep["seconds_tokenise"],
            "seconds_prepare_report": rep["seconds_total"], "first_step_seconds": round(first, 2),
            "before_loop_seconds": round(start, 2), "probes": [[round(v, 2) for v in p] for p in probes],
            "peak_rss_mib": round(rss, 1), "load_average_before": round(load, 2)}


def build_parser():
    ap = parser(__doc__, prog="scale.py")
    ap.add_argument("--sizes", default="10000,1000000", help="numbers of images, comma-separated (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=20, help="training steps before the peak RSS is read (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="training starts per size; the median is reported "
                    "(default: %(default)s)")
    ap.add_argument("--work_dir", default="runs/scale", help="synthetic sources, prepared folders, runs (default: %(default)s)")
    ap.add_argument("--json", default="", help="write the results here (default: WORK_DIR/scale.json)")
    ap.add_argument("--clean", action="store_true", help="delete the synthetic data and prepared folders afterwards")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        raise UserError(f"--sizes: expected comma-separated whole numbers, got {args.sizes!r}") from None
    if not sizes or min(sizes) < 100 or max(sizes) >= 1 << 32:
        raise UserError(f"--sizes: each must be in 100 .. {(1 << 32) - 1}, got {args.sizes}")
    if args.steps < 1 or args.repeats < 1:
        raise UserError(f"--steps and --repeats must be at least 1, got {args.steps} and {args.repeats}")
    out = args.json or os.path.join(args.work_dir, "scale.json")
    check_dir(args.work_dir, "work folder (--work_dir)")
    check_file(out, "results (--json)")
    t0 = time.time()
    rows = [measure(n, args.work_dir, args.steps, args.repeats, print) for n in sizes]
    result = {"command": "python scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "rows": rows,
              "seconds_total": round(time.time() - t0, 1)}
    write_result(out, result, command=result["command"], config=args, dtype="fp32")
    print(table(rows, args.steps))
    print(f"wrote {out}")
    if args.clean:
        for n in sizes:
            for d in (f"src-{n}", f"data-{n}"):
                shutil.rmtree(os.path.join(args.work_dir, d), ignore_errors=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
