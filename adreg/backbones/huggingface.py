"""DINOv2 / DINOv3 (and other HF ViTs) through ``transformers``, from a hub id or a local folder.

Patch tokens of the selected ``hidden_states`` entries (index 0 = embeddings, entries before the final
LayerNorm unless ``final_norm``); CLS and register tokens are dropped from the patch grid, and the CLS
token is kept as the global descriptor.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from adreg.backbones.base import Backbone, Features
from adreg.errors import BackboneError, ConfigError

DEFAULT_LAYERS = (-4, -5)


def _load_model(source: str):
    from transformers import AutoConfig, AutoModel

    local = Path(source).expanduser()
    kwargs = {"local_files_only": True} if local.is_dir() or os.environ.get("HF_HUB_OFFLINE") == "1" else {}
    target = str(local) if local.is_dir() else source
    try:
        config = AutoConfig.from_pretrained(target, **kwargs)
        model = AutoModel.from_pretrained(target, config=config, **kwargs)
    except Exception as exc:  # noqa: BLE001 - transformers raises many types for "not reachable"
        raise BackboneError(
            f"could not load the Hugging Face model {source!r} ({type(exc).__name__}: {str(exc)[:300]}). "
            "Without network access, download it where there is network, e.g. "
            "`huggingface-cli download facebook/dinov2-small --local-dir ./dinov2-small`, copy the folder "
            "here and pass --backbone hf:./dinov2-small") from None
    return model


class HFVisionTransformer(Backbone):
    """A ViT from ``transformers`` with layer selection; patch maps are (B, C, S/p, S/p)."""

    def __init__(self, source: str, layers=None, image_size: int = 448, precision: str = "fp32",
                 final_norm: bool = False, model=None):
        super().__init__(image_size, precision)
        self.source = str(source)
        self.model = model if model is not None else _load_model(self.source)
        cfg = self.model.config
        self.patch_size = int(getattr(cfg, "patch_size", 14))
        if self.image_size % self.patch_size:
            raise ConfigError(f"image_size {self.image_size} is not a multiple of the patch size {self.patch_size}")
        self.n_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        n_hidden = int(cfg.num_hidden_layers) + 1
        self.layers = tuple(int(i) for i in (layers if layers else DEFAULT_LAYERS))
        bad = [i for i in self.layers if not -n_hidden <= i < n_hidden]
        if bad:
            raise ConfigError(f"this model has hidden_states -{n_hidden}..{n_hidden - 1}; got layers {bad}")
        self.final_norm = bool(final_norm)
        self.norm = getattr(self.model, "layernorm", None) or getattr(self.model, "norm", None)
        if self.final_norm and self.norm is None:
            raise ConfigError("final_norm requested but the model has no final layer norm")
        self.eval().requires_grad_(False)

    def spec(self) -> dict:
        return {"name": f"hf:{self.source}", "layers": list(self.layers), "image_size": self.image_size,
                "precision": self.precision, "final_norm": self.final_norm}

    def forward_features(self, x: torch.Tensor) -> Features:
        out = self.model(pixel_values=x, output_hidden_states=True)
        gh, gw = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        patches, globals_ = [], []
        for idx in self.layers:
            tokens = out.hidden_states[idx]
            if self.final_norm:
                tokens = self.norm(tokens)
            if tokens.shape[1] != self.n_prefix + gh * gw:
                raise BackboneError(f"expected {self.n_prefix} prefix + {gh * gw} patch tokens, got {tokens.shape[1]}")
            patch = tokens[:, self.n_prefix:, :]
            patches.append(patch.transpose(1, 2).reshape(x.shape[0], -1, gh, gw))
            globals_.append(tokens[:, 0, :])
        return Features(patches, globals_)
