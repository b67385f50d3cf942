"""Settings: dataclasses whose fields are the options of the commands, read from flat YAML files and
--key value flags, every value type- and range-checked."""
import math
from dataclasses import fields

from imagegpt.errors import UserError
from imagegpt.files import json_type


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


def check_fields(obj, cls, where, prefix=""):
    """A parsed JSON value that must be an object whose keys named like fields of the dataclass `cls`
    hold values of those fields' types (other keys are left alone) -> obj, or a UserError naming the
    file (`where`) and the key."""
    from dataclasses import fields
    if not isinstance(obj, dict):
        raise UserError(f"{where}: {prefix.rstrip('.') or 'the file'} is {json_type(obj)}, expected a JSON object")
    for f in fields(cls):
        if f.name not in obj:
            continue
        v, typ = obj[f.name], type(f.default)
        ok = isinstance(v, bool) if typ is bool else \
            isinstance(v, int) and not isinstance(v, bool) if typ is int else \
            isinstance(v, (int, float)) and not isinstance(v, bool) if typ is float else isinstance(v, typ)
        if not ok:
            want = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(typ, typ.__name__)
            raise UserError(f"{where}: {prefix}{f.name} is {json_type(v)} ({str(v)[:40]}), expected {want}")
    return obj
