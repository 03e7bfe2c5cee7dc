"""Batch scoring of image archives with a registered model: in-process (``score_images``) or on Apache
Spark (``adreg.batch.spark.score_with_spark``, needs the ``spark`` extra). Both write the same parquet
schema (``SCHEMA``), one row per image."""

from adreg.batch.score import SCHEMA, BatchResult, ModelRef, collect_inputs, score_images

__all__ = ["SCHEMA", "BatchResult", "ModelRef", "collect_inputs", "score_images"]
