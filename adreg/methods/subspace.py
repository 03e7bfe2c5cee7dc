"""SubspaceAD: normal patches live near a low-dimensional linear subspace; distance to it is anomaly.

Training-free. A streaming float64 PCA of all normal patch features keeps the fewest components
that explain ``pca_ev`` of the variance; a patch's score is its squared reconstruction residual
||(x - mu) - C C^T (x - mu)||^2 (centred, not whitened, as in the reference code).
"""

from __future__ import annotations

from typing import Iterable

import torch

from adreg.backbones.base import Features
from adreg.errors import ConfigError
from adreg.methods.base import AnomalyMethod


class StreamingCovariance:
    """Mean and covariance accumulated chunk by chunk in float64 (memory independent of N)."""

    def __init__(self, dim: int):
        self.n = 0
        self.sum = torch.zeros(dim, dtype=torch.float64)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, x: torch.Tensor) -> None:
        x = x.to(torch.float64).cpu()
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.n < 2:
            raise ConfigError("SubspaceAD needs at least two patch features to fit")
        mu = self.sum / self.n
        cov = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        return mu, (cov + cov.T) / 2


def patch_matrix(fmap: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B*h*w, C)."""
    return fmap.permute(0, 2, 3, 1).reshape(-1, fmap.shape[1])


class SubspaceAD(AnomalyMethod):
    """Streaming float64 PCA of normal patch features.

    The sufficient statistics of the PCA (patch count, sum, scatter sum x x^T; float64) are part of the
    fitted state, so ``update`` adds the new images' statistics and re-solves the eigenproblem: the
    result equals a refit on the union of all images (to float64 round-off) and costs only the new
    images' features plus one D x D eigendecomposition.
    """

    name = "subspace"

    def __init__(self, pca_ev: float = 0.99, layer_combine: str = "concat", chunk_images: int = 16):
        if not 0.0 < pca_ev <= 1.0:
            raise ConfigError(f"pca_ev must be in (0, 1], got {pca_ev}")
        super().__init__(pca_ev=float(pca_ev), layer_combine=layer_combine, chunk_images=int(chunk_images))
        self.stats: StreamingCovariance | None = None

    def _accumulate(self, acc: StreamingCovariance, features: Features, progress=None) -> tuple[int, int]:
        """Add the patches of ``features`` to ``acc``; returns (views, patches per view)."""
        fmap = features.combined(self.params["layer_combine"])
        if fmap.shape[1] != acc.sum.shape[0]:
            raise ConfigError(f"features have {fmap.shape[1]} channels but the model was fitted on "
                              f"{acc.sum.shape[0]}; use the parent's backbone and layers")
        step = self.params["chunk_images"]
        for start in range(0, fmap.shape[0], step):
            acc.update(patch_matrix(fmap[start:start + step]))
            if progress is not None:
                progress(min(step, fmap.shape[0] - start))
        return fmap.shape[0], fmap.shape[2] * fmap.shape[3]

    def _solve(self) -> None:
        """Mean, components and eigenvalues from the statistics (keep ``pca_ev`` of the variance)."""
        mu, cov = self.stats.finalize()
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
        ratio = torch.cumsum(evals, 0) / evals.sum().clamp_min(1e-300)
        k = int(torch.searchsorted(ratio, torch.tensor([self.params["pca_ev"]], dtype=torch.float64)).item()) + 1
        k = min(k, evals.numel())
        self.mean = mu.to(self.device)
        self.components = evecs[:, :k].contiguous().to(self.device)
        self.eigenvalues = evals[:k].contiguous().to(self.device)
        self.explained_variance = float(ratio[k - 1])

    def fit(self, features: Features, progress=None, synthetic: Features | None = None, auxiliary=None) -> "SubspaceAD":
        return self.fit_chunks([features], progress)

    def fit_chunks(self, chunks: Iterable[Features], progress=None) -> "SubspaceAD":
        """Accumulate the statistics chunk by chunk, solve once: equal to a one-pass fit (float64 sums)."""
        self.stats = None
        for chunk in chunks:
            if self.stats is None:
                self.stats = StreamingCovariance(chunk.combined(self.params["layer_combine"]).shape[1])
            self._accumulate(self.stats, chunk, progress)
        if self.stats is None:
            raise ConfigError("no features to fit on")
        self._solve()
        self._fitted = True
        return self

    def update(self, features: Features, progress=None, synthetic: Features | None = None) -> dict:
        return self.update_chunks([features], progress)

    def update_chunks(self, chunks: Iterable[Features], progress=None) -> dict:
        """Add the chunks' statistics, then re-solve once: identical to a refit on all images."""
        self._check_updatable()
        before_n, before_k = self.stats.n, int(self.components.shape[1])
        views, per_view = 0, 1
        for chunk in chunks:
            n, per_view = self._accumulate(self.stats, chunk, progress)
            views += n
        if not views:
            raise ConfigError("no features to update with")
        self._solve()
        after_k = int(self.components.shape[1])
        return {"method": self.name,
                "what": f"added {views * per_view} patches of {views} views to the PCA statistics and re-solved "
                        f"the subspace ({before_k} -> {after_k} components); identical to a refit on all images",
                "patches_before": before_n, "patches_after": self.stats.n,
                "n_views_total": self.stats.n // max(per_view, 1),
                "n_components_before": before_k, "n_components_after": after_k,
                "explained_variance": self.explained_variance}

    def score_patches(self, features: Features) -> torch.Tensor:
        self._check_fitted()
        fmap = features.combined(self.params["layer_combine"]).to(self.device, torch.float32)
        b, _, h, w = fmap.shape
        xc = patch_matrix(fmap) - self.mean.to(torch.float32)
        comps = self.components.to(torch.float32)
        residual = xc - (xc @ comps) @ comps.T
        return residual.pow(2).sum(1).reshape(b, h, w)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return {"mean": self.mean, "components": self.components, "eigenvalues": self.eigenvalues,
                "stat_count": torch.tensor([float(self.stats.n)], dtype=torch.float64),
                "stat_sum": self.stats.sum, "stat_scatter": self.stats.outer}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.mean = state["mean"].to(torch.float64)
        self.components = state["components"].to(torch.float64)
        self.eigenvalues = state["eigenvalues"].to(torch.float64)
        self.stats = StreamingCovariance(self.mean.numel())
        self.stats.n = int(state["stat_count"].reshape(-1)[0].item())
        self.stats.sum = state["stat_sum"].to(torch.float64).cpu()
        self.stats.outer = state["stat_scatter"].to(torch.float64).cpu()
        self._fitted = True

    def to(self, device) -> "SubspaceAD":
        self.device = torch.device(device)
        if self._fitted:  # the statistics stay on the CPU in float64 (only the scoring state moves)
            self.mean, self.components = self.mean.to(self.device), self.components.to(self.device)
            self.eigenvalues = self.eigenvalues.to(self.device)
        return self

    def summary(self) -> dict[str, float]:
        self._check_fitted()
        return {"n_components": float(self.components.shape[1]), "feature_dim": float(self.components.shape[0])}
