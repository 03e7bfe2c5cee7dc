"""The one resolver: "category + version | alias" -> one registered model version, and its detector.

Every command that names a model goes through ``resolve`` (a ``ModelRef`` pinned to one version, with the
registry's helpful errors: unknown category with the registered ones, unknown version with the existing
ones, missing alias with the aliases there are) and loads it with ``load_detector`` (downloaded and
integrity-verified). Errors from the store keep their type (``adreg.store.translate``): a refused read is a
``PermissionDenied``, a store that is down ``StoreUnreachable``; only a model that is not there is
``NotFoundError``.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlflow
from mlflow.exceptions import MlflowException

from adreg import store
from adreg.errors import NotFoundError
from adreg.names import PREFIX, ROUTER, check_category, model_name


@dataclass(frozen=True)
class ModelRef:
    """A registered model pinned to one version (``adreg.resolve`` returns one).

    Attributes:
        category: the product, e.g. ``bottle``.
        name: the registered model, ``adreg-<category>``.
        version: the pinned version number, as a string.
        alias: the alias it was resolved from (``production``); None when a version number was asked.

    Examples:
        ```python
        ref = adreg.resolve("bottle")              # whatever production points at now
        print(ref.version, ref.uri)                # '3' models:/adreg-bottle/3 (stays on 3)
        print(ref.alias_uri)                       # models:/adreg-bottle@production (follows the alias)
        ```
    """

    category: str
    name: str
    version: str
    alias: str | None = None

    @property
    def uri(self) -> str:
        """``models:/adreg-<category>/<version>``: the pinned version, whatever the alias does next."""
        return f"models:/{self.name}/{self.version}"

    @property
    def alias_uri(self) -> str | None:
        return None if self.alias is None else f"models:/{self.name}@{self.alias}"

    def describe(self) -> str:
        return f"{self.name} version {self.version}" + (f" (@{self.alias})" if self.alias else "")


def client() -> mlflow.MlflowClient:
    return mlflow.MlflowClient()


def categories() -> list[str]:
    """Registered categories (the router excluded), sorted."""
    try:
        models = client().search_registered_models(filter_string=f"name LIKE '{PREFIX}%'")
    except MlflowException as exc:
        raise store.translate(exc, "listing registered models") or exc from exc
    return sorted(m.name[len(PREFIX):] for m in models if m.name != PREFIX + ROUTER)


def get_model(category: str):
    """The registered model of ``category``; ``NotFoundError`` (listing the registered ones) when there is none."""
    name = model_name(category)
    try:
        return client().get_registered_model(name)
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise store.translate(exc, f"reading {name}") or exc from exc
    known = categories()
    hint = f"registered categories: {', '.join(known)}" if known else "no category is registered yet"
    if category == ROUTER:
        raise NotFoundError(f"no router is registered ({hint}); bundle one with `adreg serve-bundle CATEGORY...`")
    raise NotFoundError(f"unknown category {category!r} ({hint}); fit one with `adreg fit --register`")


def existing_versions(category: str) -> list[int]:
    return sorted(int(v.version) for v in client().search_model_versions(f"name='{model_name(category)}'"))


def check_version(category: str, version) -> str:
    """``version`` as a string when ``adreg-<category>`` has it; else ``NotFoundError`` listing the versions."""
    name = model_name(category)
    try:
        return str(client().get_model_version(name, str(int(version))).version)
    except ValueError:
        pass
    except MlflowException as exc:
        if getattr(exc, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            raise store.translate(exc, f"reading {name} version {version}") or exc from exc
    get_model(category)  # an unknown category says so first
    raise NotFoundError(f"{name} has no version {version!r}; versions: {existing_versions(category) or 'none'}")


def resolve(category: str, version=None, alias: str | None = "production") -> ModelRef:
    """Pin ``category`` to one version: ``version`` when given (it wins), else the version ``alias`` points at.

    Raises ``NotFoundError`` for an unknown category, version or alias (saying what exists, and when the
    alias pointed at a version that has since been deleted)."""
    check_category(category)
    name = model_name(category)
    if version is not None and str(version) != "":
        return ModelRef(category, name, check_version(category, version), None)
    if not alias:
        raise NotFoundError(f"give a version or an alias of {name}")
    model = get_model(category)
    if alias not in model.aliases:
        from adreg.registry.events import read_events  # the history knows where the alias pointed before

        last = next((e for e in reversed(read_events(category)) if e.get("alias") == alias), None)
        have = {str(v) for v in existing_versions(category)}
        if last is not None and str(last["version"]) not in have:
            raise NotFoundError(f"{name}@{alias} pointed at version {last['version']}, which has been deleted; "
                                f"promote another version or run `adreg rollback {category} --alias {alias}`")
        listed = ", ".join(f"{a} -> v{v}" for a, v in sorted(model.aliases.items())) or "none"
        raise NotFoundError(f"{name} has no alias {alias!r} (aliases: {listed}); "
                            f"promote a version with `adreg promote {category} --version N --alias {alias}`")
    return ModelRef(category, name, check_version(category, model.aliases[alias]), alias)


def load_detector(ref: ModelRef, device: str = "auto"):
    """The ``AnomalyDetector`` of a pinned version: downloaded, checked against the artifact digest recorded
    on the version (``IntegrityError`` when a file differs), loaded on ``device``."""
    from adreg.detector import AnomalyDetector

    return AnomalyDetector.load(store.download_detector(ref.name, ref.version), device=device, verified=True)


def model_version(ref: ModelRef):
    """MLflow's ModelVersion entity of a pinned version (tags, run id, source)."""
    return client().get_model_version(ref.name, ref.version)
