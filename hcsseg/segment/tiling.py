"""Whole-field inference for any model by overlapping tiles.

HCS fields (2k-5k px square) do not fit a network in one pass, and classical pipelines are
often run per tile too (the NCI HiTIF pipeline uses 50 px overlaps). Dense outputs are
blended with weights that fall off linearly over the overlap, so tile seams do not show.
Instance labels are stitched by ownership: a tile keeps only the objects whose centroid lies
in its *core* (the part of the tile closer to its centre than to any neighbour's), so each
object is taken from the one tile that sees it whole as long as the overlap exceeds the
object diameter; two kept objects that still overlap by at least half of the smaller one are
the same object seen twice and are merged, otherwise the earlier one keeps the shared pixels.
Seeded growth (cells from nuclei) keeps the seeds' ids: each region comes from the tile whose
core holds its seed's centroid (`grow_tiled`).

Memory is bounded by a tile, not the field: the stitched canvas is uint32 (the one
field-sized array besides the input) and every per-pixel temporary is tile- or row-band-sized.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
from skimage.segmentation import relabel_sequential

from hcsseg.errors import HcssegError, InputDataError

DenseFn = Callable[[np.ndarray], np.ndarray]
SegmentFn = Callable[[np.ndarray], np.ndarray]
GrowFn = Callable[[np.ndarray, np.ndarray | None], np.ndarray]
# Rows per band when a field-sized array is scanned (bincount, relabelling): bounds the
# temporaries of those scans to a few MB whatever the field size.
_BAND_ROWS = 256


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread tile origins along one axis: the first tile starts at 0, the last ends at
    `size`, and neighbours overlap by at least `overlap` pixels."""
    if size <= tile:
        return [0]
    if overlap >= tile:
        raise InputDataError(f"overlap ({overlap}) must be smaller than the tile ({tile})")
    n = math.ceil((size - tile) / (tile - overlap)) + 1
    return [round(s) for s in np.linspace(0, size - tile, n)]


def _spatial(image: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim < 2 or arr.size == 0:
        raise InputDataError(f"{name} must have at least 2 non-empty spatial axes, got {arr.shape}")
    return arr


def _ramp(length: int, overlap: int) -> np.ndarray:
    """1 in the middle, falling linearly to 1/(overlap+1) at both ends (never 0, so pixels
    seen by one tile only keep their value)."""
    r = np.ones(length, dtype=np.float32)
    k = min(overlap, length // 2)
    if k:
        edge = np.arange(1, k + 1, dtype=np.float32) / (k + 1)
        r[:k] = edge
        r[length - k :] = edge[::-1]
    return r


def predict_tiled(
    fn: DenseFn,
    image: np.ndarray,
    *,
    tile: int = 512,
    overlap: int = 64,
    multiple: int = 32,
    batch_size: int = 4,
) -> np.ndarray:
    """Run a dense predictor over a (C, Y, X) or (Y, X) image in overlapping tiles.

    `fn` maps a batch (N, C, th, tw) float32 to (N, K, th, tw); every tile has the same
    size, a multiple of `multiple` (what encoder-decoder networks need), and images smaller
    than a tile are padded by mirroring. Returns the blended (K, Y, X) float32 output."""
    arr = _spatial(image, "image").astype(np.float32, copy=False)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputDataError(f"image must be (Y, X) or (C, Y, X), got shape {arr.shape}")
    if tile % multiple or tile <= 0:
        raise InputDataError(f"tile ({tile}) must be a positive multiple of {multiple}")
    _, h, w = arr.shape
    th = min(tile, -(-h // multiple) * multiple)
    tw = min(tile, -(-w // multiple) * multiple)
    ph, pw = max(th - h, 0), max(tw - w, 0)
    padded = np.pad(arr, ((0, 0), (0, ph), (0, pw)), mode="symmetric") if ph or pw else arr
    big_h, big_w = padded.shape[1:]
    ys, xs = tile_starts(big_h, th, overlap), tile_starts(big_w, tw, overlap)
    weight = np.outer(_ramp(th, overlap), _ramp(tw, overlap))
    origins = [(y, x) for y in ys for x in xs]
    out: np.ndarray | None = None
    total = np.zeros((big_h, big_w), dtype=np.float32)
    for start in range(0, len(origins), batch_size):
        chunk = origins[start : start + batch_size]
        batch = np.stack([padded[:, y : y + th, x : x + tw] for y, x in chunk])
        pred = np.asarray(fn(np.ascontiguousarray(batch)), dtype=np.float32)
        if pred.ndim != 4 or pred.shape[0] != len(chunk) or pred.shape[2:] != (th, tw):
            raise HcssegError(
                f"tile predictor returned shape {pred.shape} for a batch of shape {batch.shape}; "
                "expected (N, K, tile_y, tile_x)"
            )
        if out is None:
            out = np.zeros((pred.shape[1], big_h, big_w), dtype=np.float32)
        for (y, x), p in zip(chunk, pred, strict=True):
            out[:, y : y + th, x : x + tw] += p * weight
            total[y : y + th, x : x + tw] += weight
    assert out is not None  # at least one tile always exists
    return out[:, :h, :w] / total[:h, :w]


def _cores(starts: list[int], tile: int, size: int) -> list[tuple[int, int]]:
    """[lo, hi) of each tile's core: boundaries halfway through each overlap."""
    bounds = [0]
    for a, b in itertools.pairwise(starts):
        bounds.append((b + min(a + tile, size)) // 2)
    bounds.append(size)
    return list(itertools.pairwise(bounds))


def tile_grid(
    shape: tuple[int, int], tile: int, overlap: int
) -> list[tuple[slice, slice, tuple[int, int], tuple[int, int]]]:
    """Tiles of a (Y, X) field: (rows, cols, core rows, core cols), cores in field pixels.

    The cores partition the field; each lies at least half the overlap inside its tile
    (except at the field border)."""
    h, w = shape
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    return [
        (slice(y, y + th), slice(x, x + tw), core_y, core_x)
        for y, core_y in zip(ys, _cores(ys, th, h), strict=True)
        for x, core_x in zip(xs, _cores(xs, tw, w), strict=True)
    ]


def segment_tiled(
    segment_fn: SegmentFn,
    image: np.ndarray,
    *,
    tile: int = 1024,
    overlap: int = 64,
    merge_fraction: float = 0.5,
) -> np.ndarray:
    """Segment a field tile by tile and stitch the labels; returns uint32 ids 1..N.

    `image` is (Y, X) or channels-first (..., Y, X); `segment_fn` gets the tile (same leading
    axes) and returns 2-D integer labels of the tile's spatial shape. `overlap` should exceed
    the largest object diameter in pixels: an object wider than that is cut by every tile
    that owns its centroid. `merge_fraction`: two kept objects overlapping by at least this
    share of the smaller one are merged (the same object seen by two tiles)."""
    arr = _spatial(image, "image")
    if not 0 < merge_fraction <= 1:
        raise InputDataError(f"merge_fraction must be in (0, 1], got {merge_fraction}")
    if tile <= overlap or overlap < 0:
        raise InputDataError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    h, w = arr.shape[-2:]
    grid = tile_grid((h, w), tile, overlap)
    if len(grid) == 1:
        labels, _, _ = relabel_sequential(_run_segment(segment_fn, arr, (h, w)))
        return labels.astype(np.uint32)

    canvas = np.zeros((h, w), dtype=np.uint32)
    areas = np.zeros(1, dtype=np.int64)  # areas[id] of objects pasted so far
    for rows, cols, core_y, core_x in grid:
        sub = arr[..., rows, cols]
        lab = _run_segment(segment_fn, sub, (rows.stop - rows.start, cols.stop - cols.start))
        core = (core_y[0] - rows.start, core_y[1] - rows.start)
        owned = _owned(lab, core, (core_x[0] - cols.start, core_x[1] - cols.start))
        del lab
        areas = _paste(canvas[rows, cols], owned, areas, merge_fraction)
    lut = np.zeros(areas.size, dtype=np.uint32)
    kept = areas > 0  # merged or fully overlapped ids never got a pixel
    kept[0] = False
    lut[kept] = np.arange(1, int(kept.sum()) + 1, dtype=np.uint32)
    remap_inplace(canvas, lut)
    return canvas


def remap_inplace(labels: np.ndarray, lut: np.ndarray) -> None:
    """``labels[...] = lut[labels]`` one row band at a time (no field-sized temporary)."""
    for r in range(0, labels.shape[0], _BAND_ROWS):
        band = labels[r : r + _BAND_ROWS]
        band[...] = lut[band]


def label_centroids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(area, centroid y, centroid x) indexed by label id (0 = background), in row bands:
    a field-wide ``np.bincount`` would cast the field to int64 and build coordinate grids."""
    n = int(labels.max()) + 1 if labels.size else 1
    area = np.zeros(n, dtype=np.int64)
    sum_y = np.zeros(n, dtype=np.float64)
    sum_x = np.zeros(n, dtype=np.float64)
    cols = np.arange(labels.shape[1], dtype=np.float64)
    for r in range(0, labels.shape[0], _BAND_ROWS):
        band = np.asarray(labels[r : r + _BAND_ROWS]).astype(np.intp)
        rows = np.arange(r, r + band.shape[0], dtype=np.float64)
        flat = band.ravel()
        area += np.bincount(flat, minlength=n)
        sum_y += np.bincount(flat, weights=np.repeat(rows, band.shape[1]), minlength=n)
        sum_x += np.bincount(flat, weights=np.tile(cols, band.shape[0]), minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return area, sum_y / area, sum_x / area


def grow_tiled(
    grow_fn: GrowFn,
    seeds: np.ndarray,
    image: np.ndarray | None,
    *,
    tile: int,
    overlap: int,
) -> np.ndarray:
    """Grow labelled seeds into regions tile by tile; regions keep their seed's id.

    `grow_fn(seed_tile, image_tile)` returns the tile's regions with seed ids (image_tile is
    None without an image). Region k is taken from the one tile whose core holds the centroid
    of seed k, where it sees the seed and its neighbours whole as long as half the overlap
    exceeds the seed radius plus twice the growth distance; a pixel claimed by two regions
    from different tiles goes to the first. Returns uint32."""
    seeds = _spatial(seeds, "seeds")
    if seeds.ndim != 2 or seeds.dtype.kind not in "iu":
        raise InputDataError(f"seeds must be 2-D integer labels, got {seeds.dtype} {seeds.shape}")
    if image is not None and np.shape(image)[-2:] != seeds.shape:
        raise InputDataError(
            f"image shape {np.shape(image)} does not match seeds shape {seeds.shape}"
        )
    if tile <= overlap or overlap < 0:
        raise InputDataError(f"need 0 <= overlap < tile, got overlap={overlap}, tile={tile}")
    area, cy, cx = label_centroids(seeds)
    present = area > 0
    present[0] = False
    out = np.zeros(seeds.shape, dtype=np.uint32)
    for rows, cols, core_y, core_x in tile_grid(seeds.shape, tile, overlap):
        sub_seeds = seeds[rows, cols]
        sub_image = None if image is None else image[..., rows, cols]
        lab = np.asarray(grow_fn(sub_seeds, sub_image))
        if lab.shape != sub_seeds.shape or lab.dtype.kind not in "iu":
            raise HcssegError(
                f"grow_fn returned {lab.dtype} labels of shape {lab.shape} for a tile of shape "
                f"{sub_seeds.shape}; expected integer labels of the tile's shape"
            )
        if lab.size and int(lab.max()) >= area.size:
            raise HcssegError("grow_fn returned ids that are not seed ids")
        owns = present & (cy >= core_y[0]) & (cy < core_y[1]) & (cx >= core_x[0]) & (cx < core_x[1])
        region = out[rows, cols]
        take = owns[lab] & (region == 0)
        region[take] = lab[take]
    return out


def central_crop(image: np.ndarray, size: int) -> np.ndarray:
    """The central `size` x `size` window of the last two axes (a view; whole if smaller)."""
    h, w = np.shape(image)[-2:]
    y, x = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return image[..., y : y + size, x : x + size]


def _run_segment(fn: SegmentFn, sub: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    lab = np.asarray(fn(sub))
    if lab.shape != shape or lab.dtype.kind not in "iub":
        raise HcssegError(
            f"segment_fn returned {lab.dtype} labels of shape {lab.shape} for a tile of spatial "
            f"shape {shape}; expected integer labels of the tile's shape"
        )
    if lab.dtype.kind == "i" and lab.size and lab.min() < 0:
        raise HcssegError("segment_fn returned negative label ids")
    return lab.astype(np.int64) if lab.dtype.kind == "b" else lab


def _owned(lab: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray:
    """Objects of a tile whose centroid lies in its core, relabelled 1..k (others zeroed)."""
    compact, _, _ = relabel_sequential(lab)
    n = int(compact.max())
    if n == 0:
        return compact
    _, cy, cx = label_centroids(compact)
    cy, cx = cy[1:], cx[1:]
    keep = (cy >= rows[0]) & (cy < rows[1]) & (cx >= cols[0]) & (cx < cols[1])
    new = np.zeros(n + 1, dtype=np.int64)
    new[1:][keep] = np.arange(1, int(keep.sum()) + 1)
    return new[compact]


def _paste(
    region: np.ndarray, owned: np.ndarray, areas: np.ndarray, merge_fraction: float
) -> np.ndarray:
    """Write a tile's owned objects into the canvas view `region`; returns updated areas."""
    k = int(owned.max())
    if k == 0:
        return areas
    first = areas.size  # global id of owned object 1
    target = np.arange(first - 1, first + k, dtype=np.int64)  # owned id j -> first + j - 1
    target[0] = 0
    new_area = np.bincount(owned.ravel(), minlength=k + 1)
    both = (owned > 0) & (region > 0)
    if both.any():
        pairs, inter = np.unique(
            np.stack([owned[both], region[both].astype(np.int64)]), axis=1, return_counts=True
        )
        # per owned object, the canvas object it overlaps most (last after sorting)
        order = np.lexsort((inter, pairs[0]))
        last = np.r_[pairs[0, order][1:] != pairs[0, order][:-1], True]
        pick = order[last]
        best_old = np.zeros(k + 1, dtype=np.int64)
        best_int = np.zeros(k + 1, dtype=np.int64)
        best_old[pairs[0, pick]] = pairs[1, pick]
        best_int[pairs[0, pick]] = inter[pick]
        j = np.nonzero(best_int)[0]
        smaller = np.minimum(new_area[j], areas[best_old[j]])
        same = best_int[j] >= merge_fraction * smaller
        target[j[same]] = best_old[j[same]]
    if target.max() > np.iinfo(np.uint32).max:
        raise HcssegError("more than 2**32 - 1 objects in one field")
    mapped = target.astype(np.uint32)[owned]
    gained = (owned > 0) & (region == 0)
    free = gained | ((owned > 0) & (region == mapped))
    region[free] = mapped[free]
    areas = np.concatenate([areas, np.zeros(k, dtype=np.int64)])
    return areas + np.bincount(mapped[gained], minlength=areas.size)
