"""The tree shows the architecture: a folder imports only from the layers below it, no import circles (imports
under ``TYPE_CHECKING`` and inside functions included). Parsed from the source, nothing imported."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "distspatial"

#: rank of each layer; a module may import from its own layer and from lower ranks only
RANK = {
    "core": 0,
    "kernels": 1, "io": 1,
    "node": 2,
    "control": 3,
    "client": 4,
    "algorithms": 5, "live": 5,
    "facade": 6,  # cluster.py, typed_queries.py, __init__.py and the public aliases
    "ui": 7,
}


#: upward imports kept on purpose, each with its reason
ALLOWED = {
    ("distspatial.cluster", "distspatial.ui.plots"): "cluster.plot_partitions(), a convenience; imported lazily",
}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in RANK else "facade"


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _imports(module: str, path: Path) -> set[str]:
    """Every distspatial module ``module`` imports (relative imports resolved; ``from . import x`` counts x)."""
    tree = ast.parse(path.read_text())
    pkg = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("distspatial")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("distspatial"):
                target = node.module
            else:
                continue
            found.add(target)
            found |= {f"{target}.{a.name}" for a in node.names}
    return found


def test_every_folder_imports_only_from_layers_below():
    mods = _modules()
    bad = []
    for mod, path in mods.items():
        if _layer(mod) == "facade" and mod.count(".") == 1 and "_sys.modules[__name__]" in path.read_text():
            continue  # a public alias (distspatial.plots, ...) re-exports a module from its layer by design
        for target in _imports(mod, path):
            if target not in mods:
                continue  # a name imported from a module, not a module
            if RANK[_layer(target)] > RANK[_layer(mod)] and (mod, target) not in ALLOWED:
                bad.append(f"{mod} ({_layer(mod)}) imports {target} ({_layer(target)})")
    assert not bad, "imports that go up a layer:\n" + "\n".join(sorted(bad))


def test_no_import_circles():
    mods = _modules()
    graph = {m: {t for t in _imports(m, p) if t in mods and t != m} for m, p in mods.items()}
    for m in graph:  # a package's __init__ importing its own modules is not a circle
        graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_algorithms_and_live_updates_use_no_private_members_of_other_layers():
    """Algorithms and live updates reach the cluster through ClusterRuntime's public members only."""
    bad = []
    for folder in ("algorithms", "live"):
        for path in (PKG / folder).glob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                    owner = node.value
                    if isinstance(owner, ast.Name) and owner.id in ("rt", "cluster", "runtime"):
                        bad.append(f"{path.name}:{node.lineno} {owner.id}.{node.attr}")
    assert not bad, bad


def test_public_module_paths_still_work():
    import importlib

    for public, home in [("plots", "ui.plots"), ("streaming", "live.streaming"), ("windows", "live.windows"),
                         ("continuous", "live.continuous"), ("service", "ui.service"), ("datasets", "io.datasets")]:
        assert importlib.import_module(f"distspatial.{public}") is importlib.import_module(f"distspatial.{home}")
    from distspatial import DistributedSpatialCluster, NodeConfig  # noqa: F401
    from distspatial.io import read_points, write_results  # noqa: F401
