"""docs/results.md's generated tables and figures (and the conditioned demo's cost in docs/drawing.md): the
summary, the configurations, the refitted demo trained longer, fine-tuning, the baselines, colour; each from
the result files of the record's parts (imagegpt/record_parts.py)."""
from imagegpt.provenance import KEY
from imagegpt.record_parts import FINETUNE
from imagegpt.table_text import figure, markdown, num, pct, seeds, spread

DEMO3 = ["demo_test_fp32_seeds1337-1339.json"]
DEMO_REFIT = ["demo_refit_test_tta16_seeds1337-1339.json", "demo_refit_test_tta16_seeds1340-1342.json"]
DEMO_REFIT_TRAIN = ["demo_refit_train_seeds1337-1339.json", "demo_refit_train_seeds1340-1342.json"]
BEST = ["best_refit_test_tta16_seeds1337-1339.json", "best_refit_test_tta16_seeds1340-1342.json"]
WARP = ["baselines_aug20_warp_seeds0-2.json", "baselines_aug20_warp_seeds3-5.json"]
DEMO14 = ["demo_aug14_refit_test_tta16_seeds1337-1339.json"]
DEMO_COND = ["demo_cond_test_seeds1337-1339.json"]
FINETUNE50 = ["finetune_strokes50_tuned_dev_seeds1337-1339.json", "finetune_strokes50_scratch_dev_seeds1337-1339.json"]
COLOUR = ["colour_test_seeds1337-1339.json"]
COLOUR_BASE = ["colour_baselines_seeds0-2.json"]
COLOUR_DATA = "colour_data_report.json"


def results_summary(r):
    """docs/results.md's summary table."""
    f = lambda make: figure(r, make)
    rows = [
        ("`config/best.yaml` (6 layers, 20 warped copies, 1,000 codes), refitted on all 4,000 training digits, "
         "`eval.py --tta 16`",
         f"**{f(lambda: spread(r.per_checkpoint(BEST[:1], 'tta.accuracy')))}** "
         f"(six seeds: {f(lambda: spread(r.per_checkpoint(BEST, 'tta.accuracy')))})",
         "1337 to 1339 (1337 to 1342)",
         "`python reproduce.py best`: `python train.py config/best.yaml --dev_fraction 0 --data_dir "
         "data/mnist5k-aug20el15-k1000 --out_dir runs/best_all --seeds 3 --bf16 false` (and `--seed 1340`), then "
         "`python eval.py --ckpt runs/best_all/seed-*/final --tta 16`",
         "[Refitted](#refitted-on-all-4000-training-digits)"),
        (f"`config/demo.yaml` refitted on all 4,000 training digits ({train_time(r, DEMO_REFIT_TRAIN)} of training), "
         "`eval.py --tta 16`", f(lambda: spread(r.per_checkpoint(DEMO_REFIT, "tta.accuracy"))), "1337 to 1342",
         "`python reproduce.py demo_refit`: `python train.py config/demo.yaml --dev_fraction 0 --data_dir "
         "data/mnist5k-aug6 --out_dir runs/demo_all --seeds 3 --bf16 false` (and `--seed 1340`), then "
         "`python eval.py --ckpt runs/demo_all/seed-*/final --tta 16`",
         "[Refitted](#refitted-on-all-4000-training-digits)"),
        ("`config/demo.yaml`, the first command's configuration (3,600 training digits, `final/`, no test-time "
         "augmentation), fp32",
         f"{f(lambda: spread(r.per_checkpoint(DEMO3)))} (seed 1337, the first command: "
         f"{f(lambda: pct(r.per_checkpoint(DEMO3)['values'][0], 1))})", "1337 to 1339",
         "`python train.py config/demo.yaml --seeds 3 --out_dir runs/demo3`, then `python eval.py --ckpt "
         "runs/demo3/seed-*/final`", "[The configurations](#the-configurations)"),
        ("LeNet-5-like CNN with the same warped copies (`baselines.py`)",
         f"{f(lambda: spread(r.baseline(WARP, 'cnn')))} ({f(lambda: spread(r.baseline(WARP, 'cnn_tta')))} with 16 views)",
         "0 to 5", "`python baselines.py --seeds 3 --augment 20 --max_elastic 1.5` (and `--first_seed 3`)",
         "[Baselines](#baselines)"),
        ("k-NN on pixels / logistic regression / k-NN on codebook reconstructions (`baselines.py`)",
         " / ".join(f(lambda b=b: num(r.baseline(WARP[:1], b)["mean"], 1))
                    for b in ("knn_pixels", "logreg_pixels", "knn_reconstructions")) + " %",
         "1 / 1 / 3", "the same", "[Baselines](#baselines)"),
    ]
    return markdown(("model", "test accuracy", "seeds", "command", "details"), ("---", "---:", "---", "---", "---"),
                    rows)


def colour_summary(r):
    """docs/results.md's colour results: the GPT, the baselines with the same copies, the tokens, the drawings."""
    f = lambda make: figure(r, make)
    base = lambda which, d=2: f(lambda: spread(r.baseline(COLOUR_BASE, which), d))
    rows = [
        ("the GPT (`config/colour.yaml`, `final/`)", f(lambda: spread(r.per_checkpoint(COLOUR))), "1337 to 1339"),
        ("LeNet-5-like CNN, the same images and copies", base("cnn"), "0 to 2"),
        ("the same CNN with test-time augmentation (16 views)", base("cnn_tta"), "0 to 2"),
        ("the same CNN on the codebook's reconstructions", base("cnn_on_reconstructions"), "0 to 2"),
        ("k-NN on the codebook's reconstructions", base("knn_reconstructions"), "0 to 2"),
        ("k-NN on raw pixels (with the copies in the reference set)",
         f"{f(lambda: pct(r.baseline(COLOUR_BASE, 'knn_pixels')['mean']))} "
         f"({f(lambda: pct(r.baseline(COLOUR_BASE, 'knn_pixels_augmented')['mean']))})", "-"),
        ("logistic regression on raw pixels", f(lambda: pct(r.baseline(COLOUR_BASE, "logreg_pixels")["mean"])), "-"),
    ]
    table = markdown(("model", "test accuracy", "seeds"), ("---", "---:", "---"), rows)
    facts = f(lambda: "Tokens: {sequence_length} per image; reconstructions of the test images at {test_psnr_db:.2f} dB "
                      "PSNR (training images {train_psnr_db:.2f} dB); {codes_used} of the codes used; every image a "
                      "distinct sequence: {distinct_share:.0%}.".format(**r.load(COLOUR_DATA)))
    train = f(lambda: "Training: " + ", ".join(f"{x['training_seconds']:.0f} s" for x in
                                               r.load("colour_train_seeds1337-1339.json")["runs"])
              + f" for the three seeds ({r.load('colour_train_seeds1337-1339.json')['runs'][0]['steps']:,} steps each; "
                "[performance](performance.md#the-colour-recipe)).")
    return f"{table}\n\n{facts} {train}"


def demo_fp32(r):
    """The demo's test accuracy over its 3 fp32 seeds, each seed's figure beside it."""
    def make():
        d = r.per_checkpoint(DEMO3)
        return f"{spread(d)} (3 seeds, fp32: {', '.join(num(v, 1) for v in d['values'])})"
    return figure(r, make)


def train_time(r, names=("demo_train_fp32_seeds1337-1339.json",)):
    """The training seconds per seed of training summaries, as 'N to M s per seed (T threads)'."""
    def make():
        runs = [(x, r.load(n)[KEY]["machine"]["torch_threads"]) for n in names for x in r.load(n)["runs"]]
        secs = [x["training_seconds"] for x, _ in runs]
        span = f"{min(secs):.0f}" + (f" to {max(secs):.0f}" if round(min(secs)) != round(max(secs)) else "")
        return f"{span} s per seed ({'/'.join(sorted({str(t) for _, t in runs}))} threads)"
    return figure(r, make)


def demo14(r):
    """docs/results.md's demo trained longer (14 copies, 2 epochs), refitted: with --tta 16, plain, training time."""
    return (f"{seeds(r.per_checkpoint(DEMO14, 'tta.accuracy'))} with `--tta 16`, {spread(r.per_checkpoint(DEMO14))} "
            f"plain, {train_time(r, ('demo_aug14_refit_train_seeds1337-1339.json',))} of training")


def cond_cost(r):
    """docs/drawing.md: the conditioned demo's test accuracy against the demo's, the same seeds, paired."""
    cond, plain = r.per_checkpoint(DEMO_COND), r.per_checkpoint(DEMO3)
    diff = [c - p for c, p in zip(cond["values"], plain["values"])]
    return (f"{seeds(cond)} against {seeds(plain)}, a paired difference of {num(sum(diff) / len(diff))} points "
            f"({', '.join(num(d, 1) for d in diff)})")


def finetune_table(r):
    """docs/results.md's fine-tuning: the demo model fine-tuned onto pen strokes against training from scratch."""
    rows, gains = [], []
    for per_class, _, epochs in FINETUNE:
        acc = {}
        for kind, start in (("tuned", "**fine-tuned from the digits**"), ("scratch", "from scratch")):
            name = f"finetune_strokes{per_class}_{kind}_dev_seeds1337-1339.json"
            acc[kind], ppl = r.per_checkpoint([name]), r.per_checkpoint([name], "image_perplexity")
            rows.append((str(per_class), str(epochs), start, seeds(acc[kind]), f"{ppl['mean']:.2f} +- {ppl['std']:.2f}"))
        t = welch(acc["tuned"], acc["scratch"]) if acc["tuned"]["std"] or acc["scratch"]["std"] else float("nan")
        gains.append(f"{num(acc['tuned']['mean'] - acc['scratch']['mean'])} points with {per_class} per class "
                     f"(Welch t = {t:.1f})")
    return (markdown(("images per class", "epochs", "start", "dev accuracy", "dev image-token perplexity"),
                     ("---:", "---:", "---", "---:", "---:"), rows) +
            f"\n\nFine-tuned minus from scratch: {'; '.join(gains)}.")


COLOUR_CANDIDATES = (   # record_parts.COLOUR_TABLE's candidates as the table names them
    ("palette_p4", "**shape apart from colour, 4 x 4 patterns (`config/colour.yaml`)**"),
    ("palette_p4_nocopies_colour", "the same, the copies keeping their colours (`--permute_colours false`)"),
    ("palette_p4_nocopies", "the same without copies (`--augment 0`)"),
    ("palette_p2_e1", "shape apart from colour, 2 x 2 patterns, 500 of them (1 epoch)"),
    ("patch_p2_k4000_e1", "before: a code per 2 x 2 patch of colours, 4,000 codes (1 epoch)"),
    ("patch_p2_k4000_colour_e1", "the same with the copies' colours permuted (1 epoch)"),
    ("igpt_16px_k512_e1", "iGPT's way: one token a pixel from a palette of 512 colours, at 16 x 16 (1 epoch)"),
)


def colour_table(r):
    """docs/results.md's choice of the colour tokenisation: each candidate on the development split."""
    rows = []
    for name, what in COLOUR_CANDIDATES:
        dev, data = r.load(f"colour_table_{name}_dev.json"), r.load(f"colour_table_{name}_data.json")
        rows.append((what, str(data["sequence_length"]), f"{data['dev_psnr_db']:.1f} dB", pct(dev["accuracy"], 1),
                     f"{dev['loss']:.3f}", f"{data['training']['steps']:,}", f"{data['training']['seconds']:.0f} s"))
    return markdown(("tokenisation", "tokens / image", "dev PSNR", "dev accuracy", "dev loss", "steps", "training"),
                    ("---",) + ("---:",) * 6, rows)


def interval(s):
    """A seed_summary's 95 % t interval of the mean, as `low .. high %`."""
    return f"{num(s['ci95'][0])} .. {num(s['ci95'][1])} %"


def welch(a, b):
    """Welch's t of two seed_summaries (a - b)."""
    return (a["mean"] - b["mean"]) / (a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"]) ** 0.5


REFITTED = (("`config/demo.yaml` refitted", "demo_refit"), ("**`config/best.yaml`** refitted", "best_refit"))


def refitted(r):
    """docs/results.md's refitted rows: each set of three seeds and the six, with --tta 16 and plain."""
    rows = []
    for name, stem in REFITTED:
        files = [f"{stem}_test_tta16_seeds{s}.json" for s in ("1337-1339", "1340-1342")]
        sets = [(r.per_checkpoint([f], "tta.accuracy"), r.per_checkpoint([f])) for f in files]
        six, six_plain = r.per_checkpoint(files, "tta.accuracy"), r.per_checkpoint(files)
        train = train_time(r, [f"{stem}_train_seeds{s}.json" for s in ("1337-1339", "1340-1342")])
        rows.append((name, *(f"{seeds(t)}; plain {spread(p)}" for t, p in sets),
                     f"**{spread(six)}** ({interval(six)}); plain {spread(six_plain)}", train))
    return markdown(("configuration", "seeds 1337 to 1339, `--tta 16`", "seeds 1340 to 1342", "the six (95 % t interval)",
                     "training"), ("---",) + ("---:",) * 4, rows)


def best_goal(r):
    """The best configuration against the goal of 99 % over three seeds, and over six."""
    three, six = r.per_checkpoint(BEST[:1], "tta.accuracy"), r.per_checkpoint(BEST, "tta.accuracy")
    rows = [c["tta"]["confusion"] for c in r.load(BEST[0])["per_checkpoint"]]
    right, total = sum(sum(row[i] for i, row in enumerate(m)) for m in rows), sum(sum(map(sum, m)) for m in rows)
    return (f"**{spread(three)}** over three seeds ({right:,} of {total:,} test digits right, where 99.0 % is "
            f"{round(0.99 * total):,}), {spread(six)} over six (95 % interval of the mean {interval(six)})")


def cnn_warp(r):
    """The CNN with the warped copies over six seeds, against the best configuration's six (Welch's t)."""
    gpt = r.per_checkpoint(BEST, "tta.accuracy")
    cnn, cnn_tta = r.baseline(WARP, "cnn"), r.baseline(WARP, "cnn_tta")
    return (f"{spread(cnn)} plain, {spread(cnn_tta)} with test-time augmentation; the GPT's six seeds, {spread(gpt)}, "
            f"are {num(cnn['mean'] - gpt['mean'])} and {num(cnn_tta['mean'] - gpt['mean'])} points behind them "
            f"(Welch t = {welch(cnn, gpt):.1f} and {welch(cnn_tta, gpt):.1f})")


def demo_refit_goal(r):
    """The refitted demo against the goal of 98.5 %: its six seeds, each set of three, plain, training time."""
    six, sets = r.per_checkpoint(DEMO_REFIT, "tta.accuracy"), [r.per_checkpoint([f], "tta.accuracy") for f in DEMO_REFIT]
    return (f"{spread(six)} over six seeds (the two sets of three: {' and '.join(spread(x) for x in sets)}; 95 % "
            f"interval of the mean {interval(six)}), plain {spread(r.per_checkpoint(DEMO_REFIT))}, in "
            f"{train_time(r, DEMO_REFIT_TRAIN)} of training in fp32")


def baselines(name):
    """A baselines.py report as its own markdown table (imagegpt/baseline_protocol.py)."""
    def make(r):
        from imagegpt.baseline_protocol import markdown_table
        return markdown_table(r.load(name))
    return make


def tokenisation(r):
    """docs/data.md's tokenisation table (baselines.py --tokenisation)."""
    from imagegpt.baseline_protocol import tokenisation_markdown
    return tokenisation_markdown(r.load("tokenisation.json")["rows"])


def demo_default(r):
    """The refitted demo at the default precision: accuracy with --tta 16, training time, and the dtype and
    CPU it ran on."""
    train = r.load("demo_refit_default_train_seeds1337-1339.json")[KEY]
    return (f"{seeds(r.per_checkpoint(['demo_refit_default_test_tta16_seeds1337-1339.json'], 'tta.accuracy'))} with "
            f"`--tta 16`, {train_time(r, ['demo_refit_default_train_seeds1337-1339.json'])} of training, in "
            f"{train['dtype']} on {train['machine']['cpu']}")


RENDER = {"results_summary": results_summary, "colour": colour_summary, "colour_table": colour_table,
          "colour_accuracy": lambda r: spread(r.per_checkpoint(COLOUR)),
          "colour_psnr": lambda r: f"{r.load(COLOUR_DATA)['test_psnr_db']:.2f} dB",
          "demo_fp32": demo_fp32, "demo_time": train_time,
          "demo_dev": lambda r: spread(r.load("demo_train_fp32_seeds1337-1339.json")["final_dev_accuracy"]),
          "demo_perplexity": lambda r: "{mean:.2f} +- {std:.2f}".format(**r.per_checkpoint(DEMO3, "image_perplexity")),
          "demo14": demo14, "cond_cost": cond_cost, "demo_cond": lambda r: seeds(r.per_checkpoint(DEMO_COND)),
          "finetune": finetune_table, "refitted": refitted, "best_goal": best_goal, "cnn_warp": cnn_warp,
          "demo_refit_goal": demo_refit_goal, "demo_refit_default": demo_default, "best3": lambda r: f"{spread(r.per_checkpoint(BEST[:1], 'tta.accuracy'))} (3 seeds, fp32)",
          "best_time": lambda r: train_time(r, ["best_refit_train_seeds1337-1339.json"]),
          "finetune50": lambda r: spread(r.per_checkpoint(FINETUNE50[:1]), 1), "baselines_aug6": baselines("baselines_aug6_seeds0-2.json"),
          "baselines_aug20": baselines("baselines_aug20_seeds0-2.json"),
          "baselines_warp": baselines("baselines_aug20_warp_seeds0-2.json"), "tokenisation": tokenisation,
          "best_cond": lambda r: f"{pct(r.load('best_cond_test_seed1337.json')['accuracy'], 1)} (seed 1337, fp32)"}
