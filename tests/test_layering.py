"""The package's shape, checked on its source: no import cycles; each layer imports only itself and the layers
below it (kernels < runtime < scheduler < methods < actors < the builder and services < server / cli / bench);
the lower layers never import Ray, FastAPI or YAML; the actors host what they are handed and import no method;
and a strategy's name appears only in its own module, the registry, tests and docs."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from outrider.methods import METHODS

ROOT = Path(__file__).resolve().parent.parent / "outrider"
LAYERS = [  # lowest first; a module belongs to the first entry its name starts with, most specific first
    ("base", ("outrider.hub", "outrider.prompts", "outrider")),
    ("kernels", ("outrider.kernels",)),
    ("runtime", ("outrider.runtime",)),
    ("scheduler", ("outrider.scheduler",)),
    ("methods", ("outrider.methods",)),
    ("actors", ("outrider.actors",)),
    ("build and services", ("outrider.profile", "outrider.flags", "outrider.build", "outrider.pipeline",
                            "outrider.service", "outrider.devices")),
    ("server, cli, bench, jobs", ("outrider.server", "outrider.cli", "outrider.bench", "outrider.jobs")),
]
RAY_FREE = ("kernels", "runtime", "scheduler", "methods", "build and services")  # Ray only in actors and the top
EDGE_FREE = ("kernels", "runtime", "scheduler")  # no web framework, no YAML below the methods


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(encoding="utf-8")) for p in sorted(ROOT.rglob("*.py"))}


def imports(tree: ast.Module) -> set[str]:
    """Every module named by an import statement anywhere in the file (function bodies and TYPE_CHECKING too)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def layer_of(name: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in sorted(prefixes, key=len, reverse=True):
            if name == prefix or name.startswith(prefix + ".") and prefix != "outrider":
                return rank
    return 0


def project_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {i for i in imports(tree) if i in mods} for name, tree in mods.items()}


def test_no_import_cycles():
    graph, cycles = project_graph(), []
    index, low, stack, on_stack, counter = {}, {}, [], set(), [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph[v]:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles: {cycles}"


def test_each_layer_imports_only_itself_and_the_layers_below():
    upward = [f"{name} ({LAYERS[layer_of(name)][0]}) imports {i} ({LAYERS[layer_of(i)][0]})"
              for name, deps in project_graph().items() for i in deps if layer_of(i) > layer_of(name)]
    assert upward == [], "\n".join(upward)


def test_the_actors_import_no_method_and_the_lower_layers_no_ray_or_web_framework():
    found = []
    for name, tree in modules().items():
        layer, deps = LAYERS[layer_of(name)][0], imports(tree)
        if layer == "actors":
            found += [f"{name} imports {i}" for i in deps if i.startswith("outrider.methods")]
        if layer in RAY_FREE:
            found += [f"{name} imports {i}" for i in deps if i.split(".")[0] == "ray"]
        if layer in EDGE_FREE:
            found += [f"{name} imports {i}" for i in deps if i.split(".")[0] in ("fastapi", "yaml", "uvicorn")]
    assert found == [], "\n".join(found)


# Strings that spell a strategy's name but mean something else there.
NOT_A_STRATEGY = {("outrider/server/protocol.py", '"suffix"'): "the OpenAI completions field `suffix`"}


def test_a_strategy_name_appears_only_in_its_module_and_the_registry():
    """Quoted as a string anywhere else, a name is a branch or a table that the method's declaration should
    answer instead (tests and docs may name it)."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        name = module_name(path)
        text = path.read_text(encoding="utf-8")
        for strategy, method in METHODS.items():
            own = type(method).__module__  # the method's module, or its folder's package
            if name == "outrider.methods" or name == own or name.startswith(own + "."):
                continue
            for match in re.finditer(rf"""["']{re.escape(strategy)}["']""", text):
                if (str(path.relative_to(ROOT.parent)), match.group()) in NOT_A_STRATEGY:
                    continue
                found.append(f"{path.relative_to(ROOT.parent)}:{text.count(chr(10), 0, match.start()) + 1}: "
                             f"{match.group()}")
    assert found == [], "\n".join(found)


def test_the_checks_can_fail():
    """Negative controls: a cycle, an upward import and a quoted name are caught by the same helpers."""
    assert layer_of("outrider.runtime.model") < layer_of("outrider.scheduler.engine")
    assert layer_of("outrider.actors.remote") < layer_of("outrider.build.deployment")
    assert imports(ast.parse("def f():\n    from outrider.cli import main\n")) >= {"outrider.cli"}
    assert re.search(r"""["']vanilla["']""", "if name == 'vanilla':")
