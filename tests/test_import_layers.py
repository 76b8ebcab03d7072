"""Imports run one way: core <- datamodules <- methods / evaluation / callbacks <- commands.

Read from the source (every ``import``, also those inside functions, which hide circles from a plain import test):
no project module imports one of a higher layer, and no two modules import each other through any chain.
"""
from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("lightning_modules", "datamodules", "callbacks")
COMMANDS = {"lightning_modules.cli", "lightning_modules.lightning_cli", "lightning_modules.sweep",
            "lightning_modules.pairs_command"}
LAYER_NAMES = ("core", "datamodules", "methods, evaluation, callbacks", "commands")


def layer(module: str) -> int:
    if module in COMMANDS:
        return 3
    if module == "lightning_modules" or module.startswith(("lightning_modules.methods", "lightning_modules.evaluation",
                                                           "callbacks")):
        return 2  # the lightning_modules package itself re-exports the methods
    return 1 if module.startswith("datamodules") else 0


def project_modules() -> dict[str, str]:
    modules = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    modules[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return modules


def imports_of(module: str, path: str, known: set[str]) -> set[str]:
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known and name != module}
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {module: imports_of(module, path, set(modules)) for module, path in modules.items()}


def test_the_graph_sees_the_project(graph):
    assert {"lightning_modules.base", "datamodules.toy", "callbacks.ema", "lightning_modules.cli"} <= set(graph)
    assert "lightning_modules.networks.mixture_law" in graph["lightning_modules.networks.toy_laws"]
    assert "lightning_modules.lightning_cli" in graph["lightning_modules.sweep"]  # a lazy import is seen


def test_no_module_imports_a_higher_layer(graph):
    upward = [f"{a} ({LAYER_NAMES[layer(a)]}) -> {b} ({LAYER_NAMES[layer(b)]})"
              for a, targets in graph.items() for b in targets if layer(b) > layer(a)]
    assert not upward, "imports against the layering:\n" + "\n".join(sorted(upward))


def test_no_import_circles(graph):
    # Tarjan's strongly connected components; a package importing its own submodules is not a circle unless a
    # submodule imports the package back (then the component has both)
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
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
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"
