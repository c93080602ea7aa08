from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage as ndi

from hcsseg.errors import InputDataError
from hcsseg.learning.options import TrainOptions
from hcsseg.segment.distance_unet import (
    DistanceUNetOptions,
    _loss,
    train_distance_unet,
)
from hcsseg.segment.pseudo_labels import confident_objects
from tests.conftest import dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _discs(radii: list[int], side: int = 200) -> np.ndarray:
    lab = np.zeros((side, side), np.uint32)
    yy, xx = np.mgrid[:side, :side]
    for i, r in enumerate(radii, start=1):
        cy, cx = 30 + 45 * ((i - 1) // 4), 30 + 45 * ((i - 1) % 4)
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return lab


def test_confident_objects_leaves_fragments_and_merges_out_of_the_loss() -> None:
    # eight ordinary cells, one fragment (r 3) and one merge-sized blob (r 20)
    lab = _discs([10, 10, 10, 11, 9, 10, 10, 10, 3, 20])
    kept, weight = confident_objects(lab)
    assert int(kept.max()) == 8 and set(np.unique(kept)) == set(range(9))
    assert weight.dtype == np.float32 and weight.shape == lab.shape
    for doubtful in (9, 10):
        inside = lab == doubtful
        assert (kept[inside] == 0).all() and (weight[inside] == 0).all()
    # kept cells and the background away from doubtful objects still count
    assert (weight[lab == 1] == 1).all() and weight[0, 0] == 1
    # the margin: a ring around a doubtful object is left out too, nothing beyond it
    ring = ndi.binary_dilation(lab == 10, iterations=2) & (lab == 0)
    assert (weight[ring] == 0).all()
    assert weight[ndi.binary_dilation(lab == 10, iterations=4) & ~ring & (lab == 0)].min() == 1


def test_confident_objects_of_nothing() -> None:
    kept, weight = confident_objects(np.zeros((8, 8), np.uint16))
    assert kept.max() == 0 and (weight == 1).all()


def test_loss_ignores_zero_weight_pixels_and_defaults_to_the_plain_loss() -> None:
    torch.manual_seed(0)
    out = torch.randn(2, 2, 16, 16, requires_grad=True)
    target = torch.rand(2, 2, 16, 16)
    target[:, 1] = (target[:, 1] > 0.5).float()
    plain = _loss(DistanceUNetOptions())(out, target).detach()
    ref = torch.nn.functional.mse_loss(torch.sigmoid(out[:, 0]), target[:, 0])
    ref = ref + torch.nn.functional.binary_cross_entropy_with_logits(out[:, 1], target[:, 1])
    assert float(plain) == pytest.approx(float(ref.detach()), rel=1e-5)
    weight = torch.ones(2, 1, 16, 16)
    weight[:, :, :8] = 0
    value = _loss(DistanceUNetOptions())(out, torch.cat([target, weight], 1))
    (grad,) = torch.autograd.grad(value, out)
    assert float(grad[:, :, :8].abs().max()) == 0 and float(grad[:, :, 8:].abs().max()) > 0
    # the kept half is scored as the plain loss of that half alone
    half = _loss(DistanceUNetOptions())(out[:, :, 8:], target[:, :, 8:])
    assert float(value.detach()) == pytest.approx(float(half.detach()), rel=1e-5)


def test_training_with_weights_learns_and_checks_them(shared_data: Path) -> None:
    root = dataset(shared_data, "nuclei-dsb2018")
    f = sorted(root.glob("*_img.tif"))[0]
    image = tifffile.imread(f)
    labels = tifffile.imread(f.with_name(f.name.replace("_img", "_lab")))
    kept, weight = confident_objects(labels)
    opts = DistanceUNetOptions(
        decoder_channels=(64, 32, 16, 16, 8),
        train=TrainOptions(n_steps=30, batch_size=4, crop_size=128, warmup_steps=5, seed=1),
        tune_postprocessing=False,
    )
    _, hist = train_distance_unet([image], [kept], options=opts, weights=[weight])
    assert np.mean(hist["loss"][-5:]) < 0.8 * np.mean(hist["loss"][:5])
    with pytest.raises(InputDataError, match="weight map 0 has shape"):
        train_distance_unet([image], [kept], options=opts, weights=[weight[:10]])
    with pytest.raises(InputDataError, match="1 label images but 2 weight maps"):
        train_distance_unet([image], [kept], options=opts, weights=[weight, weight])
