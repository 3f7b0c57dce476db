"""The layer rule of docs/architecture.md: every import in the package goes to its own layer or one below."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "llm2vec_fast"
DOC = PACKAGE.parent / "docs" / "architecture.md"


def layer_table() -> list[tuple[int, str, set[str] | None]]:
    """(layer, module prefix, third-party packages allowed or None for any) per module named in the doc's table."""
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not re.match(r"^\d+ ", cells[0]):
            continue
        layer = int(cells[0].split()[0])
        allowed = None if cells[2] == "any" else set(re.findall(r"`([\w.]+)`", cells[2]))
        rows.extend((layer, module, allowed) for module in re.findall(r"`(llm2vec_fast[\w.]*)`", cells[1]))
    return rows


TABLE = layer_table()


def place(module: str) -> tuple[int, set[str] | None]:
    """The row of the longest module prefix that covers ``module``."""
    matches = [(len(prefix), layer, allowed) for layer, prefix, allowed in TABLE
               if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise LookupError(f"{module} has no layer: give it a row in docs/architecture.md")
    _, layer, allowed = max(matches, key=lambda m: m[0])
    return layer, allowed


def package_modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "llm2vec_fast":  # __init__ imports lazily by name; test_package checks it imports nothing
            found.append((name, path))
    return found


def imports_of(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, those inside functions included."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if node.module is None:  # `from . import x`: x is a module of the package
                found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
            else:
                found.append((node.lineno, base))
    return found


def test_the_table_covers_every_module():
    missing = []
    for name, _ in package_modules():
        try:
            place(name)
        except LookupError as error:
            missing.append(str(error))
    assert not missing, missing


@pytest.mark.parametrize("module, path", package_modules(), ids=[name for name, _ in package_modules()])
def test_nothing_imports_upward(module, path):
    layer, allowed = place(module)
    wrong = []
    for line, imported in imports_of(module, path):
        top = imported.split(".")[0]
        if top == "llm2vec_fast":
            if imported == "llm2vec_fast":
                wrong.append(f"line {line}: imports the package root (import the module that defines the name)")
                continue
            target, _ = place(imported)
            if target > layer:
                wrong.append(f"line {line}: layer {layer} imports {imported} of layer {target}")
        elif top not in sys.stdlib_module_names and allowed is not None and top not in allowed:
            wrong.append(f"line {line}: imports {top}, which layer {layer} may not (allowed: {sorted(allowed)})")
    assert not wrong, f"{module}: " + "; ".join(wrong)


def test_the_check_sees_an_upward_import(tmp_path):
    # The checker itself: an encoder-layer module importing an application is caught, a relative import resolved.
    path = tmp_path / "fake.py"
    path.write_text("def f():\n    from .training.mntp import x\n    from . import cli\n")
    found = dict((name, line) for line, name in imports_of("llm2vec_fast.pipeline", path))
    assert found == {"llm2vec_fast.training.mntp": 2, "llm2vec_fast.cli": 3}
    assert place("llm2vec_fast.training.mntp")[0] > place("llm2vec_fast.pipeline")[0]
    assert place("llm2vec_fast.kernels.attention") == (0, {"torch", "triton"})


@pytest.mark.parametrize("module", ["llm2vec_fast.corpus", "llm2vec_fast.mteb", "llm2vec_fast.evaluation"])
def test_encoding_applications_do_not_import_training(module):
    path = PACKAGE / (module.split(".", 1)[1] + ".py")
    found = [f"line {line}: {name}" for line, name in imports_of(module, path)
             if name.startswith("llm2vec_fast.training")]
    assert not found, found
