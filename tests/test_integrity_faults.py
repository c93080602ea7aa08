"""Issue 14, item 7: faults are one line naming the plate/well/field/channel, exit 2, and
leave what was written intact. Full and read-only disks are real tmpfs mounts (skipped
where the test may not mount)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from hcsseg.demo import synthetic_plate
from hcsseg.errors import PlateFormatError
from hcsseg.io.labels import write_labels
from hcsseg.io.plate import open_plate
from tests.test_integrity_plate import ENV


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hcsseg.cli", *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "mnt"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def remount(mount: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)


def test_read_only_plate_is_refused_in_seconds_and_untouched(tmp_path: Path, tmpfs: Path) -> None:
    synthetic_plate(tmpfs / "p.zarr", wells=("B02",), fields_per_well=1, shape=(96, 96))
    remount(tmpfs, "ro")
    start = time.monotonic()
    line = one_error_line(cli("process", str(tmpfs / "p.zarr"), "--output", str(tmp_path / "t")))
    assert time.monotonic() - start < 60  # before Prefect's server starts
    assert "plate demo-synthetic" in line and "Read-only file system" in line
    assert not (tmp_path / "t").exists()


def test_read_only_tables_folder_is_refused_before_labels_are_written(
    tmp_path: Path, tmpfs: Path
) -> None:
    plate = synthetic_plate(tmp_path / "p.zarr", wells=("B02",), fields_per_well=1)
    remount(tmpfs, "ro")
    line = one_error_line(cli("process", plate.url, "--output", str(tmpfs / "tables")))
    assert "tables folder" in line and "Read-only file system" in line
    assert open_plate(plate.url).label_names(next(plate.iter_fields())) == []


def test_a_disk_that_fills_mid_run_is_one_line_and_the_rerun_finishes(
    tmp_path: Path, tmpfs: Path
) -> None:
    plate = synthetic_plate(tmp_path / "p.zarr", wells=("B02", "B03", "C02"), fields_per_well=2)
    remount(tmpfs, "size=96k")  # room for the probe and a table or two, not for the run
    out = tmpfs / "tables"
    line = one_error_line(cli("process", plate.url, "--output", str(out)))
    assert "No space left on device" in line and "cannot write table" in line, line
    assert not list(out.rglob("*.tmp"))  # no half-written table
    for marker in (out / ".hcsseg" / "done").rglob("*.json"):  # a well marked done is whole
        assert all((out / t).is_file() for t in json.loads(marker.read_text())["tables"])

    remount(tmpfs, "size=8m")
    again = cli("process", plate.url, "--output", str(out))
    assert again.returncode == 0, again.stderr[-2000:]
    cells = pd.read_parquet(out / "cells")
    assert sorted(set(cells.Metadata_Well)) == ["B02", "B03", "C02"]
    assert not cells.duplicated(["Metadata_Well", "Metadata_Site", "Metadata_ObjectNumber"]).any()


def _plate_json(plate_url: str) -> tuple[Path, dict]:
    path = Path(plate_url) / "zarr.json"
    return path, json.loads(path.read_text())


def test_malformed_well_path_is_named(tmp_path: Path) -> None:
    plate = synthetic_plate(tmp_path / "p.zarr", wells=("B02", "B03"), fields_per_well=1)
    path, meta = _plate_json(plate.url)
    meta["attributes"]["ome"]["plate"]["wells"][1]["path"] = "B"
    path.write_text(json.dumps(meta))
    with pytest.raises(PlateFormatError, match="'path': 'B'.*ROW/COLUMN"):
        open_plate(plate.url)
    line = one_error_line(cli("info", plate.url))
    assert "ROW/COLUMN" in line


def test_missing_field_array_and_damaged_chunks_name_field_and_channel(tmp_path: Path) -> None:
    plate = synthetic_plate(tmp_path / "p.zarr", wells=("B02", "B03"), fields_per_well=1)
    shutil.rmtree(Path(plate.url) / "B" / "03" / "0" / "0")  # level 0 of B03's field
    line = one_error_line(cli("process", plate.url, "--output", str(tmp_path / "t")))
    assert "field B/03/0 (well B03)" in line and "'0'" in line and "missing" in line

    plate = synthetic_plate(tmp_path / "q.zarr", wells=("B02",), fields_per_well=1)
    chunk = next(
        p
        for p in (Path(plate.url) / "B" / "02" / "0" / "0").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    chunk.write_bytes(b"not a zstd frame" * 8)
    line = one_error_line(cli("process", plate.url, "--output", str(tmp_path / "u")))
    assert "field B/02/0 (well B02) channel 'DNA'" in line and "damaged" in line


def test_damaged_label_chunk_in_evaluate_is_named(tmp_path: Path) -> None:
    plate = synthetic_plate(tmp_path / "p.zarr", wells=("B02",), fields_per_well=1)
    rw = open_plate(plate.url, mode="r+")
    ref = next(rw.iter_fields())
    truth = np.zeros(rw.field_shape(ref), np.uint32)
    truth[10:30, 10:30] = 1
    write_labels(rw, ref, "nuclei_gt", truth)
    write_labels(rw, ref, "nuclei", truth, properties={"nuclei_method": "classical"})
    level0 = Path(plate.url) / "B" / "02" / "0" / "labels" / "nuclei_gt" / "0"
    chunk = next(p for p in level0.rglob("*") if p.is_file() and p.name != "zarr.json")
    chunk.write_bytes(b"\x00garbage" * 4)
    line = one_error_line(cli("evaluate", plate.url, "--output", str(tmp_path / "e")))
    assert "field B/02/0 (well B02) label image 'nuclei_gt'" in line and "damaged" in line
    assert not (tmp_path / "e").exists()
