"""The method interface shared by every anomaly detector.

A method is fitted on backbone ``Features`` of normal images and scores patches of new ones; it
never sees pixels. Its fitted state is a flat dict of tensors (saved as safetensors, never pickled)
plus its JSON hyper-parameters, so a saved method can be rebuilt exactly in another process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Iterable

import torch

from adreg.backbones.base import Features
from adreg.errors import ConfigError


class NotFittedError(RuntimeError):
    """Scoring or saving a method before ``fit``."""


class AnomalyMethod(ABC):
    """Base class: hyper-parameters in ``__init__`` (sklearn style), state from ``fit``."""

    name: ClassVar[str]
    #: "cutpaste" when fit() also needs features of synthetically corrupted views (see AnomalyDetector.fit)
    synthesis: ClassVar[str | None] = None
    #: True when fit() learns from an auxiliary labelled dataset (``params["aux"]``), i.e. zero-shot
    needs_auxiliary: ClassVar[bool] = False
    #: image score = mean of this top fraction of map pixels (0 = the maximum)
    default_top_fraction: ClassVar[float] = 0.01

    def __init__(self, **params):
        self.params = dict(params)
        self._fitted = False
        self.device = torch.device("cpu")
        self.curves: dict[str, list[float]] = {}  # training curves, logged as MLflow metric series

    def get_params(self) -> dict:
        return dict(self.params)

    @property
    def is_fitted(self) -> bool:
        return self._fitted

    def _check_fitted(self) -> None:
        if not self._fitted:
            raise NotFittedError(f"{type(self).__name__} is not fitted yet")

    def _check_updatable(self) -> None:
        if not self._fitted:
            raise ConfigError(f"cannot update an unfitted {self.name} model; fit it first")

    @abstractmethod
    def fit(self, features: Features, progress=None, synthetic: Features | None = None,
            auxiliary=None) -> "AnomalyMethod":
        """Learn what normal looks like from features of normal images (``synthetic``: see ``synthesis``;
        ``auxiliary``: see ``needs_auxiliary``)."""

    @abstractmethod
    def update(self, features: Features, progress=None, synthetic: Features | None = None) -> dict:
        """Grow the fitted state with features of more NORMAL images (already augmented like fit's;
        ``synthetic``: CutPaste views of them when ``synthesis`` says so).

        Returns a report for the user: ``{"method": name, "what": "<one sentence saying what the update
        did>", ...numbers}`` (e.g. ``bank_patches_before``/``bank_patches_after``, ``n_images_total``).
        Raises ``ConfigError`` when the fitted state cannot be grown (e.g. saved before incremental updates)."""

    def fit_chunks(self, chunks: Iterable[Features], progress=None) -> "AnomalyMethod":
        """Fit on features that arrive in chunks (``AnomalyDetector.fit`` extracts them so). This default,
        for a method that needs all views at once, concatenates them and calls ``fit``."""
        return self.fit(concat_chunks(chunks), progress=progress)

    def update_chunks(self, chunks: Iterable[Features], progress=None) -> dict:
        """Grow with features that arrive in chunks (``AnomalyDetector.update``); the report as ``update``'s.
        This default concatenates them and calls ``update``."""
        return self.update(concat_chunks(chunks), progress=progress)

    @abstractmethod
    def score_patches(self, features: Features) -> torch.Tensor:
        """Anomaly score per patch, (B, h, w); higher = more anomalous."""

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The fitted state as named tensors (saved with safetensors)."""

    @abstractmethod
    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        """Restore the fitted state saved by ``state_tensors``."""

    def state_nbytes(self) -> int:
        """Bytes of ``state_tensors()`` (what the saved model carries; 'state MiB' = this / 2**20)."""
        return int(sum(t.numel() * t.element_size() for t in self.state_tensors().values()))

    def summary(self) -> dict[str, float]:
        """Numbers worth logging about the fitted state (e.g. subspace dimension)."""
        return {}

    def report(self) -> dict:
        """A JSON report about the fitted state worth keeping with the model (empty: none)."""
        return {}

    def progress_units(self, n_views: int) -> int:
        """How many units ``fit`` reports to its progress callback."""
        return n_views

    def update_progress_units(self, n_views: int) -> int:
        """How many units ``update`` reports to its progress callback."""
        return n_views

    def to(self, device) -> "AnomalyMethod":
        self.device = torch.device(device)
        if not self._fitted:
            return self
        for key, value in self.state_tensors().items():
            setattr(self, key, value.to(self.device))
        return self


def concat_chunks(chunks: Iterable[Features]) -> Features:
    """All chunks as one ``Features``; ``ConfigError`` when there are none."""
    parts = list(chunks)
    if not parts:
        raise ConfigError("no features to learn from")
    return parts[0] if len(parts) == 1 else Features.cat(parts)
