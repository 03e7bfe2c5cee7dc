"""SPG, Sparse-Projected Guides: zero-shot detection with guides built from a sparse dictionary.

Trained once on an *auxiliary* labelled dataset (images with defect masks), applied to categories it
has never seen. Stage 1 learns a TopK sparse autoencoder on auxiliary patch features: codes
z = TopK(ReLU(W x)) (non-negative, no bias), reconstruction z D with unit-norm dictionary rows D, tied
initialisation, MSE + AuxK (dead latents learn to reconstruct the residual). Stage 2 learns four
non-negative sparse codes c over the frozen dictionary, giving guides g = c D: global normal/anomaly
(g0, g1) compared with the image's global descriptor (cross-entropy on image labels), and local
normal/anomaly (g2, g3) compared with each patch (focal + dice on masks), + L1 on c; EMA of c.
A patch's score is p(anomalous) = softmax(cos(patch, [g2, g3]) / T)[1]; the image score is the map's max.
Because the guides are sparse combinations of dictionary atoms, the atoms with the largest anomaly
coefficients say what "anomalous" means to the model (``report``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from adreg.backbones.base import Features
from adreg.errors import ConfigError
from adreg.methods.base import AnomalyMethod


@dataclass
class Auxiliary:
    """Labelled auxiliary training data: features, image labels (N,), patch-grid masks (N, h, w) in [0, 1]."""

    features: Features
    labels: torch.Tensor
    masks: torch.Tensor
    source: str = ""


def patch_tokens(features: Features) -> torch.Tensor:
    """(N, h*w, C): the layers concatenated per patch."""
    fmap = features.combined("concat")
    return fmap.flatten(2).transpose(1, 2)


def global_tokens(features: Features) -> torch.Tensor:
    """(N, C): per-layer global descriptors concatenated (same width as the patch tokens)."""
    return torch.cat(features.globals, dim=1)


class TopKSAE(torch.nn.Module):
    def __init__(self, dim: int, n_atoms: int, k: int):
        super().__init__()
        d = F.normalize(torch.randn(n_atoms, dim), dim=1)
        self.dictionary = torch.nn.Parameter(d.clone())  # (n_atoms, dim), rows kept unit-norm
        self.encoder = torch.nn.Parameter(d.clone())  # tied initialisation: W = D
        self.k = k

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x @ self.encoder.T)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        a = self.pre(x)
        top = a.topk(self.k, dim=-1)
        return torch.zeros_like(a).scatter_(-1, top.indices, top.values)

    def forward(self, x):
        z = self.encode(x)
        return z @ self.dictionary, z

    @torch.no_grad()
    def renorm(self) -> None:
        self.dictionary.data = F.normalize(self.dictionary.data, dim=1)


def focal_loss(p: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    pt = torch.where(target > 0.5, p, 1 - p)
    return (-(1 - pt) ** gamma * pt.log()).mean()


def dice_loss(p: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inter = (p * target).sum()
    return 1 - (2 * inter + 1) / (p.sum() + target.sum() + 1)


class SPG(AnomalyMethod):
    name = "spg"
    needs_auxiliary = True  # the detector passes an Auxiliary labelled set to fit()
    default_top_fraction = 0.0  # image score = max of the map, as in the paper

    def __init__(self, aux: str = "mtd", n_atoms: int = 1024, k: int = 16, sae_epochs: int = 10,
                 sae_tokens: int = 200_000, sae_lr: float = 1e-3, aux_k: int = 64, guide_epochs: int = 15,
                 guide_lr: float = 0.01, temperature: float = 0.07, l1: float = 1e-3, ema: float = 0.999,
                 batch_images: int = 8, patch_center: str = "aux", seed: int = 0):
        if k < 1 or n_atoms < k:
            raise ConfigError(f"need 1 <= k <= n_atoms, got k={k}, n_atoms={n_atoms}")
        if patch_center not in ("aux", "image"):
            raise ConfigError(f"patch_center must be 'aux' or 'image', got {patch_center!r}")
        super().__init__(aux=aux, n_atoms=int(n_atoms), k=int(k), sae_epochs=int(sae_epochs),
                         sae_tokens=int(sae_tokens), sae_lr=float(sae_lr), aux_k=int(aux_k),
                         guide_epochs=int(guide_epochs), guide_lr=float(guide_lr), temperature=float(temperature),
                         l1=float(l1), ema=float(ema), batch_images=int(batch_images), patch_center=patch_center,
                         seed=int(seed))

    def progress_units(self, n_views: int) -> int:
        return self.params["sae_epochs"] + self.params["guide_epochs"]

    # -- stage 1 ----------------------------------------------------------------------------------
    def _train_sae(self, tokens: torch.Tensor, progress=None) -> None:
        p = self.params
        gen = torch.Generator().manual_seed(p["seed"])
        torch.manual_seed(p["seed"])
        if tokens.shape[0] > p["sae_tokens"]:
            tokens = tokens[torch.randperm(tokens.shape[0], generator=gen)[: p["sae_tokens"]]]
        self.token_mean = tokens.mean(0)
        self.token_scale = (tokens - self.token_mean).norm(dim=1).mean().clamp_min(1e-6)
        x_all = (tokens - self.token_mean) / self.token_scale
        sae = TopKSAE(x_all.shape[1], p["n_atoms"], p["k"])
        opt = torch.optim.Adam(sae.parameters(), lr=p["sae_lr"])
        last_fired = torch.zeros(p["n_atoms"], dtype=torch.long)
        step, batch = 0, 4096
        losses = []
        for _ in range(p["sae_epochs"]):
            order = torch.randperm(x_all.shape[0], generator=gen)
            epoch_loss = 0.0
            for start in range(0, x_all.shape[0], batch):
                x = x_all[order[start:start + batch]]
                x_hat, z = sae(x)
                loss = F.mse_loss(x_hat, x)
                fired = (z > 0).any(0)
                step += 1
                last_fired[fired] = step
                dead = step - last_fired > 200  # no activation in the last 200 batches
                if dead.any():  # AuxK: the dead latents' top-k_aux reconstruct the residual
                    a = sae.pre(x) * dead
                    kk = min(p["aux_k"], int(dead.sum()))
                    top = a.topk(kk, dim=-1)
                    z_aux = torch.zeros_like(a).scatter_(-1, top.indices, top.values)
                    loss = loss + 1 / 32 * F.mse_loss(z_aux @ sae.dictionary, (x - x_hat).detach())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sae.renorm()
                epoch_loss += loss.item() * x.shape[0]
            losses.append(epoch_loss / x_all.shape[0])
            if progress is not None:
                progress(1, stage="sae", loss=losses[-1])
        self.curves["sae_loss"] = losses
        self.sae = sae.eval().requires_grad_(False)
        with torch.no_grad():
            counts = torch.zeros(p["n_atoms"])
            for start in range(0, x_all.shape[0], 16384):
                counts += (sae.encode(x_all[start:start + 16384]) > 0).float().sum(0)
        self.alive = counts > 0

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.token_mean.to(x.device)) / self.token_scale.to(x.device)

    def _patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, P, C) patch tokens as the guides see them. ``patch_center='image'`` subtracts each image's
        own mean patch first: a label-free adaptation to a new domain (what is unusual *in this image*)."""
        if self.params["patch_center"] == "image":
            tokens = tokens - tokens.mean(1, keepdim=True) + self.token_mean.to(tokens.device)
        return self._normalise(tokens)

    # -- stage 2 ----------------------------------------------------------------------------------
    def guides(self, codes: torch.Tensor | None = None) -> torch.Tensor:
        c = F.relu(self.codes if codes is None else codes) * self.alive.to(self.dictionary.device).float()
        return c @ self.dictionary  # (4, C)

    def _logits(self, g: torch.Tensor, x: torch.Tensor, pair: slice) -> torch.Tensor:
        return F.cosine_similarity(x.unsqueeze(-2), g[pair], dim=-1) / self.params["temperature"]

    def _train_guides(self, aux: Auxiliary, progress=None) -> None:
        p = self.params
        gen = torch.Generator().manual_seed(p["seed"] + 1)
        patches = self._patches(patch_tokens(aux.features))
        glob = self._normalise(global_tokens(aux.features))
        masks = aux.masks.flatten(1).float()
        labels = aux.labels.long()
        codes = torch.nn.Parameter(torch.rand(4, p["n_atoms"], generator=gen) * 0.01)
        ema = codes.detach().clone()
        opt = torch.optim.Adam([codes], lr=p["guide_lr"])
        losses = []
        n = patches.shape[0]
        for _ in range(p["guide_epochs"]):
            order = torch.randperm(n, generator=gen)
            total = 0.0
            for start in range(0, n, p["batch_images"]):
                idx = order[start:start + p["batch_images"]]
                g = self.guides(codes)
                det = F.cross_entropy(self._logits(g, glob[idx], slice(0, 2)), labels[idx])
                prob = self._logits(g, patches[idx], slice(2, 4)).softmax(-1)[..., 1]
                seg = focal_loss(prob, masks[idx]) + dice_loss(prob, masks[idx])
                loss = det + seg + p["l1"] * F.relu(codes).sum(1).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    ema.mul_(p["ema"]).add_(codes.detach(), alpha=1 - p["ema"])
                total += loss.item() * len(idx)
            losses.append(total / n)
            if progress is not None:
                progress(1, stage="guides", loss=losses[-1])
        self.curves["guide_loss"] = losses
        # EMA with 0.999 over few steps would stay near the start: use it once it has warmed up
        steps = p["guide_epochs"] * -(-n // p["batch_images"])
        self.codes = (ema if steps * (1 - p["ema"]) >= 1 else codes.detach()).clone()

    def fit(self, features: Features, progress=None, synthetic=None, auxiliary: Auxiliary | None = None) -> "SPG":
        """Zero-shot: ``features`` (the target's shots) are not used; everything is learned on ``auxiliary``."""
        if auxiliary is None:
            raise ConfigError("SPG learns from an auxiliary labelled dataset (param aux=mtd|bottle|<folder>)")
        tokens = patch_tokens(auxiliary.features)
        if self.params["patch_center"] == "image":
            tokens = tokens - tokens.mean(1, keepdim=True) + tokens.mean((0, 1))
        self._train_sae(tokens.reshape(-1, tokens.shape[-1]), progress)
        self.dictionary = self.sae.dictionary.detach()
        self.encoder = self.sae.encoder.detach()
        self._train_guides(auxiliary, progress)
        self.aux_source = auxiliary.source
        self._fitted = True
        return self

    def update_chunks(self, chunks, progress=None) -> dict:
        """Chunked updates: nothing to merge (see ``update``), so each chunk is counted and dropped; the
        fit itself does not chunk (it learns from the auxiliary dataset, all at once)."""
        self._check_updatable()
        views = 0
        for chunk in chunks:
            views += len(chunk)
            if progress is not None:
                progress(len(chunk))
        return {"method": self.name, "what": "zero-shot: state unchanged; only the threshold is recalibrated",
                "state_changed": False, "n_views_seen": views}

    def update(self, features: Features, progress=None, synthetic=None) -> dict:
        """Zero-shot: the target's good images are not part of the state (the dictionary, guides and token
        normalisation all come from the auxiliary dataset; ``patch_center='image'`` centres each image on
        its own mean at scoring time), so an update leaves the state unchanged."""
        self._check_updatable()
        if progress is not None:
            progress(len(features))
        return {"method": self.name, "what": "zero-shot: state unchanged; only the threshold is recalibrated",
                "state_changed": False, "n_views_seen": len(features)}

    @torch.inference_mode()
    def score_patches(self, features: Features) -> torch.Tensor:
        self._check_fitted()
        fmap = features.combined("concat").to(self.device, torch.float32)
        b, _, h, w = fmap.shape
        x = self._patches(fmap.flatten(2).transpose(1, 2))
        prob = self._logits(self.guides(), x, slice(2, 4)).softmax(-1)[..., 1]
        return prob.reshape(b, h, w)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return {"dictionary": self.dictionary, "encoder": self.encoder, "alive": self.alive.to(torch.uint8),
                "codes": self.codes, "token_mean": self.token_mean, "token_scale": self.token_scale.reshape(1)}

    def load_state_tensors(self, state: dict[str, torch.Tensor]) -> None:
        self.dictionary, self.encoder = state["dictionary"].float(), state["encoder"].float()
        self.alive = state["alive"].bool()
        self.codes = state["codes"].float()
        self.token_mean, self.token_scale = state["token_mean"].float(), state["token_scale"].float().reshape(())
        self._fitted = True

    def to(self, device) -> "SPG":
        self.device = torch.device(device)
        if self._fitted:
            for key in ("dictionary", "encoder", "alive", "codes", "token_mean", "token_scale"):
                setattr(self, key, getattr(self, key).to(self.device))
        return self

    def report(self, top: int = 10) -> dict:
        """The atoms that drive each guide, largest coefficients first (the method's interpretability)."""
        self._check_fitted()
        c = (F.relu(self.codes) * self.alive.float()).cpu()
        names = ["global_normal", "global_anomaly", "local_normal", "local_anomaly"]
        out = {"alive_atoms": int(self.alive.sum()), "n_atoms": int(self.alive.numel()), "guides": {}}
        for i, name in enumerate(names):
            vals, idx = c[i].topk(top)
            out["guides"][name] = {"nonzero": int((c[i] > 1e-6).sum()),
                                   "top_atoms": [{"atom": int(a), "coefficient": round(float(v), 5)}
                                                 for a, v in zip(idx, vals) if v > 0]}
        anomaly_only = set(a["atom"] for a in out["guides"]["local_anomaly"]["top_atoms"]) - \
            set(a["atom"] for a in out["guides"]["local_normal"]["top_atoms"])
        out["atoms_driving_local_anomaly_only"] = sorted(anomaly_only)
        return out

    def summary(self) -> dict[str, float]:
        self._check_fitted()
        c = F.relu(self.codes) * self.alive.float()
        return {"alive_atoms": float(self.alive.sum()), "guide_nonzero_mean": float((c > 1e-6).sum(1).float().mean())}
