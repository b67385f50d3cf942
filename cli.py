"""The command-line style every script shares: the parser, the shared options, settings from YAML
files and --key value overrides, and the wrapper that turns errors into one line.

A script builds its parser with `parser(__doc__)`, adds the shared options it takes (`add_ckpt`,
`add_device`), and runs `main` through `run_cli`: a UserError, a bad flag, Ctrl-C, a closed pipe or
an OSError (a full disk) become one line on stderr and a non-zero exit, never a traceback.
"""
import argparse
import math
import os
import sys
from dataclasses import fields

from util import BF16_DECODE_MIN_WIDTH, UserError, printable


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad or unknown flag is a UserError (exit 2), not a usage block."""

    def error(self, message):
        if message.startswith("unrecognized arguments"):
            valid = sorted(o for a in self._actions for o in a.option_strings if o.startswith("--"))
            raise UserError(f"{self.prog}: {message}; valid options: {' '.join(valid)}")
        raise UserError(f"{self.prog}: {message} (see --help)")


def parser(doc, prog=None):
    """A parser whose --help prints the script's docstring (works anywhere on the command line)."""
    return Parser(prog=prog or os.path.basename(sys.argv[0]), description=doc, allow_abbrev=False,
                  formatter_class=argparse.RawDescriptionHelpFormatter)


def add_ckpt(p, default="runs/demo/final", help="checkpoint folder, or a Hugging Face export", many=False):
    if many:
        p.add_argument("--ckpt", nargs="+", default=[default], help=f"{help}; several (one per seed, say) are "
                       f"each evaluated and summarised as mean, std and 95 %% interval (default: {default})")
    else:
        p.add_argument("--ckpt", default=default, help=f"{help} (default: %(default)s)")


def add_device(p, default="auto"):
    p.add_argument("--device", default=default, help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--bf16", default="auto", choices=("auto", "true", "false"),
                   help="compute in bf16 (autocast) where the GPU or CPU supports it: auto (on a CPU, sampling "
                        f"only for models at least {BF16_DECODE_MIN_WIDTH} wide); or true, false (default: %(default)s)")


def add_backend(p):
    p.add_argument("--backend", default="torch", choices=("torch", "onnx", "onnx-int8"),
                   help="run the model in PyTorch, or its ONNX graph (fp32 or int8) in onnxruntime; the ONNX "
                        "graphs are in the onnx/ folder of an export made with hf_export.py --onnx "
                        "(default: %(default)s)")
OUT_OF_MEMORY = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")


def out_of_memory(e):
    """Is this exception an allocation failure (MemoryError, torch's CPU or CUDA allocator)?"""
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and
                                          any(s in str(e).lower() for s in OUT_OF_MEMORY))


def run_cli(main):
    """Run main() and turn UserError (and Ctrl-C, a closed pipe, an OSError such as a full disk, an
    allocation that does not fit in memory) into one line on stderr and a non-zero exit, never a
    traceback."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure:  # file names that are not UTF-8 are printed back as the bytes they are
        try:
            reconfigure(errors="surrogateescape")
        except (ValueError, OSError):
            pass
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
    except (MemoryError, RuntimeError) as e:
        if not out_of_memory(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        first = first.split("] ", 1)[-1] if first.startswith("[enforce fail") else first   # torch's C++ prefix
        _fail(f"error: out of memory ({first[:200]}); use smaller sizes (batch, model, images, samples)", 1)
    sys.exit(code)


def _fail(line, code):
    """Close any progress bar first (so the message gets a line of its own), then print and exit."""
    tqdm = getattr(sys.modules.get("tqdm"), "tqdm", None)
    for bar in list(getattr(tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # never let a progress bar hide the message
            pass
    print(printable(line), file=sys.stderr)   # a newline or odd bytes in a file name stay on this line
    sys.exit(code)


# ----------------------------------------------------------------------------- settings (dataclasses)

def add_settings(p, cls, skip=()):
    """One --key option per field of the dataclass `cls` but `skip` (values are checked by `apply_settings`)."""
    for f in fields(cls):
        if f.name in skip:
            continue
        p.add_argument(f"--{f.name}", default=None, metavar=type(f.default).__name__.upper(),
                       help=f"(default: {f.default!r})")


def apply_settings(cfg, args, where="command line", skip=()):
    """Copy the --key options that were given (not None) from parsed `args` onto the dataclass `cfg`."""
    for f in fields(cfg):
        v = None if f.name in skip else getattr(args, f.name, None)
        if v is not None:
            setattr(cfg, f.name, coerce(f.name, v, type(getattr(cfg, f.name)), where))
    return cfg


def read_yaml(path):
    """A flat YAML mapping -> dict; errors name the file and line. Duplicated keys are refused."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicated key {key!r}", key_node.start_mark)
            seen.add(key)
        return loader.construct_mapping(node)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        with open(path, encoding="utf-8") as f:
            loader = Loader(f)   # a SafeLoader: plain data only, never Python objects
            try:
                raw = loader.get_single_data()
            finally:
                loader.dispose()
    except OSError as e:
        raise UserError(f"{path}: cannot read config ({e.strerror})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (expected a YAML config)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', None) or e})") from None
    raw = raw or {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of key: value")
    return raw


def set_from_mapping(cfg, raw, where):
    """Apply a {key: value} mapping (a YAML file) to the dataclass `cfg`; unknown keys are errors."""
    valid = [f.name for f in fields(cfg)]
    for k, v in raw.items():
        if k not in valid:
            raise UserError(f"{where}: unknown key {k!r}; valid keys: {', '.join(valid)}")
        setattr(cfg, k, coerce(k, v, type(getattr(cfg, k)), where))
    return cfg


def coerce(key, value, typ, where):
    """Convert a string (command line) or a YAML value to the field's type, or raise UserError."""
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes"):
                return True
            if str(value).lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if typ is int and isinstance(value, str):
            return int(value)
        if typ is int:
            if isinstance(value, bool) or not float(value).is_integer():
                raise ValueError
            return int(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            if not math.isfinite(float(value)):   # inf and nan pass every range check: never a setting
                raise UserError(f"{where}: {key} must be a finite number, got {value!r}")
            return float(value)
        if typ is str and not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError
        return str(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{where}: {key} expects {typ.__name__}, got {value!r}") from None
