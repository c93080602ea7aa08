"""Kill a plate run half-way for real, re-run it, and compare with an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hcsseg.demo import synthetic_plate
from hcsseg.export.tables import read_table
from hcsseg.io.plate import open_plate

WELLS = ("B02", "B03", "B04", "B05", "C02", "C03", "C04", "C05")


def _run(plate: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hcsseg.cli", "process", str(plate), "--workers", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _sorted_cells(root: Path) -> pd.DataFrame:
    cells = read_table(root, "cells").drop(columns=["Metadata_ImagePath"])
    keys = ["Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber"]
    return cells.sort_values(keys).reset_index(drop=True)


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    killed = tmp_path / "killed" / "plate.zarr"
    synthetic_plate(killed, wells=WELLS, fields_per_well=2, shape=(512, 512), seed=3)
    reference = tmp_path / "reference" / "plate.zarr"
    shutil.copytree(killed, reference)

    done_dir = killed.parent / "plate_tables" / ".hcsseg" / "done"
    proc = _run(killed, env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if done_dir.exists() and len(list(done_dir.rglob("*.json"))) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the worker dies mid-plate, no cleanup
    proc.wait()
    finished = len(list(done_dir.rglob("*.json")))
    assert 0 < finished < len(WELLS), f"kill came too late or too early ({finished} wells done)"

    rerun = _run(killed, env)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out.decode()[-2000:]
    assert f"{len(WELLS) - finished} wells processed, {finished} already done" in out.decode()

    ref = _run(reference, env)
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out.decode()[-2000:]

    a = _sorted_cells(killed.parent / "plate_tables")
    b = _sorted_cells(reference.parent / "plate_tables")
    assert len(a) == len(b) > 0
    assert not a.duplicated(["Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber"]).any()
    pd.testing.assert_frame_equal(a, b)
    plate_a, plate_b = open_plate(killed), open_plate(reference)
    for ref_a, ref_b in zip(plate_a.iter_fields(), plate_b.iter_fields(), strict=True):
        for name in ("nuclei", "cells"):
            np.testing.assert_array_equal(
                plate_a.read_labels(ref_a, name), plate_b.read_labels(ref_b, name)
            )
        labels_dir = killed / ref_a.path / "labels"
        assert not [p for p in labels_dir.iterdir() if p.name.startswith(".tmp")]
