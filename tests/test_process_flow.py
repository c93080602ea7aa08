"""The process-plate flow end to end on Prefect's embedded server."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import zarr
from ome_zarr_models.v05.hcs import HCS
from ome_zarr_models.v05.image_label import ImageLabel

from flows.process_plate import process_plate
from hcsseg.config import ProcessConfig
from hcsseg.demo import synthetic_plate
from hcsseg.errors import ChannelNotFoundError, HcssegError, InputDataError
from hcsseg.export.tables import file_metadata, read_table
from hcsseg.io.plate import open_plate
from hcsseg.io.plate_writer import ChannelSpec, append_channel
from hcsseg.io.tiff_import import ImportOptions, import_tiff_folder, plate_from_arrays
from hcsseg.pipeline.wells import plan_plate, plate_lock, process_well
from tests.conftest import dataset


@pytest.fixture
def small_plate(tmp_path):
    return synthetic_plate(
        tmp_path / "small.zarr", wells=("B02", "B03", "C02"), fields_per_well=2, shape=(256, 256)
    )


def test_flow_writes_labels_features_and_qc(small_plate):
    result = process_plate(small_plate.url)
    plate = open_plate(small_plate.url)
    for ref in plate.iter_fields():
        assert plate.label_names(ref) == ["nuclei", "cells"]
        nuclei = plate.read_labels(ref, "nuclei")
        cells = plate.read_labels(ref, "cells")
        assert nuclei.dtype == np.uint32 and nuclei.max() > 10
        # Every nucleus lies inside the cell with the same id.
        inside = nuclei > 0
        assert (cells[inside] == nuclei[inside]).all()
    group = zarr.open_group(small_plate.url, mode="r")
    HCS.from_zarr(group)
    ImageLabel.from_zarr(group["B/02/0/labels/cells"])

    root = result["output"]
    cells_df = read_table(root, "cells")
    assert result["cells"] == len(cells_df) > 0
    assert set(cells_df["Metadata_Well"]) == {"B02", "B03", "C02"}
    assert set(cells_df["Metadata_Site"]) == {0, 1}
    for col in (
        "Metadata_ObjectNumber",
        "Metadata_Cells_Parent_Nuclei",
        "Nuclei_AreaShape_Area",
        "Metadata_Nuclei_Location_Center_X",
        "Cells_Intensity_MeanIntensity_DNA",
        "Cytoplasm_Intensity_MeanIntensity_Cytoplasm",
    ):
        assert col in cells_df.columns, col
    # ObjectNumber is the pixel value in labels/nuclei.
    row = cells_df[(cells_df.Metadata_Well == "B03") & (cells_df.Metadata_Site == 1)].iloc[0]
    nuclei = plate.read_labels(plate.fields("B03")[1], "nuclei")
    area = int((nuclei == row.Metadata_ObjectNumber).sum())
    assert row.Nuclei_AreaShape_Area == pytest.approx(area)

    qc = read_table(root, "image_qc")
    assert len(qc) == 6
    for col in (
        "Image_Count_Nuclei",
        "Image_ImageQuality_FocusScore_DNA",
        "Image_ImageQuality_PowerLogLogSlope_DNA",
        "Image_ImageQuality_PercentMaximal_DNA",
    ):
        assert col in qc.columns
    wells = pd.read_parquet(f"{root}/well_qc/demo-synthetic.parquet")
    assert list(wells.Metadata_Well) == ["B02", "B03", "C02"]
    assert wells.Image_Count_Nuclei.sum() == qc.Image_Count_Nuclei.sum()

    meta = file_metadata(next(Path(root, "cells").rglob("B02.parquet")))
    assert meta["producer"] == "hcsseg" and "B/02/0/labels/nuclei" in meta["source_labels"]

    # Downstream tools read the dataset as-is.
    pycytominer = pytest.importorskip("pycytominer")
    profiles = pycytominer.aggregate(
        cells_df, strata=["Metadata_Plate", "Metadata_Well"], features="infer"
    )
    assert len(profiles) == 3
    n = duckdb.sql(f"select count(*) from read_parquet('{root}/cells/**/*.parquet')").fetchall()[0]
    assert n[0] == len(cells_df)


def test_rerun_replaces_rows(small_plate):
    first = process_plate(small_plate.url)
    n_first = len(read_table(first["output"], "cells"))
    again = process_plate(small_plate.url)
    assert again["skipped"] == 3 and again["wells"] == 0
    forced = process_plate(small_plate.url, force=True)
    assert forced["wells"] == 3
    assert len(read_table(forced["output"], "cells")) == n_first


def test_unknown_channel_writes_nothing(small_plate, tmp_path):
    out = tmp_path / "tables"
    with pytest.raises(ChannelNotFoundError, match="'DNA', 'Cytoplasm'"):
        process_plate(small_plate.url, ProcessConfig(nucleus_channel="DAPI", output=str(out)))
    assert not out.exists()
    plate = open_plate(small_plate.url)
    assert all(plate.label_names(r) == [] for r in plate.iter_fields())


def test_nan_field_is_named(tmp_path):
    plate = synthetic_plate(
        tmp_path / "f.zarr", wells=("B02",), fields_per_well=1, shape=(128, 128)
    )
    data = np.ones((2, 128, 128), np.float32)
    data[0, 5, 5] = np.nan
    bad = plate_from_arrays(
        tmp_path / "nan.zarr",
        name="nanplate",
        fields=[(("B", 2), data)],
        channels=["DNA", "Cytoplasm"],
        pixel_size_um=1.0,
    )
    plan = plan_plate(bad.url, ProcessConfig())
    with pytest.raises(InputDataError, match="plate nanplate well B02 field 0 channel 'DNA'"):
        process_well(plan, "B02", ProcessConfig())
    assert not list(tmp_path.rglob("*.parquet"))
    assert plate.wells() == ["B02"]


def test_empty_field_gives_empty_result(tmp_path):
    zeros = np.zeros((2, 128, 128), np.uint16)
    plate = plate_from_arrays(
        tmp_path / "z.zarr",
        name="zeros",
        fields=[(("C", 5), zeros)],
        channels=["DNA", "Cytoplasm"],
        pixel_size_um=1.0,
    )
    plan = plan_plate(plate.url, ProcessConfig())
    result = process_well(plan, "C05", ProcessConfig())
    assert result.n_cells == 0
    cells = read_table(plan.output_root, "cells")
    assert cells.empty or len(cells) == 0
    qc = read_table(plan.output_root, "image_qc")
    assert int(qc.Image_Count_Nuclei.iloc[0]) == 0


def test_concurrent_run_refused(small_plate):
    plan = plan_plate(small_plate.url, ProcessConfig())
    with plate_lock(plan), pytest.raises(HcssegError, match="being processed by another run"):
        process_plate(small_plate.url)


def test_virtual_channel_marks_provenance(small_plate):
    plate = open_plate(small_plate.url, mode="r+")
    for ref in plate.iter_fields():
        dna = plate.read_channels(ref, ["DNA"])[0]
        append_channel(plate, ref, ChannelSpec("DAPI_virtual"), dna)
    result = process_plate(
        small_plate.url, ProcessConfig(nucleus_channel="DAPI_virtual", wells=["B02"])
    )
    cells = read_table(result["output"], "cells")
    assert set(cells.Metadata_NucleusChannelSource) == {"virtual"}
    assert "Nuclei_Intensity_MeanIntensity_DAPIvirtual" in cells.columns


def test_cellprofiler_human_counts(shared_data, tmp_path):
    src = dataset(shared_data, "cellprofiler-human")
    plate = import_tiff_folder(
        src,
        tmp_path / "h.zarr",
        options=ImportOptions(
            channel_names={"0": "DNA", "1": "PH3", "2": "Cells"}, pixel_size_um=0.65
        ),
    )
    result = process_plate(plate.url)
    qc = read_table(result["output"], "image_qc")
    n_nuclei = int(qc.Image_Count_Nuclei.iloc[0])
    # CellProfiler's ExampleHuman pipeline finds roughly 250-300 nuclei in this field.
    assert 200 <= n_nuclei <= 400, n_nuclei
    assert int(qc.Image_Count_Cells.iloc[0]) == n_nuclei
