"""The package's dependencies point one way, and nothing but ``mobileo_mlx`` is installed.

The import graph is read from the source with :mod:`ast` (every ``import``, including the
ones inside functions), over the three folders that make up the ``mobileo_mlx`` namespace:
``mobileo_mlx/``, ``convert/`` (``mobileo_mlx.convert``) and ``kernels/``
(``mobileo_mlx.kernels``). A module may import its own layer and the layers below it, never
one above; the graph has no cycles; the runtime never imports PyTorch, the tests or the
benchmarks. CONTRIBUTING.md explains the layers.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Where each part of the namespace lives in the repository.
FOLDERS = {
    "mobileo_mlx": ROOT / "mobileo_mlx",
    "mobileo_mlx.convert": ROOT / "convert",
    "mobileo_mlx.kernels": ROOT / "kernels",
}

# Top to bottom. A module belongs to the first layer with a matching prefix.
LAYERS = [
    ("command line", ["mobileo_mlx.cli", "mobileo_mlx.__main__", "mobileo_mlx.server"]),
    ("pipeline", ["mobileo_mlx.pipeline"]),
    ("model resolution", ["mobileo_mlx.hub", "mobileo_mlx.demo"]),
    ("converter", ["mobileo_mlx.convert"]),
    ("loading and processing", ["mobileo_mlx.weights", "mobileo_mlx.processing", "mobileo_mlx.samplers",
                                "mobileo_mlx.options", "mobileo_mlx.outputs", "mobileo_mlx.decoding"]),
    ("backends", ["mobileo_mlx.backends"]),
    ("models", ["mobileo_mlx.models"]),
    ("kernels", ["mobileo_mlx.kernels"]),
    ("platform", ["mobileo_mlx.platform", "mobileo_mlx._blas", "mobileo_mlx.errors", "mobileo_mlx._version"]),
]

# Third-party packages the installed runtime must never import (they belong to the tests), and
# the bare folder names, which from an installed package mean PyPI's `kernels` / `convert`.
TEST_ONLY = {"torch", "diffusers", "tests", "benchmarks", "pytest", "kernels", "convert"}
# The one exception: reading a PyTorch ``.bin`` checkpoint needs torch (documented, optional).
TEST_ONLY_ALLOWED = {("mobileo_mlx.convert.checkpoint", "torch")}


def _module_files() -> dict[str, Path]:
    modules = {}
    for package, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            relative = path.relative_to(folder)
            if any(part in {"__pycache__"} for part in relative.parts):
                continue
            # mobileo_mlx/convert and mobileo_mlx/kernels are links to the folders read above
            if package == "mobileo_mlx" and relative.parts[0] in {"convert", "kernels"}:
                continue
            parts = list(relative.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


MODULES = _module_files()


def _is_package(name: str) -> bool:
    path = MODULES.get(name)
    return name in FOLDERS or (path is not None and path.name == "__init__.py")


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports: ``from a import b`` counts as ``a.b`` when that is a module."""
    package = name if _is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            for alias in node.names:
                candidate = f"{origin}.{alias.name}"
                found.add(candidate if candidate in MODULES or candidate in FOLDERS else origin)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(name: str) -> int | None:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes):
            return index
    return None


def _ours(name: str) -> bool:
    return name == "mobileo_mlx" or name.startswith("mobileo_mlx.")


def test_the_namespace_is_read_from_all_three_folders():
    assert {"mobileo_mlx.cli", "mobileo_mlx.convert.from_torch", "mobileo_mlx.kernels.depthwise",
            "mobileo_mlx.models.sana", "mobileo_mlx.convert.mapping"} <= MODULES.keys()


def test_the_demo_checkpoint_is_a_converter_fixture():
    # Written by the converter's own writer, with its defaults and prefixes; only keeping a copy in
    # the cache (mobileo_mlx.demo) belongs to model resolution, above the converter.
    fixture = ["mobileo_mlx.convert.demo", "mobileo_mlx.convert.demo_tokenizer", "mobileo_mlx.convert.defaults"]
    assert {LAYERS[_layer(name)][0] for name in fixture} == {"converter"}
    assert LAYERS[_layer("mobileo_mlx.demo")][0] == "model resolution"
    assert "mobileo_mlx.convert.demo" in GRAPH["mobileo_mlx.demo"]
    assert {"mobileo_mlx.convert.checkpoint", "mobileo_mlx.convert.defaults"} <= GRAPH["mobileo_mlx.convert.demo"]


def test_every_module_has_a_layer():
    unplaced = [name for name in MODULES if name != "mobileo_mlx" and _layer(name) is None]
    assert not unplaced, f"add these modules to a layer in LAYERS (and to CONTRIBUTING.md): {unplaced}"


def test_dependencies_point_down():
    upward = []
    for name, imported in GRAPH.items():
        mine = _layer(name)
        for target in imported:
            if not _ours(target):
                continue
            if target == "mobileo_mlx" and name != "mobileo_mlx":
                upward.append(f"{name} imports the package facade mobileo_mlx (import the module it needs)")
                continue
            theirs = _layer(target)
            if mine is not None and theirs is not None and theirs < mine:
                upward.append(f"{name} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]})")
    assert not upward, "\n".join(sorted(upward))


def test_models_import_nothing_of_ours_but_models():
    # Plain MLX networks: no backend code, no kernels, no platform checks (backends/ holds those).
    found = [f"{name} imports {target}" for name, imported in GRAPH.items() if name.startswith("mobileo_mlx.models")
             for target in imported if _ours(target) and not target.startswith("mobileo_mlx.models")]
    assert not found, "\n".join(found)


def test_kernels_import_nothing_of_ours_but_kernels_and_platform():
    # Kernels offer a kernel and its twin; the backend decides which runs.
    allowed = ("mobileo_mlx.kernels", "mobileo_mlx.platform", "mobileo_mlx._blas", "mobileo_mlx.errors")
    found = [f"{name} imports {target}" for name, imported in GRAPH.items() if name.startswith("mobileo_mlx.kernels")
             for target in imported if _ours(target) and not target.startswith(allowed)]
    assert not found, "\n".join(found)


def test_the_converter_does_not_know_the_runtime_above_it():
    for name, imported in GRAPH.items():
        if name.startswith("mobileo_mlx.convert"):
            assert not {t for t in imported if t.startswith(("mobileo_mlx.hub", "mobileo_mlx.pipeline",
                                                              "mobileo_mlx.cli", "mobileo_mlx.demo"))}, name


def test_no_import_cycles():
    ours = {name: {t for t in targets if t in GRAPH and t != name} for name, targets in GRAPH.items()}
    # a package's __init__ importing its own submodules is how Python packages work
    for name in ours:
        if _is_package(name):
            ours[name] = {t for t in ours[name] if not t.startswith(name + ".")}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in ours[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in ours:
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_runtime_never_imports_test_only_packages():
    found = []
    for name, imported in GRAPH.items():
        for target in imported:
            top = target.split(".")[0]
            if top in TEST_ONLY and (name, top) not in TEST_ONLY_ALLOWED:
                found.append(f"{name} imports {target}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("folder", ["convert", "kernels"])
def test_top_level_folders_are_not_importable_packages(folder):
    # An __init__.py here would make `import kernels` / `import convert` from a checkout's root
    # find ours instead of PyPI's (Hugging Face's `kernels` is a transformers dependency).
    assert not (ROOT / folder / "__init__.py").exists()
    assert (ROOT / "mobileo_mlx" / folder).resolve() == (ROOT / folder).resolve()


def test_every_package_of_the_namespace_is_in_the_wheel():
    """pyproject lists the packages setuptools installs: a new subpackage missing there works
    in a checkout and is absent from the wheel (found by CI's wheel check, minutes later)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name.rsplit(".", 1)[0] for name in MODULES if "." in name}  # where each module lives
    assert packages == listed, (f"pyproject.toml [tool.setuptools] packages: add {sorted(packages - listed)}, "
                                f"remove {sorted(listed - packages)}")
