"""The library's import graph: no cycle (every import counted, those inside functions too), and nothing low
importing what builds on it (`--help`'s light imports are checked in test_cli.py)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "raystack"

#: packages that the ones named after them build on; a module of the left may not import one of the right
NOT_UPWARD = {
    "raystack.models": ("raystack.hardening", "raystack.attacks", "raystack.redteam", "raystack.tuning",
                        "raystack.judges", "raystack.evaluation"),
    "raystack.attacks": ("raystack.hardening", "raystack.redteam", "raystack.tuning"),
    "raystack.distributed": ("raystack.hardening", "raystack.attacks"),
    "raystack.search": ("raystack.hardening", "raystack.redteam", "raystack.tuning"),
    "raystack.redteam.space": ("raystack.hardening", "raystack.tuning", "raystack.redteam.sweep"),
    "raystack.hardening.method": ("raystack.hardening.methods",),
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in PACKAGE.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports anywhere in its file (ast walk)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        is_pkg = p.name == "__init__.py"
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = m.split(".") if is_pkg else m.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                names = [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for t in names:
                while t and t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != m:
                    graph[m].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_the_package_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_check_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_imports_what_builds_on_it():
    graph = import_graph()
    bad = [(m, t) for m, targets in graph.items() for low, high in NOT_UPWARD.items()
           if m == low or m.startswith(low + ".") for t in targets if any(t == h or t.startswith(h + ".") for h in high)]
    assert not bad, bad
