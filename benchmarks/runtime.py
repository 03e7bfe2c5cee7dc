"""Backbone runtimes side by side on the CPU: torch eager vs ONNX Runtime vs OpenVINO f32 vs OpenVINO INT8, in one run.

    python -m benchmarks runtime --datasets bottle,mtd --threads 2 --rounds 5

Per dataset: one SubspaceAD fit (1 shot, seed 0, the benchmark's dataset settings), its backbone exported
(adreg.backbones.export), then the same saved detector loaded three times (runtime torch / onnxruntime /
openvino, ``threads`` each), and a copy of it with the OpenVINO IR quantized to INT8 the way ``adreg export
--runtime openvino-int8`` does (NNCF, calibrated on the fit's own shots and their augmented copies:
``adreg.registry.export.training_views``; its threshold is not re-derived here: AUROC does not depend on it). Accuracy: image and pixel AUROC of each runtime on the full test set, and the
largest relative score difference to torch. Speed: ``--n-images`` decoded test images scored with
``AnomalyDetector.predict`` (PIL in, scores + maps out: resize, normalise, backbone, head, smoothing;
no PNG decode) at batch 1 and 8, and the backbone alone (``AnomalyDetector.extract`` on the same chunks
as ``predict``, including resize and normalise: torch one image per pass on the CPU, an exported backbone
up to its ``cpu_batch``) on the same images; ``pyfunc ms`` = the served pyfunc model
(``adreg.pyfunc.served.AnomalyDetectorModel`` with the runtime in its model_config) on requests of ``batch`` rows
of base64 PNGs (decode, resize, normalise, backbone, head, map, encoding of the answer; no HTTP). The variants are interleaved in ``--rounds`` rounds (rotating order) and
each figure is the median over rounds, so load from other processes hits all of them alike.
Writes runtime_bench.md / .json to --out; --update-docs writes the page docs/benchmarks/runtime.md whole.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from adreg.backbones.export import export_backbone, quantize_export
from adreg.detector import AnomalyDetector
from adreg.evaluation import evaluate
from adreg.fitting import FitOptions, fit_category
from adreg.images import load_image
from benchmarks.harness import command_line, fit_settings, machine_line, quiet, write_page

ABOUT = (
    "Backbone runtimes side by side on the CPU: torch eager, ONNX Runtime, OpenVINO f32 and OpenVINO INT8. Per "
    "dataset one SubspaceAD "
    "fit by the product (`adreg.fitting.fit_category`: 1 shot, seed 0, the benchmark's dataset settings: bottle "
    "blocks 4 + 10; MTD blocks 7 + 10, flips x8, top 0.1%; EfficientNet-Lite0 at 320 px), its backbone exported "
    "(`adreg.backbones.export`), and the same saved detector loaded once per runtime, each with the given "
    "threads; `openvino-int8` is a copy whose OpenVINO IR is quantized as `adreg export --runtime openvino-int8` "
    "does (NNCF 3.4 post-training quantization, full bias correction, calibrated on the fit's own shot and the "
    "augmented copies its fit made: 31 views on bottle, 9 on MTD; served with runtime openvino). `ms / image` = decoded image in, score + map out (`AnomalyDetector.predict`: resize, normalise, "
    "backbone, head, smoothing; no PNG decode) at batch 1 and 8; `backbone ms` = `AnomalyDetector.extract` on "
    "the same chunks as `predict` (incl. resize + normalise: torch one image per pass on the CPU, an exported "
    "backbone up to its `cpu_batch`); `rest ms` = the difference (head + post-processing; a difference of two "
    "timings); `pyfunc ms` = the served pyfunc model (`AnomalyDetectorModel`, the runtime in its model_config) "
    "on requests of `batch` base64 PNG rows (PNG decode, resize, normalise, backbone, head, map, answer; no HTTP). "
    "The runtimes are interleaved in rounds (rotating order), each figure the median over rounds. "
    "Image / pixel AUROC of each runtime on the test set (`adreg.evaluation.evaluate`) and the largest relative "
    "score difference to torch; `vs f32` = images / s of INT8 over OpenVINO f32 (model, and pyfunc)."
)
STAGES_ABOUT = (
    "One request of 8 base64 PNG rows through the served pyfunc, each stage timed alone with the functions the "
    "pyfunc calls, in its order (`stage_seconds` in `benchmarks/runtime.py`), ms / image, median over rounds and "
    "requests: `base64` (pybase64), `image decode` (`adreg.images.decode_image_bytes` on the request's "
    "threads: libpng through imagecodecs for 8-bit RGB / grayscale PNGs, else Pillow), `resize + normalise` "
    "(`Backbone.preprocess`), `backbone` (the runtime's forward pass), `method` (`score_patches`), `maps + image "
    "score` (smoothing, upsampling, top-k mean); `answer` = the pyfunc's measured time minus these (request checks, "
    "hand-off to the inference thread, rows, normal percentile, the frame); `not backbone` = pyfunc minus backbone. "
    "`decode before` = the decode as it was until 2026-12-08 (stdlib base64, Pillow's PNG decoder, an RGB copy) "
    "on the same rows, in place of `base64` + `image decode`."
)
#: variant name -> (runtime it is loaded with, which folder: the f32 export or its INT8 copy)
VARIANTS = {"torch": ("torch", "f32"), "onnxruntime": ("onnxruntime", "f32"), "openvino": ("openvino", "f32"),
            "openvino-int8": ("openvino", "int8")}
RUNTIMES = tuple(VARIANTS)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _served(folder: Path, runtime: str, threads: int):
    """The served pyfunc model around a detector folder, as MLflow would load it (no logging, no HTTP)."""
    import mlflow

    from adreg.pyfunc.served import DEFAULT_MODEL_CONFIG, AnomalyDetectorModel

    model = AnomalyDetectorModel()
    model.load_context(mlflow.pyfunc.PythonModelContext(
        {"detector": str(folder)}, {**DEFAULT_MODEL_CONFIG, "runtime": runtime, "threads": threads, "device": "cpu"}))
    return model


#: the served pipeline's stages, in the order ``AnomalyDetectorModel.predict`` runs them; "answer" is the rest of
#: the pyfunc's time (request checks, the hand-off to the inference thread, rows, normal percentile, the frame)
STAGES = ("base64", "image decode", "resize + normalise", "backbone", "method", "maps + image score")


def stage_seconds(model, frame) -> dict[str, float]:
    """Each stage of one served request on ``frame`` (rows of base64 images), timed alone with the functions the
    pyfunc calls, in its order and grouping; seconds for the whole frame. ``decode before`` is the decode as it
    was until 2026-12-08 (stdlib base64, Pillow's PNG decoder, an RGB copy), on the same rows, for comparison."""
    import base64

    import pybase64

    from adreg.backbones.base import Features
    from adreg.images import decode_image_bytes, thread_map
    from adreg.postprocess import anomaly_maps, image_scores

    det, out = model.detector, {}
    bb = det.backbone

    def timed(name, fn):
        t0 = time.perf_counter()
        value = fn()
        out[name] = time.perf_counter() - t0
        return value

    rows = frame["image"].tolist()
    raws = timed("base64", lambda: [pybase64.b64decode(v, validate=True) for v in rows])
    images = timed("image decode", lambda: thread_map(decode_image_bytes, raws))
    with torch.inference_mode():
        xs = timed("resize + normalise", lambda: bb.preprocess(images))
        step = det.backbone_batch
        feats = timed("backbone", lambda: Features.cat([bb.forward_features(xs[i:i + step])
                                                         for i in range(0, len(xs), step)]))
        patches = timed("method", lambda: det.method.score_patches(feats))
        timed("maps + image score",
              lambda: image_scores(anomaly_maps(patches, bb.image_size, det.sigma), det.top_fraction).numpy())

    def before(value):
        from PIL import Image

        return Image.open(io.BytesIO(base64.b64decode("".join(value.split()), validate=True))).convert("RGB")
    timed("decode before", lambda: thread_map(before, rows))
    return out


def bench_dataset(dataset: str, args, tmp: Path) -> list[dict]:
    import pandas as pd

    from adreg.images import file_to_b64
    from adreg.registry.export import training_views

    quiet()
    opts = FitOptions(category=dataset, k_shot=1, seed=0, device="cpu", **fit_settings(dataset))  # the benchmarks' settings
    result = fit_category(opts, show_progress=False)
    folder = result.detector.save(tmp / dataset)
    t0 = time.perf_counter()
    export_backbone(result.detector.backbone, folder, "openvino")  # writes the ONNX graph and the OpenVINO IR
    export_s = time.perf_counter() - t0
    int8_folder = tmp / f"{dataset}-int8"
    shutil.copytree(folder, int8_folder)
    views = training_views(list(result.shots), int8_folder)
    t0 = time.perf_counter()
    quant = quantize_export(int8_folder, views, f"{len(views)} views of the fit's {len(result.shots)} shot(s)")
    quantize_s = time.perf_counter() - t0
    folders = {"f32": folder, "int8": int8_folder}
    dets = {v: AnomalyDetector.load(folders[f], device="cpu", runtime=rt, threads=args.threads)
            for v, (rt, f) in VARIANTS.items()}
    served = {v: _served(folders[f], rt, args.threads) for v, (rt, f) in VARIANTS.items()}
    torch.set_num_threads(args.threads)
    test = result.data.test
    if args.max_test:  # an evenly spaced subset keeps good and defective images
        test = test[:: max(1, len(test) // args.max_test)][: args.max_test]
    evals = {rt: evaluate(det, test, det.threshold.value, show_progress=False) for rt, det in dets.items()}
    ref = evals["torch"].scores
    timed = test[:: max(1, len(test) // args.n_images)][: args.n_images]
    images = [load_image(s.path) for s in timed]
    frame = pd.DataFrame({"image": [file_to_b64(s.path) for s in timed]})
    for v, det in dets.items():  # warm-up: first calls allocate and pick kernels
        det.batch_size = 8
        det.predict(images[:8])
        det.extract(images[:1])
        served[v].predict(None, frame.iloc[:8])

    def pyfunc(model, bs):
        for i in range(0, len(frame), bs):
            out = model.predict(None, frame.iloc[i:i + bs])
            assert (out["error"] == "").all(), out["error"].tolist()
    times: dict[tuple, list[float]] = {}
    stages: dict[tuple, list[float]] = {}  # (runtime, stage) -> seconds per image of each request of 8 rows
    order = list(RUNTIMES)
    for r in range(args.rounds):
        order = order[1:] + order[:1]
        for rt in order:
            det = dets[rt]
            for bs in (1, 8):
                det.batch_size = bs
                times.setdefault((rt, bs, "model"), []).append(_timed(lambda: det.predict(images)) / len(images))
                times.setdefault((rt, bs, "backbone"), []).append(  # as predict runs it (det.backbone_batch)
                    _timed(lambda: [det.extract(images[i:i + bs]) for i in range(0, len(images), bs)]) / len(images))
                times.setdefault((rt, bs, "pyfunc"), []).append(_timed(lambda: pyfunc(served[rt], bs)) / len(images))
            for i in range(0, len(frame), 8):  # the served pipeline's stages, requests of 8 rows
                chunk = frame.iloc[i:i + 8]
                for stage, sec in stage_seconds(served[rt], chunk).items():
                    stages.setdefault((rt, stage), []).append(sec / len(chunk))
    rows = []
    for rt in RUNTIMES:
        m = evals[rt].metrics
        diff = float(np.max(np.abs(evals[rt].scores - ref) / np.maximum(np.abs(ref), 1e-12)))
        for bs in (1, 8):
            model_ms = 1000 * statistics.median(times[(rt, bs, "model")])
            backbone_ms = 1000 * statistics.median(times[(rt, bs, "backbone")])
            pyfunc_ms = 1000 * statistics.median(times[(rt, bs, "pyfunc")])
            rows.append({"dataset": dataset, "runtime": rt, "batch": bs, "ms_per_image": model_ms,
                         "pyfunc_ms_per_image": pyfunc_ms,
                         "images_per_s": 1000 / model_ms, "backbone_ms": backbone_ms,
                         "backbone_share": backbone_ms / model_ms, "rest_ms": model_ms - backbone_ms,
                         "image_auroc": m["image_auroc"], "pixel_auroc": m.get("pixel_auroc", float("nan")),
                         "max_rel_score_diff": diff, "n_test": len(test), "n_timed": len(images),
                         "export_seconds": export_s, "quantize_seconds": quantize_s,
                         "n_calibration_views": len(views), "n_fake_quantize": quant["quantization"]["n_fake_quantize"],
                         "int8_feature_relative_error": quant["int8_relative_error"],
                         "stages_ms": {} if bs != 8 else {  # per image, median over rounds and requests
                             stage: 1000 * statistics.median(stages[(rt, stage)])
                             for stage in (*STAGES, "decode before")}})
    base = {r["batch"]: r for r in rows if r["runtime"] == "torch"}
    f32 = {r["batch"]: r for r in rows if r["runtime"] == "openvino"}
    for r in rows:
        r["speedup"] = r["images_per_s"] / base[r["batch"]]["images_per_s"]
        r["pyfunc_speedup"] = base[r["batch"]]["pyfunc_ms_per_image"] / r["pyfunc_ms_per_image"]
        if r["runtime"] == "openvino-int8":
            ref = f32[r["batch"]]
            r["vs_f32"] = ref["ms_per_image"] / r["ms_per_image"]
            r["pyfunc_vs_f32"] = ref["pyfunc_ms_per_image"] / r["pyfunc_ms_per_image"]
            r["image_auroc_vs_f32"] = r["image_auroc"] - ref["image_auroc"]
            r["pixel_auroc_vs_f32"] = r["pixel_auroc"] - ref["pixel_auroc"]
    return rows


def markdown(rows: list[dict], args) -> str:
    lines = ["| dataset | runtime | batch | ms / image | images / s | vs torch | vs f32 | backbone ms (share) | rest ms "
             "| pyfunc ms / image | pyfunc vs torch | pyfunc vs f32 | image AUROC | pixel AUROC | max rel. score diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['vs_f32']:.2f}x" if "vs_f32" in r else ""
        pvs = f"{r['pyfunc_vs_f32']:.2f}x" if "pyfunc_vs_f32" in r else ""
        lines.append(f"| {r['dataset']} | {r['runtime']} | {r['batch']} | {r['ms_per_image']:.1f} | "
                     f"{r['images_per_s']:.1f} | {r['speedup']:.2f}x | {vs} | {r['backbone_ms']:.1f} "
                     f"({100 * r['backbone_share']:.0f}%) | {r['rest_ms']:.1f} | {r['pyfunc_ms_per_image']:.1f} | "
                     f"{r['pyfunc_speedup']:.2f}x | {pvs} | {r['image_auroc']:.4f} | "
                     f"{r['pixel_auroc']:.4f} | {r['max_rel_score_diff']:.1e} |")
    first = rows[0]
    lines.append("")
    lines.append(f"SubspaceAD 1-shot seed 0, EfficientNet-Lite0 320 px; {args.threads} threads, "
                 f"{first['n_timed']} test images timed per dataset, median of {args.rounds} interleaved rounds; "
                 "AUROC on "
                 f"{' / '.join(str(r['n_test']) for r in rows[::2 * len(RUNTIMES)])} test images; "
                 f"{platform.processor() or platform.machine()}, "
                 f"{os.cpu_count()} cores visible. ms / image: decoded image in, score + map out "
                 "(`AnomalyDetector.predict`); rest = ms / image - backbone (resize, normalise, head, smoothing).")
    return "\n".join(lines) + "\n"


def stages_markdown(rows: list[dict]) -> str:
    """The served pipeline at batch 8, stage by stage (ms / image), beside its measured total."""
    lines = ["| dataset | runtime | " + " | ".join(STAGES) + " | answer | pyfunc ms / image | not backbone "
             "| decode before |", "|---" * (len(STAGES) + 6) + "|"]
    for r in rows:
        st = r["stages_ms"]
        if not st:
            continue
        answer = r["pyfunc_ms_per_image"] - sum(st[k] for k in STAGES)
        rest = r["pyfunc_ms_per_image"] - st["backbone"]
        lines.append(f"| {r['dataset']} | {r['runtime']} | " + " | ".join(f"{st[k]:.1f}" for k in STAGES)
                     + f" | {answer:.1f} | {r['pyfunc_ms_per_image']:.1f} | {rest:.1f} "
                     f"({100 * rest / r['pyfunc_ms_per_image']:.0f}%) | {st['decode before']:.1f} |")
    return "\n".join(lines) + "\n"


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


def runtime_versions() -> str:
    """The runtimes' versions and the CPU's vector / 8-bit instructions (what INT8 speed depends on)."""
    from importlib.metadata import PackageNotFoundError, version

    parts = []
    for pkg in ("onnxruntime", "openvino", "nncf", "imagecodecs", "pybase64", "pillow"):
        try:
            parts.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    flags = cpu_flags()
    isa = [name for flag, name in (("avx2", "AVX2"), ("fma", "FMA"), ("avx512f", "AVX-512"),
                                   ("avx_vnni", "AVX-VNNI"), ("avx512_vnni", "AVX512-VNNI"), ("amx_int8", "AMX"))
           if flag in flags]
    return ", ".join(parts) + "; CPU instructions (/proc/cpuinfo): " + (", ".join(isa) or "none of AVX2 / AVX-512 / VNNI / AMX")


def _judge(ok: bool) -> str:
    return "met" if ok else "missed"


def targets_markdown(rows: list[dict]) -> str:
    """The issue's targets judged from this run's rows."""
    by = {(r["dataset"], r["runtime"], r["batch"]): r for r in rows}
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    flags = cpu_flags()
    int8_isa = sorted(f for f in flags if "vnni" in f or f.startswith("amx"))
    out = ["## Targets", ""]
    if "bottle" in datasets:  # end to end through the pyfunc, bottle, batches of 8, the best runtime
        best = min((r for r in rows if r["dataset"] == "bottle" and r["batch"] == 8),
                   key=lambda r: r["pyfunc_ms_per_image"])
        st, ms = best["stages_ms"], best["pyfunc_ms_per_image"]
        out.append(f"* **Served pipeline (#35): <= 15 ms / image end to end through the pyfunc, bottle, batches of 8, "
                   f"the best runtime: {_judge(ms <= 15)}.** Best: {best['runtime']} at {ms:.1f} ms / image"
                   + ("" if ms <= 15 else f", {ms - 15:.1f} ms over ({ms / 15:.1f}x)") + ". Of that, the backbone "
                   f"takes {st['backbone']:.1f} ms; decoding the 900 x 900 PNG takes {st['image decode']:.1f} ms "
                   f"(base64 {st['base64']:.1f}), resize + normalise {st['resize + normalise']:.1f}, method + maps "
                   f"{st['method'] + st['maps + image score']:.1f}. The decode as it was before (stdlib base64, "
                   f"Pillow's PNG decoder) takes {st['decode before']:.1f} ms / image on the same rows."
                   + ("" if ms <= 15 else
                      f" What 15 ms leaves beside this backbone ({15 - st['backbone']:.1f} ms) is less than the PNG "
                      "decode alone: libpng inflates 2.4 MB of pixels per image, on the request's threads (both "
                      "cores); the rest of the pipeline would have to cost nothing."))
    for ds in datasets:
        f32, int8 = by.get((ds, "openvino", 8)), by.get((ds, "openvino-int8", 8))
        if not (f32 and int8):
            continue
        speed = int8["vs_f32"]
        di, dp = int8["image_auroc_vs_f32"], int8["pixel_auroc_vs_f32"]
        ok = speed >= 1.5 and abs(di) <= 0.005 and (dp != dp or abs(dp) <= 0.005)
        out.append(f"* **INT8 (#35), {ds}: >= 1.5x OpenVINO f32 at batch 8, image and pixel AUROC within 0.005: "
                   f"{_judge(ok)}.** {speed:.2f}x ({int8['ms_per_image']:.1f} vs {f32['ms_per_image']:.1f} ms / "
                   f"image; through the pyfunc {int8['pyfunc_vs_f32']:.2f}x); image AUROC {di:+.4f}, pixel AUROC "
                   f"{dp:+.4f}; scores differ from torch's by up to {100 * int8['max_rel_score_diff']:.0f}% (relative); "
                   f"{int8['n_fake_quantize']} FakeQuantize ops.")
    if not int8_isa:
        out.append("  * This CPU has neither VNNI (`avx512_vnni`, `avx_vnni`) nor AMX, the instructions that do an "
                   "8-bit multiply-accumulate in one step; on AVX2 OpenVINO's INT8 kernels take several "
                   "instructions for it, so INT8 gains less here than on a CPU that has them.")
    for ds in datasets:
        f32, torch_row = by.get((ds, "openvino", 8)), by.get((ds, "torch", 8))
        if f32 and torch_row:
            ok = f32["speedup"] >= 2 and f32["ms_per_image"] <= 25
            out.append(f"* **f32 (2026-11-25), {ds}: >= 2x torch throughput at batch 8 and <= 25 ms / image: "
                       f"{_judge(ok)}.** OpenVINO f32 {f32['speedup']:.2f}x at {f32['ms_per_image']:.1f} ms / image.")
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="bottle,mtd", help="comma list of bundled categories: bottle, mtd")
    p.add_argument("--threads", type=int, default=2, help="threads of every runtime (and of torch)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (median)")
    p.add_argument("--n-images", type=int, default=16, help="test images timed per dataset")
    p.add_argument("--max-test", type=int, default=0, help="evaluate on the first N test images only (0 = all)")
    p.add_argument("--out", default="bench-results")
    p.add_argument("--update-docs", action="store_true", help="write docs/benchmarks/runtime.md")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in [d.strip() for d in args.datasets.split(",") if d.strip()]:
            rows += bench_dataset(dataset, args, Path(tmp))
            print(markdown(rows, args), flush=True)
    table = (markdown(rows, args) + "\n## The served pipeline, stage by stage\n\n" + STAGES_ABOUT + "\n\n"
             + stages_markdown(rows) + "\n" + targets_markdown(rows))
    (out / "runtime_bench.md").write_text(table)
    (out / "runtime_bench.json").write_text(json.dumps(rows, indent=2))
    if args.update_docs:
        path = write_page("runtime", "Fast CPU inference: exported runtimes", ABOUT, table,
                          command_line("runtime", argv), machine=machine_line("cpu") + "; " + runtime_versions())
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
