"""Exported backbones: the feature extractor as ONNX / OpenVINO IR, run by ONNX Runtime or OpenVINO on the CPU.

``export_backbone`` traces a torch backbone's ``forward_features`` (the selected layers' maps on one grid
plus their global descriptors) to ``exported/backbone.onnx`` inside a saved detector folder, with a dynamic
batch axis, and converts it to OpenVINO IR (``backbone.xml``/``.bin``, f32 weights) when OpenVINO is
asked for. ``exported/export.json`` records the source backbone's spec and normalisation, the default
runtime and the measured difference to torch. ``ExportedBackbone`` is a ``Backbone`` that runs those
files: same ``preprocess``, ``extract``, ``spec`` and ``image_size`` as the torch backbone it came from,
so the methods and heads (numpy/torch) do not notice the difference.

OpenVINO runs in f32 (``INFERENCE_PRECISION_HINT=f32``): on CPUs with bf16 it otherwise picks bf16 by
itself and scores move by a few percent, away from the logged threshold.

INT8 (``quantize_export``, export target ``openvino-int8``): the OpenVINO IR quantized with NNCF
post-training quantization, calibrated on the views it is given (the caller passes the model's own good
training views). Served by the same OpenVINO path: the manifest says ``runtime`` openvino and ``precision``
int8, and the f32 ONNX graph is removed, so nothing runs this folder's features in f32 by mistake (only
``runtime`` torch, asked for explicitly, runs the source's f32 weights).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from adreg.backbones.base import Backbone, Features
from adreg.errors import BackboneError, ConfigError

RUNTIMES = ("torch", "onnxruntime", "openvino")
RUNTIME_ALIASES = {"onnx": "onnxruntime", "ort": "onnxruntime", "ov": "openvino"}
#: what ``adreg export --runtime`` makes: an exported runtime, or the OpenVINO IR quantized to INT8 (served
#: with runtime openvino; the manifest's ``precision`` says int8)
INT8 = "openvino-int8"
EXPORT_TARGETS = ("onnxruntime", "openvino", INT8)
#: the Python package each exported runtime needs at serving time (pip name)
RUNTIME_PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
EXPORT_DIR = "exported"
MANIFEST = "export.json"
ONNX_FILE, OPENVINO_FILE = "backbone.onnx", "backbone.xml"
OPSET = 17
#: largest |exported - torch| / max|torch| accepted for the backbone's features at export time
FEATURE_TOLERANCE = 1e-4


def check_runtime(runtime: str | None, allow_torch: bool = True) -> str:
    """Canonical runtime name (``onnx`` -> ``onnxruntime``); ConfigError for anything else."""
    name = RUNTIME_ALIASES.get(str(runtime).strip().lower(), str(runtime).strip().lower())
    allowed = RUNTIMES if allow_torch else RUNTIMES[1:]
    if name not in allowed:
        raise ConfigError(f"runtime must be one of {', '.join(allowed)}, got {runtime!r}")
    return name


def check_export_target(target: str | None) -> str:
    """Canonical export target (``onnxruntime``, ``openvino`` or ``openvino-int8``); ConfigError otherwise."""
    name = str(target).strip().lower()
    if name in EXPORT_TARGETS[2:]:
        return name
    name = RUNTIME_ALIASES.get(name, name)
    if name not in EXPORT_TARGETS:
        raise ConfigError(f"export runtime must be one of {', '.join(EXPORT_TARGETS)}, got {target!r}")
    return name


def import_nncf():
    """NNCF (post-training quantization), or a one-line error naming the package to install."""
    try:
        return importlib.import_module("nncf")
    except ImportError:
        raise BackboneError("INT8 export needs NNCF, which is not installed in this environment: pip install nncf "
                            "(or pip install 'adreg[export]'), or export with runtime 'openvino' (f32)") from None


def _import_runtime(runtime: str):
    """The runtime's Python module, or a one-line error naming the package to install."""
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino"}[runtime]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BackboneError(f"runtime {runtime!r} is not installed in this environment: "
                            f"pip install {RUNTIME_PACKAGES[runtime]} (or pip install 'adreg[export]'), "
                            "or serve with runtime 'torch'") from None


class _FeatureGraph(torch.nn.Module):
    """The backbone's ``forward_features`` as a flat tuple: patch maps of every layer, then their globals."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        feats = self.backbone.forward_features(x)
        return (*feats.patches, *feats.globals)


def _probe(image_size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    """A fixed, normalised-looking input batch for tracing and for checking an export against torch."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, image_size, image_size, generator=g).clamp_(-2.5, 2.5)


def relative_error(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """max |a - b| / max |b| over all outputs (0 when identical)."""
    worst = 0.0
    for x, y in zip(a, b):
        scale = float(np.abs(y).max()) or 1.0
        worst = max(worst, float(np.abs(np.asarray(x) - np.asarray(y)).max()) / scale)
    return worst


def export_backbone(backbone: Backbone, detector_dir: str | Path, runtime: str = "openvino") -> str:
    """Write ``exported/`` into a saved detector folder for ``runtime`` (onnxruntime or openvino) and check
    it against torch on a probe batch; returns the canonical runtime name."""
    runtime = check_runtime(runtime, allow_torch=False)
    _import_runtime(runtime)
    try:
        import onnx  # noqa: F401 - torch.onnx.export needs it
    except ImportError:
        raise BackboneError("exporting needs the onnx package: pip install onnx "
                            "(or pip install 'adreg[export]')") from None
    if isinstance(backbone, ExportedBackbone):
        raise ConfigError("this detector already runs an exported backbone; export from the torch backbone")
    out = Path(detector_dir) / EXPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    graph = _FeatureGraph(backbone).eval()
    device = backbone.device
    backbone.to("cpu")
    try:
        x = _probe(backbone.image_size)
        with torch.inference_mode():
            n_layers = len(graph(x)) // 2
        names = [f"patches{i}" for i in range(n_layers)] + [f"global{i}" for i in range(n_layers)]
        onnx_path = out / ONNX_FILE
        try:
            with warnings.catch_warnings():  # TracerWarnings on the shape arithmetic of "same" padding
                warnings.simplefilter("ignore")
                torch.onnx.export(graph, (x,), str(onnx_path), input_names=["x"], output_names=names,
                                  dynamic_axes={"x": {0: "n"}, **{name: {0: "n"} for name in names}},
                                  opset_version=OPSET, dynamo=False)
        except Exception as exc:  # noqa: BLE001 - tracing failures come in many types
            raise BackboneError(f"could not export backbone {backbone.spec().get('name')!r} to ONNX: "
                                f"{type(exc).__name__}: {str(exc)[:300]}") from None
        files = [ONNX_FILE]
        if runtime == "openvino":
            ov = _import_runtime("openvino")
            model = ov.convert_model(str(onnx_path))
            ov.save_model(model, str(out / OPENVINO_FILE), compress_to_fp16=False)  # f32 weights: same scores
            files += [OPENVINO_FILE, OPENVINO_FILE.replace(".xml", ".bin")]
        manifest = {"format": 1, "runtime": runtime, "files": files, "opset": OPSET, "n_layers": n_layers,
                    "outputs": names, "source_spec": backbone.spec(), "mean": list(backbone.mean),
                    "std": list(backbone.std), "torch_version": torch.__version__}
        (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        # check the files as they will be served, at a batch size other than the traced one
        exported = ExportedBackbone(detector_dir, runtime)
        with torch.inference_mode():
            x3 = _probe(backbone.image_size, n=3, seed=1)
            want = [t.numpy() for t in graph(x3)]
            got = exported.forward_features(x3)
    finally:
        backbone.to(device)
    err = relative_error([t.numpy() for t in (*got.patches, *got.globals)], want)
    if not err <= FEATURE_TOLERANCE:
        shutil.rmtree(out, ignore_errors=True)
        raise BackboneError(f"the {runtime} export differs from torch by {err:.2e} (relative), above "
                            f"{FEATURE_TOLERANCE:g}; keep serving with runtime 'torch'")
    manifest["max_relative_error"] = err
    manifest[f"{runtime}_version"] = getattr(_import_runtime(runtime), "__version__", "")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return runtime


def quantize_export(detector_dir: str | Path, views: Sequence, source: str) -> dict:
    """Quantize the f32 OpenVINO IR of a detector folder (written by ``export_backbone(..., "openvino")``) to
    INT8 with NNCF post-training quantization, calibrated on ``views`` (PIL images, preprocessed as served)
    and nothing else; ``source`` says where they came from (recorded). Replaces the IR in place, removes the
    f32 ONNX graph and returns the updated manifest (``precision`` int8, calibration, file sizes, the
    features' relative difference to f32 on the calibration views)."""
    nncf = import_nncf()
    ov = _import_runtime("openvino")
    folder = Path(detector_dir) / EXPORT_DIR
    manifest = read_manifest(detector_dir)
    if manifest is None or manifest.get("runtime") != "openvino" or not (folder / OPENVINO_FILE).is_file():
        raise ConfigError("INT8 quantization needs the folder's f32 OpenVINO export; export with runtime "
                          "'openvino' first")
    if manifest.get("precision") == "int8":
        raise ConfigError("this backbone is already quantized to INT8")
    if not views:
        raise ConfigError("INT8 quantization needs at least one calibration view")
    f32 = ExportedBackbone(detector_dir, "openvino")
    x = np.ascontiguousarray(f32.preprocess(list(views)).numpy())
    want = [f32._run(x[i:i + 1]) for i in range(len(x))]
    f32_bytes = sum((folder / f).stat().st_size for f in (OPENVINO_FILE, OPENVINO_FILE.replace(".xml", ".bin")))
    del f32
    model = ov.Core().read_model(str(folder / OPENVINO_FILE))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # full bias correction: on bottle (1 shot, 31 views) the fast one cost 0.012 pixel AUROC, this one 0.0006
        quantized = nncf.quantize(model, nncf.Dataset([x[i:i + 1] for i in range(len(x))]),
                                  subset_size=len(x), preset=nncf.QuantizationPreset.PERFORMANCE,
                                  target_device=nncf.TargetDevice.CPU, fast_bias_correction=False)
    # written beside, then moved over the f32 IR: OpenVINO maps the f32 .bin it read (writing into it: SIGBUS)
    tmp_xml = folder / ("int8-" + OPENVINO_FILE)
    ov.save_model(quantized, str(tmp_xml), compress_to_fp16=False)
    ops = [op.get_type_name() for op in quantized.get_ops()]
    del quantized, model
    for suffix in (".bin", ".xml"):
        os.replace(tmp_xml.with_suffix(suffix), (folder / OPENVINO_FILE).with_suffix(suffix))
    (folder / ONNX_FILE).unlink(missing_ok=True)  # f32: onnxruntime must not serve it under an INT8 threshold
    int8_bytes = sum((folder / f).stat().st_size for f in (OPENVINO_FILE, OPENVINO_FILE.replace(".xml", ".bin")))
    manifest.update({"precision": "int8", "files": [OPENVINO_FILE, OPENVINO_FILE.replace(".xml", ".bin")],
                     "quantization": {"tool": "nncf.quantize", "nncf_version": nncf.__version__,
                                      "preset": "performance", "fast_bias_correction": False,
                                      "n_calibration_views": len(x), "calibration_source": source,
                                      "n_fake_quantize": ops.count("FakeQuantize"),
                                      "f32_ir_bytes": f32_bytes, "int8_ir_bytes": int8_bytes}})
    manifest.pop("max_relative_error", None)
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    int8 = ExportedBackbone(detector_dir, "openvino")
    got = [int8._run(x[i:i + 1]) for i in range(len(x))]
    manifest["int8_relative_error"] = float(np.mean([relative_error(g, w) for g, w in zip(got, want)]))
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def export_precision(detector_dir: str | Path) -> str:
    """``int8`` for a folder whose exported backbone is quantized, else ``f32`` (also without an export)."""
    manifest = read_manifest(detector_dir) or {}
    return str(manifest.get("precision") or "f32")


def read_manifest(detector_dir: str | Path) -> dict | None:
    """The export manifest of a saved detector folder, or None when it has no exported backbone."""
    path = Path(detector_dir) / EXPORT_DIR / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def default_runtime(detector_dir: str | Path) -> str:
    """The runtime a detector folder was exported for (``torch`` when it has no export)."""
    manifest = read_manifest(detector_dir)
    return "torch" if manifest is None else manifest["runtime"]


class ExportedBackbone(Backbone):
    """A ``Backbone`` whose ``forward_features`` runs an exported graph with ONNX Runtime or OpenVINO (CPU).

    ``threads`` > 0 sets the runtime's intra-op thread count; 0 leaves the runtime's default.
    """

    def __init__(self, detector_dir: str | Path, runtime: str, threads: int = 0):
        runtime = check_runtime(runtime, allow_torch=False)
        manifest = read_manifest(detector_dir)
        if manifest is None:
            raise ConfigError(f"runtime {runtime!r} needs an exported backbone, but this model has none; "
                              "create an exported version with `adreg export CATEGORY --version N` "
                              "(or serve with runtime 'torch')")
        config = Path(detector_dir) / "config.json"
        spec = json.loads(config.read_text())["backbone"] if config.is_file() else manifest["source_spec"]
        spec = {k: v for k, v in spec.items() if k != "bundled"}
        super().__init__(int(spec["image_size"]), spec.get("precision", "fp32"))
        self.runtime = runtime
        self.threads = int(threads or 0)
        self._spec = dict(spec)
        self.mean = tuple(manifest["mean"])
        self.std = tuple(manifest["std"])
        self.n_layers = int(manifest["n_layers"])
        self.layers = tuple(spec.get("layers") or ())
        folder = Path(detector_dir) / EXPORT_DIR
        self.export_precision = str(manifest.get("precision") or "f32")
        if self.export_precision == "int8" and runtime != "openvino":
            raise ConfigError(f"this model's backbone is exported as INT8 OpenVINO IR; serve it with runtime "
                              f"'openvino' (its default), not {runtime!r}")
        module = _import_runtime(runtime)
        if runtime == "onnxruntime":
            opts = module.SessionOptions()
            if self.threads > 0:
                opts.intra_op_num_threads = self.threads
                opts.inter_op_num_threads = 1
            opts.execution_mode = module.ExecutionMode.ORT_SEQUENTIAL
            # no busy-waiting between runs: spinning pool threads take the cores from the heads, the
            # smoothing and the resize threads that run between backbone calls
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
            opts.graph_optimization_level = module.GraphOptimizationLevel.ORT_ENABLE_ALL
            self._session = module.InferenceSession(str(folder / ONNX_FILE), sess_options=opts,
                                                    providers=["CPUExecutionProvider"])
            self._input = self._session.get_inputs()[0].name
        else:
            core = module.Core()
            source = folder / OPENVINO_FILE if (folder / OPENVINO_FILE).is_file() else folder / ONNX_FILE
            config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
            if self.threads > 0:
                config["INFERENCE_NUM_THREADS"] = self.threads
            compiled = core.compile_model(core.read_model(str(source)), "CPU", config)
            self._request = compiled.create_infer_request()
            # a batch runs as single images on two requests in flight (measured on 2 cores: ~15% more
            # throughput than one request on the whole batch, and the same features)
            self._queue = module.AsyncInferQueue(compiled, 2)
            self._queue.set_callback(self._collect)
            self._results: dict[int, list[np.ndarray]] = {}
            self._lock = threading.Lock()  # one batch in flight per backbone (routers share backbones)

    def spec(self) -> dict:
        """The source torch backbone's spec: a detector saved from here rebuilds the same features."""
        return dict(self._spec)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    #: images per forward call the detector should pass on the CPU (torch backbones take one at a time)
    cpu_batch = 8

    def _collect(self, request, index: int) -> None:
        # output buffers are reused by the next inference: copy them out
        self._results[index] = [np.array(request.get_output_tensor(i).data, copy=True)
                                for i in range(2 * self.n_layers)]

    def _run(self, x: np.ndarray) -> list[np.ndarray]:
        if self.runtime == "onnxruntime":
            return self._session.run(None, {self._input: x})
        if len(x) == 1:
            with self._lock:
                self._request.infer({0: x})
                return [np.array(self._request.get_output_tensor(i).data, copy=True)
                        for i in range(2 * self.n_layers)]
        with self._lock:
            self._results = {}
            for i in range(len(x)):
                self._queue.start_async({0: x[i:i + 1]}, i)
            self._queue.wait_all()
            parts = [self._results.pop(i) for i in range(len(x))]
        return [np.concatenate([p[k] for p in parts]) for k in range(2 * self.n_layers)]

    def forward_features(self, x: torch.Tensor) -> Features:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        outs = [torch.from_numpy(np.asarray(o, dtype=np.float32)) for o in self._run(arr)]
        return Features(outs[:self.n_layers], outs[self.n_layers:])


def export_into(detector_dir: str | Path, runtime: str) -> str:
    """Export the backbone of the detector saved in ``detector_dir`` into that folder (torch runtime loaded
    just for this); returns the canonical runtime name."""
    from adreg.backbones import build_backbone

    cfg = json.loads((Path(detector_dir) / "config.json").read_text())
    spec = dict(cfg["backbone"])
    if spec.pop("bundled", False):
        spec["name"] = "hf:" + str(Path(detector_dir) / "backbone")
    return export_backbone(build_backbone(**spec), detector_dir, runtime)


def resolve_runtime(detector_dir: str | Path, runtime: str | None, device: str | None,
                    threads: int = 0) -> tuple[str, str]:
    """(runtime, device) to load a saved detector with. ``runtime`` None picks the one the folder was
    exported for (torch without an export, or when ``device`` is, or auto finds, a GPU); exported runtimes run on the
    CPU, so an explicit one needs ``device`` auto or cpu. ``threads`` > 0 also sets torch's thread count
    (the heads run in torch)."""
    auto = runtime in (None, "", "auto")
    runtime = default_runtime(detector_dir) if auto else check_runtime(runtime)
    wants_gpu = str(device or "auto").lower() not in ("auto", "cpu") or (
        str(device or "auto").lower() == "auto" and torch.cuda.is_available())
    if auto and wants_gpu:
        runtime = "torch"  # on a GPU an exported version runs its torch backbone there
    if int(threads or 0) < 0:
        raise ConfigError(f"threads must be 0 (runtime default) or a positive count, got {threads}")
    if runtime == "torch":
        return runtime, device or "auto"
    if str(device or "auto").lower() not in ("auto", "cpu"):
        raise ConfigError(f"runtime {runtime!r} runs on the CPU; use device 'cpu' (or 'auto'), "
                          f"or runtime 'torch' for device {device!r}")
    return runtime, "cpu"
