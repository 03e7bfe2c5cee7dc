"""The search space of ``adreg tune``: data, in one place, overridable from a file (``--space``) or Python.

A space is a list of **stages**. A stage's ``grid`` maps dimension names to lists of options; its candidates
are the cross product of the options. An option is either a value of the ``FitOptions`` field the dimension is
named after (``method: [subspace, rad]``) or a dict of several fields that only make sense together
(``augmentation: [{augment: rotate, aug_count: 30}, ...]``). A later stage with ``best: N`` is crossed with the
N best fits of the stages before it, so it refines what won instead of multiplying the whole space out.
``aggregation`` lists the image scores every fit is ranked with (``top_fraction``: the mean of the top share of
map pixels, 0 = the maximum): they re-read the same anomaly maps, so they cost no fit.

The default (``DEFAULT_SPACE``) is what the Magnetic-Tile-Defect study found to matter
(docs/guides/data.md): stage 1 crosses the augmentation with the method; stage 2 tries other blocks, the
bigger backbone and a larger input on the best fit of stage 1. ``python -m adreg.tuning`` prints it
as YAML, a starting point for a file of one's own.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from adreg.errors import ConfigError, first_line

#: fields a space may set: the fit's settings, not its data, shots, device or batching
TUNABLE = ("method", "params", "backbone", "layers", "image_size", "augment", "aug_count", "aug_views", "sigma",
           "precision")
#: blocks of the offline backbones, so a layer set is checked before anything is fitted
BACKBONE_BLOCKS = {"efficientnet-lite0": 16, "efficientnet-lite2": 21}
#: methods a space may search: fitted on the product's goods (FoundAD trains for minutes, SPG is zero-shot)
SEARCHABLE_METHODS = ("subspace", "rad", "knn", "foundad")

DEFAULT_SPACE: dict = {
    "aggregation": [0.01, 0.001, 0.0],
    "stages": [
        {"name": "method x augmentation",
         # augmentation outer, method inner: the three methods share each augmentation's backbone pass, and
         # a time budget cuts augmentations, not methods; the first candidate is adreg fit's default
         "grid": {"augmentation": [{"augment": "rotate", "aug_count": 30},
                                   {"augment": "hflip,vflip", "aug_count": 8},
                                   {"augment": "none", "aug_count": 0}],
                  "method": ["subspace", "rad", "knn"]}},
        {"name": "features", "best": 1,
         "grid": {"features": [{"backbone": "efficientnet-lite0", "layers": [7, 10]},
                               {"backbone": "efficientnet-lite0", "image_size": 448},
                               {"backbone": "efficientnet-lite2", "layers": [5, 12]},
                               {"backbone": "efficientnet-lite2", "layers": [10, 14]}]}},
    ],
}


@dataclass(frozen=True)
class Candidate:
    """One fit of the search: ``settings`` (FitOptions fields) and the stage it belongs to. ``key`` names the
    fit (same settings, same key, on every machine); ``features_key`` names its preprocessing (backbone, layers,
    input size, augmentation), which candidates with the same key share one backbone pass for."""

    settings: dict
    stage: int

    @property
    def key(self) -> str:
        return _digest(self.settings)

    @property
    def features_key(self) -> str:
        return _digest({k: self.settings.get(k) for k in ("backbone", "layers", "image_size", "precision",
                                                           "augment", "aug_count", "aug_views")})

    def label(self) -> str:
        """A short human name: method, backbone, layers, size, augmentation."""
        s = self.settings
        parts = [s.get("method", "subspace"), s.get("backbone", "efficientnet-lite0").replace("efficientnet-", "")]
        if s.get("layers"):
            parts.append("blocks " + "+".join(str(i) for i in s["layers"]))
        if s.get("image_size"):
            parts.append(f"{s['image_size']}px")
        aug = s.get("augment", "rotate")
        parts.append(aug if aug == "none" else f"{aug} x{s.get('aug_count', 30)}")
        if s.get("params"):
            parts.append(",".join(f"{k}={v}" for k, v in sorted(s["params"].items())))
        return " / ".join(parts)


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Stage:
    name: str
    grid: dict
    best: int | None = None  # cross with the N best fits so far (None: stand alone)

    def options(self) -> list[dict]:
        """The cross product of the grid, each a dict of settings."""
        dims = [[_as_settings(name, opt) for opt in options] for name, options in self.grid.items()]
        return [_merge(combo) for combo in itertools.product(*dims)] if dims else [{}]


def _as_settings(name: str, option) -> dict:
    if isinstance(option, dict):
        return dict(option)
    field_name = {"augmentation": "augment", "features": "backbone"}.get(name, name)
    return {field_name: option}


def _merge(parts) -> dict:
    out: dict = {}
    for part in parts:
        out.update(copy.deepcopy(part))
    return out


@dataclass
class SearchSpace:
    """Stages of candidates and the image-score aggregations each fit is ranked with (see the module doc)."""

    stages: list[Stage]
    aggregation: list[float] = field(default_factory=lambda: [0.01])
    source: str = "default"

    @classmethod
    def from_dict(cls, spec: dict, source: str = "given") -> "SearchSpace":
        """A space from its data form (``DEFAULT_SPACE``'s shape); ``ConfigError`` names what is wrong."""
        if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list) or not spec["stages"]:
            raise ConfigError(f"search space ({source}): expected a mapping with a non-empty 'stages' list")
        unknown = sorted(set(spec) - {"stages", "aggregation"})
        if unknown:
            raise ConfigError(f"search space ({source}): unknown key(s) {', '.join(unknown)}; "
                              "use 'stages' and 'aggregation'")
        stages = []
        for i, st in enumerate(spec["stages"]):
            if not isinstance(st, dict) or not isinstance(st.get("grid", {}), dict):
                raise ConfigError(f"search space ({source}): stage {i + 1} must be a mapping with a 'grid' mapping")
            bad = sorted(set(st) - {"name", "grid", "best"})
            if bad:
                raise ConfigError(f"search space ({source}): stage {i + 1} has unknown key(s) {', '.join(bad)}")
            best = st.get("best")
            if best is not None and (not isinstance(best, int) or best < 1 or i == 0):
                raise ConfigError(f"search space ({source}): stage {i + 1}: 'best' must be a positive integer, "
                                  "and the first stage has nothing before it to refine")
            for name, options in st.get("grid", {}).items():
                if not isinstance(options, list) or not options:
                    raise ConfigError(f"search space ({source}): stage {i + 1}: {name!r} needs a non-empty list")
            stages.append(Stage(str(st.get("name", f"stage {i + 1}")), dict(st.get("grid", {})), best))
        aggregation = spec.get("aggregation", [0.01])
        if (not isinstance(aggregation, list) or not aggregation
                or not all(isinstance(a, (int, float)) and 0 <= a < 1 for a in aggregation)):
            raise ConfigError(f"search space ({source}): 'aggregation' must list top fractions in [0, 1) "
                              "(0 = the maximum)")
        space = cls(stages, [float(a) for a in aggregation], source)
        for stage in space.stages:
            for settings in stage.options():
                check_settings(settings, source)
        return space

    @classmethod
    def load(cls, path: str | Path) -> "SearchSpace":
        """A space from a YAML or JSON file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"search space file {path} does not exist")
        import yaml

        try:
            spec = yaml.safe_load(path.read_text())
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"search space file {path} is not YAML or JSON: {first_line(exc)}") from None
        return cls.from_dict(spec, source=str(path))

    def to_dict(self) -> dict:
        return {"aggregation": list(self.aggregation),
                "stages": [{"name": s.name, "grid": s.grid, **({"best": s.best} if s.best else {})}
                           for s in self.stages]}

    def stage_candidates(self, index: int, base: dict, ranked: list[dict] = ()) -> list[Candidate]:
        """The candidates of stage ``index`` over ``base`` settings: its grid alone, or (``best``) its grid
        applied to each of the first ``best`` settings in ``ranked`` (the fits so far, best first)."""
        stage = self.stages[index]
        parents = [base] if not stage.best else list(ranked)[:stage.best]
        out, seen = [], set()
        for parent in parents:
            for option in stage.options():
                settings = normalise({**base, **parent, **option})
                cand = Candidate(settings, index)
                if cand.key not in seen:
                    seen.add(cand.key)
                    out.append(cand)
        return out

    def max_fits(self) -> int:
        """Fits the whole space asks for at most (stages with ``best`` counted at their full N)."""
        return sum(len(s.options()) * (s.best or 1) for s in self.stages)


def normalise(settings: dict) -> dict:
    """Settings with the defaults that change nothing made explicit, so equal fits have equal keys (layers of
    the backbone's default, image size 320 for the CNNs, no copies without augmentation)."""
    from adreg.backbones.efficientnet import DEFAULT_LAYERS

    s = copy.deepcopy(settings)
    backbone = s.get("backbone", "efficientnet-lite0")
    s["backbone"] = backbone
    if backbone in DEFAULT_LAYERS:
        s["layers"] = list(s.get("layers") or DEFAULT_LAYERS[backbone])
        s["image_size"] = int(s.get("image_size") or 320)
    if s.get("augment", "rotate") in ("none", ""):
        s["augment"], s["aug_count"] = "none", 0
    s.setdefault("params", {})
    return s


def check_settings(settings: dict, source: str = "given") -> None:
    """``ConfigError`` when ``settings`` could not make a fit: an unknown field, method or parameter, a layer
    the backbone does not have, an unknown augmentation."""
    from adreg.augment import parse_augmentations
    from adreg.methods import build_method

    unknown = sorted(set(settings) - set(TUNABLE))
    if unknown:
        raise ConfigError(f"search space ({source}): {', '.join(unknown)} cannot be searched; "
                          f"a candidate may set {', '.join(TUNABLE)} (top_fraction is the space's 'aggregation')")
    method = settings.get("method", "subspace")
    if method not in SEARCHABLE_METHODS:
        raise ConfigError(f"search space ({source}): method {method!r} cannot be searched; "
                          f"choose from {', '.join(SEARCHABLE_METHODS)}")
    build_method(method, **dict(settings.get("params") or {}))
    backbone = settings.get("backbone", "efficientnet-lite0")
    layers = settings.get("layers")
    if backbone in BACKBONE_BLOCKS and layers:
        bad = [i for i in layers if not (isinstance(i, int) and 0 <= i < BACKBONE_BLOCKS[backbone])]
        if bad:
            raise ConfigError(f"search space ({source}): {backbone} has blocks 0..{BACKBONE_BLOCKS[backbone] - 1}; "
                              f"got layers {bad}")
    elif not backbone.startswith("hf:") and backbone not in BACKBONE_BLOCKS:
        raise ConfigError(f"search space ({source}): unknown backbone {backbone!r}; "
                          f"use {', '.join(BACKBONE_BLOCKS)} or hf:<local dir>")
    size = settings.get("image_size")
    if size is not None and (not isinstance(size, int) or not 64 <= size <= 1024):
        raise ConfigError(f"search space ({source}): image_size must be an integer in 64..1024, got {size!r}")
    parse_augmentations(settings.get("augment", "rotate"))
