"""The command-line style every script shares: the parser, the shared options, and the wrapper that
turns errors into one line.

A script builds its parser with `parser(__doc__)`, adds the shared options it takes (`add_ckpt`,
`add_device`), and runs `main` through `run_cli`: a UserError, a bad flag, Ctrl-C, a closed pipe or
an OSError (a full disk) become one line on stderr and a non-zero exit, never a traceback.
"""
import argparse
import os
import sys

from imagegpt.device import BF16_DECODE_MIN_WIDTH, THREADS_ENV
from imagegpt.errors import UserError, printable


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: a bad or unknown flag is a UserError (exit 2), not a usage block."""

    def error(self, message):
        if message.startswith("unrecognized arguments"):
            valid = sorted(o for a in self._actions for o in a.option_strings if o.startswith("--"))
            raise UserError(f"{self.prog}: {message}; valid options: {' '.join(valid)}")
        raise UserError(f"{self.prog}: {message} (see --help)")

    def parse_args(self, args=None, namespace=None):
        """As argparse's, but an unknown option is reported by the sub-command's parser that was given it
        (so that the error lists that sub-command's options)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            self.chosen(parsed).error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed

    def chosen(self, parsed):
        """The parser of the sub-command in `parsed` (self when there is none)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction) and getattr(parsed, action.dest, None) in action.choices:
                return action.choices[getattr(parsed, action.dest)].chosen(parsed)
        return self


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


def add_threads(p, what="the model (torch, and onnxruntime with --backend onnx)"):
    p.add_argument("--threads", type=int, default=0,
                   help=f"CPU threads for {what}; 0: chosen from what the machine offers now (its CPUs, cgroup "
                        f"quota and other processes' load) unless {THREADS_ENV} or OMP_NUM_THREADS sets them "
                        "(default: %(default)s)")


def add_backend(p):
    p.add_argument("--backend", default="torch", choices=("torch", "onnx", "onnx-int8"),
                   help="run the model in PyTorch, or its ONNX graph (fp32 or int8) in onnxruntime; the ONNX "
                        "graphs are in the onnx/ folder of an export made with hf_export.py --onnx "
                        "(default: %(default)s)")


def with_command(argv, commands, default, old_flags=None):
    """argv with its sub-command first: as given when it starts with one of `commands` (or is a lone
    --help); else chosen by the first of `old_flags` ({flag: (command, what the flag becomes)}, the
    older spelling of a sub-command as a flag: `eval.py --classify a.png` is `eval.py classify a.png`),
    else `default` (`python eval.py` evaluates, `python sample.py --top_p 0.9` samples)."""
    argv = list(argv)
    if (argv and argv[0] in commands) or argv in (["-h"], ["--help"]):
        return argv
    for i, token in enumerate(argv):
        flag, eq, value = token.partition("=")
        if flag in (old_flags or {}):
            command, becomes = old_flags[flag]
            return [command] + argv[:i] + becomes + ([value] if eq else []) + argv[i + 1:]
    return [default] + argv


def shared(*adders):
    """A parent parser (no --help of its own) holding the options that several sub-commands share: each
    of `adders` puts some on it (add_ckpt, add_device, ...)."""
    p = argparse.ArgumentParser(add_help=False)
    for add in adders:
        add(p)
    return p


def add_commands(p, commands, parents=None):
    """One sub-parser per (name, help, description) of `commands`, each with the options of its parent
    parsers (parents: {name: [parsers]}) -> {name: its parser}."""
    sub = p.add_subparsers(dest="command", required=True, parser_class=type(p), metavar="COMMAND")
    return {name: sub.add_parser(name, help=help_, description=description, parents=(parents or {}).get(name, []),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
            for name, help_, description in commands}


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
