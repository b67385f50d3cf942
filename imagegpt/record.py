"""The record: the experiments behind the figures of the README and the docs/ tables, as named parts
that reproduce.py runs, resumes and times.

A part is a list of steps, each a command of this repository (`python train.py ...`, run as a
subprocess from the repository root, its output in the part's log) or a library call, and the result
files those steps write. A part runs in its own folder (runs/record/NAME: data folders, runs, its log),
fresh each time; its result files are written there first and moved into docs/results/ only when every
step has succeeded, each with its provenance and the part's stamp (provenance.record):

    part           the part's name
    code_sha256    the files the part's commands run: the scripts and, transitively, every module of
                   the repository they import, the configs they read, requirements.txt
    settings_sha256  the part's commands and settings, and when the parts it reads from finished
    finished, part_seconds   when the part ended and how long it took (the next estimate)

A part whose result files all carry the current stamp is up to date and skipped (unless forced). With
quick=True every part runs a small version (tiny models, few steps, tiny data) in runs/record-quick/,
its results in runs/record-quick/results/, for tests and CI; the docs are never touched.

The commands of the colour part are in COLOUR (one place, as that path is still changing).
"""
import ast
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field

from tqdm import tqdm

from imagegpt.errors import UserError
from imagegpt.files import lock_folder, read_json, write_json
from imagegpt.provenance import KEY, ROOT, canonical, code_state, record
from imagegpt.stats import seed_summary

RESULTS = "docs/results"          # where the record's result files go (the docs cite them from there)
WORK = "runs/record"              # the parts' folders
QUICK = "runs/record-quick"       # the same for quick runs, results in QUICK/results


# ----------------------------------------------------------------------------- parts and steps

@dataclass(frozen=True)
class Step:
    """One step of a part: a command of this repository (argv: script and arguments, run as `python
    argv...`), or a library call `call(**kwargs)` that writes its result file itself."""
    what: str
    argv: tuple = ()
    call: object = None
    kwargs: dict = field(default_factory=dict)

    def settings(self):
        """What the step does, for the part's settings hash."""
        if self.call is None:
            return [self.what, [str(a) for a in self.argv]]
        return [self.what, f"{self.call.__module__}.{self.call.__name__}", canonical(self.kwargs)]


@dataclass(frozen=True)
class Part:
    """A named experiment: the figures it backs, its estimated time, the result files it writes, its
    steps (a function of the Context), what it runs (for the code hash) and which parts it reads from."""
    name: str
    backs: str
    minutes: float
    results: tuple
    steps: object
    scripts: tuple
    files: tuple = ()         # more files (globs) its results depend on: configs, tests, the README
    modules: tuple = ()       # library modules its calls run
    needs: tuple = ()         # parts whose outputs it reads (kept: paths under their folders it reads)
    keeps: tuple = ()         # paths under this part's folder that the parts needing it read
    quick: bool = True        # has a quick version


class Context:
    """Where a part works: its folder, its staging folder for result files, the other parts' folders,
    and whether this is the quick version. Paths are relative to the repository root (the commands
    run there), so that the commands in the provenance read as typed."""

    def __init__(self, part, quick=False, work=None):
        self.part, self.quick = part, quick
        self.work = work or (QUICK if quick else WORK)
        self.dir = os.path.join(self.work, part.name)
        self.stage = os.path.join(self.dir, "results")

    def path(self, *parts):
        return os.path.join(self.dir, *parts)

    def out(self, name):
        return os.path.join(self.stage, name)

    def of(self, part, *parts):
        """A path in another part's folder."""
        return os.path.join(self.work, part, *parts)

    def pick(self, full, quick):
        return quick if self.quick else full


# tiny settings for the quick versions: a 1-layer GPT 32 wide, one epoch, 16 codes, one moved copy
TINY_MODEL = ("--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--epochs", "1", "--batch_size", "128",
              "--eval_every", "1000")
TINY_CODES = ("--num_codes", "16", "--fit_samples", "3000", "--kmeans_iters", "2")
TINY_COPIES = ("--augment", "1")
FP32 = ("--bf16", "false")        # the record computes in fp32 on every CPU (bf16 is not on every one)


def tiny(ctx, codes=True):
    """The quick version's overrides of a training command (nothing for the full one)."""
    return (*TINY_MODEL, *(TINY_CODES if codes else ()), *TINY_COPIES) if ctx.quick else ()


def seed_dirs(run, first, n):
    """The final checkpoints of `train.py --seeds n` (one seed: the run folder itself holds it)."""
    if n == 1:
        return [os.path.join(run, "final")]
    return [os.path.join(run, f"seed-{first + i}", "final") for i in range(n)]


def trained(ctx, what, argv, run, first, n, eval_out, tta=0, train_out=None, split=(), codes=True):
    """The steps of `train.py ... --seeds n` and `eval.py` over its seeds (and the training summary);
    codes=False: the data are tokenised with another checkpoint's codebook (no codebook settings)."""
    seed = ("--seed", str(first)) if first != 1337 else ()
    steps = [Step(f"train {what}, {n} seed{'s' * (n > 1)}",
                  ("train.py", *argv, *seed, "--seeds", str(n), "--out_dir", run, *FP32, *tiny(ctx, codes))),
             Step(f"evaluate {what}" + (f" (--tta {tta})" if tta else ""),
                  ("eval.py", "--ckpt", *seed_dirs(run, first, n), *split, *(("--tta", str(tta)) if tta else ()),
                   *FP32, "--out", ctx.out(eval_out)))]
    if train_out:
        steps.append(Step(f"collect the training of {what}", call=training_summary,
                          kwargs={"run": run, "out": ctx.out(train_out)}))
    return steps


def demo(ctx):
    n = ctx.pick(3, 2)
    return trained(ctx, "config/demo.yaml", ("config/demo.yaml", "--data_dir", ctx.path("data", "mnist5k-aug6-dev")),
                   ctx.path("demo3"), 1337, n, "demo_test_fp32_seeds1337-1339.json",
                   train_out="demo_train_fp32_seeds1337-1339.json")


def refitted(config, data, name):
    """A configuration refitted on all 4,000 training digits, seeds 1337 to 1342 in two sets of three,
    scored with and without test-time augmentation."""
    def steps(ctx):
        n, out = ctx.pick(3, 2), []
        for first, tag in ((1337, "1337-1339"), (1340, "1340-1342")):
            out += trained(ctx, config, (config, "--dev_fraction", "0", "--data_dir", ctx.path("data", data)),
                           ctx.path(f"runs-{first}"), first, n, f"{name}_refit_test_tta16_seeds{tag}.json",
                           tta=ctx.pick(16, 2), train_out=f"{name}_refit_train_seeds{tag}.json")
        return out
    return steps


def demo14(ctx):
    return trained(ctx, "config/demo.yaml with 14 copies for 2 epochs",
                   ("config/demo.yaml", "--augment", "14", "--epochs", "2", "--dev_fraction", "0",
                    "--data_dir", ctx.path("data", "mnist5k-aug14")),
                   ctx.path("runs"), 1337, ctx.pick(3, 2), "demo_aug14_refit_test_tta16_seeds1337-1339.json",
                   tta=ctx.pick(16, 2), train_out="demo_aug14_refit_train_seeds1337-1339.json")


def baselines(runs):
    """baselines.py runs: [(result file, arguments)]; the first one also saves the judge CNN."""
    def steps(ctx):
        out = []
        for i, (name, args) in enumerate(runs):
            judge = ("--save_judge", ctx.path("judge")) if i == 0 and ctx.part.keeps else ()
            quick = ("--quick", "--seeds", "1", *TINY_COPIES) if ctx.quick else ()
            out.append(Step(f"baselines.py {' '.join(args)}".strip(),
                            ("baselines.py", *args, *judge, *quick, "--out", ctx.out(name))))
        return out
    return steps


def drawing(config, name, n, report):
    """A drawing model (train, evaluate) and its judged report, with the judge of the baselines part."""
    def steps(ctx):
        run, seeds = ctx.path("runs"), ctx.pick(n, min(n, 2))
        tag = "1337-1339" if n > 1 else "1337"
        out = trained(ctx, config, (config, "--data_dir", ctx.path("data", name)), run, 1337, seeds,
                      f"{name}_test_seed{'s' if n > 1 else ''}{tag}.json")
        out.append(Step(f"the drawing report of {config}, seed 1337",
                        ("eval.py", "--ckpt", seed_dirs(run, 1337, seeds)[0], "--generation", "--judge", ctx.of("baselines", "judge"),
                         "--per_class", str(ctx.pick(100, 2)), *(("--scales", "1,3") if ctx.quick else ()),
                         "--out", ctx.out(report))))
        return out
    return steps


def finetune(ctx):
    """docs/results.md "Fine-tuning on other images": the demo model (seed 1337) fine-tuned onto pen
    strokes, 50 and 200 per class, against the same from scratch."""
    start, out, n = ctx.of("demo", "demo3", "seed-1337", "final"), [], ctx.pick(3, 2)
    for per_class, drawn, epochs in ((50, 63, 10), (200, 250, 4)):
        images = ctx.path("data", f"strokes-{per_class}")
        out.append(Step(f"draw {drawn} pen-stroke figures per class",
                        ("data.py", "shapes", images, "--kind", "strokes", "--per_class", str(ctx.pick(drawn, 12)),
                         "--seed", "1")))
        for kind, init in (("tuned", ("--init_from", start)), ("scratch", ())):
            run = ctx.path(f"{kind}-{per_class}")
            out += trained(ctx, f"{kind} on {per_class} per class",
                           ("config/finetune.yaml", "--source", f"folder:{images}", "--data_dir",
                            ctx.path("data", f"strokes-{per_class}-tok"), "--codebook_from", start, *init,
                            "--epochs", str(epochs)),
                           run, 1337, n, f"finetune_strokes{per_class}_{kind}_dev_seeds1337-1339.json",
                           split=("--split", "dev"), codes=False)
    return out


# The colour parts' commands, in one place (docs/results.md "Colour"): {images}, {data}, {run}, {judge}, {out}
# are filled in. The baselines and the judge get the data settings of config/colour.yaml (its codebook and copies).
COLOUR_DATA = ("--image_size", "32", "--channels", "3", "--patch_size", "4", "--num_codes", "1000", "--palette", "128",
               "--w_gradient", "0", "--dev_fraction", "0.1", "--augment", "6", "--permute_colours", "true",
               "--max_rotate", "15")
COLOUR = {
    "images": ("data.py", "shapes", "{images}", "--kind", "colour", "--per_class", "500"),
    "train": ("config/colour.yaml", "--source", "folder:{images}", "--data_dir", "{data}"),
    "baselines": ("baselines.py", "--source", "folder:{images}", *COLOUR_DATA, "--seeds", "3"),
    "judge_images": ("data.py", "shapes", "{judge_images}", "--kind", "colour", "--per_class", "5000", "--seed", "1"),
    "judge": ("baselines.py", "--source", "folder:{judge_images}", *COLOUR_DATA[:10], "--augment", "2",
              "--permute_colours", "true", "--max_rotate", "15", "--dev_fraction", "0.05", "--seeds", "1",
              "--save_judge", "{judge}"),
    "report": ("eval.py", "--ckpt", "{run}/seed-1337/final", "--generation", "--judge", "{judge}", "--per_class", "100"),
}
COLOUR_QUICK = {"images": ("--per_class", "40"), "judge_images": ("--per_class", "40"),
                "train": ("--num_codes", "16", "--palette", "8", "--fit_samples", "3000", "--kmeans_iters", "2"),
                "baselines": ("--quick", "--seeds", "1", "--num_codes", "16", "--palette", "8", *TINY_COPIES),
                "judge": ("--quick", "--num_codes", "16", "--palette", "8", *TINY_COPIES),
                "report": ("--per_class", "2", "--scales", "1,3")}
# the tokenisation table's candidates, on the development split: (result name, config/colour.yaml overrides);
# the ones of 256 to 261 image tokens train for 2 epochs (a third of the recipe's steps) to fit 2 cores
COLOUR_TABLE = (
    ("palette_p4", ()),
    ("palette_p4_nocopies_colour", ("--permute_colours", "false")),
    ("palette_p4_nocopies", ("--augment", "0", "--permute_colours", "false")),
    ("palette_p2_e2", ("--patch_size", "2", "--num_codes", "500", "--epochs", "2")),
    ("patch_p2_k4000_e2", ("--palette", "0", "--patch_size", "2", "--num_codes", "4000", "--permute_colours", "false",
                           "--epochs", "2")),
    ("patch_p2_k4000_colour_e2", ("--palette", "0", "--patch_size", "2", "--num_codes", "4000", "--epochs", "2")),
    ("igpt_16px_k512_e2", ("--palette", "0", "--image_size", "16", "--patch_size", "1", "--num_codes", "512",
                           "--epochs", "2")),
)


def colour_argv(ctx, key, **where):
    return tuple(a.format(**where) for a in COLOUR[key]) + (COLOUR_QUICK.get(key, ()) if ctx.quick else ())


def colour(ctx):
    """config/colour.yaml on the colour shapes over 3 seeds (test split), its tokenisation's report, the
    baselines with the same copies, and its drawings of a chosen class judged by a CNN trained on other,
    generated shapes."""
    where = {"images": ctx.path("data", "shapes-colour"), "data": ctx.path("data", "colour-tok"), "run": ctx.path("gpt"),
             "judge_images": ctx.path("data", "shapes-colour-judge"), "judge": ctx.path("judge")}
    n = ctx.pick(3, 2)
    train = colour_argv(ctx, "train", **where)
    steps = [Step("draw the colour shapes", colour_argv(ctx, "images", **where))]
    steps += trained(ctx, "config/colour.yaml", train, where["run"], 1337, n, "colour_test_seeds1337-1339.json",
                     train_out="colour_train_seeds1337-1339.json", codes=False)
    steps += [Step("collect the tokenisation's report", call=data_report,
                   kwargs={"data": where["data"], "out": ctx.out("colour_data_report.json"),
                           "command": "python train.py " + " ".join(train)}),
              Step("the baselines with the same copies", (*colour_argv(ctx, "baselines", **where),
                                                          "--out", ctx.out("colour_baselines_seeds0-2.json"))),
              Step("draw the judge's shapes (other seeds)", colour_argv(ctx, "judge_images", **where)),
              Step("train the judge CNN", (*colour_argv(ctx, "judge", **where), "--out", ctx.out("colour_judge.json"))),
              Step("the drawing report, seed 1337", (*colour_argv(ctx, "report", **where), *FP32,
                                                     "--out", ctx.out("colour_drawing_report_seed1337.json")))]
    return steps


def colour_table(ctx):
    """The colour tokenisation table: each candidate trained with config/colour.yaml's recipe (seed 1337)
    and scored on the development split, with its data folder's report (PSNR, tokens per image)."""
    images, steps = ctx.of("colour", "data", "shapes-colour"), []
    for name, changes in COLOUR_TABLE:
        run, data = ctx.path(name), ctx.path("data", name)
        argv = ("train.py", "config/colour.yaml", "--source", f"folder:{images}", "--data_dir", data, "--out_dir", run,
                *changes, *FP32, *(COLOUR_QUICK["train"] + TINY_MODEL if ctx.quick else ()))
        steps += [Step(f"train {name}", argv),
                  Step(f"evaluate {name} on the development split",
                       ("eval.py", "--ckpt", os.path.join(run, "final"), "--split", "dev", *FP32,
                        "--out", ctx.out(f"colour_table_{name}_dev.json"))),
                  Step(f"collect {name}'s tokenisation report", call=data_report,
                       kwargs={"data": data, "out": ctx.out(f"colour_table_{name}_data.json"),
                               "command": "python " + " ".join(argv)})]
    return steps


def export(ctx):
    """docs/export.md: the export of the demo model (seed 1337), its parity, each backend's accuracy, and
    the client without torch."""
    ckpt, hf = ctx.of("demo", "demo3", "seed-1337", "final"), ctx.path("hf")
    steps = [Step("export to Hugging Face and ONNX (fp32, int8), check parity",
                  ("hf_export.py", "--ckpt", ckpt, "--out", hf, "--onnx", "--quantize", "int8", "--check",
                   "--json", ctx.out("export_parity.json")))]
    for backend in ("torch", "onnx", "onnx-int8"):
        steps.append(Step(f"evaluate with --backend {backend}",
                          ("eval.py", "--ckpt", ckpt if backend == "torch" else hf, "--backend", backend, *FP32,
                           "--out", ctx.out(f"export_eval_{backend.replace('-', '_')}.json"))))
    steps.append(Step("the client without torch on the test digits", call=client,
                      kwargs={"ckpt": ckpt, "export": hf, "work": ctx.path("client"), "out": ctx.out("export_client.json"),
                              "limit": ctx.pick(0, 40)}))
    return steps


BENCH_TINY = ("--n_layer", "1", "--n_head", "2", "--n_embd", "16", "--block_size", "16", "--vocab_size", "36",
              "--batch", "2", "--lengths", "12,6", "--sample_batches", "1,3", "--new_tokens", "4", "--kmeans_n", "600",
              "--kmeans_k", "6", "--kmeans_iters", "5", "--kmeans_data", "random", "--matmul_n", "64", "--reps", "2",
              "--warmup", "1", "--device", "cpu", "--only", "train,sample,kmeans")


def bench(ctx):
    return [Step("bench.py, one thread", ("bench.py", "--threads", "1", *(BENCH_TINY if ctx.quick else ()),
                                          "--json", ctx.out("bench_cpu.json")))]


def web_bench(ctx):
    return [Step("bench.py --only web", ("bench.py", "--only", "web", "--web_ckpt", ctx.of("demo", "demo3", "seed-1337", "final"),
                                         *(("--quick",) if ctx.quick else ()), "--json", ctx.out("web_bench.json")))]


def loadtest(ctx):
    return [Step("serve.py --loadtest, one model thread",
                 ("serve.py", "--ckpt", ctx.of("demo", "demo3", "seed-1337", "final"), "--loadtest", "--threads", "1",
                  *(("--quick",) if ctx.quick else ()), "--json", ctx.out("loadtest.json")))]


def scale(ctx):
    return [Step("scale.py", ("scale.py", "--work_dir", ctx.path("work"), "--clean",
                              *(("--sizes", "200", "--steps", "2", "--repeats", "1") if ctx.quick else ()),
                              "--json", ctx.out("scale.json")))]


TEST_COMMAND = ("-m", "pytest", "-q", "tests")       # the README's, without the set-up


def tests(ctx):
    argv = ("-m", "pytest", "-q", "tests/test_layout.py", "-k", "relative_link") if ctx.quick else TEST_COMMAND
    return [Step("the test suite", call=run_tests, kwargs={"argv": list(argv), "out": ctx.out("tests.json")})]


def fresh_clone(ctx):
    return [Step("clone, set up and run the README's first command", call=run_fresh_clone,
                 kwargs={"command": readme_first_command(), "work": ctx.path("clone"), "out": ctx.out("fresh_clone.json")})]


TRAIN = ("train.py", "eval.py")
PARTS = [
    Part("demo", "the README's first command (seed 1337) and the demo over 3 seeds (README results, results.md)",
         20, ("demo_test_fp32_seeds1337-1339.json", "demo_train_fp32_seeds1337-1339.json"), demo, TRAIN,
         files=("config/demo.yaml",), keeps=("demo3/seed-1337/final",)),
    Part("demo_refit", "config/demo.yaml refitted on all 4,000 training digits, --tta 16, 6 seeds (README, results.md, "
         "performance.md's time to accuracy)", 30,
         tuple(f"demo_refit_{k}_seeds{t}.json" for t in ("1337-1339", "1340-1342") for k in ("test_tta16", "train")),
         refitted("config/demo.yaml", "mnist5k-aug6", "demo"), TRAIN, files=("config/demo.yaml",)),
    Part("demo14_refit", "the demo with 14 copies for 2 epochs, refitted, --tta 16 (results.md's goals, performance.md)",
         15, ("demo_aug14_refit_test_tta16_seeds1337-1339.json", "demo_aug14_refit_train_seeds1337-1339.json"), demo14,
         TRAIN, files=("config/demo.yaml",)),
    Part("best", "config/best.yaml refitted, with and without --tta 16, 3 and 6 seeds (README, results.md)", 80,
         tuple(f"best_refit_{k}_seeds{t}.json" for t in ("1337-1339", "1340-1342") for k in ("test_tta16", "train")),
         refitted("config/best.yaml", "mnist5k-aug20el15-k1000", "best"), TRAIN, files=("config/best.yaml",)),
    Part("baselines", "the baselines with the demo's 6 copies (results.md's first baselines table); the judge CNN", 10,
         ("baselines_aug6_seeds0-2.json",), baselines([("baselines_aug6_seeds0-2.json", ("--seeds", "3"))]),
         ("baselines.py",), keeps=("judge",)),
    Part("baselines_aug20", "the baselines with 20 copies (results.md's second baselines table)", 12,
         ("baselines_aug20_seeds0-2.json",), baselines([("baselines_aug20_seeds0-2.json", ("--seeds", "3", "--augment", "20"))]),
         ("baselines.py",)),
    Part("baselines_warp", "the baselines with 20 warped copies, seeds 0 to 5 (README's CNN and k-NN rows, results.md)", 25,
         ("baselines_aug20_warp_seeds0-2.json", "baselines_aug20_warp_seeds3-5.json"),
         baselines([("baselines_aug20_warp_seeds0-2.json", ("--seeds", "3", "--augment", "20", "--max_elastic", "1.5")),
                    ("baselines_aug20_warp_seeds3-5.json", ("--seeds", "3", "--first_seed", "3", "--augment", "20",
                                                            "--max_elastic", "1.5"))]), ("baselines.py",)),
    Part("demo_cond", "config/demo_cond.yaml over 3 seeds and its drawing report (drawing.md, results.md)", 25,
         ("demo_cond_test_seeds1337-1339.json", "demo_cond_drawing_report_seed1337.json"),
         drawing("config/demo_cond.yaml", "demo_cond", 3, "demo_cond_drawing_report_seed1337.json"), TRAIN,
         files=("config/demo_cond.yaml",), needs=("baselines",)),
    Part("best_cond", "config/best_cond.yaml, the best drawing model: its test accuracy and drawing report (README, "
         "drawing.md)", 60, ("best_cond_test_seed1337.json", "best_cond_drawing_report.json"),
         drawing("config/best_cond.yaml", "best_cond", 1, "best_cond_drawing_report.json"), TRAIN,
         files=("config/best_cond.yaml",), needs=("baselines",)),
    Part("finetune", "fine-tuning the demo model onto pen strokes against training from scratch (README, results.md)", 30,
         tuple(f"finetune_strokes{n}_{k}_dev_seeds1337-1339.json" for n in (50, 200) for k in ("tuned", "scratch")),
         finetune, ("data.py", *TRAIN), files=("config/finetune.yaml",), needs=("demo",)),
    Part("colour", "config/colour.yaml on the colour shapes over 3 seeds, its PSNR, the baselines with the same copies, "
         "the judged drawings (README, results.md, drawing.md)", 70,
         ("colour_test_seeds1337-1339.json", "colour_train_seeds1337-1339.json", "colour_data_report.json",
          "colour_baselines_seeds0-2.json", "colour_judge.json", "colour_drawing_report_seed1337.json"), colour,
         ("data.py", *TRAIN, "baselines.py"), files=("config/colour.yaml",), keeps=("gpt", "data/shapes-colour")),
    Part("colour_table", "the colour tokenisation table on the development split (results.md)", 150,
         tuple(f"colour_table_{n}_{k}.json" for n, _ in COLOUR_TABLE for k in ("dev", "data")), colour_table,
         TRAIN, files=("config/colour.yaml",), needs=("colour",)),
    Part("export", "the export of the demo model: parity, accuracy per backend, the client without torch (export.md)", 8,
         ("export_parity.json", "export_eval_torch.json", "export_eval_onnx.json", "export_eval_onnx_int8.json",
          "export_client.json"), export, ("hf_export.py", "eval.py"), modules=("imagegpt.client_parity",),
         needs=("demo",)),
    Part("bench", "the benchmark against transformers and scikit-learn (performance.md)", 6, ("bench_cpu.json",), bench,
         ("bench.py",)),
    Part("web_bench", "the page in Chromium against serve.py (performance.md, in the browser)", 3, ("web_bench.json",),
         web_bench, ("bench.py",), files=("static/*", "package-lock.json"), needs=("demo",)),
    Part("loadtest", "the service's load test (service.md)", 3, ("loadtest.json",), loadtest, ("serve.py",),
         files=("static/*",), needs=("demo",)),
    Part("scale", "data at scale, up to a million synthetic digits (scale.md)", 3, ("scale.json",), scale, ("scale.py",)),
    Part("tests", "the README's test count and time", 7, ("tests.json",), tests, (),
         files=("*.py", "imagegpt/*.py", "tests/*.py", "config/*.yaml", "static/*", "package-lock.json",
                "requirements*.txt")),     # not the docs: reproduce.py --tables rewrites them
    Part("fresh_clone", "the README's first command from a fresh clone: set-up, training and total time (README)", 10,
         ("fresh_clone.json",), fresh_clone, ("train.py", "eval.py", "sample.py"), quick=False),
]
BY_NAME = {p.name: p for p in PARTS}


# ----------------------------------------------------------------------------- the library calls of parts

def at(path):
    """A path of the record (relative to the repository root, where its commands run) to open here."""
    return os.path.join(ROOT, path)


def training_summary(run, out):
    """A run folder of `train.py --seeds` -> out: each seed's steps, training seconds and development
    accuracy of final/ (from its log.jsonl and the run's seeds.json), with seeds.json's provenance."""
    seeds = read_json(at(os.path.join(run, "seeds.json")), "seeds.json")
    rows = []
    for r in seeds["runs"]:
        with open(at(os.path.join(r["out_dir"], "log.jsonl")), encoding="utf-8") as f:
            last = json.loads(f.read().splitlines()[-1])
        rows.append({"seed": r["seed"], "steps": last["step"], "training_seconds": round(last["time"], 1),
                     "final_dev_accuracy": r["final_dev_accuracy"]})
    write_json(at(out), {"runs": rows, "training_seconds": seed_summary([r["training_seconds"] for r in rows]),
                     "final_dev_accuracy": seeds["final_dev_accuracy"], KEY: seeds.get(KEY)})


def data_report(data, out, command):
    """A prepared data folder's report.json (what the tokenisation keeps: PSNR, distinct sequences) ->
    out, with the provenance of the command that prepared it."""
    write_json(at(out), {**read_json(at(os.path.join(data, "report.json")), "report.json"), KEY: record(command=command)})


def client(ckpt, export, work, out, limit=0):
    from imagegpt.client_parity import client_parity
    result = client_parity(at(ckpt), at(export), at(work), limit)
    result.update(checkpoint=ckpt, export=export)
    write_json(at(out), {**result, KEY: record(command=f"imagegpt.client_parity.client_parity({ckpt!r}, {export!r}, "
                                                   f"{work!r}, limit={limit})", dtype="onnx fp32")})


def run_tests(argv, out):
    """Run pytest (argv after `python`) -> out: the counts of its summary line, its own seconds, the wall time."""
    t = time.monotonic()
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)
    wall = time.monotonic() - t
    last = (done.stdout.strip().splitlines() or [""])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)", last)}
    seconds = re.search(r" in ([\d.]+)s", last)
    if done.returncode != 0 or not counts.get("passed"):
        raise UserError(f"python {' '.join(argv)}: the tests did not pass ({last or done.stderr.strip()[-200:]})")
    write_json(at(out), {"command": "python " + " ".join(argv), "summary": last, "counts": counts,
                     "tests": sum(counts.get(k, 0) for k in ("passed", "failed", "skipped", "xfailed", "xpassed")),
                     "pytest_seconds": float(seconds.group(1)) if seconds else None, "wall_seconds": round(wall, 1),
                     KEY: record(command="python " + " ".join(argv))})


def readme_first_command():
    """The README's first set-up command (the line that makes the virtual environment and trains the demo)."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("python3 -m venv .venv") and "train.py" in line:
                return line.strip()
    raise UserError("README.md: its first command (python3 -m venv .venv && ... train.py ...) is not there")


def run_fresh_clone(command, work, out):
    """Clone this commit into `work`, and run the README's first command there in bash, timed -> out: the
    total time, the training's time and steps, the accuracy it prints."""
    commit, dirty, _ = code_state()
    work = at(work)
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", "--no-hardlinks", ROOT, work], check=True)
    subprocess.run(["git", "-C", work, "checkout", "-q", "--detach", commit], check=True)
    t = time.monotonic()
    done = subprocess.run(["bash", "-c", command], cwd=work, capture_output=True, text=True)
    wall = time.monotonic() - t
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise UserError(f"{work}: the README's first command failed: {(text.strip().splitlines() or ['?'])[-1]}")
    acc = re.search(r"classification accuracy ([\d.]+) %", text)
    trained = re.search(r"done: (\d+) steps in (\d+) s", text)
    write_json(at(out), {"command": command, "commit": commit, "clone_of_dirty_tree": dirty,
                     "wall_seconds": round(wall, 1), "accuracy_printed": float(acc.group(1)) if acc else None,
                     "training_steps": int(trained.group(1)) if trained else None,
                     "training_seconds": int(trained.group(2)) if trained else None,
                     KEY: record(command=f"cd <fresh clone> && {command}", seeds=[1337])})
    shutil.rmtree(work, ignore_errors=True)


# ----------------------------------------------------------------------------- code and settings of a part

def module_path(name):
    """A module of this repository by dotted name -> its file, or None (not ours)."""
    path = os.path.join(ROOT, *name.split(".")) + ".py"
    if os.path.isfile(path):
        return path
    init = os.path.join(ROOT, *name.split("."), "__init__.py")
    return init if os.path.isfile(init) else None


def imported(path):
    """The modules of this repository that a file imports (anywhere in it, lazy imports included)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return {p for p in map(module_path, names) if p}


def code_files(part):
    """Every file a part's results depend on: its scripts and their imports (transitively), its modules,
    its files (globs), requirements.txt -> sorted paths relative to the repository."""
    todo = [os.path.join(ROOT, s) for s in part.scripts] + [p for p in map(module_path, part.modules) if p]
    seen = set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        todo += imported(path) - seen
    for pattern in (*part.files, "requirements.txt"):
        seen |= {p for p in glob.glob(os.path.join(ROOT, pattern)) if os.path.isfile(p)}
    return sorted(os.path.relpath(p, ROOT) for p in seen)


def digest(obj):
    return hashlib.sha256(json.dumps(canonical(obj), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def code_hash(part):
    def file_hash(rel):
        with open(os.path.join(ROOT, rel), "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    return digest([[rel, file_hash(rel)] for rel in code_files(part)])


def settings_hash(part, ctx, needed):
    """The part's steps and settings, and when the parts it reads from finished (needed: {name: finished})."""
    return digest({"steps": [s.settings() for s in part.steps(ctx)], "quick": ctx.quick,
                   "needs": {n: needed.get(n) for n in part.needs}})


# ----------------------------------------------------------------------------- state of a part's results

def results_dir(quick, work=None):
    return os.path.join(work or (QUICK if quick else WORK), "results") if quick else RESULTS


def stamp_of(path):
    """The record's stamp of a result file, or None (missing, no provenance, not made by the record)."""
    if not os.path.exists(os.path.join(ROOT, path)):
        return None
    try:
        prov = read_json(os.path.join(ROOT, path), "result file").get(KEY)
    except (UserError, AttributeError):
        return None
    return (prov or {}).get("record")


def state(part, ctx, needed):
    """-> (up to date?, why not, the stamp it has): whether every result file carries the current stamp."""
    code = code_hash(part)
    settings = settings_hash(part, ctx, needed)
    folder = results_dir(ctx.quick, ctx.work if ctx.quick else None)
    stamps = [stamp_of(os.path.join(folder, r)) for r in part.results]
    if any(s is None for s in stamps):
        missing = [r for r, s in zip(part.results, stamps) if s is None]
        return False, f"{missing[0]}: no result file made by the record", None
    if any(s.get("part") != part.name or s.get("code_sha256") != code for s in stamps):
        return False, "the code changed", stamps[0]
    if any(s.get("settings_sha256") != settings for s in stamps):
        return False, "the settings changed (or a part it reads from was rerun)", stamps[0]
    return True, "up to date", stamps[0]


def estimate(part, quick=False, work=None):
    """Seconds the part should take: its last run's (any code), else the declared minutes (quick: 30 s)."""
    folder = results_dir(quick, work if quick else None)
    for r in part.results:
        s = stamp_of(os.path.join(folder, r))
        if s and s.get("part_seconds"):
            return float(s["part_seconds"]), "last run"
    return (30.0, "declared") if quick else (part.minutes * 60, "declared")


def human(seconds):
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds % 3600 // 60, seconds % 60
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if s else f"{m} min") if m else f"{s} s"


# ----------------------------------------------------------------------------- running parts

def select(names, quick):
    """Part names -> the parts to consider, in the record's order, with the parts they read from."""
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise UserError(f"{unknown[0]}: no such part; the parts: {', '.join(BY_NAME)}")
    if quick:
        slow = [n for n in names if not BY_NAME[n].quick]
        if slow:
            raise UserError(f"{slow[0]}: has no quick version (it is only run in full)")
    chosen = set(names or (p.name for p in PARTS if p.quick or not quick))
    grow = True
    while grow:
        more = {n for c in chosen for n in BY_NAME[c].needs} - chosen
        chosen |= more
        grow = bool(more)
    return [p for p in PARTS if p.name in chosen]


def run(names=(), quick=False, force=False, log=print, work=None):
    """Run the named parts (all without names) and what they read from, skipping those up to date
    (unless force: then the named ones run again) -> {name: "ran" | "skipped"}."""
    parts = select(list(names), quick)
    named = set(names) if names else {p.name for p in parts}
    work = work or (QUICK if quick else WORK)
    done, needed = {}, {}
    with lock_folder(os.path.join(ROOT, work), "record folder", " (another reproduce.py is running)"):
        for part in parts:
            ctx = Context(part, quick, work)
            fresh, why, stamp = state(part, ctx, needed)
            readers = [p for p in parts if part.name in p.needs]
            kept = all(os.path.exists(os.path.join(ROOT, ctx.path(k))) for k in part.keeps) or not readers
            rerun = (force and part.name in named) or not fresh or not kept or \
                any(done.get(n) == "ran" for n in part.needs)
            if rerun:
                reason = "forced" if force and part.name in named else why if not fresh else \
                    "what it keeps for other parts is gone" if not kept else "a part it reads from ran"
                log(f"{part.name}: runs ({reason}); about {human(estimate(part, quick, work)[0])}")
                done[part.name] = "ran"
                needed[part.name] = run_part(part, ctx, needed, log)
            else:
                log(f"{part.name}: up to date (made {stamp.get('finished')}), skipped")
                done[part.name] = "skipped"
                needed[part.name] = stamp.get("finished")
    return done


def run_part(part, ctx, needed, log):
    """Run one part in a fresh folder; move its result files, stamped, into the results folder only when
    every step succeeded -> when it finished."""
    folder = os.path.join(ROOT, ctx.dir)
    if not os.path.abspath(folder).startswith(os.path.join(ROOT, ctx.work) + os.sep):
        raise UserError(f"{folder}: not inside the record folder {ctx.work}")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(os.path.join(ROOT, ctx.stage))
    code, settings = code_hash(part), settings_hash(part, ctx, needed)
    steps = part.steps(ctx)
    seconds, _ = estimate(part, ctx.quick, ctx.work)
    log_path = os.path.join(folder, "log.txt")
    t0 = time.monotonic()
    bar = tqdm(total=max(1, round(seconds)), desc=part.name, unit="s", leave=True, dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f} of about {total:.0f} s")
    try:
        with open(log_path, "a", encoding="utf-8") as logf:
            for i, step in enumerate(steps, 1):
                bar.set_description_str(f"{part.name} {i}/{len(steps)} ({step.what})")
                logf.write(f"\n=== step {i}/{len(steps)}: {step.what}\n")
                logf.flush()
                if step.call is None:
                    logf.write("$ python " + " ".join(step.argv) + "\n")
                    logf.flush()
                    proc = subprocess.Popen([sys.executable, *step.argv], cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT,
                                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
                    while True:
                        try:
                            rc = proc.wait(timeout=1)
                            break
                        except subprocess.TimeoutExpired:
                            tick(bar, t0)
                        except KeyboardInterrupt:
                            proc.wait()
                            raise
                    if rc != 0:
                        raise UserError(f"part {part.name}: `python {' '.join(step.argv[:2])} ...` ({step.what}) failed "
                                        f"(exit {rc}): {last_line(log_path)}; the log: {log_path}")
                else:
                    try:
                        step.call(**step.kwargs)
                    except UserError as e:
                        raise UserError(f"part {part.name}: {step.what}: {e}") from None
                tick(bar, t0)
    finally:
        bar.close()
    took = round(time.monotonic() - t0, 1)
    finished = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    out_folder = os.path.join(ROOT, results_dir(ctx.quick, ctx.work if ctx.quick else None))
    staged = {}
    for name in part.results:
        path = os.path.join(ROOT, ctx.out(name))
        if not os.path.exists(path):
            raise UserError(f"part {part.name}: its steps did not write {name}; the log: {log_path}")
        result = read_json(path, "result file")
        if not isinstance(result, dict) or not isinstance(result.get(KEY), dict):
            raise UserError(f"{path}: has no provenance; every result file of the record must carry one")
        result[KEY]["record"] = {"part": part.name, "code_sha256": code, "settings_sha256": settings,
                                 "quick": ctx.quick, "finished": finished, "part_seconds": took}
        staged[name] = result
    for name, result in staged.items():
        write_json(os.path.join(out_folder, name), result)
    log(f"{part.name}: done in {human(took)}; wrote {', '.join(part.results)} in {os.path.relpath(out_folder, ROOT)}")
    return finished


def tick(bar, t0):
    elapsed = time.monotonic() - t0
    if elapsed >= bar.total:
        bar.total = int(elapsed) + 1
    bar.n = int(elapsed)
    bar.refresh()


def last_line(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = [ln.strip() for ln in f.read().replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "no output"


def listing(quick=False, work=None):
    """One row per part: (name, estimated seconds, where the estimate comes from, its state, its result
    files, the figures it backs)."""
    rows, needed = [], {}
    work = work or (QUICK if quick else WORK)
    for part in PARTS:
        if quick and not part.quick:
            continue
        ctx = Context(part, quick, work)
        fresh, why, stamp = state(part, ctx, needed)
        needed[part.name] = stamp.get("finished") if stamp else None
        seconds, source = estimate(part, quick, work)
        rows.append((part.name, seconds, source, why, part.results, part.backs))
    return rows

