"""Running the record (reproduce.py): each part of imagegpt/record_parts.py in a fresh folder, its result
files stamped and moved in only when every step succeeded, and whether a part is up to date.

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

The parts are defined in imagegpt/record_parts.py (the commands of the colour part in COLOUR, one place,
as that path is still changing), the library calls of their steps in imagegpt/record_calls.py.
"""
import ast
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time

from tqdm import tqdm

from imagegpt.errors import UserError
from imagegpt.files import lock_folder, read_json, write_json
from imagegpt.provenance import KEY, ROOT, canonical
from imagegpt.record_parts import BY_NAME, PARTS

RESULTS = "docs/results"          # where the record's result files go (the docs cite them from there)
WORK = "runs/record"              # the parts' folders
QUICK = "runs/record-quick"       # the same for quick runs, results in QUICK/results


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
                run_step(part, step, logf, lambda: tick(bar, t0))
                tick(bar, t0)
    finally:
        bar.close()
    took = round(time.monotonic() - t0, 1)
    finished = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
    stamp = {"part": part.name, "code_sha256": code, "settings_sha256": settings, "quick": ctx.quick,
             "finished": finished, "part_seconds": took}
    out_folder = os.path.join(ROOT, results_dir(ctx.quick, ctx.work if ctx.quick else None))
    for name, result in staged_results(part, ctx, stamp, log_path).items():
        write_json(os.path.join(out_folder, name), result)
    log(f"{part.name}: done in {human(took)}; wrote {', '.join(part.results)} in {os.path.relpath(out_folder, ROOT)}")
    return finished


def run_step(part, step, logf, tick_bar):
    """One step of a part: its command run from the repository root (output to the part's log, the bar
    ticked every second), or its library call; a failure is one line naming the part, the step, the log."""
    if step.call is not None:
        try:
            step.call(**step.kwargs)
        except UserError as e:
            raise UserError(f"part {part.name}: {step.what}: {e}") from None
        return
    logf.write("$ " + "".join(f"{k}={v} " for k, v in step.env) + "python " + " ".join(step.argv) + "\n")
    logf.flush()
    proc = subprocess.Popen([sys.executable, *step.argv], cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", **dict(step.env)})
    while True:
        try:
            rc = proc.wait(timeout=1)
            break
        except subprocess.TimeoutExpired:
            tick_bar()
        except KeyboardInterrupt:
            proc.wait()
            raise
    if rc != 0:
        raise UserError(f"part {part.name}: `python {' '.join(step.argv[:2])} ...` ({step.what}) failed "
                        f"(exit {rc}): {last_line(logf.name)}; the log: {logf.name}")


def staged_results(part, ctx, stamp, log_path):
    """The part's result files as its steps wrote them, each with the record's stamp in its provenance
    -> {name: result}; a missing file or one without provenance is one line."""
    staged = {}
    for name in part.results:
        path = os.path.join(ROOT, ctx.out(name))
        if not os.path.exists(path):
            raise UserError(f"part {part.name}: its steps did not write {name}; the log: {log_path}")
        result = read_json(path, "result file")
        if not isinstance(result, dict) or not isinstance(result.get(KEY), dict):
            raise UserError(f"{path}: has no provenance; every result file of the record must carry one")
        result[KEY]["record"] = dict(stamp)
        staged[name] = result
    return staged


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

