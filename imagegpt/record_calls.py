"""The library calls of the record's parts: what a step does that no command does (collecting a training's
summary or a data folder's report, the client without torch, the test suite, the README's first command
from a fresh clone), each writing its result file with its provenance."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

from imagegpt.errors import UserError
from imagegpt.files import read_json, write_json
from imagegpt.provenance import KEY, ROOT, code_state, record
from imagegpt.stats import seed_summary


def at(path):
    """A path of the record (relative to the repository root, where its commands run) to open here."""
    return os.path.join(ROOT, path)


def last_record(run):
    """A run folder's last log.jsonl record (its final step, time and evaluation)."""
    with open(at(os.path.join(run, "log.jsonl")), encoding="utf-8") as f:
        return json.loads(f.read().splitlines()[-1])


def training_summary(run, out):
    """A run folder of `train.py --seeds` -> out: each seed's steps, training seconds and development
    accuracy of final/ (from its log.jsonl and the run's seeds.json), with seeds.json's provenance."""
    seeds = read_json(at(os.path.join(run, "seeds.json")), "seeds.json")
    rows = []
    for r in seeds["runs"]:
        last = last_record(r["out_dir"])
        rows.append({"seed": r["seed"], "steps": last["step"], "training_seconds": round(last["time"], 1),
                     "final_dev_accuracy": r["final_dev_accuracy"]})
    write_json(at(out), {"runs": rows, "training_seconds": seed_summary([r["training_seconds"] for r in rows]),
                     "final_dev_accuracy": seeds["final_dev_accuracy"], KEY: seeds.get(KEY)})


def data_report(data, out, command, run=None):
    """A prepared data folder's report.json (what the tokenisation keeps: PSNR, distinct sequences) ->
    out, with the provenance of the command that prepared it; with `run`, a run folder trained on it, also
    its steps and training seconds (from its log.jsonl)."""
    report = read_json(at(os.path.join(data, "report.json")), "report.json")
    if run:
        last = last_record(run)
        report["training"] = {"steps": last["step"], "seconds": round(last["time"], 1)}
    write_json(at(out), {**report, KEY: record(command=command)})


def client(ckpt, export, work, out, limit=0):
    """The client without torch on the checkpoint's test images (imagegpt/client_parity.py) -> out."""
    from imagegpt.client_parity import client_parity   # here: it loads torch, which reproduce.py needs nowhere else
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
