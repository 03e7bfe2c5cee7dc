"""SubspaceAD: normal patches live near a low-dimensional linear subspace; distance to it is anomaly.

Training-free. A streaming float64 PCA of all normal patch features keeps the fewest components
that explain ``pca_ev`` of the variance; a patch's score is its squared reconstruction residual
||(x - mu) - C C^T (x - mu)||^2 (centred, not whitened, as in the reference code).
"""

from __future__ import annotations

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
        x = x.to(torch.float64)
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
    name = "subspace"

    def __init__(self, pca_ev: float = 0.99, layer_combine: str = "concat", chunk_images: int = 16):
        if not 0.0 < pca_ev <= 1.0:
            raise ConfigError(f"pca_ev must be in (0, 1], got {pca_ev}")
        super().__init__(pca_ev=float(pca_ev), layer_combine=layer_combine, chunk_images=int(chunk_images))

    def fit(self, features: Features, progress=None, synthetic: Features | None = None, auxiliary=None) -> "SubspaceAD":
        fmap = features.combined(self.params["layer_combine"])
        acc = StreamingCovariance(fmap.shape[1])
        step = self.params["chunk_images"]
        for start in range(0, fmap.shape[0], step):
            acc.update(patch_matrix(fmap[start:start + step]))
            if progress is not None:
                progress(min(step, fmap.shape[0] - start))
        mu, cov = acc.finalize()
        evals, evecs = torch.linalg.eigh(cov)  # ascending
        evals, evecs = evals.flip(0).clamp_min(0.0), evecs.flip(1)
        ratio = torch.cumsum(evals, 0) / evals.sum().clamp_min(1e-300)
        k = int(torch.searchsorted(ratio, torch.tensor([self.params["pca_ev"]], dtype=torch.float64)).item()) + 1
        k = min(k, evals.numel())
        self.mean = mu
        self.components = evecs[:, :k].contiguous()
        self.eigenvalues = evals[:k].contiguous()
        self.explained_variance = float(ratio[k - 1])
        self._fitted = True
        return self

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
        return {"mean": self.mean, "components": self.components, "eigenvalues": self.eigenvalues}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.mean = state["mean"].to(torch.float64)
        self.components = state["components"].to(torch.float64)
        self.eigenvalues = state["eigenvalues"].to(torch.float64)
        self._fitted = True

    def summary(self) -> dict[str, float]:
        self._check_fitted()
        return {"n_components": float(self.components.shape[1]), "feature_dim": float(self.components.shape[0])}
