"""Where and how the model computes: the device, bf16 autocast, and memory limits checked before
allocating."""
import os
import re

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
    from contextlib import nullcontext

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
