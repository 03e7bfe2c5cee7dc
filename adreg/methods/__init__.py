"""Anomaly methods behind one interface; ``build_method`` makes one from its name and params."""

from __future__ import annotations

from adreg.errors import ConfigError
from adreg.methods.base import AnomalyMethod
from adreg.methods.foundad import FoundAD
from adreg.methods.knn import PatchKNN
from adreg.methods.rad import RAD
from adreg.methods.spg import SPG
from adreg.methods.subspace import SubspaceAD

METHODS: dict[str, type[AnomalyMethod]] = {cls.name: cls for cls in (SubspaceAD, RAD, FoundAD, SPG, PatchKNN)}


def build_method(name: str, **params) -> AnomalyMethod:
    try:
        cls = METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose from {sorted(METHODS)}") from None
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"bad parameters for method {name!r}: {exc}") from None


__all__ = ["AnomalyMethod", "METHODS", "build_method"]
