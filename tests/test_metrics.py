from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.optimize import linear_sum_assignment

from hcsseg.errors import HcssegError, InputDataError
from hcsseg.evaluate.metrics import (
    DEFAULT_THRESHOLDS,
    adjusted_rand_index,
    evaluate_images,
    instance_metrics,
    match_instances,
    pearson_correlation,
    pooled_instance_metrics,
    semantic_iou,
    split_merge_counts,
    summarize_images,
)
from tests.conftest import dataset

# ---------------------------------------------------------------------------- helpers


def squares(shape: tuple[int, int], boxes: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    """Label image with label -> (row0, row1, col0, col1) rectangles."""
    lab = np.zeros(shape, dtype=np.uint16)
    for label, (r0, r1, c0, c1) in boxes.items():
        lab[r0:r1, c0:c1] = label
    return lab


def grid(n: int = 2000, pitch: int = 31, side: int = 30, shift: int = 0) -> np.ndarray:
    """~(n / pitch)^2 square objects, shifted down by `shift` rows."""
    lab = np.zeros((n, n), dtype=np.int32)
    starts = range(0, n - side - 3, pitch)
    label = 0
    for r in starts:
        for c in starts:
            label += 1
            lab[r + shift : r + shift + side, c : c + side] = label
    return lab


def reference_match(pred: np.ndarray, truth: np.ndarray, threshold: float) -> tuple[int, float]:
    """Dense per-object IoU matrix and scipy's Hungarian solver: most matches at IoU >=
    threshold, then the largest summed IoU of the matched pairs."""
    p_ids = [i for i in np.unique(pred) if i]
    t_ids = [j for j in np.unique(truth) if j]
    if not p_ids or not t_ids:
        return 0, 0.0
    iou = np.zeros((len(p_ids), len(t_ids)))
    for a, i in enumerate(p_ids):
        for b, j in enumerate(t_ids):
            pm, tm = pred == i, truth == j
            iou[a, b] = (pm & tm).sum() / (pm | tm).sum()
    ok = iou >= threshold
    cost = np.where(ok, -1 - iou / (2 * min(iou.shape)), 0.0)
    rows, cols = linear_sum_assignment(cost)
    matched = ok[rows, cols]
    # StarDist/Cellpose's cost also rewards IoU of pairs below the threshold, which can trade
    # matched IoU away; the match count is the same, the matched IoU never higher.
    stardist_cost = -ok.astype(float) - iou / (2 * min(iou.shape))
    sd_rows, sd_cols = linear_sum_assignment(stardist_cost)
    sd_ok = ok[sd_rows, sd_cols]
    assert sd_ok.sum() == matched.sum()
    assert iou[sd_rows, sd_cols][sd_ok].sum() <= iou[rows, cols][matched].sum() + 1e-12
    return int(matched.sum()), float(iou[rows, cols][matched].sum())


def reference_ari(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert-Arabie ARI from pair counts (a different formula from the module's)."""
    _, ai = np.unique(a.ravel(), return_inverse=True)
    _, bi = np.unique(b.ravel(), return_inverse=True)
    table = np.zeros((ai.max() + 1, bi.max() + 1))
    np.add.at(table, (ai, bi), 1)

    def comb2(x: np.ndarray) -> float:
        return float((x * (x - 1) / 2).sum())

    index, sa, sb = comb2(table), comb2(table.sum(1)), comb2(table.sum(0))
    expected = sa * sb / comb2(np.array([a.size]))
    return (index - expected) / ((sa + sb) / 2 - expected)


def erode_labels(lab: np.ndarray, size: int = 3) -> np.ndarray:
    """Shrink every object by removing pixels whose neighbourhood holds another label."""
    keep = ndi.minimum_filter(lab, size) == ndi.maximum_filter(lab, size)
    return np.where(keep, lab, 0).astype(lab.dtype)


def random_blobs(rng: np.random.Generator, shape: tuple[int, int], n: int) -> np.ndarray:
    """Voronoi-like labels from random seeds, with a background band."""
    seeds = np.zeros(shape, dtype=np.int32)
    rr = rng.integers(0, shape[0], n)
    cc = rng.integers(0, shape[1], n)
    seeds[rr, cc] = np.arange(1, n + 1)
    _, (ir, ic) = ndi.distance_transform_edt(seeds == 0, return_indices=True)
    lab = seeds[ir, ic]
    lab[rng.random(shape) < 0.1] = 0
    return lab


def dsb_labels(shared_data: Path, count: int) -> list[np.ndarray]:
    tifffile = pytest.importorskip("tifffile")
    root = dataset(shared_data, "nuclei-dsb2018")
    files = sorted(root.glob("*_lab.tif"))[:count]
    if not files:
        pytest.skip("no label images in nuclei-dsb2018")
    return [tifffile.imread(f) for f in files]


# ---------------------------------------------------------------------------- AP and matching


def test_identical_labels_score_perfectly() -> None:
    truth = squares((40, 40), {1: (0, 10, 0, 10), 2: (20, 30, 5, 25), 3: (12, 18, 30, 38)})
    m = instance_metrics(truth, truth)
    assert m.thresholds == DEFAULT_THRESHOLDS
    np.testing.assert_array_equal(m.ap, 1.0)
    np.testing.assert_array_equal(m.tp, 3)
    np.testing.assert_array_equal(m.fp, 0)
    np.testing.assert_array_equal(m.fn, 0)
    np.testing.assert_array_equal(m.f1, 1.0)
    np.testing.assert_allclose(m.panoptic_quality, 1.0)
    assert m.mean_ap == 1.0
    assert adjusted_rand_index(truth, truth) == 1.0
    assert semantic_iou(truth, truth) == 1.0


def test_shifted_square_has_exact_iou() -> None:
    truth = squares((20, 30), {1: (0, 10, 0, 10)})
    pred = squares((20, 30), {4: (0, 10, 2, 12)})  # overlap 10x8 = 80, union 120
    iou = 80 / 120
    match = match_instances(pred, truth, iou_threshold=0.5)
    assert match.pred_ids.tolist() == [4] and match.truth_ids.tolist() == [1]
    assert match.ious[0] == pytest.approx(iou)
    m = instance_metrics(pred, truth)
    expected_tp = [1 if t <= iou else 0 for t in DEFAULT_THRESHOLDS]
    assert m.tp.tolist() == expected_tp  # matched up to 0.65, not from 0.70
    assert m.mean_matched_iou[0] == pytest.approx(iou)
    assert m.panoptic_quality[0] == pytest.approx(iou)  # SQ = iou, RQ = 1
    assert m.ap[-1] == 0.0 and m.fp[-1] == 1 and m.fn[-1] == 1
    assert m.mean_ap == pytest.approx(np.mean(expected_tp))
    assert semantic_iou(pred, truth) == pytest.approx(iou)


def test_iou_exactly_at_threshold_matches() -> None:
    # One prediction covering two equal true halves: IoU is exactly 0.5 with each.
    truth = squares((10, 20), {1: (0, 10, 0, 10), 2: (0, 10, 10, 20)})
    pred = squares((10, 20), {1: (0, 10, 0, 20)})
    m = instance_metrics(pred, truth, thresholds=[0.5, 0.55])
    assert m.tp.tolist() == [1, 0]  # IoU >= 0.5 counts; the StarDist/Cellpose rule
    assert m.fn.tolist() == [1, 2]
    assert m.fp.tolist() == [0, 1]
    assert m.ap[0] == pytest.approx(0.5)
    assert split_merge_counts(pred, truth) == split_merge_counts(pred, truth, iou_threshold=0.1)
    assert split_merge_counts(pred, truth).merges == 1


def test_empty_prediction_against_objects() -> None:
    truth = squares((30, 30), {1: (0, 5, 0, 5), 2: (10, 15, 10, 15), 5: (20, 25, 0, 5)})
    m = instance_metrics(np.zeros_like(truth), truth)
    np.testing.assert_array_equal(m.ap, 0.0)
    np.testing.assert_array_equal(m.fn, 3)
    np.testing.assert_array_equal(m.fp, 0)
    np.testing.assert_array_equal(m.recall, 0.0)
    assert np.isnan(m.precision).all()  # no predictions: precision undefined
    np.testing.assert_array_equal(m.f1, 0.0)
    assert m.panoptic_quality[0] == 0.0
    assert np.isnan(m.mean_matched_iou[0])


def test_both_empty_is_undefined_not_perfect() -> None:
    empty = np.zeros((16, 16), dtype=np.uint8)
    m = instance_metrics(empty, empty)
    assert np.isnan(m.ap).all() and math.isnan(m.mean_ap)
    assert m.tp.tolist() == [0] * len(DEFAULT_THRESHOLDS)
    assert math.isnan(semantic_iou(empty, empty))
    assert adjusted_rand_index(empty, empty) == 1.0  # one identical cluster


def test_label_gaps_and_large_ids_give_same_result() -> None:
    rng = np.random.default_rng(3)
    truth = random_blobs(rng, (64, 64), 12)
    pred = np.roll(random_blobs(rng, (64, 64), 12), 2, axis=1)
    consecutive = instance_metrics(pred, truth, thresholds=[0.1, 0.3, 0.5, 0.75])
    remapped = {
        "gaps": lambda x, ids: np.concatenate([[0], ids])[x],
        "huge_ids": lambda x, ids: np.concatenate([[0], ids * 10**9]).astype(np.uint64)[x],
    }
    ids = np.array([3, 7, 100, 4, 55, 9, 1000, 12, 13, 200, 2, 8])
    for remap in remapped.values():
        m = instance_metrics(
            remap(pred, ids), remap(truth, ids[::-1]), thresholds=[0.1, 0.3, 0.5, 0.75]
        )
        np.testing.assert_array_equal(m.tp, consecutive.tp)
        np.testing.assert_allclose(m.iou_sum, consecutive.iou_sum)
        assert (m.n_pred, m.n_true) == (consecutive.n_pred, consecutive.n_true)
    match = match_instances(remapped["gaps"](truth, ids), remapped["gaps"](truth, ids))
    assert sorted(match.pred_ids.tolist()) == sorted(ids.tolist())
    np.testing.assert_array_equal(match.pred_ids, match.truth_ids)


def test_three_objects_with_ids_3_7_100() -> None:
    boxes = [(0, 10, 0, 10), (0, 10, 15, 25), (15, 25, 0, 10)]
    truth = squares((30, 30), dict(zip([1, 2, 3], boxes, strict=True)))
    gapped = squares((30, 30), dict(zip([3, 7, 100], boxes, strict=True)))
    pred = squares((30, 30), {1: (0, 10, 1, 11), 2: (0, 10, 15, 25)})
    a = instance_metrics(pred, truth)
    b = instance_metrics(pred, gapped)
    np.testing.assert_array_equal(a.tp, b.tp)
    assert b.n_true == 3  # counted objects, not the max id
    assert b.fn[0] == 1 and b.ap[0] == pytest.approx(2 / 3)


def test_matching_maximises_matches_not_greedy_iou() -> None:
    # 1-D labels: X=[0,10), Y=[10,20); A=[3,17) has IoU 7/17 with both; B=[0,3) has 3/10 with X.
    truth = np.zeros(24, dtype=np.uint8)
    truth[0:10], truth[10:20] = 1, 2
    pred = np.zeros(24, dtype=np.uint8)
    pred[3:17], pred[0:3] = 1, 2
    match = match_instances(pred, truth, iou_threshold=0.3)
    assert sorted(zip(match.pred_ids.tolist(), match.truth_ids.tolist(), strict=True)) == [
        (1, 2),
        (2, 1),
    ]
    assert match.tp == 2 and match.fp == 0 and match.fn == 0
    assert match_instances(pred, truth, iou_threshold=0.35).tp == 1


@pytest.mark.parametrize("seed", range(6))
def test_matching_agrees_with_dense_hungarian(seed: int) -> None:
    rng = np.random.default_rng(seed)
    truth = random_blobs(rng, (48, 48), 15)
    pred = random_blobs(rng, (48, 48), 18)
    thresholds = [0.05, 0.1, 0.2, 0.3, 0.5, 0.7]
    m = instance_metrics(pred, truth, thresholds=thresholds)
    for i, t in enumerate(thresholds):
        tp, iou_sum = reference_match(pred, truth, t)
        assert m.tp[i] == tp, f"threshold {t}"
        assert m.iou_sum[i] == pytest.approx(iou_sum), f"threshold {t}"


def test_3d_labels() -> None:
    truth = np.zeros((4, 10, 10), dtype=np.uint32)
    truth[1:3, 2:6, 2:6] = 9
    pred = truth.copy()
    pred[1, 2, 2] = 0  # IoU 31/32
    m = instance_metrics(pred, truth)
    assert m.tp.tolist() == [1] * len(DEFAULT_THRESHOLDS)
    assert m.mean_matched_iou[0] == pytest.approx(31 / 32)


def test_large_image_with_4000_objects() -> None:
    truth = grid()
    pred = grid(shift=3)  # each square loses 3 of 30 rows: IoU 810/990
    m = instance_metrics(pred, truth)
    n = m.n_true
    assert n == m.n_pred == 64 * 64
    expected = [n if t <= 810 / 990 else 0 for t in DEFAULT_THRESHOLDS]
    assert m.tp.tolist() == expected
    assert m.mean_matched_iou[0] == pytest.approx(810 / 990)
    # neighbouring squares overlap by 2 rows (IoU 0.034): no splits or merges at 0.1
    sm = split_merge_counts(pred, truth)
    assert (sm.splits, sm.merges) == (0, 0)
    assert split_merge_counts(pred, truth, iou_threshold=0.03).merges == n - 64


# ---------------------------------------------------------------------------- splits and merges


def test_split_and_merge_counts() -> None:
    truth = squares((20, 40), {1: (0, 10, 0, 20), 2: (0, 10, 25, 30), 3: (12, 20, 25, 35)})
    # truth 1 split into two halves; truth 2 and 3 merged into one box
    pred = squares((20, 40), {1: (0, 10, 0, 10), 2: (0, 10, 10, 20), 3: (0, 20, 25, 35)})
    sm = split_merge_counts(pred, truth)
    assert (sm.splits, sm.merges, sm.iou_threshold) == (1, 1, 0.1)
    swapped = split_merge_counts(truth, pred)
    assert (swapped.splits, swapped.merges) == (1, 1)
    m = instance_metrics(pred, truth, thresholds=[0.5])
    # one half matches truth 1 (IoU exactly 0.5); the merge reaches only 80/200 with truth 3
    assert (m.tp[0], m.fp[0], m.fn[0]) == (1, 2, 2)


def test_small_fragment_below_split_threshold_is_not_a_split() -> None:
    truth = squares((20, 20), {1: (0, 20, 0, 20)})  # 400 px
    pred = squares((20, 20), {1: (0, 19, 0, 20), 2: (19, 20, 0, 20)})  # fragment IoU 20/400
    assert split_merge_counts(pred, truth).splits == 0
    assert split_merge_counts(pred, truth, iou_threshold=0.05).splits == 1


# ---------------------------------------------------------------------------- ARI, IoU, Pearson


def test_ari_of_permuted_labelling_is_one() -> None:
    rng = np.random.default_rng(7)
    truth = random_blobs(rng, (40, 40), 10)
    perm = np.concatenate([[0], rng.permutation(np.arange(1, 11)) + 50])
    assert adjusted_rand_index(perm[truth], truth) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(4))
def test_ari_matches_reference_formula(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = random_blobs(rng, (30, 40), 8)
    b = random_blobs(rng, (30, 40), 11)
    expected = reference_ari(a, b)
    assert adjusted_rand_index(a, b) == pytest.approx(expected)
    assert adjusted_rand_index(b, a) == pytest.approx(expected)
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    assert adjusted_rand_index(a, b) == pytest.approx(
        sklearn_metrics.adjusted_rand_score(b.ravel(), a.ravel())
    )


def test_semantic_iou_accepts_masks() -> None:
    truth = squares((10, 10), {3: (0, 5, 0, 10)})  # 50 px
    pred = np.zeros((10, 10), dtype=bool)
    pred[0:10, 0:3] = True  # 30 px, 15 shared
    assert semantic_iou(pred, truth) == pytest.approx(15 / 65)


def test_pearson_correlation() -> None:
    rng = np.random.default_rng(0)
    a = rng.random((32, 32))
    b = a + 0.5 * rng.random((32, 32))
    assert pearson_correlation(a, b) == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1])
    assert pearson_correlation(a, 3 * a + 1) == pytest.approx(1.0)
    assert pearson_correlation(a.astype(np.float32), -a) == pytest.approx(-1.0)
    assert math.isnan(pearson_correlation(a, np.full_like(a, 0.1)))
    bad = a.copy()
    bad[3, 3] = np.nan
    with pytest.raises(InputDataError, match="NaN"):
        pearson_correlation(bad, a)
    with pytest.raises(InputDataError, match=r"\(32, 32\).*\(32, 31\)"):
        pearson_correlation(a, a[:, :31])


# ---------------------------------------------------------------------------- validation


def test_shape_mismatch_names_both_shapes() -> None:
    with pytest.raises(
        InputDataError, match=r"pred has shape \(5, 6\) but truth has shape \(6, 5\)"
    ):
        instance_metrics(np.zeros((5, 6), np.uint8), np.zeros((6, 5), np.uint8))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([[0.0, 1.5]]), "non-integer"),
        (np.array([[0.0, np.nan]]), "NaN"),
        (np.array([[0, -2]], dtype=np.int16), "negative"),
        (np.array([[True, False]]), "boolean mask"),
        (np.array([["a", "b"]]), "dtype"),
        (np.zeros((0, 4), np.uint16), "empty"),
    ],
)
def test_bad_labels_raise(labels: np.ndarray, message: str) -> None:
    ok = np.zeros(labels.shape, dtype=np.uint16)
    with pytest.raises(InputDataError, match=message):
        instance_metrics(labels, ok)
    with pytest.raises(InputDataError, match=message):
        split_merge_counts(ok, labels)


def test_float_labels_holding_integers_are_accepted() -> None:
    truth = squares((20, 30), {1: (0, 10, 0, 10)})
    pred = squares((20, 30), {4: (0, 10, 2, 12)})
    a = instance_metrics(pred.astype(np.float32), truth.astype(np.float64))
    b = instance_metrics(pred, truth)
    np.testing.assert_array_equal(a.tp, b.tp)


@pytest.mark.parametrize("thresholds", [[0.0], [1.2], [], [float("nan")]])
def test_bad_thresholds_raise(thresholds: list[float]) -> None:
    lab = squares((5, 5), {1: (0, 2, 0, 2)})
    with pytest.raises(HcssegError, match="threshold"):
        instance_metrics(lab, lab, thresholds=thresholds)


# ---------------------------------------------------------------------------- pooling and tables


def _two_images() -> list[tuple[np.ndarray, np.ndarray]]:
    # image 1: 1 object, found; image 2: 4 objects, 1 found and 1 false positive
    t1 = squares((20, 20), {1: (0, 10, 0, 10)})
    boxes = {1: (0, 5, 0, 5), 2: (0, 5, 10, 15), 3: (10, 15, 0, 5), 4: (10, 15, 10, 15)}
    t2 = squares((20, 20), boxes)
    p2 = squares((20, 20), {7: (0, 5, 0, 5), 8: (16, 20, 16, 20)})
    return [(t1.copy(), t1), (p2, t2)]


def test_pooled_sums_counts_over_images() -> None:
    pairs = _two_images()
    per_image = [instance_metrics(p, t, thresholds=[0.5]) for p, t in pairs]
    pooled = pooled_instance_metrics(pairs, thresholds=[0.5])
    assert pooled.n_images == 2
    assert (pooled.tp[0], pooled.fp[0], pooled.fn[0]) == (2, 1, 3)
    assert pooled.tp[0] == sum(m.tp[0] for m in per_image)
    assert pooled.ap[0] == pytest.approx(2 / 6)
    # the mean of per-image AP weighs the easy single-object image as much as the hard one
    assert np.mean([m.ap[0] for m in per_image]) == pytest.approx((1 + 1 / 5) / 2)
    with pytest.raises(InputDataError, match="no"):
        pooled_instance_metrics([])


def test_evaluate_and_summarize_images() -> None:
    pairs = _two_images()
    empty = np.zeros((20, 20), dtype=np.uint8)
    table = evaluate_images([*pairs, (empty, empty)], ["a", "b", "blank"])
    assert table["image"].tolist() == ["a", "b", "blank"]
    assert table["tp_50"].tolist() == [1, 1, 0]
    assert table.loc[0, "ari"] == 1.0 and np.isnan(table.loc[2, "ap_50"])
    summary = summarize_images(table)
    pooled = pooled_instance_metrics(pairs)
    assert summary["n_images"] == 3
    assert summary["ap_50_pooled"] == pytest.approx(pooled.ap[0])
    assert summary["ap_mean_pooled"] == pytest.approx(pooled.mean_ap)
    assert summary["pq_50_pooled"] == pytest.approx(pooled.panoptic_quality[0])
    assert summary["f1_50_pooled"] == pytest.approx(pooled.f1[0])
    assert summary["ap_50_image_mean"] == pytest.approx((1 + 1 / 5) / 2)  # blank image skipped
    with pytest.raises(InputDataError, match="3 names given for 2"):
        evaluate_images(pairs, ["a", "b", "c"])
    with pytest.raises(InputDataError, match="more image pairs than names"):
        evaluate_images(pairs, ["a"])


# ---------------------------------------------------------------------------- real data


def test_dsb_labels_against_eroded_copies(shared_data: Path) -> None:
    labels = dsb_labels(shared_data, 3)
    for truth in labels:
        pred = erode_labels(truth)
        m = instance_metrics(pred, truth)
        assert m.n_true == len(np.unique(truth)) - 1
        assert 0.3 < m.ap[0] <= 1.0  # 1-px erosion keeps most nuclei above IoU 0.5
        assert m.fp[0] == m.fn[0]  # an object that drops below 0.5 counts once on each side
        # renumbering with gaps changes nothing
        ids = np.unique(truth)
        lut = np.zeros(int(ids.max()) + 1, dtype=np.int64)
        lut[ids[1:]] = 7 * np.arange(1, ids.size) + 11
        np.testing.assert_array_equal(instance_metrics(lut[pred], truth).tp, m.tp)


@pytest.mark.slow  # importing cellpose (torch, numba) takes ~10 s on a shared CPU
def test_agrees_with_cellpose_average_precision(shared_data: Path) -> None:
    cp_metrics = pytest.importorskip("cellpose.metrics")
    from skimage.segmentation import relabel_sequential

    thresholds = [0.5, 0.6, 0.75, 0.9]
    for truth in dsb_labels(shared_data, 5):
        truth = relabel_sequential(truth)[0]  # cellpose counts objects as labels.max()
        for pred in (erode_labels(truth), relabel_sequential(np.roll(truth, 3, axis=1))[0]):
            pred = relabel_sequential(pred)[0]
            ap, tp, _, _ = cp_metrics.average_precision(truth, pred, threshold=thresholds)
            m = instance_metrics(pred, truth, thresholds=thresholds)
            np.testing.assert_array_equal(m.tp, tp.astype(int))
            np.testing.assert_allclose(m.ap, ap, rtol=1e-6)
