"""The package's import graph: no circles, layers that only point down, and no engine module imports a CLI module.

Every ``import`` counts, including those inside functions (a lazy import still couples two modules). CLI modules
are ``medtune/cli.py``, ``medtune/__main__.py`` and each package's ``cli.py``.

Layers, bottom up: the package's ground floor (``medtune``, ``errors``, ``paths``, ``progress``, ``distributed``,
``validation``) < ``data`` < ``models`` < ``train``, ``eval``, ``serve`` (side by side) < ``demo`` < every CLI
module. A module may import from its own layer or below, never above (batch building lives in ``models`` so the
model kinds can use it).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "medtune"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the medtune modules it imports (``from pkg import name`` counts name when it is a module)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets.update(owner(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    full = f"{source}.{alias.name}"
                    targets.add(full if full in modules else owner(source))
        graph[name] = {t for t in targets if t and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def is_cli(module: str) -> bool:
    return module in ("medtune.cli", "medtune.__main__") or module.endswith(".cli")


LAYERS = {"medtune": 0, "errors": 0, "paths": 0, "progress": 0, "distributed": 0, "validation": 0, "__main__": 5,
          "data": 1, "models": 2, "train": 3, "eval": 3, "serve": 3, "demo": 4}
CLI_LAYER = 5


def layer(module: str) -> int:
    if is_cli(module):
        return CLI_LAYER
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else parts[0]]


def test_layers_only_point_down():
    graph = import_graph()
    unknown = sorted({m.split(".")[1] for m in graph if "." in m and not is_cli(m)} - set(LAYERS))
    assert unknown == []   # a new top-level package or module needs its place in LAYERS
    upward = sorted((module, target) for module, targets in graph.items() for target in targets
                    if layer(target) > layer(module))
    assert upward == []


def test_the_layer_check_sees_an_upward_import():
    assert layer("medtune.models.kinds.base") < layer("medtune.train.collate") < layer("medtune.demo.pipeline")
    assert layer("medtune.eval.cli") == layer("medtune.cli") > layer("medtune.demo.pipeline")


def test_the_import_graph_has_no_circles():
    assert cycles(import_graph()) == []


def test_no_engine_module_imports_a_cli_module():
    offending = sorted((module, target) for module, targets in import_graph().items() if not is_cli(module)
                       for target in targets if is_cli(target))
    assert offending == []


def test_the_checker_sees_a_circle_and_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    # a function-level import is an edge too: `medtune eval run` imports the run module inside its function
    assert "medtune.eval.run" in import_graph()["medtune.eval.cli"]


KIND_TEST = re.compile(r"""[=!]=\s*["'](native|composed|moe|discrete)["']|\.kind\s*[=!]=|\.kind\s+(not\s+)?in\b"""
                       r"""|image_tokens_per_image\s+is\s+None"""
                       r"""|isinstance\([^)]*\b(ComposedVLM|NativeVLM|MoEVLM|DiscreteVLM)\b|model_type\s*[=!]=""")


def test_no_caller_tests_the_model_kind():
    """Only the kind objects (medtune/models/kinds/) may know which kind they are; callers ask them."""
    kinds = PACKAGE / "models" / "kinds"
    found = [f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}"
             for path in sorted(PACKAGE.rglob("*.py")) if kinds not in path.parents
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if KIND_TEST.search(line)]
    assert found == []


def test_the_kind_test_pattern_sees_the_old_spellings():
    for line in ('if vlm.template == "native":', "if vlm.image_tokens_per_image is None:",
                 'if model.config.model_type == "llava":', "isinstance(vlm, NativeVLM)", 'vlm.kind != "composed"',
                 "isinstance(vlm, DiscreteVLM)", 'if vlm.kind in ("moe", "discrete"):', 'kind == "moe"'):
        assert KIND_TEST.search(line), line
