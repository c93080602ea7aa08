"""Per-plate training end to end on real dense-cell data: train, segment, evaluate."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch

from flows.process_plate import process_plate
from flows.train_plate import train_plate
from hcsseg.config import ProcessConfig
from hcsseg.errors import HcssegError, ModelError
from hcsseg.evaluate.plate_eval import evaluate_plate
from hcsseg.export.tables import read_table
from hcsseg.io.labels import write_labels
from hcsseg.io.plate import open_plate
from hcsseg.io.tiff_import import plate_from_arrays
from hcsseg.pipeline.training import TrainConfig
from tests.conftest import dataset

FAST = {
    "train": {"n_steps": 12, "batch_size": 2, "crop_size": 64, "warmup_steps": 2},
    "decoder_channels": [32, 16, 16, 8, 8],
    "tile": 256,
}


# Distance U-Net on the plate's surface stain "CD", taught by the labels "cells_gt".
DISTANCE_UNET = TrainConfig(
    compartment="cells",
    method="distance_unet",
    input_channels=["CD"],
    truth="cells_gt",
    options=FAST,
)


@pytest.fixture
def dense_plate(shared_data, tmp_path):
    """4 crops (256²) of two dense-cells images with their expert cell labels as cells_gt."""
    torch.set_num_threads(1)
    src = dataset(shared_data, "dense-cells")
    stems = sorted(p.name[: -len("_img.tif")] for p in src.glob("*_img.tif"))[:2]
    items, truths = [], []
    for i, stem in enumerate(stems):
        img = tifffile.imread(src / f"{stem}_img.tif")
        dapi = tifffile.imread(src / f"{stem}_dapi.tif")
        lab = tifffile.imread(src / f"{stem}_lab.tif")
        for y, x in ((300, 300), (600, 600)):
            window = np.s_[y : y + 256, x : x + 256]
            items.append((("B", 2 + i), np.stack([img[window], dapi[window]])))
            truths.append(lab[window])
    plate = plate_from_arrays(
        tmp_path / "dense.zarr",
        name="dense",
        fields=items,
        channels=["CD", "DAPI"],
        pixel_size_um=0.5,
    )
    for ref, truth in zip(plate.iter_fields(), truths, strict=True):
        write_labels(plate, ref, "cells_gt", truth)
    return plate


def test_train_segment_evaluate_distance_unet(dense_plate, tmp_path):
    trained = train_plate(dense_plate.url, DISTANCE_UNET)
    card_dir = tmp_path / "dense_models" / trained["model_id"]
    assert (card_dir / "model_card.json").exists() and (card_dir / "weights.safetensors").exists()

    result = process_plate(dense_plate.url, ProcessConfig(cells_method="distance_unet"))
    plate = open_plate(dense_plate.url)
    ref = next(plate.iter_fields())
    cells, nuclei = plate.read_labels(ref, "cells"), plate.read_labels(ref, "nuclei")
    assert cells.dtype == np.uint32 and cells.max() > 0
    inside = nuclei > 0
    assert (cells[inside] == nuclei[inside]).all()  # every nucleus sits in its cell
    table = read_table(result["output"], "cells")
    assert (table.Metadata_Cells_Parent_Nuclei >= 0).all()

    metrics, summary = evaluate_plate(dense_plate.url, pred="cells", truth="cells_gt")
    assert len(metrics) == 4 and 0 <= summary["ap_50_image_mean"] <= 1
    assert {"ap_50", "f1_50", "splits", "merges"} <= set(metrics.columns)


def test_cells_from_stain_pseudo_labels_leave_doubtful_objects_out(dense_plate, tmp_path):
    """The annotation-free distance U-Net: taught by the stain's classical cells, with the
    teacher's likely fragments and merges left out of the loss (recorded on the card)."""
    config = TrainConfig(
        compartment="cells",
        method="distance_unet",
        input_channels=["CD", "DAPI"],
        nucleus_channel="DAPI",
        cell_pseudo_labels="stain",
        options=FAST,
    )
    trained = train_plate(dense_plate.url, config)
    card = json.loads(
        (tmp_path / "dense_models" / trained["model_id"] / "model_card.json").read_text()
    )
    assert card["truth"] == "pseudo" and card["confident_pseudo_labels"] is True
    plain = train_plate(
        dense_plate.url, config.model_copy(update={"confident_pseudo_labels": False})
    )
    card = json.loads(
        (tmp_path / "dense_models" / plain["model_id"] / "model_card.json").read_text()
    )
    assert card["confident_pseudo_labels"] is False


def test_annotation_free_cells_from_markers(dense_plate):
    config = TrainConfig(
        compartment="cells",
        method="unsupervised",
        input_channels=["CD"],
        nucleus_channel="DAPI",
        options={"n_steps": 6, "warmup_steps": 3, "area_size": 96, "base_channels": 8, "depth": 2},
    )
    train_plate(dense_plate.url, config)
    process_plate(
        dense_plate.url, ProcessConfig(cells_method="unsupervised", nucleus_channel="DAPI")
    )
    plate = open_plate(dense_plate.url)
    for ref in plate.iter_fields():
        cells, nuclei = plate.read_labels(ref, "cells"), plate.read_labels(ref, "nuclei")
        # Annotation-free cells take their nucleus's id; no cell without a marker.
        assert set(np.unique(cells)) <= set(np.unique(nuclei))


def test_model_errors_are_clear(dense_plate, tmp_path):
    with pytest.raises(ModelError, match="needs a trained model"):
        process_plate(dense_plate.url, ProcessConfig(cells_method="distance_unet"))
    with pytest.raises(HcssegError, match="no field has label image 'nuclei_gt'"):
        train_plate(dense_plate.url, TrainConfig(input_channels=["CD"], truth="nuclei_gt"))
    other = plate_from_arrays(
        tmp_path / "other.zarr",
        name="dense",
        fields=[(("B", 2), np.zeros((1, 64, 64), np.uint8))],
        channels=["GFP"],
        pixel_size_um=0.5,
    )
    trained = train_plate(dense_plate.url, DISTANCE_UNET)
    store = str(tmp_path / "dense_models")
    with pytest.raises(ModelError, match=r"trained on channels \['CD'\]"):
        process_plate(
            other.url,
            ProcessConfig(
                nucleus_channel="GFP",
                cells_method="distance_unet",
                cells_model=trained["model_id"],
                model_store=store,
            ),
        )
    # A damaged weights file stops the run before anything is written.
    weights = tmp_path / "dense_models" / trained["model_id"] / "weights.safetensors"
    weights.write_bytes(b"garbage")
    with pytest.raises(ModelError, match="cannot be loaded"):
        process_plate(
            dense_plate.url,
            ProcessConfig(cells_method="distance_unet", cells_model=trained["model_id"]),
        )


def test_cli_train_process_evaluate(dense_plate):
    from typer.testing import CliRunner

    from hcsseg.cli import app

    runner = CliRunner()
    url = dense_plate.url
    trained = runner.invoke(
        app,
        [
            "train",
            url,
            "--compartment",
            "cells",
            "--method",
            "distance_unet",
            "--channel",
            "CD",
            "--truth",
            "cells_gt",
            "--steps",
            "2",
        ],
    )
    assert trained.exit_code == 0, trained.output
    assert "stored model cells-distance_unet-" in trained.output
    processed = runner.invoke(
        app, ["process", url, "--nucleus-channel", "DAPI", "--cells-method", "distance_unet"]
    )
    assert processed.exit_code == 0, processed.output
    scored = runner.invoke(app, ["evaluate", url, "--pred", "cells", "--truth", "cells_gt"])
    assert scored.exit_code == 0, scored.output
    assert "4 fields" in scored.output and "mean AP 0.50:0.95" in scored.output
