"""Files: atomic writes of files and folders, the run-folder lock, JSON, and reading weights.

Every output of the project is written under a temporary name and renamed into place (files with
atomic_path, folders with atomic_dir), so an error or a kill leaves the old version or the new one,
never a mix. Outputs get the usual file mode (0666 less the umask), weights included. A run folder is
held by one process at a time (lock_folder). Weights are read from safetensors only, never unpickled.
"""
import fcntl
import glob
import json
import os
import shutil
import tempfile
from contextlib import contextmanager

from imagegpt.errors import UserError, printable


def output_problem(path):
    """Why `path` cannot be created as a file or folder (an existing part of it is a file), or None."""
    d = os.path.dirname(os.path.abspath(path))
    while d and not os.path.exists(d):
        d = os.path.dirname(d)
    if d and not os.path.isdir(d):
        return f"{d} is a file"
    if d and not os.access(d, os.W_OK | os.X_OK):
        return f"{d} is not writable"
    return None


def check_dir(path, what="output folder"):
    """Fail before any work if `path` cannot be (or become) a folder that this user can write in."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{path}: is a file; the {what} must be a folder")
    if os.path.isdir(path):
        problem = None if os.access(path, os.W_OK | os.X_OK) else f"{path} is not writable"
    else:
        problem = output_problem(path)
    if problem:
        raise UserError(f"{path}: cannot create the {what} ({problem})")


def check_file(path, what="output"):
    """Fail before any work if `path` cannot be written as a file (it is a folder, or under a file, or
    in a folder this user may not write to)."""
    if os.path.isdir(path) or str(path).endswith(os.sep):
        raise UserError(f"{path}: is a folder; the {what} must be a file path")
    problem = output_problem(path)
    if problem:
        raise UserError(f"{path}: cannot write the {what} ({problem})")


def check_outputs(*paths):
    """Fail before any work if two outputs of one command are the same file (one would overwrite the
    other)."""
    seen = {}
    for p in paths:
        if p is None:
            continue
        key = os.path.realpath(p)
        if key in seen:
            raise UserError(f"{p}: given for two outputs (the same file as {seen[key]}); choose different files"
                            if seen[key] != p else f"{p}: given for two outputs; choose different files")
        seen[key] = p


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
        share_files(tmp)  # some writers (safetensors) make private files: outputs are for sharing
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


def share_files(folder):
    """Give every file under `folder` the usual mode of a new file (0666 less the umask)."""
    mode = 0o666 & ~umask()
    for d, _, files in os.walk(folder):
        for f in files:
            os.chmod(os.path.join(d, f), mode)


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


class FolderLock:
    """An advisory lock on a folder: fcntl.flock on `folder/.lock`, which holds the owner's pid (for the
    message the next process gets). The kernel drops a flock when its process dies, however it dies, so
    a lock file left by a killed process never blocks anyone: the next process simply takes it."""
    NAME = ".lock"

    def __init__(self, folder, fd, made, restore):
        self.folder, self.fd = folder, fd
        self.path = os.path.join(folder, self.NAME)
        self.made = made          # the folders lock_folder() created, the deepest first
        self.restore = restore    # (folder, its stat before the lock, its mtime right after) or None

    def release(self):
        """Remove the lock file (while still holding it) and close it, and remove the folders that
        lock_folder() created if nothing else was written there. A run that changed nothing else
        leaves no trace, not even a new modification time on the folder that held the lock."""
        if self.fd is None:
            return
        unchanged = self.restore and os.stat(self.restore[0]).st_mtime_ns == self.restore[2]
        try:
            os.remove(self.path)
        except OSError:
            pass
        os.close(self.fd)   # closing drops the flock
        self.fd = None
        for d in self.made:
            try:
                os.rmdir(d)       # only if empty
            except OSError:
                unchanged = False
                break
        if unchanged:
            before = self.restore[1]
            os.utime(self.restore[0], ns=(before.st_atime_ns, before.st_mtime_ns))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def lock_folder(folder, what="folder", hint=""):
    """Create `folder` if needed and lock it for this process -> FolderLock. If another living process
    holds it: a UserError naming that process's pid."""
    made, top = [], os.path.abspath(folder)
    while top and not os.path.exists(top):
        made.append(top)
        top = os.path.dirname(top)
    path = os.path.join(folder, FolderLock.NAME)
    new = not os.path.exists(path)
    before = os.stat(top) if new else None     # top: the folder whose entries the lock adds to
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UserError(f"{folder}: cannot create the {what} ({output_problem(folder) or e.strerror})") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"{path}: cannot create the lock file of the {what} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            except OSError:
                pid = "unknown"
            os.close(fd)
            raise UserError(f"{folder}: the {what} is in use by another process (pid {pid}, lock file "
                            f"{path}){hint}") from None
        # the holder may have removed the file between our open() and flock(): then we locked a file
        # nobody else will look at, so start again on the new one
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    restore = (top, before, os.stat(top).st_mtime_ns) if new else None
    return FolderLock(folder, fd, made, restore)


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


def json_type(v):
    """How a JSON value's type is named in messages."""
    if isinstance(v, bool):
        return "true/false"
    if v is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def check_finite_tensors(tensors, where):
    """Weights with NaN or inf in them (a diverged training run) are refused when read."""
    for k, v in tensors.items():
        if v.is_floating_point() and not bool(v.isfinite().all()):
            raise UserError(f"{where}: {k} holds non-finite values (NaN or inf); these weights are unusable "
                            f"(a training run that diverged?)")


def load_safetensors(path):
    """safetensors.torch.load_file, also for a path that is not UTF-8 (which safetensors refuses)."""
    from safetensors.torch import load, load_file   # here: it loads torch, which settings and reproduce.py do not need
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        with open(path, "rb") as f:
            return load(f.read())
    return load_file(path)


def read_weights(path, missing=""):
    """A weights file -> {name: tensor}; a missing file (`missing` adds a hint), a truncated or foreign
    one and a pickle are each one UserError line."""
    from safetensors import SafetensorError   # as above
    try:
        return load_safetensors(path)
    except FileNotFoundError:
        raise UserError(f"{printable(path)}: missing{missing}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(safetensors_error(path, e)) from None


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
