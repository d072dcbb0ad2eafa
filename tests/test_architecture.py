"""The shape of the code, checked from the source: no import cycles in app/, worker/ and modelpress/, and the layers
keep to their side (docs/architecture.md draws the same map).

Every import counts, including those inside functions: a cycle hidden in a function is still a cycle.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "worker", "modelpress")
ML_LIBRARIES = ("torch", "onnxruntime", "onnx", "onnxscript", "transformers", "safetensors")
# What the server needs and the client does not: the client installs and runs without them.
SERVER_LIBRARIES = ("fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "psycopg", "celery", "kombu", "redis",
                    "boto3", "numpy", "pydantic_settings")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))}


def _imported_names(tree: ast.AST) -> list[str]:
    """Dotted names of what a module imports: `from a.b import c` gives `a.b.c` (a module or a name in a.b)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative imports are not used here"
            names += [f"{node.module}.{alias.name}" for alias in node.names]
    return names


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The longest prefix of `name` that is one of our modules, else the name itself (a third-party import)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return name


def import_graph() -> dict[str, set[str]]:
    """Module -> what it imports (our modules by name, third-party imports by their dotted name)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        imported = {_resolve(i, modules) for i in _imported_names(ast.parse(path.read_text(), str(path)))}
        graph[name] = imported - {name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in graph:
                continue
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _violations(graph: dict[str, set[str]], importer: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{module} imports {target}" for module, targets in graph.items() if _within(module, importer)
                  for target in targets if any(_within(target, f) for f in forbidden))


GRAPH = import_graph()


def test_the_graph_sees_function_level_imports() -> None:
    # worker.formats imports the Hugging Face loader inside a function (transformers is slow to import)
    assert "worker.formats.hf" in GRAPH["worker.formats"]
    assert "app.core.config" in GRAPH["worker.celery_app"]
    # the one way from the client's command to the server's: app.cli, imported when a server command runs
    assert {target for target in GRAPH["modelpress.cli"] if _within(target, "app")} == {"app.cli"}


def test_cycles_are_found() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    assert find_cycles(GRAPH) == []


@pytest.mark.parametrize("importer, forbidden, why", [
    ("worker", ("app.api", "app.cli"), "the worker never imports the HTTP layer"),
    ("app", ("worker", *ML_LIBRARIES), "the API process never imports the workers or ML libraries"),
    ("app.core", ("app.api", "app.cli"), "the core that both processes use knows nothing of HTTP"),
    ("worker.compression", ("app.core.recipe", "app.api"),
     "compression functions take plain arguments, not recipe schemas"),
    ("modelpress", ("app.core", "app.api", "worker", "migrations", *ML_LIBRARIES, *SERVER_LIBRARIES),
     "the client needs only the base install's HTTP and terminal libraries; it speaks to the service over HTTP"),
    ("app", ("modelpress",), "the service does not depend on its client"),
])
def test_layer_boundaries(importer: str, forbidden: tuple[str, ...], why: str) -> None:
    assert _violations(GRAPH, importer, forbidden) == [], why
