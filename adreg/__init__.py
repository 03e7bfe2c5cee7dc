"""adreg: few-shot visual anomaly detection models, tracked, registered and served with MLflow."""

__version__ = "0.1.0"
