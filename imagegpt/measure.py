"""Measuring a call: its time (synchronised on CUDA), several sides alternated so that a shared machine's
drift falls on all of them alike, medians; and memory: CUDA's allocator peak, or a process's resident
memory from /proc (now or at its peak), the one reading the benchmark, the load test and scale.py share."""
import ctypes
import gc
import resource
import statistics
import sys
import time
from dataclasses import dataclass

import torch


def log(msg):
    """A measurement's progress line (stderr, so that the report on stdout stays clean)."""
    print(msg, file=sys.stderr, flush=True)


def status_kb(key, pid="self"):
    """A line of /proc/PID/status in kB (VmRSS: resident memory now; VmHWM: its peak), or None where it
    cannot be read (the process ended, not Linux)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(seconds, result) of one call, synchronised on CUDA."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def _reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn, device):
    """Run fn once -> (result, peak bytes above the start, method)."""
    gc.collect()
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        sync(device)
        return out, torch.cuda.max_memory_allocated(device) - before, "cuda max_memory_allocated"
    _malloc_trim()       # hand freed heap pages back first, so that reuse of them shows as growth
    before = status_kb("VmRSS")
    if before is not None and _reset_peak_rss():
        out = fn()
        return out, max(0, status_kb("VmHWM") - before) * 1024, "peak RSS growth (VmHWM)"
    unit = 1 if sys.platform == "darwin" else 1024      # ru_maxrss: bytes on macOS, kB on Linux
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fn()
    return out, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start) * unit, \
        "ru_maxrss growth (a lower bound: never reset)"


def alternate(fns, reps, device, between=None, label=""):
    """Time each of fns (name -> fn) reps times, alternating the order every repetition.
    -> (name -> wall seconds, name -> process CPU seconds). between() runs after each repetition."""
    names = list(fns)
    times = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            c = time.process_time()
            times[n].append(timed(fns[n], device)[0])
            cpu[n].append(time.process_time() - c)
        if between:
            between()
        log(f"  {label} rep {r + 1}/{reps}: " + ", ".join(f"{n} {times[n][-1]:.3f}s" for n in names))
    return times, cpu


def cpu_ratio(cpu):
    """theirs / ours in median process CPU time (threads' spin-waits included)."""
    return median(cpu["theirs"]) / median(cpu["ours"]) if median(cpu["ours"]) > 0 else None


def median(xs):
    return statistics.median(xs) if xs else float("nan")


@dataclass
class Timing:
    """How a measure is timed: `warmup` untimed calls of each side, then `reps` repetitions alternated
    (alternate()); label: what the log lines say."""
    reps: int
    warmup: int
    label: str = ""


def warm_up(fns, warmup):
    """Call each side once (-> {name: its first result}), then warmup - 1 more times."""
    first = {n: fn() for n, fn in fns.items()}
    for _ in range(max(0, warmup - 1)):
        for fn in fns.values():
            fn()
    return first
