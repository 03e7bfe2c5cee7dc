"""The served-model runtime: the MLflow pyfunc models (single category: ``served``; multi-category
router: ``router``) and their model-from-code entry points (``_model_code.py``, ``_router_code.py``);
following the registry (``follow``), server status reports (``status``), shadow scoring (``shadow``)
and capture of scored images (``capture``).

The documented serving defaults live here (no heavy imports), so the CLI can show them cheaply."""

DEFAULT_MAX_REQUEST_MIB = 32   # base64 image text per request; more is refused with 413
DEFAULT_MAX_ROWS = 256         # rows per request; more is refused with 400
DEFAULT_POLL_SECONDS = 2.0     # how often a following server checks its alias
