"""The backbone interface: a frozen network that turns images into patch features.

Every backbone returns, per selected layer, a patch-feature map on one common grid and a global
descriptor (the CLS token for ViTs, the global-average-pooled map for CNNs). Methods only see these
tensors, so any backbone works with any method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from adreg.errors import ConfigError
from adreg.images import thread_map

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Features:
    """Backbone output for a batch: ``patches[l]`` is (B, C_l, h, w), ``globals[l]`` is (B, C_l).

    ``real`` (B,) bool marks the views that are real images, not synthetic (augmented) copies; ``None``
    means all are real. The detector sets it on the views it fits or updates on, so a method with a
    budget can drop copies before real goods (RAD)."""

    patches: list[torch.Tensor]
    globals: list[torch.Tensor]
    real: torch.Tensor | None = None

    def real_mask(self) -> torch.Tensor:
        """(B,) bool on the CPU: ``real``, or all True."""
        return self.real.cpu() if self.real is not None else torch.ones(len(self), dtype=torch.bool)

    def __len__(self) -> int:
        return self.patches[0].shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.patches[0].shape[-2:])

    def to(self, *args, **kwargs) -> "Features":
        return Features([p.to(*args, **kwargs) for p in self.patches], [g.to(*args, **kwargs) for g in self.globals],
                        self.real)

    def __getitem__(self, idx) -> "Features":
        return Features([p[idx] for p in self.patches], [g[idx] for g in self.globals],
                        None if self.real is None else self.real[idx])

    @staticmethod
    def cat(parts: Sequence["Features"]) -> "Features":
        n_layers = len(parts[0].patches)
        real = None
        if any(p.real is not None for p in parts):
            real = torch.cat([p.real_mask() for p in parts])
        return Features(
            [torch.cat([p.patches[i] for p in parts]) for i in range(n_layers)],
            [torch.cat([p.globals[i] for p in parts]) for i in range(n_layers)],
            real,
        )

    def combined(self, mode: str = "concat") -> torch.Tensor:
        """One (B, C, h, w) map of all layers: channel ``concat``, or element-wise ``mean`` (equal widths)."""
        if len(self.patches) == 1:
            return self.patches[0]
        if mode == "concat":
            return torch.cat(self.patches, dim=1)
        if mode == "mean":
            widths = {p.shape[1] for p in self.patches}
            if len(widths) > 1:
                raise ConfigError(f"layer_combine='mean' needs layers of equal width, got {sorted(widths)}; use 'concat'")
            return torch.stack(self.patches).mean(0)
        raise ConfigError(f"unknown layer_combine {mode!r}; use 'concat' or 'mean'")


class Backbone(torch.nn.Module, ABC):
    """A frozen feature extractor with its own preprocessing (square resize + normalisation)."""

    #: per-channel normalisation applied after scaling pixels to [0, 1]
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    def __init__(self, image_size: int, precision: str = "fp32"):
        super().__init__()
        if image_size < 32:
            raise ConfigError(f"image_size must be at least 32, got {image_size}")
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.image_size = int(image_size)
        self.precision = precision

    @abstractmethod
    def spec(self) -> dict:
        """JSON-serialisable arguments that rebuild this backbone with ``build_backbone(**spec)``."""

    @abstractmethod
    def forward_features(self, x: torch.Tensor) -> Features:
        """Features of a normalised batch (B, 3, S, S)."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Square-resize (bilinear, antialiased) and normalise PIL images into a batch tensor.

        Several images are resized in parallel threads (PIL releases the GIL while resampling); the result
        does not depend on it."""
        s = self.image_size
        return self.normalise(thread_map(lambda img: img.resize((s, s), Image.BILINEAR), images))

    def normalise(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images of one size as a batch tensor scaled to [0, 1] and normalised with mean/std.

        ``(x / 255 - mean) / std`` as three in-place float32 operations on the whole batch (one uint8 ->
        float32 copy into channel-first order first): each is correctly rounded, so the values are the same
        bit for bit as per-image arithmetic, and torch runs them on all threads."""
        arr = np.stack([np.asarray(img if img.mode == "RGB" else img.convert("RGB")) for img in images])
        out = torch.empty((arr.shape[0], 3, arr.shape[1], arr.shape[2]), dtype=torch.float32)
        out.copy_(torch.from_numpy(arr).permute(0, 3, 1, 2))
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)
        return out.div_(255.0).sub_(mean).div_(std)

    @torch.inference_mode()
    def extract(self, images: Sequence[Image.Image], batch_size: int = 8,
                progress: Callable[[int], None] | None = None) -> Features:
        """Features of PIL images, ``batch_size`` per forward pass, returned as float32 on the CPU.

        Images are resized and normalised a group of at least 8 at a time (in parallel threads), so a
        batch size of 1 (the CPU default) still preprocesses in parallel."""
        if not images:
            raise ValueError("no images to extract features from")
        device = self.device
        use_amp = device.type == "cuda" and self.precision != "fp32"
        group = max(batch_size, PREPROCESS_GROUP)
        parts = []
        for g0 in range(0, len(images), group):
            xs = self.preprocess(images[g0:g0 + group])
            for start in range(0, len(xs), batch_size):
                x = xs[start:start + batch_size].to(device, non_blocking=True)
                with torch.autocast(device.type, dtype=PRECISIONS[self.precision], enabled=use_amp):
                    feats = self.forward_features(x)
                parts.append(feats.to("cpu", torch.float32))
                if progress is not None:
                    progress(len(x))
        return Features.cat(parts)


#: images resized and normalised together by ``Backbone.extract`` (bounded memory: ~1.2 MiB each at 320 px)
PREPROCESS_GROUP = 8


def resize_to_grid(maps: list[torch.Tensor], grid: tuple[int, int]) -> list[torch.Tensor]:
    """Bring feature maps of different strides onto one grid (bilinear), as PatchCore does."""
    return [m if tuple(m.shape[-2:]) == tuple(grid) else
            F.interpolate(m, size=grid, mode="bilinear", align_corners=False) for m in maps]
