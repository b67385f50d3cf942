"""docs/results.md's table of the record's runs: for each part of `python reproduce.py`, when it last ran,
how long it took, on which commit and machine, read from the provenance of its result files; a part whose
files were made before they carried it (or that never ran) says so. Facts of the files only, never of the
code now, so the table changes only when a part runs again."""
from imagegpt.errors import UserError
from imagegpt.provenance import KEY
from imagegpt.record import human
from imagegpt.record_parts import PARTS


class Unrun(Exception):
    """The part has no result file with the record's stamp."""


def last_run(results, part):
    """(date, seconds, commit, machine) of the part's last run, from its first result file; Unrun if none."""
    try:
        prov = results.load(part.results[0]).get(KEY)
    except UserError:       # missing, unreadable, or without provenance: shown as not rerun
        raise Unrun() from None
    if not isinstance(prov, dict) or not isinstance(prov.get("record"), dict) or prov["record"].get("quick"):
        raise Unrun()
    m = prov.get("machine", {})
    threads = m.get("torch_threads")
    machine = f"{m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores" + \
        (f", {threads} thread{'s' * (threads > 1)}" if threads else "")
    return prov["record"]["finished"][:16].replace("T", " "), prov["record"]["part_seconds"], prov["commit"][:7], machine


def record_runs(results):
    """The table, and a line with the time of the parts run and the parts not rerun yet."""
    rows, total, unrun = [], 0.0, []
    for part in PARTS:
        try:
            date, seconds, commit, machine = last_run(results, part)
        except Unrun:
            unrun.append(part.name)
            rows.append((f"`{part.name}`", "not rerun yet", "", "", ""))
            continue
        total += seconds
        rows.append((f"`{part.name}`", f"{date} UTC", human(seconds), f"`{commit}`", machine))
    lines = ["| part | last run | wall time | commit | machine |", "|---|---|---:|---|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    done = len(PARTS) - len(unrun)
    lines += ["", f"{done} of {len(PARTS)} parts run by `python reproduce.py` (each part's last run), {human(total)} of "
                  "wall time in all"
                  + (f"; not rerun yet: {', '.join(unrun)}." if unrun else ".")]
    return "\n".join(lines)
