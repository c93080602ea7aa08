"""Instance-segmentation metrics computed from label images.

Conventions match StarDist ``stardist.matching.matching`` and Cellpose
``cellpose.metrics.average_precision``, so numbers can be compared with published ones:

* A predicted and a true object *match* when their IoU is **>= threshold** (not strictly
  greater). Matching is one-to-one: it maximises the number of matched pairs, ties broken by
  the larger summed IoU of the matched pairs (an assignment problem, solved there densely by
  the Hungarian algorithm and here on the sparse candidate graph). Their cost also rewards
  the IoU of pairs below the threshold, so below 0.5 their matched IoU and PQ can come out
  marginally lower than ours; TP, and so AP, are always the same.
* "AP" is the Data Science Bowl / Cellpose score TP / (TP + FP + FN), not the area under a
  precision-recall curve.
* Objects are the distinct non-zero labels present, so ids need not be consecutive. Cellpose
  counts ``labels.max()`` objects and over-counts when labels have gaps; we do not.
* A ratio with a zero denominator is NaN rather than 0 or 1: an image with no objects in
  either labelling has no AP (Cellpose also gives NaN there, StarDist 0). Means over images
  skip NaN; pooled sums are unaffected by such images.

IoUs come from a sparse joint histogram of (pred, truth) label pairs: thousands of objects
cost one pass over the pixels, never a dense object-by-object matrix or per-object masks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pandas as pd
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import min_weight_full_bipartite_matching

from hcsseg.errors import HcssegError, InputDataError

DEFAULT_THRESHOLDS: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(10))
"""IoU thresholds 0.50:0.05:0.95 (COCO / Cellpose)."""

HEADLINE_THRESHOLD = 0.5
"""Threshold at which precision, recall, F1, matched IoU and PQ are reported in table rows."""

SPLIT_MERGE_IOU = 0.1
"""IoU above which an overlap counts towards a split or merge (Zaki et al., NCI HiTIF)."""

IntArray = npt.NDArray[np.int64]
IndexArray = npt.NDArray[np.intp]
FloatArray = npt.NDArray[np.float64]
LabelPair = tuple[npt.ArrayLike, npt.ArrayLike]


# ---------------------------------------------------------------------------- validation


def _as_labels(labels: npt.ArrayLike, name: str, *, allow_bool: bool = False) -> np.ndarray:
    """A non-empty, non-negative integer label image (exact-integer floats converted)."""
    arr = np.asarray(labels)
    if arr.ndim == 0 or arr.size == 0:
        raise InputDataError(f"{name} label image is empty (shape {arr.shape})")
    if arr.dtype == np.bool_:
        if allow_bool:
            return arr.view(np.uint8)
        raise InputDataError(
            f"{name} is a boolean mask, not a label image; label its connected components "
            "first (e.g. skimage.measure.label)"
        )
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise InputDataError(f"{name} labels contain NaN or infinite values")
        if not np.array_equal(arr, np.floor(arr)):
            raise InputDataError(
                f"{name} labels have dtype {arr.dtype} with non-integer values; "
                "labels must be whole numbers"
            )
        if arr.min() < 0:
            raise InputDataError(f"{name} labels contain negative values (min {arr.min():g})")
        if arr.max() >= 2.0**53:
            raise InputDataError(f"{name} float labels exceed 2**53 and cannot be exact")
        return arr.astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise InputDataError(
            f"{name} labels have dtype {arr.dtype}; expected an integer label image"
        )
    if np.issubdtype(arr.dtype, np.signedinteger) and arr.min() < 0:
        raise InputDataError(
            f"{name} labels contain negative values (min {arr.min()}); "
            "0 is background and objects are positive integers"
        )
    if arr.dtype == np.uint64 and arr.max() > np.iinfo(np.int64).max:
        raise InputDataError(f"{name} labels exceed the int64 range (max {arr.max()})")
    return arr


def _check_shapes(pred: np.ndarray, truth: np.ndarray) -> None:
    if pred.shape != truth.shape:
        raise InputDataError(
            f"pred has shape {pred.shape} but truth has shape {truth.shape}; they must match"
        )


def _threshold(value: float, name: str = "IoU threshold") -> float:
    t = float(value)
    if not 0.0 < t <= 1.0:  # also rejects NaN
        raise HcssegError(f"{name} must be in (0, 1], got {value!r}")
    return t


def _thresholds(values: Iterable[float]) -> tuple[float, ...]:
    out = tuple(sorted({_threshold(v) for v in values}))
    if not out:
        raise HcssegError("no IoU thresholds given")
    return out


def _tag(threshold: float) -> str:
    """Column suffix for a threshold: 0.5 -> '50', 0.525 -> '52.5'."""
    return f"{round(threshold * 100, 6):g}"


def _ratio(num: npt.ArrayLike, den: npt.ArrayLike) -> FloatArray:
    num_a = np.asarray(num, dtype=np.float64)
    den_a = np.asarray(den, dtype=np.float64)
    out = np.full(np.broadcast(num_a, den_a).shape, np.nan)
    np.divide(num_a, den_a, out=out, where=den_a > 0)
    return out


def _nanmean(values: npt.ArrayLike) -> float:
    """Mean of the defined values; NaN (without numpy's warning) when there are none."""
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else math.nan


# ---------------------------------------------------------------------------- overlap


def _compact(flat: np.ndarray) -> tuple[IntArray, IndexArray, IntArray]:
    """Label values present (excluding 0), each pixel's index into them (0 = background,
    1..n = objects) and object areas. A lookup table when ids are small, else a sort."""
    top = int(flat.max())
    if top <= flat.size + 65536:
        counts = np.bincount(flat if np.can_cast(flat.dtype, np.intp) else flat.astype(np.intp))
        ids = np.flatnonzero(counts[1:]) + 1
        lut = np.zeros(top + 1, dtype=np.intp)
        lut[ids] = np.arange(1, ids.size + 1)
        return ids.astype(np.int64), lut[flat], counts[ids].astype(np.int64)
    values, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    inverse = inverse.astype(np.intp)
    if values[0] == 0:
        return values[1:].astype(np.int64), inverse, counts[1:].astype(np.int64)
    return values.astype(np.int64), inverse + 1, counts.astype(np.int64)


@dataclass(frozen=True, eq=False)
class _Overlap:
    """Sparse contingency table of two label images: only object pairs that share pixels."""

    pred_ids: IntArray
    truth_ids: IntArray
    pred_area: IntArray
    truth_area: IntArray
    pair_pred: IndexArray  # index into pred_ids
    pair_truth: IndexArray  # index into truth_ids
    pair_inter: IntArray
    pair_iou: FloatArray
    n_pixels: int


def _overlap(pred: npt.ArrayLike, truth: npt.ArrayLike, *, allow_bool: bool = False) -> _Overlap:
    p = _as_labels(pred, "pred", allow_bool=allow_bool)
    t = _as_labels(truth, "truth", allow_bool=allow_bool)
    _check_shapes(p, t)
    p_ids, p_idx, p_area = _compact(p.ravel())
    t_ids, t_idx, t_area = _compact(t.ravel())
    both = (p_idx > 0) & (t_idx > 0)
    stride = t_ids.size + 1
    key = p_idx[both].astype(np.int64) * stride + t_idx[both]
    n_cells = (p_ids.size + 1) * stride
    if n_cells <= max(key.size, 1 << 20):  # a dense histogram is no bigger than the pixels
        hist = np.bincount(key, minlength=n_cells)
        keys = np.flatnonzero(hist)
        inter = hist[keys]
    else:
        keys, inter = np.unique(key, return_counts=True)
    pair_pred = (keys // stride - 1).astype(np.intp)
    pair_truth = (keys % stride - 1).astype(np.intp)
    inter = inter.astype(np.int64)
    union = p_area[pair_pred] + t_area[pair_truth] - inter
    return _Overlap(
        pred_ids=p_ids,
        truth_ids=t_ids,
        pred_area=p_area,
        truth_area=t_area,
        pair_pred=pair_pred,
        pair_truth=pair_truth,
        pair_inter=inter,
        pair_iou=inter / union,
        n_pixels=int(p.size),
    )


# ---------------------------------------------------------------------------- matching


def _assign(ov: _Overlap, pairs: IndexArray) -> IndexArray:
    """Most matches, then most summed IoU, among candidate pairs that compete for an object.

    Solved as a sparse assignment problem (LAPJVsp) in which each prediction may instead take
    a private dummy partner, so a full matching always exists and objects may stay unmatched.
    Weights: a real match >= 1, all IoU tie-break terms together <= 0.5, all dummies
    together <= 0.25, so the number of matches always comes first."""
    rows, r = np.unique(ov.pair_pred[pairs], return_inverse=True)
    cols, c = np.unique(ov.pair_truth[pairs], return_inverse=True)
    n_r, n_c = rows.size, cols.size
    dummy = np.arange(n_r)
    weight = np.concatenate(
        [1.0 + ov.pair_iou[pairs] / (2 * min(n_r, n_c)), np.full(n_r, 0.25 / n_r)]
    )
    graph = csr_matrix(
        (weight, (np.concatenate([r, dummy]), np.concatenate([c, n_c + dummy]))),
        shape=(n_r, n_c + n_r),
    )
    ri, ci = min_weight_full_bipartite_matching(graph, maximize=True)
    real = ci < n_c
    key = r.astype(np.int64) * n_c + c
    order = np.argsort(key)
    return pairs[order[np.searchsorted(key[order], ri[real].astype(np.int64) * n_c + ci[real])]]


def _match_pairs(ov: _Overlap, threshold: float) -> IndexArray:
    """Indices of overlap pairs forming a maximum one-to-one matching at IoU >= threshold."""
    cand = np.flatnonzero(ov.pair_iou >= threshold)
    if cand.size == 0:
        return cand
    cp, ct = ov.pair_pred[cand], ov.pair_truth[cand]
    # At IoU >= 0.5 (almost) every candidate is the only one of its pred and of its truth.
    alone = (np.bincount(cp, minlength=ov.pred_ids.size)[cp] == 1) & (
        np.bincount(ct, minlength=ov.truth_ids.size)[ct] == 1
    )
    if alone.all():
        return cand
    return np.sort(np.concatenate([cand[alone], _assign(ov, cand[~alone])]))


@dataclass(frozen=True, eq=False)
class Matching:
    """One-to-one matches between predicted and true objects at one IoU threshold.

    ``pred_ids[i]`` is matched to ``truth_ids[i]`` with IoU ``ious[i]`` (label values, not
    indices)."""

    threshold: float
    pred_ids: IntArray
    truth_ids: IntArray
    ious: FloatArray
    n_pred: int
    n_true: int

    @property
    def tp(self) -> int:
        return int(self.pred_ids.size)

    @property
    def fp(self) -> int:
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        return self.n_true - self.tp


def match_instances(
    pred: npt.ArrayLike, truth: npt.ArrayLike, *, iou_threshold: float = 0.5
) -> Matching:
    """Match predicted to true objects one-to-one; a pair counts when IoU >= iou_threshold.

    ``>=`` is the StarDist/Cellpose convention: a prediction covering exactly half of a
    merged pair of equal true objects (IoU 0.5) still matches one of them at 0.5.
    """
    t = _threshold(iou_threshold)
    ov = _overlap(pred, truth)
    sel = _match_pairs(ov, t)
    return Matching(
        threshold=t,
        pred_ids=ov.pred_ids[ov.pair_pred[sel]],
        truth_ids=ov.truth_ids[ov.pair_truth[sel]],
        ious=ov.pair_iou[sel],
        n_pred=int(ov.pred_ids.size),
        n_true=int(ov.truth_ids.size),
    )


# ---------------------------------------------------------------------------- AP, F1, PQ


@dataclass(frozen=True, eq=False)
class InstanceMetrics:
    """Detection counts per IoU threshold, for one image or pooled over several.

    Only additive quantities are stored (TP and summed matched IoU per threshold, object
    counts), so pooling is exact; every score is derived from them. Scores with a zero
    denominator are NaN."""

    thresholds: tuple[float, ...]
    tp: IntArray
    iou_sum: FloatArray
    n_pred: int
    n_true: int
    n_images: int = 1

    @property
    def fp(self) -> IntArray:
        return self.n_pred - self.tp

    @property
    def fn(self) -> IntArray:
        return self.n_true - self.tp

    @property
    def precision(self) -> FloatArray:
        return _ratio(self.tp, self.n_pred)

    @property
    def recall(self) -> FloatArray:
        return _ratio(self.tp, self.n_true)

    @property
    def f1(self) -> FloatArray:
        return _ratio(2 * self.tp, self.n_pred + self.n_true)

    @property
    def ap(self) -> FloatArray:
        """TP / (TP + FP + FN), the DSB 2018 / Cellpose "average precision"."""
        return _ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def mean_ap(self) -> float:
        """AP averaged over ``thresholds`` (0.50:0.05:0.95 by default)."""
        return float(np.mean(self.ap))

    @property
    def mean_matched_iou(self) -> FloatArray:
        return _ratio(self.iou_sum, self.tp)

    @property
    def panoptic_quality(self) -> FloatArray:
        """PQ = SQ·RQ = summed matched IoU / (TP + FP/2 + FN/2) (Kirillov et al. 2019)."""
        return _ratio(self.iou_sum, self.tp + 0.5 * self.fp + 0.5 * self.fn)

    def index(self, threshold: float) -> int:
        for i, t in enumerate(self.thresholds):
            if math.isclose(t, threshold, abs_tol=1e-9):
                return i
        raise HcssegError(f"IoU threshold {threshold} was not evaluated (have {self.thresholds})")

    def __add__(self, other: InstanceMetrics) -> InstanceMetrics:
        if self.thresholds != other.thresholds:
            raise HcssegError(
                f"cannot pool metrics at thresholds {self.thresholds} and {other.thresholds}"
            )
        return InstanceMetrics(
            thresholds=self.thresholds,
            tp=self.tp + other.tp,
            iou_sum=self.iou_sum + other.iou_sum,
            n_pred=self.n_pred + other.n_pred,
            n_true=self.n_true + other.n_true,
            n_images=self.n_images + other.n_images,
        )

    def as_row(self) -> dict[str, float]:
        """Flat dict for a DataFrame row: counts and AP per threshold (``tp_50``, ``ap_75``,
        ...), ``ap_mean``, and precision/recall/F1/matched IoU/PQ at 0.5 when evaluated."""
        row: dict[str, float] = {"n_pred": self.n_pred, "n_true": self.n_true}
        ap = self.ap
        for i, t in enumerate(self.thresholds):
            tag = _tag(t)
            row[f"tp_{tag}"] = int(self.tp[i])
            row[f"fp_{tag}"] = int(self.fp[i])
            row[f"fn_{tag}"] = int(self.fn[i])
            row[f"ap_{tag}"] = float(ap[i])
        row["ap_mean"] = self.mean_ap
        if any(math.isclose(t, HEADLINE_THRESHOLD) for t in self.thresholds):
            i = self.index(HEADLINE_THRESHOLD)
            tag = _tag(HEADLINE_THRESHOLD)
            row[f"precision_{tag}"] = float(self.precision[i])
            row[f"recall_{tag}"] = float(self.recall[i])
            row[f"f1_{tag}"] = float(self.f1[i])
            row[f"matched_iou_{tag}"] = float(self.mean_matched_iou[i])
            row[f"pq_{tag}"] = float(self.panoptic_quality[i])
            row[f"iou_sum_{tag}"] = float(self.iou_sum[i])
        return row


def _instance_metrics(ov: _Overlap, thresholds: tuple[float, ...]) -> InstanceMetrics:
    tp = np.zeros(len(thresholds), dtype=np.int64)
    iou_sum = np.zeros(len(thresholds))
    for i, t in enumerate(thresholds):
        sel = _match_pairs(ov, t)
        tp[i] = sel.size
        iou_sum[i] = ov.pair_iou[sel].sum()
    return InstanceMetrics(
        thresholds=thresholds,
        tp=tp,
        iou_sum=iou_sum,
        n_pred=int(ov.pred_ids.size),
        n_true=int(ov.truth_ids.size),
    )


def instance_metrics(
    pred: npt.ArrayLike,
    truth: npt.ArrayLike,
    *,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
) -> InstanceMetrics:
    """TP/FP/FN, precision, recall, F1, AP, matched IoU and PQ per IoU threshold.

    Two empty label images give NaN scores (nothing to score), not 1."""
    return _instance_metrics(_overlap(pred, truth), _thresholds(thresholds))


def pooled_instance_metrics(
    pairs: Iterable[LabelPair], *, thresholds: Iterable[float] = DEFAULT_THRESHOLDS
) -> InstanceMetrics:
    """Metrics from TP/FP/FN summed over (pred, truth) image pairs (StarDist's
    ``matching_dataset``): crowded images weigh more than in a mean of per-image AP."""
    ts = _thresholds(thresholds)
    total: InstanceMetrics | None = None
    for pred, truth in pairs:
        m = _instance_metrics(_overlap(pred, truth), ts)
        total = m if total is None else total + m
    if total is None:
        raise InputDataError("no (pred, truth) image pairs to evaluate")
    return total


# ---------------------------------------------------------------------------- other scores


@dataclass(frozen=True)
class SplitMerge:
    """Over- and under-segmentation counts (Zaki et al., NCI HiTIF)."""

    splits: int  # true objects overlapped by more than one prediction
    merges: int  # predictions overlapping more than one true object
    iou_threshold: float


def _split_merge(ov: _Overlap, threshold: float) -> SplitMerge:
    cand = ov.pair_iou >= threshold
    per_truth = np.bincount(ov.pair_truth[cand], minlength=ov.truth_ids.size)
    per_pred = np.bincount(ov.pair_pred[cand], minlength=ov.pred_ids.size)
    return SplitMerge(
        splits=int(np.count_nonzero(per_truth > 1)),
        merges=int(np.count_nonzero(per_pred > 1)),
        iou_threshold=threshold,
    )


def split_merge_counts(
    pred: npt.ArrayLike, truth: npt.ArrayLike, *, iou_threshold: float = SPLIT_MERGE_IOU
) -> SplitMerge:
    """Count split true objects and merged predictions among overlaps with IoU >= threshold.

    The low threshold (0.1) ignores slivers at object borders but still sees each fragment of
    a split object; a tiny fragment below it is not counted."""
    return _split_merge(_overlap(pred, truth), _threshold(iou_threshold))


def _ari(ov: _Overlap) -> float:
    """ARI from the pair-confusion matrix of the full contingency table (background included
    as one cluster in each labelling), as scikit-learn's ``adjusted_rand_score``."""
    n = ov.n_pixels
    inter_p = np.bincount(ov.pair_pred, weights=ov.pair_inter, minlength=ov.pred_ids.size)
    inter_t = np.bincount(ov.pair_truth, weights=ov.pair_inter, minlength=ov.truth_ids.size)
    pred_on_bg = ov.pred_area - np.rint(inter_p).astype(np.int64)
    truth_on_bg = ov.truth_area - np.rint(inter_t).astype(np.int64)
    p_fg, t_fg = int(ov.pred_area.sum()), int(ov.truth_area.sum())
    both_fg = int(ov.pair_inter.sum())
    bg_bg = n - p_fg - t_fg + both_fg

    def sq(x: IntArray) -> int:
        return int(np.sum(x.astype(np.int64) ** 2))

    sum_sq = sq(ov.pair_inter) + sq(pred_on_bg) + sq(truth_on_bg) + bg_bg**2
    sum_pred_sq = sq(ov.pred_area) + (n - p_fg) ** 2
    sum_truth_sq = sq(ov.truth_area) + (n - t_fg) ** 2
    # ordered pixel pairs: together in both / only in truth / only in pred / in neither
    tp = sum_sq - n
    fp = sum_pred_sq - sum_sq
    fn = sum_truth_sq - sum_sq
    tn = n * n - fp - fn - sum_sq
    if fp == 0 and fn == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def adjusted_rand_index(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """Adjusted Rand index over pixels, background being one more cluster.

    Independent of label values; 1.0 for identical partitions (also when both are all
    background), about 0 for unrelated ones."""
    return _ari(_overlap(pred, truth))


def _semantic_iou(ov: _Overlap) -> float:
    inter = int(ov.pair_inter.sum())
    union = int(ov.pred_area.sum()) + int(ov.truth_area.sum()) - inter
    return inter / union if union else math.nan


def semantic_iou(pred: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """IoU of foreground (label > 0) vs background, ignoring instance identity.

    Accepts label images or boolean masks. NaN when neither has any foreground."""
    return _semantic_iou(_overlap(pred, truth, allow_bool=True))


def _as_intensity(image: npt.ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(image)
    if arr.ndim == 0 or arr.size == 0:
        raise InputDataError(f"image {name} is empty (shape {arr.shape})")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_) or np.iscomplexobj(arr):
        raise InputDataError(f"image {name} has dtype {arr.dtype}; expected real numbers")
    out = arr.astype(np.float64)
    if np.isnan(out).any():
        raise InputDataError(f"image {name} contains NaN values")
    if np.isinf(out).any():
        raise InputDataError(f"image {name} contains infinite values")
    return out


def pearson_correlation(a: npt.ArrayLike, b: npt.ArrayLike) -> float:
    """Pixel-wise Pearson correlation of two images (e.g. predicted vs real stain).

    NaN input is an error rather than silently propagating. If either image is constant the
    correlation is undefined (zero variance) and NaN is returned, as numpy.corrcoef does, so
    callers can skip it with a nan-aware mean."""
    x = _as_intensity(a, "a")
    y = _as_intensity(b, "b")
    if x.shape != y.shape:
        raise InputDataError(f"a has shape {x.shape} but b has shape {y.shape}; they must match")
    if x.min() == x.max() or y.min() == y.max():  # exact test: a mean of equal floats may drift
        return math.nan
    xc = x.ravel() - x.mean()
    yc = y.ravel() - y.mean()
    r = float(np.dot(xc, yc) / math.sqrt(float(np.dot(xc, xc)) * float(np.dot(yc, yc))))
    return min(1.0, max(-1.0, r))


# ---------------------------------------------------------------------------- image tables


def evaluate_images(
    pairs: Iterable[LabelPair],
    names: Sequence[str],
    *,
    thresholds: Iterable[float] = DEFAULT_THRESHOLDS,
    split_merge_iou: float = SPLIT_MERGE_IOU,
) -> pd.DataFrame:
    """One row per (pred, truth) pair: :meth:`InstanceMetrics.as_row` columns plus
    ``splits``, ``merges``, ``ari`` and ``semantic_iou``. Summarise with
    :func:`summarize_images`."""
    ts = _thresholds(thresholds)
    sm = _threshold(split_merge_iou, "split/merge IoU threshold")
    names = list(names)
    rows = []
    for i, (pred, truth) in enumerate(pairs):
        if i >= len(names):
            raise InputDataError(f"more image pairs than names ({len(names)} names)")
        ov = _overlap(pred, truth)
        split_merge = _split_merge(ov, sm)
        rows.append(
            {"image": names[i]}
            | _instance_metrics(ov, ts).as_row()
            | {
                "splits": split_merge.splits,
                "merges": split_merge.merges,
                "ari": _ari(ov),
                "semantic_iou": _semantic_iou(ov),
            }
        )
    if len(rows) != len(names):
        raise InputDataError(f"{len(names)} names given for {len(rows)} image pairs")
    return pd.DataFrame(rows)


def summarize_images(table: pd.DataFrame) -> dict[str, float]:
    """Dataset scores from an :func:`evaluate_images` table, both ways the literature does it.

    ``*_image_mean``: mean over images of the per-image score (Han et al. 2024, Cellpose
    papers), skipping images where it is NaN. ``*_pooled``: from TP/FP/FN summed over images
    (StarDist ``matching_dataset``), which weighs crowded images more."""
    tags = [c.removeprefix("tp_") for c in table.columns if c.startswith("tp_")]
    if table.empty or not tags:
        raise InputDataError("no per-image rows with tp_* columns to summarise")
    n_pred, n_true = int(table["n_pred"].sum()), int(table["n_true"].sum())
    out: dict[str, float] = {"n_images": len(table), "n_pred": n_pred, "n_true": n_true}
    pooled_ap = []
    for tag in tags:
        tp = int(table[f"tp_{tag}"].sum())
        pooled_ap.append(float(_ratio(tp, n_pred + n_true - tp)))
        out[f"ap_{tag}_image_mean"] = _nanmean(table[f"ap_{tag}"])
        out[f"ap_{tag}_pooled"] = pooled_ap[-1]
    out["ap_mean_image_mean"] = _nanmean(table["ap_mean"])
    out["ap_mean_pooled"] = float(np.mean(pooled_ap))
    tag = _tag(HEADLINE_THRESHOLD)
    if f"pq_{tag}" in table.columns:
        tp = int(table[f"tp_{tag}"].sum())
        iou_sum = float(table[f"iou_sum_{tag}"].sum())
        pooled = {
            "precision": _ratio(tp, n_pred),
            "recall": _ratio(tp, n_true),
            "f1": _ratio(2 * tp, n_pred + n_true),
            "matched_iou": _ratio(iou_sum, tp),
            "pq": _ratio(iou_sum, 0.5 * (n_pred + n_true)),
        }
        for name, value in pooled.items():
            out[f"{name}_{tag}_image_mean"] = _nanmean(table[f"{name}_{tag}"])
            out[f"{name}_{tag}_pooled"] = float(value)
    for name in ("splits", "merges"):
        if name in table.columns:
            out[f"{name}_total"] = int(table[name].sum())
    for name in ("ari", "semantic_iou"):
        if name in table.columns:
            out[f"{name}_image_mean"] = _nanmean(table[name])
    return out
