"""adreg: few-shot visual anomaly detection models, tracked, registered and served with MLflow.

The public API (``adreg.api``, loaded on first use so ``import adreg`` stays light)::

    import adreg
    out = adreg.fit("bottle", k_shot=1, register=True, promote="production")
    detector = adreg.load("bottle")                       # production's AnomalyDetector, verified
    adreg.predict("bottle", ["part.png"]).rows

Functions: fit, tune, promote, rollback, update, load, predict, score, serve, resolve, models, history, compare,
export, bundle, drift, status, grant, whoami; reviews: label, labels, production_set, quality, threshold,
review; errors in ``adreg.errors``. ``help(adreg.fit)`` documents each. What they return: ``VersionOutcome``
(every function that makes a version: version, run_id, model_uri, promoted, gate) and its subclasses
``FitOutcome``, ``TuneOutcome``, ``UpdateOutcome``, ``ThresholdOutcome``; ``PromoteOutcome``, ``PredictOutcome``;
``ModelRef`` (resolve), ``BatchResult`` (score), ``DriftReport`` (drift), ``Label`` (label, labels),
``ProductionSet`` (production_set).
"""

__version__ = "0.1.0"

_API = ("fit", "tune", "promote", "rollback", "update", "load", "predict", "score", "serve", "resolve", "models", "history",
        "compare", "export", "bundle", "drift", "status", "grant", "whoami", "label", "labels", "production_set",
        "quality", "threshold", "review", "VersionOutcome", "FitOutcome", "TuneOutcome", "UpdateOutcome",
        "ThresholdOutcome", "PromoteOutcome", "PredictOutcome", "FitOptions", "GatePolicy")
#: result types of the API, from the modules that make them
_TYPES = {"ModelRef": "adreg.registry.resolve", "BatchResult": "adreg.batch.score",
          "DriftReport": "adreg.monitoring.drift", "Label": "adreg.registry.labels",
          "ProductionSet": "adreg.registry.labels"}
__all__ = ["__version__", "errors", *_API, *_TYPES]


def __getattr__(name):
    if name in _API:
        from adreg import api

        return getattr(api, name)
    if name in _TYPES:
        import importlib

        return getattr(importlib.import_module(_TYPES[name]), name)
    if name == "errors":
        import adreg.errors as errors

        return errors
    raise AttributeError(f"module 'adreg' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
