"""How the generated tables write their figures: a share as a percentage, mean +- std over seeds, a
markdown table, and "not rerun yet" where a figure's result file is missing."""
from imagegpt.errors import UserError

NOT_RERUN = "not rerun yet"


class Missing(UserError):
    """A figure's result file is missing (or unusable): strict rendering fails, the other kind shows
    NOT_RERUN in its place."""


def figure(results, make):
    """make(): a figure's text from the results; NOT_RERUN where a file is missing and results is not strict."""
    try:
        return make()
    except Missing:
        if results.strict:
            raise
        return NOT_RERUN


def num(v, digits=2):
    return f"{100 * v:.{digits}f}"


def pct(v, digits=2):
    return f"{num(v, digits)} %"


def spread(s, digits=2):
    """A seed_summary as `mean +- std %`."""
    return f"{100 * s['mean']:.{digits}f} +- {100 * (s['std'] or 0):.{digits}f} %"


def markdown(header, align, rows):
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"] +
                     ["| " + " | ".join(r) + " |" for r in rows])


def seeds(s, digits=1):
    """A seed_summary as `mean +- std % (each seed's figure)`."""
    return f"{spread(s)} ({', '.join(num(v, digits) for v in s['values'])})"
