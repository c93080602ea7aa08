"""Issue 14, items 1-3: nothing stale, nothing half-done, one writer per plate.

Each test reproduces a fault found in the integrity trial: results reported from a plate
that had been replaced, a killed import read as a whole plate, two writers on one plate.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flows.virtual_stain import virtual_stain_plate
from hcsseg.config import ProcessConfig
from hcsseg.demo import synthetic_field, synthetic_plate
from hcsseg.errors import HcssegError, PlateFormatError
from hcsseg.export.ngio_tables import field_table_path
from hcsseg.io.labels import write_labels
from hcsseg.io.plate import open_plate
from hcsseg.io.plate_lock import lock_paths, plate_write_lock
from hcsseg.io.tiff_import import plate_from_arrays
from hcsseg.pipeline.wells import (
    forget_vanished_wells,
    plan_plate,
    plate_lock,
    process_well,
    well_is_done,
)
from hcsseg.virtual_stain.options import VirtualStainOptions
from hcsseg.virtual_stain.plate import VirtualStainConfig
from tests.conftest import REPO, dataset

ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _processed(url: Path, output: Path, **plate_kwargs) -> tuple:
    synthetic_plate(url, fields_per_well=1, shape=(160, 160), **plate_kwargs)
    plan = plan_plate(str(url), ProcessConfig(output=str(output)))
    with plate_lock(plan):
        for well in plan.wells:
            process_well(plan, well, ProcessConfig(output=str(output)))
    return plan


# ------------------------------------------------------------- 1: stale done markers


def test_a_replaced_plate_is_redone_not_reported_from_old_tables(tmp_path: Path) -> None:
    url, out = tmp_path / "p.zarr", tmp_path / "tables"
    plan = _processed(url, out, wells=("B02", "B03"))
    assert all(well_is_done(plan, w) for w in plan.wells)

    # the same path now holds another plate: one well, other images, no labels
    field = synthetic_field(np.random.default_rng(99), (160, 160), n_cells=5)
    plate_from_arrays(
        url,
        name=plan.plate_name,
        fields=[(("B", 2), field)],
        channels=open_plate(url).channel_names(next(open_plate(url).iter_fields())),
        pixel_size_um=0.65,
        overwrite=True,
    )
    new = plan_plate(str(url), ProcessConfig(output=str(out)))
    assert new.config_hash == plan.config_hash  # same options: only the content changed
    assert not well_is_done(new, "B02")
    assert forget_vanished_wells(new, open_plate(url)) == ["B03"]
    assert not list(out.rglob("B03.parquet")) and not list(out.rglob("B03.json"))


def test_overwritten_labels_make_the_well_redone(tmp_path: Path) -> None:
    plan = _processed(tmp_path / "p.zarr", tmp_path / "tables", wells=("B02",))
    plate = open_plate(plan.plate_url, mode="r+")
    ref = plate.fields("B02")[0]
    assert well_is_done(plan, "B02", plate)
    write_labels(plate, ref, "cells", np.zeros(plate.field_shape(ref), np.uint32))
    assert not well_is_done(plan, "B02", plate)


def test_a_well_without_its_field_tables_is_redone(tmp_path: Path) -> None:
    """ngio/Fractal read each field's table in the plate: a well whose run died before
    writing them (or whose tables were deleted) is not done."""
    plan = _processed(tmp_path / "p.zarr", tmp_path / "tables", wells=("B02",))
    ref = open_plate(plan.plate_url).fields("B02")[0]
    table = field_table_path(plan.plate_url, ref)
    assert table.is_file() and well_is_done(plan, "B02")
    table.unlink()
    assert not well_is_done(plan, "B02")


def test_done_markers_do_not_depend_on_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    plan = _processed(Path("p.zarr"), Path("tables"), wells=("B02",))
    marker = json.loads(
        next((tmp_path / "tables" / ".hcsseg" / "done").rglob("*.json")).read_text()
    )
    assert all(not Path(t).is_absolute() for t in marker["tables"])
    monkeypatch.chdir(tmp_path / "tables")
    assert well_is_done(plan, "B02")


# ------------------------------------------------------------- 2: killed imports

KILLED_IMPORT_FIELDS = 6


def test_a_killed_import_leaves_no_plate_and_the_rerun_completes(
    shared_data: Path, tmp_path: Path
) -> None:
    folder = dataset(shared_data, "hcs-sbs-transfluor")
    out = tmp_path / "sbs.zarr"
    cmd = [sys.executable, "-m", "hcsseg.cli", "import", str(folder), str(out), "-c", "2=GFP"]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        staged: list[Path] = []
        while time.monotonic() < deadline and proc.poll() is None:
            staged = list(tmp_path.glob("sbs.zarr.tmp-*"))
            written = list(staged[0].rglob("c/0/0/0")) if staged else []
            if len(written) >= KILLED_IMPORT_FIELDS:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "import finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert staged and not out.exists()  # nothing looks like a plate at the final path
    with pytest.raises(PlateFormatError, match="unfinished copy of plate sbs.zarr"):
        open_plate(staged[0])
    info = subprocess.run(
        [sys.executable, "-m", "hcsseg.cli", "info", str(staged[0])],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert info.returncode == 2 and "run the import again" in info.stderr
    assert len(info.stderr.strip().splitlines()) == 1

    rerun = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert sum(1 for _ in open_plate(out).iter_fields()) == 72
    assert not list(tmp_path.glob("sbs.zarr.*-*"))  # the leftover copy was cleaned up


def test_a_swap_cut_between_its_renames_restores_the_old_plate(tmp_path: Path) -> None:
    url = tmp_path / "p.zarr"
    synthetic_plate(url, wells=("B02",), fields_per_well=1, shape=(64, 64))
    os.replace(url, tmp_path / "p.zarr.old-0123abcd")  # killed after the first rename
    plate_from_arrays(
        tmp_path / "q.zarr",
        name="q",
        fields=[(("B", 2), np.zeros((1, 8, 8), np.uint8))],
        channels=["DNA"],
        pixel_size_um=1.0,
    )
    with pytest.raises(HcssegError, match="already exists"):  # the old plate is back first
        plate_from_arrays(
            url,
            name="new",
            fields=[(("B", 2), np.zeros((1, 8, 8), np.uint8))],
            channels=["DNA"],
            pixel_size_um=1.0,
        )
    assert open_plate(url).wells() == ["B02"]


# ------------------------------------------------------------- 3: one writer per plate

HOLDER = """
import sys, time
from hcsseg.io.plate_lock import plate_write_lock
with plate_write_lock(sys.argv[1], "holder"):
    print("locked", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def held_plate(tmp_path: Path):
    url = tmp_path / "p.zarr"
    synthetic_plate(url, wells=("B02",), fields_per_well=1, shape=(96, 96))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(url)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    yield url, holder
    holder.send_signal(signal.SIGKILL)
    holder.wait()


def test_every_writer_is_refused_while_another_holds_the_plate(held_plate, tmp_path) -> None:
    url, holder = held_plate
    busy = f"being processed by another run \\(holder, pid {holder.pid} "
    # process with a different tables folder than the holder's still meets the plate's lock
    plan = plan_plate(str(url), ProcessConfig(output=str(tmp_path / "elsewhere")))
    with pytest.raises(HcssegError, match=busy), plate_lock(plan):
        pass
    with pytest.raises(HcssegError, match=busy):
        virtual_stain_plate.fn(
            str(url),
            VirtualStainConfig(
                model=VirtualStainOptions(source_channels=["Cyto"], target_channel="DNA")
            ),
        )
    with pytest.raises(HcssegError, match=busy):
        plate_from_arrays(
            url,
            name="x",
            fields=[(("B", 2), np.zeros((1, 8, 8), np.uint8))],
            channels=["DNA"],
            pixel_size_um=1.0,
            overwrite=True,
        )
    assert open_plate(url).wells() == ["B02"]  # nothing was written
    assert not list(tmp_path.glob("p.zarr.*-*"))


def test_the_lock_is_reentrant_in_one_process_and_dies_with_its_holder(tmp_path: Path) -> None:
    url = tmp_path / "p.zarr"
    with plate_write_lock(url, "pipeline"), plate_write_lock(url, "process"):
        assert lock_paths(url)[1].read_text().startswith("pipeline, pid ")
    assert not lock_paths(url)[1].exists()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(url)], stdout=subprocess.PIPE, text=True, env=ENV
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with plate_write_lock(url, "process"):  # a killed holder never blocks the next run
        pass


# ------------------------------------------------------------- 9: the server and the docs


def test_docs_never_open_the_server_to_the_network_without_authentication() -> None:
    docs = [*(REPO / "docs").rglob("*.md"), REPO / "README.md", *(REPO / "infra").rglob("*")]
    for path in (p for p in docs if p.is_file()):
        lines = path.read_text(errors="replace").splitlines()
        for i, line in enumerate(lines):
            if "--host 0.0.0.0" in line and not line.startswith("Never"):
                around = " ".join(lines[max(0, i - 2) : i + 2])
                assert "AUTH_STRING" in around, f"{path}:{i + 1}: {line.strip()}"
            if "4200:4200" in line and line.strip().startswith('- "'):  # compose ports
                assert "127.0.0.1:4200:4200" in line, f"{path}:{i + 1}: {line.strip()}"
    ops = (REPO / "docs" / "operations.md").read_text()
    safe = ops[ops.index("## What is safe") :]
    for topic in ("lock the plate", "re-run redoes", "killed import"):
        assert topic in safe, topic
