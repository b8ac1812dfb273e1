"""The package's shape (see docs/architecture.md): imports that point one way, a short core, and Lightning or torch
internals touched in one module only."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_gan

PACKAGE = Path(lightning_gan.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """For each module of the package, the package's modules it imports anywhere (``TYPE_CHECKING`` included)."""
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:  # relative
                    base = ".".join([*name.split(".")[: -node.level], node.module])
                found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = {imported for imported in found if imported in modules and imported != name}
    return graph


def test_the_package_s_imports_have_no_cycle() -> None:
    graph = imports()
    # lightning_gan/__init__.py re-exports everything; leave it out, as every module imports it by being in it
    graph = {name: {m for m in deps if m != "lightning_gan"} for name, deps in graph.items() if name != "lightning_gan"}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = [*path[path.index(name) :], name]
            raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
        if name in done:
            return
        for imported in sorted(graph.get(name, ())):
            visit(imported, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def test_the_parts_import_nothing_from_the_module() -> None:
    graph = imports()
    for part in ("averaging", "graphed", "guards", "stepping", "stacking"):
        assert "lightning_gan.module" not in graph[f"lightning_gan.{part}"], part


def test_gan_s_class_body_is_at_most_300_lines() -> None:
    tree = ast.parse((PACKAGE / "module.py").read_text())
    (gan,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "GAN"]
    assert gan.end_lineno - gan.lineno + 1 <= 300
