"""Patch nearest-neighbour baseline (AnomalyDINO / PatchCore style, without coreset).

All normal patch features, L2-normalised, form one memory bank; a patch's score is 1 - its highest
cosine similarity to the bank. The reference point every other method is compared against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from adreg.backbones.base import Features
from adreg.errors import ConfigError
from adreg.methods.base import AnomalyMethod
from adreg.methods.subspace import patch_matrix

BANK_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def max_cosine(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Highest cosine of each L2-normalised query row against the normalised bank rows, chunked."""
    best = torch.full((queries.shape[0],), -1.0, device=queries.device)
    bank = bank.to(queries.dtype) if queries.device.type == "cpu" else bank
    for start in range(0, bank.shape[0], chunk):
        sims = queries @ bank[start:start + chunk].to(queries.dtype).T
        best = torch.maximum(best, sims.max(1).values.float())
    return best


def check_bank_dtype(name: str) -> torch.dtype:
    if name not in BANK_DTYPES:
        raise ConfigError(f"bank_dtype must be one of {sorted(BANK_DTYPES)}, got {name!r}")
    return BANK_DTYPES[name]


class PatchKNN(AnomalyMethod):
    name = "knn"

    def __init__(self, layer_combine: str = "concat", bank_dtype: str = "fp32"):
        check_bank_dtype(bank_dtype)
        super().__init__(layer_combine=layer_combine, bank_dtype=bank_dtype)

    def fit(self, features: Features, progress=None, synthetic: Features | None = None, auxiliary=None) -> "PatchKNN":
        fmap = features.combined(self.params["layer_combine"])
        self.bank = F.normalize(patch_matrix(fmap), dim=1).to(check_bank_dtype(self.params["bank_dtype"]))
        if progress is not None:
            progress(len(features))
        self._fitted = True
        return self

    def score_patches(self, features: Features) -> torch.Tensor:
        self._check_fitted()
        fmap = features.combined(self.params["layer_combine"]).to(self.device, torch.float32)
        b, _, h, w = fmap.shape
        queries = F.normalize(patch_matrix(fmap), dim=1)
        return (1.0 - max_cosine(queries, self.bank)).reshape(b, h, w)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return {"bank": self.bank}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.bank = state["bank"]
        self._fitted = True

    def summary(self) -> dict[str, float]:
        self._check_fitted()
        return {"bank_patches": float(self.bank.shape[0]),
                "bank_mib": self.bank.numel() * self.bank.element_size() / 2 ** 20}
