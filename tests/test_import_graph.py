"""No import cycles in tinyllama_ref or kernels: imports go one way (docs/STYLE.md: "one direction of imports").

The graph is read from the source with ast, so it holds every import statement, at module level and inside
functions alike: an import deferred into a function still ties the two modules together, it only hides the
cycle until that function runs. An edge goes to the module an import names (`from ..eval import runner` and
`from ..eval.runner import x` both reach eval/runner.py), not to the packages above it.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("tinyllama_ref", "kernels")


def module_files():
    """{dotted module name: path} of every .py file of the packages (a package is its __init__.py)."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports_of(name, path, modules):
    """{(imported module, line)} of one file: every Import/ImportFrom node anywhere in it."""
    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {(a.name, node.lineno) for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else []))
            for a in node.names:
                if f"{base}.{a.name}" in modules:          # `from package import submodule`
                    found.add((f"{base}.{a.name}", node.lineno))
                elif base in modules:
                    found.add((base, node.lineno))
    return {(m, line) for m, line in found if m != name}


def import_graph():
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph):
    """One cycle as [a, b, ..., a] (with the line of each import), or None."""
    state, stack = {}, []                 # state: 1 = on the current path, 2 = done

    def visit(node):
        state[node] = 1
        for target, line in sorted(graph[node]):
            stack.append((node, line, target))
            if state.get(target) == 1:
                start = next(i for i, (n, _, _) in enumerate(stack) if n == target)
                return stack[start:]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
            stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert any(t == "tinyllama_ref.eval.runner" for t, _ in graph["tinyllama_ref.text"])
    # cli/main.py imports cli/score.py only inside its commands
    assert any(t == "tinyllama_ref.cli.score" for t, _ in graph["tinyllama_ref.cli.main"])


def test_a_cycle_is_found():
    graph = {"a": {("b", 3)}, "b": {("c", 7)}, "c": {("a", 12)}, "d": {("a", 1)}}
    assert [n for n, _, _ in find_cycle(graph)] == ["a", "b", "c"]


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(f"{n} (line {line})" for n, line, _ in cycle) + \
        f" -> {cycle[0][0]}"
