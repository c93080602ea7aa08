"""What analysts and their tools rely on in the tables: pycytominer, pandas, DuckDB, pyarrow.

Each test reads the output with the tool itself, as a user would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pycytominer
import pytest
from pycytominer.cyto_utils import infer_cp_features
from skimage.measure import regionprops

from hcsseg.config import ProcessConfig
from hcsseg.demo import synthetic_field, synthetic_plate
from hcsseg.errors import HcssegError
from hcsseg.export.tables import file_metadata
from hcsseg.io.tiff_import import plate_from_arrays
from hcsseg.measure.features import CQC_COLUMNS, measure_objects
from hcsseg.pipeline.orchestration import PlateStatus, status_path, write_status
from hcsseg.pipeline.plan import plan_pipeline
from hcsseg.pipeline.wells import (
    PlatePlan,
    absolute_url,
    finalize_plate,
    plan_plate,
    plate_lock,
    process_well,
    well_is_done,
)

REPO = Path(__file__).resolve().parents[1]
TABLE_KINDS = {"cells", "image_qc", "markers", "virtual_stain_qc", "well_qc", "quality_gate"}


def _process(url: str, config: ProcessConfig | None = None) -> PlatePlan:
    config = config or ProcessConfig()
    plan = plan_plate(url, config)
    with plate_lock(plan):
        for well in plan.wells:
            process_well(plan, well, config)
        finalize_plate(plan)
    return plan


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> PlatePlan:
    """A small synthetic plate run through the per-well pipeline (no Prefect needed)."""
    root = tmp_path_factory.mktemp("contract")
    plate = synthetic_plate(
        root / "plate.zarr", wells=("B02", "B03"), fields_per_well=2, shape=(256, 256), seed=4
    )
    return _process(plate.url)


# ---------------------------------------------------------------- item 5: pycytominer


def test_pycytominer_features_exclude_locations_and_constants(processed: PlatePlan) -> None:
    cells = pd.read_parquet(Path(processed.output_root) / "cells")
    features = infer_cp_features(cells)
    assert features and all(c.split("_")[0] in ("Nuclei", "Cells", "Cytoplasm") for c in features)
    assert not [c for c in features if "Location" in c or "EulerNumber" in c]
    for compartment in ("Nuclei", "Cells", "Cytoplasm"):
        for axis in "XY":
            assert f"Metadata_{compartment}_Location_Center_{axis}" in cells.columns
    profiles = pycytominer.aggregate(cells, strata=["Metadata_Plate", "Metadata_Well"])
    assert not [c for c in profiles.columns if "Location" in c or "_cqc_" in c]
    for flag in CQC_COLUMNS:
        assert cells[flag].dtype == bool, flag
    normalized = pycytominer.normalize(cells, drop_cosmicqc_rows=True)
    assert len(normalized) == (~cells[list(CQC_COLUMNS)].any(axis=1)).sum() > 0


def test_cqc_flags_mark_exactly_the_faulty_objects() -> None:
    nuclei = np.zeros((80, 80), np.uint16)
    yy, xx = np.mgrid[:80, :80]
    for k, (y, x) in enumerate([(20, 20), (20, 50), (50, 20), (50, 50)], start=1):
        nuclei[(yy - y) ** 2 + (xx - x) ** 2 <= 5**2] = k  # typical: 11 px across
    nuclei[0:6, 30:40] = 5  # touches the top edge
    nuclei[70, 8] = 6  # debris
    nuclei[55:80, 55:80] = 7  # a clump, touching two edges
    nuclei[34:41, 34:41] = 8
    nuclei[37, 37] = 0  # a nucleus with a hole
    image = np.full(nuclei.shape, 1000, np.uint16)
    image[20, 50] = np.iinfo(np.uint16).max  # one saturated pixel in nucleus 2
    frame = measure_objects(nuclei, None, {"DNA": image}, typical_diameter_px=11.0)
    flagged = {
        flag.removeprefix("Metadata_cqc_"): set(frame.Metadata_ObjectNumber[frame[flag]])
        for flag in CQC_COLUMNS
    }
    assert flagged == {
        "touches_border": {5, 7},
        "too_small": {6},
        "too_large": {7},
        "saturated": {2},
        "nucleus_not_simply_connected": {8},
    }
    frame["Metadata_Plate"] = "P1"
    kept = pycytominer.normalize(frame, drop_cosmicqc_rows=True)
    assert len(kept) == 3  # nuclei 1, 3 and 4 pass


def test_compactness_is_cellprofilers() -> None:
    """CellProfiler 4 MeasureObjectSizeShape: perimeter ** 2 / (4 pi area)."""
    labels = np.zeros((60, 90), np.uint16)
    yy, xx = np.mgrid[:60, :90]
    labels[(yy - 20) ** 2 + (xx - 20) ** 2 <= 10**2] = 1
    labels[45:50, 10:50] = 2
    labels[5:35, 55:85] = 3
    labels[10:30, 60:80] = 0  # a square ring
    frame = measure_objects(labels, None, {}).set_index("Metadata_ObjectNumber")
    for p in regionprops(labels):
        expected = p.perimeter**2 / (4 * np.pi * p.area)
        assert frame.loc[p.label, "Nuclei_AreaShape_Compactness"] == pytest.approx(expected)


# ---------------------------------------------------------------- item 6: clean dataset root


def test_tables_root_holds_only_parquet_datasets(processed: PlatePlan) -> None:
    root = Path(processed.output_root)
    config = ProcessConfig()
    write_status(
        status_path(processed.plate_url, processed.plate_name, config),
        PlateStatus(state="completed", plate_url=processed.plate_url, attempts=1),
    )
    visible = {p.name for p in root.iterdir() if not p.name.startswith(".")}
    assert visible <= TABLE_KINDS and {"cells", "image_qc", "well_qc"} <= visible
    for kind in visible:
        others = [p for p in (root / kind).rglob("*") if p.is_file() and p.suffix != ".parquet"]
        assert not others, others
    bookkeeping = root / ".hcsseg"
    assert sorted(p.name for p in (bookkeeping / "done" / "demo-synthetic").iterdir()) == [
        "B02.json",
        "B03.json",
    ]
    assert (bookkeeping / "runs" / "demo-synthetic.json").is_file()
    assert all(well_is_done(processed, w) for w in processed.wells)

    cells = pd.read_parquet(root / "cells")
    files = sorted((root / "cells").rglob("*.parquet"))
    assert len(files) == 2 and len(cells) > 0
    ((n,),) = duckdb.sql(f"select count(*) from '{root}/cells/**/*.parquet'").fetchall()
    assert n == len(cells)
    dataset = ds.dataset(root / "cells", format="parquet")
    assert dataset.to_table().num_rows == len(cells)
    assert all(pq.read_schema(f).equals(dataset.schema, check_metadata=False) for f in files)


def test_an_empty_well_keeps_the_datasets_schema(tmp_path: Path) -> None:
    """A well without cells (a control, a dry well) must not give a file of another schema."""
    plate = plate_from_arrays(
        tmp_path / "e.zarr",
        name="empty-well",
        fields=[
            (("B", 2), np.zeros((2, 128, 128), np.uint16)),
            (("B", 3), synthetic_field(np.random.default_rng(0), (128, 128), n_cells=8)),
        ],
        channels=["DNA", "Cytoplasm"],
        pixel_size_um=0.65,
    )
    cells_dir = Path(_process(plate.url).output_root) / "cells"
    files = sorted(cells_dir.rglob("*.parquet"))
    assert [pq.read_metadata(f).num_rows == 0 for f in files] == [True, False]
    dataset = ds.dataset(cells_dir, format="parquet")
    assert all(pq.read_schema(f).equals(dataset.schema, check_metadata=False) for f in files)
    assert dataset.to_table().num_rows == len(pd.read_parquet(cells_dir)) > 0


# ---------------------------------------------------------------- item 7: absolute paths


def test_paths_are_absolute_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    work = tmp_path / "work"
    synthetic_plate(work / "rel.zarr", wells=("B02",), fields_per_well=1, shape=(128, 128))
    monkeypatch.chdir(work)
    plan = _process("rel.zarr", ProcessConfig(output="tables"))
    work = work.resolve()
    assert plan.plate_url == str(work / "rel.zarr")
    assert plan.output_root == str(work / "tables")
    assert Path(plan.model_store or "").is_absolute()
    pipeline = plan_pipeline("rel.zarr", ProcessConfig())
    assert pipeline.plate_url == str(work / "rel.zarr")
    assert pipeline.output_root == str(work / "rel_tables")
    assert Path(pipeline.model_store).is_absolute()

    monkeypatch.chdir(tmp_path)  # a reader somewhere else
    cell_file = next((work / "tables" / "cells").rglob("*.parquet"))
    rows = pd.read_parquet(cell_file)
    for path in set(rows.Metadata_ImagePath):
        assert Path(path).is_absolute() and (Path(path) / "zarr.json").is_file(), path
    assert file_metadata(cell_file)["plate_url"] == str(work / "rel.zarr")
    assert absolute_url("s3://bucket/plate.zarr") == "s3://bucket/plate.zarr"


# ---------------------------------------------------------------- item 12: portable lock

HOLDER = """
import json, sys, time
from hcsseg.pipeline.wells import PlatePlan, plate_lock
with plate_lock(PlatePlan(**json.loads(sys.argv[1]))):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_lock_refuses_a_second_process_and_dies_with_its_holder(tmp_path: Path) -> None:
    plan = PlatePlan(
        plate_url=str(tmp_path / "p.zarr"),
        plate_name="P1",
        wells=["B02"],
        nucleus_channel="DNA",
        cell_channel=None,
        measure_channels=["DNA"],
        output_root=str(tmp_path / "tables"),
        n_fields=1,
        config_hash="x",
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, json.dumps(dataclasses.asdict(plan))],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        start = time.monotonic()
        refusal = pytest.raises(HcssegError, match="being processed by another run")
        with refusal as refused, plate_lock(plan):
            pass
        assert time.monotonic() - start < 5  # refused at once, not after a wait
        assert f"pid {holder.pid} on {socket.gethostname()}" in str(refused.value)
        assert (tmp_path / "tables" / ".hcsseg" / "locks").is_dir()
    finally:
        holder.send_signal(signal.SIGKILL)  # no cleanup: the OS must drop the lock
        holder.wait()
    with plate_lock(plan):
        holder_file = tmp_path / "tables" / ".hcsseg" / "locks" / "P1.holder"
        assert holder_file.read_text().startswith(f"pid {os.getpid()} ")
    assert not holder_file.exists()
