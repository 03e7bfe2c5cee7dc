"""From patch scores to pixel anomaly maps and one score per image."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return k / k.sum()


@functools.lru_cache(maxsize=16)
def axis_operator(n_in: int, n_out: int, sigma: float) -> torch.Tensor:
    """(n_out, n_in) float64 matrix of one axis of ``anomaly_maps``: bilinear upsampling (align_corners
    False) followed by the Gaussian blur with reflect padding, both linear, so composed once per shape."""
    eye = torch.eye(n_in, dtype=torch.float64).unsqueeze(1)
    up = F.interpolate(eye, size=n_out, mode="linear", align_corners=False)[:, 0, :].T  # (n_out, n_in)
    if sigma <= 0:
        return up
    k = gaussian_kernel1d(sigma).double()
    r = k.numel() // 2
    basis = torch.eye(n_out, dtype=torch.float64).unsqueeze(1)
    blur = F.conv1d(F.pad(basis, (r, r), mode="reflect"), k.view(1, 1, -1))[:, 0, :].T  # column i: blurred e_i
    return blur @ up


def anomaly_maps(patch_scores: torch.Tensor, size: int | tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """Bilinear upsampling of (B, h, w) patch scores to ``size``, then Gaussian smoothing.

    Both steps are separable and linear, so each map is ``A_h @ scores @ A_w.T`` with one (size, h)
    matrix per axis (``axis_operator``): the same maps as upsampling the whole map and blurring it with two
    reflect-padded 1-D convolutions, up to float32 rounding, at a fraction of the cost (no full-size
    intermediate)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    h, w = patch_scores.shape[-2:]
    x = patch_scores.float()
    a_h = axis_operator(int(h), int(size[0]), float(sigma)).to(x.device, torch.float32)
    a_w = axis_operator(int(w), int(size[1]), float(sigma)).to(x.device, torch.float32)
    return torch.matmul(torch.matmul(a_h, x), a_w.T)


def image_scores(maps: torch.Tensor, top_fraction: float = 0.01) -> torch.Tensor:
    """Mean of the top ``top_fraction`` pixels of each map (``mtop1p``); 0 means the maximum."""
    flat = maps.flatten(1)
    if top_fraction <= 0:
        return flat.max(1).values
    k = max(1, int(round(flat.shape[1] * top_fraction)))
    return flat.topk(k, dim=1).values.mean(1)
