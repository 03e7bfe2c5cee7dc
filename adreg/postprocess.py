"""From patch scores to pixel anomaly maps and one score per image."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def gaussian_kernel1d(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x ** 2) / (2.0 * sigma ** 2))
    return k / k.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, H, W) maps with reflect padding (full 3-sigma kernel)."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel1d(sigma).to(maps.device, maps.dtype)
    r = k.numel() // 2
    x = maps.unsqueeze(1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
    return x.squeeze(1)


def anomaly_maps(patch_scores: torch.Tensor, size: int | tuple[int, int], sigma: float = 4.0) -> torch.Tensor:
    """Bilinear upsampling of (B, h, w) patch scores to ``size``, then Gaussian smoothing."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    up = F.interpolate(patch_scores.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False)
    return gaussian_blur(up.squeeze(1), sigma)


def image_scores(maps: torch.Tensor, top_fraction: float = 0.01) -> torch.Tensor:
    """Mean of the top ``top_fraction`` pixels of each map (``mtop1p``); 0 means the maximum."""
    flat = maps.flatten(1)
    if top_fraction <= 0:
        return flat.max(1).values
    k = max(1, int(round(flat.shape[1] * top_fraction)))
    return flat.topk(k, dim=1).values.mean(1)
