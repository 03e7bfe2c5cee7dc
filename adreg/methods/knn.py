"""Patch nearest-neighbour baseline (AnomalyDINO / PatchCore style), its bank bounded by a coreset.

The normal patch features, L2-normalised, form one memory bank; a patch's score is 1 - its highest
cosine similarity to the bank. The reference point every other method is compared against.

The bank holds at most ``bank_budget`` patches (0 = all): when there are more, PatchCore's greedy
k-center coreset (``adreg.methods.coreset``) keeps the ``bank_budget`` patches that cover all the others
best, so memory and scoring time stay flat however many good images are added. Fits and updates take
the views in chunks (``fit_chunks`` / ``update_chunks``, what ``AnomalyDetector`` feeds): the chunks'
patches are merged with the kept bank and the union is reduced to the budget again (a merge-and-reduce
coreset), so peak memory is the budget plus one chunk and the time per added view does not grow with the
bank (new patches are buffered up to 4x the budget per merge: the coreset's cost is set by its budget,
so fewer, larger merges are cheaper per view). ``coverage_radius`` is the last merge's.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from adreg.backbones.base import Features
from adreg.errors import ConfigError
from adreg.methods.base import AnomalyMethod
from adreg.methods.coreset import greedy_coreset
from adreg.methods.subspace import patch_matrix

BANK_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
#: new patches buffered per merge, as a multiple of the bank budget (see ``PatchKNN._merge_stream``)
MERGE_FACTOR = 4


def max_cosine(queries: torch.Tensor, bank: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Highest cosine of each L2-normalised query row against the normalised bank rows, chunked.

    On the CPU the similarities are computed in cache-sized tiles (``CPU_TILE`` bank rows x query rows,
    bank rows first so the maximum runs down contiguous columns) into one reused buffer: ~2x faster than
    whole-bank chunks on 2 cores, whose fresh 50 MB products spend their time in memory, with the same
    dot products. On a GPU, ``chunk`` bank rows against all queries at once."""
    if queries.device.type == "cpu":
        return _max_cosine_tiled(queries, bank)
    best = torch.full((queries.shape[0],), -1.0, device=queries.device)
    for start in range(0, bank.shape[0], chunk):
        sims = queries @ bank[start:start + chunk].to(queries.dtype).T
        best = torch.maximum(best, sims.max(1).values.float())
    return best


#: (bank rows, query rows) of one similarity tile on the CPU: 4 MiB of float32, about an L2 cache
CPU_TILE = (2048, 512)


def _max_cosine_tiled(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    n_bank, n_query = CPU_TILE
    queries = queries.float()
    best = torch.full((queries.shape[0],), -1.0)
    buf = torch.empty(min(n_bank, bank.shape[0]), min(n_query, queries.shape[0]))
    for b0 in range(0, bank.shape[0], n_bank):
        rows = bank[b0:b0 + n_bank].float()  # a float16 bank is widened one tile at a time
        for q0 in range(0, queries.shape[0], n_query):
            q = queries[q0:q0 + n_query]
            sims = torch.mm(rows, q.T, out=buf[:rows.shape[0], :q.shape[0]])
            torch.maximum(best[q0:q0 + n_query], sims.amax(0), out=best[q0:q0 + n_query])
    return best


def check_bank_dtype(name: str) -> torch.dtype:
    if name not in BANK_DTYPES:
        raise ConfigError(f"bank_dtype must be one of {sorted(BANK_DTYPES)}, got {name!r}")
    return BANK_DTYPES[name]


class PatchKNN(AnomalyMethod):
    name = "knn"

    def __init__(self, layer_combine: str = "concat", bank_dtype: str = "fp32", bank_budget: int = 16_384,
                 coreset_dim: int = 64, seed: int = 0):
        check_bank_dtype(bank_dtype)
        if bank_budget < 0 or coreset_dim < 0:
            raise ConfigError(f"bank_budget and coreset_dim must be >= 0 (0 = no limit / no projection), "
                              f"got {bank_budget} and {coreset_dim}")
        super().__init__(layer_combine=layer_combine, bank_dtype=bank_dtype, bank_budget=int(bank_budget),
                         coreset_dim=int(coreset_dim), seed=int(seed))
        self.coverage_radius: float | None = None

    def _select(self, patches: torch.Tensor, group_size: int) -> torch.Tensor:
        """The coreset of L2-normalised ``patches`` (all of them within budget), in the bank's dtype;
        ``group_size``: patches per image (the coreset's first level runs per group, see greedy_coreset)."""
        budget = self.params["bank_budget"]
        if budget and patches.shape[0] > budget:
            core = greedy_coreset(patches, budget, self.params["coreset_dim"], self.params["seed"],
                                  group_size=group_size)
            patches, self.coverage_radius = patches[core.indices], core.radius
        else:
            self.coverage_radius = 0.0
        return patches.to(check_bank_dtype(self.params["bank_dtype"])).contiguous()

    def _patches(self, features: Features) -> torch.Tensor:
        return F.normalize(patch_matrix(features.combined(self.params["layer_combine"]).float()), dim=1)

    def fit(self, features: Features, progress=None, synthetic: Features | None = None, auxiliary=None) -> "PatchKNN":
        return self.fit_chunks([features], progress)

    def fit_chunks(self, chunks: Iterable[Features], progress=None) -> "PatchKNN":
        """Fit chunk by chunk (see ``_merge_stream``); one chunk is exactly ``fit``. Without a budget the
        bank is every patch in order, so chunked and one-pass fits are identical."""
        self.bank, self.coverage_radius = None, None
        if not self._merge_stream(chunks, progress)[0]:
            raise ConfigError("no features to fit on")
        self._fitted = True
        return self

    def _merge_stream(self, chunks: Iterable[Features], progress=None) -> tuple[int, int]:
        """Merge-and-reduce: new patches are buffered until they reach ``MERGE_FACTOR`` x the budget, then
        merged with the kept bank and the union reduced to the budget again. The coreset's cost is set by
        the budget (its picks), not by the union, so buffering several chunks per merge keeps the time per
        added view flat and low, and memory at bank + buffer + one chunk, whatever the goods. Returns
        (views, patches) absorbed."""
        budget = self.params["bank_budget"]
        pending, n_pending, views, patches, group = [], 0, 0, 0, 1
        for chunk in chunks:
            new = self._patches(chunk).cpu()
            width = self.bank.shape[1] if self.bank is not None else (pending[0].shape[1] if pending else None)
            if width is not None and new.shape[1] != width:
                raise ConfigError(f"features have {new.shape[1]} channels but the bank has {width}; "
                                  "use the parent's backbone and layers")
            pending.append(new)
            n_pending += new.shape[0]
            views, patches, group = views + len(chunk), patches + new.shape[0], chunk.grid[0] * chunk.grid[1]
            if not budget or n_pending >= MERGE_FACTOR * budget:
                self._merge(pending, group)
                pending, n_pending = [], 0
            if progress is not None:
                progress(len(chunk))
        if pending:
            self._merge(pending, group)
        return views, patches

    def _merge(self, pending: list[torch.Tensor], group_size: int) -> None:
        """The kept bank + the buffered patches, reduced to the budget (``_select``)."""
        parts = ([self.bank.float().cpu()] if self.bank is not None else []) + pending
        self.bank = self._select(torch.cat(parts) if len(parts) > 1 else parts[0], group_size).to(self.device)

    def update(self, features: Features, progress=None, synthetic: Features | None = None) -> dict:
        return self.update_chunks([features], progress)

    def update_chunks(self, chunks: Iterable[Features], progress=None) -> dict:
        """Grow chunk by chunk (``_merge_stream``): memory = bank + buffer + one chunk; with no budget the
        same bank as one ``update`` on all the views."""
        self._check_updatable()
        before = self.bank.shape[0]
        views, added = self._merge_stream(chunks, progress)
        if not views:
            raise ConfigError("no features to update with")
        budget = self.params["bank_budget"]
        return {"method": self.name,
                "what": f"added {added} patches of {views} views to the {before}-patch bank and "
                        + (f"kept a greedy coreset of {self.bank.shape[0]} patches (budget {budget}; merged "
                           "and reduced chunk by chunk)" if budget else "kept them all (no bank budget)"),
                "bank_patches_before": before, "bank_patches_after": int(self.bank.shape[0]),
                "patches_added": int(added), "bank_budget": budget,
                "coverage_radius": self.coverage_radius}

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

    def to(self, device) -> "PatchKNN":
        self.device = torch.device(device)
        if self._fitted:
            self.bank = self.bank.to(self.device)
        return self

    def summary(self) -> dict[str, float]:
        self._check_fitted()
        out = {"bank_patches": float(self.bank.shape[0]),
               "bank_mib": self.bank.numel() * self.bank.element_size() / 2 ** 20}
        if self.coverage_radius is not None:
            out["coverage_radius"] = float(self.coverage_radius)
        return out
