"""Pictures a quality engineer reads faster than tables: ROC curve, score histogram with the threshold,
and a grid of test images with their anomaly-map overlays and ground-truth outlines."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure  # the object API: no pyplot, no backend switch, no display needed
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from adreg.data import Sample  # noqa: E402
from adreg.metrics import auroc, roc_curve  # noqa: E402


def roc_figure(labels, scores, title: str = ""):
    fig = Figure(figsize=(4, 4), dpi=100)
    ax = fig.subplots()
    fpr, tpr, _ = roc_curve(labels, scores)
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {auroc(labels, scores):.4f}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title or "image-level ROC",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def histogram_figure(labels, scores, threshold: float | None = None, title: str = ""):
    labels, scores = np.asarray(labels), np.asarray(scores)
    fig = Figure(figsize=(5, 3.2), dpi=100)
    ax = fig.subplots()
    bins = np.linspace(scores.min(), scores.max(), 30)
    ax.hist(scores[labels == 0], bins=bins, alpha=0.6, label=f"good ({(labels == 0).sum()})", color="tab:green")
    ax.hist(scores[labels == 1], bins=bins, alpha=0.6, label=f"defective ({(labels == 1).sum()})", color="tab:red")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", label=f"threshold {threshold:.4g}")
    ax.set(xlabel="image score", ylabel="images", title=title or "score distribution")
    ax.legend()
    fig.tight_layout()
    return fig


def pick_examples(samples: Sequence[Sample], scores, n: int) -> list[int]:
    """Indices for a grid: the highest-scoring good images and a spread of defective ones."""
    scores = np.asarray(scores)
    good = [i for i in np.argsort(-scores) if samples[i].label == 0][: max(1, n // 4)]
    bad_sorted = [i for i in np.argsort(-scores) if samples[i].label == 1]
    k = n - len(good)
    bad = [bad_sorted[j] for j in np.linspace(0, len(bad_sorted) - 1, min(k, len(bad_sorted))).astype(int)] if bad_sorted else []
    return list(dict.fromkeys(good + bad))


def overlay_grid(samples: Sequence[Sample], maps: np.ndarray, scores, threshold: float | None,
                 indices: Sequence[int], masks: dict[int, np.ndarray] | None = None, cols: int = 4):
    """Each selected image with its map as a heat overlay (red = anomalous; scale fixed at 2x threshold)."""
    rows = int(np.ceil(len(indices) / cols))
    fig = Figure(figsize=(3 * cols, 3.2 * rows), dpi=90)
    axes = fig.subplots(rows, cols, squeeze=False)
    vmax = 2 * threshold if threshold else float(np.max(maps[list(indices)]))
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i in zip(axes.ravel(), indices):
        s = samples[i]
        size = maps[i].shape[::-1]
        img = np.asarray(Image.open(s.path).convert("RGB").resize(size, Image.BILINEAR))
        ax.imshow(img)
        ax.imshow(maps[i], cmap="jet", alpha=0.45, vmin=0, vmax=vmax)
        if masks is not None and i in masks and masks[i].any():
            ax.contour(masks[i], levels=[0.5], colors="white", linewidths=1)
        verdict = "" if threshold is None else (" ANOMALY" if scores[i] > threshold else " ok")
        ax.set_title(f"{s.defect}: {scores[i]:.3g}{verdict}", fontsize=9,
                     color="red" if threshold is not None and scores[i] > threshold else "black")
    fig.tight_layout()
    return fig


def save_report(folder: str | Path, samples, scores, maps, threshold, masks: dict[int, np.ndarray] | None = None,
                n_examples: int = 8, title: str = "") -> list[Path]:
    """Write roc.png, scores.png and examples.png into ``folder``; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.array([s.label for s in samples])
    out = []
    figures = []
    if labels.min() != labels.max():
        figures.append(("roc.png", roc_figure(labels, scores, title)))
    figures.append(("scores.png", histogram_figure(labels, scores, threshold, title)))
    figures.append(("examples.png", overlay_grid(samples, maps, scores, threshold,
                                                 pick_examples(samples, scores, n_examples), masks)))
    for name, fig in figures:
        fig.savefig(folder / name)
        out.append(folder / name)
    return out
