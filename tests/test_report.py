"""Observability reports: training curves of stored models, the pipeline report (models,
quality gate, stages) and marker FN/FP heat maps in the plate report."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from hcsseg.errors import InputDataError
from hcsseg.io.labels import write_labels
from hcsseg.io.tiff_import import plate_from_arrays
from hcsseg.learning.options import TrainOptions
from hcsseg.model_store import load_card
from hcsseg.pipeline.training import TrainConfig, train_plate_segmentation
from hcsseg.report import (
    MISSING,
    ReportOptions,
    curve_steps,
    md_cell,
    pipeline_report,
    plate_report,
    training_curve_png,
    training_report,
)
from hcsseg.virtual_stain.options import VirtualStainOptions
from hcsseg.virtual_stain.plate import VirtualStainConfig, plan_virtual_stain, train_plate_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_TRAIN = {
    "n_steps": 10,
    "batch_size": 2,
    "crop_size": 64,
    "warmup_steps": 2,
    "val_fraction": 0.5,
    "val_every": 3,
    "val_crops": 2,
}


def _pngs(markdown: str) -> list[bytes]:
    return [
        base64.b64decode(m)
        for m in re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    ]


def _decode(png: bytes) -> np.ndarray:
    """Decode for real (not only the magic bytes): a truncated PNG fails here."""
    from matplotlib.image import imread

    assert png.startswith(PNG_MAGIC)
    image = imread(io.BytesIO(png), format="png")
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 50
    return image


def _field(seed: int, n: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bright disks (nucleus stain), a blurred offset copy (label-free source), labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, n), np.uint32)
    yy, xx = np.mgrid[:n, :n]
    for i in range(1, 9):
        cy, cx = rng.integers(10, n - 10, 2)
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = i
    dna = ndi.gaussian_filter((labels > 0).astype(np.float32), 1.0) * 1000 + 50
    bf = ndi.gaussian_filter(dna, 3.0) + rng.normal(0, 5, (n, n))
    dna = dna + rng.normal(0, 5, (n, n))
    return dna.astype(np.float32), bf.astype(np.float32), labels


@pytest.fixture(scope="module")
def tiny_plate(tmp_path_factory, one_torch_thread) -> tuple[str, Path]:
    """Two 128² fields (wells B02, B03) with DNA, BF and nucleus labels ``nuclei_gt``."""
    root = tmp_path_factory.mktemp("report")
    fields = [_field(seed) for seed in (0, 1)]
    plate = plate_from_arrays(
        root / "tiny.zarr",
        name="tiny",
        fields=[(("B", 2 + i), np.stack([f[0], f[1]])) for i, f in enumerate(fields)],
        channels=["DNA", "BF"],
        pixel_size_um=0.65,
    )
    for ref, (_, _, labels) in zip(plate.iter_fields(), fields, strict=True):
        write_labels(plate, ref, "nuclei_gt", labels)
    return str(root / "tiny.zarr"), root / "tiny_models"


@pytest.fixture(scope="module")
def seg_card(tiny_plate) -> dict[str, Any]:
    """The stored card of a real (10-step) distance U-Net training, as the flow loads it."""
    plate_url, store = tiny_plate
    config = TrainConfig(
        compartment="nuclei",
        method="distance_unet",
        input_channels=["DNA"],
        truth="nuclei_gt",
        options={
            "train": TINY_TRAIN,
            "decoder_channels": [16, 16, 8, 8, 8],
            "tune_postprocessing": False,
            "tile": 128,
        },
    )
    model_id = train_plate_segmentation(plate_url, config, store=str(store))
    return load_card(store, model_id)


@pytest.fixture(scope="module")
def vs_card(tiny_plate) -> dict[str, Any]:
    """The stored card of a real (10-step) virtual-staining training: BF -> DNA."""
    plate_url, store = tiny_plate
    config = VirtualStainConfig(
        model=VirtualStainOptions(
            source_channels=["BF"],
            target_channel="DNA",
            decoder_channels=[16, 16, 8, 8, 8],
            training=TrainOptions(**TINY_TRAIN),
        ),
        model_store=str(store),
    )
    plan = plan_virtual_stain(plate_url, config, output_root=str(store.parent / "out"))
    return load_card(store, train_plate_model(plan, config))


# ---------------------------------------------------------------- training curves


def test_segmentation_training_report_shows_loss_and_validation(seg_card):
    png = training_curve_png(seg_card, dpi=40)
    _decode(png)
    md = training_report(seg_card, dpi=40)
    assert md.startswith(f"# Training: {seg_card['model_id']}")
    assert "| compartment / method | nuclei / distance_unet |" in md
    assert "| channels | DNA |" in md and "| labels | nuclei_gt |" in md
    assert f"| steps | {seg_card['history']['steps']}" in md
    assert re.search(r"\| seconds \| \d+\.\d on cpu \|", md)
    assert "| best validation loss |" in md and "| init | random" in md
    assert re.search(r"\| weights kept \| step \d+ \((last|clearly lower validation loss)\) \|", md)
    assert "held out for validation" in md
    (image,) = _pngs(md)
    _decode(image)
    assert "No training curve" not in md


def test_virtual_staining_training_report(vs_card):
    # The virtual-staining card keeps the thinned training curve and the validation losses.
    assert vs_card["loss_curve"] and vs_card["history"]["val_loss"]
    md = training_report(vs_card, dpi=40)
    (image,) = _pngs(md)
    _decode(image)
    assert "| compartment / method | virtual staining of DNA (intensity) |" in md
    assert "| channels | BF → DNA |" in md
    assert "| fields | 1 training, 1 validation |" in md
    assert "| init | random |" in md and "| final training loss |" in md
    assert "only validation losses" not in md  # the training curve is drawn too
    # Fine-tuned: the parent is named.
    child = {**vs_card, "fine_tuned_from": "virtual_stain-20240101T000000-abcdef12"}
    md = training_report(child, dpi=40)
    assert "| parent model | virtual_stain-20240101T000000-abcdef12 |" in md
    assert "| init | fine-tuned |" in md


def test_training_report_without_curve_says_so():
    card = {"model_id": "nuclei-cellpose-x", "kind": "nuclei-cellpose", "history": {}}
    md = training_report(card)
    assert "No training curve" in md and not _pngs(md)
    assert f"| steps | {MISSING} |" in md
    with pytest.raises(InputDataError, match="no training curve"):
        training_curve_png(card)
    # Unreadable values (a NaN string, None) are skipped, not a crash.
    md = training_report({"model_id": "m", "loss_curve": ["nan", None], "history": "?"})
    assert "No training curve" in md


def test_thinned_curve_maps_back_to_steps():
    from hcsseg.learning.loop import thin_curve as _thin

    for n in (7, 200, 401, 1000, 1999):
        loss = list(range(1, n + 1))  # loss value == step number
        thinned = _thin([float(v) for v in loss])
        np.testing.assert_array_equal(curve_steps(len(thinned), n), thinned)
    assert curve_steps(5, None) is None and curve_steps(0, 10) is None
    # annotation-free cards: no history.steps, but the loss terms are kept per step
    annotation_free = {
        "model_id": "cells-unsupervised-x",
        "loss_curve": _thin([1.0 / (s + 1) for s in range(600)]),
        "history": {"area": [0.1] * 600, "warmup_loss": [1.0] * 20, "seconds": 3.0},
        "options": {"n_steps": 600},
    }
    md = training_report(annotation_free, dpi=40)
    assert "| steps | 600 |" in md and "| seconds | 3.0 |" in md
    _decode(_pngs(md)[0])
    # a realistic long card: 1500 steps with early stopping validation
    curve = _thin([float(np.exp(-s / 300)) for s in range(1500)])
    card = {
        "model_id": "cells-fpn2ws-x",
        "loss_curve": curve,
        "history": {"steps": 1500, "val_loss": [0.5, 0.3, 0.35], "val_step": [500, 1000, 1500]},
        "options": {"train": {"n_steps": 2000}},
    }
    md = training_report(card, dpi=40)
    assert "| steps | 1500 of 2000 (early stop) |" in md
    _decode(_pngs(md)[0])


# ---------------------------------------------------------------- pipeline report


def _well_qc(fn_fp: bool = True) -> pd.DataFrame:
    wells = [f"{r}{c:02d}" for r in "BC" for c in range(2, 6)]
    df = pd.DataFrame(
        {
            "Metadata_Plate": "P1",
            "Metadata_Well": wells,
            "Metadata_FieldCount": 2,
            "Image_Count_Cells": np.arange(len(wells)) * 10.0 + 100,
            "Image_ImageQuality_FocusScore_DNA": 0.2,
            "Image_VirtualStain_PCC_DNA": 0.8,
        }
    )
    if fn_fp:
        df["Image_VirtualStain_MarkerFNRate"] = np.linspace(0.05, 0.3, len(wells))
        df["Image_VirtualStain_MarkerFPRate"] = [0.1] * (len(wells) - 1) + [np.nan]
    return df


def test_plate_report_maps_marker_fn_fp_rates():
    md = plate_report(_well_qc(), options=ReportOptions(dpi=40))
    assert len(_pngs(md)) == 5
    assert "## Virtual staining marker FN rate" in md and "## Virtual staining marker FP rate" in md
    fp = md.split("marker FP rate")[1]
    assert "| 1 |" in fp  # one well without an FP rate
    md = plate_report(_well_qc(fn_fp=False), options=ReportOptions(dpi=40))
    assert len(_pngs(md)) == 3 and "marker FN" not in md


def test_pipeline_report_tables():
    models = {
        "nuclei": {
            "method": "distance_unet",
            "model_id": "nuclei-distance_unet-1",
            "reason": "won",
        },
        "cells": {"method": "propagation", "model_id": None, "reason": "gate: a|b better"},
    }
    gates = [
        {
            "compartment": "nuclei",
            "candidate": "nuclei-distance_unet-1",
            "baseline": "classical",
            "metric": "AP50",
            "candidate_score": 0.81234,
            "baseline_score": 0.7,
            "n_fields": 4,
            "winner": "candidate",
            "reason": "higher AP50\non 4 fields",
        },
        {
            "compartment": "cells",
            "candidate": "cells-fpn2ws-1",
            "baseline": "classical",
            "metric": "AP50",
            "candidate_score": float("nan"),
            "baseline_score": None,
            "n_fields": 0,
            "winner": "baseline",
            "reason": "no | fields",
        },
    ]
    stages = [
        {"stage": "virtual-stain", "state": "skipped", "seconds": None},
        {"stage": "train nuclei", "state": "resumed", "seconds": 12.345},
        {"stage": "process", "state": "done", "seconds": float("nan")},
    ]
    md = pipeline_report(
        _well_qc(),
        plate_name="P1",
        models=models,
        gates=gates,
        stages=stages,
        options=ReportOptions(dpi=40),
    )
    assert md.startswith("# Plate report: P1")
    assert "| nuclei | distance_unet | nuclei-distance_unet-1 | won |" in md
    assert "| cells | propagation | classical | gate: a\\|b better |" in md
    assert (
        "| nuclei | nuclei-distance_unet-1 | classical | AP50 | 0.8123 | 0.7 | 4 | candidate "
        "| higher AP50 on 4 fields |" in md
    )
    assert (
        f"| cells | cells-fpn2ws-1 | classical | AP50 | {MISSING} | {MISSING} | 0 | baseline " in md
    )
    assert "| no \\| fields |" in md
    assert f"| virtual-stain | skipped | {MISSING} |" in md
    assert "| train nuclei | resumed | 12.3 |" in md and f"| process | done | {MISSING} |" in md
    assert "nuclei: candidate nuclei-distance_unet-1 adopted; cells: baseline classical kept" in md
    # Every table row has as many cells as its header: no unescaped "|" split a cell.
    for table in re.findall(r"((?:^\|.*\|$\n?)+)", md, flags=re.M):
        rows = [re.split(r"(?<!\\)\|", r)[1:-1] for r in table.strip().splitlines()]
        assert len({len(r) for r in rows}) == 1, table
    # The heat maps (with FN/FP) follow the tables.
    assert md.index("## Quality gate") < md.index("## Cell count")
    assert len(_pngs(md)) == 5


def test_pipeline_report_without_gates_or_stages():
    md = pipeline_report(
        _well_qc(fn_fp=False),
        plate_name="P1",
        models={},
        gates=[],
        options=ReportOptions(dpi=40),
    )
    assert "No quality gate ran." in md and "No model information." in md
    assert "## Stages" not in md


def test_md_cell():
    assert md_cell(float("nan")) == MISSING and md_cell(None) == MISSING
    assert md_cell(np.float32("nan")) == MISSING and md_cell(pd.NA) == MISSING
    assert md_cell("") == MISSING and md_cell(np.int64(3)) == "3"
    assert md_cell("a|b\nc") == "a\\|b c" and md_cell(1234.5) == "1234"


@pytest.mark.timeout(300)
def test_flows_publish_training_reports(tiny_plate, tmp_path, monkeypatch):
    """Both flows, run for real (embedded Prefect server), hand the image report to
    create_markdown_artifact; a reused virtual-staining model gets none."""
    import flows.train_plate as train_flow
    import flows.virtual_stain as vs_flow

    made: list[dict[str, Any]] = []

    def capture(markdown: str, **kwargs: Any) -> None:
        made.append({"markdown": markdown, **kwargs})

    monkeypatch.setattr(train_flow, "create_markdown_artifact", capture)
    monkeypatch.setattr(vs_flow, "create_markdown_artifact", capture)
    plate_url, _ = tiny_plate
    store = str(tmp_path / "models")
    config = TrainConfig(
        compartment="nuclei",
        method="distance_unet",
        input_channels=["DNA"],
        truth="nuclei_gt",
        options={"train": TINY_TRAIN, "decoder_channels": [16, 16, 8, 8, 8], "tile": 128},
    )
    result = train_flow.train_plate(plate_url, config, model_store=store)
    (seg,) = made
    assert seg["key"].startswith("training-tiny-nuclei-distance-unet-")
    assert seg["markdown"].startswith(f"# Training: {result['model_id']}")
    _decode(_pngs(seg["markdown"])[0])

    vs_config = VirtualStainConfig(
        model=VirtualStainOptions(
            source_channels=["BF"],
            target_channel="DNA",
            decoder_channels=[16, 16, 8, 8, 8],
            training=TrainOptions(**TINY_TRAIN),
            tile=128,
            overlap=16,
        ),
        model_store=store,
    )
    out = vs_flow.virtual_stain_plate(plate_url, vs_config, output=str(tmp_path / "out"))
    vs = made[1]
    assert vs["key"].startswith("vs-training-tiny-") and out["model_id"] in vs["description"]
    assert "virtual staining of DNA" in vs["markdown"]
    _decode(_pngs(vs["markdown"])[0])
    reuse = vs_config.model_copy(update={"model_id": out["model_id"]})
    vs_flow.virtual_stain_plate(plate_url, reuse, output=str(tmp_path / "out"))
    assert len(made) == 2
