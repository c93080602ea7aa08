"""Exact Euclidean distance to the background, several times faster than scipy's.

`scipy.ndimage.distance_transform_edt` spends 0.6 CPU s on a 2160² mask; OpenCV's exact
transform (`DIST_MASK_PRECISE`, Felzenszwalb's algorithm) takes 0.09 s. Its float32
distances are the square roots of whole numbers, so squaring and rounding recovers each
pixel's integer squared distance and `np.sqrt` of it in float64 is scipy's value bit for bit:
every threshold, h-maximum and watershed downstream is unchanged.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
from scipy import ndimage as ndi

# OpenCV runs its own thread pool and ignores OMP_NUM_THREADS; a worker given one core
# (the Dask and Prefect deployments set that variable) must not take two.
if os.environ.get("OMP_NUM_THREADS", "").isdigit():
    cv2.setNumThreads(max(int(os.environ["OMP_NUM_THREADS"]), 1))

# Below this distance float32 rounding moves a squared distance by less than 0.5, so the
# integer is recovered exactly (2 d² 2**-24 < 0.5); beyond it scipy is asked instead.
_EXACT_UP_TO = 2000.0


def distance_to_background(mask: np.ndarray) -> np.ndarray:
    """float64 Euclidean distance of every foreground pixel of a 2-D boolean mask to the
    nearest background pixel (0 on the background), equal to
    `scipy.ndimage.distance_transform_edt(mask)`."""
    fg = np.asarray(mask, dtype=bool)
    if fg.ndim != 2 or fg.all() or not fg.any():
        # no background: scipy's convention (distance to a virtual border) is kept
        return ndi.distance_transform_edt(fg)
    binary = np.ascontiguousarray(fg).view(np.uint8)
    approx = cv2.distanceTransform(binary, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    if float(approx.max()) > _EXACT_UP_TO:
        return ndi.distance_transform_edt(fg)
    squared = approx.astype(np.float64)
    np.square(squared, out=squared)
    np.rint(squared, out=squared)
    return np.sqrt(squared, out=squared)
