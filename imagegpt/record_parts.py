"""The record's parts: the experiments behind the figures of the README and the docs/ tables, each a named
list of steps (a command of this repository or a library call of imagegpt/record_calls.py) and the result
files they write; imagegpt/record.py runs them."""
import os
from dataclasses import dataclass, field

from imagegpt.provenance import canonical
from imagegpt.record_calls import client, data_report, readme_first_command, run_fresh_clone, run_tests, training_summary


@dataclass(frozen=True)
class Step:
    """One step of a part: a command of this repository (argv: script and arguments, run as `python
    argv...`), or a library call `call(**kwargs)` that writes its result file itself."""
    what: str
    argv: tuple = ()
    call: object = None
    kwargs: dict = field(default_factory=dict)
    env: tuple = ()           # (name, value) pairs set for the command, e.g. the kernels' ISA capped

    def settings(self):
        """What the step does, for the part's settings hash."""
        if self.call is None:
            return [self.what, [str(a) for a in self.argv]] + ([[list(e) for e in self.env]] if self.env else [])
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
    bf16: str = "false"       # --bf16 of its training and evaluation: the record computes in fp32 unless told



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


def trained(ctx, what, argv, runs, eval_out, evaluate=(), train_out=None, codes=True):
    """The steps of `train.py ... --seeds n` and `eval.py` over its seeds (and the training summary), at the
    part's precision: runs = (the run folder, the first seed, n); evaluate: eval.py's further options (--tta K,
    --split dev); codes=False: the data are tokenised with another checkpoint's codebook (no codebook settings)."""
    precision = ("--bf16", ctx.part.bf16)
    run, first, n = runs
    seed = ("--seed", str(first)) if first != 1337 else ()
    steps = [Step(f"train {what}, {n} seed{'s' * (n > 1)}",
                  ("train.py", *argv, *seed, "--seeds", str(n), "--out_dir", run, *precision, *tiny(ctx, codes))),
             Step(f"evaluate {what}" + (f" ({' '.join(evaluate)})" if evaluate else ""),
                  ("eval.py", "--ckpt", *seed_dirs(run, first, n), *evaluate, *precision, "--out", ctx.out(eval_out)))]
    if train_out:
        steps.append(Step(f"collect the training of {what}", call=training_summary,
                          kwargs={"run": run, "out": ctx.out(train_out)}))
    return steps


def demo(ctx):
    n = ctx.pick(3, 2)
    return trained(ctx, "config/demo.yaml", ("config/demo.yaml", "--data_dir", ctx.path("data", "mnist5k-aug6-dev")),
                   (ctx.path("demo3"), 1337, n), "demo_test_fp32_seeds1337-1339.json",
                   train_out="demo_train_fp32_seeds1337-1339.json")


def refitted(config, data, name):
    """A configuration refitted on all 4,000 training digits, seeds 1337 to 1342 in two sets of three,
    scored with and without test-time augmentation."""
    def steps(ctx):
        n, out = ctx.pick(3, 2), []
        for first, tag in ((1337, "1337-1339"), (1340, "1340-1342")):
            out += trained(ctx, config, (config, "--dev_fraction", "0", "--data_dir", ctx.path("data", data)),
                           (ctx.path(f"runs-{first}"), first, n), f"{name}_refit_test_tta16_seeds{tag}.json",
                           ("--tta", str(ctx.pick(16, 2))), train_out=f"{name}_refit_train_seeds{tag}.json")
        return out
    return steps


def demo_default(ctx):
    """The refitted demo at the default precision (`--bf16 auto`: bf16 where the CPU computes it natively),
    3 seeds: the time to accuracy as a user of this CPU meets it."""
    return trained(ctx, "config/demo.yaml refitted, at the default precision",
                   ("config/demo.yaml", "--dev_fraction", "0", "--data_dir", ctx.path("data", "mnist5k-aug6")),
                   (ctx.path("runs"), 1337, ctx.pick(3, 2)), "demo_refit_default_test_tta16_seeds1337-1339.json",
                   ("--tta", str(ctx.pick(16, 2))), train_out="demo_refit_default_train_seeds1337-1339.json")


def demo14(ctx):
    return trained(ctx, "config/demo.yaml with 14 copies for 2 epochs",
                   ("config/demo.yaml", "--augment", "14", "--epochs", "2", "--dev_fraction", "0",
                    "--data_dir", ctx.path("data", "mnist5k-aug14")),
                   (ctx.path("runs"), 1337, ctx.pick(3, 2)), "demo_aug14_refit_test_tta16_seeds1337-1339.json",
                   ("--tta", str(ctx.pick(16, 2))), train_out="demo_aug14_refit_train_seeds1337-1339.json")


def tokenisation(ctx):
    """docs/data.md's tokenisation table: each patch size and feature setting, fitted and measured on the
    development split (baselines.py --tokenisation)."""
    return [Step("baselines.py --tokenisation", ("baselines.py", "--tokenisation", *(("--quick",) if ctx.quick else ()),
                                                 "--out", ctx.out("tokenisation.json")))]


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
        out = trained(ctx, config, (config, "--data_dir", ctx.path("data", name)), (run, 1337, seeds),
                      f"{name}_test_seed{'s' if n > 1 else ''}{tag}.json")
        out.append(Step(f"the drawing report of {config}, seed 1337",
                        ("eval.py", "generation", "--ckpt", seed_dirs(run, 1337, seeds)[0], "--judge", ctx.of("baselines", "judge"),
                         "--per_class", str(ctx.pick(100, 2)), *(("--scales", "1,3") if ctx.quick else ()),
                         "--out", ctx.out(report))))
        return out
    return steps


FINETUNE = ((50, 63, 10), (200, 250, 4))     # pen strokes: training images per class, drawn per class, epochs


def finetune(ctx):
    """docs/results.md "Fine-tuning on other images": the demo model (seed 1337) fine-tuned onto pen
    strokes, 50 and 200 per class, against the same from scratch."""
    start, out, n = ctx.of("demo", "demo3", "seed-1337", "final"), [], ctx.pick(3, 2)
    for per_class, drawn, epochs in FINETUNE:
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
                           (run, 1337, n), f"finetune_strokes{per_class}_{kind}_dev_seeds1337-1339.json",
                           ("--split", "dev"), codes=False)
    return out


# The colour parts' commands, in one place (docs/results.md "Colour"): {images}, {data}, {run}, {judge}, {out}
# are filled in. The baselines and the judge get the data settings of config/colour.yaml (its codebook and copies).
COLOUR_DATA = ("--image_size", "32", "--channels", "3", "--patch_size", "4", "--num_codes", "1000", "--palette", "128",
               "--w_gradient", "0", "--dev_fraction", "0.1", "--augment", "6", "--permute_colours", "true",
               "--max_rotate", "15")
REPORT_SIZE = ("--per_class", "100")      # drawings per class and scale of the colour drawing reports
COLOUR = {
    "images": ("data.py", "shapes", "{images}", "--kind", "colour", "--per_class", "500"),
    "train": ("config/colour.yaml", "--source", "folder:{images}", "--data_dir", "{data}"),
    "baselines": ("baselines.py", "--source", "folder:{images}", *COLOUR_DATA, "--seeds", "3"),
    "judge_images": ("data.py", "shapes", "{judge_images}", "--kind", "colour", "--per_class", "5000", "--seed", "1"),
    "judge": ("baselines.py", "--source", "folder:{judge_images}", *COLOUR_DATA[:10], "--augment", "2",
              "--permute_colours", "true", "--max_rotate", "15", "--dev_fraction", "0.05", "--seeds", "1",
              "--save_judge", "{judge}"),
    "report": ("eval.py", "generation", "--ckpt", "{run}/seed-1337/final", "--judge", "{judge}", *REPORT_SIZE),
}
COLOUR_QUICK = {"images": ("--per_class", "40"), "judge_images": ("--per_class", "40"),
                "train": ("--num_codes", "16", "--palette", "8", "--fit_samples", "3000", "--kmeans_iters", "2"),
                "baselines": ("--quick", "--seeds", "1", "--num_codes", "16", "--palette", "8", *TINY_COPIES),
                "judge": ("--quick", "--num_codes", "16", "--palette", "8", *TINY_COPIES),
                "report": ("--per_class", "2", "--scales", "1,3")}
# the tokenisation table's candidates, on the development split: (result name, config/colour.yaml overrides);
# the recipe's row is the colour part's seed-1337 model; the ones of 256 to 261 image tokens train for 1 epoch
# (a sixth of the recipe's steps, each about 4x as long: two thirds of its compute) to fit 2 cores
COLOUR_TABLE = (
    ("palette_p4", None),
    ("palette_p4_nocopies_colour", ("--permute_colours", "false")),
    ("palette_p4_nocopies", ("--augment", "0", "--permute_colours", "false")),
    ("palette_p2_e1", ("--patch_size", "2", "--num_codes", "500", "--epochs", "1")),
    ("patch_p2_k4000_e1", ("--palette", "0", "--patch_size", "2", "--num_codes", "4000", "--permute_colours", "false",
                           "--epochs", "1")),
    ("patch_p2_k4000_colour_e1", ("--palette", "0", "--patch_size", "2", "--num_codes", "4000", "--epochs", "1")),
    ("igpt_16px_k512_e1", ("--palette", "0", "--image_size", "16", "--patch_size", "1", "--num_codes", "512",
                           "--epochs", "1")),
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
    steps += trained(ctx, "config/colour.yaml", train, (where["run"], 1337, n), "colour_test_seeds1337-1339.json",
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


def colour_draw(ctx):
    """The colour drawing setting chosen on the development split: config/colour.yaml with class-conditioned
    copies of every training sequence (--cond_fraction 1.0), seed 1337, on the colour part's data; its test
    accuracy and its drawings judged by the colour part's judge."""
    images, data, run = ctx.of("colour", "data", "shapes-colour"), ctx.of("colour", "data", "colour-tok"), ctx.path("gpt")
    quick = COLOUR_QUICK["train"] + TINY_MODEL if ctx.quick else ()
    return [Step("train config/colour.yaml --cond_fraction 1.0",
                 ("train.py", *colour_argv(ctx, "train", images=images, data=data), "--out_dir", run,
                  "--cond_fraction", "1.0", *FP32, *quick)),
            Step("evaluate it on the test split", ("eval.py", "--ckpt", os.path.join(run, "final"), *FP32,
                                                   "--out", ctx.out("colour_draw_test_seed1337.json"))),
            Step("its drawing report", ("eval.py", "generation", "--ckpt", os.path.join(run, "final"), "--judge",
                                        ctx.of("colour", "judge"), *REPORT_SIZE, *FP32,
                                        *(COLOUR_QUICK["report"] if ctx.quick else ()),
                                        "--out", ctx.out("colour_draw_report_seed1337.json")))]


def colour_table(ctx):
    """The colour tokenisation table: each candidate trained with config/colour.yaml's recipe and its changes
    (seed 1337) and scored on the development split, with its data folder's report (PSNR, tokens per image).
    The recipe itself is the colour part's seed-1337 run, read from its folder."""
    images, steps = ctx.of("colour", "data", "shapes-colour"), []
    for name, changes in COLOUR_TABLE:
        if changes is None:
            run, data = ctx.of("colour", "gpt", "seed-1337"), ctx.of("colour", "data", "colour-tok")
            argv = ("train.py", *colour_argv(ctx, "train", images=images, data=data), "--seeds", str(ctx.pick(3, 2)),
                    "--out_dir", ctx.of("colour", "gpt"), *FP32)
        else:
            run, data = ctx.path(name), ctx.path("data", name)
            argv = ("train.py", "config/colour.yaml", "--source", f"folder:{images}", "--data_dir", data, "--out_dir",
                    run, *changes, *FP32, *(COLOUR_QUICK["train"] + TINY_MODEL if ctx.quick else ()))
            steps.append(Step(f"train {name}", argv))
        steps += [Step(f"evaluate {name} on the development split",
                       ("eval.py", "--ckpt", os.path.join(run, "final"), "--split", "dev", *FP32,
                        "--out", ctx.out(f"colour_table_{name}_dev.json"))),
                  Step(f"collect {name}'s tokenisation report", call=data_report,
                       kwargs={"data": data, "out": ctx.out(f"colour_table_{name}_data.json"),
                               "command": "python " + " ".join(argv), "run": run})]
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


AVX2 = (("ATEN_CPU_CAPABILITY", "avx2"), ("ONEDNN_MAX_CPU_ISA", "AVX2"))   # torch's and oneDNN's kernels capped


def bench(ctx):
    """The benchmark at one thread, the CPU as it is and its kernels capped to AVX2, and the threads table."""
    tiny = BENCH_TINY if ctx.quick else ()
    return [Step("bench.py, one thread", ("bench.py", "--threads", "1", *tiny, "--json", ctx.out("bench_cpu.json"))),
            Step("bench.py, one thread, kernels capped to AVX2", ("bench.py", "--threads", "1", *tiny, "--json",
                                                                  ctx.out("bench_cpu_avx2.json")), env=AVX2),
            Step("bench.py --only threads", ("bench.py", "--only", "threads", *(("--quick",) if ctx.quick else ()),
                                             "--json", ctx.out("bench_threads.json")))]


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
    Part("demo_refit_default", "the refitted demo at the default precision (bf16 where the CPU has it), --tta 16, "
         "3 seeds (performance.md's time to accuracy)", 10,
         ("demo_refit_default_test_tta16_seeds1337-1339.json", "demo_refit_default_train_seeds1337-1339.json"),
         demo_default, TRAIN, files=("config/demo.yaml",), bf16="auto"),
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
    Part("tokenisation", "the tokenisation table: each patch size and feature setting on the development split "
         "(data.md)", 1, ("tokenisation.json",), tokenisation, ("baselines.py",)),
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
         ("data.py", *TRAIN, "baselines.py"), files=("config/colour.yaml",), keeps=("gpt", "data/shapes-colour", "data/colour-tok", "judge")),
    Part("colour_draw", "the colour drawing setting (--cond_fraction 1.0): its test accuracy and judged drawings "
         "(README, drawing.md)", 15, ("colour_draw_test_seed1337.json", "colour_draw_report_seed1337.json"), colour_draw,
         TRAIN, files=("config/colour.yaml",), needs=("colour",)),
    Part("colour_table", "the colour tokenisation table on the development split (results.md)", 45,
         tuple(f"colour_table_{n}_{k}.json" for n, _ in COLOUR_TABLE for k in ("dev", "data")), colour_table,
         TRAIN, files=("config/colour.yaml",), needs=("colour",)),
    Part("export", "the export of the demo model: parity, accuracy per backend, the client without torch (export.md)", 8,
         ("export_parity.json", "export_eval_torch.json", "export_eval_onnx.json", "export_eval_onnx_int8.json",
          "export_client.json"), export, ("hf_export.py", "eval.py"), modules=("imagegpt.client_parity",),
         needs=("demo",)),
    Part("bench", "the benchmark against transformers and scikit-learn, also with AVX2 kernels, and the threads "
         "table (performance.md)", 15, ("bench_cpu.json", "bench_cpu_avx2.json", "bench_threads.json"), bench,
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
