"""The package's shape: imports go one way (numerics -> backbones/methods -> detector -> served runtime ->
registry -> batch/monitoring/server -> api -> cli), without cycles; the served runtime never imports the
registry side; helpers named once are defined once."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "adreg"
LAYERS = {
    "adreg": 0, "adreg.errors": 0, "adreg.names": 0, "adreg.metrics": 0, "adreg.postprocess": 0, "adreg.images": 0,
    "adreg.thresholds": 0, "adreg.integrity": 0, "adreg.augment": 0, "adreg.cutpaste": 0, "adreg.data": 0,
    "adreg.reference": 0, "adreg.progress": 0, "adreg.synthetic": 0, "adreg.options": 0,
    "adreg.backbones": 1, "adreg.methods": 1,
    "adreg.detector": 2, "adreg.evaluation": 2, "adreg.fitting": 2, "adreg.feature_cache": 2, "adreg.reports": 2,
    "adreg.store": 3, "adreg.pyfunc": 4, "adreg.registry": 5,
    "adreg.batch": 6, "adreg.monitoring": 6, "adreg.server": 6, "adreg.evaluator": 6, "adreg.api": 7, "adreg.cli": 8,
    "adreg.review": 6, "adreg.tuning": 6,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def known(name: str) -> str:
        while name and name not in mods:
            name = name.rsplit(".", 1)[0] if "." in name else ""
        return name

    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("adreg"):
                names = [known(f"{node.module}.{a.name}") or known(node.module) for a in node.names]
            elif isinstance(node, ast.Import):
                names = [known(a.name) for a in node.names if a.name.startswith("adreg")]
            graph[mod] |= {n for n in names if n and n != mod and not n.startswith(mod + ".")}
    return graph


def _layer(mod: str) -> int:
    while mod not in LAYERS:
        mod = mod.rsplit(".", 1)[0]
    return LAYERS[mod]


def test_imports_go_one_way_without_cycles():
    graph = _graph()
    assert set(graph) >= {"adreg.api", "adreg.cli", "adreg.registry.resolve", "adreg.store"}
    upward = sorted((m, t) for m, ts in graph.items() for t in ts
                    if _layer(t) > _layer(m) and (m, t) != ("adreg", "adreg.api"))  # the lazy re-export
    assert upward == []
    assert not [(m, t) for m, ts in graph.items() for t in ts
                if m.startswith("adreg.pyfunc") and t.startswith("adreg.registry")]
    state, cycles = {}, []

    def visit(node, path):
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for mod in graph:
        if mod not in state:
            visit(mod, [mod])
    assert cycles == []


def test_shared_helpers_are_defined_once():
    text = {p: p.read_text() for p in ROOT.rglob("*.py")}
    for helper in ("model_name", "check_category", "sha256_file", "experiment_id", "fit_experiment_id", "get_model",
                   "check_version", "download_detector", "progress_enabled", "artifact_location"):
        defs = [str(p.relative_to(ROOT)) for p, src in text.items() if re.search(rf"^def {helper}\(", src, re.M)]
        assert len(defs) == 1, (helper, defs)
    assert not [p for p, src in text.items() if re.search(r'f"adreg-\{', src)]  # names through adreg.names
