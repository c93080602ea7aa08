"""Per-object features in CellProfiler / pycytominer naming (cp_measure style).

``measure_objects(nuclei, cells, channels) -> DataFrame``: one row per nucleus, columns
``<Compartment>_<Module>_<Feature>[_<Channel>]`` for the compartments Nuclei, Cells and
Cytoplasm (cell minus nucleus). Intensities follow CellProfiler: integer images are scaled
to 0-1 by their dtype's maximum, float images are used as they are. Lengths and areas are
in pixels, as CellProfiler reports them.

Everything is vectorised over objects (``scipy.ndimage`` reductions and one
``regionprops_table`` call per compartment), so a 2k x 2k field with thousands of cells
takes about a second.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import numpy as np
import pandas as pd
from scipy import ndimage as ndi
from skimage.measure import regionprops_table

from hcsseg.errors import InputDataError

FEATURE_COMPARTMENTS = ("Nuclei", "Cells", "Cytoplasm")

_SHAPE_PROPS = (
    "area",
    "perimeter",
    "eccentricity",
    "solidity",
    "extent",
    "axis_major_length",
    "axis_minor_length",
    "orientation",
    "equivalent_diameter_area",
    "euler_number",
)
_SHAPE_NAMES = {
    "area": "Area",
    "perimeter": "Perimeter",
    "eccentricity": "Eccentricity",
    "solidity": "Solidity",
    "extent": "Extent",
    "axis_major_length": "MajorAxisLength",
    "axis_minor_length": "MinorAxisLength",
    "orientation": "Orientation",
    "equivalent_diameter_area": "EquivalentDiameter",
    "euler_number": "EulerNumber",
}
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


def channel_token(name: str) -> str:
    """Channel name -> feature token without underscores (``DAPI_virtual`` -> ``DAPIvirtual``)."""
    token = re.sub(r"[^0-9A-Za-z]", "", name)
    if not token:
        raise InputDataError(f"channel name {name!r} has no letters or digits to build a token")
    return token


def _scaled(image: np.ndarray) -> np.ndarray:
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float64) / float(np.iinfo(image.dtype).max)
    return image.astype(np.float64)


def _shape_features(labels: np.ndarray, ids: np.ndarray, compartment: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    n = len(ids)
    names = [f"{compartment}_AreaShape_{_SHAPE_NAMES[p]}" for p in _SHAPE_PROPS] + [
        f"{compartment}_AreaShape_FormFactor",
        f"{compartment}_AreaShape_Compactness",
        f"{compartment}_Location_Center_X",
        f"{compartment}_Location_Center_Y",
    ]
    for name in names:
        out[name] = np.full(n, np.nan)
    if n == 0 or not labels.any():
        return out
    table = regionprops_table(labels, properties=("label", "centroid", *_SHAPE_PROPS))
    pos = np.searchsorted(ids, table["label"])
    valid = (pos < n) & (ids[np.minimum(pos, n - 1)] == table["label"])
    pos, sel = pos[valid], valid
    for prop in _SHAPE_PROPS:
        out[f"{compartment}_AreaShape_{_SHAPE_NAMES[prop]}"][pos] = table[prop][sel]
    area = table["area"][sel].astype(float)
    perimeter = table["perimeter"][sel].astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        out[f"{compartment}_AreaShape_FormFactor"][pos] = 4 * np.pi * area / perimeter**2
    cy, cx = table["centroid-0"][sel], table["centroid-1"][sel]
    out[f"{compartment}_Location_Center_X"][pos] = cx
    out[f"{compartment}_Location_Center_Y"][pos] = cy
    yy, xx = np.indices(labels.shape)
    lab = labels.ravel()
    fg = lab > 0
    index = np.searchsorted(ids, lab[fg])
    inside = (index < n) & (ids[np.minimum(index, n - 1)] == lab[fg])
    cent_y = np.full(n, np.nan)
    cent_x = np.full(n, np.nan)
    cent_y[pos], cent_x[pos] = cy, cx
    idx = index[inside]
    d2 = (yy.ravel()[fg][inside] - cent_y[idx]) ** 2 + (xx.ravel()[fg][inside] - cent_x[idx]) ** 2
    # CellProfiler's compactness: mean squared distance to the centroid / (area / 2π).
    sums = np.bincount(idx, weights=d2, minlength=n)
    counts = np.bincount(idx, minlength=n).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        compact = (sums / counts) / (counts / (2 * np.pi))
    out[f"{compartment}_AreaShape_Compactness"] = np.where(counts > 0, compact, np.nan)
    return out


def _intensity_features(
    labels: np.ndarray, ids: np.ndarray, image: np.ndarray, compartment: str, token: str
) -> dict[str, np.ndarray]:
    n = len(ids)
    names = {f: f"{compartment}_Intensity_{f}_{token}" for f in _INTENSITY_FEATURES}
    out = {name: np.full(n, np.nan) for name in names.values()}
    if n == 0:
        return out
    values = _scaled(image)
    lab = labels.ravel()
    fg = lab > 0
    index = np.searchsorted(ids, lab[fg])
    inside = (index < n) & (ids[np.minimum(index, n - 1)] == lab[fg])
    idx = index[inside]
    vals = values.ravel()[fg][inside]
    counts = np.bincount(idx, minlength=n).astype(float)
    present = counts > 0
    total = np.bincount(idx, weights=vals, minlength=n)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = total / counts
        var = np.bincount(idx, weights=vals**2, minlength=n) / counts - mean**2
    out[names["IntegratedIntensity"]] = np.where(present, total, np.nan)
    out[names["MeanIntensity"]] = np.where(present, mean, np.nan)
    out[names["StdIntensity"]] = np.where(present, np.sqrt(np.clip(var, 0, None)), np.nan)
    labels_present = ids[present]
    if labels_present.size:
        out[names["MinIntensity"]][present] = ndi.minimum(values, labels, labels_present)
        out[names["MaxIntensity"]][present] = ndi.maximum(values, labels, labels_present)
        # Quantiles: sort pixels by (object, value) once, then index into each run.
        order = np.lexsort((vals, idx))
        sorted_vals = vals[order]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        for feature, q in (
            ("LowerQuartileIntensity", 0.25),
            ("MedianIntensity", 0.5),
            ("UpperQuartileIntensity", 0.75),
        ):
            pos = starts[present] + np.floor(q * (counts[present] - 1)).astype(np.int64)
            nxt = np.minimum(pos + 1, starts[present] + counts[present].astype(np.int64) - 1)
            frac = q * (counts[present] - 1) - np.floor(q * (counts[present] - 1))
            out[names[feature]][present] = sorted_vals[pos] * (1 - frac) + sorted_vals[nxt] * frac
        # Mass displacement: distance between the intensity-weighted and plain centroids.
        yy, xx = np.indices(labels.shape)
        ys, xs = yy.ravel()[fg][inside], xx.ravel()[fg][inside]
        with np.errstate(divide="ignore", invalid="ignore"):
            cy = np.bincount(idx, weights=ys, minlength=n) / counts
            cx = np.bincount(idx, weights=xs, minlength=n) / counts
            wy = np.bincount(idx, weights=ys * vals, minlength=n) / total
            wx = np.bincount(idx, weights=xs * vals, minlength=n) / total
        disp = np.hypot(wy - cy, wx - cx)
        out[names["MassDisplacement"]] = np.where(present & (total > 0), disp, np.nan)
    return out


def _check_labels(labels: np.ndarray, what: str, shape: tuple[int, ...] | None) -> np.ndarray:
    if labels.ndim != 2:
        raise InputDataError(f"{what} labels must be 2-D, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputDataError(f"{what} labels must be integers, got {labels.dtype}")
    if shape is not None and labels.shape != shape:
        raise InputDataError(f"{what} labels shape {labels.shape} differs from {shape}")
    return labels


@functools.cache
def feature_columns(channel_tokens: tuple[str, ...]) -> list[str]:
    """The ordered feature columns `measure_objects` gives for nuclei + cells + tokens."""
    dummy = np.zeros((1, 1), np.uint32)
    images = {t: np.zeros((1, 1), np.float32) for t in channel_tokens}
    frame = measure_objects(dummy, dummy, images)
    return [c for c in frame.columns if not c.startswith("Metadata_")]


def measure_objects(
    nuclei: np.ndarray,
    cells: np.ndarray | None,
    channels: Mapping[str, np.ndarray],
    *,
    pixel_size_um: float | None = None,
) -> pd.DataFrame:
    """One row per object id: shape, location and per-channel intensity features.

    `channels` maps feature tokens (no underscores, see `channel_token`) to 2-D images.
    Cells share their nucleus's id (``Metadata_Cells_Parent_Nuclei``); cytoplasm is the
    cell minus its nucleus; a cell without a nucleus has parent 0 and NaN nucleus features.
    `pixel_size_um` is accepted for symmetry with the callers and recorded by them in the
    file metadata: features stay in pixels.
    """
    del pixel_size_um
    nuclei = _check_labels(nuclei, "nuclei", None)
    if cells is not None:
        cells = _check_labels(cells, "cells", nuclei.shape)
    for token, image in channels.items():
        if "_" in token:
            raise ValueError(f"channel token {token!r} contains '_'; use channel_token()")
        if image.shape != nuclei.shape:
            raise InputDataError(
                f"channel {token} has shape {image.shape}, labels have {nuclei.shape}"
            )
    nucleus_ids = np.unique(nuclei)
    nucleus_ids = nucleus_ids[nucleus_ids > 0].astype(np.int64)
    ids = nucleus_ids
    compartments: list[tuple[str, np.ndarray]] = [("Nuclei", nuclei)]
    if cells is not None:
        # Cells found by a model may hold no detected nucleus: they keep their own id
        # (above every nucleus id) and get parent 0, as CellProfiler marks orphans.
        cell_ids = np.unique(cells)
        ids = np.union1d(nucleus_ids, cell_ids[cell_ids > 0].astype(np.int64))
        parent = np.where(np.isin(ids, nucleus_ids), ids, 0)
        cytoplasm = np.where(nuclei > 0, 0, cells).astype(cells.dtype)
        compartments += [("Cells", cells), ("Cytoplasm", cytoplasm)]
        columns: dict[str, np.ndarray] = {
            "Metadata_ObjectNumber": ids,
            "Metadata_Cells_Parent_Nuclei": parent,
            "Metadata_Cytoplasm_Parent_Cells": ids,
        }
    else:
        columns = {"Metadata_ObjectNumber": ids}
    for compartment, labels in compartments:
        columns.update(_shape_features(labels, ids, compartment))
        for token, image in channels.items():
            columns.update(_intensity_features(labels, ids, image, compartment, token))
    frame = pd.DataFrame(columns)
    frame["Metadata_ObjectNumber"] = frame["Metadata_ObjectNumber"].astype(np.int64)
    return frame
