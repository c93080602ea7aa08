from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import tifffile
import torch

from hcsseg.errors import InputDataError, ModelError
from hcsseg.learning import devices, loop, networks
from hcsseg.learning.data import validate_labels
from hcsseg.learning.networks import transfer_weights
from hcsseg.learning.options import TrainOptions
from hcsseg.segment import distance_unet
from hcsseg.segment.distance_unet import (
    DistanceUNetOptions,
    normalized_distance,
    segment_distance_unet,
    train_distance_unet,
)
from hcsseg.segment.fpn2ws import FPN2WSOptions, border_map, segment_fpn2ws, train_fpn2ws
from hcsseg.virtual_stain.model import build_network
from hcsseg.virtual_stain.options import VirtualStainOptions
from tests.conftest import dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL_DECODER = (64, 32, 16, 16, 8)


@pytest.fixture(scope="module")
def dsb_pairs(shared_data: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Four 256x256 nuclei-dsb2018 fields with many nuclei (first by sorted name)."""
    root = dataset(shared_data, "nuclei-dsb2018")
    pairs = []
    for f in sorted(root.glob("*_img.tif")):
        image = tifffile.imread(f)
        labels = tifffile.imread(f.with_name(f.name.replace("_img", "_lab")))
        if image.shape == (256, 256) and len(np.unique(labels)) > 20:
            pairs.append((image, labels))
        if len(pairs) == 4:
            break
    assert len(pairs) == 4
    return pairs


def _fast_train(n_steps: int = 40) -> TrainOptions:
    return TrainOptions(n_steps=n_steps, batch_size=4, crop_size=128, warmup_steps=5, seed=1)


def _falls(losses: list[float], k: int = 8) -> bool:
    return float(np.mean(losses[-k:])) < 0.8 * float(np.mean(losses[:k]))


def _consecutive(labels: np.ndarray) -> bool:
    ids = np.unique(labels)[1:]
    return bool(np.array_equal(ids, np.arange(1, ids.size + 1)))


# ---------------------------------------------------------------------------- labels


def test_validate_labels_accepts_integer_floats_and_relabels() -> None:
    lab = np.zeros((6, 6), dtype=np.float32)
    lab[:2, :2], lab[4:, 4:] = 7, 3
    out = validate_labels(lab)
    assert out.dtype == np.uint32 and set(np.unique(out)) == {0, 1, 2}


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.full((4, 4), 0.5), "non-integer"),
        (np.full((4, 4), np.nan), "NaN"),
        (-np.ones((4, 4), dtype=int), "negative"),
        (np.zeros((2, 2, 2, 2), dtype=int), "non-empty"),
        (np.array([["a"]]), "dtype"),
    ],
)
def test_validate_labels_rejects(labels: np.ndarray, match: str) -> None:
    with pytest.raises(InputDataError, match=match):
        validate_labels(labels)


def test_validate_labels_stack() -> None:
    stack = np.zeros((3, 8, 8), dtype=np.uint8)
    stack[0, :3, :3] = 1
    stack[1, 5:, 5:] = 1
    stack[2, :3, 5:] = 4
    flat = validate_labels(stack)
    assert flat.max() == 3 and _consecutive(flat)
    stack[2, 2, 2] = 4  # now overlaps plane 0
    with pytest.raises(InputDataError, match="more than one plane"):
        validate_labels(stack)
    with pytest.raises(InputDataError, match="shape"):
        validate_labels(stack[:2], shape=(9, 9))


def test_targets_on_real_labels(dsb_pairs: list) -> None:
    labels = dsb_pairs[0][1]
    dist = normalized_distance(labels)
    fg = labels > 0
    assert dist[~fg].max() == 0 and dist[fg].min() > 0 and dist.max() == pytest.approx(1.0)
    # every object peaks at exactly 1
    peaks = [dist[labels == i].max() for i in np.unique(labels)[1:]]
    np.testing.assert_allclose(peaks, 1.0)
    border = border_map(labels, 1.0)
    assert border.min() >= 0 and border.max() <= 1
    assert border[fg].mean() > border[~fg].mean()


# ---------------------------------------------------------------------------- training


def test_distance_unet_trains_and_segments(dsb_pairs: list) -> None:
    images = [p[0] for p in dsb_pairs]
    labels = [p[1] for p in dsb_pairs]
    opts = DistanceUNetOptions(decoder_channels=SMALL_DECODER, train=_fast_train(60), tile=256)
    state, hist = train_distance_unet(images[:3], labels[:3], options=opts)
    assert _falls(hist["loss"]), hist["loss"]
    assert hist["steps"] == 60 and hist["in_channels"] == 1
    assert all(t.device.type == "cpu" for t in state.values())
    pred = segment_distance_unet(state, images[3], options=opts)
    assert pred.dtype == np.uint32 and pred.shape == images[3].shape
    assert pred.max() > 0 and _consecutive(pred)
    with pytest.raises(InputDataError, match="channel"):
        segment_distance_unet(state, np.stack([images[3]] * 2), options=opts)


def test_distance_unet_early_stopping(dsb_pairs: list) -> None:
    images = [p[0] for p in dsb_pairs]
    labels = [p[1] for p in dsb_pairs]
    train = _fast_train(30).model_copy(
        update={"val_fraction": 0.25, "val_every": 5, "patience": 1, "val_crops": 2}
    )
    opts = DistanceUNetOptions(decoder_channels=SMALL_DECODER, train=train)
    _, hist = train_distance_unet(images, labels, options=opts)
    assert hist["val_step"] and hist["steps"] <= 30
    assert hist["best_val_loss"] == min(hist["val_loss"])
    assert hist["kept_step"] in (hist["steps"], hist["val_step"][int(np.argmin(hist["val_loss"]))])


class _LineSampler:
    """y = slope * x crops for a 1-parameter model; `fixed` gives the validation batches."""

    def __init__(self, slope: float, seed: int) -> None:
        self.slope, self.gen = slope, torch.Generator().manual_seed(seed)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, 1, generator=self.gen)
        return x, self.slope * x

    def fixed(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [self.sample(4) for _ in range(n)]


@pytest.mark.parametrize(("val_slope", "kept"), [(2.0, "last"), (-2.0, "first check")])
def test_fit_keeps_last_weights_unless_an_earlier_check_was_clearly_better(
    val_slope: float, kept: str
) -> None:
    """Training towards y = 2x: validation on the same line keeps the last weights; on
    y = -2x every step makes validation worse, so the first check's weights come back."""
    torch.manual_seed(0)
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    opts = TrainOptions(
        n_steps=40, learning_rate=0.1, warmup_steps=0, val_every=10, patience=10, val_crops=8
    )
    sampler, val = _LineSampler(2.0, 1), _LineSampler(val_slope, 2)
    loss = torch.nn.functional.mse_loss
    hist = loop.fit(model, loss, sampler, opts, val_sampler=val)  # type: ignore[arg-type]
    assert hist["steps"] == 40 and hist["val_step"] == [10, 20, 30, 40]
    weight = float(model.weight.item())
    if kept == "last":
        assert hist["kept_step"] == 40 and weight > 1.0
    else:
        assert hist["kept_step"] == 10 and 0.0 < weight < 1.0
        assert hist["best_val_loss"] == hist["val_loss"][0] < hist["val_loss"][-1]


def test_clearly_lower_needs_a_lead_above_one_standard_error() -> None:
    last = np.array([1.0, 1.2, 0.8, 1.1])
    assert loop.clearly_lower(last - 0.2, last)
    assert not loop.clearly_lower(last + np.array([-0.3, 0.3, -0.3, 0.25]), last)
    assert not loop.clearly_lower(last, last)


def test_fpn2ws_trains_and_segments(dsb_pairs: list) -> None:
    images = [p[0] for p in dsb_pairs]
    labels = [p[1] for p in dsb_pairs]
    train = _fast_train(30).model_copy(update={"crop_size": 96})
    opts = FPN2WSOptions(train=train, tile=256)
    state, hist = train_fpn2ws(images[:3], labels[:3], options=opts)
    assert _falls(hist["loss"]), hist["loss"]
    assert {k.split(".")[0] for k in state} == {"distance", "border"}
    pred = segment_fpn2ws(state, images[3], options=opts)
    assert pred.dtype == np.uint32 and pred.shape == images[3].shape and _consecutive(pred)
    with pytest.raises(ModelError, match="not an smp model"):
        segment_distance_unet(state, images[3], options=DistanceUNetOptions())


def test_training_input_errors(dsb_pairs: list) -> None:
    image, labels = dsb_pairs[0]
    opts = DistanceUNetOptions(decoder_channels=SMALL_DECODER, train=_fast_train(1))
    with pytest.raises(InputDataError, match="2 label images"):
        train_distance_unet([image], [labels, labels], options=opts)
    with pytest.raises(InputDataError, match="shape"):
        train_distance_unet([image], [labels[:100]], options=opts)
    with pytest.raises(InputDataError, match="no objects"):
        train_distance_unet([image], [np.zeros_like(labels)], options=opts)
    with pytest.raises(InputDataError, match="NaN"):
        train_distance_unet([np.full((64, 64), np.nan)], [labels[:64, :64]], options=opts)


# ---------------------------------------------------------------------------- initialisation


def _vs_unet(encoder: str = "resnet18", in_channels: int = 1) -> torch.nn.Module:
    """Stand-in for a plate's virtual-staining U-Net: same smp U-Net, one output channel."""
    torch.manual_seed(3)
    return smp.Unet(encoder, encoder_weights=None, in_channels=in_channels, classes=1)


def test_isl_initialisation_copies_encoder_and_decoder(dsb_pairs: list) -> None:
    """A default virtual-staining network (hcsseg.virtual_stain) initialises a default
    distance U-Net: same encoder and decoder, only the output head differs."""
    torch.manual_seed(3)
    vs = build_network(VirtualStainOptions(source_channels=["phase"])).state_dict()
    model = distance_unet.build_model(1, DistanceUNetOptions())
    keys = transfer_weights(model, vs, prefixes=("encoder.", "decoder."), what="vs")
    assert any(k.startswith("decoder.") for k in keys)
    got = model.state_dict()
    for k in keys:
        torch.testing.assert_close(got[k], vs[k])
    assert not torch.equal(got["segmentation_head.0.weight"][:1], vs["segmentation_head.0.weight"])

    images = [p[0] for p in dsb_pairs[:2]]
    labels = [p[1] for p in dsb_pairs[:2]]
    opts = DistanceUNetOptions(isl_transfer="encoder", train=_fast_train(2))
    _, hist = train_distance_unet(images, labels, options=opts, init_state=vs)
    assert hist["init"] == "virtual-staining (encoder)"
    assert hist["transferred_tensors"] == sum(k.startswith("encoder.") for k in vs)


def test_fpn2ws_initialises_from_virtual_staining_encoder(dsb_pairs: list) -> None:
    vs = build_network(VirtualStainOptions(source_channels=["phase"])).state_dict()
    image, labels = dsb_pairs[0]
    opts = FPN2WSOptions(train=_fast_train(1).model_copy(update={"crop_size": 64}))
    state, hist = train_fpn2ws([image], [labels], options=opts, init_state=vs)
    assert hist["init"] == "encoder of init_state"
    _, hist = train_fpn2ws([image], [labels], options=opts, init_state=state)
    assert hist["init"] == "resumed from init_state"
    with pytest.raises(ModelError, match="init_state expects 1 channel"):
        train_fpn2ws([np.stack([image, image])], [labels], options=opts, init_state=state)


@pytest.mark.parametrize(
    ("encoder", "in_channels", "match"),
    [("resnet34", 1, "tensors this model lacks"), ("resnet18", 2, "shape"), ("vgg11", 1, "lacks")],
)
def test_isl_initialisation_mismatch(
    dsb_pairs: list, encoder: str, in_channels: int, match: str
) -> None:
    vs = _vs_unet(encoder, in_channels).state_dict()
    image, labels = dsb_pairs[0]
    opts = DistanceUNetOptions(train=_fast_train(1))
    with pytest.raises(ModelError, match=match):
        train_distance_unet([image], [labels], options=opts, init_state=vs)


def test_imagenet_init_fails_fast_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(networks, "reachable", lambda *a, **k: False)
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="not in the Hugging Face cache"):
        networks.build_smp_model(
            "unet", encoder_name="resnet18", in_channels=1, classes=2, init="imagenet"
        )
    assert time.perf_counter() - t0 < 5
    with pytest.raises(ModelError, match="cannot build unet with encoder 'no-such-encoder'"):
        networks.build_smp_model(
            "unet", encoder_name="no-such-encoder", in_channels=1, classes=2, init="imagenet"
        )


def test_device_selection() -> None:
    assert devices.select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match="CUDA is not available"):
            devices.select_device("cuda")
    with pytest.raises(ModelError, match="unknown torch device"):
        devices.select_device("tpu-ish")


@pytest.mark.parametrize("native", [True, False])
def test_cpu_autocast_only_where_bfloat16_is_native(
    monkeypatch: pytest.MonkeyPatch, native: bool
) -> None:
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: native)
    conv = torch.nn.Conv2d(1, 2, 3)
    x = torch.randn(1, 1, 8, 8)
    with devices.autocast(torch.device("cpu")):
        out = conv(x)
    assert out.dtype == (torch.bfloat16 if native else torch.float32)
    with devices.autocast(torch.device("cpu"), enabled=False):
        assert conv(x).dtype == torch.float32


def test_bfloat16_outputs_match_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """CPU bfloat16 (channels-last) inference is what a user on a recent CPU gets: the maps
    must agree with float32, and the model must come back in its usual memory format."""
    torch.manual_seed(0)
    model = networks.build_smp_model(
        "unet",
        encoder_name="resnet18",
        in_channels=1,
        classes=2,
        decoder_channels=(32, 16, 8, 8, 8),
    )
    image = np.random.default_rng(0).random((1, 96, 96), dtype=np.float32)
    cpu = torch.device("cpu")
    monkeypatch.setattr(devices, "cpu_has_bf16", lambda: True)
    low = networks.predict_dense(model, image, device=cpu, tile=64, overlap=16)
    full = networks.predict_dense(model, image, device=cpu, tile=64, overlap=16, amp=False)
    assert low.shape == full.shape == (2, 96, 96)
    scale = np.abs(full).max()
    assert np.abs(low - full).max() < 0.05 * scale
    assert all(p.is_contiguous() for p in model.parameters())
