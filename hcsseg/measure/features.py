"""Per-object features in CellProfiler / pycytominer naming (cp_measure style).

``measure_objects(nuclei, cells, channels) -> DataFrame``: one row per object id, columns
``<Compartment>_<Module>_<Feature>[_<Channel>]`` for the compartments Nuclei, Cells and
Cytoplasm (cell minus every nucleus, as CellProfiler's IdentifyTertiaryObjects).

Definitions follow CellProfiler's MeasureObjectSizeShape and MeasureObjectIntensity so the
columns can be compared with existing screens:

* intensities: integer images are scaled to 0-1 by their dtype's maximum, as CellProfiler
  does on loading; float images are used as they are.  Std is the population std; quartiles
  and median use CellProfiler's rule (position ``n * q`` in the sorted pixels, interpolated).
* shape: lengths and areas in pixels, each equal to what ``regionprops`` gives (CellProfiler
  calls it): 4-neighbourhood Perimeter, second-moment axes, Eccentricity and Orientation
  (degrees, as CellProfiler), Solidity against the hull of the pixel-edge midpoints;
  FormFactor = 4π·Area/Perimeter² and Compactness = Perimeter²/(4π·Area), as CellProfiler 4
  computes it (its older docs describe a second-moment ratio it no longer calculates).

Columns that are not morphology start with ``Metadata_`` so pycytominer's feature inference
(compartment prefixes) leaves them out of aggregation, normalisation and selection:
centroids (``Metadata_<Compartment>_Location_Center_X/Y``, as CytoTable names them) and
per-object QC flags ``Metadata_cqc_<check>`` (coSMicQC's convention, dropped by
``pycytominer.normalize(drop_cosmicqc_rows=True)``).  The 8-connected EulerNumber is not a
feature: nuclei and cells are filled (1 almost everywhere) and cytoplasm is a ring (0), so
the column is constant and only adds a z-score of noise; a nucleus whose Euler number is not
1 (in pieces or with holes) is a segmentation defect and is flagged instead.

Everything is vectorised over objects: the labelled pixels are sorted by object once per
compartment and each feature is a ``np.ufunc.reduceat`` over the runs (convex hulls included,
see `_convex_areas`).  A 2k x 2k field with 5,000 nuclei, cells and cytoplasm and three
uint16 channels takes about 3 s of CPU.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from hcsseg.errors import InputDataError

FEATURE_COMPARTMENTS = ("Nuclei", "Cells", "Cytoplasm")
ID_COLUMNS = (
    "Metadata_ObjectNumber",
    "Metadata_Cells_Parent_Nuclei",
    "Metadata_Cytoplasm_Parent_Cells",
)
CQC_COLUMNS = (
    "Metadata_cqc_touches_border",  # nucleus or cell cut by the field edge
    "Metadata_cqc_too_small",  # nucleus below SMALL_NUCLEUS_FACTOR x the typical diameter
    "Metadata_cqc_too_large",  # nucleus above LARGE_NUCLEUS_FACTOR x the typical diameter
    "Metadata_cqc_saturated",  # a pixel at the integer maximum in some channel
    "Metadata_cqc_nucleus_not_simply_connected",  # nucleus in pieces or with holes
)
# Debris and clumps: half / twice the typical nucleus diameter (a quarter / four times the area).
SMALL_NUCLEUS_FACTOR = 0.5
LARGE_NUCLEUS_FACTOR = 2.0

_SHAPE_FEATURES = (
    "AreaShape_Area",
    "AreaShape_Perimeter",
    "AreaShape_Eccentricity",
    "AreaShape_Solidity",
    "AreaShape_Extent",
    "AreaShape_MajorAxisLength",
    "AreaShape_MinorAxisLength",
    "AreaShape_Orientation",
    "AreaShape_EquivalentDiameter",
    "AreaShape_FormFactor",
    "AreaShape_Compactness",
)
_INTENSITY_FEATURES = (
    "IntegratedIntensity",
    "MeanIntensity",
    "StdIntensity",
    "MinIntensity",
    "MaxIntensity",
    "MedianIntensity",
    "LowerQuartileIntensity",
    "UpperQuartileIntensity",
    "MassDisplacement",
)
_QUANTILES = (
    ("LowerQuartileIntensity", 0.25),
    ("MedianIntensity", 0.5),
    ("UpperQuartileIntensity", 0.75),
)

# scikit-image's perimeter: border pixels are weighted by the code
# 1 * self + 2 * (4-neighbours on the border) + 10 * (diagonal neighbours on the border).
_PERIMETER_WEIGHTS = np.zeros(50)
_PERIMETER_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIMETER_WEIGHTS[[21, 33]] = math.sqrt(2)
_PERIMETER_WEIGHTS[[13, 23]] = (1 + math.sqrt(2)) / 2
_EDGE_OFFSETS = ((-1, 0), (1, 0), (0, -1), (0, 1))
_DIAGONAL_OFFSETS = ((-1, -1), (-1, 1), (1, -1), (1, 1))

# Label values up to max(pixel count, this) are indexed through lookup tables; larger ones
# (sparse ids from elsewhere) through a sort.
_MIN_LUT_LABEL = 1 << 16


def channel_token(name: str) -> str:
    """Channel name -> feature token without underscores (``DAPI_virtual`` -> ``DAPIvirtual``)."""
    token = re.sub(r"[^0-9A-Za-z]", "", name)
    if not token:
        raise InputDataError(f"channel name {name!r} has no letters or digits to build a token")
    return token


@functools.cache
def feature_columns(channel_tokens: tuple[str, ...]) -> list[str]:
    """The ordered feature columns `measure_objects` gives for nuclei + cells + tokens."""
    return [
        name
        for compartment in FEATURE_COMPARTMENTS
        for name in _compartment_columns(compartment, channel_tokens)
    ]


def location_columns(compartments: tuple[str, ...] = FEATURE_COMPARTMENTS) -> list[str]:
    """Centroid columns, ``Metadata_`` so profiling tools never treat them as features."""
    return [f"Metadata_{c}_Location_Center_{axis}" for c in compartments for axis in "XY"]


def object_metadata_columns() -> list[str]:
    """The non-feature columns `measure_objects` gives for nuclei + cells, in order."""
    return [*ID_COLUMNS, *location_columns(), *CQC_COLUMNS]


def measure_objects(
    nuclei: np.ndarray,
    cells: np.ndarray | None,
    channels: Mapping[str, np.ndarray],
    *,
    pixel_size_um: float | None = None,
    typical_diameter_px: float | None = None,
) -> pd.DataFrame:
    """One row per object id: ids, centroids, QC flags, then shape and intensity features.

    `channels` maps feature tokens (no underscores, see `channel_token`) to 2-D images.
    Cells share their nucleus's id (``Metadata_Cells_Parent_Nuclei``); cytoplasm is the
    cell minus the nuclei; a cell without a nucleus has parent 0 and NaN nucleus features,
    a nucleus without a cell NaN cell features.  `pixel_size_um` is accepted for symmetry
    with the callers, who record it in the file metadata: features stay in pixels, as in
    CellProfiler.  `typical_diameter_px` is the nucleus size the segmentation expected
    (the field's median nucleus when None); the size flags are relative to it.
    """
    del pixel_size_um
    nuclei = _check_labels(nuclei, "nuclei", None)
    if cells is not None:
        cells = _check_labels(cells, "cells", nuclei.shape)
    images = {
        token: _check_channel(token, image, nuclei.shape) for token, image in channels.items()
    }

    nucleus_ids = _ids(nuclei)
    compartments: list[tuple[str, np.ndarray]] = [("Nuclei", nuclei)]
    if cells is not None:
        # Cells found by a model may hold no detected nucleus: they keep their own id and get
        # parent 0, as CellProfiler marks orphans.
        ids = np.union1d(nucleus_ids, _ids(cells))
        cytoplasm = np.where(nuclei > 0, 0, cells)
        compartments += [("Cells", cells), ("Cytoplasm", cytoplasm)]
        meta: dict[str, np.ndarray] = {
            "Metadata_ObjectNumber": ids,
            "Metadata_Cells_Parent_Nuclei": np.where(np.isin(ids, nucleus_ids), ids, 0),
            "Metadata_Cytoplasm_Parent_Cells": ids,
        }
    else:
        ids = nucleus_ids
        meta = {"Metadata_ObjectNumber": ids}
    meta = {k: v.astype(np.int64) for k, v in meta.items()}

    features: dict[str, np.ndarray] = {}
    for compartment, labels in compartments:
        objects = _Objects.build(labels, ids)
        meta[f"Metadata_{compartment}_Location_Center_X"] = objects.full(objects.cx)
        meta[f"Metadata_{compartment}_Location_Center_Y"] = objects.full(objects.cy)
        if compartment == "Nuclei":
            euler = objects.full(_euler_8(objects.dense, len(ids))[objects.present])
        for feature, values in _shape_features(objects).items():
            features[f"{compartment}_{feature}"] = values
        for token, image in images.items():
            for feature, values in _intensity_features(objects, image).items():
                features[f"{compartment}_Intensity_{feature}_{token}"] = values
    regions = [nuclei] if cells is None else [nuclei, cells]
    meta |= _qc_flags(
        ids,
        regions,
        images.values(),
        diameter=features["Nuclei_AreaShape_EquivalentDiameter"],
        euler=euler,
        typical_diameter_px=typical_diameter_px,
    )
    return pd.DataFrame({**meta, **features})


def measure_objects_tiled(
    nuclei: np.ndarray,
    cells: np.ndarray | None,
    channels: Mapping[str, np.ndarray],
    *,
    tile_size: int | None,
    pixel_size_um: float | None = None,
    typical_diameter_px: float | None = None,
) -> pd.DataFrame:
    """`measure_objects` of a large field, a tile at a time: the same rows, with memory
    bounded by a tile (an 8000² field needed 2.8 GB at once).

    Every feature is a function of one object's own pixels, so an object measured in a crop
    that holds all of it gets the values the whole field gives (centroids shifted back).
    Each object is measured in the crop of the tile its bounding box starts in; the crop
    reaches past the tile by more than the largest object, so no object it owns touches a
    crop edge that is not the field's (the border flag stays right)."""
    shape = np.shape(nuclei)
    if tile_size is None or max(shape) <= tile_size:
        return measure_objects(
            nuclei,
            cells,
            channels,
            pixel_size_um=pixel_size_um,
            typical_diameter_px=typical_diameter_px,
        )
    nuclei = np.asarray(nuclei)  # no int64 copy of the whole field: crops are checked
    outline = nuclei if cells is None else np.asarray(cells)
    if outline.shape != shape:
        raise InputDataError(f"cells labels shape {outline.shape} differs from {shape}")
    if typical_diameter_px is None:  # the field's median nucleus, not a tile's
        areas = np.bincount(nuclei.ravel())[1:]
        areas = areas[areas > 0]
        typical_diameter_px = float(np.median(np.sqrt(4 * areas / np.pi))) if areas.size else None
    ids, y_start, x_start, extent = _object_boxes([nuclei] if cells is None else [nuclei, outline])
    overlap = extent + 1
    tables = []
    for y0 in range(0, shape[0], tile_size):
        for x0 in range(0, shape[1], tile_size):
            mine = (y_start >= y0) & (y_start < y0 + tile_size)
            mine &= (x_start >= x0) & (x_start < x0 + tile_size)
            owned = ids[mine]
            if not owned.size:
                continue
            ya, xa = max(y0 - overlap, 0), max(x0 - overlap, 0)
            crop = (slice(ya, y0 + tile_size + overlap), slice(xa, x0 + tile_size + overlap))
            table = measure_objects(
                nuclei[crop],
                None if cells is None else outline[crop],
                {k: v[crop] for k, v in channels.items()},
                typical_diameter_px=typical_diameter_px,
            )
            table = table[table["Metadata_ObjectNumber"].isin(owned)].copy()
            for col in table.columns:
                if col.endswith("_Location_Center_X"):
                    table[col] = table[col] + xa
                elif col.endswith("_Location_Center_Y"):
                    table[col] = table[col] + ya
            tables.append(table)
    if not tables:
        return measure_objects(nuclei, cells, channels, typical_diameter_px=typical_diameter_px)
    out = pd.concat(tables, ignore_index=True)
    return out.sort_values("Metadata_ObjectNumber", kind="stable").reset_index(drop=True)


def _object_boxes(regions: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Ids present in any of `regions`, the top-left corner of each one's box over all of
    them, and the largest box side."""
    top = max(int(r.max()) for r in regions)
    y0 = np.full(top + 1, np.iinfo(np.int64).max)
    x0, y1, x1 = y0.copy(), np.full(top + 1, -1), np.full(top + 1, -1)
    for region in regions:
        for i, box in enumerate(ndi.find_objects(region), 1):
            if box is not None:
                ys, xs = box
                y0[i], x0[i] = min(y0[i], ys.start), min(x0[i], xs.start)
                y1[i], x1[i] = max(y1[i], ys.stop), max(x1[i], xs.stop)
    ids = np.flatnonzero(y1 >= 0)
    extent = int(max((y1[ids] - y0[ids]).max(), (x1[ids] - x0[ids]).max())) if ids.size else 0
    return ids, y0[ids], x0[ids], extent


def _qc_flags(
    ids: np.ndarray,
    regions: list[np.ndarray],
    images: Iterable[np.ndarray],
    *,
    diameter: np.ndarray,
    euler: np.ndarray,
    typical_diameter_px: float | None,
) -> dict[str, np.ndarray]:
    """The ``Metadata_cqc_*`` flags: True marks an object whose features are not to be trusted.

    An object is its nucleus and its cell together.  Saturation uses the integer maximum, as
    the image QC does (float images have no known ceiling and are never flagged).
    """
    edge = np.zeros(regions[0].shape, dtype=bool)
    edge[[0, -1], :] = edge[:, [0, -1]] = True
    saturated = [image == np.iinfo(image.dtype).max for image in images if image.dtype.kind in "iu"]
    if typical_diameter_px is None:
        finite = diameter[np.isfinite(diameter)]
        typical_diameter_px = float(np.median(finite)) if finite.size else np.nan

    def hit(mask: np.ndarray) -> np.ndarray:
        return np.isin(ids, np.concatenate([labels[mask] for labels in regions]))

    return {
        "Metadata_cqc_touches_border": hit(edge),
        "Metadata_cqc_too_small": diameter < SMALL_NUCLEUS_FACTOR * typical_diameter_px,
        "Metadata_cqc_too_large": diameter > LARGE_NUCLEUS_FACTOR * typical_diameter_px,
        "Metadata_cqc_saturated": (
            hit(np.logical_or.reduce(saturated)) if saturated else np.zeros(ids.size, bool)
        ),
        "Metadata_cqc_nucleus_not_simply_connected": np.isfinite(euler) & (euler != 1),
    }


def _compartment_columns(compartment: str, tokens: tuple[str, ...]) -> list[str]:
    return [f"{compartment}_{f}" for f in _SHAPE_FEATURES] + [
        f"{compartment}_Intensity_{f}_{t}" for t in tokens for f in _INTENSITY_FEATURES
    ]


def _check_labels(labels: np.ndarray, what: str, shape: tuple[int, ...] | None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise InputDataError(f"{what} labels must be 2-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputDataError(f"{what} labels must be integers, got {labels.dtype}")
    if shape is not None and labels.shape != shape:
        raise InputDataError(f"{what} labels shape {labels.shape} differs from {shape}")
    if labels.size and (labels.min() < 0 or int(labels.max()) > np.iinfo(np.int64).max):
        raise InputDataError(f"{what} label ids must lie in 0..2**63-1")
    return labels.astype(np.int64, copy=False)


def _check_channel(token: str, image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Validate one channel; returns it unscaled (scaling happens on the labelled pixels)."""
    if "_" in token:
        raise ValueError(f"channel token {token!r} contains '_'; use channel_token()")
    image = np.asarray(image)
    if image.shape != shape:
        raise InputDataError(f"channel {token} has shape {image.shape}, labels have {shape}")
    if image.dtype.kind not in "biuf":
        raise InputDataError(f"channel {token} has non-numeric dtype {image.dtype}")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise InputDataError(f"channel {token} contains NaN or infinite pixels")
    return image


def _use_lut(labels: np.ndarray) -> bool:
    return not labels.size or int(labels.max()) <= max(labels.size, _MIN_LUT_LABEL)


def _ids(labels: np.ndarray) -> np.ndarray:
    if _use_lut(labels):
        return np.flatnonzero(np.bincount(labels.ravel(), minlength=1)[1:]) + 1
    ids = np.unique(labels)
    return ids[ids > 0]


def _stable_argsort(keys: np.ndarray) -> np.ndarray:
    """Stable argsort; non-negative keys below 2**16 go through numpy's O(N) radix sort."""
    if keys.size and keys.dtype.kind in "iu" and keys.min() >= 0 and keys.max() < 1 << 16:
        keys = keys.astype(np.uint16)
    return np.argsort(keys, kind="stable")


@dataclass(frozen=True)
class _Objects:
    """The labelled pixels of one compartment, grouped by object.

    Pixels are sorted by object (raster order inside an object), so each present object is
    one contiguous run and per-object reductions are `np.ufunc.reduceat` calls.
    """

    dense: np.ndarray  # (Y, X) int32: 0 background, k + 1 for ids[k]
    counts: np.ndarray  # (n,) pixels per object, 0 where the object is absent
    present: np.ndarray  # (n,) bool
    order: np.ndarray  # flat indices of labelled pixels, sorted by object
    run: np.ndarray  # per pixel: index of its object among the present ones
    starts: np.ndarray  # start of each present object's run
    rows: np.ndarray  # per pixel row
    cols: np.ndarray  # per pixel column
    area: np.ndarray  # per present object pixel count (float)
    cy: np.ndarray  # per present object centroid row
    cx: np.ndarray  # per present object centroid column

    @classmethod
    def build(cls, labels: np.ndarray, ids: np.ndarray) -> _Objects:
        n = len(ids)
        if _use_lut(labels):
            top = int(labels.max()) if labels.size else 0
            lut = np.zeros(top + 1, dtype=np.int32)
            known = ids[ids <= top]
            lut[known] = np.searchsorted(ids, known) + 1
            dense = lut[labels]
        else:
            pos = np.minimum(np.searchsorted(ids, labels), max(n - 1, 0))
            hit = (labels > 0) & (ids[pos] == labels) if n else np.zeros(labels.shape, bool)
            dense = np.where(hit, pos + 1, 0).astype(np.int32)
        flat = dense.ravel()
        fg = np.flatnonzero(flat)
        order = fg[_stable_argsort(flat[fg])]
        counts = np.bincount(flat[order] - 1, minlength=n)[:n] if n else np.zeros(0, np.int64)
        present = counts > 0
        area = counts[present].astype(np.float64)
        starts = np.cumsum(area).astype(np.int64) - counts[present]
        run = np.repeat(np.arange(area.size), counts[present])
        rows, cols = np.divmod(order, labels.shape[1])
        if area.size:
            cy = np.add.reduceat(rows.astype(np.float64), starts) / area
            cx = np.add.reduceat(cols.astype(np.float64), starts) / area
        else:
            cy = cx = area
        return cls(dense, counts, present, order, run, starts, rows, cols, area, cy, cx)

    def sums(self, values: np.ndarray) -> np.ndarray:
        """Per present object sum of per-pixel `values`."""
        return np.add.reduceat(values, self.starts)

    def full(self, per_object: np.ndarray) -> np.ndarray:
        """Per present object values -> (n,) float array with NaN for absent objects."""
        out = np.full(len(self.counts), np.nan)
        out[self.present] = per_object
        return out


def _shape_features(obj: _Objects) -> dict[str, np.ndarray]:
    if not obj.area.size:
        return {f: obj.full(obj.area) for f in _SHAPE_FEATURES}
    area, n = obj.area, len(obj.counts)
    dy, dx = obj.rows - obj.cy[obj.run], obj.cols - obj.cx[obj.run]
    var_r, var_c, cov = obj.sums(dy * dy) / area, obj.sums(dx * dx) / area, obj.sums(dy * dx) / area
    # scikit-image's inertia tensor [[a, b], [b, c]], its eigenvalues and orientation.
    a, b, c = var_c, -cov, var_r
    root = np.sqrt(((a - c) / 2) ** 2 + b**2)
    l1, l2 = (a + c) / 2 + root, np.maximum((a + c) / 2 - root, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        eccentricity = np.where(l1 > 0, np.sqrt(np.clip(1 - l2 / l1, 0, 1)), 0.0)
    orientation = np.where(
        a - c == 0, np.where(b < 0, np.pi / 4, -np.pi / 4), 0.5 * np.arctan2(-2 * b, c - a)
    )
    height = np.maximum.reduceat(obj.rows, obj.starts) - np.minimum.reduceat(obj.rows, obj.starts)
    width = np.maximum.reduceat(obj.cols, obj.starts) - np.minimum.reduceat(obj.cols, obj.starts)
    perimeter = _perimeter(obj.dense, n)[obj.present]
    with np.errstate(divide="ignore", invalid="ignore"):
        form_factor = np.where(perimeter > 0, 4 * np.pi * area / perimeter**2, np.nan)
    return {
        "AreaShape_Area": obj.full(area),
        "AreaShape_Perimeter": obj.full(perimeter),
        "AreaShape_Eccentricity": obj.full(eccentricity),
        "AreaShape_Solidity": obj.full(area / _convex_areas(obj)),
        "AreaShape_Extent": obj.full(area / ((height + 1) * (width + 1))),
        "AreaShape_MajorAxisLength": obj.full(4 * np.sqrt(l1)),
        "AreaShape_MinorAxisLength": obj.full(4 * np.sqrt(l2)),
        "AreaShape_Orientation": obj.full(np.degrees(orientation)),
        "AreaShape_EquivalentDiameter": obj.full(np.sqrt(4 * area / np.pi)),
        "AreaShape_FormFactor": obj.full(form_factor),
        # CellProfiler 4: Perimeter² / (4π·Area), its FormFactor inverted (a disc ≈ 1).
        "AreaShape_Compactness": obj.full(perimeter**2 / (4 * np.pi * area)),
    }


def _sort_within_runs(values: np.ndarray, run: np.ndarray) -> np.ndarray:
    """Permutation sorting by (run, value); `run` is already non-decreasing.

    8/16-bit images: two O(N) radix passes, exact.  Otherwise one float sort of
    run + value scaled into [0, 0.5]: values closer than ~1e-12 of the range may swap, which
    changes no quantile.
    """
    if values.dtype.kind in "bu" and values.dtype.itemsize <= 2:
        by_value = _stable_argsort(values)
        return by_value[_stable_argsort(run[by_value])]
    as_float = values.astype(np.float64)
    lo, span = float(as_float.min()), float(np.ptp(as_float))
    return np.argsort(run + ((as_float - lo) / span * 0.5 if span > 0 else 0.0))


def _shifted(padded: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """View of a 1-pixel-padded array shifted so that [y, x] holds the pixel at (y+dy, x+dx)."""
    h, w = padded.shape[0] - 2, padded.shape[1] - 2
    return padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]


def _perimeter(dense: np.ndarray, n: int) -> np.ndarray:
    """scikit-image's 4-neighbourhood perimeter of every object at once -> (n,).

    Border pixels have a 4-neighbour outside their object (the image edge is outside); each
    is weighted by its pattern of border neighbours of the same object.
    """
    padded = np.pad(dense, 1)
    border = np.zeros(dense.shape, dtype=bool)
    for dy, dx in _EDGE_OFFSETS:
        border |= _shifted(padded, dy, dx) != dense
    border &= dense > 0
    # Work on the border pixels only, through flat indices into the padded arrays.
    width = padded.shape[1]
    rows, cols = np.nonzero(border)
    at = (rows + 1) * width + (cols + 1)
    flat_labels, flat_border = padded.ravel(), np.pad(border, 1).ravel()
    label = flat_labels[at]
    code = np.ones(at.size, dtype=np.int64)
    for weight, offsets in ((2, _EDGE_OFFSETS), (10, _DIAGONAL_OFFSETS)):
        for dy, dx in offsets:
            nb = at + dy * width + dx
            code += weight * (flat_border[nb] & (flat_labels[nb] == label))
    return np.bincount(label, weights=_PERIMETER_WEIGHTS[code], minlength=n + 1)[1:]


def _euler_8(dense: np.ndarray, n: int) -> np.ndarray:
    """8-connected Euler number per object from bit-quad counts: (Q1 - Q3 - 2 QD) / 4.

    Only 2x2 windows that are not uniform contribute, and each of those holds a pixel with a
    neighbour of another label, so the windows around such pixels are all that is counted.
    """
    p = np.pad(dense, 1)
    mixed = (p[:-1, :-1] != p[:-1, 1:]) | (p[:-1, :-1] != p[1:, :-1]) | (p[:-1, :-1] != p[1:, 1:])
    top, left = np.nonzero(mixed)  # window top-left corners in padded coordinates
    quad = (p[top, left], p[top, left + 1], p[top + 1, left], p[top + 1, left + 1])
    total = np.zeros(n + 1)
    for k, label in enumerate(quad):
        # Count each label of a window once, at its first position (TL, TR, BL, BR).
        first = label > 0
        for earlier in quad[:k]:
            first &= earlier != label
        count = sum((other == label).astype(np.int8) for other in quad[k:])
        if k == 0:
            diagonal = (count == 2) & (quad[3] == label)
        elif k == 1:
            diagonal = (count == 2) & (quad[2] == label)
        else:
            diagonal = np.zeros_like(first)
        weight = (count == 1).astype(np.float64) - (count == 3) - 2.0 * diagonal
        total += np.bincount(label[first], weights=weight[first], minlength=n + 1)
    return total[1:] / 4


def _convex_areas(obj: _Objects) -> np.ndarray:
    """scikit-image's convex area of every present object at once.

    scikit-image (so CellProfiler) takes the hull of the midpoints of the object's pixel edges
    and counts the pixel centres inside it or on it.  In doubled coordinates those midpoints
    are lattice points, and only the leftmost and rightmost pixel of each row matter.  The two
    sides are made convex chains, then each row's pixel centres between them are counted.
    """
    # Within an object the pixels are in raster order, so each (object, row) is one run.
    key = obj.run * (int(obj.rows.max()) + 1) + obj.rows
    first = np.flatnonzero(np.diff(key, prepend=-1))
    run, row = obj.run[first], 2 * obj.rows[first].astype(np.int64)
    left = 2 * np.minimum.reduceat(obj.cols, first).astype(np.int64)
    right = 2 * np.maximum.reduceat(obj.cols, first).astype(np.int64)
    sides = []
    for col, out, pick in ((left, -1, np.minimum), (right, 1, np.maximum)):
        # Edge midpoints of the extreme pixel: beside it, above it and below it.
        r = np.concatenate([row, row - 1, row + 1])
        c = np.concatenate([col + out, col, col])
        o = np.concatenate([run, run, run])
        order = np.lexsort((r, o))
        r, c, o = r[order], c[order], o[order]
        starts = np.flatnonzero(np.diff(o * (int(r.max()) + 3) + r + 1, prepend=-1))
        r, o, c = r[starts], o[starts], pick.reduceat(c, starts)
        sides.append(_convex_chain(o, r, c, sign=-out))
    # Query every pixel row of every object's bounding box.
    top = np.minimum.reduceat(obj.rows, obj.starts).astype(np.int64)
    height = np.maximum.reduceat(obj.rows, obj.starts).astype(np.int64) - top + 1
    q_run = np.repeat(np.arange(height.size), height)
    q_row = 2 * (top[q_run] + np.arange(q_run.size) - np.repeat(np.cumsum(height) - height, height))
    lo = _chain_at(*sides[0], q_run, q_row)
    hi = _chain_at(*sides[1], q_run, q_row)
    per_row = np.floor((hi + 1e-9) / 2) - np.ceil((lo - 1e-9) / 2) + 1
    return np.bincount(q_run, weights=np.maximum(per_row, 0), minlength=height.size)


def _chain_at(
    run: np.ndarray, row: np.ndarray, col: np.ndarray, q_run: np.ndarray, q_row: np.ndarray
) -> np.ndarray:
    """Column of each object's chain at the query rows (linear between the vertices)."""
    span = int(max(row.max(), q_row.max())) + 2
    key = run * span + row
    at = np.clip(np.searchsorted(key, q_run * span + q_row), 1, key.size - 1)
    r0, r1, c0, c1 = row[at - 1], row[at], col[at - 1], col[at]
    return c0 + (c1 - c0) * (q_row - r0) / (r1 - r0)


def _convex_chain(
    run: np.ndarray, row: np.ndarray, col: np.ndarray, sign: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Convex chain of (row, col) points per object, rows strictly increasing in each run.

    Every vertex on the wrong side of the segment joining its neighbours cannot be on the
    hull; such vertices are dropped all at once until none is left.  sign=1 keeps the left
    (smallest-column) side, sign=-1 the right one.
    """
    while True:
        inner = np.zeros(run.size, dtype=bool)
        inner[1:-1] = (run[:-2] == run[1:-1]) & (run[2:] == run[1:-1])
        cross = np.zeros(run.size, dtype=np.int64)
        cross[1:-1] = (row[1:-1] - row[:-2]) * (col[2:] - col[:-2]) - (col[1:-1] - col[:-2]) * (
            row[2:] - row[:-2]
        )
        keep = ~(inner & (sign * cross <= 0))
        if keep.all():
            return run, row, col
        run, row, col = run[keep], row[keep], col[keep]


def _intensity_features(obj: _Objects, image: np.ndarray) -> dict[str, np.ndarray]:
    if not obj.area.size:
        return {f: obj.full(obj.area) for f in _INTENSITY_FEATURES}
    raw = image.ravel()[obj.order]
    scale = 1.0 / float(np.iinfo(image.dtype).max) if image.dtype.kind in "iu" else 1.0
    values = raw.astype(np.float64) * scale
    area, counts = obj.area, obj.counts[obj.present]
    total = obj.sums(values)
    mean = total / area
    centred = values - mean[obj.run]
    out = {
        "IntegratedIntensity": total,
        "MeanIntensity": mean,
        "StdIntensity": np.sqrt(obj.sums(centred * centred) / area),
        "MinIntensity": np.minimum.reduceat(values, obj.starts),
        "MaxIntensity": np.maximum.reduceat(values, obj.starts),
    }
    # CellProfiler's quantiles: sort each object's pixels, take position n * q, interpolate.
    ordered = values[_sort_within_runs(raw, obj.run)]
    last = obj.starts + counts - 1
    for feature, q in _QUANTILES:
        position = obj.starts + counts * q
        low = np.minimum(np.floor(position).astype(np.int64), last)
        high = np.minimum(low + 1, last)
        frac = position - low
        out[feature] = np.where(
            low < last, ordered[low] * (1 - frac) + ordered[high] * frac, ordered[low]
        )
    # Distance between the intensity-weighted and the plain centroid.
    with np.errstate(divide="ignore", invalid="ignore"):
        wy = obj.sums(obj.rows * values) / total
        wx = obj.sums(obj.cols * values) / total
    out["MassDisplacement"] = np.where(total > 0, np.hypot(wy - obj.cy, wx - obj.cx), np.nan)
    return {f: obj.full(out[f]) for f in _INTENSITY_FEATURES}
