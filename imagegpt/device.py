"""Where and how the model computes: the device, bf16 autocast, memory limits checked before
allocating, the CPU threads that suit the machine now (its CPUs, cgroup quota and the load of other
processes), and which kernels this CPU runs.

torch is imported in the functions that use it, on purpose: reproduce.py and the settings modules read
this module (its constants, its memory and thread readings) without loading torch.
"""
import math
import os
import re
import sys
import tempfile
import time
from contextlib import nullcontext

from imagegpt.errors import UserError


def memory_bytes(device="cpu"):
    """How many bytes `device` can hold at most: a CUDA device's memory, or the machine's physical
    memory (less, under a cgroup memory limit). None if unknown."""
    if str(device).startswith(("cuda", "auto")):
        import torch
        if torch.cuda.is_available():
            index = int(str(device).partition(":")[2] or 0)
            return torch.cuda.get_device_properties(index).total_memory if index < torch.cuda.device_count() else None
        if str(device).startswith("cuda"):
            return None
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit) as f:
                total = min(total, int(f.read().strip()))
        except (OSError, ValueError):   # absent, or "max"
            pass
    return total


def human_bytes(n):
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.3g} EB"


def check_memory(need, what, device="cpu", hint=""):
    """Refuse in one line, before allocating, what could not fit in `device`'s memory even when
    nothing else ran: `need` is a lower bound of the bytes `what` takes."""
    have = memory_bytes(device)
    if have is not None and need > have:
        raise UserError(f"{what} needs at least {human_bytes(need)}, more than the "
                        f"{human_bytes(have)} of memory {'on ' + str(device) if str(device).startswith('cuda') else 'this machine has'}"
                        f"{'; ' + hint if hint else ''}")


BF16 = ("auto", "true", "false")


BF16_DECODE_MIN_WIDTH = 256   # on a CPU, "auto" decodes in bf16 only for models at least this wide


def bf16_autocast(setting, device, decode_width=None):
    """The precision to compute in: a bf16 autocast context, or a null one for fp32. setting "auto" takes
    bf16 where the device computes it natively (a CUDA GPU with bf16; a CPU with AVX512-BF16 or AMX
    instructions, native_cpu_bf16), "true" insists (an error where there are no bf16 kernels at all; on
    a CPU without the instructions oneDNN emulates them, about 2x slower than fp32 for the demo), "false"
    keeps fp32.

    decode_width: the model's width (n_embd) when the work is token-by-token decoding (sample.py).
    On a CPU "auto" then takes bf16 only for models at least BF16_DECODE_MIN_WIDTH wide: one token's
    matrices of a narrow model are too small for the bf16 kernels to pay for the casts (the demo
    model, 128 wide, decodes about 2x slower in bf16; the v2 model, 384 wide, 1.3x faster; see the
    performance page, docs/performance.md)."""
    import torch
    if setting not in BF16:
        raise UserError(f"bf16: expected auto, true or false, got {setting!r}")
    cuda = str(device).startswith("cuda")
    supported = torch.cuda.is_bf16_supported() if cuda else torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if setting == "true" and not supported:
        raise UserError(f"bf16 true: {device} has no bf16 support here; use auto or false")
    narrow = decode_width is not None and decode_width < BF16_DECODE_MIN_WIDTH
    if setting == "false" or not supported or (setting == "auto" and not cuda and (narrow or not native_cpu_bf16())):
        return nullcontext()
    return torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16)


def native_cpu_bf16():
    """Does this CPU have bf16 instructions (AVX512-BF16 or AMX)? Without them oneDNN's bf16 kernels
    emulate bf16 in fp32 instructions: the demo trains about 2x slower than in fp32 (docs/training.md)."""
    import torch
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def resolve_device(name, where="--device"):
    """'auto', 'cpu', 'cuda' or 'cuda:N' -> the device to use ('cpu', 'cuda' or 'cuda:N'), checked
    against what this machine has."""
    import torch
    if not isinstance(name, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", name):
        raise UserError(f"{where}: expected auto, cpu, cuda or cuda:N, got {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"{where} {name}: no CUDA device is available")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UserError(f"{where} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return name


# ----------------------------------------------------------------------------- CPU threads

THREADS_ENV = "IMAGEGPT_THREADS"   # threads for torch (and onnxruntime) when --threads is 0 (auto)

# A CPU that other processes keep busy more than this share of the time is left to them. From issue 37's
# table (2 cores, the demo's training step): 2 threads take 113 ms idle and 378 ms beside a busy loop, 1
# thread about 200 ms either way, so 2 threads stop paying at about a third of a CPU taken by others.
BUSY_SHARE = 0.3

LOAD_WINDOW = 0.2   # seconds over which choose_threads() samples what other processes use (20 ticks per CPU)


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def cgroup_cpus(root="/"):
    """The CPU quota of this process's cgroup in CPUs (cgroup v2 cpu.max, or v1 cpu.cfs_quota_us /
    cpu.cfs_period_us; the smallest along the path up to the root), or None where there is none."""
    quotas = []
    for line in (_read(os.path.join(root, "proc/self/cgroup")) or "0::/\n").splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        path = path.strip().lstrip("/")
        parts = path.split("/") if path else []
        if controllers == "":   # v2
            folders = [os.path.join(root, "sys/fs/cgroup", *parts[:i]) for i in range(len(parts), -1, -1)]
            for d in folders:
                text = (_read(os.path.join(d, "cpu.max")) or "").split()
                if len(text) == 2 and text[0] != "max":
                    quotas.append(int(text[0]) / int(text[1]))
        elif "cpu" in controllers.split(","):
            for name in (controllers, "cpu", "cpu,cpuacct"):
                for i in range(len(parts), -1, -1):
                    d = os.path.join(root, "sys/fs/cgroup", name, *parts[:i])
                    quota, period = _read(os.path.join(d, "cpu.cfs_quota_us")), _read(os.path.join(d, "cpu.cfs_period_us"))
                    if quota and period and int(quota) > 0 and int(period) > 0:
                        quotas.append(int(quota) / int(period))
    return min(quotas) if quotas else None


def physical_cores(cpus, root="/"):
    """How many physical cores the logical CPUs `cpus` sit on (hyperthreads of one core count once;
    without the topology files, each CPU counts)."""
    cores = set()
    for c in cpus:
        topo = os.path.join(root, f"sys/devices/system/cpu/cpu{c}/topology")
        core, package = _read(os.path.join(topo, "core_id")), _read(os.path.join(topo, "physical_package_id"))
        cores.add((package.strip(), core.strip()) if core and package else ("cpu", c))
    return len(cores)


def cpu_ticks(cpus, root="/"):
    """(busy, total) clock ticks of the logical CPUs `cpus` since boot, from /proc/stat: busy is user, nice,
    system, irq, softirq and steal (time the hypervisor gave to others); idle and iowait are free."""
    busy = total = 0
    for line in (_read(os.path.join(root, "proc/stat")) or "").splitlines():
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        v = [int(x) for x in fields[:8]] + [0] * (8 - len(fields[:8]))
        user, nice, system, idle, iowait, irq, softirq, steal = v
        busy += user + nice + system + irq + softirq + steal
        total += user + nice + system + idle + iowait + irq + softirq + steal
    return busy, total


def own_ticks(root="/"):
    """The clock ticks this process (all its threads) has run, user and system, from /proc/self/stat."""
    text = _read(os.path.join(root, "proc/self/stat")) or ""
    fields = text[text.rfind(")") + 2:].split()   # after the command name, which may hold spaces
    return int(fields[11]) + int(fields[12]) if len(fields) > 12 else 0


class LoadSample:
    """A snapshot of the CPUs' ticks and this process's own; others_since(earlier) -> how many CPUs
    other processes kept busy, on average, between the two snapshots."""

    def __init__(self, cpus, root="/"):
        self.busy, self.total = cpu_ticks(cpus, root)
        self.own = own_ticks(root)
        self.n = max(1, len(cpus))

    def others_since(self, earlier):
        elapsed = (self.total - earlier.total) / self.n        # ticks per CPU
        if elapsed <= 0:
            return None
        others = (self.busy - earlier.busy) - (self.own - earlier.own)
        return max(0.0, others / elapsed)


def cpu_offer(root="/", affinity=None):
    """What the machine offers this process: {"cpus": logical CPUs it may run on (sched_getaffinity),
    "cores": the physical cores they sit on, "quota": the cgroup CPU quota or None, "limit": the most
    threads worth running (cores, at most the quota rounded down, at least 1)}."""
    if affinity is None:
        try:
            affinity = sorted(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            affinity = list(range(os.cpu_count() or 1))
    cores = physical_cores(affinity, root)
    quota = cgroup_cpus(root)
    limit = max(1, min(cores, int(quota)) if quota is not None else cores)
    return {"cpus": list(affinity), "cores": cores, "quota": quota, "limit": limit}


def threads_for(limit, others):
    """Threads to run on `limit` CPUs of which other processes keep `others` busy (in CPUs): every CPU
    whose share taken by others is above BUSY_SHARE is left to them (a thread that the scheduler
    preempts holds up each parallel region of the others), at least one."""
    if others is None:
        return limit
    return max(1, min(limit, limit - math.ceil(others - BUSY_SHARE)))


def choose_threads(root="/", affinity=None, window=LOAD_WINDOW, sleep=None):
    """Threads for torch on this machine now -> (n, why): the CPUs this process may use (affinity,
    physical cores, cgroup quota) less those other processes keep busy, sampled from /proc/stat over
    `window` seconds (this process's own ticks taken out). why: {"cpus", "cores", "quota", "limit",
    "others"} (others in CPUs; None where /proc/stat is not there)."""
    offer = cpu_offer(root, affinity)
    before = LoadSample(offer["cpus"], root)
    (sleep or time.sleep)(window)
    others = LoadSample(offer["cpus"], root).others_since(before)   # None without /proc/stat
    n = threads_for(offer["limit"], others)
    return n, {**offer, "others": None if others is None else round(others, 2)}


def threads_setting(value, where="--threads", env=None):
    """The user's thread choice -> (n or None for auto, where it came from): value (a --threads or config
    setting: 0 or "auto" is auto), then the IMAGEGPT_THREADS environment variable, then OMP_NUM_THREADS
    (which torch itself honours), then auto."""
    env = os.environ if env is None else env

    def number(v, what):
        text = str(v).strip().lower()
        if text in ("", "0", "auto"):
            return None
        if not text.isdigit():
            raise UserError(f"{what}: expected a number of threads or 0 (auto), got {v!r}")
        return int(text)

    for v, what in ((value, where), (env.get(THREADS_ENV), THREADS_ENV), (env.get("OMP_NUM_THREADS"), "OMP_NUM_THREADS")):
        if v is not None and number(v, what):
            return number(v, what), what
    return None, "auto"


def use_threads(value=0, where="--threads", log=None):
    """Set torch's intra-op threads from the user's choice (threads_setting) or, on auto, from what the
    machine offers now (choose_threads) -> {"threads", "source", and on auto the offer and load}."""
    import torch
    n, source = threads_setting(value, where)
    info = {"source": source}
    if n is None:
        n, why = choose_threads()
        info.update(why)
    torch.set_num_threads(n)
    info["threads"] = n
    if log:
        log(f"threads: {describe_threads(info)}")
    return info


def describe_threads(info):
    """One line for what use_threads chose and why."""
    n = info["threads"]
    if info["source"] != "auto":
        return f"{n} (set by {info['source']})"
    quota = f", quota {info['quota']:g}" if info.get("quota") is not None else ""
    others = f", other processes use {info['others']:.2f} CPUs" if info.get("others") is not None else ""
    return f"{n} (auto: {info['limit']} of {len(info['cpus'])} CPUs{quota}{others})"


class ThreadAdapter:
    """Re-checks, every `interval` seconds, what the machine offers and sets torch's threads to it, for a
    choice that use_threads made on auto (info); a fixed choice never changes. The load of other processes
    is averaged over the time since the last check (no waiting). check() -> the new count when it
    changed (previous: the count before it, others: the load it saw), else None; take_used() -> the
    counts used since the last take_used(), in order."""

    def __init__(self, info, interval=30.0, root="/", clock=None):
        self.clock = clock or time.monotonic
        self.auto = info["source"] == "auto"
        self.threads, self.interval, self.root = info["threads"], interval, root
        self.previous, self.others, self.used = None, info.get("others"), [self.threads]
        self.offer = cpu_offer(root, info.get("cpus")) if self.auto else None
        self.last = self.clock()
        self.sample = LoadSample(self.offer["cpus"], root) if self.auto else None

    def check(self):
        if not self.auto or self.clock() - self.last < self.interval:
            return None
        now = LoadSample(self.offer["cpus"], self.root)
        others = now.others_since(self.sample)
        self.sample, self.last = now, self.clock()
        n = threads_for(self.offer["limit"], others)
        self.others = others
        if n == self.threads:
            return None
        import torch
        torch.set_num_threads(n)
        self.previous, self.threads = self.threads, n
        self.used.append(n)
        return n

    def note(self):
        """One line for the last change."""
        load = "" if self.others is None else \
            f" (other processes used {self.others:.2f} of {len(self.offer['cpus'])} CPUs over the last {self.interval:.0f} s)"
        return f"threads {self.previous} -> {self.threads}{load}"

    def take_used(self):
        used, self.used = self.used, [self.threads]
        return used


# ----------------------------------------------------------------------------- which kernels this CPU runs

CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
             "amx_bf16")


def cpu_description(root="/"):
    """{"model", "vendor", "flags"} of this CPU from /proc/cpuinfo (flags: those of CPU_FLAGS it has)."""
    lines = (_read(os.path.join(root, "proc/cpuinfo")) or "").splitlines()
    get = lambda key: next((ln.split(":", 1)[1].strip() for ln in lines if ln.split(":")[0].strip() == key), "")
    flags = set(get("flags").split())
    return {"model": get("model name") or None, "vendor": get("vendor_id") or None,
            "flags": [f for f in CPU_FLAGS if f in flags]}


def mkl_path(cpu, env=None):
    """The instruction set of MKL's sgemm (torch's fp32 matmul on x86), derived: MKL takes the widest its
    build has on an Intel CPU (AVX-512 or AVX2, capped by MKL_ENABLE_INSTRUCTIONS), and on an AMD CPU its
    code path for Zen, AVX2 kernels, even where the CPU has AVX-512 (MKL reports no ISA there: its
    verbose header says "Intel(R) Architecture processors"; on a Zen 5 EPYC MKL's sgemm ran at 94 GFLOP/s
    on one core where oneDNN's AVX-512 kernel ran at 217 and its AVX2 kernel near MKL)."""
    env = os.environ if env is None else env
    flags = set(cpu["flags"])
    cap = env.get("MKL_ENABLE_INSTRUCTIONS", "").upper()
    if cpu.get("vendor") == "AuthenticAMD":
        if cap:   # the generic path of that instruction set (on the Zen 5 EPYC, slower than the Zen path)
            return f"{cap} (MKL_ENABLE_INSTRUCTIONS)"
        return "AVX2 (MKL's code path for AMD Zen)" if "avx2" in flags else "SSE (MKL on an AMD CPU without AVX2)"
    if "avx512f" in flags and cap not in ("AVX2", "AVX", "SSE4_2"):
        return "AVX-512"
    return "AVX2" if "avx2" in flags and cap not in ("AVX", "SSE4_2") else "AVX or older"


def mlas_path(cpu):
    """onnxruntime's MLAS kernels on this CPU, derived from its flags by the order MLAS's platform.cpp picks
    them (onnxruntime has no query for it): {"fp32": sgemm kernel, "int8": the u8s8 kernel of the int8
    graph's MatMulInteger}."""
    f = set(cpu["flags"])
    fp32 = "AVX512F" if "avx512f" in f else "FMA3 (AVX2)" if {"avx2", "fma"} <= f else "SSE/AVX"
    if {"amx_tile", "amx_int8"} <= f:
        int8 = "AMX"
    elif {"avx512f", "avx512bw", "avx512_vnni"} <= f:
        int8 = "AVX512-VNNI (vpdpbusd)"
    elif {"avx512f", "avx512bw"} <= f:
        int8 = "AVX512 core (vpmaddubsw, saturating)"
    elif "avx_vnni" in f:
        int8 = "AVX-VNNI (vpdpbusd)"
    elif "avx2" in f:
        int8 = "AVX2 (vpmaddubsw, saturating: hence 7-bit weights)"
    else:
        int8 = "SSE"
    return {"fp32": fp32, "int8": int8}


_ONEDNN_ISA = []   # oneDNN prints its ISA line once a process: the first call keeps it here for the next ones


def onednn_kernels():
    """oneDNN's ISA and the kernels it creates for an fp32 and (where supported) a bf16 matrix product, read
    from its verbose output (ONEDNN_VERBOSE; ONEDNN_MAX_CPU_ISA caps it) -> {"isa", "fp32", "bf16"}, values
    None where nothing was printed. torch computes fp32 matmuls with MKL, bf16 ones (autocast) with oneDNN."""
    import torch
    out = {"isa": _ONEDNN_ISA[0] if _ONEDNN_ISA else None, "fp32": None, "bf16": None}
    if not torch.backends.mkldnn.is_available():
        return out
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                a = torch.randn(256, 256)
                torch._C._nn.mkldnn_linear(a.to_mkldnn(), a.to_mkldnn(), None)
                if torch.ops.mkldnn._is_mkldnn_bf16_supported():
                    a.bfloat16() @ a.bfloat16()
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        lines = f.read().decode(errors="replace").splitlines()
    for ln in lines:
        parts = ln.split(",")
        if ",info,cpu,isa:" in ln:
            out["isa"] = ln.split("isa:", 1)[1].strip()
            _ONEDNN_ISA[:] = [out["isa"]]
        elif len(parts) > 9 and parts[2:4] == ["primitive", "exec"] and parts[5] in ("matmul", "inner_product"):
            out["bf16" if "src:bf16" in ln else "fp32"] = f"{parts[5]} {parts[6]}"
    return out


def cpu_kernels():
    """Which kernels this process's CPU work runs: the CPU (model, vendor, flags of interest), torch's ATen
    vector kernels (its CPU capability: ATEN_CPU_CAPABILITY caps it), MKL's sgemm path (derived, mkl_path),
    oneDNN's ISA and matmul kernels (measured, onednn_kernels) and onnxruntime's MLAS kernels (derived,
    mlas_path)."""
    import torch
    cpu = cpu_description()
    return {"cpu": cpu, "aten": torch.backends.cpu.get_cpu_capability(),
            "fp32_matmul": f"MKL sgemm, {mkl_path(cpu)}" if torch.backends.mkl.is_available() else "ATen/BLAS",
            "onednn": onednn_kernels(), "onnxruntime_mlas": mlas_path(cpu),
            "env": {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
                                                "OMP_NUM_THREADS", THREADS_ENV) if k in os.environ}}
