"""The MLflow registry side of adreg: what logs, registers, promotes and governs model versions.

``derive`` (the one path to a version: log the pyfunc model, register it with its lineage, gate and promote),
``tracking`` (where runs go, what a fit's run records), ``versions`` (registered versions, aliases, lifecycle events),
``lifecycle`` (promotion gate, rollback, compare), ``update`` (grow a registered version from new goods),
``lineage`` and ``manifest`` (what a model was fitted on / grown from, training-image manifests),
``governance`` (users, permissions, identity), ``auth_app`` (the ``adreg-auth`` MLflow server app),
``bundle`` (router bundles) and ``export`` (log an exported-runtime version).

Import the modules themselves (``from adreg.registry import tracking, versions``): this package re-exports
nothing, so ``mlflow server --app-name adreg-auth`` loads ``auth_app`` without the rest. The served-model
runtime (``adreg.pyfunc``) never imports this package; it is the registry side that logs it.
"""
