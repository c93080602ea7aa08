"""Nucleus markers (centres) from a nucleus-stain image, real or virtual.

Markers seed the annotation-free cell segmentation and let virtual staining be checked
against the real stain object by object. Sizes are in micrometres and converted with
the plate's pixel size, so one setting works across objectives.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage as ndi
from skimage import feature, filters, morphology

from hcsseg.errors import InputDataError

MARKER_COLUMNS = ("y", "x", "y_um", "x_um", "sigma_px", "intensity")


class MarkerOptions(BaseModel):
    """Blob detection settings; lengths in micrometres."""

    model_config = ConfigDict(extra="forbid")

    min_diameter_um: float = Field(5.0, gt=0, description="smallest nucleus to detect")
    max_diameter_um: float = Field(20.0, gt=0, description="largest nucleus to detect")
    method: Literal["log", "dog", "hmax"] = Field(
        "log", description="Laplacian/difference of Gaussians, or h-maxima of the smoothed image"
    )
    threshold: float = Field(
        0.05, gt=0, description="blob strength, in units of the 1-99.8 percentile range"
    )
    min_distance_um: float | None = Field(
        None, description="markers closer than this merge; default: min_diameter_um / 2"
    )

    @model_validator(mode="after")
    def _check(self) -> MarkerOptions:
        if self.min_diameter_um >= self.max_diameter_um:
            raise ValueError("min_diameter_um must be below max_diameter_um")
        return self


# A known-scale image is stretched by its own percentiles at most this much: enough for a
# faint, under-confident virtual stain, too little to turn an empty field's noise into blobs.
MAX_STRETCH = 4.0


def _normalised(image: np.ndarray, value_range: tuple[float, float] | None) -> np.ndarray | None:
    arr = np.asarray(image, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise InputDataError("nucleus image has NaN or infinite pixels")
    lo, hi = (float(v) for v in np.percentile(arr, (1.0, 99.8)))
    if value_range is not None:
        if not value_range[1] > value_range[0]:
            raise InputDataError(f"marker value range must rise, got {value_range}")
        hi = max(hi, lo + (value_range[1] - value_range[0]) / MAX_STRETCH)
    if hi <= lo:
        return None
    return np.clip((arr - lo) / (hi - lo), 0, 1.5)


def detect_markers(
    image: np.ndarray,
    *,
    pixel_size_um: float,
    options: MarkerOptions | None = None,
    value_range: tuple[float, float] | None = None,
) -> pd.DataFrame:
    """One row per detected nucleus centre: pixel and micrometre coordinates, size, strength.

    Each image is scaled by its own 1st/99.8th percentiles, which in a field without nuclei
    stretches noise into blobs; `value_range`, the intensities of background and a bright
    nucleus when they are known (a virtual stain, or the plate-wide range of a real stain),
    caps that stretch at `MAX_STRETCH`."""
    opts = options or MarkerOptions()
    if image.ndim != 2:
        raise InputDataError(f"markers need a 2-D image, got shape {image.shape}")
    if not math.isfinite(pixel_size_um) or pixel_size_um <= 0:
        raise InputDataError(f"pixel size must be positive, got {pixel_size_um}")
    empty = pd.DataFrame({c: pd.Series(dtype=float) for c in MARKER_COLUMNS})
    if image.size == 0:
        return empty
    norm = _normalised(image, value_range)
    if norm is None:
        return empty
    to_px = 1.0 / pixel_size_um
    # A disc of diameter d has its strongest LoG response at sigma = d / (2 * sqrt(2)).
    min_sigma = max(opts.min_diameter_um * to_px / (2 * math.sqrt(2)), 0.5)
    max_sigma = max(opts.max_diameter_um * to_px / (2 * math.sqrt(2)), min_sigma + 0.5)
    if opts.method == "log":
        blobs = feature.blob_log(
            norm,
            min_sigma=min_sigma,
            max_sigma=max_sigma,
            num_sigma=6,
            threshold=opts.threshold,
            overlap=0.5,
            exclude_border=False,
        )
    elif opts.method == "dog":
        blobs = feature.blob_dog(
            norm,
            min_sigma=min_sigma,
            max_sigma=max_sigma,
            threshold=opts.threshold,
            overlap=0.5,
            exclude_border=False,
        )
    else:
        smooth = filters.gaussian(norm, sigma=min_sigma)
        peaks = morphology.h_maxima(smooth, opts.threshold)
        lab, n = ndi.label(peaks)
        centres = np.array(ndi.center_of_mass(peaks, lab, range(1, n + 1))).reshape(-1, 2)
        blobs = np.column_stack([centres, np.full(len(centres), min_sigma)])
    if len(blobs) == 0:
        return empty
    blobs = _merge_close(blobs, (opts.min_distance_um or opts.min_diameter_um / 2) * to_px)
    ys, xs = blobs[:, 0], blobs[:, 1]
    iy = np.clip(np.rint(ys).astype(int), 0, image.shape[0] - 1)
    ix = np.clip(np.rint(xs).astype(int), 0, image.shape[1] - 1)
    return pd.DataFrame(
        {
            "y": ys.astype(float),
            "x": xs.astype(float),
            "y_um": ys * pixel_size_um,
            "x_um": xs * pixel_size_um,
            "sigma_px": blobs[:, 2].astype(float),
            "intensity": norm[iy, ix].astype(float),
        }
    )


def _merge_close(blobs: np.ndarray, distance: float) -> np.ndarray:
    """Keep the larger of two blobs closer than `distance` (one nucleus, two responses)."""
    from scipy.spatial import cKDTree

    if len(blobs) < 2 or distance <= 0:
        return blobs
    order = np.argsort(-blobs[:, 2], kind="stable")
    blobs = blobs[order]
    tree = cKDTree(blobs[:, :2])
    keep = np.ones(len(blobs), bool)
    for i, j in sorted(tree.query_pairs(distance)):
        if keep[i] and keep[j]:
            keep[j] = False
    return blobs[keep]


def gate_markers(markers: pd.DataFrame, mask: np.ndarray, *, radius: float) -> pd.DataFrame:
    """Markers whose surroundings (a square of side 2·radius + 1 px) lie mostly in `mask`.

    DAPI marks every nucleus, but a surface stain (CD3, a membrane marker of one cell type)
    outlines only some cells: a marker outside the stain's foreground seeds a cell the stain
    cannot show, and becomes a false cell. `mask` is that foreground (e.g. the Yu-lab M)."""
    m = np.asarray(mask, dtype=bool)
    if markers.empty:
        return markers
    area = ndi.uniform_filter(m.astype(np.float32), size=max(int(2 * radius + 1), 1))
    y = np.clip(np.rint(markers["y"].to_numpy()).astype(int), 0, m.shape[0] - 1)
    x = np.clip(np.rint(markers["x"].to_numpy()).astype(int), 0, m.shape[1] - 1)
    return markers[area[y, x] >= 0.5].reset_index(drop=True)
