"""Object-scale normalisation: bring every field to one canonical object diameter.

Pixel sizes lie or are missing (DSB fields carry none; a plate imported without
`--pixel-size` says 1 µm/px), yet a network trained at one object size fails at another and
the classical thresholds are written in micrometres. So each field's typical object
diameter is estimated from the image itself, the field is resized so that diameter becomes
the model's canonical one, and outputs are resized back (Cellpose's size model plays the
same part). The estimate needs no model: threshold the smoothed image, take the distance
transform of the foreground, and read the inscribed radius at each of its regional maxima
(one per object, also inside clumps, where a component's size would mislead).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi
from skimage import filters, segmentation

from hcsseg.errors import InputDataError
from hcsseg.segment.distance import distance_to_background
from hcsseg.segment.parts import h_maxima_by_component

# An inscribed disc's diameter underestimates the equivalent diameter of a real (elliptic,
# irregular) nucleus; this factor maps the first to the second. Measured on the DSB training
# fields (median ratio of the true median equivalent diameter to 2 × peak radius), it is
# shape-dependent only, so one constant serves every plate.
_INSCRIBED_TO_EQUIVALENT = 1.19
# Rescale factors outside this range mean the estimate failed (an empty or flat field);
# no resizing is then safer than a 10× blow-up.
MIN_FACTOR, MAX_FACTOR = 0.2, 5.0
# Fields of twice this many pixels or more are measured on a central crop of 1024² (a 2160²
# field 4.4x faster) when it holds at least MIN_PEAKS objects; else on the whole field.
ESTIMATE_PIXELS = 1 << 20
MIN_PEAKS = 200


def median_diameter(labels: np.ndarray) -> float | None:
    """Median equivalent-circle diameter (px) of the objects of a label image."""
    area = np.bincount(np.asarray(labels).ravel().astype(np.int64))[1:]
    area = area[area > 0]
    if not area.size:
        return None
    return float(np.sqrt(4 * np.median(area) / np.pi))


def estimate_diameter(image: np.ndarray, *, min_diameter: float = 4.0) -> float | None:
    """Typical diameter (px) of the bright objects of a 2-D image, or None when it has none.

    Otsu on the lightly smoothed image, distance transform of the foreground, radius at the
    distance map's regional maxima (plateaus of one object count once, peaks of objects
    below `min_diameter` are ignored); the median over peaks, scaled from inscribed to
    equivalent diameter. A field of at least twice `ESTIMATE_PIXELS` is measured on its
    central crop of that size when the crop holds at least `MIN_PEAKS` objects: a median over that
    many is as good as one over the whole field, at a fraction of the cost."""
    grey = np.asarray(image)
    if grey.ndim != 2:
        raise InputDataError(f"diameter estimation needs a 2-D image, got shape {grey.shape}")
    side = math.isqrt(ESTIMATE_PIXELS)
    if grey.size >= 2 * ESTIMATE_PIXELS and min(grey.shape) >= side:
        y0, x0 = (grey.shape[0] - side) // 2, (grey.shape[1] - side) // 2
        radius = _peak_radii(grey[y0 : y0 + side, x0 : x0 + side], min_diameter)
        if radius is None or radius.size < MIN_PEAKS:
            radius = _peak_radii(grey, min_diameter)
    else:
        radius = _peak_radii(grey, min_diameter)
    if radius is None or not radius.size:
        return None
    return float(2 * np.median(radius) * _INSCRIBED_TO_EQUIVALENT)


def _peak_radii(image: np.ndarray, min_diameter: float) -> np.ndarray | None:
    """Inscribed radius at each regional maximum of the foreground's distance map (peaks
    of objects below `min_diameter` left out); None when the image shows no objects."""
    grey = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(grey, (1, 99.8))
    if not np.isfinite([lo, hi]).all() or hi <= lo:
        return None
    norm = np.clip((grey - lo) / (hi - lo), 0, 1)
    smooth = filters.gaussian(norm, sigma=1.0)
    try:
        level = filters.threshold_otsu(smooth)
    except ValueError:
        return None
    mask = ndi.binary_fill_holes(smooth > level)
    if not mask.any() or mask.mean() > 0.9:
        return None
    dist = distance_to_background(mask).astype(np.float32)
    # h = 1 px: ridges of one object along its long axis do not count as separate peaks
    peaks, n = ndi.label(h_maxima_by_component(dist, 1.0) & mask)
    if n == 0:
        return None
    # the largest distance on each peak (peaks are a few pixels, so no sort of the image)
    on_peak = peaks > 0
    radius = np.zeros(n + 1, dtype=dist.dtype)
    np.maximum.at(radius, peaks[on_peak], dist[on_peak])
    return radius[1:][2 * radius[1:] >= min_diameter]


def scale_factor(diameter: float | None, canonical: float | None) -> float:
    """Resize factor taking `diameter` to `canonical` (1 when either is unknown), clamped."""
    if diameter is None or canonical is None or diameter <= 0:
        return 1.0
    return float(np.clip(canonical / diameter, MIN_FACTOR, MAX_FACTOR))


def resize(image: np.ndarray, shape: tuple[int, int], *, order: int = 1) -> np.ndarray:
    """(C, Y, X) float image resized to (C, *shape): bilinear (order 1) or nearest (0).

    Uses torch's antialiased interpolation: several times faster than skimage on large
    fields and identical in effect for the smooth maps networks read and write."""
    import torch  # only the learned paths resize; the classical path stays torch-free
    import torch.nn.functional as F

    arr = np.asarray(image, dtype=np.float32)
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[None]
    if tuple(arr.shape[1:]) == tuple(shape):
        return arr[0] if squeeze else arr
    t = torch.from_numpy(np.ascontiguousarray(arr))[None]
    if order == 0:
        out = F.interpolate(t, size=tuple(shape), mode="nearest-exact")
    else:
        down = shape[0] < arr.shape[1] or shape[1] < arr.shape[2]
        out = F.interpolate(
            t, size=tuple(shape), mode="bilinear", align_corners=False, antialias=down
        )
    res = out[0].numpy()
    return res[0] if squeeze else res


def scaled_shape(shape: tuple[int, ...], factor: float) -> tuple[int, int]:
    return max(round(shape[-2] * factor), 1), max(round(shape[-1] * factor), 1)


def resize_labels(labels: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an integer label image (ids are never blended)."""
    lab = np.asarray(labels)
    if lab.shape == tuple(shape):
        return lab
    rows = np.minimum(
        ((np.arange(shape[0]) + 0.5) * lab.shape[0] / shape[0]).astype(int), lab.shape[0] - 1
    )
    cols = np.minimum(
        ((np.arange(shape[1]) + 0.5) * lab.shape[1] / shape[1]).astype(int), lab.shape[1] - 1
    )
    return lab[np.ix_(rows, cols)]


def resize_labels_on_foreground(
    labels: np.ndarray, foreground: np.ndarray, threshold: float, shape: tuple[int, int]
) -> np.ndarray:
    """Labels resized to `shape` with their edges on the background redrawn at its pixels.

    Nearest-neighbour resizing puts every edge on the coarser grid: a DSB field enlarged 2x
    for the network and brought back loses up to half a field pixel of edge all round, which
    IoU at 0.75-0.95 pays for. The foreground probability `foreground` (same shape as
    `labels`) is resized (bilinear, antialiased) and thresholded at the new pixels; ids come
    from the nearest neighbour and spread into new foreground pixels they did not reach.
    Ids are renumbered 1..N: an object whose pixels all fall outside the new foreground goes.
    On 30 held-out DSB training fields: +0.004-0.008 mean AP over plain nearest-neighbour."""
    lab = np.asarray(labels)
    if lab.shape == tuple(shape):
        return lab
    out = resize_labels(lab, shape)
    mask = resize(np.asarray(foreground, dtype=np.float32), shape) > threshold
    out = np.where(mask, out, 0)
    fill = mask & (out == 0)
    reach = math.ceil(max(shape[0] / lab.shape[0], shape[1] / lab.shape[1])) + 1
    for _ in range(reach):
        if not fill.any():
            break
        grown = ndi.grey_dilation(out, size=3)
        take = fill & (grown > 0)
        out[take] = grown[take]
        fill &= ~take
    if (np.bincount(out.ravel())[1:] == 0).any():  # some object vanished: renumber 1..N
        out = segmentation.relabel_sequential(out)[0].astype(lab.dtype)
    return out


def pixel_size_from_objects(image: np.ndarray, typical_diameter_um: float) -> float | None:
    """The pixel size (µm) at which the field's estimated nucleus diameter is the typical one,
    or None when no objects are found (then the plate's metadata must serve)."""
    diameter = estimate_diameter(image)
    return None if diameter is None else typical_diameter_um / diameter
