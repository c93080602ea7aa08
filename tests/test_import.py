"""TIFF import on the real example sets in ../shared/data."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import zarr
from ome_zarr_models.v05.hcs import HCS

from hcsseg.errors import ImportPatternError
from hcsseg.io.tiff_import import (
    ImportOptions,
    PairImportOptions,
    import_tiff_folder,
    import_tiff_pairs,
)
from tests.conftest import dataset


def test_transfluor_screen(shared_data, tmp_path):
    src = dataset(shared_data, "hcs-sbs-transfluor")
    plate = import_tiff_folder(
        src,
        tmp_path / "tf.zarr",
        options=ImportOptions(channel_names={"2": "GFP"}, pixel_size_um=0.7),
    )
    assert plate.name == "AS_09047_050428030001"
    assert plate.wells() == [f"O{c:02d}" for c in range(1, 25)]
    refs = list(plate.iter_fields())
    assert len(refs) == 72 and {r.site for r in refs} == {0, 1, 2}
    assert len(plate.rows) == 16 and len(plate.columns) == 24  # a 384-well plate
    ref = plate.fields("O07")[2]
    original = tifffile.imread(src / "AS_09047_050428030001_O07f02d2.TIF")
    np.testing.assert_array_equal(plate.read_channels(ref, ["GFP"])[0], original)
    HCS.from_zarr(zarr.open_group(plate.url, mode="r"))


def test_cellprofiler_human_channels(shared_data, tmp_path):
    src = dataset(shared_data, "cellprofiler-human")
    plate = import_tiff_folder(
        src,
        tmp_path / "h.zarr",
        options=ImportOptions(channel_names={"0": "DNA", "1": "PH3", "2": "Cells"}, version="0.4"),
    )
    ref = plate.fields("D03")[0]
    assert plate.version == "0.4"
    assert plate.channel_names(ref) == ["DNA", "PH3", "Cells"]
    dna = tifffile.imread(src / "AS_09125_050116030001_D03f00d0.tif")
    np.testing.assert_array_equal(plate.read_channels(ref, ["DNA"])[0], dna)


def test_pairs_keep_ground_truth(shared_data, tmp_path):
    src = dataset(shared_data, "nuclei-dsb2018")
    plate = import_tiff_pairs(src, tmp_path / "dsb.zarr", options=PairImportOptions(limit=14))
    assert len(plate.wells()) == 14 and plate.wells()[12] == "B01"
    stem = sorted(p.name for p in src.glob("*_img.tif"))[3][: -len("_img.tif")]
    ref = plate.fields(plate.wells()[3])[0]
    assert plate.label_names(ref) == ["nuclei_gt"]
    truth = tifffile.imread(src / f"{stem}_lab.tif")
    np.testing.assert_array_equal(plate.read_labels(ref, "nuclei_gt"), truth)
    assert plate.read_labels(ref, "nuclei_gt").dtype == np.uint32


def test_pattern_matching_nothing_is_clear(shared_data, tmp_path):
    src = dataset(shared_data, "cellprofiler-human")
    with pytest.raises(ImportPatternError, match="matched none of the 3 files"):
        import_tiff_folder(src, tmp_path / "x.zarr", options=ImportOptions(pattern=r"(?P<well>zz)"))
    assert not (tmp_path / "x.zarr").exists()
    with pytest.raises(ImportPatternError, match="tokens found"):
        import_tiff_folder(
            src, tmp_path / "y.zarr", options=ImportOptions(channel_names={"7": "DNA"})
        )
    assert not (tmp_path / "y.zarr").exists()


def test_bad_pattern_rejected():
    with pytest.raises(ValueError, match="named group 'well'"):
        ImportOptions(pattern=r"(?P<site>\d+)")


def test_empty_folder(tmp_path):
    with pytest.raises(ImportPatternError, match="no '\\*_img.tif'"):
        import_tiff_pairs(tmp_path, tmp_path / "p.zarr", options=PairImportOptions())
