from __future__ import annotations

import numpy as np
import pytest
import tifffile
from pydantic import ValidationError

from hcsseg.errors import InputDataError
from hcsseg.segment.classical import CellOptions, NucleiOptions, segment_cells, segment_nuclei
from tests.conftest import dataset

PIXEL_UM = 0.5


def _disc(shape: tuple[int, int], center: tuple[float, float], radius: float) -> np.ndarray:
    yy, xx = np.ogrid[: shape[0], : shape[1]]
    return (yy - center[0]) ** 2 + (xx - center[1]) ** 2 <= radius**2


def _touching_discs() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = np.full((96, 128), 10.0)
    image[_disc(image.shape, (48, 44), 16)] = 200
    image[_disc(image.shape, (48, 72), 16)] = 200  # centres 28 px apart: a 2-disc clump
    return image + rng.normal(0, 2, image.shape)


def _ap50(truth: np.ndarray, pred: np.ndarray) -> float:
    """AP@0.5 = TP / (TP + FP + FN); IoU > 0.5 makes matches one-to-one by construction."""
    truth, pred = truth.astype(np.int64), pred.astype(np.int64)
    n_true, n_pred = len(np.unique(truth[truth > 0])), len(np.unique(pred[pred > 0]))
    both = (truth > 0) & (pred > 0)
    base = int(pred.max()) + 1
    pairs, inter = np.unique(truth[both] * base + pred[both], return_counts=True)
    area_t, area_p = np.bincount(truth.ravel()), np.bincount(pred.ravel())
    iou = inter / (area_t[pairs // base] + area_p[pairs % base] - inter)
    tp = int((iou > 0.5).sum())
    return tp / max(n_true + n_pred - tp, 1)


def test_touching_discs_are_split_in_two() -> None:
    labels = segment_nuclei(_touching_discs(), pixel_size_um=PIXEL_UM)
    assert labels.dtype == np.uint32
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2]
    # each object is centred on one disc
    centres = sorted(np.argwhere(labels == k)[:, 1].mean() for k in (1, 2))
    assert centres == pytest.approx([44, 72], abs=3)


def test_size_filter_and_border_exclusion() -> None:
    image = np.zeros((100, 100))
    image[_disc(image.shape, (50, 50), 10)] = 1.0  # 10 µm wide at 0.5 µm/px: kept
    image[_disc(image.shape, (10, 80), 1.5)] = 1.0  # 1.5 µm: below the 3 µm minimum
    image[_disc(image.shape, (0, 20), 8)] = 1.0  # cut by the top border
    kept = segment_nuclei(image, pixel_size_um=PIXEL_UM)
    assert kept.max() == 2
    assert kept[10, 80] == 0
    inner = segment_nuclei(
        image, pixel_size_um=PIXEL_UM, options=NucleiOptions(exclude_border=True)
    )
    assert inner.max() == 1 and inner[50, 50] == 1 and inner[0, 20] == 0


@pytest.mark.parametrize("value", [0.0, 7.0])
def test_constant_image_gives_no_objects(value: float) -> None:
    labels = segment_nuclei(np.full((64, 64), value), pixel_size_um=PIXEL_UM)
    assert labels.dtype == np.uint32 and labels.shape == (64, 64) and not labels.any()


def test_bad_input_raises_input_data_error() -> None:
    image = _touching_discs()
    image[3, 3] = np.nan
    with pytest.raises(InputDataError, match="NaN"):
        segment_nuclei(image, pixel_size_um=PIXEL_UM)
    with pytest.raises(InputDataError, match="2-D"):
        segment_nuclei(np.zeros((2, 8, 8)), pixel_size_um=PIXEL_UM)
    with pytest.raises(InputDataError, match="pixel_size_um"):
        segment_nuclei(_touching_discs(), pixel_size_um=0)
    with pytest.raises(ValidationError):
        NucleiOptions(min_diameter_um=20, max_diameter_um=10)


def test_rgb_with_bright_background_is_inverted() -> None:
    grey = _touching_discs()
    dark_nuclei = 255 - np.clip(grey, 0, 255)  # H&E-like: dark nuclei on a bright background
    rgb = np.stack([dark_nuclei, dark_nuclei * 0.9, dark_nuclei], axis=-1).astype(np.uint8)
    labels = segment_nuclei(rgb, pixel_size_um=PIXEL_UM)
    assert labels.max() == 2
    assert labels[48, 44] > 0 and labels[10, 10] == 0


@pytest.mark.parametrize("with_image", [True, False])
def test_cells_contain_nuclei_and_share_ids(with_image: bool) -> None:
    nuclei_img = np.zeros((80, 160))
    stain = np.full((80, 160), 5.0)
    for cx in (40, 110):
        nuclei_img[_disc(nuclei_img.shape, (40, cx), 8)] = 100
        stain[_disc(stain.shape, (40, cx), 24)] = 60
    nuclei = segment_nuclei(nuclei_img, pixel_size_um=PIXEL_UM)
    cells = segment_cells(nuclei, stain if with_image else None, pixel_size_um=PIXEL_UM)
    assert cells.dtype == np.uint32
    assert set(np.unique(cells)) == set(np.unique(nuclei))
    inside = nuclei > 0
    assert np.array_equal(cells[inside], nuclei[inside])
    for k in (1, 2):
        assert (cells == k).sum() > 3 * (nuclei == k).sum()
    if with_image:  # propagation stops at the edge of the stain, not at 20 µm
        assert cells[40, 75] == 0
        assert (cells == 1).sum() < np.pi * 28**2  # stain disc: radius 24 px


def test_cells_respect_max_expansion() -> None:
    nuclei = np.zeros((100, 100), dtype=np.uint32)
    nuclei[48:52, 48:52] = 5
    stain = np.full((100, 100), 50.0)
    stain[:5] = 0  # some contrast so the stain is thresholded, all of it bright near the nucleus
    cells = segment_cells(
        nuclei, stain, pixel_size_um=1.0, options=CellOptions(max_expansion_um=10)
    )
    yy, xx = np.nonzero(cells == 5)
    assert np.hypot(yy - 49.5, xx - 49.5).max() <= 10 + 2.5
    assert set(np.unique(cells)) == {0, 5}


def test_cells_of_no_nuclei_and_bad_shapes() -> None:
    empty = np.zeros((32, 32), dtype=np.uint16)
    assert not segment_cells(empty, np.ones((32, 32)), pixel_size_um=1.0).any()
    nuclei = np.zeros((32, 32), dtype=np.uint16)
    nuclei[10:14, 10:14] = 1
    with pytest.raises(InputDataError, match="shape"):
        segment_cells(nuclei, np.ones((31, 32)), pixel_size_um=1.0)
    with pytest.raises(InputDataError, match="integers"):
        segment_cells(nuclei.astype(float), None, pixel_size_um=1.0)


def test_dsb2018_subset_ap50(shared_data) -> None:
    """Defaults at an assumed 0.5 µm/px on every 7th image (20 of 140): measured 0.727."""
    files = sorted(dataset(shared_data, "nuclei-dsb2018").glob("*_img.tif"))[::7]
    assert len(files) == 20
    aps = [
        _ap50(
            tifffile.imread(f.with_name(f.name.replace("_img", "_lab"))),
            segment_nuclei(tifffile.imread(f), pixel_size_um=PIXEL_UM),
        )
        for f in files
    ]
    assert np.mean(aps) > 0.68


def test_cellprofiler_human_counts(shared_data) -> None:
    """ExampleHuman D03 site 0 at an assumed 0.65 µm/px: 312 nuclei, one cell each."""
    root = dataset(shared_data, "cellprofiler-human")
    dna = tifffile.imread(next(root.glob("*d0.tif")))
    body = tifffile.imread(next(root.glob("*d2.tif")))
    nuclei = segment_nuclei(dna, pixel_size_um=0.65)
    cells = segment_cells(nuclei, body, pixel_size_um=0.65)
    assert 280 <= nuclei.max() <= 340
    assert np.array_equal(np.unique(cells), np.unique(nuclei))
    area_n = np.bincount(nuclei.ravel())[1:]
    area_c = np.bincount(cells.ravel(), minlength=nuclei.max() + 1)[1:]
    assert np.median(area_c) > 2.5 * np.median(area_n)


def test_cells_from_a_ring_stain_alone() -> None:
    """Touching cells drawn only by their membranes (a surface stain) are found one by one,
    without nuclei, and segment_cells(method='stain') gives them their nucleus's id."""
    from scipy import ndimage as ndi
    from skimage.draw import disk
    from skimage.segmentation import find_boundaries

    from hcsseg.evaluate.metrics import instance_metrics
    from hcsseg.segment.classical import segment_cells_from_stain

    truth = np.zeros((120, 160), np.int32)
    centres = [(30, 30), (30, 52), (30, 110), (80, 60), (88, 130)]
    for k, c in enumerate(centres, 1):
        truth[disk(c, 11, shape=truth.shape)] = k
    rings = find_boundaries(truth, mode="inner")
    image = ndi.gaussian_filter(rings * 200.0, 1) + np.random.default_rng(0).normal(
        5, 1, truth.shape
    )
    cells = segment_cells_from_stain(image, pixel_size_um=0.5)
    assert float(instance_metrics(cells, truth).ap[0]) >= 0.8
    nuclei = np.zeros_like(truth)
    for k, (y, x) in enumerate(centres, 1):
        nuclei[y - 3 : y + 3, x - 3 : x + 3] = 10 * k
    grown = segment_cells(nuclei, image, pixel_size_um=0.5, options=CellOptions(method="stain"))
    for k, (y, x) in enumerate(centres, 1):
        assert grown[y, x] == 10 * k
