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


def own_private_attributes(paths: list[Path] | None = None) -> set[str]:
    """The ``_``-prefixed attributes that the package's own code (or that of ``paths``) assigns on its objects
    (``self._x = ...``) or defines as methods (overrides of a library's are refused by the next test)."""
    names = set()
    for path in paths or PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                names |= {f.name for f in node.body if isinstance(f, ast.FunctionDef) and f.name.startswith("_")}
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    for leaf in ast.walk(target):
                        on_self = isinstance(leaf, ast.Attribute) and ast.unparse(leaf.value) == "self"
                        if on_self and leaf.attr.startswith("_"):
                            names.add(leaf.attr)
    return names


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def internal_touches(tree: ast.AST, own: set[str], own_here: set[str], library: set[str]) -> list[ast.AST]:
    """Reads or writes of a ``_``-prefixed attribute that is not the package's own, including ``super()._x``,
    ``self._x`` where ``_x`` is a library's and not assigned in this file, and ``getattr(x, "_x")``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            on_self = isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")
            on_super = isinstance(node.value, ast.Call) and ast.unparse(node.value.func) == "super"
            inherited = on_self and node.attr in library and node.attr not in own_here
            if on_super or inherited or (not on_self and node.attr not in own):
                found.append(node)
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("getattr", "setattr", "hasattr"):
            name = node.args[1] if len(node.args) > 1 else None
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and is_private(name.value):
                found += [node] if name.value not in own else []
    return found


def library_private_names() -> set[str]:
    """The ``_``-prefixed names on the library objects the package handles, class and instance attributes both."""
    import torch
    from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    objects = [
        Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False),
        LightningModule(),
        LightningDataModule(),
        Callback(),
        ModelCheckpoint(),
        DataLoader([0]),
        optimizer,
        torch.optim.lr_scheduler.ExponentialLR(optimizer, 0.5),
        torch.nn.Linear(1, 1),
        parameter,
    ]
    return {name for obj in objects for name in {*dir(obj), *vars(obj)} if is_private(name)}


def test_only_the_internals_module_touches_lightning_or_torch_internals() -> None:
    library = library_private_names()
    own = own_private_attributes() - library  # a name Lightning or torch uses is never exempt on other objects
    touches = [
        f"{path.name}:{node.lineno} {ast.unparse(node)}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name != "_lightning.py"
        for node in internal_touches(ast.parse(path.read_text()), own, own_private_attributes([path]), library)
    ]
    assert not touches, "Lightning or torch internals outside lightning_gan/_lightning.py:\n" + "\n".join(touches)


def test_no_class_overrides_a_private_method_of_a_library_class() -> None:
    import importlib
    import inspect

    overrides = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = importlib.import_module(module_name(path))
        for cls in vars(module).values():
            if not inspect.isclass(cls) or cls.__module__ != module.__name__:
                continue
            library = [base for base in cls.__mro__[1:] if not base.__module__.startswith("lightning_gan")]
            for name in vars(cls):
                if is_private(name) and name != "_abc_impl" and any(hasattr(base, name) for base in library):
                    overrides.append(f"{cls.__module__}.{cls.__name__}.{name}")
    assert not overrides, f"overrides of library internals: {overrides}"


def test_the_networks_import_only_their_shared_layers() -> None:
    graph = imports()
    assert graph["lightning_gan.nets.mlp"] & {"lightning_gan.nets.conv", "lightning_gan.conv_nets"} == set()
    assert graph["lightning_gan.nets.conv"] & {"lightning_gan.nets.mlp", "lightning_gan.conv_nets"} == set()
    assert not [name for name, deps in graph.items() if "lightning_gan.conv_nets" in deps]  # kept for old class_paths


def test_the_former_conv_nets_module_names_the_same_classes() -> None:
    from lightning_gan import conv_nets, nets

    for name in conv_nets.__all__:
        assert getattr(conv_nets, name) is getattr(nets, name)
