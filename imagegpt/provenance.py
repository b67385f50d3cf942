"""Provenance: which code, command, settings, seeds and machine made a result file, and writing a
result file with it.

Every JSON result file a command writes for the docs (eval.py's metrics, baselines.py's report,
bench.py's, train.py's summary of seeds, the drawing report, the load test, the export's parity) ends
with a "provenance" key, record():

    commit, dirty, dirty_files   the git commit of the code and whether the code differs from it
                                 (outputs, data and prose do not count: runs/, data/, docs/, README.md,
                                 node_modules)
    command, config_sha256       the exact command line, and a hash of the settings it ran with
    seeds, dtype                 the seeds, and the precision the model computed in
    machine                      CPU model, its instruction sets that change floating-point kernels
                                 (AVX2, AVX-512, VNNI, BF16, AMX), cores this process may use, torch's
                                 threads, load average
    versions                     python, torch, onnxruntime, numpy, transformers
    date, started, wall_seconds  UTC, ISO 8601: when the file was written; when the process started

write_result() adds it as the file's last key, so that the rest stays as the command wrote it before;
without_provenance() and same_results() compare two result files on everything else.
"""
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from importlib import metadata

from imagegpt.device import bf16_autocast
from imagegpt.files import read_json, write_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the repository
KEY = "provenance"

# changes under these paths do not change what a command computes: outputs, data, prose, the npm packages
NOT_CODE = ("runs/", "data/", "docs/", "README.md", "node_modules")

# the CPU's instruction sets that decide which floating-point kernels run (and so the last bits of a result)
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")

VERSIONS = ("torch", "onnxruntime", "numpy", "transformers")

_IMPORTED = time.time()


def git(*args):
    """The output of a git command in the repository, or None (no git, or not a repository)."""
    try:
        done = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.decode("utf-8", "surrogateescape") if done.returncode == 0 else None


def code_state():
    """-> (commit, dirty, the changed paths that count): the repository's HEAD, and whether its code
    differs from it, untracked files included, changes under NOT_CODE not (None, None, [] outside git)."""
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain=v1", "-z", "--untracked-files=normal")
    if commit is None or status is None:
        return None, None, []
    changed = changed_code(status)
    return commit.strip(), bool(changed), changed


def changed_code(status):
    """`git status --porcelain=v1 -z` -> the changed and untracked paths that are code (not NOT_CODE)."""
    entries, changed = status.split("\0"), []
    i = 0
    while i < len(entries):
        entry = entries[i]
        i += 1
        if len(entry) < 4:
            continue
        if entry[0] in "RC":          # a rename or copy: the next entry is the path it came from
            i += 1
        path = entry[3:]
        if not path.startswith(NOT_CODE):
            changed.append(path)
    return sorted(changed)


def machine():
    """The CPU, the instruction sets of CPU_FLAGS it has, the cores this process may run on and the
    threads torch uses (and the GPU, where torch uses one)."""
    info = {"cpu": platform.processor() or platform.machine(), "cpu_flags": [], "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
        get = lambda key: next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(key)), "")
        info["cpu"] = get("model name") or info["cpu"]
        flags = set(get("flags").split())
        info["cpu_flags"] = [f for f in CPU_FLAGS if f in flags]
    except OSError:
        pass
    info["cpu_count"] = os.cpu_count()
    info["cores_available"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch = sys.modules.get("torch")      # threads as this process set them; torch is not imported for this
    info["torch_threads"] = torch.get_num_threads() if torch else None
    if torch and torch.cuda.is_available() and torch.cuda.is_initialized():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        info["load_average"] = None
    return info


def versions():
    """Python and the installed versions of the packages that compute results (None: not installed)."""
    out = {"python": platform.python_version()}
    for name in VERSIONS:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def process_start():
    """When this process started (seconds since the epoch), from /proc; else when this module was imported."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])    # field 22, starttime, in clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return _IMPORTED


def canonical(obj):
    """Settings as plain JSON values: dataclasses and argparse namespaces as dicts, tuples as lists."""
    if is_dataclass(obj) and not isinstance(obj, type):
        return canonical(asdict(obj))
    if hasattr(obj, "__dict__") and type(obj).__name__ == "Namespace":
        return canonical(vars(obj))
    if isinstance(obj, dict):
        return {str(k): canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return str(obj)


def config_hash(config):
    """sha256 of the settings as canonical JSON (sorted keys, no spaces), or None without settings."""
    if config is None:
        return None
    text = json.dumps(canonical(config), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()


def command_line(argv=None):
    """The command as it was typed, from the repository root: `python eval.py --ckpt ...`."""
    argv = list(sys.argv if argv is None else argv)
    if argv and os.path.isabs(argv[0]) and argv[0].startswith(ROOT + os.sep):
        argv[0] = os.path.relpath(argv[0], ROOT)
    return "python " + shlex.join(argv)


def precision(setting="false", device="cpu", decode_width=None, backend="torch"):
    """The precision a model computes in: 'fp32' or 'bf16' as device.bf16_autocast decides for this
    setting and device, or the ONNX graph's ('onnx fp32', 'onnx int8')."""
    if backend != "torch":
        return "onnx int8" if backend.endswith("int8") else "onnx fp32"
    return "fp32" if isinstance(bf16_autocast(setting, device, decode_width), nullcontext) else "bf16"


def record(command=None, config=None, seeds=None, dtype=None):
    """The provenance of a result written now by this process (see the module's docstring)."""
    commit, dirty, changed = code_state()
    start, now = process_start(), time.time()
    iso = lambda t: datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")
    return {"commit": commit, "dirty": dirty, "dirty_files": changed[:20],
            "command": command if command is not None else command_line(),
            "config_sha256": config_hash(config),
            "seeds": [int(s) for s in seeds] if seeds is not None else None,
            "dtype": dtype, "machine": machine(), "versions": versions(),
            "date": iso(now), "started": iso(start), "wall_seconds": round(now - start, 1)}


def with_provenance(result, **how):
    """A copy of the result dict with its provenance as the last key (record(**how))."""
    return {**without_provenance(result), KEY: record(**how)}


def write_result(path, result, **how):
    """Write a JSON result file with its provenance (record(**how)), atomically (files.write_json)."""
    out = with_provenance(result, **how)
    write_json(path, out)
    return out


def without_provenance(result):
    """The result without its provenance: what two runs of the same code and settings must share."""
    return {k: v for k, v in result.items() if k != KEY} if isinstance(result, dict) else result


def same_results(a, b):
    """Do two result files hold the same results (everything but the provenance, byte for byte as
    files.write_json writes them)? -> (same, the first differing line or None)."""
    text = lambda path: json.dumps(without_provenance(read_json(path, "result file")), indent=2).splitlines()
    ta, tb = text(a), text(b)
    for i, (x, y) in enumerate(zip(ta, tb), 1):
        if x != y:
            return False, f"line {i}: {x.strip()} | {y.strip()}"
    if len(ta) != len(tb):
        return False, f"one file has {abs(len(ta) - len(tb))} more lines"
    return True, None
