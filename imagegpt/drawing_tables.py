"""The judged drawings in docs/drawing.md and the README, generated from `eval.py generation` reports
(imagegpt/drawing_report.py): a drawing model's guidance scales beside what the judge reads of real images.
The digits' drawing models come from the record's demo_cond and best_cond parts, the colour shapes' from
colour and colour_draw."""
from imagegpt.draw_settings import GUIDANCE
from imagegpt.table_text import markdown, pct

DEFAULT = str(float(GUIDANCE))      # a report's key for the default guidance scale
BEST_COND, DEMO_COND = "best_cond_drawing_report.json", "demo_cond_drawing_report_seed1337.json"
DIGITS = (("`config/best_cond.yaml` (the best drawing model, seed 1337)", BEST_COND),
          ("`config/demo_cond.yaml` (seed 1337)", DEMO_COND))
COLOUR_DRAW = "colour_drawing_report_seed1337.json"
COLOUR_DRAW_COND = "colour_draw_report_seed1337.json"     # the drawing setting: --cond_fraction 1.0


def worst(per_class, things):
    """The weakest class's judged share (digits: `digit: share`)."""
    c = min(range(len(per_class)), key=per_class.__getitem__)
    return f"{c}: {pct(per_class[c], 0)}" if things == "digits" else pct(per_class[c], 1)


def scales(rep, things):
    """One report: a row per guidance scale, then the real training images through the codebook (the ceiling)."""
    rows = [(s + (" (default)" if s == DEFAULT else ""), pct(q["judge_accuracy"], 1), worst(q["judge_per_class"], things),
             f"{q['diversity_ratio_mean']:.3f}", f"{q['precision']:.3f}", f"{q['recall']:.3f}",
             pct(q["gpt_reads_asked_class"], 1), pct(q["well_formed"], 1)) for s, q in rep["scales"].items()]
    cg = rep["codebook_generator"]
    rows.append((f"real training {things} through the codebook", pct(cg["judge_accuracy"], 1),
                 worst(cg["judge_per_class"], things), f"{cg['diversity_ratio_mean']:.3f}", f"{cg['precision']:.3f}",
                 f"{cg['recall']:.3f}", "", ""))
    thing = things.rstrip("s")
    table = markdown(("guidance", f"judged the asked {thing}", "worst class", "diversity", "precision", "recall",
                      "the GPT reads it", "complete"), ("---",) + ("---:",) * 7, rows)
    return (f"{table}\n\n{rep['classes_asked']} drawings per class at each scale. The judge reads the "
            f"{rep['real']['n']} real test {things} at {pct(rep['real']['judge']['accuracy'], 1)} and their codebook "
            f"reconstructions at {pct(rep['reconstructions']['judge']['accuracy'], 1)}.")


def digits_summary(results):
    """docs/drawing.md's first table: each digit drawing model at the default guidance, beside the ceiling."""
    rows = []
    for name, file in DIGITS:
        q = results.load(file)["scales"][DEFAULT]
        rows.append((name, f"{GUIDANCE:g} (default)", pct(q["judge_accuracy"], 1),
                     worst(q["judge_per_class"], "digits"), f"{q['diversity_ratio_mean']:.2f}"))
    cg = results.load(BEST_COND)["codebook_generator"]
    rows.append(("real training digits through the codebook (ceiling)", "", pct(cg["judge_accuracy"], 1), "",
                 f"{cg['diversity_ratio_mean']:.2f}"))
    return markdown(("model", "guidance", "judge calls it the asked digit", "worst class",
                     "diversity (samples / real)"), ("---", "---:", "---:", "---", "---:"), rows)


RENDER = {"best_cond_drawing": lambda r: scales(r.load(BEST_COND), "digits"),
          "demo_cond_drawing": lambda r: scales(r.load(DEMO_COND), "digits"),
          "digit_drawing": digits_summary,
          "colour_drawing": lambda r: scales(r.load(COLOUR_DRAW), "shapes"),
          "colour_drawing_cond": lambda r: scales(r.load(COLOUR_DRAW_COND), "shapes")}
