"""Serving helpers: a REST client for models served by `adreg serve` / `mlflow models serve`."""
