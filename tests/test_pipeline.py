"""The plate pipeline: presets, planning, the stage ledger, the quality gate, one run."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from typer.testing import CliRunner

from flows.plate_pipeline import plate_pipeline
from hcsseg.cli import app
from hcsseg.config import ProcessConfig
from hcsseg.demo import synthetic_plate
from hcsseg.errors import ChannelNotFoundError, HcssegError
from hcsseg.export.tables import read_table
from hcsseg.io.labels import write_labels
from hcsseg.io.plate import open_plate
from hcsseg.io.tiff_import import plate_from_arrays
from hcsseg.model_store import list_models
from hcsseg.pipeline.gate import cell_proxy_score, marker_f1, truth_score, verdict
from hcsseg.pipeline.plan import plan_pipeline, split_gate_fields, train_config
from hcsseg.pipeline.presets import preset_config, set_options
from hcsseg.pipeline.stages import StageLedger, stage_key
from tests.conftest import dataset
from tests.plates import isl_partly_stained


@pytest.fixture
def isl_plate(shared_data, tmp_path):
    return isl_partly_stained(dataset(shared_data, "isl-phase-dapi"), tmp_path / "isl.zarr")


@pytest.fixture
def dsb_plate(shared_data, tmp_path, one_torch_thread):
    """5 annotated DSB crops (256²), ground truth stored as nuclei_gt."""
    src = dataset(shared_data, "nuclei-dsb2018")
    fields, truths = [], []
    for path in sorted(src.glob("*_img.tif")):
        image = tifffile.imread(path)
        if image.ndim != 2 or min(image.shape) < 256:
            continue
        labels = tifffile.imread(str(path).replace("_img.tif", "_lab.tif"))
        fields.append((("B", 2 + len(fields) % 2), image[None, :256, :256]))
        truths.append(labels[:256, :256])
        if len(fields) == 5:
            break
    plate = plate_from_arrays(
        tmp_path / "dsb.zarr", name="dsb", fields=fields, channels=["DNA"], pixel_size_um=0.5
    )
    writable = open_plate(plate.url, mode="r+")
    for ref, truth in zip(writable.iter_fields(), truths, strict=True):
        write_labels(writable, ref, "nuclei_gt", truth.astype(np.uint32))
    return open_plate(plate.url)


def test_presets_merge_user_options_field_by_field():
    cfg = preset_config("annotation-free", {"train": {"steps": 7}, "nucleus_channel": "Hoechst"})
    assert cfg.train is not None
    assert (cfg.train.nuclei, cfg.train.cells, cfg.train.steps) == (
        "distance_unet",
        "unsupervised",
        7,
    )
    assert cfg.nucleus_channel == "Hoechst"
    assert preset_config("classical").train is None
    with pytest.raises(HcssegError, match="unknown preset 'fancy'"):
        preset_config("fancy")
    # a UI form or JSON payload overrides only what it sets
    given = ProcessConfig.model_validate({"train": {"gate_fields": 2}})
    assert set_options(given) == {"train": {"gate_fields": 2}}
    assert preset_config("supervised", set_options(given)).train.nuclei_truth == "nuclei_gt"


def test_gate_fields_are_held_back_from_training():
    fields = [f"B/02/{i}" for i in range(12)]
    train, gate, in_sample = split_gate_fields(fields, 4)
    assert len(gate) == 2 and not in_sample
    assert not set(train) & set(gate) and sorted(train + gate) == sorted(fields)
    assert split_gate_fields(fields[:1], 4) == (fields[:1], fields[:1], True)


def test_plan_annotation_free_on_a_partly_stained_plate(isl_plate):
    cfg = preset_config("annotation-free", {"cell_channel": "MAP2"})
    plan = plan_pipeline(isl_plate.url, cfg)
    assert plan.virtual_stain is not None
    assert plan.virtual_stain.model.source_channels == ["PHASE_z02", "PHASE_z06", "PHASE_z10"]
    assert plan.virtual_stain.model.target_channel == "DAPI"
    nuclei, cells = plan.train
    assert (nuclei.compartment, nuclei.method, nuclei.input_channels) == (
        "nuclei",
        "distance_unet",
        ["DAPI"],
    )
    assert (cells.method, cells.input_channels) == ("unsupervised", ["MAP2"])
    # only stained wells teach (pseudo-labels and markers need the real stain)
    assert all(
        f.split("/")[:2] in (["B", "02"], ["B", "03"]) for f in nuclei.fields + nuclei.gate_fields
    )
    assert not set(nuclei.fields) & set(nuclei.gate_fields)
    tc = train_config(plan, nuclei)
    assert tc.fields == nuclei.fields and tc.request_id and tc.request_id.startswith("isl:")
    # the classical preset cannot segment the unstained wells and says what would
    with pytest.raises(ChannelNotFoundError, match="annotation-free preset"):
        plan_pipeline(isl_plate.url, preset_config("classical"))
    with pytest.raises(ChannelNotFoundError, match="'GFP'"):
        plan_pipeline(isl_plate.url, preset_config("annotation-free", {"cell_channel": "GFP"}))


def test_plan_supervised_needs_ground_truth(isl_plate, dsb_plate):
    with pytest.raises(HcssegError, match="nothing to train.*no field holds 'nuclei_gt'"):
        plan_pipeline(isl_plate.url, preset_config("supervised", {"cell_channel": "MAP2"}))
    plan = plan_pipeline(dsb_plate.url, preset_config("supervised"))
    (stage,) = plan.train
    assert (stage.compartment, stage.truth, len(stage.gate_fields)) == ("nuclei", "nuclei_gt", 1)
    assert any("no cell channel" in n for n in plan.notes)


def test_stage_ledger_resumes_only_the_same_work(tmp_path):
    ledger = StageLedger(tmp_path / "tables", "plate 1")
    key = stage_key("train", {"steps": 5})
    assert ledger.get("train-nuclei", key) is None
    ledger.record("train-nuclei", key, {"model_id": "m1"}, seconds=1.5)
    assert ledger.get("train-nuclei", key) == {"model_id": "m1"}
    assert ledger.get("train-nuclei", stage_key("train", {"steps": 6})) is None
    assert ledger.root.is_relative_to(tmp_path / "tables" / ".hcsseg")
    assert not [p for p in ledger.root.iterdir() if p.suffix == ".tmp"]
    ledger.clear()
    assert ledger.get("train-nuclei", key) is None


def test_gate_scores_and_verdict():
    labels = np.zeros((40, 40), np.uint32)
    labels[2:8, 2:8], labels[20:30, 20:30] = 1, 2
    centres = np.array([[4.5, 4.5], [24.5, 24.5]])
    assert marker_f1(labels, centres, max_distance_px=3) == 1.0
    assert marker_f1(labels, centres[:1], max_distance_px=3) == pytest.approx(2 / 3)
    fg = labels > 0
    assert cell_proxy_score(labels, centres, fg) == 1.0
    merged = (labels > 0).astype(np.uint32)  # one cell holding both markers
    assert cell_proxy_score(merged, centres, fg) == 0.0
    assert truth_score([labels], [labels]) == 1.0
    tie = verdict("nuclei", "m", "classical", "AP", [(0.7, 0.7)] * 3)
    assert tie["winner"] == "baseline" and "does not beat" in tie["reason"]
    ahead = verdict("nuclei", "m", "classical", "AP", [(0.8, 0.7), (0.82, 0.7), (0.79, 0.7)])
    assert ahead["winner"] == "candidate" and ahead["lead"] == pytest.approx(0.1033, abs=1e-3)
    # ahead on average but not resolvably: one field carries the lead, the others lose
    noisy = verdict("nuclei", "m", "classical", "AP", [(0.95, 0.6), (0.6, 0.7), (0.6, 0.7)])
    assert noisy["lead"] > 0.01 and noisy["winner"] == "baseline"
    assert verdict("nuclei", "m", "classical", "AP", [(0.72, 0.7)], margin=0.01)["winner"] == (
        "candidate"
    )
    empty = verdict("cells", "m", "classical", "AP", [(math.nan, math.nan)])
    assert empty["winner"] == "baseline" and "nothing to score" in empty["reason"]


def test_supervised_pipeline_trains_gates_segments_and_resumes(dsb_plate):
    overrides = ProcessConfig.model_validate({"train": {"steps": 8}})
    result = plate_pipeline(dsb_plate.url, "supervised", overrides)
    assert [s["stage"] for s in result["stages"]] == [
        "train-nuclei",
        "gate-nuclei",
        "segment-measure-qc",
    ]
    (gate,) = result["gates"]
    assert gate["metric"] == "AP@0.5 vs nuclei_gt" and gate["n_fields"] == 1
    assert 0 <= gate["baseline_score"] <= 1
    tables = Path(dsb_plate.url).with_name("dsb_tables")
    cells = read_table(tables, "cells")
    chosen = result["models"]["nuclei"]
    assert set(cells.Metadata_NucleiModel) == {chosen["model_id"] or "classical"}
    stored = pd.read_parquet(tables / "quality_gate" / "dsb.parquet")
    assert stored.winner.tolist() == [gate["winner"]]
    (card,) = list_models(Path(dsb_plate.url).with_name("dsb_models"))
    (stage,) = plan_pipeline(
        dsb_plate.url, preset_config("supervised", {"train": {"steps": 8}})
    ).train
    assert stage.gate_fields and not set(stage.gate_fields) & set(card["training_fields"])
    # the same request again: every stage is found done, nothing is trained twice
    again = plate_pipeline(dsb_plate.url, "supervised", overrides)
    assert [s["state"] for s in again["stages"][:2]] == ["done earlier", "done earlier"]
    assert len(list_models(Path(dsb_plate.url).with_name("dsb_models"))) == 1


def test_cli_run_refuses_bad_requests_before_prefect(isl_plate, tmp_path):
    runner = CliRunner()
    for args, message in (
        (["run", isl_plate.url, "--preset", "fancy"], "unknown preset 'fancy'"),
        (["run", isl_plate.url], "annotation-free preset"),
        (["run", str(tmp_path / "missing.zarr"), "--preset", "annotation-free"], "missing.zarr"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and message in lines[0], result.output
    assert not Path(isl_plate.url).with_name("isl_tables").exists()
    assert not Path(isl_plate.url).with_name("isl_models").exists()


def test_a_server_that_does_not_start_in_time_is_one_clear_line(tmp_path):
    """The embedded server gets one budget ($HCSSEG_SERVER_STARTUP_TIMEOUT); missing it is
    one line and exit 2, not Prefect's traceback."""
    plate = synthetic_plate(tmp_path / "p.zarr", wells=("B02",), fields_per_well=1, shape=(64, 64))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"HCSSEG_SERVER_STARTUP_TIMEOUT": "1", "PREFECT_HOME": str(tmp_path / "home")}
    done = subprocess.run(
        [sys.executable, "-m", "hcsseg.cli", "process", plate.url],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "did not answer within 1 s" in lines[0], done.stderr
    assert not Path(plate.url).with_name("p_tables").exists()


def test_flow_parameters_have_descriptions_the_ui_can_show():
    """Every flow parameter has a description, with no angle brackets (the UI drops them)."""
    from flows.process_plate import process_plate
    from flows.train_plate import train_plate
    from flows.virtual_stain import train_virtual_stain, virtual_stain_plate
    from flows.watch_plates import watch_plates

    for flow in (
        plate_pipeline,
        process_plate,
        train_plate,
        train_virtual_stain,
        virtual_stain_plate,
        watch_plates,
    ):
        for name, prop in flow.parameters.properties.items():
            text = prop.get("description") or ""
            assert text, f"{flow.name}: parameter {name} has no description"
            assert "<" not in text and ">" not in text, f"{flow.name}.{name}: {text}"
