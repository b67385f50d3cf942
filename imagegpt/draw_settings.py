"""The drawing settings: one dataclass (DrawSettings) for how tokens are drawn from the model, its checks,
and its three ways in: the command line, a request to the service, an export's model.json.

As transformers' GenerationConfig does for generate(), one object carries every decoding setting; it is
checked once, where it is made, and passed whole (decoding.generate, drawing.draw, the drawing report,
the service, the exports). A drawing of a chosen class has its own defaults (FOR_A_CLASS: guidance 3,
temperature 0.9, chosen on the development split, docs/drawing.md); other drawing the plain ones.
"""
import math
from dataclasses import asdict, dataclass, fields, replace

from imagegpt.errors import UserError
from imagegpt.settings import docs

GUIDANCE = 3.0      # the classifier-free guidance scale of a drawing of a chosen class unless told (1 = none)
TEMPERATURE = 0.9   # and its sampling temperature (other sampling: 1); both chosen on the development split
                    # (docs/drawing.md): >= 98 % judged the asked class, diversity >= 0.8 of real images


@dataclass(frozen=True)
class DrawSettings:
    """How tokens are drawn from the model (as transformers' GenerationConfig): each step's filters, guidance, seed."""
    temperature: float = 1.0
    """the logits are divided by this; 0 = greedy (drawing a chosen class: 0.9 unless given)"""
    top_k: int = 0
    """keep the k most likely tokens (0 = off)"""
    top_p: float = 1.0
    """nucleus: keep the most likely tokens up to this cumulative probability (1 = off)"""
    greedy: bool = False
    """always take the most likely token"""
    guidance: float = 1.0
    """classifier-free guidance scale of a drawing of a chosen class (3 unless given; 1 = plain conditional sampling)"""
    seed: int = 0
    """seed of the sampling (sample.py complete: also of the images it picks)"""
    max_new_tokens: int = 0
    """most tokens to add per row (0 = up to the model's block size)"""
    batch_size: int = 64
    """rows decoded together"""

    def check(self, where="--"):
        """self, or a UserError naming the setting (where: '--' on the command line, 'FILE: ' in a file)."""
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
        integer = lambda v: isinstance(v, int) and not isinstance(v, bool)
        for name in ("temperature", "top_p", "guidance"):
            v = getattr(self, name)
            if number(v) and not math.isfinite(v):
                raise UserError(f"{where}{name} must be a finite number, got {v}")
        rules = {"temperature": (number(self.temperature) and self.temperature >= 0, ">= 0 (0 = greedy)"),
                 "top_k": (integer(self.top_k) and self.top_k >= 0, ">= 0 (0 = off)"),
                 "top_p": (number(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
                 "greedy": (isinstance(self.greedy, bool), "true or false"),
                 "guidance": (number(self.guidance) and self.guidance >= 0, ">= 0 (1 = plain conditional sampling)"),
                 "seed": (integer(self.seed) and 0 <= self.seed < 2 ** 63, f"an integer in 0..{2 ** 63 - 1}"),
                 "max_new_tokens": (integer(self.max_new_tokens) and self.max_new_tokens >= 0,
                                    ">= 0 (0 = up to the block size)"),
                 "batch_size": (integer(self.batch_size) and self.batch_size >= 1, "at least 1")}
        for name, (ok, want) in rules.items():
            if not ok:
                raise UserError(f"{where}{name} must be {want}, got {getattr(self, name)!r}")
        return self

    def meta(self, guided):
        """What a drawn row records of the settings (sample.py's JSONL): guidance only where it applies."""
        out = {"seed": self.seed, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p,
               "greedy": self.greedy}
        return {**out, "guidance": self.guidance} if guided else out


FOR_A_CLASS = DrawSettings(temperature=TEMPERATURE, guidance=GUIDANCE)   # a drawing of a chosen class
OLDER = {"guidance": "cfg"}   # the older command-line names of settings, still accepted
NAMES = tuple(f.name for f in fields(DrawSettings))
FILTERS = ("temperature", "top_k", "top_p")   # what greedy decoding leaves out


def defaults(for_a_class):
    """The settings a drawing starts from: FOR_A_CLASS, or the plain ones."""
    return FOR_A_CLASS if for_a_class else DrawSettings()


def made(given, for_a_class=False, where="--", base=None):
    """DrawSettings from the settings a user gave ({name: value}; None = not given) over the defaults of
    the drawing (or `base`), checked. Greedy decoding with a filter given is refused: it would not apply."""
    given = {k: v for k, v in given.items() if v is not None}
    unknown = set(given) - set(NAMES)
    if unknown:
        raise UserError(f"{where}{sorted(unknown)[0]}: not a drawing setting (settings: {', '.join(NAMES)})")
    if given.get("greedy") and set(given) & set(FILTERS):
        raise UserError(f"{where}greedy always takes the most likely token: {where}temperature, {where}top_k and "
                        f"{where}top_p do not apply to it")
    return replace(base or defaults(for_a_class), **given).check(where)


# ----------------------------------------------------------------------------- the command line

def add_options(parser, names=NAMES, **shown):
    """--temperature, --top_k, ... (those in `names`), each with its field's sentence as help; `shown`: a
    command's own defaults ({name: value}), which made() then takes as given. Every value is left None
    when not given, so that the drawing's defaults apply (read back with from_args)."""
    sentences = docs(DrawSettings)
    plain = DrawSettings(**shown)
    for name in names:
        old = [f"--{OLDER[name]}"] if name in OLDER else []
        help_ = sentences[name] + (f" ({old[0]} is the older name)" if old else "")
        if name == "greedy":
            parser.add_argument("--greedy", action="store_const", const=True, default=None, help=help_)
        else:
            kind = type(getattr(plain, name))
            parser.add_argument(f"--{name}", *old, dest=name, type=kind, default=None, metavar=kind.__name__.upper(),
                                help=f"{help_} (default: {getattr(plain, name)!r})")
    parser.set_defaults(draw_shown=shown)


def given(args):
    """The drawing settings given on the command line (parsed args) -> {name: value}."""
    return {k: getattr(args, k) for k in NAMES if getattr(args, k, None) is not None}


def from_args(args, for_a_class=False):
    """Parsed args (add_options) -> DrawSettings: the drawing's defaults, the command's, then what was given."""
    base = replace(defaults(for_a_class), **getattr(args, "draw_shown", {}))
    return made(given(args), for_a_class, base=base)


# ----------------------------------------------------------------------------- files

def to_json(settings):
    """The settings as a JSON object (every field)."""
    return asdict(settings)


def from_json(obj, where, for_a_class=False):
    """A JSON object of drawing settings (an export's model.json: guidance, temperature) -> DrawSettings,
    every value checked, naming the file; keys that are no drawing setting are left alone."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object")
    return made({k: v for k, v in obj.items() if k in NAMES}, for_a_class, where=f"{where}: ")
