"""Reviewing what the line's served model scored: the capture queue (``queue``), its browser page (``app``:
routes only), the page's store connection, logins and labels (``state``), the labels kept while the store is
down (``journal``), the overlays (``overlays``), the threshold from the line (``threshold``) and production
quality per version (``quality``).

``build_app`` and ``run`` are imported on first use, so that importing a module of this package does not load
the web stack.
"""

from __future__ import annotations

__all__ = ["build_app", "run"]


def __getattr__(name: str):
    if name in __all__:
        from adreg.review import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
