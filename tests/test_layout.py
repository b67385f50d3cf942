"""The project's shape: every option of every command explains itself, every setting is declared once
with its sentence, the library never imports a command and no modules import each other in a circle,
every module and function stays small enough to hold in one's head (the limits below), every module says
what it owns, and every relative link of the README and the docs/ pages points to a file that exists."""
import argparse
import ast
import glob
import importlib
import os
import re

import pytest
from fixtures import ROOT

from imagegpt import settings
from imagegpt.data_config import DataConfig
from imagegpt.draw_settings import DrawSettings
from imagegpt.service_config import ServiceConfig
from imagegpt.train_config import TrainConfig

COMMANDS = ["data", "train", "eval", "sample", "hf_export", "serve", "baselines", "bench", "scale", "reproduce"]
MODULE_LINES = 450        # no module longer
FUNCTION_LINES = 60       # no function longer (its decorators, docstring and nested functions included) ...
LONGER = {"imagegpt.training._train"}   # ... but the training loop, which reads top to bottom as one story
PARAMETERS = 8            # no function takes more (self and cls aside; *args and **kwargs count one each)


def parsers(p, name):
    """A parser and its sub-command parsers -> [(name, parser)]."""
    out = [(name, p)]
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, sp in action.choices.items():
                out += parsers(sp, f"{name} {sub}")
    return out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_of_every_command_has_a_description(command):
    module = importlib.import_module(command)
    for name, p in parsers(module.build_parser(), f"{command}.py"):
        for action in p._actions:
            if not action.option_strings or action.dest == "help":
                continue
            text = re.sub(r"\(default: [^)]*\)", "", action.help or "").strip()
            assert len(text.split()) >= 2, f"{name} {'/'.join(action.option_strings)} has no description"


def test_every_setting_is_declared_once_with_its_sentence():
    for cls in (TrainConfig, DataConfig, ServiceConfig, DrawSettings):
        leaves = settings.leaves(cls)
        names = [name for name, _, _ in leaves]
        assert len(names) == len(set(names)), f"{cls.__name__}: a flat name is used twice"
        for name, owner, _ in leaves:
            assert settings.docs(type(owner)).get(name), f"{type(owner).__name__}.{name} has no docstring"
    assert "n_layer" in settings.names(TrainConfig) and "vocab_size" not in settings.names(TrainConfig)


def test_settings_compose_flat_names_and_refuse_unknown_ones():
    cfg = settings.build(TrainConfig, n_layer=3, num_codes=7, source="idx:x", lr="0.5")
    assert (cfg.model.n_layer, cfg.data.codebook.num_codes, cfg.data.source, cfg.lr) == (3, 7, "idx:x", 0.5)
    flat = settings.flat(cfg)
    assert flat["n_layer"] == 3 and flat["num_codes"] == 7 and "codebook" not in flat and "model" not in flat
    copy = settings.changed(cfg, n_layer=4)
    assert copy.model.n_layer == 4 and cfg.model.n_layer == 3      # a copy: groups are not shared
    with pytest.raises(Exception, match="unknown key 'vocab_size'"):
        settings.build(TrainConfig, vocab_size=10)                  # set by the data, not a setting


def modules():
    """The project's modules (top-level files and the imagegpt package) -> {dotted name: syntax tree}."""
    found = {os.path.basename(p)[:-3]: p for p in glob.glob(os.path.join(ROOT, "*.py"))}
    found.update({f"imagegpt.{os.path.basename(p)[:-3]}": p for p in glob.glob(os.path.join(ROOT, "imagegpt", "*.py"))})
    found["imagegpt"] = found.pop("imagegpt.__init__")
    return {m: ast.parse(open(p).read()) for m, p in found.items()}


def imports(tree, mods):
    out = set()
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [f"{node.module}.{a.name}" for a in node.names] + [node.module] \
            if isinstance(node, ast.ImportFrom) and node.module else []
        out |= {n for n in names if n in mods} | {n.rsplit(".", 1)[0] for n in names if n.rsplit(".", 1)[0] in mods}
    return out


def test_the_library_never_imports_a_command_and_nothing_imports_in_a_circle():
    mods = modules()
    commands = {m for m, t in mods.items() if any(isinstance(n, ast.If) and "__name__" in ast.unparse(n.test)
                                                  for n in t.body)}
    assert set(COMMANDS) <= commands and not any(m.startswith("imagegpt") for m in commands)
    edges = {m: imports(t, mods) - {m} for m, t in mods.items()}
    assert not [(m, n) for m in edges for n in edges[m] if n in commands], "a module imports a command script"
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in edges[m]:
            assert state.get(n) != "open", f"import cycle: {' -> '.join(path + [m, n])}"
            if n not in state:
                visit(n, path + [m])
        state[m] = "done"

    for m in edges:
        if m not in state:
            visit(m, [])


def functions(tree):
    """Every function and method of a syntax tree (nested ones too) -> [(qualified name, node)]."""
    out = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((prefix + child.name, child))
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)
    visit(tree, "")
    return out


def parameters(node):
    a = node.args
    named = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")]
    return len(named) + (a.vararg is not None) + (a.kwarg is not None)


def test_modules_and_functions_stay_small():
    """No module over MODULE_LINES lines, no function over FUNCTION_LINES (the training loop aside), none
    with more than PARAMETERS parameters: what does not fit is split by concern, or its settings made one object."""
    too_long, too_big, too_many = [], [], []
    for m, tree in modules().items():
        path = os.path.join(ROOT, *m.split(".")) + ".py" if m != "imagegpt" else os.path.join(ROOT, "imagegpt", "__init__.py")
        n = len(open(path, encoding="utf-8").read().splitlines())
        if n > MODULE_LINES:
            too_long.append(f"{m}: {n} lines")
        for name, node in functions(tree):
            lines = node.end_lineno - node.lineno + 1
            if lines > FUNCTION_LINES and f"{m}.{name}" not in LONGER:
                too_big.append(f"{m}.{name}: {lines} lines")
            if parameters(node) > PARAMETERS:
                too_many.append(f"{m}.{name}: {parameters(node)} parameters")
    assert not too_long, f"modules over {MODULE_LINES} lines: {too_long}"
    assert not too_big, f"functions over {FUNCTION_LINES} lines: {too_big}"
    assert not too_many, f"functions with more than {PARAMETERS} parameters: {too_many}"
    assert all(f"{m}.{n}" in {f"{mm}.{nn}" for mm, t in modules().items() for nn, _ in functions(t)} for m, n in
               (name.rsplit(".", 1) for name in LONGER)), "LONGER names a function that is not there"


def test_every_module_says_what_it_owns():
    """The first line of every module's docstring says what it owns (the file list reads as the architecture)."""
    silent = [m for m, tree in modules().items() if m != "imagegpt" and len((ast.get_docstring(tree) or "").split()) < 5]
    assert not silent, f"modules without a docstring that says what they own: {silent}"


def test_every_relative_link_in_the_readme_and_docs_points_to_a_file():
    pages = [os.path.join(ROOT, "README.md")] + glob.glob(os.path.join(ROOT, "docs", "*.md"))
    broken = []
    for page in pages:
        text = re.sub(r"```.*?```", "", open(page, encoding="utf-8").read(), flags=re.S)   # code blocks are not links
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0]))
            if not os.path.exists(path):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target}")
    assert not broken, f"links to files that do not exist: {broken}"
