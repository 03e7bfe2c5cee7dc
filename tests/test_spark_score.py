"""`adreg score --engine spark`: a real local[2] Spark session (one for the module) and mlflow.pyfunc.spark_udf."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("pyspark", reason="the spark extra is not installed (pip install -e '.[spark]')")

from adreg.batch import SCHEMA, score_images  # noqa: E402
from adreg.batch.spark import get_spark, score_with_spark  # noqa: E402
from adreg.cli import main  # noqa: E402
from tests.test_batch_score import make_image_folder  # noqa: E402


@pytest.fixture(scope="module")
def spark():
    session = get_spark("local[2]", batch_size=2, app_name="adreg-tests")
    yield session
    session.stop()


@pytest.fixture(scope="module")
def image_folder(bottle_dir, tmp_path_factory):
    return make_image_folder(bottle_dir, tmp_path_factory.mktemp("spark") / "images")


def _rows(path) -> dict:
    return {r["path"]: r for r in pq.read_table(path).to_pylist()}


def test_spark_scores_equal_inprocess_scores(use_registered, spark, image_folder, tmp_path):
    local_out, spark_out = tmp_path / "local.parquet", tmp_path / "spark.parquet"
    local = score_images("bottle", [str(image_folder)], str(local_out), batch_size=3)
    res = score_with_spark("bottle", [str(image_folder)], str(spark_out), spark=spark, batch_size=2)
    assert (res.scored, res.failed, res.output_failed) == (5, 1, 1) == (local.scored, local.failed, 1)
    assert res.extra["partitions"] == 2  # one task per core: each Python worker loads the model once

    schema = pq.read_table(spark_out).schema
    assert [(f.name, f.type) for f in schema] == [(f.name, f.type) for f in SCHEMA]
    a, b = _rows(local_out), _rows(spark_out)
    assert sorted(a) == sorted(b) and len(a) == 5  # same inputs, mask skipped by both engines
    bad = [p for p in b if p.endswith("corrupt.png")]
    assert len(bad) == 1 and b[bad[0]]["score"] is None and b[bad[0]]["is_anomaly"] is None
    assert "not a readable image" in b[bad[0]]["error"] and b[bad[0]]["error"] == a[bad[0]]["error"]
    good = sorted(p for p in a if p not in bad)
    np.testing.assert_allclose([b[p]["score"] for p in good], [a[p]["score"] for p in good], rtol=1e-4)
    for p in good:
        assert b[p]["error"] is None and b[p]["is_anomaly"] == a[p]["is_anomaly"]
        assert (b[p]["model_name"], b[p]["model_version"], b[p]["model_alias"]) == \
            ("adreg-bottle", use_registered["version"], "production")


def test_spark_resume_scores_only_new_images(use_registered, spark, image_folder, tmp_path):
    out = tmp_path / "r.parquet"
    subset = sorted(str(p) for p in image_folder.glob("good/*.png"))
    first = score_with_spark("bottle", subset, str(out), spark=spark)
    assert (first.scored, first.failed) == (2, 0)
    before = _rows(out)
    new = image_folder / "good" / "zz_new.png"
    shutil.copy(subset[0], new)
    try:
        again = score_with_spark("bottle", [str(image_folder / "good")], str(out), spark=spark, resume=True)
    finally:
        new.unlink()
    after = _rows(out)
    assert (again.scored, again.skipped) == (1, 2) and set(after) == set(before) | {str(new)} and len(after) == 3
    assert pq.read_table(out).num_rows == 3  # nothing scored twice
    assert after[str(new)]["score"] == pytest.approx(after[subset[0]]["score"], abs=1e-4)


def test_spark_python_workers_use_task_cpus_threads(spark):
    """Torch threads per Python worker = spark.task.cpus (1 here), not all the machine's cores."""
    def threads(batches):
        import os

        import pandas as pd
        import torch

        for _ in batches:
            yield pd.DataFrame({"threads": [torch.get_num_threads()], "omp": [os.environ.get("OMP_NUM_THREADS")]})

    got = spark.range(2).repartition(2).mapInPandas(threads, "threads int, omp string").collect()
    assert {(r.threads, r.omp) for r in got} == {(1, "1")}


def test_spark_cli_exit_status(use_registered, spark, image_folder, tmp_path, capsys):
    out = tmp_path / "cli.parquet"
    rc = main(["score", "bottle", str(image_folder / "good"), "-o", str(out), "--engine", "spark"])
    assert rc == 0, capsys.readouterr()
    assert len(_rows(out)) == 2
    assert "scored 2 image(s), 0 failed" in capsys.readouterr().out


def test_local_mode_bounds_the_images_per_task():
    """A large local job is split into a multiple of the task slots with <= MAX_IMAGES_PER_TASK images each
    (Spark's binaryFile scan keeps memory per file read until its task ends: one task per slot ran a
    10,000-image job out of JVM heap)."""
    from adreg.batch.spark import MAX_IMAGES_PER_TASK, local_partitions

    assert local_partitions(2, None) == 2 and local_partitions(2, 5) == 2
    assert local_partitions(2, 2 * MAX_IMAGES_PER_TASK) == 2
    for n in (2 * MAX_IMAGES_PER_TASK + 1, 10_000, 123_457):
        tasks = local_partitions(2, n)
        assert tasks % 2 == 0 and -(-n // tasks) <= MAX_IMAGES_PER_TASK < -(-n // (tasks - 2))
