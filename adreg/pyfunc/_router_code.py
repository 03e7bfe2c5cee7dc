"""Model-from-code entry point of the multi-category router."""

import mlflow

from adreg.pyfunc.router import CategoryRouterModel

mlflow.models.set_model(CategoryRouterModel())
