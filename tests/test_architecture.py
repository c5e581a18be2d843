"""The layering of src/ptqd: every import (module-level or inside functions) points down the layers, so
there is no import cycle. The order is the one README's architecture section describes."""

import ast
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"

# lowest first; a module may import only from its own layer or the layers before it
LAYERS = [
    ["ptqd", "ptqd.errors", "ptqd.defaults", "ptqd.io", "ptqd.checks", "ptqd.validate", "ptqd.integrity", "ptqd.locks",
     "ptqd.images", "ptqd.distributed", "ptqd.chunks", "ptqd.data"],
    ["ptqd.models"],
    ["ptqd.sampling", "ptqd.shards"],
    ["ptqd.quant"],
    ["ptqd.metrics"],
    ["ptqd.calibration"],
    ["ptqd.correction"],
    ["ptqd.runtime"],
    ["ptqd.runs", "ptqd.api", "ptqd.compare", "ptqd.report", "ptqd.demo"],
    ["ptqd.cli", "ptqd.__main__"],
]


def modules() -> dict[str, Path]:
    out = {}
    for f in (SRC / "ptqd").rglob("*.py"):
        parts = list(f.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def layer_of(module: str) -> int:
    best, depth = None, -1
    for i, names in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and n.count(".") > depth:
                best, depth = i, n.count(".")
    assert best is not None, f"{module} is in no layer: add it to LAYERS (and README's architecture section)"
    return best


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    def resolve(name: str) -> str | None:
        parts = name.split(".")
        while parts:
            if ".".join(parts) in mods:
                return ".".join(parts)
            parts.pop()
        return None

    graph = {}
    for m, f in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [f"{node.module}.{a.name}" for a in node.names] or [node.module]
            for n in names:
                if n.startswith("ptqd"):
                    r = resolve(n)
                    if r and r != m:
                        deps.add(r)
        graph[m] = deps
    return graph


def test_every_import_points_down_the_layers():
    mods = modules()
    graph = imports(mods)
    up = []
    for m, deps in graph.items():
        for d in deps:
            if d == "ptqd":  # the package root holds only the version and lazy public names
                continue
            if layer_of(d) > layer_of(m):
                up.append(f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})")
    assert not up, "imports pointing up the layers:\n" + "\n".join(sorted(up))


def test_no_import_cycles():
    graph = imports(modules())
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if d.startswith(m + "."):  # a package importing its own submodules (its __init__ re-exports)
                continue
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
