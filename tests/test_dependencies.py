"""The dependency direction of ../shared/DESIGN.md ("Layout"), enforced on every import in arcstream/.

Every `import arcstream.X` / `from arcstream.X import ...` counts, the ones inside functions too (a
function-level import is still a dependency; it only hides it). The rules:

- `io` (run locations, atomic writes, JSONL logs), `options` (frozen options from config sections) and
  `distributed` depend on nothing in arcstream;
- `data` and `model` know nothing of `stream`, `store`, `sae`, `analysis`, `predict` or `lm`;
- `sae` and `store` know nothing of `model` (nor of each other: only the wiring packages join them);
- only `stream`, `analysis`, `predict`, `lm` and the entry points wire packages together;
- no library package imports an entry point, and the packages form no cycle;
- no two modules import each other, directly or round a loop (`lm.card` and `lm.train` did).
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

import arcstream

ROOT = Path(arcstream.__file__).parent
ENTRY_POINTS = {"run", "analyze", "train_lm", "train_sae", "transform", "context_use"}
WIRING = {"stream", "analysis", "predict", "lm"}
# What each lower package may import (besides itself). `cli` is the shared launcher helpers (flags, progress
# bars, the run lock around a job): the wiring packages and entry points may use it, the layers below may not.
ALLOWED = {
    "io": set(),
    "options": set(),
    "distributed": set(),
    "data": {"io", "options"},
    "model": {"io", "options"},
    "models": {"io", "data"},
    "sae": {"io", "options"},
    "store": {"io", "data"},
    "cli": {"io", "store", "distributed", "options"},  # options: the ConfigError a refused config raises
}


def package_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    if rel.parts[0] == "predict" and rel.name == "__main__":
        return "predict.__main__"  # `python -m arcstream.predict`: an entry point inside a package
    return rel.parts[0]


def imported_packages(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "arcstream":
                out |= {a.name for a in node.names}
            elif node.module.startswith("arcstream."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("arcstream.")}
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (from {'.' * node.level}{node.module or ''}); "
                                 "arcstream uses absolute imports only")
    return out


def dependency_graph() -> dict[str, dict[str, list[str]]]:
    """package -> imported package -> the files that import it."""
    graph: dict[str, dict[str, list[str]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for path in sorted(ROOT.rglob("*.py")):
        pkg = package_of(path)
        for dep in imported_packages(path) - {pkg.split(".")[0]}:
            graph[pkg][dep].append(str(path.relative_to(ROOT.parent)))
    return graph


def violations(graph: dict[str, dict[str, list[str]]]) -> list[str]:
    bad = []
    entry = ENTRY_POINTS | {"predict.__main__"}
    for pkg, deps in graph.items():
        for dep, files in deps.items():
            why = ""
            if dep in ENTRY_POINTS:
                why = f"{pkg} imports the entry point {dep}"
            elif pkg in ALLOWED and dep not in ALLOWED[pkg]:
                why = f"{pkg} may import only {sorted(ALLOWED[pkg]) or 'nothing in arcstream'}, not {dep}"
            elif pkg not in ALLOWED and pkg not in WIRING and pkg not in entry:
                why = f"{pkg} is not in the layout of DESIGN.md (add it to this test's rules)"
            if why:
                bad.append(f"{why}: {', '.join(files)}")
    return bad


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, {})):
            if state.get(dep) == "open":
                found.append(stack[stack.index(dep):] + [dep] if dep in stack else [node, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_import_follows_the_dependency_direction():
    graph = dependency_graph()
    assert graph["stream"] and graph["analysis"], "the scan found no imports: is ROOT right?"
    assert violations(graph) == []


def test_the_packages_form_no_cycle():
    assert cycles(dependency_graph()) == []


def module_graph() -> dict[str, dict[str, list[str]]]:
    """module -> imported module -> [the importing file] (`from arcstream.a import b` names the module a.b when it
    is one, else a)."""
    names = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("").parts
        names[".".join(rel[:-1] if rel[-1] == "__init__" else rel)] = path
    graph: dict[str, dict[str, list[str]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    for name, path in names.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("arcstream"):
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("arcstream")]
            for t in targets:
                if t in names and t != name:
                    graph[name][t].append(str(path.relative_to(ROOT.parent)))
    return graph


def test_no_two_modules_import_each_other():
    graph = module_graph()
    assert graph["arcstream.lm.train"], "the scan found no imports of lm.train"
    assert cycles(graph) == []


def test_the_checks_catch_a_forbidden_import_and_a_cycle():
    """The rules fail on the faults they name (a model -> store import, a store <-> sae cycle)."""
    graph = dependency_graph()
    graph["model"]["store"].append("arcstream/model/x.py")
    graph["data"]["run"].append("arcstream/data/w.py")
    bad = "\n".join(violations(graph))
    assert "model may import only ['io', 'options'], not store: arcstream/model/x.py" in bad
    assert "data imports the entry point run" in bad
    graph = dependency_graph()
    graph["sae"]["store"].append("arcstream/sae/y.py")
    graph["store"]["sae"].append("arcstream/store/z.py")
    assert "sae may import only ['io', 'options'], not store" in "\n".join(violations(graph))
    assert cycles(graph) in ([["sae", "store", "sae"]], [["store", "sae", "store"]])
    modules = module_graph()
    modules["arcstream.lm.heldout"]["arcstream.lm.train"].append("arcstream/lm/heldout.py")
    assert ["arcstream.lm.heldout", "arcstream.lm.train", "arcstream.lm.heldout"] in cycles(modules) or \
        ["arcstream.lm.train", "arcstream.lm.heldout", "arcstream.lm.train"] in cycles(modules)
