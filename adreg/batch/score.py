"""In-process batch scoring: image files -> one parquet row per image, streamed in batches.

The registered model is resolved to ONE version before anything is scored (an alias that moves
during the job does not change it) and loaded with ``mlflow.pyfunc.load_model`` - the same served
model as ``adreg serve``. Images are read, base64-encoded and scored ``batch_size`` at a time; only
the list of paths is held for the whole job.

Output: a parquet *dataset* (a folder of part files, the layout Spark writes too; read it with
``pandas.read_parquet(path)``). A part is written every ``flush_rows`` rows, so a crash loses at most
the rows not yet flushed and ``resume=True`` continues after the finished ones. Schema: ``SCHEMA``.
"""

from __future__ import annotations

import base64
import glob as globlib
import hashlib
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from adreg.errors import ConfigError, DataError
from adreg.images import IMAGE_EXTENSIONS
from adreg.progress import progress_enabled
from adreg.registry.resolve import ModelRef, resolve

# One row per image. ``score``/``is_anomaly``/``normal_percentile`` are null when ``error`` is set; ``error`` is null when the
# row was scored; ``model_alias`` is null when a version number was asked for.
SCHEMA = pa.schema([
    pa.field("path", pa.string(), nullable=False),
    pa.field("score", pa.float64()),
    pa.field("is_anomaly", pa.bool_()),
    pa.field("normal_percentile", pa.float64()),
    pa.field("threshold", pa.float64()),
    pa.field("model_name", pa.string()),
    pa.field("model_version", pa.string()),
    pa.field("model_alias", pa.string()),
    pa.field("error", pa.string()),
])
COLUMNS = [f.name for f in SCHEMA]
_ROW_PREFIX = re.compile(r"^row \d+: ")  # the served model labels errors by row; our rows carry the path


@dataclass
class BatchResult:
    """What a batch-scoring job did (``adreg.score`` returns one); the scores are in the parquet ``output``.

    Attributes:
        output: the parquet dataset written (one row per input image: path, score, is_anomaly, threshold,
            the model's name, version and alias, error).
        model: the version the whole job scored with (``ModelRef``).
        scored: rows this job wrote; ``failed``: of them, rows with an error (an unreadable image).
        skipped: inputs already in ``output`` (``resume=True``), not scored again.
        output_rows: rows in the whole output after the job; ``output_failed``: of them, rows with an error.
        seconds: wall time of the job; ``images_per_s``: ``scored / seconds``.

    Examples:
        ```python
        res = adreg.score("bottle", ["line/2026-12-07"], "scores.parquet", resume=True)
        print(res.model.version, res.scored, res.failed, f"{res.images_per_s:.1f} images/s")
        import pandas as pd
        flagged = pd.read_parquet(res.output).query("is_anomaly == True")
        ```
    """

    output: str
    model: ModelRef
    scored: int = 0          # rows written by this job
    failed: int = 0          # rows of this job with an error
    skipped: int = 0         # inputs already in the output (resume)
    output_rows: int = 0     # rows in the whole output after the job
    output_failed: int = 0   # rows with an error in the whole output
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.scored / self.seconds if self.seconds > 0 else 0.0


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not Path(name).stem.endswith("_mask")


def collect_inputs(inputs: list[str]) -> list[str]:
    """Absolute image paths from files, folders (recursive) and glob patterns; sorted, no duplicates.

    Inside folders: files with an image extension, except ``*_mask.*`` (the Spark engine's rule too; for
    the Magnetic-Tile layout, masks ``X.png`` beside ``X.jpg``, pass a glob such as ``Imgs/*.jpg``).

    An input that names nothing is a ``DataError`` (before any model is loaded).
    """
    found: set[str] = set()
    for item in inputs:
        matches = sorted(globlib.glob(item, recursive=True)) if globlib.has_magic(item) else [item]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise DataError(f"{item}: no such file or folder (or the pattern matches nothing)")
        before = len(found)
        for m in matches:
            if os.path.isdir(m):
                for root, _, files in os.walk(m):
                    found.update(os.path.abspath(os.path.join(root, f)) for f in files if _is_image(f))
            elif os.path.isfile(m) and (_is_image(m) or not globlib.has_magic(item)):
                found.add(os.path.abspath(m))  # a file named explicitly is scored whatever its name
        if len(found) == before and not any(os.path.isfile(m) for m in matches):
            raise DataError(f"{item}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")
    return sorted(found)


def existing_paths(output: str) -> set[str]:
    """Paths already written to the output dataset (only the ``path`` column is read)."""
    if not os.path.exists(output):
        return set()
    return set(pq.read_table(output, columns=["path"]).column("path").to_pylist())


def output_counts(output: str) -> tuple[int, int]:
    """(rows, rows with an error) of an output dataset."""
    if not os.path.exists(output):
        return 0, 0
    err = pq.read_table(output, columns=["error"]).column("error")
    return len(err), len(err) - err.null_count


def map_file(save_maps: str | Path, path: str) -> Path:
    """Where the anomaly map of ``path`` goes: ``<stem>-<sha1(path)[:10]>.png`` (unique per input path)."""
    digest = hashlib.sha1(path.encode()).hexdigest()[:10]
    return Path(save_maps) / f"{Path(path).stem}-{digest}.png"


def check_output(output: str, resume: bool) -> None:
    if os.path.exists(output) and not resume:
        raise ConfigError(f"{output} already exists; pass --resume to continue it, or choose another --output")
    if os.path.isfile(output):
        raise ConfigError(f"{output} is a file; the output is a parquet dataset folder (Spark's layout)")


class _PartWriter:
    """Buffers rows and writes them as one parquet part file every ``flush_rows`` rows."""

    def __init__(self, output: str, flush_rows: int):
        self.output, self.flush_rows, self.rows = output, flush_rows, []
        self.run_id = uuid.uuid4().hex[:8]
        self.part = 0

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)
        if len(self.rows) >= self.flush_rows:
            self.flush()

    def flush(self) -> None:
        if not self.rows:
            return
        os.makedirs(self.output, exist_ok=True)
        table = pa.Table.from_pylist(self.rows, schema=SCHEMA)
        final = os.path.join(self.output, f"part-{self.run_id}-{self.part:05d}.parquet")
        tmp = os.path.join(self.output, f".{self.run_id}-{self.part:05d}.tmp")  # hidden: readers skip it
        pq.write_table(table, tmp)
        os.replace(tmp, final)  # a part is either whole or absent
        self.part += 1
        self.rows = []


def _read_b64(path: str) -> tuple[str, str | None]:
    try:
        with open(path, "rb") as fh:
            return base64.b64encode(fh.read()).decode("ascii"), None
    except OSError as exc:
        return "", f"cannot read file: {exc.strerror or exc}"


def load_scoring_model(ref: ModelRef, device: str = "auto", return_map: bool = False):
    """The served pyfunc model of a pinned version, loaded in-process (the same model ``adreg serve`` runs)."""
    import mlflow

    return mlflow.pyfunc.load_model(ref.uri, model_config={"device": device, "return_map": bool(return_map)})


def iter_scores(loaded, ref: ModelRef, paths: list[str], batch_size: int = 16, save_maps: str | None = None):
    """Score image files with a loaded model, ``batch_size`` at a time; yields each batch's rows (``SCHEMA``
    columns, plus ``map`` where a map was written into ``save_maps``). A file that cannot be read or decoded
    gets its own ``error`` and does not fail the others."""
    import pandas as pd

    for lo in range(0, len(paths), batch_size):
        batch = paths[lo:lo + batch_size]
        payload, read_errors = zip(*(_read_b64(p) for p in batch))
        out = loaded.predict(pd.DataFrame({"image": list(payload)}))
        rows = []
        for i, (path, rec) in enumerate(zip(batch, out.to_dict("records"))):
            error = read_errors[i] or (_ROW_PREFIX.sub("", rec["error"]) if rec.get("error") else None)
            scored = error is None and rec.get("score") is not None
            row = {"path": path, "score": float(rec["score"]) if scored else None,
                   "is_anomaly": bool(rec["is_anomaly"]) if scored else None,
                   "normal_percentile": (None if not scored or rec.get("normal_percentile") is None
                                         else float(rec["normal_percentile"])),
                   "threshold": None if rec.get("threshold") is None else float(rec["threshold"]),
                   "model_name": ref.name, "model_version": ref.version, "model_alias": ref.alias, "error": error}
            if save_maps and scored and rec.get("anomaly_map"):
                target = map_file(save_maps, path)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(rec["anomaly_map"]))
                row["map"] = str(target)
            rows.append(row)
        yield rows


def score_images(category: str, inputs: list[str], output: str, alias: str | None = "production",
                 version=None, batch_size: int = 16, save_maps: str | None = None, resume: bool = False,
                 device: str = "auto", flush_rows: int = 256, show_progress: bool = True,
                 model: ModelRef | None = None) -> BatchResult:
    """Score every image under ``inputs`` with the registered model; write ``output`` (parquet dataset).

    Checks everything a user can get wrong (category, alias/version, inputs, output) before the model
    is loaded. Returns counts; ``output_failed`` > 0 means some rows carry an error.
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    ref = model or resolve(category, version, alias)
    check_output(output, resume)
    paths = collect_inputs(inputs)
    done = existing_paths(output) if resume else set()
    todo = [p for p in paths if p not in done]
    result = BatchResult(output=output, model=ref, skipped=len(paths) - len(todo))
    start = time.perf_counter()
    if todo:
        loaded = load_scoring_model(ref, device, bool(save_maps))
        writer = _PartWriter(output, max(flush_rows, batch_size))
        bar = None
        if show_progress and progress_enabled():
            from tqdm.auto import tqdm

            bar = tqdm(total=len(todo), desc=f"scoring ({ref.name} v{ref.version})", unit="img")
        try:
            for rows in iter_scores(loaded, ref, todo, batch_size, save_maps):
                writer.add(rows)
                result.scored += len(rows)
                result.failed += sum(r["error"] is not None for r in rows)
                if bar is not None:
                    bar.update(len(rows))
                    bar.set_postfix(failed=result.failed)
        finally:
            writer.flush()  # finished batches are kept even when the job stops early
            if bar is not None:
                bar.close()
    result.seconds = time.perf_counter() - start
    result.output_rows, result.output_failed = output_counts(output)
    return result
