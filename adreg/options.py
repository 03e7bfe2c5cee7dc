"""The settings of a fit and of the promotion gate, each field with its default, its help and how the
command line reads it.

``FitOptions`` is the one place a fit setting lives: ``adreg.cli.parser.add_fit_arguments`` makes the
``adreg fit`` flags from its fields (``--k-shot`` from ``k_shot``, the help from the field's ``help``, the
default from the field), ``FitOptions.params`` logs them all as run parameters, and ``adreg.api.fit`` takes
any field as a keyword. Adding a setting is one field here. ``GatePolicy`` is the same for the gate: the
flags of every command that gates (``promote``, ``update``, ``threshold``) come from its fields, and every API
function that gates takes its fields as keywords. No torch, no MLflow: the parser is built without them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field

DEFAULT_BACKBONE = "efficientnet-lite0"
#: default view target of the adaptive augmentation (``adreg.augment.adaptive_copies``): up to 8 shots keep
#: every copy of the usual settings (bottle rotate x30: 8 x 31 = 248 views), many real goods get few or none
AUG_VIEWS = 256
# the gate's statistical defaults (adreg.statistics reads them from here)
DEFAULT_RESAMPLES = 1000
DEFAULT_PIXEL_RESAMPLES = 200
DEFAULT_PIXEL_SIZE = 64
DEFAULT_MIN_PER_CLASS = 5
DEFAULT_MARGIN = 0.01  # a significant drop smaller than this is not material (the point rule's old tolerance)


def option(default=None, help: str = "", cli: dict | None = None, *, flag: bool = True, name: str | None = None):
    """A ``FitOptions`` field: its ``default``, its ``help`` (``{default}`` is filled in) and the argparse
    keywords of its flag (``cli``: type, nargs, choices, required; the type defaults to the default's).
    ``flag=False``: not on the command line; ``name``: the flag's name when it is not the field's."""
    metadata = {"help": help, "cli": dict(cli or {}) if flag else None, "flag": name}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class FitOptions:
    """Everything that defines a fit; logged verbatim as run parameters. Each field's default, help and
    check live here: ``adreg fit``'s flags are generated from them, and ``adreg.fit`` takes them as keywords.

    Examples:
        ```python
        out = adreg.fit("widget", train_dir="widget/train/good", test_dir="widget/test", k_shot=4,
                        method="rad", register=True)
        from adreg.fitting import fit_category   # the same fit without the store
        result = fit_category(adreg.FitOptions(category="widget", train_dir="widget/train/good", k_shot=4))
        ```
    """

    category: str = field(metadata={"help": "product category, e.g. bottle (model name adreg-<category>)",
                                    "cli": {"required": True}})
    method: str = option("subspace", "anomaly method (default: {default})")
    train_dir: str | None = option(None, "MVTec category folder or folder of good images (default: the bundled "
                                         "data for --category)")
    val_dir: str | None = option(None, "validation folder: good/ and optional defect sub-folders")
    test_dir: str | None = option(None, "test folder: good/ and defect sub-folders (MVTec layout)")
    k_shot: int = option(1, "number of good images to fit on (default {default})")
    seed: int = option(0, "seed of the shot selection and augmentation")
    backbone: str = option(DEFAULT_BACKBONE, "efficientnet-lite0 (offline default), efficientnet-lite2, or "
                                             "hf:<hub id or local dir>")
    layers: list[int] | None = option(None, "backbone layers (Lite0 blocks, default 4 10; HF hidden_states "
                                            "indices, default -4 -5)", {"type": int, "nargs": "+"})
    image_size: int | None = option(None, "square input size (default 320 for CNNs, 448 for ViTs)", {"type": int})
    precision: str = option("fp32", "backbone precision on CUDA", {"choices": ["fp32", "fp16", "bf16"]})
    augment: str = option("rotate", "comma list of none,rotate,hflip,vflip,affine,color (default {default})")
    aug_count: int = option(30, "augmented copies per shot at most (default {default})")
    aug_views: int = option(AUG_VIEWS, "adaptive augmentation: copies per good = min(aug-count, ceil(aug-views / "
                                       "goods) - 1), so many real goods get few synthetic copies, in fits and "
                                       "updates (default {default})")
    sigma: float = option(4.0, "Gaussian smoothing of anomaly maps, pixels (default {default:g})")
    top_fraction: float | None = option(None, "image score = mean of this top fraction of map pixels (default "
                                              "the method's: 0.01; 0 = maximum; small defects on large parts want "
                                              "less, e.g. 0.001 on magnetic tiles)", {"type": float})
    threshold_quantile: float = option(0.99, "quantile of good validation scores used as threshold "
                                             "(default {default})")
    holdout: int = option(20, "good training images held out to calibrate the threshold when there is no "
                              "--val-dir (default {default})")
    batch_size: int = option(8, "images per backbone batch on a GPU (default {default})")
    device: str = option("auto", "auto, cpu or cuda (default {default})")
    method_params: dict = option({}, flag=False)  # the CLI's --param KEY=VALUE and --pca-ev

    def params(self) -> dict:
        flat = {k: v for k, v in asdict(self).items() if k not in ("method_params", "device")}
        flat["fit_device"] = self.device  # "device" is the served model's model_config key
        flat.update({f"method.{k}": v for k, v in self.method_params.items()})
        return flat

    @classmethod
    def cli_fields(cls) -> list[dataclasses.Field]:
        """The fields the command line sets, in order."""
        return [f for f in dataclasses.fields(cls) if f.metadata.get("cli") is not None]


@dataclass
class GatePolicy:
    """Floors (image and pixel AUROC), the confidence ``level`` of intervals and tests (a candidate is
    ``worse`` when paired p < 1 - level and the difference < -``margin``), bootstrap resamples (``n_resamples``
    for image AUROC, ``pixel_resamples`` at ``pixel_size`` for the pixel metrics), their ``seed``, and
    ``min_per_class`` good and defective images below which the set is ``not enough evidence``. Rules:
    ``adreg.statistics``.

    Examples:
        ```python
        strict = adreg.GatePolicy(min_image_auroc=0.97, level=0.99)
        out = adreg.promote("bottle", 4, "production", policy=strict)
        out = adreg.promote("bottle", 4, "production", min_image_auroc=0.97)   # the same, as a keyword
        ```
    """

    min_image_auroc: float = option(0.90, "gate floor (default {default})")
    min_pixel_auroc: float = option(0.90, "gate floor (default {default})")
    level: float = option(0.95, "confidence of the gate's intervals and paired tests: refused as worse when "
                                "significantly worse than the alias's current version on the same images, "
                                "p < 1 - level (default {default})")
    n_resamples: int = option(DEFAULT_RESAMPLES, "bootstrap resamples of image AUROC (default {default}; pixel "
                                                 "metrics: 200 at 64x64)", name="resamples")
    seed: int = option(0, flag=False)
    min_per_class: int = option(DEFAULT_MIN_PER_CLASS, "fewer good or defective evaluation images is 'not "
                                                       "enough evidence' (default {default})")
    pixel_resamples: int = option(DEFAULT_PIXEL_RESAMPLES, flag=False)
    pixel_size: int = option(DEFAULT_PIXEL_SIZE, flag=False)
    margin: float = option(DEFAULT_MARGIN, "refused as worse only when significantly worse by more than this "
                                           "(default {default})")

    def __post_init__(self):
        from adreg.errors import ConfigError

        if not 0.5 <= self.level < 1:
            raise ConfigError(f"the gate's --level must be in [0.5, 1), got {self.level}")
        if self.n_resamples < 1 or self.pixel_resamples < 1:
            raise ConfigError("the gate needs at least one bootstrap resample (--resamples)")

    def floors(self) -> dict[str, float]:
        return {"image_auroc": self.min_image_auroc, "pixel_auroc": self.min_pixel_auroc}

    @classmethod
    def cli_fields(cls) -> list[dataclasses.Field]:
        """The fields the command line sets, in order."""
        return [f for f in dataclasses.fields(cls) if f.metadata.get("cli") is not None]

    @classmethod
    def from_keywords(cls, policy: "GatePolicy | None" = None, **keywords) -> "GatePolicy":
        """``policy``, or one from the fields given (None = the field's default); ``ConfigError`` for an
        unknown name."""
        from adreg.errors import ConfigError

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(keywords) - known)
        if unknown:
            raise ConfigError(f"unknown gate setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if policy is not None:
            return dataclasses.replace(policy, **{k: v for k, v in keywords.items() if v is not None})
        return cls(**{k: v for k, v in keywords.items() if v is not None})
