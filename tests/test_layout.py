"""The package's layout: modules use one another's public names only, the program engine's
modules stay small, the term algebra stays free of the writers' dependencies, and importing the
package costs no torch."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sparsejac"
MODULES = sorted(PACKAGE.rglob("*.py"))

# Third-party modules whose private names the package reads on purpose (torch's pytree and
# reduction helpers have no public spelling in the torch versions we support).
FOREIGN = ("torch", "numpy", "np", "scipy", "sparse", "dask")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(path: pathlib.Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    base = _module_name(path).split(".")
    if path.name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _foreign(module: str) -> bool:
    return module.split(".")[0] in FOREIGN


def cross_module_private_uses() -> list[str]:
    """Every ``from m import _x`` and ``alias._x`` in the package where ``m`` (or what
    ``alias`` names) is another module of the package."""
    found = []
    for path in MODULES:
        tree = ast.parse(path.read_text(), str(path))
        here = _module_name(path)
        modules: dict[str, str] = {}  # local name -> the package module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                source = _resolve(path, node)
                for alias in node.names:
                    if _private(alias.name) and not _foreign(source) and source != here:
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno}: "
                                     f"from {source} import {alias.name}")
                    full = f"{source}.{alias.name}"
                    if full.startswith("sparsejac"):
                        modules[alias.asname or alias.name] = full
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("sparsejac"):
                        modules[alias.asname or alias.name.split(".")[0]] = (
                            alias.name if alias.asname else alias.name.split(".")[0])
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in modules and _private(node.attr)
                    and modules[node.value.id] != here):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: "
                             f"{node.value.id}.{node.attr}")
    return sorted(set(found))


def test_no_module_uses_another_modules_private_names():
    assert cross_module_private_uses() == []


def test_the_checker_sees_a_private_use(tmp_path, monkeypatch):
    """The check above can fail: a module reading another's private name is found."""
    fake = tmp_path / "sparsejac"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "a.py").write_text("def _hidden():\n    return 1\n")
    (fake / "b.py").write_text("from . import a\nfrom .a import _hidden\n\nx = a._hidden()\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", sorted(fake.rglob("*.py")))
    assert [line.split(": ", 1)[1] for line in cross_module_private_uses()] == [
        "from sparsejac.a import _hidden", "a._hidden"]


PROGRAM_MODULES = sorted((PACKAGE / "programs").rglob("*.py"))


@pytest.mark.parametrize("path", PROGRAM_MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_program_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= 520, f"{path.relative_to(ROOT)} has {lines} lines"


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(path, node)
            names.add(source)
            names.update(f"{source}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_the_term_algebra_imports_neither_scipy_nor_the_formats():
    algebra = PACKAGE / "programs" / "terms"
    paths = sorted(algebra.rglob("*.py")) if algebra.is_dir() else [algebra.with_suffix(".py")]
    assert paths
    for path in paths:
        bad = {n for n in _imports(path)
               if n.split(".")[0] == "scipy" or n.startswith("sparsejac.formats")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_importing_the_package_imports_no_torch():
    code = "import sys, sparsejac, sparsejac.programs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
