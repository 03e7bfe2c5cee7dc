"""RAD: retrieval-based, multi-layer, spatially conditioned patch kNN. Training-free.

Memory per layer: the global descriptor (CLS token, or the average-pooled map for CNNs) and the
L2-normalised patch map of every normal image. For a test image: (1) retrieve the ``k_image``
references whose last-layer global descriptor is most cosine-similar; (2) per layer, compare each
patch only with the retrieved references' patches inside a (2R+1)^2 window around the same position
(R = ``radius``; 0 = same position only, -1 = anywhere in the image); score = 1 - max cosine;
(3) weighted mean over layers. Vectorised over patches: a loop over the (2R+1)^2 offsets only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adreg.backbones.base import Features
from adreg.errors import ConfigError
from adreg.methods.base import AnomalyMethod
from adreg.methods.knn import check_bank_dtype, max_cosine


def windowed_max_cosine(query: torch.Tensor, refs: torch.Tensor, radius: int) -> torch.Tensor:
    """Max cosine of each query patch against reference patches within ``radius`` of its position.

    ``query`` (B, C, h, w) and ``refs`` (B, K, C, h, w) are L2-normalised over C. Returns (B, h, w).
    """
    b, k, c, h, w = refs.shape
    best = torch.full((b, h, w), -2.0, device=query.device, dtype=torch.float32)
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            # query position (i, j) meets reference position (i + dy, j + dx), where that exists
            qy0, qy1 = max(0, -dy), min(h, h - dy)
            qx0, qx1 = max(0, -dx), min(w, w - dx)
            if qy0 >= qy1 or qx0 >= qx1:
                continue
            q = query[:, None, :, qy0:qy1, qx0:qx1]
            r = refs[:, :, :, qy0 + dy:qy1 + dy, qx0 + dx:qx1 + dx]
            sims = (q * r.to(q.dtype)).sum(2).amax(1).float()  # (B, h', w')
            best[:, qy0:qy1, qx0:qx1] = torch.maximum(best[:, qy0:qy1, qx0:qx1], sims)
    return best


class RAD(AnomalyMethod):
    name = "rad"

    def __init__(self, k_image: int = 16, radius: int = 1, layer_weights: list[float] | None = None,
                 bank_dtype: str = "fp32"):
        if k_image < 1:
            raise ConfigError(f"k_image must be >= 1, got {k_image}")
        if radius < -1:
            raise ConfigError(f"radius must be >= -1 (-1 = whole image), got {radius}")
        check_bank_dtype(bank_dtype)
        super().__init__(k_image=int(k_image), radius=int(radius),
                         layer_weights=None if layer_weights is None else [float(x) for x in layer_weights],
                         bank_dtype=bank_dtype)

    def fit(self, features: Features, progress=None, synthetic: Features | None = None, auxiliary=None) -> "RAD":
        dtype = check_bank_dtype(self.params["bank_dtype"])
        self.patch_banks = [F.normalize(p, dim=1).to(dtype) for p in features.patches]
        self.global_bank = F.normalize(features.globals[-1], dim=1).to(dtype)
        weights = self.params["layer_weights"] or [1.0] * len(self.patch_banks)
        if len(weights) != len(self.patch_banks):
            raise ConfigError(f"{len(weights)} layer_weights for {len(self.patch_banks)} layers")
        self.weights = torch.tensor(weights, dtype=torch.float32) / sum(weights)
        if progress is not None:
            progress(len(features))
        self._fitted = True
        return self

    def retrieve(self, features: Features) -> torch.Tensor:
        """Indices (B, K) of the most similar reference images by last-layer global descriptor."""
        q = F.normalize(features.globals[-1].float(), dim=1)
        sims = q @ self.global_bank.float().T
        k = min(self.params["k_image"], self.global_bank.shape[0])
        return sims.topk(k, dim=1).indices

    def score_patches(self, features: Features) -> torch.Tensor:
        self._check_fitted()
        features = features.to(self.device)
        idx = self.retrieve(features)
        radius = self.params["radius"]
        total = None
        for layer, (query, bank) in enumerate(zip(features.patches, self.patch_banks)):
            query = F.normalize(query.float(), dim=1)
            if bank.device.type == "cpu":
                bank = bank.float()
            b, c, h, w = query.shape
            if radius < 0:
                best = torch.stack([
                    max_cosine(query[i].flatten(1).T, bank[idx[i]].permute(0, 2, 3, 1).reshape(-1, c))
                    for i in range(b)]).reshape(b, h, w)
            else:
                best = windowed_max_cosine(query, bank[idx], radius)
            score = (1.0 - best) * self.weights[layer].item()
            total = score if total is None else total + score
        return total

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        state = {"global_bank": self.global_bank, "weights": self.weights}
        state.update({f"patch_bank_{i}": bank for i, bank in enumerate(self.patch_banks)})
        return state

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.global_bank = state["global_bank"]
        self.weights = state["weights"].float()
        n = sum(1 for key in state if key.startswith("patch_bank_"))
        self.patch_banks = [state[f"patch_bank_{i}"] for i in range(n)]
        self._fitted = True

    def to(self, device) -> "RAD":
        self.device = torch.device(device)
        if self._fitted:
            self.global_bank = self.global_bank.to(self.device)
            self.patch_banks = [b.to(self.device) for b in self.patch_banks]
        return self

    def summary(self) -> dict[str, float]:
        self._check_fitted()
        size = sum(t.numel() * t.element_size() for t in [self.global_bank, *self.patch_banks])
        return {"bank_images": float(self.global_bank.shape[0]), "bank_mib": size / 2 ** 20}
