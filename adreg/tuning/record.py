"""What a search leaves on its MLflow parent run: the leaderboard (a table and a plot), the evidence that
chose, the space, and the choice itself (``tune/choice.json``, which ``adreg fit --settings-from`` reads)."""

from __future__ import annotations

import csv
import io
import json
import math

from adreg.errors import ConfigError, NotFoundError
from adreg.tuning.search import TUNE_TAG, SearchResult

CHOICE_ARTIFACT = "tune/choice.json"
LEADERBOARD_COLUMNS = ["rank", "number", "candidate", "stage", "state", "top_fraction", "selection_image_auroc",
                       "interval", "selection_pixel_auroc", "fit_seconds", "run_id"]


def leaderboard(result: SearchResult) -> list[dict]:
    """One row per candidate: complete ones by the choice rule, then pruned, then failed."""
    ranked = result.ranked()
    order = {c.number: i + 1 for i, c in enumerate(ranked)}
    rest = sorted((c for c in result.candidates if c.number not in order), key=lambda c: (c.state, c.number))
    rows = []
    for c in ranked + rest:
        sel = c.selection
        low, high = sel.get("selection_image_auroc_low"), sel.get("selection_image_auroc_high")
        rows.append({
            "rank": order.get(c.number, ""), "number": c.number,
            "candidate": c.label + (" (default)" if c.key == result.default_key else ""),
            "stage": c.stage + 1, "state": c.state + (f": {c.error}" if c.error and c.state != "complete" else ""),
            "top_fraction": c.settings.get("top_fraction", ""),
            "selection_image_auroc": _f(sel.get("selection_image_auroc")),
            "interval": f"[{low:.3f}, {high:.3f}]" if low is not None else "",
            "selection_pixel_auroc": _f(sel.get("selection_pixel_auroc")),
            "fit_seconds": _f(sel.get("fit_seconds"), 1), "run_id": c.run_id or ""})
    return rows


def _f(v, digits: int = 4) -> str:
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def leaderboard_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LEADERBOARD_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def leaderboard_markdown(rows: list[dict], columns=LEADERBOARD_COLUMNS[:-1]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def leaderboard_figure(result: SearchResult, title: str):
    """Selection image AUROC of every complete candidate with its interval, the choice highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = result.ranked()
    fig, ax = plt.subplots(figsize=(9, 0.32 * max(4, len(ranked)) + 1.2))
    for i, c in enumerate(ranked):
        s = c.selection
        lo, hi = s["selection_image_auroc_low"], s["selection_image_auroc_high"]
        chosen = result.chosen is not None and c.number == result.chosen.number
        default = c.key == result.default_key
        colour = "tab:red" if chosen else ("tab:green" if default else "tab:blue")
        ax.errorbar(s["selection_image_auroc"], i, xerr=[[s["selection_image_auroc"] - lo], [hi - s["selection_image_auroc"]]],
                    fmt="o", color=colour, capsize=3)
    ax.set_yticks(range(len(ranked)))
    ax.set_yticklabels([f"{c.label} / top {c.settings.get('top_fraction')}" for c in ranked], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("selection image AUROC, with its bootstrap interval")
    ax.set_title(f"{title}: red = chosen, green = the default", fontsize=9)
    fig.tight_layout()
    return fig


def log_search(client, result: SearchResult, space, evidence_line: str, title: str, fallback: str | None = None) -> None:
    """The parent run's record of the search (see the module doc)."""
    from mlflow.entities import Metric, RunTag

    run_id = result.parent_run_id
    rows = leaderboard(result)
    client.log_text(run_id, leaderboard_csv(rows), "tune/leaderboard.csv")
    client.log_text(run_id, leaderboard_markdown(rows), "tune/leaderboard.md")
    if result.ranked():
        import matplotlib.pyplot as plt

        fig = leaderboard_figure(result, title)
        client.log_figure(run_id, fig, "tune/leaderboard.png")
        plt.close(fig)
    client.log_dict(run_id, space.to_dict(), "tune/space.json")
    client.log_dict(run_id, {**result.evidence, "line": evidence_line, "fallback": fallback}, "tune/evidence.json")
    chosen = result.chosen
    choice = {"settings": chosen.fit_settings() if chosen else {}, "label": chosen.label if chosen else "defaults",
              "candidate_run_id": chosen.run_id if chosen else None, "fallback": fallback,
              "versus_default": result.versus_default, "stopped": result.stopped}
    client.log_dict(run_id, choice, CHOICE_ARTIFACT)
    now = 0
    metrics = [Metric("tune_seconds", result.seconds, now, 0),
               Metric("tune_candidates", float(len(result.candidates)), now, 0),
               Metric("tune_complete", float(len(result.ranked())), now, 0)]
    if chosen:
        metrics += [Metric(f"chosen_{k}", float(v), now, 0) for k, v in chosen.selection.items()
                    if k.startswith("selection_")]
    tags = [RunTag("adreg.tune.evidence", evidence_line[:4000]), RunTag("adreg.tune.evidence_kind", result.evidence["kind"]),
            RunTag("adreg.tune.chosen", chosen.label if chosen else f"defaults ({fallback})")]
    client.log_batch(run_id, metrics=metrics, tags=tags)


def read_choice(run_id: str) -> dict:
    """The settings a search chose (``tune/choice.json`` of its parent run), as FitOptions fields.

    Raises ``NotFoundError`` for an unknown run, ``ConfigError`` for a run that is not a tune's parent."""
    import mlflow

    from adreg import store

    try:
        run = mlflow.MlflowClient().get_run(run_id)
    except Exception as exc:  # noqa: BLE001 - classified
        typed = store.translate(exc, f"reading run {run_id}")
        if isinstance(typed, NotFoundError):
            raise NotFoundError(f"no run {run_id!r} in this store; `adreg tune` prints the run of its search") from exc
        raise (typed or exc) from exc
    if run.data.tags.get(TUNE_TAG) != "parent":
        raise ConfigError(f"run {run_id} is not the parent run of an `adreg tune` search; give the run it printed")
    try:
        choice = mlflow.artifacts.load_dict(f"runs:/{run_id}/{CHOICE_ARTIFACT}")
    except Exception as exc:  # noqa: BLE001 - an interrupted search never wrote its choice
        raise ConfigError(f"run {run_id} holds no choice (an interrupted or unfinished search)") from exc
    return dict(choice.get("settings") or {})


def tune_summary_json(result: SearchResult) -> str:
    return json.dumps({"parent_run_id": result.parent_run_id, "chosen": result.chosen.label if result.chosen else None,
                       "leaderboard": leaderboard(result)}, indent=2, default=str)
