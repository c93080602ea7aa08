"""Virtual staining on real phase/DAPI data: training learns, outputs land in the plate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from flows.process_plate import process_plate
from hcsseg.config import ProcessConfig
from hcsseg.errors import ChannelNotFoundError, InputDataError, ModelError
from hcsseg.export.tables import read_table
from hcsseg.io.plate import open_plate
from hcsseg.io.plate_writer import ChannelSpec, append_channel
from hcsseg.io.tiff_import import plate_from_arrays
from hcsseg.learning.options import TrainOptions
from hcsseg.virtual_stain.model import (
    build_network,
    network_from_state,
    plate_target_range,
    predict_virtual_stain,
    train_virtual_stain,
)
from hcsseg.virtual_stain.options import VirtualStainOptions, card_target_range
from hcsseg.virtual_stain.plate import VirtualStainConfig, plan_virtual_stain
from tests.conftest import dataset

PHASE = ["PHASE_z02", "PHASE_z06", "PHASE_z10"]


@pytest.fixture(scope="module")
def isl(shared_data):
    src = dataset(shared_data, "isl-phase-dapi")
    names = json.loads((src / "channels.json").read_text())["channels"]
    data = tifffile.imread(src / "field_A4.tif")
    return data[[names.index(c) for c in PHASE]], data[names.index("DAPI")]


def tiny(steps: int = 40) -> VirtualStainOptions:
    torch.set_num_threads(1)
    return VirtualStainOptions(
        source_channels=PHASE,
        target_channel="DAPI",
        decoder_channels=[32, 16, 8, 8, 8],
        training=TrainOptions(
            n_steps=steps,
            batch_size=4,
            crop_size=64,
            learning_rate=3e-3,
            warmup_steps=5,
            val_fraction=0.25,
            val_every=10,
            patience=10,
            val_crops=4,
        ),
        tile=256,
        overlap=32,
    )


@pytest.fixture(scope="module")
def trained(isl):
    """40 steps on four 256² pseudo-fields of the left half; shared by the tests below."""
    phase, dapi = isl
    fields = [
        (phase[:, y : y + 256, x : x + 256], dapi[y : y + 256, x : x + 256])
        for y in (0, 256)
        for x in (0, 256)
    ]
    return train_virtual_stain(
        [f[0] for f in fields], [f[1] for f in fields], ["a", "b", "c", "d"], options=tiny()
    )


def test_training_loss_falls(trained):
    loss = trained.history["loss"]
    assert np.mean(loss[-8:]) < 0.8 * np.mean(loss[:4])
    assert len(trained.val_keys) == 1
    assert set(trained.train_keys) | set(trained.val_keys) == set("abcd")
    card = trained.card()
    assert card["source_channels"] == PHASE and card["validation_fields"] == trained.val_keys
    assert card_target_range(card) == trained.target_range
    # The card is enough to rebuild the network: same weights, same prediction.
    rebuilt = network_from_state(trained.network.state_dict(), card)
    x = torch.from_numpy(np.random.default_rng(0).random((1, 3, 64, 64), np.float32))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), trained.network.eval()(x))


def test_plate_scale_keeps_sparse_fields_dark(isl):
    """The bottom-left quarter of the ISL field has almost no nucleus: its own percentiles
    would stretch background noise over the whole 0-1 range; the plate-wide range keeps it
    dark and maps the nuclei of the populated quarters near 1."""
    _, dapi = isl
    fields = [dapi[y : y + 256, x : x + 256] for y in (0, 256) for x in (512, 0)]
    lo, hi = plate_target_range(fields, list("abcd"), 1.0, 99.8)
    sparse = fields[3]
    own_lo, own_hi = np.percentile(sparse, (1.0, 99.8))
    assert np.mean((sparse - own_lo) / (own_hi - own_lo)) > 0.1  # stretched noise
    assert np.mean((sparse - lo) / (hi - lo)) < 0.02
    populated = (fields[0] - lo) / (hi - lo)
    assert 0.8 < np.percentile(populated, 99.9) <= 1.05
    with pytest.raises(InputDataError, match="no contrast"):
        plate_target_range([np.full((32, 32), 7.0)] * 2, ["a", "b"], 1.0, 99.8)


def test_foreground_crops_find_a_sparse_nucleus():
    """One nucleus in a 300² field: uniform crops rarely hold it, weighted crops do, and
    with no foreground share the sampler draws exactly what it always drew."""
    from hcsseg.learning.data import CropSampler

    target = np.zeros((1, 300, 300), np.float32)
    target[0, 200:210, 40:50] = 1.0
    image = np.random.default_rng(0).random((2, 300, 300), np.float32)

    def share_with_nucleus(foreground: float) -> float:
        sampler = CropSampler([image], [target], 64, np.random.default_rng(0), foreground)
        _, y = sampler.sample(200)
        return float((y.amax(dim=(1, 2, 3)) > 0).float().mean())

    assert share_with_nucleus(0.0) < 0.15
    assert share_with_nucleus(1.0) == 1.0
    assert 0.35 < share_with_nucleus(0.5) < 0.65
    plain = CropSampler([image], [target], 64, np.random.default_rng(3)).sample(4)
    zero = CropSampler([image], [target], 64, np.random.default_rng(3), 0.0).sample(4)
    assert all(torch.equal(a, b) for a, b in zip(plain, zero, strict=True))


def test_tiled_prediction_matches_one_tile_without_seams(trained, isl):
    """Unseen right half of the field: 128² tiles blended over 32 px agree with a single
    512² pass, and the prediction is no steeper across tile edges than the single pass is
    at the same columns (naive tiling with hard cuts is, which this check must notice)."""
    from hcsseg.learning.data import normalize_percentile
    from hcsseg.segment.tiling import tile_starts

    phase, _ = isl
    source = phase[:, :256, 512:1024]
    whole = predict_virtual_stain(trained.network, source, tiny().model_copy(update={"tile": 512}))
    tiled_opts = tiny().model_copy(update={"tile": 128, "overlap": 32})
    tiled = predict_virtual_stain(trained.network, source, tiled_opts)
    assert tiled.shape == whole.shape == (256, 512) and tiled.dtype == np.float32
    spread = np.percentile(whole, 99) - np.percentile(whole, 1)
    diff = np.abs(tiled - whole)
    assert diff.mean() < 0.02 * spread and np.percentile(diff, 99) < 0.1 * spread

    def edge_jump(image: np.ndarray, edges: list[int]) -> float:
        """Mean step between column e-1 and e over the given edge columns."""
        return float(np.abs(np.diff(image, axis=1)).mean(axis=0)[[e - 1 for e in edges]].mean())

    edges = sorted({e for s in tile_starts(512, 128, 32) for e in (s, s + 128)} - {0, 512})
    assert edge_jump(tiled, edges) < 1.25 * edge_jump(whole, edges)
    x = torch.from_numpy(normalize_percentile(source)[None])
    with torch.no_grad():
        net = trained.network.eval()
        naive = torch.cat([net(x[..., s : s + 128]) for s in range(0, 512, 128)], -1)[0, 0]
    assert edge_jump(naive.numpy(), [128, 256, 384]) > 1.5 * edge_jump(whole, [128, 256, 384])


def test_training_is_reproducible_and_refuses_bad_input(isl):
    phase, dapi = isl
    opts = tiny(4).model_copy(
        update={"training": tiny().training.model_copy(update={"n_steps": 4, "batch_size": 2})}
    )
    source, target = phase[:, :192, :256], dapi[:192, :256]
    # One field: split into a training and a validation strip instead of failing.
    runs = [train_virtual_stain([source], [target], ["B/03/0"], options=opts) for _ in range(2)]
    assert runs[0].history["loss"] == runs[1].history["loss"]
    assert runs[0].train_keys == ["B/03/0[train strip]"]
    assert runs[0].val_keys == ["B/03/0[validation strip]"]
    with pytest.raises(InputDataError, match="nothing to learn from"):
        train_virtual_stain([], [], [], options=opts)
    bad = source.astype(np.float32)
    bad[0, 5, 5] = np.nan
    with pytest.raises(InputDataError, match="NaN"):
        train_virtual_stain([bad], [target], ["B/03/0"], options=opts)
    with pytest.raises(InputDataError, match="source channels"):
        train_virtual_stain([source[:2]], [target], ["B/03/0"], options=opts)
    with pytest.raises(InputDataError, match="target 'DAPI' has shape"):
        train_virtual_stain([source], [target[:100]], ["B/03/0"], options=opts)
    # Fine-tuning from a model with other input channels is refused, not half-loaded.
    one_channel = build_network(opts.model_copy(update={"source_channels": ["PHASE_z06"]}))
    with pytest.raises(ModelError, match="does not fit"):
        train_virtual_stain(
            [source], [target], ["B/03/0"], options=opts, init_state=one_channel.state_dict()
        )


def test_no_target_anywhere_is_an_error(tmp_path, isl):
    phase, _ = isl
    plate = plate_from_arrays(
        tmp_path / "p.zarr",
        name="p",
        fields=[(("B", 2), phase[:, :64, :64])],
        channels=PHASE,
        pixel_size_um=0.5,
    )
    cfg = VirtualStainConfig(model=tiny())
    with pytest.raises(InputDataError, match="nothing to learn from"):
        plan_virtual_stain(plate.url, cfg, output_root=str(tmp_path / "t"))
    bad = VirtualStainConfig(model=tiny().model_copy(update={"source_channels": ["BF"]}))
    with pytest.raises(ChannelNotFoundError, match="'BF'.*available channels"):
        plan_virtual_stain(plate.url, bad, output_root=str(tmp_path / "t"))


def _partly_stained_plate(tmp_path, phase, dapi):
    """8 fields of 256² over 4 wells; DAPI only in wells B02 and B03."""
    tiles = [(y, x) for y in (0, 256) for x in (0, 256, 512, 768)]
    wells = [("B", 2), ("B", 2), ("B", 3), ("B", 3), ("C", 2), ("C", 2), ("C", 3), ("C", 3)]
    plate = plate_from_arrays(
        tmp_path / "isl.zarr",
        name="isl",
        fields=[
            (w, phase[:, y : y + 256, x : x + 256]) for w, (y, x) in zip(wells, tiles, strict=True)
        ],
        channels=PHASE,
        pixel_size_um=0.5,
    )
    writable = open_plate(plate.url, mode="r+")
    refs = list(writable.iter_fields())
    for ref, (y, x) in zip(refs, tiles, strict=True):
        if ref.well in ("B02", "B03"):
            append_channel(writable, ref, ChannelSpec("DAPI"), dapi[y : y + 256, x : x + 256])
    return plate


def test_process_plate_fills_in_virtual_nuclei(tmp_path, isl):
    phase, dapi = isl
    plate = _partly_stained_plate(tmp_path, phase, dapi)
    with pytest.raises(ChannelNotFoundError, match="predict a virtual nucleus channel first"):
        process_plate(plate.url, ProcessConfig(nucleus_channel="DAPI"))
    config = ProcessConfig(
        nucleus_channel="DAPI",
        virtual_stain=VirtualStainConfig(model=tiny(60)),
    )
    result = process_plate(plate.url, config)
    plate = open_plate(plate.url)
    for ref in plate.iter_fields():
        names = plate.channel_names(ref)
        assert "DAPI_virtual" in names
        assert ("DAPI" in names) == (ref.well in ("B02", "B03"))
        assert "nuclei" in plate.label_names(ref)
    cells = read_table(result["output"], "cells")
    source = cells.groupby("Metadata_Well").Metadata_NucleusChannelSource.first().to_dict()
    assert source["C02"] == "virtual" and source["B02"] == "measured"
    qc = read_table(result["output"], "virtual_stain_qc")
    assert set(qc.Metadata_VirtualStainRole) >= {"training", "validation", "no-target"}
    scored = qc.dropna(subset=["Image_VirtualStain_PCC_DAPI"])
    assert len(scored) == 4 and scored.Image_VirtualStain_PCC_DAPI.notna().all()
    assert set(scored.Metadata_Well) == {"B02", "B03"}
    markers = read_table(result["output"], "markers")
    assert {"Metadata_Well", "Metadata_Site", "y_um", "x_um"} <= set(markers.columns)
    wells = read_table(result["output"], "well_qc")
    assert "Image_VirtualStain_MarkerFNRate" in wells.columns

    # A later plate can reuse the model; a model for other channels is refused.
    store = VirtualStainConfig(model=tiny()).store(plate.url)
    model_id = next(p.name for p in store.iterdir() if not p.name.startswith("."))
    other = plate_from_arrays(
        tmp_path / "other.zarr",
        name="other",
        fields=[(("B", 2), dapi[None, :64, :64])],
        channels=["Hoechst"],
        pixel_size_um=0.5,
    )
    reuse = VirtualStainConfig(model=tiny(), model_id=model_id, model_store=str(store))
    with pytest.raises((ModelError, ChannelNotFoundError)):
        process_plate(other.url, ProcessConfig(nucleus_channel="DAPI", virtual_stain=reuse))


def test_mask_mode_learns_nucleus_positions_as_probabilities(isl):
    """target_mode='mask': cross-entropy on the Otsu-thresholded stain; predictions are
    probabilities that are high on nuclei and low on background after a short training."""
    phase, dapi = isl
    opts = tiny(60).model_copy(update={"target_mode": "mask"})
    fields = [(phase[:, :256, i : i + 256], dapi[:256, i : i + 256]) for i in (0, 256, 512)]
    model = train_virtual_stain(
        [s for s, _ in fields], [t for _, t in fields], ["a", "b", "c"], options=opts
    )
    assert model.mask_threshold is not None and 0 < model.mask_threshold < 1
    card = model.card()
    assert card["normalisation"]["target_mode"] == "mask"
    losses = model.history["loss"]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    pred = predict_virtual_stain(model.network, phase[:, :256, :768], opts)
    assert pred.min() >= 0 and pred.max() <= 1
    real = dapi[:256, :768].astype(np.float32)
    nuclei = real > model.mask_threshold * np.percentile(real, 99.8)
    assert pred[nuclei].mean() > pred[~nuclei].mean() + 0.05  # after 60 CPU steps
