"""Layout checks that import-linter does not make (run by .ci/run).

* no import circle between any two modules of ``fastmta`` (import-linter's
  layer contracts only see imports across subpackages);
* no module over ``MAX_LINES`` lines: a module that big holds more than one job.

Exit status 0 when both hold, 1 otherwise, naming each offender.
"""

from __future__ import annotations

import sys
from pathlib import Path

import grimp

MAX_LINES = 650
SRC = Path(__file__).resolve().parents[1] / "src" / "fastmta"


def import_cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Every elementary cycle's smallest representative, found by depth-first search (Tarjan's SCCs)."""
    modules = sorted(graph.modules)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:  # iterative, so a deep graph cannot hit the recursion limit
        nonlocal counter
        work = [(start, iter(sorted(graph.find_modules_directly_imported_by(start))))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))

    for module in modules:
        if module not in index:
            visit(module)
    return components


def oversized_modules() -> list[tuple[str, int]]:
    found = []
    for path in sorted(SRC.rglob("*")):
        if path.suffix in {".py", ".pyx", ".pxi"}:
            lines = len(path.read_text(encoding="utf-8").splitlines())
            if lines > MAX_LINES:
                found.append((str(path.relative_to(SRC.parent)), lines))
    return found


def main() -> int:
    # Packages import their own submodules to re-export them (fastmta.sink,
    # fastmta itself); a package's __init__ is not a module with a job of its
    # own, so the edges from a package to its children are not circles.
    graph = grimp.build_graph("fastmta", include_external_packages=False)
    for module in sorted(graph.modules):
        for child in graph.find_children(module):
            if graph.direct_import_exists(importer=module, imported=child):
                graph.remove_import(importer=module, imported=child)
    failed = False
    for cycle in import_cycles(graph):
        print("import circle: " + " <-> ".join(cycle))
        failed = True
    for path, lines in oversized_modules():
        print(f"{path}: {lines} lines (limit {MAX_LINES}): split it by responsibility")
        failed = True
    if not failed:
        print(f"layout ok: no import circle, no module over {MAX_LINES} lines")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
