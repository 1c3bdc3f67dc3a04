"""A tqdm progress bar for training loops (or nothing when disabled)."""

from __future__ import annotations


class ProgressBar:
    """tqdm on stderr from step `start` of `total`, with a postfix of named
    values (e.g. loss, steps/s, meta-loss); a no-op when `enabled` is False."""

    def __init__(self, enabled: bool, start: int, total: int, unit: str = "step"):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, unit=unit, dynamic_ncols=True)

    def update(self, **postfix: float) -> None:
        """Advances one step and shows `postfix` (floats, 4 decimals)."""
        if self._bar is not None:
            shown = {
                k: f"{v:.4f}" if isinstance(v, float) else v for k, v in postfix.items()
            }
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
