"""Settings: dataclasses whose fields are the options of the commands.

Each setting is declared once, in its dataclass, with the one sentence that --help shows written as a
docstring on the line right under the field (as litgpt's args.py does; see model.GPTConfig).

Settings are composed from parts: a field whose value is itself a dataclass (TrainConfig.data,
TrainConfig.model, DataConfig.codebook) is a group. Outside, every setting has one flat name, unique
across the groups: `--n_layer 4` on the command line, `n_layer: 4` in a YAML file, a key of a
checkpoint's "train" settings or of report.json's "config". A dataclass may list in `not_settings`
(a ClassVar) flat names that it fills in itself (the model's vocabulary size comes from the data), and
in `aliases` (a ClassVar {old name: name}) the names a setting had before, which are still accepted.
Every value is converted to the field's type and checked (coerce), wherever it comes from.
"""
import ast
import copy
import functools
import inspect
import math
import textwrap
from dataclasses import fields, is_dataclass

import yaml

from imagegpt.errors import UserError
from imagegpt.files import json_type


@functools.cache
def docs(cls):
    """{field name: its docstring} of a dataclass, read from its source (and its bases')."""
    out = {}
    for klass in reversed(cls.__mro__):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):   # built-in classes (object) have no source
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and \
                    isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and \
                    isinstance(after.value.value, str):
                out[node.target.id] = " ".join(after.value.value.split())
    return out


def leaves(cfg):
    """(flat name, the dataclass that holds it, its default) of every setting of `cfg` (a dataclass or
    an instance), groups flattened in declaration order, less the `not_settings` of each level."""
    cfg = cfg() if isinstance(cfg, type) else cfg
    skip = getattr(cfg, "not_settings", ())
    out = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if is_dataclass(value):
            out += [leaf for leaf in leaves(value) if leaf[0] not in skip]
        elif f.name not in skip:
            out.append((f.name, cfg, value))
    return out


def aliases(cfg):
    """{old name: name} of the settings of `cfg` that were renamed (their groups' included)."""
    cfg = cfg() if isinstance(cfg, type) else cfg
    out = dict(getattr(cfg, "aliases", {}))
    for f in fields(cfg):
        if is_dataclass(getattr(cfg, f.name)):
            out.update(aliases(getattr(cfg, f.name)))
    return out


def canonical(cfg, values):
    """A flat mapping with the old names of renamed settings replaced by their names."""
    old = aliases(cfg)
    return {old.get(k, k): v for k, v in values.items()}


def names(cfg):
    """The flat names of the settings of `cfg`."""
    return [name for name, _, _ in leaves(cfg)]


def flat(cfg):
    """{flat name: value} of every setting of `cfg`."""
    return {name: getattr(owner, name) for name, owner, _ in leaves(cfg)}


def update(cfg, values, where="settings"):
    """Set the settings named in `values` ({flat name: value}, from a YAML file or the command line)
    on `cfg`, each converted to its type; an unknown name is an error naming the valid ones."""
    owners = {name: owner for name, owner, _ in leaves(cfg)}
    for k, v in canonical(cfg, values).items():
        if k not in owners:
            raise UserError(f"{where}: unknown key {k!r}; valid keys: {', '.join(owners)}")
        setattr(owners[k], k, coerce(k, v, type(getattr(owners[k], k)), where))
    return cfg


def build(cls, values=None, where="settings", **more):
    """A new `cls` with its defaults and the flat settings in `values` and `more` (see update)."""
    return update(cls(), {**(values or {}), **more}, where)


def changed(cfg, **values):
    """A copy of `cfg` (groups included) with the flat settings in `values` set (see update)."""
    return update(copy.deepcopy(cfg), values)


def known(cls, values):
    """The entries of a flat mapping (a checkpoint's settings) that are settings of `cls`."""
    want = set(names(cls))
    return {k: v for k, v in canonical(cls, values).items() if k in want}


def add_options(parser, cls, skip=()):
    """One --name option per setting of `cls` (but those in `skip`), its help the field's docstring and
    default; the values are converted and checked by apply_options."""
    groups, old = {}, {name: alias for alias, name in aliases(cls).items()}
    for name, owner, default in leaves(cls):
        if name in skip:
            continue
        kind = type(owner)
        if kind not in groups:   # one block of --help per dataclass, headed by its docstring
            groups[kind] = parser.add_argument_group(f"{kind.__name__} ({inspect.getmodule(kind).__name__})",
                                                     inspect.getdoc(kind))
        doc = docs(kind).get(name, "")
        also = f" ({'--' + old[name]} is the older name)" if name in old else ""
        groups[kind].add_argument(f"--{name}", *([f"--{old[name]}"] if name in old else []), dest=name, default=None,
                                  metavar=type(default).__name__.upper(), help=f"{doc}{also} (default: {default!r})".lstrip())


def apply_options(cfg, args, where="command line", skip=()):
    """Set the --name options that were given (not None) in parsed `args` on `cfg` (but those in `skip`)."""
    given = {name: getattr(args, name) for name in names(cfg)
             if name not in skip and getattr(args, name, None) is not None}
    return update(cfg, given, where)


def read_yaml(path):
    """A flat YAML mapping -> dict; errors name the file and line. Duplicated keys are refused."""
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



def check_fields(obj, cls, where, prefix=""):
    """A parsed JSON value that must be an object whose keys named like settings of `cls` hold values
    of those settings' types (other keys are left alone) -> obj, or a UserError naming the file
    (`where`) and the key."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: {prefix.rstrip('.') or 'the file'} is {json_type(obj)}, expected a JSON object")
    values = canonical(cls, obj)
    for name, _, default in leaves(cls):
        if name not in values:
            continue
        v, typ = values[name], type(default)
        ok = isinstance(v, bool) if typ is bool else \
            isinstance(v, int) and not isinstance(v, bool) if typ is int else \
            isinstance(v, (int, float)) and not isinstance(v, bool) if typ is float else isinstance(v, typ)
        if not ok:
            want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(typ, typ.__name__)
            raise UserError(f"{where}: {prefix}{name} is {json_type(v)} ({str(v)[:40]}), expected {want}")
    return obj
