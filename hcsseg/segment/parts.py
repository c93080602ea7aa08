"""Work on crops that each hold whole connected parts of a mask.

skimage's reconstruction (h-maxima) and watershed sort or heap every pixel of the image
they are given and grow faster than linearly with it, though what they compute inside
one connected part of the foreground never depends on another part. Running them on
small crops of whole parts and pasting the results back gives the whole-field answer
in a fraction of the time on large fields.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage as ndi
from skimage import morphology, segmentation


def by_parts(
    fn: Callable[..., np.ndarray],
    mask: np.ndarray,
    *arrays: np.ndarray,
    cell: int = 128,
) -> np.ndarray:
    """``fn(*crops, own)`` on crops that each hold whole connected parts of `mask`, pasted
    back where `own` (the crop's parts); 0 elsewhere.

    For work that never crosses the background between parts (the h-maxima of a distance
    map, a watershed restricted to `mask`) this is the whole-field result, and faster:
    skimage's reconstruction and watershed sort or heap every pixel they get and grow
    faster than linearly (at 2160² h-maxima 2.4 -> 0.65 s, bit-equal; the cell watershed
    3.5 -> 2.0 s and the nuclei watershed 0.42 -> 0.25 s, where a tie on a border two
    objects share may fall to the other one: 29 pixels over the 140 DSB2018 fields, AP@0.5
    unchanged). Parts are grouped by the `cell` px grid square their box starts in."""
    parts, n = ndi.label(mask, structure=np.ones((3, 3)))
    out: np.ndarray | None = None
    if not n:
        return np.zeros(mask.shape, dtype=np.uint32)
    boxes = ndi.find_objects(parts)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (ys, xs) in enumerate(boxes, 1):
        groups.setdefault((ys.start // cell, xs.start // cell), []).append(i)
    h_img, w_img = mask.shape
    for ids in groups.values():
        y0 = max(min(boxes[i - 1][0].start for i in ids) - 1, 0)
        y1 = min(max(boxes[i - 1][0].stop for i in ids) + 1, h_img)
        x0 = max(min(boxes[i - 1][1].start for i in ids) - 1, 0)
        x1 = min(max(boxes[i - 1][1].stop for i in ids) + 1, w_img)
        own = np.isin(parts[y0:y1, x0:x1], ids)
        result = fn(*(a[y0:y1, x0:x1] for a in arrays), own)
        if out is None:
            out = np.zeros(mask.shape, dtype=result.dtype)
        region = out[y0:y1, x0:x1]
        region[own] = result[own]
    assert out is not None
    return out


def h_maxima_by_component(dist: np.ndarray, h: float) -> np.ndarray:
    """`skimage.morphology.h_maxima` of a distance map (0 on the background), by parts."""

    def one(crop: np.ndarray, own: np.ndarray) -> np.ndarray:
        return morphology.h_maxima(np.where(own, crop, 0), h).astype(bool)

    return by_parts(one, dist > 0, dist).astype(bool)


def watershed_by_component(
    landscape: np.ndarray, markers: np.ndarray, mask: np.ndarray, *, compactness: float = 0.0
) -> np.ndarray:
    """`skimage.segmentation.watershed(landscape, markers, mask=mask)`, by parts of `mask`."""

    def one(land: np.ndarray, seeds: np.ndarray, own: np.ndarray) -> np.ndarray:
        return segmentation.watershed(
            land, np.where(own, seeds, 0), mask=own, compactness=compactness
        )

    return by_parts(one, mask, landscape, markers)
