"""Tables and figures generated from result files: the README's results table and figures, the benchmark,
load test and scale pages, and (from results_tables, drawing_tables, export_report, record_table) the rest;
rewritten in place between markers, and checked.

In a page (README.md, docs/*.md) a generated table or figure sits between two HTML comments, which the
page does not show:

    <!-- table:NAME -->
    | ... the table, as RENDER[NAME] writes it from docs/results/ ... |
    <!-- /table:NAME -->

(`<!-- figure:NAME -->...<!-- /figure:NAME -->` for a figure inside a sentence.) rewrite() puts what the
result files give between the markers; check() lists every place where the page differs from that, where
a result file is missing, and where one has no provenance: a result file without it is not shown.
"""
import glob
import os
import re

from imagegpt.errors import UserError
from imagegpt.files import read_json, write_text
from imagegpt.provenance import KEY, ROOT
from imagegpt.drawing_tables import RENDER as DRAWINGS, BEST_COND, COLOUR_DRAW, COLOUR_DRAW_COND, DEFAULT
from imagegpt.export_report import export_parity
from imagegpt.record_table import record_runs
from imagegpt.results_tables import (RENDER as RESULTS_MD, BEST, COLOUR, COLOUR_BASE, DEMO3, DEMO_REFIT, FINETUNE50,
                                     WARP)
from imagegpt.scale_report import report as scale_report
from imagegpt.stats import seed_summary
from imagegpt.table_text import NOT_RERUN, Missing, figure, markdown, pct, spread  # noqa: F401 (NOT_RERUN: the API)

RESULTS = os.path.join(ROOT, "docs", "results")
PAGES = ("README.md", "docs/*.md")
MARKER = re.compile(r"<!-- (table|figure):([a-z0-9_]+) -->(.*?)<!-- /\1:\2 -->", re.S)


class Results:
    """The result files of a folder, read once each. strict: a missing file is an error (check), else its
    figures read NOT_RERUN (rewrite)."""

    def __init__(self, folder=RESULTS, strict=True):
        self.folder, self.strict, self.cache = folder, strict, {}

    def load(self, name):
        if name not in self.cache:
            path = os.path.join(self.folder, name)
            if not os.path.exists(path):
                raise Missing(f"{os.path.relpath(path, ROOT)}: no such result file")
            data = read_json(path, "result file")
            if not isinstance(data, dict):
                raise Missing(f"{os.path.relpath(path, ROOT)}: not a result file (a JSON object)")
            if not isinstance(data.get(KEY), dict):
                raise Missing(f"{os.path.relpath(path, ROOT)}: has no provenance (a result file without it is not shown)")
            self.cache[name] = data
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
        ("`config/best_cond.yaml`, the best drawing model: its test accuracy / its drawings of a chosen digit, judged "
         "the asked digit by the CNN (guidance 3)",
         f"{f(lambda: pct(r.load('best_cond_test_seed1337.json')['accuracy'], 1))} / "
         f"{f(lambda: pct(r.load(BEST_COND)['scales'][DEFAULT]['judge_accuracy'], 1))}", "1337"),
        ("k-NN on raw pixels / on codebook reconstructions",
         f"{f(lambda: pct(r.baseline(WARP[:1], 'knn_pixels')['mean'], 1))} / "
         f"{f(lambda: pct(r.baseline(WARP[:1], 'knn_reconstructions')['mean'], 1))}", "- / 0 to 2"),
        ("logistic regression on raw pixels", f(lambda: pct(r.baseline(WARP[:1], "logreg_pixels")["mean"], 1)), "-"),
        ("fine-tuned from the digit model onto 5 classes of pen strokes, 50 per class (development split)",
         f"{f(lambda: spread(r.per_checkpoint(FINETUNE50[:1]), 1))} "
         f"(from scratch {f(lambda: spread(r.per_checkpoint(FINETUNE50[1:]), 1))})", "1337 to 1339"),
        *colour_rows(r),
    ]
    return markdown(("model", "test accuracy", "seeds"), ("---", "---:", "---"), rows)


def colour_rows(r):
    """The colour rows of the README's table: the GPT against the CNN with the same copies, its drawings."""
    f = lambda make: figure(r, make)
    judged = f(lambda: " / ".join(pct(r.load(n)["scales"][DEFAULT]["judge_accuracy"], 1)
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


RENDER = {"results": readme_results, "colour_time": colour_time, "first_command": first_command,
          "loadtest": loadtest_tables, "bench": bench_tables, "tests": tests_figure, "fresh_clone": fresh_clone_figure,
          "bench_avx2": lambda r: bench_tables(r, "bench_cpu_avx2.json"), "record_runs": record_runs,
          "bench_threads": lambda r: bench_tables(r, "bench_threads.json"), "export_parity": export_parity,
          "web_bench": lambda r: bench_tables(r, "web_bench.json"),
          "scale": lambda r: scale_report(r.load("scale.json")), **RESULTS_MD, **DRAWINGS}


def render(kind, name, results):
    """The text between the markers of table or figure NAME."""
    if name not in RENDER:
        raise UserError(f"{kind}:{name}: no such generated {kind} (tables.RENDER: {', '.join(RENDER)})")
    text = figure(results, lambda: RENDER[name](results))
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


def check(pages=None, folder=RESULTS):
    """Every problem of the generated tables and figures in the pages (default: documents())."""
    problems = []
    for page in documents() if pages is None else pages:
        with open(page, encoding="utf-8") as fh:
            problems += check_text(fh.read(), Results(folder, True), os.path.relpath(page, ROOT))
    return problems


def rewrite_text(text, results):
    return MARKER.sub(lambda m: f"<!-- {m[1]}:{m[2]} -->{render(m[1], m[2], results)}<!-- /{m[1]}:{m[2]} -->", text)


def rewrite(pages=None, folder=RESULTS):
    """Put what the result files give between every page's markers (a missing file: NOT_RERUN) -> the
    pages that changed."""
    changed = []
    for page in documents() if pages is None else pages:
        with open(page, encoding="utf-8") as fh:
            text = fh.read()
        new = rewrite_text(text, Results(folder, False))
        if new != text:
            write_text(page, new)
            changed.append(os.path.relpath(page, ROOT))
    return changed
