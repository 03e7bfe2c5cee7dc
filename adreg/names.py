"""Names in the registry: one registered model ``adreg-<category>`` per category.

Pure string rules, at the bottom of the package: the served runtime (``adreg.pyfunc``), the registry side
and the CLI all name models through these functions, so the prefix and the category rule exist once.
"""

from __future__ import annotations

import re

from adreg.errors import ConfigError

PREFIX = "adreg-"
ROUTER = "router"  # registered as adreg-router: the multi-category router model; reserved, not a category
CATEGORY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
LIFECYCLE_SUFFIX = "/lifecycle"
MONITORING_SUFFIX = "-monitoring"
REVIEWS_SUFFIX = "/reviews"


def check_category(category: str) -> str:
    """``category`` when it is a valid name (1-63 letters, digits, ``_ - .``, starting alphanumeric); else
    ``ConfigError``."""
    if not CATEGORY_RE.match(category or ""):
        raise ConfigError(f"category {category!r} must be 1-63 letters, digits, '_', '-' or '.', starting alphanumeric")
    return category


def model_name(category: str) -> str:
    """The registered model of a category: ``adreg-<category>`` (``adreg-router`` for the router)."""
    return PREFIX + check_category(category)


def category_of(name: str) -> str | None:
    """The category of a registered model name, or None when it is not an adreg model."""
    return name[len(PREFIX):] if name and name.startswith(PREFIX) else None


def fit_experiment_name(category: str) -> str:
    """The experiment holding a category's fit and update runs (same name as its registered model)."""
    return model_name(category)


def lifecycle_experiment_name(category: str) -> str:
    """One experiment per category holds its lifecycle events, one run each ('/' cannot be in a category)."""
    return model_name(category) + LIFECYCLE_SUFFIX


def monitoring_experiment_name(category: str) -> str:
    """Where drift checks of a category are logged."""
    return model_name(category) + MONITORING_SUFFIX


def reviews_experiment_name(category: str) -> str:
    """One experiment per category holds its review labels, one run each (``adreg.registry.labels``)."""
    return model_name(category) + REVIEWS_SUFFIX
