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
from hcsseg.segment.training import TrainOptions
from hcsseg.virtual_stain.model import VirtualStainOptions, train_virtual_stain
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


def test_training_loss_falls(isl):
    phase, dapi = isl
    fields = [
        (phase[:, y : y + 256, x : x + 256], dapi[y : y + 256, x : x + 256])
        for y in (0, 256)
        for x in (0, 256)
    ]
    model = train_virtual_stain(
        [f[0] for f in fields], [f[1] for f in fields], ["a", "b", "c", "d"], options=tiny()
    )
    loss = model.history["loss"]
    assert np.mean(loss[-8:]) < 0.8 * np.mean(loss[:4])
    assert len(model.val_keys) == 1 and set(model.train_keys) | set(model.val_keys) == set("abcd")
    card = model.card()
    assert card["source_channels"] == PHASE and card["validation_fields"] == model.val_keys


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
