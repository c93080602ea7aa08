"""Classical (annotation-free) nucleus and cell segmentation.

Reference behaviour is CellProfiler's IdentifyPrimaryObjects (global threshold, shape-based
declumping, size filter) and IdentifySecondaryObjects (Propagation).  It is the baseline every
learned model is compared against and the fallback when no model fits a plate, so every
parameter is expressed in micrometres and converted with the plate's pixel size.

Fields larger than a tile (`tile_size`) are segmented tile by tile with bounded memory: the
normalisation range and the threshold are taken once from the whole field (a fine histogram
of the smoothed image, built tile by tile), so every tile draws the same foreground, and the
labels are stitched as `hcsseg.segment.tiling` does for models.  Tiles work in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage as ndi
from skimage import color, filters, morphology, segmentation

from hcsseg.errors import InputDataError
from hcsseg.segment.distance import distance_to_background
from hcsseg.segment.parts import h_maxima_by_component, watershed_by_component
from hcsseg.segment.tiling import grow_tiled, label_centroids, remap_inplace, segment_tiled

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

# Field-wide thresholds of a tiled field come from a histogram of the smoothed image with this
# many bins over its fixed range ([0, 1], or its log): 1e-6 of the range, far below what
# moves a threshold, and rebinned to skimage's 256 bins over the observed range for Otsu and
# triangle, so the level matches a whole-field threshold.
_FIELD_HIST_BINS = 2**20
_THRESHOLD_BINS = 256
# Integer fields whose value range exceeds this take their black level from np.percentile
# (a copy of the field) instead of an exact value histogram.
_MAX_INT_HIST = 2**24
# skimage's Gaussian kernel reaches 4 sigma (truncate=4.0): tiles need this much context.
_GAUSS_TRUNCATE = 4.0
_BAND_ROWS = 256  # rows of a field scanned at once (finiteness, value histogram)


@dataclass(frozen=True)
class FieldLevels:
    """Intensity levels a tiled field's tiles share: [black, white] maps to [0, 1] and
    `threshold` is the foreground level of the smoothed [0, 1] image before the correction
    factor.  Taken per tile instead, a tile of background would find "objects" in its noise."""

    black: float
    white: float
    threshold: float


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
    landscape = distance_to_background(mask) - opts.membrane_weight_um * um * smooth
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
    image: np.ndarray,
    *,
    pixel_size_um: float,
    options: NucleiOptions | None = None,
    tile_size: int | None = None,
) -> np.ndarray:
    """Label nuclei in a nuclear-stain image (bright objects on a dark background).

    2-D images are taken as fluorescence.  RGB(A) images (H&E, bright field) are converted to
    grey and inverted when their median is above the middle of their range, i.e. when the
    background is bright, so that nuclei become the bright phase.  A constant image has no
    objects and gives all-zero labels.  Returns uint32 labels with ids 1..N.

    `tile_size`: a 2-D field wider or taller than this many pixels is segmented tile by tile
    (memory bounded by a tile; see the module docstring); smaller fields, RGB images and
    None give the whole-field result unchanged.
    """
    opts = options or NucleiOptions()
    _check_pixel_size(pixel_size_um)
    um = 1.0 / pixel_size_um  # pixels per micrometre
    if tile_size is not None and np.ndim(image) == 2:
        overlap = nuclei_overlap(opts, pixel_size_um)
        tile = max(int(tile_size), 2 * overlap)
        if max(np.shape(image)) > tile:
            return _segment_nuclei_tiled(image, opts, um, tile=tile, overlap=overlap)
    grey = _nuclear_grey(image)
    norm = _normalise(grey)
    if norm is None:
        return np.zeros(grey.shape, dtype=np.uint32)
    return _nuclei_from_normalised(norm, opts, um, level=None, exclude_border=opts.exclude_border)


def nuclei_overlap(options: NucleiOptions, pixel_size_um: float) -> int:
    """Tile overlap (px) for nuclei: twice the largest kept diameter plus the smoothing
    support, so a nucleus owned by a tile's core lies whole in the tile with its neighbours
    (the clump it is split from) and its smoothed outline."""
    um = 1.0 / pixel_size_um
    return math.ceil(
        2 * options.max_diameter_um * um + 2 * _GAUSS_TRUNCATE * _nuclei_sigma(options, um)
    )


def _nuclei_sigma(opts: NucleiOptions, um: float) -> float:
    sigma_um = opts.smoothing_sigma_um
    return (sigma_um if sigma_um is not None else opts.min_diameter_um / 8) * um


def _segment_nuclei_tiled(
    image: np.ndarray, opts: NucleiOptions, um: float, *, tile: int, overlap: int
) -> np.ndarray:
    """Nuclei of a large field: field-wide levels, then `segment_tiled` on float32 tiles;
    border exclusion is applied to the stitched field (a tile edge is not a field edge)."""
    arr = _check_field(image, "nuclear image")
    sigma = _nuclei_sigma(opts, um)
    levels = field_levels(arr, sigma, opts.threshold_method, opts.log_transform, tile=tile)
    if levels is None:
        return np.zeros(arr.shape, dtype=np.uint32)

    def one_tile(sub: np.ndarray) -> np.ndarray:
        norm = _apply_levels(sub, levels)
        return _nuclei_from_normalised(norm, opts, um, level=levels.threshold, exclude_border=False)

    labels = segment_tiled(one_tile, arr, tile=tile, overlap=overlap)
    if opts.exclude_border:
        labels = _drop_border_objects(labels)
    return labels


def _nuclei_from_normalised(
    norm: np.ndarray,
    opts: NucleiOptions,
    um: float,
    *,
    level: float | None,
    exclude_border: bool,
) -> np.ndarray:
    """Nuclei of a [0, 1] image; `level`: a field-wide threshold (None: this image's own)."""
    min_d, max_d = opts.min_diameter_um * um, opts.max_diameter_um * um
    sigma = _nuclei_sigma(opts, um)
    smooth = filters.gaussian(norm, sigma=sigma) if sigma > 0 else norm
    if level is None:
        mask = _threshold(
            smooth, opts.threshold_method, opts.threshold_correction, opts.log_transform
        )
    else:
        mask = smooth > level * opts.threshold_correction
    del smooth
    if opts.fill_holes:
        mask = ndi.binary_fill_holes(mask)
    if not mask.any():
        return np.zeros(norm.shape, dtype=np.uint32)

    dist = distance_to_background(mask)
    seeds = h_maxima_by_component(dist, opts.seed_h_um * um) & mask
    # Merge seeds closer than the smallest diameter: two maxima that close belong to one
    # nucleus with an irregular outline, not to two nuclei.
    radius = max(round(min_d / 2), 1)
    merged, _ = ndi.label(ndi.binary_dilation(seeds, morphology.disk(radius)) & mask)
    markers = np.where(seeds, merged, 0)
    objects = watershed_by_component(-dist, markers, mask)
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
    if exclude_border:
        objects = segmentation.clear_border(objects)
    relabelled, _, _ = segmentation.relabel_sequential(objects)
    return relabelled.astype(np.uint32)


def segment_cells(
    nuclei: np.ndarray,
    image: np.ndarray | None,
    *,
    pixel_size_um: float,
    options: CellOptions | None = None,
    tile_size: int | None = None,
) -> np.ndarray:
    """Grow each nucleus into its cell; every cell keeps its nucleus's id and contains it.

    With `image=None` (no cell-body stain) or `method="distance"` each nucleus is expanded by
    `max_expansion_um` without overlap (`skimage.segmentation.expand_labels`).  Propagation
    floods the Sobel gradient of the smoothed stain from the nuclei, restricted to the stain's
    thresholded foreground and to `max_expansion_um` around the nuclei; the watershed's
    compactness plays the part of CellProfiler's regularisation lambda.  Returns uint32.

    `tile_size`: fields larger than this are grown tile by tile (propagation and distance;
    the stain method always runs on the whole field), each cell taken from the tile whose
    core holds its nucleus's centroid.
    """
    opts = options or CellOptions()
    _check_pixel_size(pixel_size_um)
    reach = opts.max_expansion_um / pixel_size_um
    if tile_size is not None and not (opts.method == "stain" and image is not None):
        tiled = _segment_cells_tiled(nuclei, image, opts, pixel_size_um, tile_size)
        if tiled is not None:
            return tiled
    seeds = _check_labels(nuclei, "nuclei")
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
    near = distance_to_background(seeds == 0) <= reach
    norm = _normalise(grey)
    if norm is None:  # flat stain: nothing to follow, only distance is left
        return segmentation.expand_labels(seeds, distance=reach).astype(np.uint32)
    sigma = opts.smoothing_sigma_um / pixel_size_um
    return _propagate(seeds, norm, near, opts, sigma, level=None)


def _propagate(
    seeds: np.ndarray,
    norm: np.ndarray,
    near: np.ndarray,
    opts: CellOptions,
    sigma: float,
    *,
    level: float | None,
) -> np.ndarray:
    """Propagation of `seeds` over a [0, 1] stain within `near`; `level`: a field-wide
    threshold of the smoothed stain (None: this image's own)."""
    smooth = filters.gaussian(norm, sigma=sigma) if sigma > 0 else norm
    if level is None:
        foreground = _threshold(
            smooth, opts.threshold_method, opts.threshold_correction, opts.log_transform
        )
    else:
        foreground = smooth > level * opts.threshold_correction
    mask = (foreground & near) | (seeds > 0)
    del foreground, near
    # Marker pixels keep their label in a watershed, so each cell contains its nucleus.
    cells = watershed_by_component(
        filters.sobel(smooth), seeds, mask, compactness=opts.regularization
    )
    return cells.astype(np.uint32)


def cells_overlap(max_nucleus_area: float, opts: CellOptions, pixel_size_um: float) -> int:
    """Tile overlap (px) for cells: the tile must hold a cell grown from its nucleus (the
    nucleus's extent plus the reach) and every nucleus competing for it (another reach),
    plus the smoothing support.  The extent allows nuclei twice as long as round."""
    reach = opts.max_expansion_um / pixel_size_um
    extent = 2 * math.sqrt(max(max_nucleus_area, 0.0) / math.pi)
    sigma = opts.smoothing_sigma_um / pixel_size_um
    return 2 * math.ceil(extent + 2 * reach + _GAUSS_TRUNCATE * sigma + 2)


def _segment_cells_tiled(
    nuclei: np.ndarray,
    image: np.ndarray | None,
    opts: CellOptions,
    pixel_size_um: float,
    tile_size: int,
) -> np.ndarray | None:
    """Cells of a large field grown tile by tile (`grow_tiled`); None when the field fits
    one tile, so the caller runs the whole-field code unchanged."""
    seeds = np.asarray(nuclei)
    if seeds.ndim != 2 or seeds.dtype.kind not in "iu":
        return None  # the whole-field path reports the error
    area, _, _ = label_centroids(seeds)
    overlap = cells_overlap(float(area[1:].max()) if area.size > 1 else 0.0, opts, pixel_size_um)
    tile = max(int(tile_size), 2 * overlap)
    if max(seeds.shape) <= tile:
        return None
    if seeds.size and (seeds.min() < 0 or seeds.max() > np.iinfo(np.uint32).max):
        raise InputDataError("nuclei label ids must lie in 0..2**32-1")
    reach = opts.max_expansion_um / pixel_size_um
    levels = None
    if image is not None and opts.method != "distance":
        grey = _check_field(image, "cell image")
        if grey.shape != seeds.shape:
            raise InputDataError(
                f"cell image shape {grey.shape} does not match nuclei labels shape {seeds.shape}"
            )
        sigma = opts.smoothing_sigma_um / pixel_size_um
        levels = field_levels(grey, sigma, opts.threshold_method, opts.log_transform, tile=tile)
    if levels is None:  # no stain, the distance method, or a flat stain

        def expand(sub_seeds: np.ndarray, _: np.ndarray | None) -> np.ndarray:
            return segmentation.expand_labels(_marker_ids(sub_seeds), distance=reach)

        return grow_tiled(expand, seeds, None, tile=tile, overlap=overlap)
    field = levels

    def propagate(sub_seeds: np.ndarray, sub_image: np.ndarray | None) -> np.ndarray:
        assert sub_image is not None
        markers = _marker_ids(sub_seeds)
        near = distance_to_background(markers == 0) <= reach
        norm = _apply_levels(sub_image, field)
        return _propagate(markers, norm, near, opts, sigma, level=field.threshold)

    return grow_tiled(propagate, seeds, grey, tile=tile, overlap=overlap)


def _marker_ids(seeds: np.ndarray) -> np.ndarray:
    """A tile of seed ids as the int32 a watershed works in (int64 for ids beyond it)."""
    big = seeds.size and int(seeds.max()) > np.iinfo(np.int32).max
    return seeds.astype(np.int64 if big else np.int32)


def _check_pixel_size(pixel_size_um: float) -> None:
    if not np.isfinite(pixel_size_um) or pixel_size_um <= 0:
        raise InputDataError(f"pixel_size_um must be a positive number, got {pixel_size_um!r}")


def _numeric_2d(image: np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype.kind not in "biuf":
        raise InputDataError(f"{what} has unsupported dtype {arr.dtype}; expected numbers")
    if arr.ndim != 2:
        raise InputDataError(f"{what} must be 2-D (Y, X), got shape {arr.shape}")
    if arr.size == 0:
        raise InputDataError(f"{what} is empty (shape {arr.shape})")
    return arr


def _as_float_2d(image: np.ndarray, what: str) -> np.ndarray:
    out = _numeric_2d(image, what).astype(np.float64)
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


# ---------------------------------------------------------------- field-wide levels of tiles


def _check_field(image: np.ndarray, what: str) -> np.ndarray:
    """A numeric, finite, non-empty 2-D field, without the float64 copy `_as_float_2d` makes
    (finiteness is checked one row band at a time)."""
    arr = _numeric_2d(image, what)
    if arr.dtype.kind == "f":
        for r in range(0, arr.shape[0], _BAND_ROWS):
            if not np.isfinite(arr[r : r + _BAND_ROWS]).all():
                raise InputDataError(f"{what} contains NaN or infinite pixel values")
    return arr


def field_levels(
    image: np.ndarray,
    sigma: float,
    method: ThresholdMethod,
    log: bool,
    *,
    tile: int,
) -> FieldLevels | None:
    """`_normalise`'s range and `_threshold`'s level of a whole field, computed one tile at a
    time (each smoothed with enough context that its values equal the whole field's); None
    for a field without contrast.  The level is before the correction factor."""
    arr = _check_field(image, "image")
    span = _robust_range(arr)
    if span is None:
        return None
    black, white = span
    partial = FieldLevels(black, white, 0.0)
    lo, hi = (math.log(_LOG_OFFSET), math.log(1 + _LOG_OFFSET)) if log else (0.0, 1.0)
    counts = np.zeros(_FIELD_HIST_BINS, dtype=np.int64)
    vmin, vmax = math.inf, -math.inf
    margin = int(_GAUSS_TRUNCATE * sigma + 0.5) + 1 if sigma > 0 else 0
    h, w = arr.shape
    for y in range(0, h, tile):
        for x in range(0, w, tile):
            y0, x0 = max(y - margin, 0), max(x - margin, 0)
            sub = arr[y0 : min(y + tile + margin, h), x0 : min(x + tile + margin, w)]
            norm = _apply_levels(sub, partial)
            smooth = filters.gaussian(norm, sigma=sigma) if sigma > 0 else norm
            core = smooth[y - y0 : y - y0 + tile, x - x0 : x - x0 + tile]
            values = np.log(core + np.float32(_LOG_OFFSET)) if log else core
            vmin, vmax = min(vmin, float(values.min())), max(vmax, float(values.max()))
            counts += np.histogram(values, bins=_FIELD_HIST_BINS, range=(lo, hi))[0]
    level = _threshold_from_histogram(method, counts, (lo, hi), (vmin, vmax))
    if log:
        level = math.exp(level) - _LOG_OFFSET
    return FieldLevels(black, white, level)


def _apply_levels(image: np.ndarray, levels: FieldLevels) -> np.ndarray:
    """`image` mapped to [0, 1] by the field's black and white levels, in float32."""
    out = np.asarray(image, dtype=np.float32).copy()
    out -= np.float32(levels.black)
    out *= np.float32(1.0 / (levels.white - levels.black))
    return np.clip(out, 0.0, 1.0, out=out)


def _robust_range(arr: np.ndarray) -> tuple[float, float] | None:
    """(black, white) as `_normalise` takes them, without sorting a copy of an integer
    field (its value histogram gives the exact percentile)."""
    lo_v, hi_v = float(arr.min()), float(arr.max())
    if hi_v <= lo_v:
        return None
    if arr.dtype.kind in "biu" and hi_v - lo_v < _MAX_INT_HIST:
        offset = int(lo_v)
        counts = np.zeros(int(hi_v) - offset + 1, dtype=np.int64)
        for r in range(0, arr.shape[0], _BAND_ROWS):
            band = arr[r : r + _BAND_ROWS].astype(np.int64).ravel() - offset
            counts += np.bincount(band, minlength=counts.size)
        black = _percentile_from_counts(counts, _BLACK_PERCENTILE) + offset
    else:
        black = float(np.percentile(arr, _BLACK_PERCENTILE))
    if hi_v <= black:
        return lo_v, hi_v
    return black, hi_v


def _percentile_from_counts(counts: np.ndarray, q: float) -> float:
    """np.percentile's linear interpolation of the values 0..len(counts)-1 with these counts."""
    cum = np.cumsum(counts)
    pos = q / 100 * (int(cum[-1]) - 1)
    k = math.floor(pos)
    below = float(np.searchsorted(cum, k, side="right"))
    above = float(np.searchsorted(cum, min(k + 1, int(cum[-1]) - 1), side="right"))
    return below + (pos - k) * (above - below)


def _threshold_from_histogram(
    method: ThresholdMethod,
    counts: np.ndarray,
    hist_range: tuple[float, float],
    value_range: tuple[float, float],
) -> float:
    """The `method` threshold of the values a fine histogram counts: Otsu and triangle on
    the 256 bins over [min, max] skimage would use, Li iterated on the fine bins."""
    vmin, vmax = value_range
    if vmax <= vmin:
        return vmin
    width = (hist_range[1] - hist_range[0]) / counts.size
    used = np.nonzero(counts)[0]
    centres = np.clip(hist_range[0] + (used + 0.5) * width, vmin, vmax)
    weights = counts[used].astype(np.float64)
    if method == "li":
        return _li_from_histogram(centres, weights, tolerance=width / 2)
    coarse, edges = np.histogram(centres, bins=_THRESHOLD_BINS, range=(vmin, vmax), weights=weights)
    mids = (edges[:-1] + edges[1:]) / 2
    if method == "otsu":
        return float(filters.threshold_otsu(hist=(coarse, mids)))
    return _triangle_from_histogram(coarse, mids)


def _li_from_histogram(values: np.ndarray, weights: np.ndarray, *, tolerance: float) -> float:
    """skimage's threshold_li (Li's iterative minimum cross entropy) on weighted values."""
    shift = float(values[0])
    v = values - shift
    total = float(weights.sum())
    t_next = float((v * weights).sum() / total)
    t_curr = -2 * tolerance
    while abs(t_next - t_curr) > tolerance:
        t_curr = t_next
        fore = v > t_curr
        w_fore = float(weights[fore].sum())
        if w_fore == 0 or w_fore == total:
            break
        mean_fore = float((v[fore] * weights[fore]).sum()) / w_fore
        mean_back = float((v[~fore] * weights[~fore]).sum()) / (total - w_fore)
        if mean_back == 0:
            break
        t_next = (mean_back - mean_fore) / (math.log(mean_back) - math.log(mean_fore))
    return t_next + shift


def _triangle_from_histogram(hist: np.ndarray, centres: np.ndarray) -> float:
    """skimage's threshold_triangle on a given histogram (same steps, same tie-breaking)."""
    nbins = len(hist)
    arg_peak = int(np.argmax(hist))
    peak = float(hist[arg_peak])
    arg_low, arg_high = np.flatnonzero(hist)[[0, -1]]
    if arg_low == arg_high:
        return float(centres[arg_low])
    flip = arg_peak - arg_low < arg_high - arg_peak
    if flip:
        hist = hist[::-1]
        arg_low = nbins - arg_high - 1
        arg_peak = nbins - arg_peak - 1
    width = arg_peak - arg_low
    x1 = np.arange(width)
    y1 = hist[x1 + arg_low]
    norm = math.sqrt(peak**2 + width**2)
    length = peak / norm * x1 - width / norm * y1
    arg_level = int(np.argmax(length)) + int(arg_low)
    if flip:
        arg_level = nbins - arg_level - 1
    return float(centres[arg_level])


def _drop_border_objects(labels: np.ndarray) -> np.ndarray:
    """Objects touching the field edge removed, ids made consecutive again (in place)."""
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    keep = np.ones(int(labels.max()) + 1, dtype=bool)
    keep[edge] = False
    keep[0] = False
    lut = np.zeros(keep.size, dtype=np.uint32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.uint32)
    remap_inplace(labels, lut)
    return labels
