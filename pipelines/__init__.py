"""The MLflow project's entry points (MLproject): fit, evaluate, update. The benchmarks are in ``benchmarks``."""
