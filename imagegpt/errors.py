"""The one-line user error, and the small value checks that raise it.

A UserError is a mistake in what the user handed in (a flag, a file, a value): the commands print it
as one line on stderr and exit non-zero (imagegpt.cli.run_cli), never as a traceback.
"""
import math


class UserError(Exception):
    """A mistake in the user's input: printed as one line, exit status 2, no traceback."""


def printable(text):
    """`text` made safe for a one-line message: control characters (a newline or a carriage return in
    a file name) and undecodable bytes (surrogate escapes) are written as escapes, like repr() does;
    anything else, spaces and non-ASCII letters included, is left as it is."""
    text = str(text)
    if text.isprintable():
        return text
    out = []
    for ch in text:
        if ch.isprintable() or ch == " ":
            out.append(ch)
        elif 0xDC80 <= ord(ch) <= 0xDCFF:          # a byte that was not valid UTF-8 (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        else:
            out.append(repr(ch)[1:-1])               # \n, \r, \t, \x1b, \u2028 ...
    return "".join(out)


def check_seed(value, where):
    """Seeds are integers in 0 .. 2**63 - 1 (torch and numpy take them as 64-bit numbers)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 63:
        raise UserError(f"{where} must be an integer in 0..{2 ** 63 - 1}, got {value}")


def check_finite(value, where):
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{where} must be a finite number, got {value}")
