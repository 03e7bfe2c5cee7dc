"""Backbones behind one interface; ``build_backbone`` turns a name (or a saved spec) into one."""

from __future__ import annotations

from adreg.backbones.base import Backbone, Features
from adreg.errors import ConfigError
from adreg.options import DEFAULT_BACKBONE


def build_backbone(name: str = DEFAULT_BACKBONE, layers=None, image_size: int | None = None,
                   precision: str = "fp32", final_norm: bool = False) -> Backbone:
    """``efficientnet-lite0`` / ``efficientnet-lite2`` (offline), or ``hf:<hub id or local dir>``."""
    if name.startswith("hf:"):
        from adreg.backbones.huggingface import HFVisionTransformer

        return HFVisionTransformer(name[3:], layers=layers, image_size=image_size or 448,
                                   precision=precision, final_norm=final_norm)
    if name.startswith("efficientnet-lite"):
        from adreg.backbones.efficientnet import EfficientNetLite

        return EfficientNetLite(name, layers=layers, image_size=image_size or 320, precision=precision)
    raise ConfigError(f"unknown backbone {name!r}: use efficientnet-lite0, efficientnet-lite2 or hf:<hub id or folder>")


__all__ = ["Backbone", "Features", "build_backbone", "DEFAULT_BACKBONE"]
