"""Transfer across plates: a new plate's model starts from a compatible model of an earlier
plate, with a fraction of the steps, and the model cards record the lineage."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from typer.testing import CliRunner

from hcsseg.cli import app
from hcsseg.errors import ModelError
from hcsseg.io.labels import write_labels
from hcsseg.io.plate import Plate
from hcsseg.io.tiff_import import plate_from_arrays
from hcsseg.model_store import find_model, lineage, list_models, load_card, save_model
from hcsseg.pipeline.training import (
    TrainConfig,
    compatible_model,
    fine_tune_options,
    train_plate_segmentation,
)
from hcsseg.segment.distance_unet import recipe
from hcsseg.segment.methods import centroids, train_method
from tests.conftest import REPO, dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FAST = {
    "train": {"n_steps": 12, "batch_size": 2, "crop_size": 64, "warmup_steps": 2},
    "decoder_channels": [32, 16, 16, 8, 8],
    "tile": 256,
}
NUCLEI = TrainConfig(input_channels=["DNA"], truth="nuclei_gt", options=FAST)


@pytest.fixture(scope="module")
def dsb_fields(shared_data: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Four 256² nuclei-dsb2018 fields with their nucleus labels (first by sorted name)."""
    root = dataset(shared_data, "nuclei-dsb2018")
    fields = []
    for f in sorted(root.glob("*_img.tif")):
        image = tifffile.imread(f)
        if image.shape == (256, 256):
            fields.append((image, tifffile.imread(f.with_name(f.name.replace("_img", "_lab")))))
        if len(fields) == 4:
            return fields
    pytest.skip("fewer than four 256² fields in nuclei-dsb2018")


def _plate(path: Path, name: str, fields: list[tuple[np.ndarray, np.ndarray]]) -> Plate:
    plate = plate_from_arrays(
        path,
        name=name,
        fields=[(("B", 2 + i), image[None]) for i, (image, _) in enumerate(fields)],
        channels=["DNA"],
        pixel_size_um=1.0,
    )
    for ref, (_, labels) in zip(plate.iter_fields(), fields, strict=True):
        write_labels(plate, ref, "nuclei_gt", labels)
    return plate


@pytest.fixture(scope="module")
def two_plates(dsb_fields, tmp_path_factory) -> tuple[Plate, Plate, Path]:
    """Plates P1 and P2 (two real fields each) and one model store for both."""
    root = tmp_path_factory.mktemp("transfer")
    return (
        _plate(root / "p1.zarr", "P1", dsb_fields[:2]),
        _plate(root / "p2.zarr", "P2", dsb_fields[2:]),
        root / "models",
    )


def _card(store: Path, kind: str, plate: str, channels: list[str], **extra) -> str:
    card = {"plate": plate, "input_channels": channels, "source_channels": channels} | extra
    return save_model(store, kind, {"w": torch.rand(3)}, card)


# ---------------------------------------------------------------------------- plate training


def test_plate_2_fine_tunes_from_plate_1(two_plates) -> None:
    p1, p2, store = two_plates
    first = train_plate_segmentation(p1.url, NUCLEI, store=str(store))
    card1 = load_card(store, first)
    assert card1["parent_model"] is None and card1["init"] == "random"
    assert card1["history"]["steps"] == 12 and card1["request_id"] is None
    # the only model is P1's own: retraining P1 does not fine-tune from itself
    assert compatible_model(store, NUCLEI, plate="P1") is None
    assert compatible_model(store, NUCLEI, plate="P2") == first

    config = NUCLEI.model_copy(update={"request_id": "req-42"})
    second = train_plate_segmentation(p2.url, config, store=str(store))
    card2 = load_card(store, second)
    assert card2["parent_model"] == first and card2["init"] == "parent"
    assert card2["history"]["steps"] == 3  # 0.25 x 12
    assert card2["fine_tune_fraction"] == 0.25 and card2["request_id"] == "req-42"
    assert card2["plate"] == "P2"
    assert find_model(store, request_id="req-42") == second
    assert find_model(store, request_id="nobody") is None
    assert lineage(store, second) == [second, first]
    assert lineage(store, first) == [first]

    scratch = train_plate_segmentation(
        p2.url, NUCLEI.model_copy(update={"transfer": False}), store=str(store)
    )
    card3 = load_card(store, scratch)
    assert card3["parent_model"] is None and card3["init"] == "random"
    assert card3["history"]["steps"] == 12


def test_explicit_parent_must_fit(two_plates, tmp_path: Path) -> None:
    _, p2, _ = two_plates

    def train(**update) -> str:
        return train_plate_segmentation(
            p2.url, NUCLEI.model_copy(update=update), store=str(tmp_path)
        )

    other = _card(tmp_path, "nuclei-distance_unet", "P9", ["GFP"])
    with pytest.raises(ModelError, match=r"trained on channels \['GFP'\]"):
        train(parent_model=other)
    cells = _card(tmp_path, "cells-distance_unet", "P9", ["DNA"])
    with pytest.raises(ModelError, match="is a cells-distance_unet model"):
        train(parent_model=cells)
    vgg = _card(tmp_path, "nuclei-distance_unet", "P9", ["DNA"], options={"encoder_name": "vgg11"})
    with pytest.raises(ModelError, match=r"options \['encoder_name', 'decoder_channels'\] differ"):
        train(parent_model=vgg, options=FAST | {"encoder_name": "resnet34"})
    with pytest.raises(ModelError, match="two different starts"):
        train(parent_model=vgg, init="virtual_stain")


# ---------------------------------------------------------------------------- store and options


def test_compatible_model_needs_kind_channels_and_another_plate(tmp_path: Path) -> None:
    plain = TrainConfig(input_channels=["DNA"], truth="nuclei_gt")
    assert compatible_model(tmp_path, plain, plate="P2") is None
    _card(tmp_path, "nuclei-distance_unet", "P2", ["DNA"])  # same plate
    _card(tmp_path, "nuclei-distance_unet", "P1", ["DNA", "GFP"])  # other channels
    _card(tmp_path, "nuclei-fpn2ws", "P1", ["DNA"])  # other method
    _card(tmp_path, "cells-distance_unet", "P1", ["DNA"])  # other compartment
    assert compatible_model(tmp_path, plain, plate="P2") is None
    older = _card(tmp_path, "nuclei-distance_unet", "P0", ["DNA"], options={})
    newer = _card(
        tmp_path, "nuclei-distance_unet", "P1", ["DNA"], options={"encoder_name": "resnet34"}
    )
    assert compatible_model(tmp_path, plain, plate="P2") == newer
    # an architecture asked for explicitly rules out models of another one
    resnet18 = plain.model_copy(update={"options": {"encoder_name": "resnet18"}})
    assert compatible_model(tmp_path, resnet18, plate="P2") == older


def test_fine_tune_budget_and_architecture_come_from_the_parent(tmp_path: Path) -> None:
    parent = {
        "options": {"encoder_name": "resnet34", "canonical_diameter": 30.0, "h": 0.3},
        "weights": str(tmp_path / "cp"),
    }
    out = fine_tune_options("distance_unet", {}, parent, 0.25)
    assert out["train"]["n_steps"] == recipe().n_steps // 4
    assert out["train"]["crop_size"] == recipe().crop_size  # the rest of the recipe stays
    assert out["encoder_name"] == "resnet34" and out["canonical_diameter"] == 30.0
    assert "h" not in out  # post-processing is tuned again on the new plate
    given = fine_tune_options("distance_unet", {"train": {"n_steps": 1000}}, parent, 0.1)
    assert given["train"]["n_steps"] == 100
    assert fine_tune_options("fpn2ws", {}, parent, 0.5)["train"]["n_steps"] == 750
    unsup = fine_tune_options("unsupervised", {"n_steps": 40, "depth": 2}, {"options": {}}, 0.25)
    assert unsup["n_steps"] == 10 and unsup["warmup_steps"] == 0 and unsup["depth"] == 2
    with pytest.raises(ModelError, match="no Cellpose weights file"):
        fine_tune_options("cellpose", {}, parent, 0.25)
    (tmp_path / "cp").write_bytes(b"weights")
    cp = fine_tune_options("cellpose", {"n_epochs": 40}, parent, 0.25)
    assert cp == {"n_epochs": 10, "base_model": str(tmp_path / "cp")}


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("fpn2ws", {"train": {"n_steps": 1, "batch_size": 1, "crop_size": 64}}),
        ("unsupervised", {"n_steps": 1, "warmup_steps": 0, "area_size": 64, "depth": 2}),
        ("distance_unet", {"train": {"n_steps": 1, "batch_size": 1, "crop_size": 64}}),
    ],
)
def test_parent_state_is_the_starting_point(dsb_fields, method: str, options: dict) -> None:
    """A fine-tune at a vanishing learning rate leaves the parent's weights as they were: the
    whole network, not only its encoder, was loaded."""
    image, labels = dsb_fields[0]
    targets = [centroids(labels)[1] if method == "unsupervised" else labels]
    parent, _ = train_method(method, [image], targets, options=options)
    slow = json.loads(json.dumps(options))
    if "train" in slow:
        slow["train"]["learning_rate"] = 1e-12
    else:
        slow["learning_rate"] = 1e-12
    child, _ = train_method(method, [image], targets, options=slow, parent_state=parent)
    weights = [k for k, v in parent.items() if v.is_floating_point() and "running" not in k]
    for key in weights:
        torch.testing.assert_close(child[key], parent[key], atol=1e-6, rtol=0)
    with pytest.raises(ModelError, match="not both|excludes"):
        train_method(
            method, [image], targets, options=options, parent_state=parent, init_state=parent
        )


def test_lineage_and_damaged_cards(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = _card(tmp_path, "nuclei-distance_unet", "P1", ["DNA"], parent_model=None)
    child = _card(tmp_path, "nuclei-distance_unet", "P2", ["DNA"], parent_model=root)
    grandchild = _card(tmp_path, "nuclei-distance_unet", "P3", ["DNA"], parent_model=child)
    assert lineage(tmp_path, grandchild) == [grandchild, child, root]
    orphan = _card(tmp_path, "nuclei-distance_unet", "P4", ["DNA"], parent_model="gone-1")
    assert lineage(tmp_path, orphan) == [orphan, "gone-1"]
    with pytest.raises(ModelError, match="no model 'nope'"):
        lineage(tmp_path, "nope")
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model_card.json").write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="hcsseg.model_store"):
        listed = {c["model_id"] for c in list_models(tmp_path)}
    assert listed == {root, child, grandchild, orphan}
    assert str(broken / "model_card.json") in caplog.text and "not valid JSON" in caplog.text


# ---------------------------------------------------------------------------- command line


def test_models_command_shows_lineage(tmp_path: Path) -> None:
    runner = CliRunner()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["models", str(empty)])
    assert result.exit_code == 0 and result.output.strip() == f"no models in {empty}"

    missing = runner.invoke(app, ["models", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2
    assert missing.output.strip().splitlines() == [
        f"error: model store {tmp_path / 'nowhere'} does not exist or is not a folder"
    ]

    store = tmp_path / "models"
    root = _card(store, "nuclei-distance_unet", "P1", ["DNA"], history={"steps": 800})
    child = _card(
        store,
        "nuclei-distance_unet",
        "P2",
        ["DNA"],
        parent_model=root,
        history={"steps": 200, "best_val_loss": 0.0421},
    )
    vs = save_model(
        store,
        "virtual_stain",
        {"w": torch.ones(1)},
        {"plate": "P1", "source_channels": ["BF"], "target_channel": "DAPI"},
    )
    lines = runner.invoke(app, ["models", str(store)]).output.splitlines()
    assert len(lines) == 3
    at = {line.split()[0]: i for i, line in enumerate(lines)}
    assert lines[at[root]].startswith(root) and "from scratch" in lines[at[root]]
    assert "steps 800" in lines[at[root]] and "plate P1" in lines[at[root]]
    assert at[child] == at[root] + 1 and lines[at[child]].startswith(f"  {child}")
    assert f"parent: {root}" in lines[at[child]] and "steps 200" in lines[at[child]]
    assert "channels DNA" in lines[at[child]] and "val loss 0.0421" in lines[at[child]]
    assert "channels BF -> DAPI" in lines[at[vs]] and "virtual_stain" in lines[at[vs]]


# ---------------------------------------------------------------------------- benchmark


def test_transfer_benchmark_quick(shared_data: Path, tmp_path: Path) -> None:
    dataset(shared_data, "nuclei-dsb2018")
    env = os.environ | {
        "HCSSEG_BENCH_RESULTS": str(tmp_path),
        "HCSSEG_SHARED_DATA": str(shared_data),
    }
    proc = subprocess.run(
        [sys.executable, "bench/transfer.py", "--quick"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "transfer_quick.json").read_text())
    assert result["machine"]["threads"] == 1
    fine = result["runs"]["plate 2, fine-tuned from plate 1"]
    assert fine["steps"] == result["fine_tune_steps"] == 2 < result["budget"]
    assert fine["learning_curve"][0]["step"] == 0  # the zero-shot point
    for run in result["runs"].values():
        assert 0 <= run["ap50_image_mean"] <= 1
    plate1, plate2 = result["plates"]["plate1"], result["plates"]["plate2"]
    assert not set(plate1["fit"] + plate1["score"]) & set(plate2["fit"] + plate2["score"])
    assert "| plate 2, fine-tuned from plate 1 |" in (tmp_path / "transfer_quick.md").read_text()
