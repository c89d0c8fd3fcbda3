"""The layering of the package, read from the source with ``ast``: ``structured/`` never imports the
model zoo, and ``measure`` sits below ``structured``, ``methods``, ``run`` and ``integrations``."""

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[2] / "src" / "sparsetrain"


def imported_modules(path: Path) -> set[str]:
    """The absolute names of the modules ``path`` imports (relative imports resolved against its
    package), including ``package.name`` for each ``from package import name``."""
    package = path.relative_to(SOURCE.parent).with_suffix("").parts[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def within(names: set[str], package: str) -> set[str]:
    return {name for name in names if name == package or name.startswith(f"{package}.")}


@pytest.mark.parametrize("path", sorted((SOURCE / "structured").glob("*.py")), ids=lambda p: p.name)
def test_structured_does_not_import_the_model_zoo(path):
    assert not within(imported_modules(path), "sparsetrain.models")


def test_measure_sits_below_structured_methods_run_and_integrations():
    names = imported_modules(SOURCE / "measure.py")
    for package in ("sparsetrain.structured", "sparsetrain.methods", "sparsetrain.run", "sparsetrain.integrations"):
        assert not within(names, package), package


def test_imported_modules_resolves_relative_imports():
    assert "sparsetrain.models" in imported_modules(SOURCE / "run" / "folder.py")
    assert "sparsetrain.models.create_model" in imported_modules(SOURCE / "run" / "folder.py")
    assert "sparsetrain.structured.surgery.with_shapes" in imported_modules(SOURCE / "models" / "registry.py")
    assert within(imported_modules(SOURCE / "structured" / "surgery.py"), "sparsetrain.measure")
