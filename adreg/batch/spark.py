"""Batch scoring on Apache Spark with MLflow's own engine, ``mlflow.pyfunc.spark_udf``.

Images are read with Spark's ``binaryFile`` source (recursive, glob filter), base64-encoded in Spark
(``base64()`` may wrap lines at 76 characters; the served model accepts that) and scored by the
registered model pinned to one version (``models:/adreg-<category>/<version>``). The output is the
same parquet schema as the in-process scorer (``adreg.batch.score.SCHEMA``), written by the executors
(no row is collected to the driver).

Where the model lives on the workers (MLflow 3.17 ``spark_udf``, ``env_manager="local"``): on a cluster
the model folder is shipped once with ``SparkContext.addFile`` and ``SparkModelCache`` keeps one loaded
copy per Python worker process (Python workers are reused across tasks). In ``local[N]`` mode MLflow
skips that cache and loads the model once per *task*, so here the input is coalesced to one partition
per task slot (each Python worker then loads it once), or to a multiple of that for large jobs, so that no
task reads more than ``MAX_IMAGES_PER_TASK`` images (the JVM's memory then does not grow with the job). Torch threads per worker = ``spark.task.cpus``
(``OMP_NUM_THREADS``, set for the Python workers).
"""

from __future__ import annotations

import os
import time
import warnings
from urllib.parse import urlparse

from adreg.batch.score import COLUMNS, BatchResult, ModelRef, check_output, collect_inputs
from adreg.registry.resolve import resolve
from adreg.errors import ConfigError, DataError, first_line
from adreg.images import IMAGE_EXTENSIONS

DEFAULT_GLOB = "*.{" + ",".join(e.lstrip(".") for ext in IMAGE_EXTENSIONS for e in (ext, ext.upper())) + "}"
# the model output columns the UDF returns (anomaly maps stay off in batch scoring on Spark)
RESULT_TYPE = "score double, is_anomaly boolean, normal_percentile double, threshold double, error string"


def _is_local(path: str) -> bool:
    scheme = urlparse(path).scheme
    return scheme in ("", "file") or len(scheme) == 1  # "C:" style drive letters count as local


def check_inputs(inputs: list[str]) -> int | None:
    """Local inputs must exist (a one-line DataError before Spark starts); remote ones Spark checks.
    Returns the number of images when every input is local (None otherwise)."""
    local = [p for p in inputs if _is_local(p)]
    found = collect_inputs(local) if local else []
    return len(found) if len(local) == len(inputs) else None


#: at most this many images per task in local mode: Spark's binaryFile scan holds on to memory for every file
#: a task has read until the task ends (measured: a 10,000-image job in 2 tasks ran the 2 GiB JVM heap out of
#: memory at ~7,500 images), so a bounded task keeps the JVM's memory independent of the job size; each
#: task loads the model once (~2-4 s against ~80 s of scoring at 1,000 images)
MAX_IMAGES_PER_TASK = 1000


def local_partitions(slots: int, n_images: int | None) -> int:
    """Tasks for a local-mode job: a multiple of the task slots, each with <= MAX_IMAGES_PER_TASK images."""
    if not n_images:
        return slots
    rounds = -(-n_images // (slots * MAX_IMAGES_PER_TASK))
    return slots * max(1, rounds)


def get_spark(master: str | None = "local[2]", batch_size: int = 16, task_cpus: int = 1,
              app_name: str = "adreg-score", conf: dict | None = None):
    """A SparkSession set up for scoring: Arrow batches of ``batch_size`` rows, ``task_cpus`` torch threads.

    ``master`` None: the one ``spark-submit --master`` gave, else ``local[2]``.
    """
    from pyspark.sql import SparkSession

    builder = SparkSession.builder.appName(app_name)
    if master or "PYSPARK_GATEWAY_PORT" not in os.environ:  # not launched by spark-submit
        builder = builder.master(master or "local[2]")
    builder = (builder
               .config("spark.sql.execution.arrow.pyspark.enabled", "true")
               .config("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
               .config("spark.task.cpus", str(task_cpus))
               .config("spark.executorEnv.OMP_NUM_THREADS", str(task_cpus))
               .config("spark.executorEnv.MKL_NUM_THREADS", str(task_cpus))
               .config("spark.python.worker.reuse", "true")
               # small file splits (~8 images at the 4 MB open cost) so tasks balance by image count
               .config("spark.sql.files.maxPartitionBytes", "32m")
               .config("spark.ui.enabled", "false")
               .config("spark.ui.showConsoleProgress", "false"))
    for key, value in (conf or {}).items():
        builder = builder.config(key, str(value))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(os.environ.get("ADREG_SPARK_LOG_LEVEL", "ERROR"))
    return spark


def _images_frame(spark, inputs: list[str], glob: str):
    """path + content of every image under ``inputs``, without ``*_mask.*`` files (the in-process rule)."""
    from pyspark.sql import functions as F

    try:
        df = (spark.read.format("binaryFile").option("recursiveFileLookup", "true")
              .option("pathGlobFilter", glob).load(list(inputs)))
    except Exception as exc:  # AnalysisException: PATH_NOT_FOUND and friends
        raise DataError(f"Spark cannot read the inputs: {first_line(exc)}") from None
    # plain local paths, as the in-process engine writes them (file:/a/b.png -> /a/b.png); no *_mask.* files
    df = df.withColumn("path", F.regexp_replace("path", "^file:", ""))
    return df.where(~F.regexp_extract("path", r"([^/]*)$", 1).rlike(r"_mask\.[^.]*$"))


def score_with_spark(category: str, inputs: list[str], output: str, alias: str | None = "production",
                     version=None, master: str | None = "local[2]", spark=None, batch_size: int = 16,
                     task_cpus: int = 1, partitions: int | None = None, glob: str = DEFAULT_GLOB,
                     resume: bool = False, device: str = "cpu", env_manager: str = "local",
                     model: ModelRef | None = None) -> BatchResult:
    """Score every image under ``inputs`` on Spark; write ``output`` (parquet dataset, same schema as in-process).

    The registry and the local inputs are checked before Spark starts. ``spark``: an existing session
    (``master``/``task_cpus`` are then ignored; the Arrow batch size is set on it). ``partitions``: how
    many tasks (default: one per task slot in local mode, Spark's file splits on a cluster).
    ``env_manager``: ``local`` (executors run the model in their own Python, which must have the model's
    requirements) or ``virtualenv``/``uv``/``conda`` (MLflow builds the logged environment on each executor
    and scores through a local model server there).
    """
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    ref = model or resolve(category, version, alias)
    if _is_local(output):
        check_output(output, resume)
    n_images = check_inputs(inputs)

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", message="PySpark does not yet fully support pandas")
    import mlflow
    from pyspark.sql import functions as F

    if spark is None:
        spark = get_spark(master, batch_size, task_cpus)
    spark.conf.set("spark.sql.execution.arrow.maxRecordsPerBatch", str(batch_size))
    start = time.perf_counter()
    local_mode = spark.sparkContext.master.startswith("local")
    split_conf = None
    if partitions is None and local_mode:
        # one task per slot (each loads the model once), or a multiple of that for large jobs (bounded
        # images per task, see MAX_IMAGES_PER_TASK); one file per split, so that coalescing balances the
        # tasks by image count (split sizes are fixed when the write below plans the job)
        partitions = local_partitions(spark.sparkContext.defaultParallelism, n_images)
        split_conf = spark.conf.get("spark.sql.files.maxPartitionBytes")
        spark.conf.set("spark.sql.files.maxPartitionBytes", "1m")
    df = _images_frame(spark, inputs, glob)
    skipped = 0
    if resume and _output_exists(spark, output):
        done = spark.read.parquet(output).select("path")
        skipped = df.select("path").join(F.broadcast(done), "path", "left_semi").count()  # lists, reads no bytes
        df = df.join(F.broadcast(done), "path", "left_anti")
    if partitions:
        df = df.coalesce(partitions)

    threads = spark.conf.get("spark.task.cpus", "1")
    udf = mlflow.pyfunc.spark_udf(spark, ref.uri, result_type=RESULT_TYPE, env_manager=env_manager,
                                  model_config={"device": device, "return_map": False},
                                  extra_env={"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    scored = df.select("path", udf(F.base64("content").alias("image")).alias("r"))
    failed = F.col("r.error").isNotNull() & (F.col("r.error") != "")
    out = scored.select(
        F.col("path"),
        F.when(failed, None).otherwise(F.col("r.score")).alias("score"),
        F.when(failed, None).otherwise(F.col("r.is_anomaly")).alias("is_anomaly"),
        F.when(failed, None).otherwise(F.col("r.normal_percentile")).alias("normal_percentile"),
        F.col("r.threshold").alias("threshold"),
        F.lit(ref.name).alias("model_name"),
        F.lit(ref.version).alias("model_version"),
        F.lit(ref.alias).cast("string").alias("model_alias"),
        F.when(failed, F.regexp_replace("r.error", r"^row [0-9]+: ", "")).alias("error"),
    ).select(*COLUMNS)
    before_rows, before_failed = _counts(spark, output) if resume else (0, 0)
    try:
        out.write.mode("append" if resume else "errorifexists").parquet(output)
    finally:
        if local_mode and split_conf is not None:
            spark.conf.set("spark.sql.files.maxPartitionBytes", split_conf)
    rows, failed_rows = _counts(spark, output)
    result = BatchResult(output=output, model=ref, scored=rows - before_rows, failed=failed_rows - before_failed,
                         skipped=skipped, output_rows=rows, output_failed=failed_rows,
                         seconds=time.perf_counter() - start)
    result.extra = {"master": spark.sparkContext.master, "partitions": partitions,
                    "arrow_batch": batch_size, "task_cpus": int(threads)}
    return result


def _output_exists(spark, output: str) -> bool:
    if _is_local(output):
        return os.path.exists(urlparse(output).path if output.startswith("file:") else output)
    jvm = spark.sparkContext._jvm
    path = jvm.org.apache.hadoop.fs.Path(output)
    return path.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration()).exists(path)


def _counts(spark, output: str) -> tuple[int, int]:
    """(rows, rows with an error) of the output, aggregated by Spark (parquet: reads one column)."""
    from pyspark.sql import functions as F

    if not _output_exists(spark, output):
        return 0, 0
    row = spark.read.parquet(output).agg(F.count(F.lit(1)).alias("n"),
                                         F.count("error").alias("failed")).first()
    return int(row["n"]), int(row["failed"])
