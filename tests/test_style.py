"""The reading path's rules, checked on every source file: line length, docstrings, one meaning per name, and
imports that flow one way along the recipe."""
import ast
import glob
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "*.py")))
# a file may import only the files before it: the order of the recipe, then the tools around it
ORDER = ["bpe", "data", "model", "plumbing", "train", "palettize", "lora", "verify_ane", "export_ane",
         "pretrained", "sample", "recipe", "bench"]


def tree(path):
    return ast.parse(open(path, encoding="utf-8").read())


@pytest.mark.parametrize("path", SOURCES + sorted(glob.glob(os.path.join(ROOT, "tests", "*.py"))),
                         ids=os.path.basename)
def test_lines_at_most_110_characters(path):
    long = [i for i, line in enumerate(open(path, encoding="utf-8"), 1) if len(line.rstrip("\n")) > 110]
    assert not long, f"lines {long} are over 110 characters"


@pytest.mark.parametrize("path", SOURCES, ids=os.path.basename)
def test_docstrings(path):
    t = tree(path)
    doc = ast.get_docstring(t)
    assert doc and "python " in doc, "the module docstring says what the file does and how to run it"
    missing = []
    for node in t.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_") \
                and node.name != "parse_args" and not ast.get_docstring(node):
            missing.append(node.name)
        if isinstance(node, ast.ClassDef):
            missing += [f"{node.name}.{f.name}" for f in node.body if isinstance(f, ast.FunctionDef)
                        and not f.name.startswith("_") and f.name != "forward" and not ast.get_docstring(f)]
    assert not missing, f"public functions without a docstring: {missing}"


def test_no_name_defined_in_two_files():
    seen = {}
    for path in SOURCES:
        for node in tree(path).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name not in ("main", "parse_args"):
                seen.setdefault(node.name, []).append(os.path.basename(path))
    assert not {k: v for k, v in seen.items() if len(v) > 1}


def test_imports_flow_one_way():
    names = {os.path.basename(p)[:-3] for p in SOURCES}
    assert names <= set(ORDER), f"place {names - set(ORDER)} in ORDER"
    for path in SOURCES:
        me = os.path.basename(path)[:-3]
        for node in ast.walk(tree(path)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            for mod in mods:
                if mod in names:
                    assert ORDER.index(mod) < ORDER.index(me), f"{me} imports {mod}"


def test_reading_guide_anchors_point_at_their_code():
    """Every `file.py:N` (`name`) in the README's reading guide is the line where `name` is defined."""
    import re

    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    anchors = re.findall(r"`(\w+\.py):(\d+)` \(`(\w+)`\)", text)
    assert len(anchors) >= 10
    for path, line, name in anchors:
        src = open(os.path.join(ROOT, path), encoding="utf-8").read().splitlines()
        assert re.match(rf"\s*(def|class) {name}\b", src[int(line) - 1]), f"{path}:{line} is not {name}"


SCRIPTS = ["train", "palettize", "lora", "export_ane", "pretrained", "sample", "recipe", "bench", "bpe"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_says_its_default(script, capsys):
    """--help: each option's help text states its default (the positional text of bpe.py has none)."""
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(script).main(["--help"])
    out = capsys.readouterr().out
    options = [block for block in out.split("\n  -")[1:] if not block.startswith("h, --help")]
    assert options, out
    missing = [b.split()[0] for b in options if "default" not in b]
    assert not missing, f"{script}: no default in the help of {missing}"
