"""Greedy coreset (k-center / farthest-point selection), as PatchCore bounds its memory bank.

``greedy_coreset(x, budget)`` picks ``budget`` rows of ``x`` so that every row is close to a picked one:
starting from one (seeded) row, it repeatedly adds the row farthest from everything picked so far
(Gonzalez's farthest-first traversal, a 2-approximation of the optimal k-center radius). The result
satisfies the k-center property the tests check: every dropped row lies within the final coverage
radius r of a kept row, and kept rows are pairwise at least r apart.

Speed, for banks of ~10^5-10^7 patches on a CPU:

* distances are computed on a Gaussian random projection to ``projection_dim`` dimensions
  (Johnson-Lindenstrauss; PatchCore's approximate sampler does the same with 128);
* the traversal is *exact* but batched: the ``pool`` rows farthest from the current selection are the
  only candidates for the next few picks. Picks are made inside the pool (distances among the pool only)
  as long as the best candidate's updated distance is still >= the (pool+1)-th largest distance outside
  it, which no outside row can beat; then the whole set is updated with one matrix product against all
  the picks of the round. Same picks as one-at-a-time traversal, a fraction of the passes over the data;
* a round only recomputes distances of rows that a new pick can possibly be closer to (triangle
  inequality on each row's current nearest pick), which skips most rows once the radius is small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adreg.errors import ConfigError


@dataclass
class Coreset:
    """Indices of the kept rows (in selection order) and the coverage radius in the selection space."""

    indices: torch.Tensor
    radius: float
    n_total: int
    projection_dim: int


def project(x: torch.Tensor, projection_dim: int | None, seed: int) -> torch.Tensor:
    """A Gaussian random projection of the rows to ``projection_dim`` dims (none when it would not shrink them)."""
    x = x.float()
    if not projection_dim or projection_dim >= x.shape[1]:
        return x
    gen = torch.Generator().manual_seed(seed)
    r = torch.randn(x.shape[1], projection_dim, generator=gen) / projection_dim ** 0.5
    return x @ r.to(x.device)


def _sqdist(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (len(a), len(b)) via ||a||^2 + ||b||^2 - 2 a.b."""
    return torch.addmm((b * b).sum(1), a, b.T, alpha=-2.0).add_(a_sq[:, None]).clamp_min_(0.0)


def _min_sqdist(a: torch.Tensor, a_sq: torch.Tensor, b: torch.Tensor, chunk: int = 8192):
    """Smallest squared distance of each row of ``a`` to the rows of ``b``, and which row: chunked, one
    fused matrix product per chunk (no (len(a), len(b)) temporaries beyond a chunk)."""
    b_sq = (b * b).sum(1)
    values = torch.empty(a.shape[0], dtype=a.dtype)
    args = torch.empty(a.shape[0], dtype=torch.long)
    for start in range(0, a.shape[0], chunk):
        v, i = torch.addmm(b_sq, a[start:start + chunk], b.T, alpha=-2.0).min(1)
        values[start:start + chunk] = v.add_(a_sq[start:start + chunk]).clamp_min_(0.0)
        args[start:start + chunk] = i
    return values, args


def _group_farthest_first(z: torch.Tensor, k: int, seed: int, chunk: int = 16) -> tuple[torch.Tensor, float]:
    """Farthest-first traversal run independently in each group: ``z`` (G, P, d) -> (G, k) row indices
    within each group and the largest coverage radius of any group. Groups are processed ``chunk`` at a
    time so each chunk's rows stay in cache across the k passes."""
    g_all, p, _ = z.shape
    gen = torch.Generator().manual_seed(seed)
    picks, radius = [], 0.0
    for g0 in range(0, g_all, chunk):
        zc = z[g0:g0 + chunk]
        g = zc.shape[0]
        sq = (zc * zc).sum(-1)
        rows = torch.arange(g)
        j = torch.randint(0, p, (g,), generator=gen)
        mind = torch.full((g, p), float("inf"))
        chosen = torch.empty(g, k, dtype=torch.long)
        for t in range(k):
            chosen[:, t] = j
            c = zc[rows, j]  # (g, d)
            d = torch.baddbmm((sq + (c * c).sum(-1)[:, None])[:, :, None], zc, c[:, :, None], alpha=-2.0)[..., 0]
            torch.minimum(mind, d.clamp_min_(0.0), out=mind)
            mind[rows, j] = 0.0
            j = mind.argmax(1)
        picks.append(chosen)
        radius = max(radius, float(mind.max().sqrt()))
    return torch.cat(picks), radius


def greedy_coreset(x: torch.Tensor, budget: int, projection_dim: int | None = 128, seed: int = 0,
                   pool: int = 512, group_size: int = 0, oversample: int = 4) -> Coreset:
    """Farthest-first selection of ``budget`` rows of ``x`` (N, D); all rows when N <= budget.

    ``group_size`` > 0 (e.g. the patches of one image) makes it two-level when N > ``oversample`` x
    budget: farthest-first inside each group of consecutive rows keeps ``oversample`` x budget rows in
    all, then farthest-first over those keeps ``budget`` (a composable coreset). The returned radius is
    then the bound r_groups + r_final: still every dropped row is within it of a kept row.
    """
    if budget < 1:
        raise ConfigError(f"a coreset budget must be >= 1, got {budget}")
    n = x.shape[0]
    if n <= budget:
        return Coreset(torch.arange(n), 0.0, n, 0)
    z = project(x, projection_dim, seed)
    if group_size and n > oversample * budget and n >= 2 * group_size:
        n_full = n // group_size
        per_group = -(-oversample * budget // -(-n // group_size))  # ceil(oversample * budget / n_groups)
        if per_group < group_size:
            first, r1 = _group_farthest_first(z[:n_full * group_size].reshape(n_full, group_size, -1),
                                              per_group, seed)
            cand = [(first + torch.arange(n_full)[:, None] * group_size).flatten()]
            rest = n - n_full * group_size
            if rest:  # the last, partial group
                tail, r_tail = _group_farthest_first(z[n_full * group_size:][None], min(per_group, rest), seed)
                cand.append(tail[0] + n_full * group_size)
                r1 = max(r1, r_tail)
            cand = torch.unique(torch.cat(cand))
            inner = _farthest_first(z[cand], budget, seed, pool)
            return Coreset(cand[inner.indices], r1 + inner.radius, n, int(z.shape[1]))
    return _farthest_first(z, budget, seed, pool)


def _farthest_first(z: torch.Tensor, budget: int, seed: int, pool: int) -> Coreset:
    """Exact farthest-first traversal of the rows of ``z`` (already projected), batched with a pool."""
    n = z.shape[0]
    if n <= budget:
        return Coreset(torch.arange(n), 0.0, n, int(z.shape[1]))
    z_sq = (z * z).sum(1)
    start = int(torch.randint(0, n, (1,), generator=torch.Generator().manual_seed(seed)).item())
    mind = _min_sqdist(z, z_sq, z[start:start + 1])[0]
    nearest = torch.zeros(n, dtype=torch.long)  # position (in ``picked``) of each row's nearest pick
    picked = [start]
    mind[start] = 0.0
    while len(picked) < budget:
        want = budget - len(picked)
        p = min(pool, want, n - 1)
        top = torch.topk(mind, min(p + 1, n))
        if float(top.values[0]) <= 0.0:
            break  # everything left duplicates a pick: the bank is smaller than the budget
        cand, cand_d = top.indices[:p], top.values[:p].numpy().astype(np.float64).copy()
        threshold = float(top.values[p]) if top.values.numel() > p else 0.0
        cc = _sqdist(z[cand], z_sq[cand], z[cand]).numpy()
        new = []
        while len(new) < want:
            j = int(cand_d.argmax())
            if cand_d[j] <= 0.0 or (new and cand_d[j] < threshold):
                break
            new.append(j)
            np.minimum(cand_d, cc[j], out=cand_d)
            cand_d[j] = -1.0
        new_idx = cand[torch.as_tensor(new)]
        base = len(picked)
        picked.extend(new_idx.tolist())
        # rows whose nearest pick c has d(c, new) >= 2 * sqrt(mind) cannot get closer to a new pick
        centres = z[torch.as_tensor(picked[:base])]
        gap = _min_sqdist(centres, (centres * centres).sum(1), z[new_idx])[0].sqrt()  # (base,)
        maybe = (gap[nearest] < 2.0 * mind.sqrt() + 1e-6).nonzero()[:, 0]
        if maybe.numel():
            best, arg = _min_sqdist(z[maybe], z_sq[maybe], z[new_idx])
            closer = best < mind[maybe]
            rows = maybe[closer]
            mind[rows] = best[closer]
            nearest[rows] = arg[closer] + base
        mind[new_idx] = 0.0
    indices = torch.as_tensor(picked)
    return Coreset(indices, float(mind.max().sqrt()), n, int(z.shape[1]))
