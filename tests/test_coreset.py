"""Greedy k-center coreset on real patch features: budget, coverage, and the farthest-first property."""

import pytest
import torch
import torch.nn.functional as F

from adreg.augment import augment_shots
from adreg.backbones import build_backbone
from adreg.errors import ConfigError
from adreg.images import load_image
from adreg.methods.coreset import greedy_coreset, project
from adreg.methods.subspace import patch_matrix


@pytest.fixture(scope="module")
def patches(bottle_dir):
    """L2-normalised Lite0 patches of 6 real bottle views at 192 px (6 x 576 rows, 152 dims)."""
    torch.set_num_threads(2)
    img = load_image(bottle_dir / "train" / "good" / "000.png")
    feats = build_backbone("efficientnet-lite0", image_size=192).extract(augment_shots([img], ["rotate"], 5, 0))
    return F.normalize(patch_matrix(feats.combined()), dim=1)


def _naive_farthest_first(z, budget, start):
    mind = (z - z[start]).pow(2).sum(1)
    picked = [start]
    while len(picked) < budget:
        j = int(mind.argmax())
        picked.append(j)
        mind = torch.minimum(mind, (z - z[j]).pow(2).sum(1))
    return picked


def _coverage(z, kept):
    """Distance of every row to its nearest kept row."""
    return torch.cdist(z, z[kept]).min(1).values


def test_k_center_property_and_exact_farthest_first(patches):
    budget = 150
    core = greedy_coreset(patches, budget, projection_dim=None)
    kept = core.indices
    assert kept.numel() == budget == kept.unique().numel()
    cover = _coverage(patches, kept)
    dropped = torch.ones(len(patches), dtype=torch.bool)
    dropped[kept] = False
    # every dropped patch lies within the coverage radius of a kept one, and the radius is attained
    assert cover[dropped].max() <= core.radius + 1e-4
    assert cover[dropped].max() >= core.radius - 1e-4
    # farthest-first: the kept patches are pairwise at least the coverage radius apart
    pair = torch.cdist(patches[kept], patches[kept]) + torch.eye(budget) * 10
    assert pair.min() >= core.radius - 1e-4
    # the pooled, batched traversal picks exactly what one-at-a-time farthest-first picks
    assert kept.tolist() == _naive_farthest_first(patches, budget, int(kept[0]))


def test_projection_and_two_level_selection_cover_every_patch(patches):
    budget = 200
    core = greedy_coreset(patches, budget, projection_dim=32, group_size=576, oversample=2)
    assert core.indices.numel() == budget and core.projection_dim == 32
    z = project(patches, 32, 0)  # the space the selection ran in
    assert _coverage(z, core.indices).max() <= core.radius + 1e-4  # the two-level radius is a bound
    # and the coverage is far better than keeping the same number of patches of the first views
    naive = torch.arange(budget)
    assert _coverage(z, core.indices).max() < _coverage(z, naive).max()


def test_small_banks_are_kept_whole_and_budget_is_checked(patches):
    core = greedy_coreset(patches[:50], 100)
    assert core.indices.tolist() == list(range(50)) and core.radius == 0.0
    with pytest.raises(ConfigError, match="budget"):
        greedy_coreset(patches, 0)


@pytest.mark.parametrize("bank_rows,query_rows", [(3456, 700), (2048, 512), (100, 3000)])
def test_max_cosine_tiles_equal_the_full_similarity_matrix(patches, bank_rows, query_rows):
    """The CPU-tiled nearest-neighbour search gives each query's highest cosine over the whole bank, for
    banks and query sets that are not multiples of the tile, in float32 and float16 banks."""
    from adreg.methods.knn import max_cosine

    bank = patches[:bank_rows]
    queries = patches.flip(0)[:query_rows] + 0.01  # not in the bank as they are
    queries = F.normalize(queries, dim=1)
    want = (queries @ bank.T).max(1).values
    torch.testing.assert_close(max_cosine(queries, bank), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(max_cosine(queries, bank.half()), want, rtol=0, atol=2e-3)
