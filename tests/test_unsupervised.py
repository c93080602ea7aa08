from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
import torch
from scipy import ndimage as ndi

from hcsseg.errors import InputDataError, ModelError
from hcsseg.segment.unsupervised import (
    UnsupervisedOptions,
    _flip,
    as_markers,
    foreground_mask,
    segment_unsupervised,
    train_unsupervised,
    unsupervised_loss,
)
from tests.conftest import dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


STEM = "M872956_JML_Position8_CD3"


@pytest.fixture(scope="module")
def dense_crop(shared_data: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 256x256 crop of a dense-cells field: (surface stain, DAPI) image, true cells, and
    one marker per true cell (its centroid)."""
    root = dataset(shared_data, "dense-cells")
    sl = np.s_[300:556, 300:556]
    img = tifffile.imread(root / f"{STEM}_img.tif")[sl]
    dapi = tifffile.imread(root / f"{STEM}_dapi.tif")[sl]
    cells = tifffile.imread(root / f"{STEM}_lab.tif")[sl]
    ids = np.unique(cells)[1:]
    markers = np.array(ndi.center_of_mass(cells > 0, cells, ids))
    return np.stack([img, dapi]), cells, markers


def _brute_force_loss(
    y: np.ndarray, origins: np.ndarray, side: int, mask: np.ndarray, lam: float, beta: float
) -> float:
    """The loss written as the double sum over patch pairs, in canvas coordinates."""
    n, p, _ = y.shape
    canvas = np.zeros((n, side, side))
    for i, (r, c) in enumerate(origins):
        canvas[i, r : r + p, c : c + p] = y[i]
    total = -y.sum() + beta * (y * (1 - mask)).sum()
    for i in range(n):
        for j in range(n):
            if i != j:
                total -= lam * (canvas[i] * np.log(1 - canvas[j])).sum()
    return total / y.size


def test_loss_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    n, p, side = 5, 8, 20
    logits = torch.from_numpy(rng.normal(0, 2, (n, p, p)))
    origins = rng.integers(0, side - p, (n, 2))
    r = np.arange(p)
    index = (origins[:, 0, None, None] + r[None, :, None]) * side + (
        origins[:, 1, None, None] + r[None, None, :]
    )
    mask = (rng.random((n, p, p)) > 0.3).astype(np.float64)
    opts = UnsupervisedOptions(overlap_weight=3.32, background_weight=15)
    loss, parts = unsupervised_loss(
        logits, torch.from_numpy(index), side * side, torch.from_numpy(mask), opts
    )
    y = torch.sigmoid(logits).numpy()
    expected = _brute_force_loss(y, origins, side, mask, 3.32, 15)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert parts["overlap"] > 0 and parts["area"] < 0


def test_flip_is_an_involution() -> None:
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2 * 3, 1, 4, 4)[:4]
    code = torch.tensor([0, 1, 2, 3])
    assert torch.equal(_flip(_flip(x, code), code), x)
    assert torch.equal(_flip(x, code)[3], x[3].flip(-1).flip(-2))


def test_markers_input_forms() -> None:
    table = pd.DataFrame({"y": [1.2, 5.7], "x": [3.0, 0.4], "area": [10, 12]})
    np.testing.assert_array_equal(as_markers(table, (8, 8)), [[1, 3], [6, 0]])
    assert as_markers(np.empty((0, 2)), (8, 8)).shape == (0, 2)
    assert as_markers([], (8, 8)).shape == (0, 2)
    with pytest.raises(InputDataError, match="outside the image"):
        as_markers([[8, 1]], (8, 8))
    with pytest.raises(InputDataError, match="lacks column"):
        as_markers(pd.DataFrame({"row": [1]}), (8, 8))
    with pytest.raises(InputDataError, match="NaN"):
        as_markers([[np.nan, 1]], (8, 8))


def test_trains_and_grows_cells_from_markers(dense_crop: tuple) -> None:
    image, cells, markers = dense_crop
    mask = foreground_mask(image[0], sigma=2) | foreground_mask(image[1], sigma=2)
    opts = UnsupervisedOptions(
        patch_size=32,
        position_sigma=8,
        area_size=128,
        base_channels=8,
        depth=2,
        warmup_steps=40,
        n_steps=40,
        learning_rate=3e-3,
        test_time_flips=False,
    )
    state, hist = train_unsupervised([image], [markers], [mask], options=opts)
    assert len(hist["warmup_loss"]) == 40 and len(hist["loss"]) == 40
    assert np.mean(hist["warmup_loss"][-5:]) < 0.7 * np.mean(hist["warmup_loss"][:5])
    assert np.mean(hist["loss"][-5:]) < np.mean(hist["loss"][:5])
    labels = segment_unsupervised(state, image, markers, options=opts)
    assert labels.dtype == np.uint32 and labels.shape == cells.shape
    ids = np.unique(labels)[1:]
    assert ids.size > 0.5 * len(markers) and ids.max() <= len(markers)
    # cell i + 1 grows from marker i: most markers lie in their own cell
    pos = np.rint(markers).astype(int)
    own = labels[pos[:, 0], pos[:, 1]] == np.arange(1, len(pos) + 1)
    assert own.mean() > 0.5


def test_no_markers(dense_crop: tuple) -> None:
    image, _, markers = dense_crop
    opts = UnsupervisedOptions(patch_size=16, base_channels=4, depth=1, n_steps=1, warmup_steps=0)
    with pytest.raises(InputDataError, match="none of the training images has nucleus markers"):
        train_unsupervised([image], [np.empty((0, 2))], options=opts)
    with pytest.raises(InputDataError, match="one of each per field"):
        train_unsupervised([image, image], [markers], options=opts)
    state, _ = train_unsupervised([image, image], [np.empty((0, 2)), markers], options=opts)
    with pytest.raises(InputDataError, match="no nucleus markers in this field"):
        segment_unsupervised(state, image, np.empty((0, 2)), options=opts)
    empty = segment_unsupervised(state, image, np.empty((0, 2)), options=opts, allow_empty=True)
    assert empty.dtype == np.uint32 and empty.shape == image.shape[1:] and not empty.any()
    with pytest.raises(InputDataError, match="channel"):
        segment_unsupervised(state, image[0], markers, options=opts)
    with pytest.raises(ModelError, match="base_channels"):
        segment_unsupervised(state, image, markers, options=opts.model_copy(update={"depth": 2}))


def test_thousands_of_markers_on_a_whole_field(shared_data: Path) -> None:
    """Inference scales linearly: every true cell of a 1040x1159 field as a marker."""
    root = dataset(shared_data, "dense-cells")
    img = tifffile.imread(root / f"{STEM}_img.tif")
    cells = tifffile.imread(root / f"{STEM}_lab.tif")
    markers = np.array(ndi.center_of_mass(cells > 0, cells, np.unique(cells)[1:]))
    assert len(markers) > 1000
    opts = UnsupervisedOptions(
        patch_size=32, base_channels=4, depth=2, n_steps=1, warmup_steps=3, test_time_flips=False
    )
    state, _ = train_unsupervised([img], [markers], options=opts)
    labels = segment_unsupervised(state, img, markers, options=opts)
    assert labels.shape == img.shape and labels.max() <= len(markers)
