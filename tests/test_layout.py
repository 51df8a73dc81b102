"""The shape we hold to: small modules, no import cycles, the ConfigDict only at the edges."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "glore_jax"
MAX_LINES = 400
# Where an ml_collections ConfigDict may appear: the schema modules and the two entry points.
# Schemas and entry points (rl/score_recipe.py is both: its knobs and its command).
CONFIG_EDGES = {"training/config.py", "recipe/config.py", "trainer.py", "pipeline.py", "train.py", "rl/score_recipe.py",
                "rl/latro_recipe.py", "agent/recipe.py"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _import_graph(mods: dict[str, pathlib.Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports at import time (function-level imports are lazy)."""
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                deps |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(u, stack):
        state[u] = 1
        for v in sorted(graph[u]):
            # A package importing its own submodules (its __init__) is not a cycle of ideas.
            if u.startswith(v + ".") or v.startswith(u + "."):
                continue
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state and (found := visit(v, stack + [v])):
                return found
        state[u] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return None


def test_modules_stay_small():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _modules().values()}
    assert max(sizes.values()) <= MAX_LINES, {k: v for k, v in sizes.items() if v > MAX_LINES}


def test_no_import_cycles():
    graph = _import_graph(_modules())
    assert _cycle(graph) is None, _cycle(graph)
    # The check can fail: a cycle planted in a copy of the graph is found.
    planted = {k: set(v) for k, v in graph.items()}
    planted["glore_jax.tasks"].add("glore_jax.trainer")
    assert _cycle(planted) is not None


def test_config_dict_stays_at_the_edges():
    users = {str(p.relative_to(PACKAGE)) for p in _modules().values() if "ConfigDict" in p.read_text()}
    assert users <= CONFIG_EDGES, users - CONFIG_EDGES
