"""FoundAD: a small ViT projector trained to pull features back onto the normal manifold.

The backbone stays frozen. Training pairs are (features of a CutPaste-corrupted view, features of the
clean view); the projector learns to map the first to the second, so at test time it "repairs"
anomalous patches and leaves normal ones alone: a patch's score is the mean squared difference between
its features and their projection. The backbone's feature maps are tokens (CNN maps too); features are
standardised per channel with statistics of the normal views, so no channel dominates the loss.

Architecture as in the paper, with widths derived from the backbone: Linear C -> D, ``depth`` pre-norm
ViT blocks (D, D/32 heads, MLP x4, no positional embedding), LayerNorm, Linear D -> C; D = C/2
rounded up to a multiple of 32 (768 -> 384 for ViT-B, 152 -> 96 for Lite0 blocks 4+10).

Chunked fitting does not apply: training samples random minibatches over all clean views and their
CutPaste pairs for many steps, so the default ``fit_chunks`` / ``update_chunks`` concatenate the chunks
and ``AnomalyDetector`` extracts all views (and their CutPaste views) at once, as before. Memory grows
with the views of one fit or update; grow FoundAD in several smaller updates where that matters.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from adreg.backbones.base import Features
from adreg.errors import ConfigError
from adreg.methods.base import AnomalyMethod


class Block(nn.Module):
    """Pre-norm transformer block (self-attention + MLP), attention via scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
        return x + self.mlp(self.norm2(x))


class Projector(nn.Module):
    def __init__(self, in_dim: int, hidden: int, depth: int, heads: int, input_dropout: float = 0.2):
        super().__init__()
        self.drop = nn.Dropout(input_dropout)
        self.inp = nn.Linear(in_dim, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, in_dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.inp(self.drop(tokens))
        for block in self.blocks:
            x = block(x)
        return self.out(self.norm(x))


def hidden_width(channels: int) -> int:
    return max(32, int(math.ceil(channels / 2 / 32)) * 32)


def tokens_of(fmap: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h*w, C)."""
    return fmap.flatten(2).transpose(1, 2)


class FoundAD(AnomalyMethod):
    name = "foundad"
    synthesis = "cutpaste"  # the detector passes features of CutPaste-corrupted views to fit()

    def __init__(self, depth: int = 6, steps: int = 200, batch_size: int = 8, lr: float = 1e-3,
                 weight_decay: float = 1e-4, input_dropout: float = 0.2, p_anomaly: float = 0.5,
                 layer_combine: str = "concat", seed: int = 0, update_epochs: int = 2, update_lr: float = 1e-4):
        if steps < 1 or batch_size < 1 or depth < 1 or update_epochs < 1:
            raise ConfigError("steps, batch_size, depth and update_epochs must be >= 1")
        if not 0.0 <= p_anomaly <= 1.0:
            raise ConfigError(f"p_anomaly must be in [0, 1], got {p_anomaly}")
        super().__init__(depth=int(depth), steps=int(steps), batch_size=int(batch_size), lr=float(lr),
                         weight_decay=float(weight_decay), input_dropout=float(input_dropout),
                         p_anomaly=float(p_anomaly), layer_combine=layer_combine, seed=int(seed),
                         update_epochs=int(update_epochs), update_lr=float(update_lr))

    def progress_units(self, n_views: int) -> int:
        return self.params["steps"]

    def _build(self, channels: int) -> Projector:
        hidden = hidden_width(channels)
        return Projector(channels, hidden, self.params["depth"], hidden // 32, self.params["input_dropout"])

    def _standardise(self, fmap: torch.Tensor) -> torch.Tensor:
        return (tokens_of(fmap) - self.feat_mean) / self.feat_std

    def _pairs(self, features: Features, synthetic: Features | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised (clean, corrupted) token tensors; ``synthetic[i * per_view + j]`` is from view i."""
        if synthetic is None or len(synthetic) % len(features):
            raise ConfigError("FoundAD needs CutPaste-corrupted views aligned with the clean views")
        p = self.params
        clean = features.combined(p["layer_combine"]).float()
        corrupt = synthetic.combined(p["layer_combine"]).float()
        if not hasattr(self, "feat_mean"):
            flat = tokens_of(clean).reshape(-1, clean.shape[1])
            self.feat_mean, self.feat_std = flat.mean(0).to(self.device), flat.std(0).clamp_min(1e-6).to(self.device)
        elif clean.shape[1] != self.feat_mean.numel():
            raise ConfigError(f"features have {clean.shape[1]} channels but the projector was trained on "
                              f"{self.feat_mean.numel()}; use the parent's backbone and layers")
        self.grid = tuple(clean.shape[-2:])
        return self._standardise(clean.to(self.device)), self._standardise(corrupt.to(self.device))

    def _train(self, target: torch.Tensor, corrupt: torch.Tensor, steps: int, lr: float, seed: int,
               progress=None) -> list[float]:
        """AdamW + cosine schedule: ``projector(corrupted or clean view) -> clean view`` (MSE)."""
        p = self.params
        per_view = corrupt.shape[0] // target.shape[0]
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.AdamW(self.projector.parameters(), lr=lr, weight_decay=p["weight_decay"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        losses = []
        self.projector.train()
        for _ in range(steps):
            idx = torch.randint(0, target.shape[0], (p["batch_size"],), generator=gen)
            use_corrupt = torch.rand(p["batch_size"], generator=gen) < p["p_anomaly"]
            variant = torch.randint(0, per_view, (p["batch_size"],), generator=gen)
            x = torch.where(use_corrupt[:, None, None].to(self.device),
                            corrupt[(idx * per_view + variant).to(self.device)], target[idx.to(self.device)])
            loss = F.mse_loss(self.projector(x), target[idx.to(self.device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            if progress is not None:
                progress(1, loss=losses[-1])
        self.projector.eval()
        return losses

    def fit(self, features: Features, progress=None, synthetic: Features | None = None, auxiliary=None) -> "FoundAD":
        """Train on clean views ``features`` and their CutPaste versions ``synthetic`` (synthetic[i] from view i)."""
        for key in ("feat_mean", "feat_std"):  # a refit standardises with its own views
            self.__dict__.pop(key, None)
        target, corrupt = self._pairs(features, synthetic)
        torch.manual_seed(self.params["seed"])
        self.projector = self._build(target.shape[-1]).to(self.device)
        losses = self._train(target, corrupt, self.params["steps"], self.params["lr"], self.params["seed"], progress)
        self.curves = {"train_loss": losses}
        self._fitted = True
        return self

    def update_steps(self, n_views: int) -> int:
        return self.params["update_epochs"] * -(-n_views // self.params["batch_size"])

    def update_progress_units(self, n_views: int) -> int:
        return self.update_steps(n_views)

    def update(self, features: Features, progress=None, synthetic: Features | None = None) -> dict:
        """Continue training the parent's projector on the new views (+ their CutPaste versions) for
        ``update_epochs`` epochs at ``update_lr``; the parent's feature standardisation is kept (the
        projector was trained in that space)."""
        self._check_updatable()
        target, corrupt = self._pairs(features, synthetic)
        steps = self.update_steps(target.shape[0])
        torch.manual_seed(self.params["seed"] + 1 + target.shape[0])
        before = torch.cat([q.detach().flatten() for q in self.projector.parameters()]).clone()
        losses = self._train(target, corrupt, steps, self.params["update_lr"],
                             self.params["seed"] + 1 + target.shape[0], progress)
        after = torch.cat([q.detach().flatten() for q in self.projector.parameters()])
        self.curves = {"update_loss": losses}
        return {"method": self.name,
                "what": f"continued training the parent's projector for {steps} steps "
                        f"({self.params['update_epochs']} epochs at lr {self.params['update_lr']:g}) on "
                        f"{target.shape[0]} new views and their CutPaste versions",
                "update_steps": steps, "n_views_added": int(target.shape[0]),
                "update_loss_first": losses[0], "update_loss_last": float(sum(losses[-10:]) / len(losses[-10:])),
                "weight_change_rel": float((after - before).norm() / before.norm().clamp_min(1e-12))}

    @torch.inference_mode()
    def score_patches(self, features: Features) -> torch.Tensor:
        self._check_fitted()
        fmap = features.combined(self.params["layer_combine"]).to(self.device, torch.float32)
        b, _, h, w = fmap.shape
        x = self._standardise(fmap)
        return (x - self.projector(x)).pow(2).mean(-1).reshape(b, h, w)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        state = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        state.update({"feat_mean": self.feat_mean, "feat_std": self.feat_std})
        return state

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.feat_mean, self.feat_std = state["feat_mean"].float(), state["feat_std"].float()
        self.projector = self._build(self.feat_mean.numel())
        self.projector.load_state_dict({k[len("projector."):]: v for k, v in state.items() if k.startswith("projector.")})
        self.projector.to(self.device).eval()
        self._fitted = True

    def to(self, device) -> "FoundAD":
        self.device = torch.device(device)
        if self._fitted:
            self.projector.to(self.device)
            self.feat_mean, self.feat_std = self.feat_mean.to(self.device), self.feat_std.to(self.device)
        return self

    def summary(self) -> dict[str, float]:
        self._check_fitted()
        out = {"projector_params": float(sum(p.numel() for p in self.projector.parameters()))}
        if self.curves.get("train_loss"):
            out["final_train_loss"] = float(sum(self.curves["train_loss"][-20:]) / len(self.curves["train_loss"][-20:]))
        return out
