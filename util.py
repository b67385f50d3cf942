"""Files and errors: the one-line user error, atomic file and folder writes, JSON, the device name.

Every output of the project is written under a temporary name and renamed into place (files with
atomic_path, folders with atomic_dir), so an error or a kill leaves the old version or the new one,
never a mix.
"""
import glob
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit status 2, no traceback."""


def output_problem(path):
    """Why `path` cannot be created as a file or folder (an existing part of it is a file), or None."""
    d = os.path.dirname(os.path.abspath(path))
    while d and not os.path.exists(d):
        d = os.path.dirname(d)
    if d and not os.path.isdir(d):
        return f"{d} is a file"
    return None


def check_dir(path, what="output folder"):
    """Fail before any work if `path` cannot be (or become) a folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{path}: is a file; the {what} must be a folder")
    problem = output_problem(path)
    if problem:
        raise UserError(f"{path}: cannot create the {what} ({problem})")


def check_file(path, what="output"):
    """Fail before any work if `path` cannot be written as a file (it is a folder, or under a file)."""
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder; the {what} must be a file path")
    problem = output_problem(path)
    if problem:
        raise UserError(f"{path}: cannot write the {what} ({problem})")


def umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = str(path)
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-" + os.path.basename(path) + ".")
    except OSError as e:
        raise UserError(f"{path}: cannot write ({output_problem(path) or e.strerror})") from None
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes private files; outputs get the usual mode
        os.replace(tmp, path)
    except OSError as e:  # a full disk says so at write, flush or fsync, without naming the file
        if e.filename is None or e.filename == tmp:
            e.filename, e.filename2 = path, None
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def atomic_dir(folder, what="folder"):
    """Yield a new temporary folder next to `folder`; if the block succeeds, swap it in by renames
    (`folder` -> `folder.old`, temporary -> `folder`, then remove `folder.old`). A kill between the
    renames leaves `folder.old`, which resolve_dir() reads and tidy_dir() removes. Only one process
    may write a given folder (runs hold a lock on their run folder)."""
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    try:
        os.makedirs(parent, exist_ok=True)
        tidy_dir(folder)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(folder)}.tmp-")
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes a private folder; outputs are for sharing
    except OSError as e:
        raise UserError(f"{folder}: cannot write {what} ({output_problem(folder) or e.strerror})") from None
    try:
        yield tmp
        old = folder + ".old"
        if os.path.exists(folder):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:  # a full disk, permissions: one line naming the folder, the old one kept
        raise UserError(f"{folder}: cannot write {what} ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def tidy_dir(folder, marker="config.json"):
    """Remove what a killed atomic_dir() of `folder` may have left: its temporary folders, and
    `folder.old` once `folder` is complete (holds `marker`)."""
    folder = os.path.abspath(folder)
    pattern = os.path.join(glob.escape(os.path.dirname(folder)), f".{glob.escape(os.path.basename(folder))}.tmp-*")
    for tmp in glob.glob(pattern):
        shutil.rmtree(tmp, ignore_errors=True)
    if os.path.exists(os.path.join(folder, marker)):
        shutil.rmtree(folder + ".old", ignore_errors=True)


def resolve_dir(folder, marker="config.json"):
    """The folder to read: a kill between the two renames of atomic_dir() leaves only `folder.old`."""
    if not os.path.exists(os.path.join(folder, marker)) and os.path.exists(os.path.join(folder + ".old", marker)):
        return folder + ".old"
    return folder


def write_bytes(path, data):
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text(path, text):
    write_bytes(path, text.encode("utf-8"))


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def write_jsonl(path, records):
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_json(path, what="JSON file"):
    """Read a JSON file written by this project; any problem is a one-line UserError."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such {what}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (expected a {what})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); expected a {what}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def safetensors_error(path, error):
    """The one line for a weights file that safetensors cannot read. Pickles (a renamed
    pytorch_model.bin or torch.save file) are named as such: they are never unpickled, since
    unpickling a file can run any code in it."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        head = b""
    if head[:1] == b"\x80" or head[:4] == b"PK\x03\x04":
        kind = "a Python pickle" if head[:1] == b"\x80" else "a zip archive (the torch.save format)"
        return (f"{path}: is {kind}, not safetensors; pickled weights are never loaded (unpickling can "
                f"run code): convert them with safetensors in a trusted environment")
    return f"{path}: not a readable safetensors file ({error})"


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
