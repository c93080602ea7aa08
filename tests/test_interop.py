"""Other tools open what hcsseg writes: iohub, ngio (Fractal), polars, the validators.

One processed plate per NGFF version (the real `process-plate` flow on Prefect's embedded
server), opened by each tool as its users would. A tool that is not installed skips its
test (`pip install -e ".[interop]"`, or `bash scripts/check_interop.sh`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import zarr

from flows.process_plate import process_plate
from hcsseg.demo import synthetic_plate
from hcsseg.export.ngio_tables import TABLE_NAME
from hcsseg.export.tables import read_table
from hcsseg.io.plate import open_plate

WELLS = ("B02", "C03")
FIELDS = 2
CHANNELS = ["DNA", "Cytoplasm"]


@pytest.fixture(scope="module", params=["0.4", "0.5"])
def processed(request, tmp_path_factory) -> tuple[str, str, pd.DataFrame]:
    """(plate url, NGFF version, per-cell table) of a small processed plate."""
    version = request.param
    root = tmp_path_factory.mktemp(f"ngff{version.replace('.', '')}")
    plate = synthetic_plate(
        root / "interop.zarr",
        wells=WELLS,
        fields_per_well=FIELDS,
        shape=(160, 160),
        version=version,
    )
    result = process_plate(plate.url)
    return plate.url, version, read_table(result["output"], "cells")


def _field_rows(cells: pd.DataFrame, well: str, site: int) -> pd.DataFrame:
    return cells[(cells.Metadata_Well == well) & (cells.Metadata_Site == site)]


def test_validators_accept_the_plate_with_its_tables(processed):
    """The `tables` groups beside `labels` do not trip the validators or napari's reader."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    url, version, _ = processed
    if version == "0.4":
        from ome_zarr_models.v04.hcs import HCS
        from ome_zarr_models.v04.image import Image
    else:
        from ome_zarr_models.v05.hcs import HCS
        from ome_zarr_models.v05.image import Image
    group = zarr.open_group(url, mode="r")
    HCS.from_zarr(group)
    Image.from_zarr(group["B/02/0"])
    nodes = list(Reader(parse_url(f"{url}/B/02/0"))())
    assert nodes and nodes[0].data, "ome_zarr.reader found no image"


# Run by each iohub found: iohub 0.3 needs Python 3.12 and iohub 0.2 zarr 2, neither of which
# fits beside this venv's pins, so scripts/check_interop.sh gives each its own venv and
# names their interpreters in $HCSSEG_IOHUB_PYTHON (os.pathsep-separated).
IOHUB_READER = """
import json, sys
from importlib.metadata import version
from iohub import open_ome_zarr
out = {"iohub": version("iohub"), "zarr": version("zarr"), "positions": {}}
with open_ome_zarr(sys.argv[1], mode="r") as plate:
    out["channels"] = plate.channel_names
    for name, pos in plate.positions():
        labels = pos.zgroup["labels"] if "labels" in pos.zgroup else None
        out["positions"][name] = {
            "channels": pos.channel_names,
            "shape": list(pos.data.shape),
            "labels": sorted(labels.group_keys()) if labels is not None else [],
        }
print(json.dumps(out))
"""


def _iohub_pythons() -> list[str]:
    pythons = [p for p in os.environ.get("HCSSEG_IOHUB_PYTHON", "").split(os.pathsep) if p]
    if not pythons and importlib.util.find_spec("iohub") is not None:
        pythons = [sys.executable]
    if not pythons:
        pytest.skip("iohub not installed; bash scripts/check_interop.sh runs it in its own venv")
    return pythons


def test_iohub_lists_positions_channels_and_labels(processed):
    url, version, _ = processed
    fields = [ref.path for ref in open_plate(url).iter_fields()]
    checked = []
    for python in _iohub_pythons():
        zarr_version = subprocess.run(
            [python, "-c", "from importlib.metadata import version; print(version('zarr'))"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if version == "0.5" and zarr_version.startswith("2."):
            continue  # iohub 0.2 (zarr 2) cannot open a zarr v3 store at all
        done = subprocess.run(
            [python, "-c", IOHUB_READER, url], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]
        seen = json.loads(done.stdout.splitlines()[-1])
        assert sorted(seen["positions"]) == sorted(fields), seen
        assert seen["channels"] == CHANNELS
        for name, position in seen["positions"].items():
            assert position["channels"] == CHANNELS, name
            assert position["shape"][-2:] == [160, 160], name
            assert position["labels"] == ["cells", "nuclei"], name
        checked.append(seen["iohub"])
    if not checked:
        pytest.skip(f"no iohub here reads NGFF {version}")


def test_ngio_lists_and_reads_each_fields_cell_table(processed):
    ngio = pytest.importorskip("ngio")
    url, _, cells = processed
    plate = open_plate(url)
    for ref in plate.iter_fields():
        container = ngio.open_ome_zarr_container(f"{url}/{ref.path}", mode="r")
        assert TABLE_NAME in container.list_tables()
        assert set(container.list_labels()) >= {"nuclei", "cells"}
        table = container.get_table(TABLE_NAME)
        frame = table.dataframe
        expected = _field_rows(cells, ref.well, ref.site)
        assert len(frame) == len(expected) > 0, ref
        labels = frame.index if frame.index.name == "label" else frame["label"]
        assert sorted(labels) == sorted(expected.Metadata_ObjectNumber)


def test_polars_scans_the_parquet_dataset(processed):
    pl = pytest.importorskip("polars")
    url, _, cells = processed
    root = Path(url).with_name(Path(url).stem + "_tables")
    frame = pl.scan_parquet(f"{root}/cells/**/*.parquet").collect()
    assert frame.height == len(cells)
    assert set(frame["Metadata_Well"].unique()) == set(WELLS)
