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
    """The method ``name`` with hyper-parameters ``params``; ``ConfigError`` for an unknown method or parameter
    name (checked against the constructor's signature, so an error inside the constructor is not mistaken for
    a bad parameter)."""
    import inspect

    try:
        cls = METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}; choose from {sorted(METHODS)}") from None
    accepted = {k for k, p in inspect.signature(cls).parameters.items()
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ConfigError(f"bad parameters for method {name!r}: unknown {', '.join(unknown)}; "
                          f"it takes {', '.join(sorted(accepted)) or 'none'}")
    return cls(**params)


__all__ = ["AnomalyMethod", "METHODS", "build_method"]
