from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from skimage.draw import disk

from hcsseg.learning import networks
from hcsseg.learning.data import CropSampler, intensity_augment
from hcsseg.learning.options import TrainOptions
from hcsseg.segment import distance_unet
from hcsseg.segment.distance_unet import (
    DistanceUNetOptions,
    FieldMaps,
    field_factor,
    min_area_px,
    segment_distance_unet,
    train_distance_unet,
    tune_postprocessing,
)
from hcsseg.segment.scale import (
    MAX_FACTOR,
    estimate_diameter,
    median_diameter,
    resize,
    resize_labels,
    resize_labels_on_foreground,
    scale_factor,
)
from tests.conftest import dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def discs(shape: tuple[int, int], diameter: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Bright non-touching discs of one diameter on a noisy background, and their labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    r = diameter / 2
    step = int(diameter * 1.6)
    k = 0
    for cy in range(step // 2, shape[0] - step // 2, step):
        for cx in range(step // 2, shape[1] - step // 2, step):
            jy, jx = rng.integers(-step // 8, step // 8 + 1, 2)
            k += 1
            labels[disk((cy + jy, cx + jx), r, shape=shape)] = k
    image = (labels > 0) * 200.0 + rng.normal(20, 5, shape)
    return image.astype(np.float32), labels


@pytest.mark.parametrize("diameter", [8, 16, 30, 50])
def test_estimate_diameter_of_discs(diameter: int) -> None:
    image, labels = discs((400, 400), diameter)
    est = estimate_diameter(image)
    assert est is not None
    # calibrated to real (elliptic) nuclei, so perfect discs read up to ~20 % large
    assert abs(est / median_diameter(labels) - 1) < 0.3


def test_estimate_diameter_of_empty_field_is_none() -> None:
    assert estimate_diameter(np.zeros((64, 64))) is None
    assert scale_factor(None, 24) == 1.0
    assert scale_factor(1.0, 24) == MAX_FACTOR  # a failed estimate cannot blow a field up 24x


def test_estimate_diameter_on_real_nuclei(shared_data: Path) -> None:
    """On real DSB fields the estimate is within 35 % of the true median diameter."""
    root = dataset(shared_data, "nuclei-dsb2018")
    ratios = []
    for f in sorted(root.glob("*_img.tif"))[:12]:
        lab = tifffile.imread(f.with_name(f.name.replace("_img", "_lab")))
        est = estimate_diameter(tifffile.imread(f))
        assert est is not None, f.name
        ratios.append(est / median_diameter(lab))
    assert 0.8 < np.median(ratios) < 1.25
    assert np.mean(np.abs(np.log(ratios)) < np.log(1.35)) >= 0.8


def test_resize_labels_keeps_ids_and_resize_keeps_channels() -> None:
    _, labels = discs((100, 120), 20)
    big = resize_labels(labels, (200, 240))
    assert big.dtype == labels.dtype and set(np.unique(big)) == set(np.unique(labels))
    assert np.array_equal(resize_labels(big, (100, 120)), labels)
    img = np.random.default_rng(0).random((2, 50, 60)).astype(np.float32)
    assert resize(img, (25, 30)).shape == (2, 25, 30)
    assert resize(img[0], (100, 120)).shape == (100, 120)


def _soft_discs(
    shape: tuple[int, int], centres: list[tuple[float, float]], r: float, scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and a smooth foreground probability of discs (centres and radius in native
    pixels) rendered on a grid `scale` times the native one."""
    ys = (np.arange(shape[0]) + 0.5) / scale
    xs = (np.arange(shape[1]) + 0.5) / scale
    dist = np.stack([np.hypot(ys[:, None] - cy, xs[None] - cx) for cy, cx in centres])
    prob = 1 / (1 + np.exp(-(r - dist.min(0)) * 3))
    labels = np.where(prob > 0.5, dist.argmin(0) + 1, 0).astype(np.int32)
    return labels, prob.astype(np.float32)


@pytest.mark.parametrize(("scale", "radius"), [(2.0, 5.3), (0.5, 9.2)])
def test_labels_back_on_foreground_fit_the_field_better_than_nearest(
    scale: float, radius: float
) -> None:
    """Objects found on a resized grid and brought back keep their ids and fit the field's
    own objects better than nearest-neighbour resizing does (mean IoU, every object)."""
    native = (96, 96)
    centres = [(20.3, 20.7), (20.6, 70.2), (60.1, 35.4), (61.8, 49.9), (75.5, 80.3)]
    truth, _ = _soft_discs(native, centres, radius, 1.0)
    work = (int(native[0] * scale), int(native[1] * scale))
    labels, prob = _soft_discs(work, centres, radius, scale)
    near = resize_labels(labels, native)
    smooth = resize_labels_on_foreground(labels, prob, 0.5, native)
    assert set(np.unique(smooth)) == set(np.unique(truth))

    def mean_iou(pred: np.ndarray) -> float:
        return float(
            np.mean(
                [
                    ((pred == i) & (truth == i)).sum() / ((pred == i) | (truth == i)).sum()
                    for i in range(1, len(centres) + 1)
                ]
            )
        )

    assert mean_iou(smooth) > mean_iou(near) + 0.01
    assert mean_iou(smooth) > 0.93


def test_labels_back_on_foreground_renumber_only_when_an_object_vanishes() -> None:
    labels = np.zeros((40, 40), np.int32)
    labels[4:20, 4:20], labels[22:24, 22:24] = 1, 2
    prob = np.where(labels == 1, 0.9, 0.1).astype(np.float32)  # object 2 is not foreground
    out = resize_labels_on_foreground(labels, prob, 0.5, (80, 80))
    assert set(np.unique(out)) == {0, 1}
    full = np.ones((40, 40), np.int32)
    full[:, 20:] = 2  # no background at all: ids kept as they are
    out = resize_labels_on_foreground(full, np.ones((40, 40), np.float32), 0.5, (20, 20))
    assert set(np.unique(out)) == {1, 2}
    assert resize_labels_on_foreground(full, full * 0.0, 0.5, (40, 40)) is full


def test_sampler_without_zoom_or_augment_draws_as_before() -> None:
    img = np.random.default_rng(1).random((1, 80, 80)).astype(np.float32)
    a = CropSampler([img], [img], 32, np.random.default_rng(5)).sample(4)
    b = CropSampler([img], [img], 32, np.random.default_rng(5), zoom=1.0).sample(4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_zoom_and_augment_change_image_not_target_alignment() -> None:
    """A zoomed crop still pairs each image pixel with its target; augmentation touches only
    the image."""
    img = np.random.default_rng(2).random((1, 200, 200)).astype(np.float32)
    s = CropSampler([img], [img.copy()], 64, np.random.default_rng(3), zoom=1.5)
    x, y = s.sample(6)
    assert x.shape == y.shape == (6, 1, 64, 64)
    assert np.allclose(x.numpy(), y.numpy())
    aug = CropSampler([img], [img.copy()], 64, np.random.default_rng(3), augment=intensity_augment)
    x, y = aug.sample(6)
    assert not np.allclose(x.numpy(), y.numpy())
    assert y.numpy().min() >= 0 and y.numpy().max() <= 1


def test_scale_normalised_model_segments_objects_of_unseen_size() -> None:
    """Trained on 12 px discs only, the model is run on 28 px discs resized to its canonical
    diameter: the factors come from the labels in training and from the image in inference."""
    from hcsseg.evaluate.metrics import instance_metrics

    train = [discs((160, 160), 12, seed=s) for s in range(2)]
    test_img, test_lab = discs((320, 320), 28, seed=9)
    opts = DistanceUNetOptions(
        canonical_diameter=16.0,
        decoder_channels=(32, 16, 16, 8, 8),
        train=TrainOptions(n_steps=50, batch_size=4, crop_size=64, warmup_steps=5, seed=1),
    )
    state, hist = train_distance_unet(
        [im for im, _ in train], [lab for _, lab in train], options=opts
    )
    assert hist["scale_factors"] == pytest.approx([16 / 12] * 2, rel=0.05)
    assert hist["tuned_options"]["prior_factor"] == pytest.approx(16 / 12, rel=0.05)
    opts = opts.model_copy(update=hist["tuned_options"])
    assert field_factor(test_img[None] / 255, opts) == pytest.approx(16 / 28, rel=0.25)
    pred = segment_distance_unet(state, test_img, options=opts)
    assert float(instance_metrics(pred, test_lab).ap[0]) > 0.8


def test_postprocessing_tuning_picks_the_setting_that_fits_held_out_fields() -> None:
    _, lab = discs((128, 128), 20)
    from hcsseg.segment.distance_unet import normalized_distance

    dist = normalized_distance(lab)
    fg = (lab > 0).astype(np.float32) * 0.35  # a timid foreground: 0.4 would find nothing
    picked = tune_postprocessing([FieldMaps(dist, fg, lab.shape)], [lab], DistanceUNetOptions())
    assert picked["foreground_threshold"] < 0.35
    assert picked["validation_score"] > 0.9


def _maps(fg_objects: float, fg_specks: float) -> tuple[FieldMaps, np.ndarray]:
    """Discs the network saw with probability `fg_objects`, and below them (no truth) two
    specks it half believed in (`fg_specks`)."""
    from hcsseg.segment.distance_unet import normalized_distance

    _, top = discs((128, 128), 20)
    lab = np.zeros((176, 128), np.int32)
    lab[:128] = top
    specks = np.zeros_like(lab)
    specks[disk((152, 32), 12, shape=lab.shape)] = 1
    specks[disk((152, 96), 12, shape=lab.shape)] = 2
    dist = normalized_distance(lab) + normalized_distance(specks)
    fg = (lab > 0) * fg_objects + (specks > 0) * fg_specks
    return FieldMaps(dist, fg.astype(np.float32), lab.shape), lab


def test_postprocessing_tuning_moves_only_on_a_consistent_lead() -> None:
    opts = DistanceUNetOptions()  # foreground_threshold 0.4
    timid = [_maps(0.35, 0.0) for _ in range(4)]  # every field wants a lower threshold
    picked = tune_postprocessing([m for m, _ in timid], [lab for _, lab in timid], opts)
    assert picked["foreground_threshold"] < 0.35
    # One field wants 0.3, three lose specks-as-objects at 0.3: the lead is noise, keep 0.4.
    mixed = [_maps(0.35, 0.0)] + [_maps(0.45, 0.33) for _ in range(3)]
    picked = tune_postprocessing([m for m, _ in mixed], [lab for _, lab in mixed], opts)
    assert picked["foreground_threshold"] == opts.foreground_threshold
    assert picked["min_area"] == min_area_px(opts) == 95


def test_a_single_held_out_field_is_tuned_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """One field gives no spread to test a lead against: its 3 x 3 blocks do. A lead from
    one corner of the field is noise and keeps the defaults; a lead everywhere moves."""
    from hcsseg.segment.distance_unet import blocks

    parts = blocks((176, 128), 3)
    cover = np.zeros((176, 128), int)
    for block in parts:
        cover[block] += 1
    assert len(parts) == 9 and (cover == 1).all()
    opts = DistanceUNetOptions()
    everywhere, lab = _maps(0.35, 0.0)
    assert tune_postprocessing([everywhere], [lab], opts)["foreground_threshold"] < 0.35
    corner, lab = _maps(0.45, 0.0)
    corner.fg[:40, :40] = np.where(lab[:40, :40] > 0, 0.35, 0.0)  # only here 0.3 is better
    picked = tune_postprocessing([corner], [lab], opts)
    assert picked["foreground_threshold"] == opts.foreground_threshold
    # the field as one unit would have taken the plain best, the corner's lead
    monkeypatch.setattr(distance_unet, "MIN_TUNING_UNITS", 1)
    picked = tune_postprocessing([corner], [lab], opts)
    assert picked["foreground_threshold"] < 0.35


def test_tta_averages_flips() -> None:
    import torch

    model = torch.nn.Conv2d(1, 1, 3, padding=1)
    img = np.random.default_rng(0).random((1, 64, 64)).astype(np.float32)
    plain = networks.predict_dense(model, img, device=torch.device("cpu"), tile=64)
    tta = networks.predict_dense(model, img, device=torch.device("cpu"), tile=64, tta=True)
    assert plain.shape == tta.shape == (1, 64, 64)
    assert not np.allclose(plain, tta)
    flipped = networks.predict_dense(
        model, img[:, :, ::-1].copy(), device=torch.device("cpu"), tile=64, tta=True
    )
    assert np.allclose(tta[:, :, ::-1], flipped, atol=1e-5)


def test_scale_search_escapes_a_field_the_network_shatters(monkeypatch: pytest.MonkeyPatch) -> None:
    """A texture fools the first estimate into a 4x enlargement; a network shown objects
    larger than it learnt returns fragments, which measure small and would call for an even
    larger scale. The smaller looks find the scale where objects come out canonical."""
    import torch

    from hcsseg.evaluate.metrics import instance_metrics
    from hcsseg.segment import distance_unet
    from hcsseg.segment.distance_unet import normalized_distance
    from hcsseg.segment.scale import scaled_shape

    image, truth = discs((192, 192), 24, seed=3)
    opts = DistanceUNetOptions(tta=False)  # canonical 24 px: the right factor is 1

    def network(
        model: object, norm: np.ndarray, factor: float, options: DistanceUNetOptions
    ) -> tuple[np.ndarray, np.ndarray]:
        assert options.canonical_diameter is not None
        lab = resize_labels(truth, scaled_shape(norm.shape, factor))
        if median_diameter(lab) > 1.3 * options.canonical_diameter:
            frag = np.zeros_like(lab)
            k = 0
            for y in range(4, lab.shape[0], 12):
                for x in range(4, lab.shape[1], 12):
                    if lab[y, x]:
                        k += 1
                        frag[disk((y, x), 4, shape=lab.shape)] = k
            lab = frag
        return normalized_distance(lab), (lab > 0).astype(np.float32)

    monkeypatch.setattr(distance_unet, "_predict_at", network)
    monkeypatch.setattr(distance_unet, "field_factor", lambda norm, options: 4.0)
    model = torch.nn.ModuleDict({"encoder": torch.nn.Conv2d(1, 2, 3)})  # only its channels
    pred = segment_distance_unet(model, image, options=opts)
    res = instance_metrics(pred, truth)
    assert float(res.ap[0]) > 0.9 and res.n_pred == int(truth.max())
