"""The threads table of the benchmark (bench.py --only threads): milliseconds per call of the demo-sized
GPT's work beside other jobs, at torch's default threads (every core: what the commands ran with before
device.use_threads), at one thread, and at the count the commands choose now (device.choose_threads,
"auto", picked after the other job started, as a command starting beside it would).

    measure(default_threads, jobs=("idle", "busy", "torch", "numpy"), reps=10) -> {"rows": [...], ...}

Work timed, the model of config/demo.yaml (4 layers x 4 heads x 128 wide, 516 tokens):
    train     one training step (forward, loss, backward, AdamW step) on a batch of 32 rows of 54 tokens,
              in train.py's default precision (--bf16 auto)
    classify  the service's classification of one image: class probabilities of its 52-token prefix
    draw      the service's drawing of one image: 53 tokens after <IMG>, greedy, through the KV cache
Other jobs, each a process of its own started before the timing and stopped after it:
    idle      none
    busy      a Python busy loop (one CPU)
    torch     another torch job at its default threads: 384 x 384 matrix products in a loop
    numpy     a numpy job at its BLAS's default threads: 384 x 384 matrix products in a loop
The thread counts take turns call by call (the order reversed every round), so that the drift of a
shared machine falls on all of them alike; medians are reported. Where the chosen count is the default's or
one, it is that very setting, timed once and reported under both names ("auto_is").
"""
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from imagegpt.checkpoint import Checkpoint
from imagegpt.decoding import generate
from imagegpt.device import bf16_autocast, choose_threads
from imagegpt.draw_settings import DrawSettings
from imagegpt.metrics import class_probs
from imagegpt.token_format import Vocab
from model import GPT, GPTConfig

JOBS = {
    "idle": ("idle", None),
    "busy": ("beside a Python busy loop", "while True:\n    pass"),
    "torch": ("beside another torch job (its default threads)",
              "import torch\na = torch.randn(384, 384)\nwhile True:\n    (a @ a).relu_()"),
    "numpy": ("beside a numpy job (its default threads)",
              "import numpy as np\na = np.random.rand(384, 384)\nwhile True:\n    a @ a"),
}

WORK = {"train": "training step, batch 32 x 54 tokens", "classify": "classification of one image",
        "draw": "drawing of one image (53 tokens, greedy)"}


def demo_work(seed=0):
    """name -> a call of the demo-sized GPT's work (WORK), on random weights and data."""
    torch.manual_seed(seed)
    vocab = Vocab(500, 10)
    cfg = GPTConfig(vocab_size=len(vocab), block_size=54, n_layer=4, n_head=4, n_embd=128)
    model = GPT(cfg)
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(len(vocab), (32, 54), generator=g)
    x, y = seq[:, :-1], seq[:, 1:]
    prefix = [vocab.prefix_ids(torch.randint(vocab.num_codes, (49,), generator=g).tolist())]

    def train():
        model.train()
        with bf16_autocast("auto", "cpu"):
            logits, _ = model(x)
        F.cross_entropy(logits.float().transpose(1, 2), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ck = Checkpoint(model, vocab, None)   # no codebook: random prefixes, no drawing held to the format
    greedy = DrawSettings(greedy=True, max_new_tokens=53)

    def classify():
        class_probs(ck, prefix, batch_size=1)

    def draw():
        with bf16_autocast("auto", "cpu", decode_width=cfg.n_embd):
            generate(ck, [[vocab.img_id]], greedy, stop_at_eos=False)

    return {"train": train, "classify": classify, "draw": draw}


class Job:
    """Another job in a process of its own (a context manager: started on entry, stopped on exit)."""

    def __init__(self, code):
        self.code, self.proc = code, None

    def __enter__(self):
        if self.code:
            self.proc = subprocess.Popen([sys.executable, "-c", self.code], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        return self

    def __exit__(self, *exc):
        if self.proc:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def measure(default_threads, jobs=tuple(JOBS), work=tuple(WORK), reps=10, settle=1.0, log=print):
    """Time each of `work` at the default, one and the auto thread count, idle and beside each of `jobs`
    -> {"default_threads", "reps", "rows": [{"job", "work", "threads": {mode: n}, "ms": {mode: median},
    "raw_ms", "auto": what choose_threads saw}]}. The caller's torch threads are restored."""
    fns = demo_work()
    before = torch.get_num_threads()
    rows = []
    try:
        for fn in fns.values():       # warm-up, before any other job runs
            fn()
        for job in jobs:
            what, code = JOBS[job]
            with Job(code):
                time.sleep(settle if code else 0)
                auto, why = choose_threads()
                counts = {"default": default_threads, "one": 1, "auto": auto}
                same = next((m for m in ("default", "one") if counts[m] == auto), None)
                timed = [m for m in counts if not (m == "auto" and same)]
                log(f"[threads] {what}: auto chose {auto} (other processes use {why['others']} CPUs)")
                for w in work:
                    raw = {m: [] for m in timed}
                    for r in range(reps + 1):          # the first round is a warm-up at each count
                        for m in (timed if r % 2 == 0 else timed[::-1]):
                            torch.set_num_threads(counts[m])
                            t = time.perf_counter()
                            fns[w]()
                            if r:
                                raw[m].append(1000 * (time.perf_counter() - t))
                    if same:
                        raw["auto"] = raw[same]
                    ms = {m: statistics.median(v) for m, v in raw.items()}
                    log(f"[threads]   {WORK[w]}: " + ", ".join(f"{m} ({counts[m]}) {ms[m]:.1f} ms" for m in counts))
                    rows.append({"job": job, "where": what, "work": w, "threads": counts, "ms": ms, "raw_ms": raw,
                                 "auto": why, "auto_is": same})
    finally:
        torch.set_num_threads(before)
    return {"default_threads": default_threads, "reps": reps, "rows": rows}
