"""Table rows of what the registry returns, as ``adreg history`` and ``adreg compare`` print them: the registry
returns typed records (events with their ``adreg.registry.events.GateRecord``, ``VersionComparison``), the
command line formats them here."""

from __future__ import annotations

from adreg.registry.events import GateEvent, GateRecord
from adreg.statistics import GATED

HISTORY_COLUMNS = ["at", "action", "alias", "version", "from", "by", "identity", "reason", "gate"]


def _interval(bounds: tuple[float | None, float | None] | None) -> str:
    """`` [low, high]`` of a recorded interval; empty where there is none or a bound was not finite."""
    return "" if not bounds or None in bounds else f" [{bounds[0]:.3f}, {bounds[1]:.3f}]"


def gate_text(gate: GateRecord) -> str:
    """A recorded gate in one cell: passed or FAILED, the verdict, the set size, each figure with its interval
    and its paired test's p."""
    figures = []
    for key in GATED:
        if key in gate.candidate:
            t = gate.paired.get(key)
            figures.append(f"{key} {gate.candidate[key]:.4f}{_interval(gate.intervals.get(key))}"
                           + (f" p={t.p:.2g}" if t is not None and t.p is not None else ""))
    return (f"{'passed' if gate.passed else 'FAILED'} {gate.verdict} ({gate.n_good} good/{gate.n_defective} "
            "defective): " + "; ".join(figures))


def history_rows(events: list[dict]) -> list[dict]:
    """One row (``HISTORY_COLUMNS``) per lifecycle event (``adreg.api.history``), oldest first."""
    rows = []
    for e in events:
        gate = GateRecord.of(e)
        rows.append({"at": e["at"], "action": e["action"], "alias": e["alias"], "version": e["version"],
                     "from": e["previous"] or "-", "by": e["by"], "identity": e["identity"], "reason": e["reason"],
                     "gate": "" if gate is None else gate_text(gate)})
    return rows


def _gate_cells(latest: GateEvent | None, tested: GateEvent | None) -> dict[str, str]:
    """One version's column of the gate rows: its latest gate (verdict, set, figures with intervals) and the
    paired tests of the latest gate that compared it with a baseline."""
    if latest is None:
        return {}
    gate = latest.gate
    cells = {"gate": f"{latest.action} {latest.alias}: {gate.verdict} ({latest.at[:16]})",
             "gate set": f"{gate.n_good} good, {gate.n_defective} defective; level {gate.level}"}
    if tested is not None:
        cells["gate paired test"] = (f"vs v{tested.gate.baseline_version} ({tested.action} {tested.alias}, "
                                     f"{tested.at[:16]})")
    for key in GATED:
        if key in gate.candidate:
            cells[f"gate {key}"] = f"{gate.candidate[key]:.4f}{_interval(gate.intervals.get(key))}"
        t = None if tested is None else tested.gate.paired.get(key)
        if t is not None and t.diff is not None:
            ci = "" if t.low is None or t.high is None else f" [{t.low:+.3f}, {t.high:+.3f}]"
            cells[f"gate {key} diff"] = f"{t.diff:+.4f}{ci} p={'-' if t.p is None else format(t.p, '.3g')}"
    return cells


def compare_rows(comparison) -> list[dict]:
    """``adreg compare``'s rows (what, v<first>, v<second>, delta) of an ``adreg.registry.lifecycle.VersionComparison``:
    the run metrics with their difference, the differing parameters, then the gate rows."""
    first, second = comparison.versions
    a, b = f"v{first}", f"v{second}"
    rows = [{"what": key, a: "" if x is None else f"{x:.4f}", b: "" if y is None else f"{y:.4f}",
             "delta": "" if x is None or y is None else f"{y - x:+.4f}"} for key, (x, y) in comparison.metrics.items()]
    rows += [{"what": f"param {key}", a: "" if x is None else x, b: "" if y is None else y, "delta": ""}
             for key, (x, y) in comparison.params.items()]
    cells = {v: _gate_cells(comparison.gates[v], comparison.tested[v]) for v in (first, second)}
    whats = list(dict.fromkeys(w for v in (first, second) for w in cells[v]))
    return rows + [{"what": w, a: cells[first].get(w, ""), b: cells[second].get(w, ""), "delta": ""} for w in whats]
