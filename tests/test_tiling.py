from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage import filters, measure, segmentation

from hcsseg.errors import HcssegError, InputDataError
from hcsseg.evaluate.metrics import instance_metrics
from hcsseg.segment.classical import segment_nuclei
from hcsseg.segment.tiling import predict_tiled, segment_tiled, tile_starts
from tests.conftest import dataset

DENSE_STEM = "M872956_JML_Position10_CD3"


def _ap50(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(instance_metrics(pred, truth, thresholds=[0.5]).ap[0])


@pytest.fixture(scope="module")
def dense_dapi(shared_data: Path) -> np.ndarray:
    return tifffile.imread(dataset(shared_data, "dense-cells") / f"{DENSE_STEM}_dapi.tif")


@pytest.fixture(scope="module")
def dense_labels(shared_data: Path) -> np.ndarray:
    return tifffile.imread(dataset(shared_data, "dense-cells") / f"{DENSE_STEM}_lab.tif")


def test_tile_starts_cover_and_overlap() -> None:
    assert tile_starts(100, 128, 16) == [0]
    starts = tile_starts(1159, 256, 50)
    assert starts[0] == 0 and starts[-1] == 1159 - 256
    assert all(b - a <= 256 - 50 for a, b in itertools.pairwise(starts))
    with pytest.raises(InputDataError, match="overlap"):
        tile_starts(1000, 64, 64)


def test_predict_tiled_is_seamless_for_a_local_filter(dense_dapi: np.ndarray) -> None:
    """A 3x3 filter run per tile equals the whole-image filter away from the field border:
    blending must not leave seams or rescale values."""
    image = dense_dapi.astype(np.float32) / 255

    def box(batch: np.ndarray) -> np.ndarray:
        out = np.empty_like(batch)
        for i, tile in enumerate(batch):
            out[i, 0] = filters.rank.mean((tile[0] * 255).astype(np.uint8), np.ones((3, 3))) / 255
        return out

    whole = box(image[None, None])[0, 0]
    tiled = predict_tiled(box, image, tile=256, overlap=32, batch_size=3)
    assert tiled.shape == (1, *image.shape) and tiled.dtype == np.float32
    inner = np.s_[2:-2, 2:-2]
    assert np.abs(tiled[0][inner] - whole[inner]).max() < 0.02


def test_predict_tiled_pads_small_images_and_checks_fn() -> None:
    image = np.random.default_rng(0).random((2, 50, 70)).astype(np.float32)
    out = predict_tiled(lambda b: b[:, :1] * 2, image, tile=64, overlap=8)
    np.testing.assert_allclose(out[0], image[0] * 2, rtol=1e-6)
    with pytest.raises(HcssegError, match="expected"):
        predict_tiled(lambda b: b[:, 0], image, tile=64, overlap=8)


def test_segment_tiled_reproduces_connected_components(dense_labels: np.ndarray) -> None:
    """A purely local segmenter (connected components of separated true cells) must give the
    same partition tiled as whole, with unique consecutive ids."""
    separated = (dense_labels > 0) & ~segmentation.find_boundaries(dense_labels)
    whole = measure.label(separated, connectivity=1)
    tiled = segment_tiled(
        lambda t: measure.label(t, connectivity=1), separated, tile=256, overlap=64
    )
    assert tiled.dtype == np.uint32
    ids = np.unique(tiled)[1:]
    np.testing.assert_array_equal(ids, np.arange(1, ids.size + 1))
    assert ids.size == whole.max()
    assert _ap50(tiled, whole) == 1.0
    # naive tiling without ownership (every tile keeps everything it sees) would duplicate
    # or cut the objects on tile borders; check that this test would notice
    cut = np.zeros_like(whole)
    for y in range(0, whole.shape[0], 256):
        for x in range(0, whole.shape[1], 256):
            sub = measure.label(separated[y : y + 256, x : x + 256], connectivity=1)
            cut[y : y + 256, x : x + 256] = np.where(sub > 0, sub + cut.max(), 0)
    assert _ap50(cut, whole) < 0.99


@pytest.mark.parametrize(("tile", "overlap"), [(1024, 50), (512, 64)])
def test_classical_whole_vs_tiled(dense_dapi: np.ndarray, tile: int, overlap: int) -> None:
    """The classical baseline on a real 1040x1159 DAPI field, whole vs tiled: AP@0.5 >= 0.99.

    The threshold is taken once on the whole field (tiles see a binarised image): per-tile
    Otsu thresholds differ from the field's, and that drift is not what this test is about."""
    smooth = filters.gaussian(dense_dapi.astype(float), 1.0)
    binary = (smooth > filters.threshold_otsu(smooth)).astype(np.float32)

    def seg(a: np.ndarray) -> np.ndarray:
        return segment_nuclei(a, pixel_size_um=0.5)

    whole = seg(binary)
    tiled = segment_tiled(seg, binary, tile=tile, overlap=overlap)
    assert whole.max() > 500
    assert _ap50(tiled, whole) >= 0.99
    assert tiled.max() == np.unique(tiled).size - 1


def test_classical_large_nuclei_with_per_tile_thresholds(shared_data: Path) -> None:
    """Largest nuclei-dsb2018 field (1040x1388, ~95 px nuclei) segmented by the unmodified
    baseline per tile, with an overlap wider than the nuclei."""
    root = dataset(shared_data, "nuclei-dsb2018")
    files = sorted(root.glob("*_img.tif"))
    image = max((tifffile.imread(f) for f in files), key=lambda a: a.size)
    assert image.shape == (1040, 1388)

    def seg(a: np.ndarray) -> np.ndarray:
        return segment_nuclei(a, pixel_size_um=0.25)

    whole = seg(image)
    assert whole.max() >= 10
    assert _ap50(segment_tiled(seg, image, tile=512, overlap=128), whole) >= 0.99


def test_segment_tiled_errors() -> None:
    image = np.zeros((300, 300), dtype=np.float32)
    with pytest.raises(HcssegError, match="segment_fn returned"):
        segment_tiled(lambda t: np.zeros((3, 3), np.int32), image, tile=128, overlap=16)
    with pytest.raises(HcssegError, match="segment_fn returned"):
        segment_tiled(lambda t: t, image, tile=128, overlap=16)
    with pytest.raises(InputDataError, match="overlap"):
        segment_tiled(lambda t: t.astype(int), image, tile=128, overlap=128)
    empty = segment_tiled(lambda t: np.zeros(t.shape, np.int32), image, tile=128, overlap=16)
    assert empty.dtype == np.uint32 and not empty.any()
