"""Model-from-code entry point: MLflow runs this file to build the pyfunc model (no pickling)."""

import mlflow

from adreg.pyfunc.served import AnomalyDetectorModel

mlflow.models.set_model(AnomalyDetectorModel())
