"""The one check every box read from a file or a shard passes before it reaches RoIAlign.

`torchvision.ops.roi_align` crashes the process on CPU for NaN / Inf coordinates and silently
pools zeros for huge ones, and an inverted box pools garbage, so `eval` and `train` hand it
only boxes that are four finite numbers, x1 < x2 and y1 < y2, clamped to the image.
"""

from __future__ import annotations

import math
from numbers import Real

from pipeline.errors import shown

# Clamping a box that pokes a little past the border (detector rounding) keeps what it meant;
# a box that lies mostly off the image is a wrong box, not a region of this image.
MIN_SHARE_INSIDE = 0.5

BOX_REASONS = ("box_not_four_numbers", "box_not_finite", "box_not_positive_size", "box_outside_image")


def check_box(box, width: float = 1.0, height: float = 1.0) -> tuple[list[float] | None, tuple[str, str] | None]:
    """(x1, y1, x2, y2 clamped to [0, width] x [0, height], None), or (None, (reason, detail)).

    `box` is untrusted: any value (a string, NaN, 1e308, a bool) gives a reason, never an error.
    Normalised boxes use the default 1 x 1 image."""
    if isinstance(box, (str, bytes, dict)) or not hasattr(box, "__len__") or len(box) != 4:
        return None, ("box_not_four_numbers", f"box {shown(box)} is not [x1, y1, x2, y2]")
    if not all(isinstance(v, Real) and not isinstance(v, bool) for v in box):
        return None, ("box_not_four_numbers", f"box {shown(box)} holds a value that is not a number")
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except OverflowError:  # an integer beyond float range
        x1 = y1 = x2 = y2 = math.inf
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None, ("box_not_finite", f"box {shown(box)} holds NaN or infinity")
    if not (x1 < x2 and y1 < y2):
        return None, ("box_not_positive_size", f"box {shown(box)} needs x1 < x2 and y1 < y2")
    inside = [max(0.0, x1), max(0.0, y1), min(float(width), x2), min(float(height), y2)]
    # the area in floats: (x2 - x1) may overflow to inf for |coordinates| near 1e308, which still
    # compares correctly (a finite area inside is no share of an infinite one)
    area = (x2 - x1) * (y2 - y1)
    kept = max(0.0, inside[2] - inside[0]) * max(0.0, inside[3] - inside[1])
    if kept <= 0.0 or kept < MIN_SHARE_INSIDE * area:
        return None, ("box_outside_image", f"box {shown(box)} lies mostly outside the {width:g} x {height:g} image")
    return inside, None
