"""RAD: retrieval-based, multi-layer, spatially conditioned patch kNN. Training-free.

Memory per layer: the global descriptor (CLS token, or the average-pooled map for CNNs) and the
L2-normalised patch map of every normal image. For a test image: (1) retrieve the ``k_image``
references whose last-layer global descriptor is most cosine-similar; (2) per layer, compare each
patch only with the retrieved references' patches inside a (2R+1)^2 window around the same position
(R = ``radius``; 0 = same position only, -1 = anywhere in the image); score = 1 - max cosine;
(3) weighted mean over layers. Vectorised over patches: a loop over the (2R+1)^2 offsets only.

Scoring runs ``chunk_images`` test images at a time (default 1): the windowed search materialises
(K, C, h, w) products per image, which stay in cache for one image but not for eight, so a batch is
scored image by image (identical scores, per-image time no worse at batch 8 than at batch 1).

Bank budget. The bank is image-structured (retrieval picks whole reference views, then patches are
matched at the same positions), so it is bounded in *views*, not patches: at most ``bank_budget``
reference views are kept (0 = all). When there are more, a greedy k-center coreset
(``adreg.methods.coreset``) over a per-view layout descriptor keeps the views that cover all others best:
the descriptor is each layer's L2-normalised patch map average-pooled to a ``coreset_grid`` x
``coreset_grid`` grid, flattened and L2-normalised, layers concatenated. It is spatial on purpose: RAD
compares patches at the same position, so a dropped view must be replaceable by a kept view with a
similar *layout* (pose, rotation), which a pooled global descriptor cannot tell apart. Dropping whole
views keeps every kept view intact for the windowed search, and the per-view state (all layers' maps)
makes the budget a direct memory bound: ``bank_budget`` x bytes per view.

Real views before copies. Over budget, synthetic (augmented) copies go first (``Features.real``, kept
in the state as ``real_views``): with at least ``bank_budget`` real views the coreset chooses among
the real ones only, else every real view stays and the coreset fills the remaining slots from the
copies. The k-center selection alone favours copies, since a flipped or rotated view is far from every
real one: on MTD with 832 goods and one flip copy each, a 512-view coreset over every view reached
0.961 image AUROC, real views first 0.982 (docs/benchmarks/growth.md). Fits and updates take the
views in chunks (``fit_chunks`` / ``update_chunks``, what ``AnomalyDetector`` feeds): each chunk is merged
with the kept views and the union is reduced to the budget again (merge-and-reduce), so peak memory is the
budget plus one chunk and the time per added view stays flat as the bank grows.

Defaults: 512 views stored in float16 (``bank_dtype``; features are L2-normalised, so a cosine moves by
at most ~5e-4 and the state halves; scoring upcasts only the ``k_image`` retrieved views). Scoring cost
does not grow with the bank beyond the global retrieval (one dot product per view), so the budget is a
memory bound: Lite0 at 320 px is ~0.15 MiB (blocks 7+10) to ~0.2 MiB (blocks 4+10) per float16 view,
75-107 MiB at 512. On MTD the budget decides how far updates can grow accuracy (docs/benchmarks/growth.md,
one seed, 832 goods, real views first): 256 views 0.966 image AUROC, 512 views 0.982, all 832 views 0.982
(a full refit: 0.981); grown to 256 goods a 256-view bank holds every view (0.934, 3 seeds).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from adreg.backbones.base import Features
from adreg.errors import ConfigError
from adreg.methods.base import AnomalyMethod
from adreg.methods.coreset import greedy_coreset
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
                 bank_dtype: str = "fp16", bank_budget: int = 512, coreset_grid: int = 4, coreset_dim: int = 128,
                 chunk_images: int = 1, seed: int = 0):
        if k_image < 1:
            raise ConfigError(f"k_image must be >= 1, got {k_image}")
        if radius < -1:
            raise ConfigError(f"radius must be >= -1 (-1 = whole image), got {radius}")
        if bank_budget < 0 or coreset_grid < 1 or coreset_dim < 0 or chunk_images < 1:
            raise ConfigError("need bank_budget >= 0 (0 = no limit), coreset_grid >= 1, coreset_dim >= 0, "
                              "chunk_images >= 1")
        check_bank_dtype(bank_dtype)
        super().__init__(k_image=int(k_image), radius=int(radius),
                         layer_weights=None if layer_weights is None else [float(x) for x in layer_weights],
                         bank_dtype=bank_dtype, bank_budget=int(bank_budget), coreset_grid=int(coreset_grid),
                         coreset_dim=int(coreset_dim), chunk_images=int(chunk_images), seed=int(seed))
        self.coverage_radius: float | None = None
        self.real_views: torch.Tensor | None = None  # (N,) bool: which kept views are real images

    def view_descriptors(self, patch_banks: list[torch.Tensor]) -> torch.Tensor:
        """(N, D) layout descriptors of the views (see the module docstring)."""
        g = self.params["coreset_grid"]
        parts = [F.normalize(F.adaptive_avg_pool2d(b.float(), g).flatten(1), dim=1) for b in patch_banks]
        return torch.cat(parts, dim=1) / len(parts) ** 0.5

    def _select(self, patch_banks: list[torch.Tensor], global_bank: torch.Tensor, real: torch.Tensor) -> None:
        """Keep at most ``bank_budget`` views: real views before synthetic copies, each by greedy k-center
        over their layout descriptors (see the module docstring)."""
        budget, dtype = self.params["bank_budget"], check_bank_dtype(self.params["bank_dtype"])
        self.coverage_radius = 0.0
        if budget and global_bank.shape[0] > budget:
            real_idx, copy_idx = real.nonzero()[:, 0], (~real).nonzero()[:, 0]
            if len(real_idx) >= budget:  # choose among the real views only
                pool, slots, kept = real_idx, budget, real_idx[:0]
            else:  # every real view stays; copies fill the rest
                pool, slots, kept = copy_idx, budget - len(real_idx), real_idx
            core = greedy_coreset(self.view_descriptors([b[pool] for b in patch_banks]), slots,
                                  self.params["coreset_dim"], self.params["seed"])
            keep = torch.cat([kept, pool[core.indices]]).sort().values
            patch_banks, global_bank, real = [b[keep] for b in patch_banks], global_bank[keep], real[keep]
            self.coverage_radius = core.radius
        self.patch_banks = [b.to(dtype).contiguous() for b in patch_banks]
        self.global_bank = global_bank.to(dtype).contiguous()
        self.real_views = real.clone()

    def fit(self, features: Features, progress=None, synthetic: Features | None = None, auxiliary=None) -> "RAD":
        return self.fit_chunks([features], progress)

    def fit_chunks(self, chunks: Iterable[Features], progress=None) -> "RAD":
        """Fit chunk by chunk (``_absorb``); one chunk is exactly ``fit``; with no budget chunked and
        one-pass fits keep the same views in the same order."""
        self.patch_banks, self.global_bank, self.weights, self.real_views = None, None, None, None
        views = 0
        for chunk in chunks:
            if self.weights is None:
                weights = self.params["layer_weights"] or [1.0] * len(chunk.patches)
                if len(weights) != len(chunk.patches):
                    raise ConfigError(f"{len(weights)} layer_weights for {len(chunk.patches)} layers")
                self.weights = torch.tensor(weights, dtype=torch.float32) / sum(weights)
            views += self._absorb(chunk, progress)
        if not views:
            raise ConfigError("no features to fit on")
        self._fitted = True
        return self

    def _absorb(self, features: Features, progress=None) -> int:
        """Merge one chunk's views into the bank and reduce the union to the budget (merge-and-reduce: the
        k-center selection runs over the kept views + this chunk only, so its cost per chunk is set by the
        budget and the chunk size, not by all views ever seen). Returns the chunk's views."""
        banks = [F.normalize(p.float(), dim=1).cpu() for p in features.patches]
        glob = F.normalize(features.globals[-1].float(), dim=1).cpu()
        real = features.real_mask()
        if self.global_bank is not None:
            if [p.shape[1:] for p in banks] != [b.shape[1:] for b in self.patch_banks]:
                raise ConfigError("the new features' layers or grid differ from the bank's; use the parent's "
                                  "backbone, layers and image size")
            banks = [torch.cat([b.float().cpu(), p]) for b, p in zip(self.patch_banks, banks)]
            glob = torch.cat([self.global_bank.float().cpu(), glob])
            real = torch.cat([self.real_views, real])
        self._select(banks, glob, real)
        self.to(self.device)
        if progress is not None:
            progress(len(features))
        return len(features)

    def update(self, features: Features, progress=None, synthetic: Features | None = None) -> dict:
        return self.update_chunks([features], progress)

    def update_chunks(self, chunks: Iterable[Features], progress=None) -> dict:
        """Grow chunk by chunk (``_absorb``): memory = bank + one chunk."""
        self._check_updatable()
        before, views = int(self.global_bank.shape[0]), 0
        for chunk in chunks:
            views += self._absorb(chunk, progress)
        if not views:
            raise ConfigError("no features to update with")
        budget, after = self.params["bank_budget"], int(self.global_bank.shape[0])
        n_real = int(self.real_views.sum())
        return {"method": self.name,
                "what": f"added {views} views to the {before}-view bank and "
                        + (f"kept a greedy k-center coreset of {after} views, real views before synthetic copies "
                           f"({n_real} real; budget {budget}; merged chunk by chunk)" if budget
                           else "kept them all (no bank budget)"),
                "bank_views_before": before, "bank_views_after": after, "bank_real_views": n_real,
                "views_added": views, "bank_budget": budget, "coverage_radius": self.coverage_radius}

    def retrieve(self, features: Features) -> torch.Tensor:
        """Indices (B, K) of the most similar reference images by last-layer global descriptor."""
        q = F.normalize(features.globals[-1].float(), dim=1)
        sims = q @ self.global_bank.float().T
        k = min(self.params["k_image"], self.global_bank.shape[0])
        return sims.topk(k, dim=1).indices

    def score_patches(self, features: Features) -> torch.Tensor:
        self._check_fitted()
        step = self.params["chunk_images"]
        if len(features) > step:  # image by image: see the module docstring (identical scores)
            return torch.cat([self.score_patches(features[i:i + step]) for i in range(0, len(features), step)])
        features = features.to(self.device)
        idx = self.retrieve(features)
        radius = self.params["radius"]
        total = None
        for layer, (query, bank) in enumerate(zip(features.patches, self.patch_banks)):
            query = F.normalize(query.float(), dim=1)
            b, c, h, w = query.shape
            refs = bank[idx]
            if refs.device.type == "cpu":
                refs = refs.float()
            if radius < 0:
                best = torch.stack([
                    max_cosine(query[i].flatten(1).T, refs[i].permute(0, 2, 3, 1).reshape(-1, c))
                    for i in range(b)]).reshape(b, h, w)
            else:
                best = windowed_max_cosine(query, refs, radius)
            score = (1.0 - best) * self.weights[layer].item()
            total = score if total is None else total + score
        return total

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        state = {"global_bank": self.global_bank, "weights": self.weights, "real_views": self.real_views}
        state.update({f"patch_bank_{i}": bank for i, bank in enumerate(self.patch_banks)})
        return state

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.global_bank = state["global_bank"]
        self.weights = state["weights"].float()
        self.real_views = state["real_views"].bool().cpu()
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
        out = {"bank_images": float(self.global_bank.shape[0]), "bank_real_views": float(self.real_views.sum()),
               "bank_mib": size / 2 ** 20}
        if self.coverage_radius is not None:
            out["coverage_radius"] = float(self.coverage_radius)
        return out
