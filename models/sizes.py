"""Model sizes and layer widths, without TensorFlow: shared by the Keras members and the PyTorch reference."""

from __future__ import annotations

from typing import Literal

Size = Literal["full", "small", "tiny"]
SIZES: dict[str, float] = {"full": 1.0, "small": 0.25, "tiny": 0.125}


def units(n: int, size: Size) -> int:
    """``n`` (the full-size width) scaled to ``size``, never below 4."""
    return max(4, int(round(n * SIZES[size])))
