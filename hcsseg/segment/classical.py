"""Classical (annotation-free) nucleus and cell segmentation.

Reference behaviour is CellProfiler's IdentifyPrimaryObjects (global threshold, shape-based
declumping, size filter) and IdentifySecondaryObjects (Propagation).  It is the baseline every
learned model is compared against and the fallback when no model fits a plate, so every
parameter is expressed in micrometres and converted with the plate's pixel size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage as ndi
from skimage import color, filters, morphology, segmentation

from hcsseg.errors import InputDataError

ThresholdMethod = Literal["otsu", "li", "triangle"]

_THRESHOLDS: dict[str, Callable[[np.ndarray], float]] = {
    "otsu": filters.threshold_otsu,
    "li": filters.threshold_li,
    "triangle": filters.threshold_triangle,
}

# Offset added before a log transform, as a fraction of the normalised range: large enough that
# camera noise around zero does not dominate the log histogram.
_LOG_OFFSET = 0.01

# Percentile taken as the black level: the few darkest pixels (dead pixels, stitching seams)
# must not set the zero of the log transform.  The bright end is the maximum, not a percentile,
# so a field with a single nucleus is not stretched until its noise looks like objects.
_BLACK_PERCENTILE = 0.5


class NucleiOptions(BaseModel):
    """Parameters of `segment_nuclei`; lengths are in micrometres.

    Defaults were chosen on all 140 DSB2018 images at an assumed 0.5 µm/px (AP@0.5 0.74;
    0.73 at 0.4 or 0.6 µm/px), without per-image tuning.  Compared with CellProfiler's
    defaults, the lowered threshold (0.8) and a wide diameter range gained most.
    """

    model_config = ConfigDict(extra="forbid")

    min_diameter_um: float = Field(3.0, gt=0, description="smallest nucleus kept")
    max_diameter_um: float = Field(40.0, gt=0, description="largest nucleus kept")
    smoothing_sigma_um: float | None = Field(
        None,
        ge=0,
        description="Gaussian sigma before thresholding; None = min_diameter_um / 8",
    )
    threshold_method: ThresholdMethod = "otsu"
    threshold_correction: float = Field(
        0.8,
        gt=0,
        description="multiplies the automatic threshold (CellProfiler's correction factor); "
        "below 1 keeps the dim rim of each nucleus that a plain Otsu split cuts off",
    )
    log_transform: bool = Field(
        False, description="threshold the log of the image (for a wide range of brightness)"
    )
    seed_h_um: float = Field(
        0.5,
        ge=0,
        description="h of the h-maxima transform of the distance map: a neck must be at least "
        "this much narrower than both lobes for a clump to be split",
    )
    fill_holes: bool = True
    exclude_border: bool = Field(False, description="drop nuclei touching the image border")
    filter_by_size: bool = Field(True, description="drop objects outside the diameter range")

    @model_validator(mode="after")
    def _check_range(self) -> NucleiOptions:
        if self.min_diameter_um >= self.max_diameter_um:
            raise ValueError(
                f"min_diameter_um ({self.min_diameter_um}) must be below "
                f"max_diameter_um ({self.max_diameter_um})"
            )
        return self


class CellOptions(BaseModel):
    """Parameters of `segment_cells`; lengths are in micrometres."""

    model_config = ConfigDict(extra="forbid")

    method: Literal["propagation", "distance", "stain"] = Field(
        "propagation",
        description="propagation: seeded watershed on the cell-stain gradient inside the "
        "stain's foreground; distance: grow each nucleus by max_expansion_um; stain: cells "
        "from the cell stain alone (`segment_cells_from_stain`), for surface stains that "
        "label only some cells while the nucleus stain shows all",
    )
    max_expansion_um: float = Field(
        20.0, ge=0, description="no cell pixel is further than this from its nucleus"
    )
    threshold_method: ThresholdMethod = "otsu"
    threshold_correction: float = Field(1.0, gt=0)
    log_transform: bool = Field(
        True,
        description="threshold the log of the stain: cell-body stains span a wide range of "
        "brightness and a linear Otsu split drops the dim cells",
    )
    smoothing_sigma_um: float = Field(1.0, ge=0, description="Gaussian sigma on the cell stain")
    regularization: float = Field(
        0.01,
        ge=0,
        description="weight of distance against intensity gradient (CellProfiler's propagation "
        "lambda): 0 follows image edges only, large values approach a Voronoi split",
    )


class StainCellOptions(BaseModel):
    """Parameters of `segment_cells_from_stain`; lengths in micrometres.

    Defaults were picked on the 5 training fields of dense-cells (CD3/CD4/CD8 surface stains
    of T cells in skin, 0.5 µm/px) without looking at the test fields."""

    model_config = ConfigDict(extra="forbid")

    smoothing_sigma_um: float = Field(0.5, ge=0, description="Gaussian sigma on the stain")
    threshold_correction: float = Field(
        0.5,
        gt=0,
        description="multiplies Otsu's threshold: low, so the dim parts of a membrane ring "
        "still close it and hole filling recovers the cell body",
    )
    membrane_weight_um: float = Field(
        2.5,
        ge=0,
        description="how many micrometres of distance-to-background one unit of normalised "
        "stain intensity is worth in the watershed landscape: cells touching along a bright "
        "shared membrane are split there, not at their narrowest neck",
    )
    seed_h_um: float = Field(0.25, ge=0, description="h-maxima height of the landscape")
    min_diameter_um: float = Field(3.0, gt=0, description="smaller objects are dropped")


def segment_cells_from_stain(
    image: np.ndarray, *, pixel_size_um: float, options: StainCellOptions | None = None
) -> np.ndarray:
    """Cells outlined by a surface or membrane stain, found without any nucleus.

    The stain's foreground (Otsu × correction on the smoothed stain) has its holes filled,
    since a ring stain draws a cell's rim and leaves its inside dark. Inside, the landscape
    is the distance to the background minus the weighted stain intensity, so the seeds are
    cell centres and the flooding meets at bright shared membranes. uint32 ids 1..N."""
    opts = options or StainCellOptions()
    _check_pixel_size(pixel_size_um)
    grey = _as_float_2d(image, "cell image")
    norm = _normalise_percentiles(grey)
    if norm is None:
        return np.zeros(grey.shape, dtype=np.uint32)
    um = 1.0 / pixel_size_um
    sigma = opts.smoothing_sigma_um * um
    smooth = filters.gaussian(norm, sigma=sigma) if sigma > 0 else norm
    mask = ndi.binary_fill_holes(
        smooth > opts.threshold_correction * filters.threshold_otsu(smooth)
    )
    min_area = np.pi * (opts.min_diameter_um * um) ** 2 / 4
    mask = morphology.remove_small_objects(mask, max_size=int(min_area))
    if not mask.any():
        return np.zeros(grey.shape, dtype=np.uint32)
    landscape = ndi.distance_transform_edt(mask) - opts.membrane_weight_um * um * smooth
    seeds = morphology.h_maxima(landscape, opts.seed_h_um * um).astype(bool) & mask
    merged, _ = ndi.label(ndi.binary_dilation(seeds, morphology.disk(2)) & mask)
    cells = segmentation.watershed(-landscape, np.where(seeds, merged, 0), mask=mask)
    out, _, _ = segmentation.relabel_sequential(drop_small_objects(cells, min_area))
    return out.astype(np.uint32)


def drop_small_objects(labels: np.ndarray, min_area: float) -> np.ndarray:
    """Labels with the objects below `min_area` pixels set to background (ids unchanged)."""
    if min_area <= 0:
        return labels
    small = np.bincount(labels.ravel()) < min_area
    small[0] = False
    return np.where(small[labels], 0, labels)


def segment_nuclei(
    image: np.ndarray, *, pixel_size_um: float, options: NucleiOptions | None = None
) -> np.ndarray:
    """Label nuclei in a nuclear-stain image (bright objects on a dark background).

    2-D images are taken as fluorescence.  RGB(A) images (H&E, bright field) are converted to
    grey and inverted when their median is above the middle of their range, i.e. when the
    background is bright, so that nuclei become the bright phase.  A constant image has no
    objects and gives all-zero labels.  Returns uint32 labels with ids 1..N.
    """
    opts = options or NucleiOptions()
    _check_pixel_size(pixel_size_um)
    grey = _nuclear_grey(image)
    labels = np.zeros(grey.shape, dtype=np.uint32)
    norm = _normalise(grey)
    if norm is None:
        return labels

    um = 1.0 / pixel_size_um  # pixels per micrometre
    min_d, max_d = opts.min_diameter_um * um, opts.max_diameter_um * um
    sigma = (
        opts.smoothing_sigma_um if opts.smoothing_sigma_um is not None else opts.min_diameter_um / 8
    ) * um
    smooth = filters.gaussian(norm, sigma=sigma) if sigma > 0 else norm
    mask = _threshold(smooth, opts.threshold_method, opts.threshold_correction, opts.log_transform)
    if opts.fill_holes:
        mask = ndi.binary_fill_holes(mask)
    if not mask.any():
        return labels

    dist = ndi.distance_transform_edt(mask)
    seeds = morphology.h_maxima(dist, opts.seed_h_um * um).astype(bool) & mask
    # Merge seeds closer than the smallest diameter: two maxima that close belong to one
    # nucleus with an irregular outline, not to two nuclei.
    radius = max(round(min_d / 2), 1)
    merged, _ = ndi.label(ndi.binary_dilation(seeds, morphology.disk(radius)) & mask)
    markers = np.where(seeds, merged, 0)
    objects = segmentation.watershed(-dist, markers, mask=mask)
    # Components too thin to hold an h-maximum get no seed; keep them as their own objects so
    # the size filter, not the seeding, decides their fate.
    orphans, n_orphans = ndi.label(mask & (objects == 0))
    if n_orphans:
        objects = np.where(orphans > 0, orphans + objects.max(), objects)

    if opts.filter_by_size:
        areas = np.bincount(objects.ravel())
        keep = (areas >= np.pi * min_d**2 / 4) & (areas <= np.pi * max_d**2 / 4)
        keep[0] = False
        objects = np.where(keep[objects], objects, 0)
    if opts.exclude_border:
        objects = segmentation.clear_border(objects)
    relabelled, _, _ = segmentation.relabel_sequential(objects)
    labels[...] = relabelled
    return labels


def segment_cells(
    nuclei: np.ndarray,
    image: np.ndarray | None,
    *,
    pixel_size_um: float,
    options: CellOptions | None = None,
) -> np.ndarray:
    """Grow each nucleus into its cell; every cell keeps its nucleus's id and contains it.

    With `image=None` (no cell-body stain) or `method="distance"` each nucleus is expanded by
    `max_expansion_um` without overlap (`skimage.segmentation.expand_labels`).  Propagation
    floods the Sobel gradient of the smoothed stain from the nuclei, restricted to the stain's
    thresholded foreground and to `max_expansion_um` around the nuclei; the watershed's
    compactness plays the part of CellProfiler's regularisation lambda.  Returns uint32.
    """
    opts = options or CellOptions()
    _check_pixel_size(pixel_size_um)
    seeds = _check_labels(nuclei, "nuclei")
    reach = opts.max_expansion_um / pixel_size_um
    if not seeds.any():
        return np.zeros(seeds.shape, dtype=np.uint32)
    if opts.method == "stain" and image is not None:
        from hcsseg.segment.methods import adopt_nucleus_ids  # methods imports this module

        if np.shape(image) != seeds.shape:
            raise InputDataError(
                f"cell image shape {np.shape(image)} does not match nuclei labels shape "
                f"{seeds.shape}"
            )
        return adopt_nucleus_ids(
            segment_cells_from_stain(image, pixel_size_um=pixel_size_um), seeds
        )
    if image is None or opts.method == "distance":
        return segmentation.expand_labels(seeds, distance=reach).astype(np.uint32)

    grey = _as_float_2d(image, "cell image")
    if grey.shape != seeds.shape:
        raise InputDataError(
            f"cell image shape {grey.shape} does not match nuclei labels shape {seeds.shape}"
        )
    near = ndi.distance_transform_edt(seeds == 0) <= reach
    norm = _normalise(grey)
    if norm is None:  # flat stain: nothing to follow, only distance is left
        return segmentation.expand_labels(seeds, distance=reach).astype(np.uint32)
    sigma = opts.smoothing_sigma_um / pixel_size_um
    smooth = filters.gaussian(norm, sigma=sigma) if sigma > 0 else norm
    foreground = _threshold(
        smooth, opts.threshold_method, opts.threshold_correction, opts.log_transform
    )
    mask = (foreground & near) | (seeds > 0)
    # Marker pixels keep their label in a watershed, so each cell contains its nucleus.
    cells = segmentation.watershed(
        filters.sobel(smooth), seeds, mask=mask, compactness=opts.regularization
    )
    return cells.astype(np.uint32)


def _check_pixel_size(pixel_size_um: float) -> None:
    if not np.isfinite(pixel_size_um) or pixel_size_um <= 0:
        raise InputDataError(f"pixel_size_um must be a positive number, got {pixel_size_um!r}")


def _as_float_2d(image: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype.kind not in "biuf":
        raise InputDataError(f"{what} has unsupported dtype {arr.dtype}; expected numbers")
    if arr.ndim != 2:
        raise InputDataError(f"{what} must be 2-D (Y, X), got shape {arr.shape}")
    if arr.size == 0:
        raise InputDataError(f"{what} is empty (shape {arr.shape})")
    out = arr.astype(np.float64)
    if not np.isfinite(out).all():
        raise InputDataError(f"{what} contains NaN or infinite pixel values")
    return out


def _nuclear_grey(image: np.ndarray) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.dtype.kind in "uif":
        rgb = arr[..., :3].astype(np.float64)
        if not np.isfinite(rgb).all():
            raise InputDataError("nuclear image contains NaN or infinite pixel values")
        grey = color.rgb2gray(rgb / max(float(rgb.max()), 1e-12))
        lo, hi = float(grey.min()), float(grey.max())
        if np.median(grey) > (lo + hi) / 2:
            grey = hi - grey
        return grey
    return _as_float_2d(arr, "nuclear image")


def _check_labels(labels: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 2:
        raise InputDataError(f"{what} labels must be 2-D (Y, X), got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise InputDataError(f"{what} labels must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() > np.iinfo(np.uint32).max):
        raise InputDataError(f"{what} label ids must lie in 0..2**32-1")
    return arr.astype(np.int64)


def _normalise(image: np.ndarray) -> np.ndarray | None:
    """Scale to [0, 1] from a robust black level to the maximum; None when there is no contrast."""
    lo, hi = float(np.percentile(image, _BLACK_PERCENTILE)), float(image.max())
    if hi <= lo:
        lo, hi = float(image.min()), float(image.max())
        if hi <= lo:
            return None
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0)


def _normalise_percentiles(image: np.ndarray) -> np.ndarray | None:
    """[0, 1] from the 1st to the 99.8th percentile (a few saturated membrane pixels must not
    set the scale of a whole stain); None without contrast."""
    lo, hi = np.percentile(image, (1.0, 99.8))
    if hi <= lo:
        return _normalise(image)
    return np.clip((image - lo) / (hi - lo), 0.0, 1.0)


def _threshold(image: np.ndarray, method: str, correction: float, log: bool) -> np.ndarray:
    """Foreground of a [0, 1] image; the correction factor scales the linear threshold."""
    if log:
        level = float(np.exp(_THRESHOLDS[method](np.log(image + _LOG_OFFSET)))) - _LOG_OFFSET
    else:
        level = float(_THRESHOLDS[method](image))
    return image > level * correction
