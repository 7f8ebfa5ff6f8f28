"""The shape of the code: no import cycles between forkcore's modules (type-checking
imports included), and no secret on a public attribute."""

from __future__ import annotations

import ast
from pathlib import Path

import forkcore

PACKAGE = Path(forkcore.__file__).resolve().parent


def _module_graph() -> dict[str, set[str]]:
    modules: dict[str, Path] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    deps.add(full if full in modules else target)
            elif isinstance(node, ast.Import):
                deps.update(alias.name for alias in node.names)
        # the package's __init__ only re-exports: importing it is not a dependency cycle
        graph[name] = {d for d in deps if d in modules and d not in (name, "forkcore")}
    return graph


def test_no_import_cycles() -> None:
    graph = _module_graph()
    assert "forkcore.protocol.session" in graph and graph["forkcore.client.connection"]
    cycles: list[list[str]] = []
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append([*stack[stack.index(dep):], dep])
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_server_keeps_its_key_private() -> None:
    server = forkcore.Server(id="s", transport="memory", security={"psk": "k" * 32})
    assert not hasattr(server, "psk")
    assert not any(isinstance(value, bytes) for name, value in vars(server).items()
                   if not name.startswith("_"))
