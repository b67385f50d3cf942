"""The tables of `scale.py` (data at scale): one row per size of what preparing and starting to train took,
and the issue's four targets met or not, from the figures of a run (scale.py prints them; docs/scale.md
shows them generated from docs/results/scale.json)."""

TARGETS = (   # (what the issue asked, the largest size's figure as text, met?) from (small row, large row)
    ("1,000,000 images prepared end to end in <= 3 minutes",
     lambda s, b: f"{b['prepare_seconds']} s", lambda s, b: b["prepare_seconds"] <= 180),
    (">= 10,000 images/s tokenised", lambda s, b: f"{b['images_per_second']:,}", lambda s, b: b["images_per_second"] >= 10_000),
    ("peak RSS of training, 10,000 vs 1,000,000 images, within 10 %",
     lambda s, b: f"{s['peak_rss_mib']:.0f} vs {b['peak_rss_mib']:.0f} MiB "
                  f"({100 * (b['peak_rss_mib'] / s['peak_rss_mib'] - 1):+.1f} %)",
     lambda s, b: b["peak_rss_mib"] <= 1.1 * s["peak_rss_mib"]),
    ("first training step <= 5 s after the process starts (1,000,000 images)",
     lambda s, b: f"{b['first_step_seconds']} s", lambda s, b: b["first_step_seconds"] <= 5),
)


def table(rows, steps=20):
    """One row per size: preparing (wall, images/s, reading share, k-means), the first training step, its RSS."""
    out = ["| images | prepare (wall) | tokenised images/s | reading share | k-means fit | first training step | "
           f"of which before the loop | training peak RSS ({steps} steps) |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['images']:,} | {r['prepare_seconds']} s | {r['images_per_second']:,} | "
                   f"{100 * r['read_share']:.1f} % | {r['seconds_fit']} s | {r['first_step_seconds']} s | "
                   f"{r['before_loop_seconds']} s | "
                   f"{r['peak_rss_mib']:.0f} MiB |")
    return "\n".join(out)


def targets(rows):
    """The issue's targets against the smallest and the largest size of a run (sizes 10,000 and 1,000,000)."""
    small, big = rows[0], rows[-1]
    out = ["| target (issue) | this run | met |", "|---|---:|---|"]
    for what, figure, met in TARGETS:
        out.append(f"| {what} | {figure(small, big)} | {'yes' if met(small, big) else '**no**'} |")
    return "\n".join(out)


def report(result):
    """docs/scale.md's tables from a scale.json: the targets, the sizes, and the run's machine and time."""
    rows = result["rows"]
    loads = ", ".join(f"{r['load_average_before']}" for r in rows)
    prov = result.get("provenance", {})
    return (targets(rows) + "\n\n" + table(rows) + f"\n\n{result['cpus']} CPU cores, {result['torch_threads']} "
            f"torch threads; load average before each size: {loads}; {result['seconds_total']} s in all"
            + (f" ({prov['date'][:10]}, commit `{prov['commit'][:7]}`)" if prov.get("commit") else "")
            + f".\n\n`{result['command']}`")
