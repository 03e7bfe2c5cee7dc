"""Progress bars: adreg's own, on a terminal, off with ``ADREG_PROGRESS=0`` (tests, CI, servers never print them)."""

from __future__ import annotations

import os


def progress_enabled() -> bool:
    return os.environ.get("ADREG_PROGRESS", "1") not in ("0", "false", "False")


class Bar:
    """A tqdm bar when progress is on, a no-op otherwise (serving never prints bars)."""

    def __init__(self, total: int, desc: str, show: bool, unit: str = "img"):
        """``total`` units (tqdm shows the rate and the ETA from it); ``unit`` names them (img, view)."""
        self.bar = None
        if show and progress_enabled():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False)

    def __call__(self, n: int, **postfix) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
