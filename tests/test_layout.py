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


#: the package and the folders beside it, bottom to top: a folder imports none above it
ORDER = ("adreg", "serving", "pipelines", "benchmarks", "tests")
#: helpers shared by the package, the tools and the tests, each defined in one place (issue 33)
ONCE = {"free_port": "serving/process.py", "stop_process_group": "adreg/server.py", "wait_http": "adreg/server.py",
        "file_to_b64": "adreg/images.py", "peak_rss_mib": "benchmarks/harness.py", "first_line": "adreg/errors.py",
        "machine_line": "benchmarks/harness.py", "write_page": "benchmarks/harness.py",
        "write_csv": "benchmarks/harness.py", "ints": "benchmarks/harness.py", "command_line": "benchmarks/harness.py",
        "replace_section": "benchmarks/harness.py", "run_child": "benchmarks/harness.py",
        "child_result": "benchmarks/harness.py", "proc_status": "benchmarks/harness.py",
        "link_files": "benchmarks/harness.py", "dataset_args": "benchmarks/harness.py",
        "quiet": "benchmarks/harness.py", "signal_group": "adreg/server.py",
        "reap_group": "adreg/server.py", "contamination_guard": "adreg/fitting.py"}


def _repo_sources() -> dict[str, str]:
    """Every .py file of the package, the tools and the tests (and the docs hooks), by repository path."""
    folders = (*ORDER, "docs")
    return {str(p.relative_to(ROOT.parent)): p.read_text() for f in folders for p in (ROOT.parent / f).rglob("*.py")}


def test_tools_sit_above_the_package_and_pipelines_holds_only_the_entry_points():
    """``adreg`` imports none of the tools; ``serving`` (client, load test, server processes) no benchmark or
    pipeline; the MLflow project's entry points (``pipelines``) no benchmark; the benchmarks are not installed."""
    def imported(path: Path) -> set[str]:
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                out |= {a.name.split(".")[0] for a in node.names}
        return out

    for i, folder in enumerate(ORDER):
        above = set(ORDER[i + 1:])
        wrong = {str(p.relative_to(ROOT.parent)): sorted(imported(p) & above)
                 for p in (ROOT.parent / folder).rglob("*.py")}
        assert {k: v for k, v in wrong.items() if v} == {}, folder
    assert sorted(p.stem for p in (ROOT.parent / "pipelines").glob("*.py")) == ["__init__", "evaluate", "fit", "update"]
    mlproject = (ROOT.parent / "MLproject").read_text()
    assert set(re.findall(r"python -m (\S+)", mlproject)) == {"pipelines.fit", "pipelines.evaluate",
                                                                "pipelines.update", "benchmarks"}
    import tomllib

    find = tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert find["include"] == ["adreg", "adreg.*"]  # benchmarks/, pipelines/ and serving/ stay out of the wheel


def test_process_and_benchmark_helpers_are_defined_once_in_the_repository():
    """One ``def`` of each helper in the whole repository (package, tools, tests), where ``ONCE`` says; the dead
    code issue 33 named is gone."""
    sources = _repo_sources()
    for helper, home in ONCE.items():
        defs = [p for p, src in sources.items() if re.search(rf"^\s*def {helper}\(", src, re.M)]
        assert defs == [home], (helper, defs)
    for dead in ("resolve_parent", "image_probability", "clear_memory", "_ints", "write_protocols_section",
                 "update_page", "link_folder"):
        assert not [p for p, src in sources.items() if re.search(rf"^\s*def {dead}\(", src, re.M)], dead


def test_the_gated_metrics_are_listed_once():
    """The metrics the promotion gate judges are one tuple literal, ``adreg.statistics.GATED``: every other
    module (the registry, the CLI) reads that one."""
    from adreg.statistics import GATED

    def names(node) -> list:
        return [e.value if isinstance(e, ast.Constant) else None for e in node.elts]

    literals = [f"{p.relative_to(ROOT)}:{node.lineno}" for p in ROOT.rglob("*.py")
                for node in ast.walk(ast.parse(p.read_text())) if isinstance(node, (ast.Tuple, ast.List, ast.Set))
                and len(node.elts) == len(GATED) and set(names(node)) == set(GATED)]
    assert len(literals) == 1 and literals[0].startswith("statistics.py:"), literals


def _calls_that_make_versions(path: Path) -> list[str]:
    """``file:line`` of each call in ``path`` that logs an MLflow model (``<flavor>.log_model``) or registers a
    version (``register`` of ``adreg.registry.versions``, however imported)."""
    tree = ast.parse(path.read_text())
    module_names, function_names = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "adreg.registry":
            module_names |= {a.asname or a.name for a in node.names if a.name == "versions"}
        elif isinstance(node, ast.ImportFrom) and node.module == "adreg.registry.versions":
            function_names |= {a.asname or a.name for a in node.names if a.name == "register"}
        elif isinstance(node, ast.Import):
            module_names |= {a.asname for a in node.names if a.name == "adreg.registry.versions" and a.asname}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        logs = (isinstance(f, ast.Attribute) and f.attr == "log_model") or (
            isinstance(f, ast.Name) and f.id == "log_model")
        registers = (isinstance(f, ast.Attribute) and f.attr == "register" and isinstance(f.value, ast.Name)
                     and f.value.id in module_names) or (isinstance(f, ast.Name) and f.id in function_names)
        if logs or registers:
            found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}")
    return found


def test_versions_are_logged_and_registered_in_one_place():
    """Every model version is logged (``mlflow.pyfunc.log_model``) and registered (``versions.register``) by
    ``adreg.registry.derive`` alone: in the package, the pipelines, the benchmarks and the serving tools. The tests are left
    out: some call ``versions.register`` themselves because registration is what they test (an incomplete run
    refused, concurrent registrations, a hand-made broken model, a logged model registered at a chosen
    moment)."""
    files = [p for folder in ("adreg", "pipelines", "serving", "benchmarks") for p in (ROOT.parent / folder).rglob("*.py")]
    calls = [c for p in files for c in _calls_that_make_versions(p)]
    assert calls and all(c.startswith("adreg/registry/derive.py:") for c in calls), calls
    assert len(calls) == 2, calls  # one log_model, one register


def test_every_public_function_takes_tracking_uri_by_keyword():
    """``tracking_uri`` is a keyword-only argument of every public function of ``adreg.api``."""
    import inspect

    from adreg import api

    functions = [f for f in map(vars(api).get, api.__all__) if inspect.isfunction(f)]  # not the lazy classes
    assert len(functions) > 20
    wrong = [f.__name__ for f in functions
             if getattr(inspect.signature(f).parameters.get("tracking_uri"), "kind", None)
             is not inspect.Parameter.KEYWORD_ONLY]
    assert wrong == []


def test_every_public_type_has_an_example_and_is_in_the_reference():
    """Every class ``import adreg`` offers (what the functions return, their options) has an Examples section
    and is rendered in docs/reference/python-api.md (through ``adreg.api``'s ``__all__`` or its own ``:::``)."""
    import re

    import adreg
    from adreg import api

    types = {name: getattr(adreg, name) for name in adreg.__all__ if name[:1].isupper()}
    assert len(types) >= 14
    assert [name for name, t in types.items() if "Examples:" not in (t.__doc__ or "")] == []
    page = (ROOT.parent / "docs" / "reference" / "python-api.md").read_text()
    rendered = set(api.__all__) | {line.rsplit(".", 1)[-1] for line in re.findall(r"^::: (\S+)$", page, re.M)}
    assert sorted(set(types) - rendered) == []
