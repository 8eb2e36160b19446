"""Architecture rules that keep the project honest: a UI-free core, and a wheel that ships every package."""

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "clipterm"
UI_DIRS = {PACKAGE / "cli", PACKAGE / "tui"}

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def core_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        if not any(ui in path.parents for ui in UI_DIRS):
            yield path


@pytest.mark.parametrize("path", list(core_modules()), ids=lambda p: str(p.relative_to(ROOT)))
def test_core_never_imports_typer_or_textual(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"typer", "textual"}


def test_every_subpackage_ships_in_the_wheel():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in PACKAGE.rglob("__init__.py")}
    assert on_disk <= listed, f"add these to [tool.setuptools] packages: {sorted(on_disk - listed)}"
    assert config["package-dir"]["clipterm.themes"] == "themes"
