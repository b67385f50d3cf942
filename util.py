"""Small shared helpers: the one-line user error, atomic file writes, and the CLI wrapper."""
import json
import os
import sys
import tempfile
from contextlib import contextmanager


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit status 2, no traceback."""


def run_cli(main):
    """Run main() and turn UserError (and Ctrl-C, a closed pipe, an OSError such as a full disk) into
    one line on stderr and a non-zero exit, never a traceback."""
    try:
        code = main()
        sys.stdout.flush()  # `python eval.py | head`: a closed pipe shows up here, inside the try
    except UserError as e:
        _fail(f"error: {e}", 2)
    except BrokenPipeError:  # the reader went away: stop quietly, as a killed-by-SIGPIPE tool would
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        sys.exit(141)
    except OSError as e:  # disk full, permissions, ...: not a bug of the program, so no traceback
        where = f"{e.filename}: " if e.filename else ""
        _fail(f"error: {where}{e.strerror or e}", 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    sys.exit(code)


def _fail(line, code):
    """Close any progress bar first (so the message gets a line of its own), then print and exit."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # never let a progress bar hide the message
            pass
    print(line, file=sys.stderr)
    sys.exit(code)


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


def write_text(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def not_safetensors(path, error):
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
