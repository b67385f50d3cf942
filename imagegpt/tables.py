"""Tables and figures generated from result files: the README's results table, docs/results.md's summary,
and the figures of the test suite and of a fresh clone; rewritten in place between markers, and checked.

In a page (README.md, docs/*.md) a generated table or figure sits between two HTML comments, which the
page does not show:

    <!-- table:NAME -->
    | ... the table, as RENDER[NAME] writes it from docs/results/ ... |
    <!-- /table:NAME -->

(`<!-- figure:NAME -->...<!-- /figure:NAME -->` for a figure inside a sentence.) rewrite() puts what the
result files give between the markers; check() lists every place where the page differs from that, where
a result file is missing, and where one has no provenance. A result file without provenance is shown only
if it is named in MADE_BEFORE_PROVENANCE (written before result files recorded it; `python reproduce.py`
remakes them), and the table then says so under it.
"""
import glob
import os
import re

from imagegpt.errors import UserError
from imagegpt.files import read_json, write_text
from imagegpt.provenance import KEY, ROOT
from imagegpt.record_parts import PARTS
from imagegpt.export_report import export_parity
from imagegpt.record_table import record_runs
from imagegpt.scale_report import report as scale_report
from imagegpt.stats import seed_summary

RESULTS = os.path.join(ROOT, "docs", "results")
PAGES = ("README.md", "docs/*.md")
MARKER = re.compile(r"<!-- (table|figure):([a-z0-9_]+) -->(.*?)<!-- /\1:\2 -->", re.S)
NOT_RERUN = "not rerun yet"

# result files the tables read that were written before result files carried their provenance (issue 36);
# `python reproduce.py` writes them again with it (the part: record_parts.PARTS), then they leave this list
MADE_BEFORE_PROVENANCE = {
    "finetune_strokes50_tuned_dev_seeds1337-1339.json", "finetune_strokes50_scratch_dev_seeds1337-1339.json",
}


class Missing(UserError):
    """A figure's result file is missing (or unusable): strict rendering fails, the other kind shows
    NOT_RERUN in its place."""


class Results:
    """The result files of a folder, read once each. strict: a missing file is an error (check), else its
    figures read NOT_RERUN (rewrite). Remembers which files a rendering read without provenance."""

    def __init__(self, folder=RESULTS, strict=True, before=MADE_BEFORE_PROVENANCE):
        self.folder, self.strict, self.before = folder, strict, before
        self.cache, self.unproven = {}, set()

    def load(self, name):
        if name not in self.cache:
            path = os.path.join(self.folder, name)
            if not os.path.exists(path):
                raise Missing(f"{os.path.relpath(path, ROOT)}: no such result file")
            data = read_json(path, "result file")
            if not isinstance(data, dict):
                raise Missing(f"{os.path.relpath(path, ROOT)}: not a result file (a JSON object)")
            if not isinstance(data.get(KEY), dict) and name not in self.before:
                raise Missing(f"{os.path.relpath(path, ROOT)}: has no provenance (a result file without it is not shown)")
            self.cache[name] = data
        if not isinstance(self.cache[name].get(KEY), dict):
            self.unproven.add(name)
        return self.cache[name]

    def per_checkpoint(self, names, key="accuracy"):
        """eval.py summaries (--ckpt several --out) -> seed_summary of `key` (a dotted path) over all their
        checkpoints, in order."""
        values = []
        for name in names:
            for row in self.load(name)["per_checkpoint"]:
                for k in key.split("."):
                    row = row[k]
                values.append(row)
        return seed_summary(values)

    def baseline(self, names, which):
        """baselines.py reports -> seed_summary of one baseline's test accuracy over all their runs."""
        return seed_summary([r["test_accuracy"] for n in names for r in self.load(n)["baselines"][which]["runs"]])


def figure(results, make):
    """make(): a figure's text from the results; NOT_RERUN where a file is missing and results is not strict."""
    try:
        return make()
    except Missing:
        if results.strict:
            raise
        return NOT_RERUN


def num(v, digits=2):
    return f"{100 * v:.{digits}f}"


def pct(v, digits=2):
    return f"{num(v, digits)} %"


def spread(s, digits=2):
    """A seed_summary as `mean +- std %`."""
    return f"{100 * s['mean']:.{digits}f} +- {100 * (s['std'] or 0):.{digits}f} %"


def markdown(header, align, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] +
                     ["| " + " | ".join(r) + " |" for r in rows])


def provenance_note(results):
    """Under a table: which of its files were made before result files recorded their provenance."""
    if not results.unproven:
        return ""
    parts = [p.name for p in PARTS if results.unproven & set(p.results)]
    return ("\n\nMade before result files recorded their provenance (older code; some on another machine): "
            f"rerun by `python reproduce.py {' '.join(parts)}`.")


DEMO3 = ["demo_test_fp32_seeds1337-1339.json"]
DEMO_REFIT = ["demo_refit_test_tta16_seeds1337-1339.json", "demo_refit_test_tta16_seeds1340-1342.json"]
DEMO_REFIT_TRAIN = ["demo_refit_train_seeds1337-1339.json", "demo_refit_train_seeds1340-1342.json"]
BEST = ["best_refit_test_tta16_seeds1337-1339.json", "best_refit_test_tta16_seeds1340-1342.json"]
WARP = ["baselines_aug20_warp_seeds0-2.json", "baselines_aug20_warp_seeds3-5.json"]
FINETUNE50 = ["finetune_strokes50_tuned_dev_seeds1337-1339.json", "finetune_strokes50_scratch_dev_seeds1337-1339.json"]


def readme_results(r):
    """The README's results table (the rows that have result files)."""
    f = lambda make: figure(r, make)
    first = f(lambda: pct(r.per_checkpoint(DEMO3)["values"][0]))
    demo3 = f(lambda: spread(r.per_checkpoint(DEMO3)))
    rows = [
        ("the first command's model (`config/demo.yaml`, `final/`), trained in fp32 on the project machine",
         f"{first} ({demo3} over 3 seeds)", "1337 (to 1339)"),
        ("`config/demo.yaml` refitted on all 4,000 training digits, `eval.py --tta 16`",
         f(lambda: spread(r.per_checkpoint(DEMO_REFIT, "tta.accuracy"))), "1337 to 1342"),
        ("**`config/best.yaml`** (6 layers, 20 warped copies, 1,000 codes; 1.33 M) refitted, `eval.py --tta 16`",
         f"**{f(lambda: spread(r.per_checkpoint(BEST[:1], 'tta.accuracy')))}**", "1337 to 1339"),
        ("LeNet-5-like CNN with the same warped copies (`baselines.py`)", f(lambda: spread(r.baseline(WARP, "cnn"))),
         "0 to 5"),
        ("k-NN on raw pixels / on codebook reconstructions",
         f"{f(lambda: pct(r.baseline(WARP[:1], 'knn_pixels')['mean'], 1))} / "
         f"{f(lambda: pct(r.baseline(WARP[:1], 'knn_reconstructions')['mean'], 1))}", "- / 0 to 2"),
        ("logistic regression on raw pixels", f(lambda: pct(r.baseline(WARP[:1], "logreg_pixels")["mean"], 1)), "-"),
        ("fine-tuned from the digit model onto 5 classes of pen strokes, 50 per class (development split)",
         f"{f(lambda: spread(r.per_checkpoint(FINETUNE50[:1]), 1))} "
         f"(from scratch {f(lambda: spread(r.per_checkpoint(FINETUNE50[1:]), 1))})", "1337 to 1339"),
        *colour_rows(r),
    ]
    return markdown(("model", "test accuracy", "seeds"), ("---", "---:", "---"), rows) + provenance_note(r)


COLOUR = ["colour_test_seeds1337-1339.json"]
COLOUR_BASE = ["colour_baselines_seeds0-2.json"]
COLOUR_DATA, COLOUR_DRAW = "colour_data_report.json", "colour_drawing_report_seed1337.json"
COLOUR_DRAW_COND = "colour_draw_report_seed1337.json"     # the drawing setting: --cond_fraction 1.0
GUIDANCE = "3.0"   # the drawing report's row shown: drawing.GUIDANCE, the default


def colour_rows(r):
    """The colour rows of the README's table: the GPT against the CNN with the same copies, its drawings."""
    f = lambda make: figure(r, make)
    judged = f(lambda: " / ".join(pct(r.load(n)["scales"][GUIDANCE]["judge_accuracy"], 1)
                                  for n in (COLOUR_DRAW, COLOUR_DRAW_COND)))
    judge = f(lambda: pct(r.load(COLOUR_DRAW)["real"]["judge"]["accuracy"], 1))
    return [
        ("colour shapes (`config/colour.yaml`: 4 classes of random colours, shape apart from colour, 73 tokens; 400 test "
         "images): the GPT / the CNN with the same copies",
         f"{f(lambda: spread(r.per_checkpoint(COLOUR)))} / {f(lambda: spread(r.baseline(COLOUR_BASE, 'cnn')))}",
         "1337 to 1339 / 0 to 2"),
        (f"its drawings of a chosen class, judged the asked shape by a CNN trained on other shapes (which reads the real "
         f"test shapes at {judge}): the same model / trained with `--cond_fraction 1.0`", judged, "1337"),
    ]


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
         "[With six layers](#with-six-layers)"),
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
                    rows) + provenance_note(r)


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
    return f"{table}\n\n{facts} {train}" + provenance_note(r)


def colour_drawing(r):
    """docs/drawing.md's colour report: the judged drawings at each guidance scale, beside the judge's ceilings."""
    return figure(r, lambda: drawing_table(r, r.load(COLOUR_DRAW)))


def colour_drawing_cond(r):
    """docs/drawing.md's colour report of the drawing setting (--cond_fraction 1.0)."""
    return figure(r, lambda: drawing_table(r, r.load(COLOUR_DRAW_COND)))


def drawing_table(r, rep):
    rows = [(s, pct(q["judge_accuracy"], 1), pct(min(q["judge_per_class"]), 1), f"{q['diversity_ratio_mean']:.3f}",
             f"{q['precision']:.3f}", f"{q['recall']:.3f}", pct(q["gpt_reads_asked_class"], 1), pct(q["well_formed"], 1))
            for s, q in rep["scales"].items()]
    cg = rep["codebook_generator"]
    rows.append(("real training shapes through the codebook", pct(cg["judge_accuracy"], 1), pct(min(cg["judge_per_class"]), 1),
                 f"{cg['diversity_ratio_mean']:.3f}", f"{cg['precision']:.3f}", f"{cg['recall']:.3f}", "", ""))
    table = markdown(("guidance", "judged the asked shape", "worst class", "diversity", "precision", "recall",
                      "the GPT reads it", "complete"), ("---",) + ("---:",) * 7, rows)
    return (f"{table}\n\n{rep['classes_asked']} drawings per class at each scale. The judge reads the "
            f"{rep['real']['n']} real test shapes at {pct(rep['real']['judge']['accuracy'], 1)} and their codebook "
            f"reconstructions at {pct(rep['reconstructions']['judge']['accuracy'], 1)}.") + provenance_note(r)


def first_command(r):
    """The README's first command as a newcomer meets it: what it printed from a fresh clone (on which CPU, in
    which dtype: bf16 where the CPU computes it natively), beside the same configuration in fp32 over 3 seeds."""
    def make():
        fresh, demo = r.load("fresh_clone.json"), r.per_checkpoint(DEMO3)
        m = fresh[KEY]["machine"]
        dtype = "bf16" if {"avx512_bf16", "amx_tile"} & set(m["cpu_flags"]) else "fp32"
        isa = "AVX-512" if "avx512f" in m["cpu_flags"] else "AVX2" if "avx2" in m["cpu_flags"] else "SSE"
        d = r.load(DEMO3[0])[KEY]["machine"]
        return (f"{fresh['accuracy_printed']:.2f} % on {m['cpu']} ({isa}, {m['cores_available']} cores, {dtype}); "
                f"in fp32 over three seeds, {spread(demo)} (seed 1337: {pct(demo['values'][0])}; "
                f"{d['cpu']}, {d['torch_threads']} threads)")
    return figure(r, make)


def loadtest_tables(r):
    """docs/service.md's load test, as `serve.py --loadtest` prints it, on the machine that ran it."""
    def make():
        from imagegpt.loadtest import report
        result = r.load("loadtest.json")
        return report(result, result[KEY]["machine"]) + f"\n\n`{result[KEY]['command']}`"
    return figure(r, make)


def bench_tables(r, name="bench_cpu.json"):
    """docs/performance.md's benchmark, as `bench.py` prints it (with the machine and the kernels that ran)."""
    from imagegpt.bench_report import format_report
    return figure(r, lambda: format_report(r.load(name)))


def colour_time(r):
    """docs/performance.md's colour recipe time: each seed's training seconds, on the machine that ran them."""
    def make():
        t = r.load("colour_train_seeds1337-1339.json")
        m = t[KEY]["machine"]
        seeds = ", ".join(f"{x['training_seconds']:.0f} s (seed {x['seed']})" for x in t["runs"])
        return (f"{seeds}: {t['runs'][0]['steps']:,} steps each, on {m['cpu']} with {m['torch_threads']} threads "
                f"(load average {m['load_average'][0]} when the seeds began)")
    return figure(r, make)


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


def tests_figure(r):
    """The test suite's count and time, as recorded by `python reproduce.py tests`."""
    t = r.load("tests.json")
    m, s = divmod(round(t["pytest_seconds"] or t["wall_seconds"]), 60)
    return f"{t['tests']} tests in {m} min {s} s"


def fresh_clone_figure(r):
    """The README's first command from a fresh clone, as recorded by `python reproduce.py fresh_clone`."""
    t = r.load("fresh_clone.json")
    m, s = divmod(round(t["wall_seconds"]), 60)
    return f"{m} min {s} s in all, of which training {t['training_seconds']} s"


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
    return figure(r, lambda: candidates_table(r))


def candidates_table(r):
    rows = []
    for name, what in COLOUR_CANDIDATES:
        dev, data = r.load(f"colour_table_{name}_dev.json"), r.load(f"colour_table_{name}_data.json")
        rows.append((what, str(data["sequence_length"]), f"{data['dev_psnr_db']:.1f} dB", pct(dev["accuracy"], 1),
                     f"{dev['loss']:.3f}", f"{data['training']['steps']:,}", f"{data['training']['seconds']:.0f} s"))
    return markdown(("tokenisation", "tokens / image", "dev PSNR", "dev accuracy", "dev loss", "steps", "training"),
                    ("---",) + ("---:",) * 6, rows) + provenance_note(r)


RENDER = {"results": readme_results, "results_summary": results_summary, "colour": colour_summary,
          "colour_drawing": colour_drawing, "colour_drawing_cond": colour_drawing_cond, "colour_table": colour_table,
          "colour_accuracy": lambda r: spread(r.per_checkpoint(COLOUR)),
          "colour_psnr": lambda r: f"{r.load(COLOUR_DATA)['test_psnr_db']:.2f} dB", "colour_time": colour_time,
          "first_command": first_command, "demo_fp32": demo_fp32, "demo_time": train_time,
          "demo_dev": lambda r: spread(r.load("demo_train_fp32_seeds1337-1339.json")["final_dev_accuracy"]),
          "demo_perplexity": lambda r: "{mean:.2f} +- {std:.2f}".format(**r.per_checkpoint(DEMO3, "image_perplexity")),
          "loadtest": loadtest_tables, "bench": bench_tables, "tests": tests_figure, "fresh_clone": fresh_clone_figure,
          "bench_avx2": lambda r: bench_tables(r, "bench_cpu_avx2.json"), "record_runs": record_runs,
          "bench_threads": lambda r: bench_tables(r, "bench_threads.json"), "export_parity": export_parity,
          "web_bench": lambda r: bench_tables(r, "web_bench.json"),
          "scale": lambda r: scale_report(r.load("scale.json"))}


def render(kind, name, results):
    """The text between the markers of table or figure NAME."""
    if name not in RENDER:
        raise UserError(f"{kind}:{name}: no such generated {kind} (tables.RENDER: {', '.join(RENDER)})")
    own = Results(results.folder, results.strict, results.before)      # its own note
    text = figure(own, lambda: RENDER[name](own))
    return f"\n{text}\n" if kind == "table" else text


def documents():
    """The pages that may hold generated tables -> their paths."""
    return sorted({p for pattern in PAGES for p in glob.glob(os.path.join(ROOT, pattern))})


def check_text(text, results, where="page"):
    """Problems of one page's generated parts: each differs from what its files give, or cannot be made."""
    problems = []
    for m in MARKER.finditer(text):
        kind, name, have = m.groups()
        try:
            want = render(kind, name, results)
        except UserError as e:
            problems.append(f"{where}: {kind}:{name}: {e}")
            continue
        if have != want:
            problems.append(f"{where}: {kind}:{name}: differs from its result files ({first_difference(have, want)}); "
                            f"python reproduce.py --tables rewrites it")
    return problems


def first_difference(have, want):
    for i, (a, b) in enumerate(zip(have.splitlines(), want.splitlines()), 1):
        if a != b:
            j = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            return f"line {i}: {a[max(0, j - 30):j + 30]!r}, the files give {b[max(0, j - 30):j + 30]!r}"
    return "a line more or less"


def check(pages=None, folder=RESULTS, before=MADE_BEFORE_PROVENANCE):
    """Every problem of the generated tables and figures in the pages (default: documents()), and every
    entry of MADE_BEFORE_PROVENANCE that is stale (its file now has provenance, or is gone)."""
    problems = []
    for page in documents() if pages is None else pages:
        with open(page, encoding="utf-8") as fh:
            problems += check_text(fh.read(), Results(folder, True, before), os.path.relpath(page, ROOT))
    for name in sorted(before):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            problems.append(f"tables.MADE_BEFORE_PROVENANCE: {name}: no such file in {os.path.relpath(folder, ROOT)}")
        elif isinstance(read_json(path, "result file").get(KEY), dict):
            problems.append(f"tables.MADE_BEFORE_PROVENANCE: {name} now has its provenance: take it off the list")
    return problems


def rewrite_text(text, results):
    return MARKER.sub(lambda m: f"<!-- {m[1]}:{m[2]} -->{render(m[1], m[2], results)}<!-- /{m[1]}:{m[2]} -->", text)


def rewrite(pages=None, folder=RESULTS, before=MADE_BEFORE_PROVENANCE):
    """Put what the result files give between every page's markers (a missing file: NOT_RERUN) -> the
    pages that changed."""
    changed = []
    for page in documents() if pages is None else pages:
        with open(page, encoding="utf-8") as fh:
            text = fh.read()
        new = rewrite_text(text, Results(folder, False, before))
        if new != text:
            write_text(page, new)
            changed.append(os.path.relpath(page, ROOT))
    return changed
