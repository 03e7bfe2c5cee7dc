"""The detector: backbone + method + post-processing + threshold, fitted, saved and loaded as one.

This is the engine both the CLI and the pyfunc model use, so in-process and served scores come from
the same code. Its saved form is a folder of JSON + safetensors: no pickles, readable anywhere.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import adreg
from adreg.augment import adaptive_copies, augment_shots, iter_views, parse_augmentations
from adreg.backbones import Backbone, build_backbone
from adreg.backbones.export import EXPORT_DIR, ExportedBackbone, export_precision, resolve_runtime
from adreg import integrity
from adreg.errors import ConfigError
from adreg.images import load_image
from adreg.methods import AnomalyMethod, build_method
from adreg.options import AUG_VIEWS
from adreg.postprocess import anomaly_maps, image_scores
from adreg.progress import Bar
from adreg.thresholds import Threshold

FORMAT_VERSION = 1
CONFIG_FILE, STATE_FILE, BUNDLED_BACKBONE_DIR = "config.json", "state.safetensors", "backbone"
#: views augmented, extracted and merged into the method per chunk in ``fit`` / ``update``: peak memory is
#: the method's state (bank budget) + one chunk of views and features, whatever the number of goods
CHUNK_VIEWS = 64


def decode(item) -> Image.Image:
    """A PIL image as it is; a path (str or Path) decoded with ``adreg.images.load_image``."""
    return item if isinstance(item, Image.Image) else load_image(item)


def resolve_device(device: str | None) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without it is an error, not a silent fallback."""
    device = (device or "auto").lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but no CUDA GPU is available; use 'cpu' or 'auto'")
    if device != "cpu" and not device.startswith("cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return torch.device(device)


def synthesize_cutpaste(views: Sequence[Image.Image], seed: int) -> list[Image.Image]:
    """One CutPaste-corrupted copy of each view (alternating patch and scar), reproducible from ``seed``."""
    import random

    from adreg.cutpaste import cutpaste, foreground_mask

    rng = random.Random(seed + 7919)
    return [cutpaste(v, rng, "normal" if i % 2 == 0 else "scar", foreground_mask(v))[0] for i, v in enumerate(views)]


def resolve_auxiliary_dir(aux: str) -> Path:
    """``aux`` is a bundled dataset name (mtd, bottle, ...) or a folder."""
    from adreg.data import default_category_dir

    path = default_category_dir(aux) or Path(aux)
    if not path.is_dir():
        raise ConfigError(f"auxiliary dataset {aux!r} is neither a bundled dataset (mtd, bottle) nor a folder")
    return path


def load_auxiliary(aux: str, backbone: Backbone, batch_size: int, show_progress: bool):
    """Features, image labels and patch-grid defect fractions of an auxiliary labelled dataset: its test
    set (good and defective images with masks) and its validation images."""
    import torch.nn.functional as F

    from adreg.data import load_mask, resolve_dataset
    from adreg.images import load_image
    from adreg.methods.spg import Auxiliary

    data = resolve_dataset(resolve_auxiliary_dir(aux))
    samples = data.test + data.val
    if not any(s.mask_path is not None for s in samples):
        raise ConfigError(f"auxiliary dataset {aux!r} has no defect masks to learn from")
    bar = Bar(len(samples), f"features (auxiliary {aux})", show_progress)
    feats = backbone.extract([load_image(s.path) for s in samples], batch_size, progress=bar)
    bar.close()
    size = backbone.image_size
    masks = torch.from_numpy(np.stack([load_mask(s, (size, size)) for s in samples]).astype(np.float32))
    grid = F.adaptive_avg_pool2d(masks[:, None], feats.grid)[:, 0]
    labels = torch.tensor([s.label for s in samples])
    return Auxiliary(feats, labels, grid, source=data.source)


@dataclass
class Prediction:
    """Image scores (N,) and anomaly maps (N, S, S) at the model's input resolution."""

    scores: np.ndarray
    maps: np.ndarray


class AnomalyDetector:
    """Fit on a few good images, score new ones; ``threshold`` is set by calibration (adreg.thresholds)."""

    def __init__(self, backbone: Backbone, method: AnomalyMethod, sigma: float = 4.0, top_fraction: float = 0.01,
                 augment: str | Sequence[str] = "rotate", aug_count: int = 30, seed: int = 0, batch_size: int = 8,
                 aug_views: int = AUG_VIEWS):
        if int(aug_count) < 0 or int(aug_views) < 0:
            raise ConfigError(f"aug_count and aug_views must be >= 0, got {aug_count} and {aug_views}")
        self.backbone = backbone
        self.method = method
        self.sigma = float(sigma)
        self.top_fraction = float(top_fraction)
        self.augment = parse_augmentations(augment)
        self.aug_count = int(aug_count)
        self.aug_views = int(aug_views)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.chunk_views = CHUNK_VIEWS  # runtime only (not saved): results do not depend on it without a budget
        self.threshold: Threshold | None = None
        self.normal_scores: np.ndarray | None = None  # held-out normal calibration scores, sorted (set by calibration)
        self.fit_info: dict = {}
        self._bundled_backbone: Path | None = None
        self._exported: Path | None = None  # exported backbone files (adreg.backbones.export), kept on save

    # -- fitting and scoring -------------------------------------------------------------------
    @property
    def backbone_batch(self) -> int:
        """Images per backbone call: ``batch_size`` on a GPU, one on the CPU, where eager torch runs a batch
        of 8 2-3x slower per image than one image at a time (measured on 2 cores: 19 vs 45-70 ms/image on Lite0).
        Features do not depend on it, so neither do scores. An exported backbone sets its own ``cpu_batch``
        (OpenVINO keeps two single-image requests in flight)."""
        if self.backbone.device.type == "cuda":
            return self.batch_size
        return min(self.batch_size, getattr(self.backbone, "cpu_batch", 1))

    def extract(self, images: Sequence[Image.Image], progress=None):
        """Backbone features of PIL images, ``backbone_batch`` at a time (float32, on the CPU)."""
        return self.backbone.extract(images, self.backbone_batch, progress=progress)

    def aug_copies(self, n_real: int) -> int:
        """Augmented copies per image when the model will hold ``n_real`` real goods (``adaptive_copies``)."""
        return adaptive_copies(self.aug_count, self.aug_views, n_real) if self.augment else 0

    def _chunks(self, images: Sequence, copies: int, seed: int, bar, timer: dict) -> Iterator:
        """Features of the views of ``images`` (decoded one at a time, each followed by its ``copies``
        augmented copies; ``Features.real`` marks which are which), ``chunk_views`` views per chunk;
        extraction seconds add up in ``timer``."""
        views, real = [], []

        def flush():
            t0 = time.perf_counter()
            feats = self.extract(views, progress=bar)
            feats.real = torch.tensor(real, dtype=torch.bool)
            timer["seconds"] = timer.get("seconds", 0.0) + time.perf_counter() - t0
            views.clear()
            real.clear()
            return feats

        for k, view in enumerate(iter_views(images, self.augment, copies, seed, decode)):
            views.append(view)
            real.append(k % (1 + copies) == 0)  # iter_views: each image, then its copies (none without augment)
            if len(views) >= self.chunk_views:
                yield flush()
        if views:
            yield flush()

    def _streams_fit(self) -> bool:
        """Whether ``fit`` can feed the method chunk by chunk (no CutPaste pairs, no auxiliary dataset)."""
        return self.method.synthesis is None and not self.method.needs_auxiliary

    def fit(self, images: Sequence, show_progress: bool = True) -> "AnomalyDetector":
        """Augment the shots (PIL images or paths, decoded lazily), extract their features and fit the method.

        Chunked (``CHUNK_VIEWS`` views at a time through ``AnomalyMethod.fit_chunks``) for every method
        without CutPaste or an auxiliary dataset, so memory does not grow with the shots; FoundAD and SPG
        extract all views at once. Copies per shot: ``aug_copies(len(images))``."""
        if not images:
            raise ConfigError("no training images")
        t0 = time.perf_counter()
        copies = self.aug_copies(len(images))
        n_views = len(images) * (1 + copies)
        torch.manual_seed(self.seed)
        if self._streams_fit():
            timer: dict = {}
            bar = Bar(n_views, f"fitting {self.method.name}", show_progress, unit="view")
            self.method.to(self.backbone.device).fit_chunks(self._chunks(images, copies, self.seed, bar, timer))
            bar.close()
            self.method.to(self.backbone.device)
            t2 = time.perf_counter()
            t1 = t0 + timer.get("seconds", 0.0)
        else:
            train = augment_shots([decode(i) for i in images], self.augment, copies, self.seed)
            bar = Bar(len(train), "features (fit)", show_progress)
            feats = self.extract(train, progress=bar)
            bar.close()
            synthetic = None
            if self.method.synthesis == "cutpaste":
                corrupted = synthesize_cutpaste(train, self.seed)
                bar = Bar(len(corrupted), "features (CutPaste)", show_progress)
                synthetic = self.extract(corrupted, progress=bar)
                bar.close()
            auxiliary = None
            if self.method.needs_auxiliary:
                auxiliary = load_auxiliary(self.method.params["aux"], self.backbone, self.batch_size, show_progress)
            t1 = time.perf_counter()
            bar = Bar(self.method.progress_units(len(train)), f"fitting {self.method.name}", show_progress)
            self.method.to(self.backbone.device).fit(feats, progress=bar, synthetic=synthetic, auxiliary=auxiliary)
            bar.close()
            self.method.to(self.backbone.device)  # state computed on the CPU (e.g. PCA) joins the backbone
            t2 = time.perf_counter()
        self.fit_info = {"n_shots": len(images), "n_train_images": n_views, "aug_copies": copies,
                         "feature_seconds": t1 - t0, "method_fit_seconds": t2 - t1, "fit_seconds": t2 - t0}
        return self

    def update_seed(self) -> int:
        """Seed of the next update's augmentation and CutPaste: differs from the fit's (``seed``) and from
        every earlier update's, since the number of images seen so far only grows."""
        return self.seed + 1_000_003 * int(self.fit_info.get("n_shots", 0))

    def update(self, images: Sequence, show_progress: bool = True) -> dict:
        """Grow the fitted model with more good images (PIL images or paths, decoded lazily): augment them
        with this detector's own settings (a seed of their own, see ``update_seed``; copies per image
        ``aug_copies(goods so far + new)``, so many real goods get few synthetic copies), extract their
        features and let the method grow its state chunk by chunk (``AnomalyMethod.update_chunks``;
        ``CHUNK_VIEWS`` views per chunk: memory = the method's state + one chunk, time per good flat).
        CutPaste methods (FoundAD) extract all new views and their CutPaste views at once. The threshold
        is NOT recalibrated here. Returns the method's report with ``n_images``, ``n_views``,
        ``aug_copies`` and ``seconds`` added."""
        if not images:
            raise ConfigError("no images to update with")
        if not self.method.is_fitted:
            raise ConfigError("cannot update a detector that is not fitted; fit it first")
        t0 = time.perf_counter()
        seed = self.update_seed()
        copies = self.aug_copies(int(self.fit_info.get("n_shots", 0)) + len(images))
        n_views = len(images) * (1 + copies)
        torch.manual_seed(seed)
        if self.method.synthesis is None:
            timer: dict = {}
            bar = Bar(n_views, f"updating {self.method.name}", show_progress, unit="view")
            report = self.method.to(self.backbone.device).update_chunks(
                self._chunks(images, copies, seed, bar, timer))
            bar.close()
            t1 = t0 + timer.get("seconds", 0.0)
        else:
            train = augment_shots([decode(i) for i in images], self.augment, copies, seed)
            bar = Bar(len(train), "features (update)", show_progress)
            feats = self.extract(train, progress=bar)
            bar.close()
            corrupted = synthesize_cutpaste(train, seed)
            bar = Bar(len(corrupted), "features (CutPaste)", show_progress)
            synthetic = self.extract(corrupted, progress=bar)
            bar.close()
            t1 = time.perf_counter()
            bar = Bar(self.method.update_progress_units(len(train)), f"updating {self.method.name}", show_progress)
            report = self.method.to(self.backbone.device).update(feats, progress=bar, synthetic=synthetic)
            bar.close()
        self.method.to(self.backbone.device)
        t2 = time.perf_counter()
        info = self.fit_info
        info["n_shots"] = int(info.get("n_shots", 0)) + len(images)
        info["n_train_images"] = int(info.get("n_train_images", 0)) + n_views
        info["n_updates"] = int(info.get("n_updates", 0)) + 1
        info.update({"update_seconds": t2 - t0, "update_feature_seconds": t1 - t0,
                     "update_method_seconds": t2 - t1, "update_seed": seed, "update_aug_copies": copies})
        return {**report, "n_images": len(images), "n_views": n_views, "aug_copies": copies, "seconds": t2 - t0}

    @torch.inference_mode()
    def predict(self, images: Sequence, show_progress: bool = False) -> Prediction:
        """Scores and smoothed maps for PIL images or image paths (decoded a batch at a time), in batches."""
        parts = []
        bar = Bar(len(images), "scoring", show_progress)
        for start in range(0, len(images), self.batch_size):
            chunk = [decode(i) for i in images[start:start + self.batch_size]]
            parts.append(self.predict_features(self.extract(chunk)))
            bar(len(chunk))
        bar.close()
        size = self.backbone.image_size
        if not parts:
            return Prediction(np.zeros(0, np.float32), np.zeros((0, size, size), np.float32))
        return Prediction(np.concatenate([p.scores for p in parts]), np.concatenate([p.maps for p in parts]))

    @torch.inference_mode()
    def predict_features(self, feats) -> Prediction:
        """Scores and maps from already extracted backbone features (lets several detectors share one
        backbone pass, as the multi-category router does)."""
        m = anomaly_maps(self.method.score_patches(feats.to(self.backbone.device)), self.backbone.image_size,
                         self.sigma)
        return Prediction(image_scores(m, self.top_fraction).cpu().numpy(), m.cpu().numpy())

    def set_normal_scores(self, scores) -> None:
        """The held-out normal images' scores that ``normal_percentile`` ranks against (from calibration)."""
        self.normal_scores = np.sort(np.asarray(scores, dtype=np.float64)) if len(scores) else None

    def normal_percentile(self, scores) -> np.ndarray:
        """0-100: the share of this version's held-out normal calibration scores strictly below each score.

        A score's meaning in units every version shares: alarms and dashboards built on it survive a swap to
        a version whose raw scores live on another scale. NaN when the detector has no calibration scores."""
        scores = np.asarray(scores, dtype=np.float64)
        if self.normal_scores is None or not len(self.normal_scores):
            return np.full(scores.shape, np.nan)
        return 100.0 * np.searchsorted(self.normal_scores, scores, side="left") / len(self.normal_scores)

    def to(self, device: str | torch.device) -> "AnomalyDetector":
        device = resolve_device(device) if isinstance(device, str) else device
        self.backbone.to(device)
        self.method.to(device)
        return self

    # -- persistence ----------------------------------------------------------------------------
    def config(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "adreg_version": adreg.__version__,
            "method": self.method.name,
            "method_params": self.method.get_params(),
            "backbone": self.backbone.spec(),
            "postprocess": {"sigma": self.sigma, "top_fraction": self.top_fraction},
            "augmentation": {"augment": list(self.augment) or ["none"], "aug_count": self.aug_count,
                             "aug_views": self.aug_views, "seed": self.seed},
            "batch_size": self.batch_size,
            "threshold": None if self.threshold is None else vars(self.threshold),
            "normal_scores": None if self.normal_scores is None else [float(v) for v in self.normal_scores],
            "fit_info": self.fit_info,
        }

    def save(self, directory: str | Path, bundle_backbone: bool = True) -> Path:
        """Write config.json + state.safetensors (+ a local HF backbone folder, so the model is whole)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cfg = self.config()
        source = getattr(self.backbone, "source", None)
        local = self._bundled_backbone or (Path(source) if source and Path(source).is_dir() else None)
        if bundle_backbone and local is not None:
            shutil.copytree(local, directory / BUNDLED_BACKBONE_DIR, dirs_exist_ok=True)
            cfg["backbone"]["name"] = "hf:" + BUNDLED_BACKBONE_DIR
            cfg["backbone"]["bundled"] = True
        if self._exported is not None and self._exported.resolve() != (directory / EXPORT_DIR).resolve():
            shutil.copytree(self._exported, directory / EXPORT_DIR, dirs_exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.method.state_tensors().items()}
        save_file(state, str(directory / STATE_FILE), metadata={"method": self.method.name})
        (directory / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str = "auto", precision: str | None = None,
             backbones: dict[str, Backbone] | None = None, runtime: str | None = None,
             threads: int = 0, verified: bool = False) -> "AnomalyDetector":
        """Load a saved detector. ``precision`` overrides the backbone's (fp16/bf16 on CUDA); detectors
        loaded with the same ``backbones`` dict share one instance per identical backbone spec.
        ``runtime`` torch / onnxruntime / openvino runs the backbone (None: the runtime the folder was
        exported for, torch when it has no export); ``threads`` > 0 sets the exported runtime's CPU threads.
        A folder with an integrity manifest is checked against it unless ``verified`` (the caller just did,
        e.g. ``adreg.store.download_detector``)."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise ConfigError(f"{directory} is not a saved adreg detector (no {CONFIG_FILE})")
        if not verified and integrity.has_manifest(directory):  # tamper evidence: refuse changed files
            integrity.verify(directory)
        cfg = json.loads((directory / CONFIG_FILE).read_text())
        if cfg.get("format_version", 0) > FORMAT_VERSION:
            raise ConfigError(f"{directory} was saved by a newer adreg (format {cfg['format_version']})")
        spec = dict(cfg["backbone"])
        bundled = spec.pop("bundled", False)
        if bundled:
            spec["name"] = "hf:" + str(directory / BUNDLED_BACKBONE_DIR)
        if precision:
            spec["precision"] = precision
        runtime, device = resolve_runtime(directory, runtime, device, threads)
        key = {**spec, "runtime": runtime}
        if runtime != "torch" and export_precision(directory) == "int8":  # not the f32 export's instance
            key["export_precision"] = "int8"
        key = json.dumps(key, sort_keys=True)
        if backbones is not None and key in backbones:
            backbone = backbones[key]
        else:
            backbone = (build_backbone(**spec).to(resolve_device(device)) if runtime == "torch"
                        else ExportedBackbone(directory, runtime, threads))
            if backbones is not None:
                backbones[key] = backbone
        method = build_method(cfg["method"], **cfg["method_params"])
        method.load_state_tensors(load_file(str(directory / STATE_FILE)))
        aug = cfg["augmentation"]
        det = cls(backbone, method, augment=aug["augment"], aug_count=aug["aug_count"], seed=aug["seed"],
                  aug_views=aug["aug_views"], batch_size=cfg.get("batch_size", 8), **cfg["postprocess"])
        if bundled:
            det._bundled_backbone = directory / BUNDLED_BACKBONE_DIR
        if (directory / EXPORT_DIR).is_dir():
            det._exported = directory / EXPORT_DIR
        if cfg.get("threshold"):
            det.threshold = Threshold(**cfg["threshold"])
        if cfg.get("normal_scores"):
            det.set_normal_scores(cfg["normal_scores"])
        det.fit_info = cfg.get("fit_info", {})
        return det.to(resolve_device(device))
