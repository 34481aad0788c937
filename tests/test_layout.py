"""The layout a reader relies on: flat top-level modules, imports that run one way (no cycle, no
lazy import of a sibling to dodge one), a docstring first in every file, no file over 600 lines."""
import ast
from pathlib import Path

from conftest import ROOT

MODULES = sorted(p.stem for p in ROOT.glob("*.py"))
MAX_LINES = 600


def sibling_imports(path: Path) -> dict[str, int]:
    """{sibling module: line} of every import of a top-level module of this repo, wherever it
    stands in the file (module level or inside a function)."""
    found = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[0] for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module.split(".")[0]]
        for name in names:
            if name in MODULES:
                found.setdefault(name, node.lineno)
    return found


def find_cycle(graph: dict[str, set]) -> list[str] | None:
    """A cycle of the directed graph as [a, b, ..., a], or None (depth-first search)."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = "done"
        return None
    for node in sorted(graph):
        if node not in state:
            found = visit(node, [node])
            if found:
                return found
    return None


def import_graph() -> dict[str, set]:
    return {m: set(sibling_imports(ROOT / f"{m}.py")) - {m} for m in MODULES}


def test_find_cycle_finds_one():  # the checker itself, on graphs with and without a cycle
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"run": {"lume", "methods"}, "methods": {"lume"}, "lume": {"methods"}}) == \
        ["lume", "methods", "lume"]


def test_top_level_imports_have_no_cycle():
    graph = import_graph()
    assert {"lume", "generation", "evaluation", "dist", "tiny", "methods", "job", "run"} <= set(graph)
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_imports_run_one_way():
    # the engine imports no sibling; what builds on it imports it, and run.py imports them all
    graph = import_graph()
    assert graph["lume"] == set() and graph["fetch"] == set(), (graph["lume"], graph["fetch"])
    for name in ("methods", "evaluation", "membership", "tiny", "generation"):
        assert "lume" in graph[name] and "run" not in graph[name] and "dist" not in graph[name], (name, graph[name])
    assert graph["dist"] <= {"lume", "evaluation", "membership", "generation", "metrics", "lora", "rundir"}, graph["dist"]
    assert {"lume", "dist", "evaluation", "methods", "tiny", "data"} <= graph["job"]
    assert graph["run"] <= {"job", "lume", "checks", "methods"}, graph["run"]  # Config, argparse, checks, --method
    for name in MODULES:  # nothing imports the entry points
        assert "run" not in graph[name] and (name == "run" or "job" not in graph[name]), (name, graph[name])


CORE = {"lume", "data", "methods", "metrics"}  # the reference a reader copies from: it reads on its own


def test_the_core_imports_nothing_of_the_project_outside_itself():
    """lume.py, data.py, methods.py and metrics.py import only each other (and torch, numpy, the stdlib),
    anywhere in the file but a command-line `if __name__ == "__main__":` block (data.py's `fetch`)."""
    for name in sorted(CORE):
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        main = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.dump(n.test)]
        for block in main:
            tree.body.remove(block)
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        assert not (found & set(MODULES)) - CORE, f"{name}.py imports {sorted((found & set(MODULES)) - CORE)}"


def test_every_file_has_a_docstring_and_at_most_600_lines():
    for path in sorted(ROOT.glob("*.py")) + sorted((ROOT / "tests").glob("*.py")):
        text = path.read_text()
        assert ast.get_docstring(ast.parse(text)), f"{path.name} has no module docstring"
        n = text.count("\n")
        assert n <= MAX_LINES, f"{path.name} has {n} lines (at most {MAX_LINES})"
