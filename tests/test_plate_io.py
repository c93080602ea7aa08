"""Plate I/O: what we write validates (ome-zarr-models) and opens in ome_zarr.reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from ome_zarr_models.v04.hcs import HCS as HCS04
from ome_zarr_models.v04.image_label import ImageLabel as ImageLabel04
from ome_zarr_models.v05.hcs import HCS as HCS05
from ome_zarr_models.v05.image_label import ImageLabel as ImageLabel05

from hcsseg.demo import synthetic_plate
from hcsseg.errors import ChannelNotFoundError, HcssegError, PlateFormatError
from hcsseg.io.labels import write_labels
from hcsseg.io.plate import open_plate, parse_well, well_name
from hcsseg.io.plate_writer import ChannelSpec, append_channel, plate_layout, pyramid_levels

MODELS = {"0.5": (HCS05, ImageLabel05), "0.4": (HCS04, ImageLabel04)}


@pytest.fixture(params=["0.5", "0.4"])
def plate(request, tmp_path):
    return synthetic_plate(
        tmp_path / "p.zarr",
        wells=("B02", "C03"),
        fields_per_well=2,
        shape=(600, 560),
        version=request.param,
    )


def test_layout_and_reading(plate):
    assert plate.wells() == ["B02", "C03"]
    refs = list(plate.iter_fields())
    assert [r.site for r in refs] == [0, 1, 0, 1]
    ref = refs[1]
    assert ref.well == "B02" and ref.path == "B/02/1"
    assert plate.channel_names(ref) == ["DNA", "Cytoplasm"]
    assert plate.pixel_size_um(ref) == pytest.approx(0.65)
    assert plate.pixel_size_um(ref, 1) == pytest.approx(1.3)
    data = plate.read_channels(ref, ["Cytoplasm", "DNA"])
    assert data.shape == (2, 600, 560) and data.dtype == np.uint16
    full = plate.read_channels(ref, ["DNA", "Cytoplasm"])
    np.testing.assert_array_equal(data[0], full[1])
    xa = plate.read_xarray(ref, ["DNA"])
    assert xa.dims == ("c", "y", "x") and float(xa.x[1]) == pytest.approx(0.65)
    assert xa.attrs["well"] == "B02"
    # The physical plate is listed whole: a 96-well layout with empty wells too.
    assert len(plate.rows) == 8 and len(plate.columns) == 12


def test_written_plate_validates_and_reads(plate):
    hcs_model, label_model = MODELS[plate.version]
    ref = next(plate.iter_fields())
    labels = np.zeros(plate.field_shape(ref), np.uint32)
    labels[10:40, 20:50] = 7
    labels[100:120, 100:130] = 70000  # beyond uint16
    write_labels(plate, ref, "nuclei", labels)
    group = zarr.open_group(plate.url, mode="r")
    hcs_model.from_zarr(group)
    label_model.from_zarr(group[f"{ref.path}/labels/nuclei"])
    if plate.version == "0.5":
        assert group.attrs["ome"]["plate"]["version"] == "0.5"
        assert group[f"{ref.path}/0"].metadata.dimension_names == ("c", "y", "x")
    # napari-ome-zarr's reader finds the image and its label pyramid.
    nodes = list(Reader(parse_url(f"{plate.url}/{ref.path}"))())
    specs = [[type(s).__name__ for s in n.specs] for n in nodes]
    assert ["Multiscales", "OMERO"] in specs
    label_node = next(n for n in nodes if "Label" in [type(s).__name__ for s in n.specs])
    assert [d.shape for d in label_node.data] == [(600, 560), (300, 280)]
    assert label_node.data[0].dtype == np.uint32
    back = plate.read_labels(ref, "nuclei")
    np.testing.assert_array_equal(back, labels)
    # Pyramid levels are subsampled, never interpolated: only existing ids appear.
    level1 = plate.read_labels(ref, "nuclei", level=1)
    assert set(np.unique(level1)) <= {0, 7, 70000}


def test_rewriting_labels_replaces_them(plate):
    ref = next(plate.iter_fields())
    first = np.ones(plate.field_shape(ref), np.uint32)
    write_labels(plate, ref, "cells", first)
    write_labels(plate, ref, "cells", first * 2)
    assert plate.label_names(ref) == ["cells"]
    assert plate.read_labels(ref, "cells").max() == 2
    leftovers = sorted(p.name for p in (Path(plate.url) / ref.path / "labels").iterdir())
    assert not [n for n in leftovers if n.startswith(".tmp")]


def test_append_channel_pyramid_and_metadata(plate):
    ref = next(plate.iter_fields())
    writable = open_plate(plate.url, mode="r+")
    virtual = np.full(writable.field_shape(ref), 1234, np.uint16)
    append_channel(writable, ref, ChannelSpec("DAPI_virtual"), virtual)
    again = open_plate(plate.url)
    assert again.channel_names(ref) == ["DNA", "Cytoplasm", "DAPI_virtual"]
    assert again.read_channels(ref, ["DAPI_virtual"], level=1).max() == 1234
    # Overwriting by name keeps a single entry.
    append_channel(writable, ref, ChannelSpec("DAPI_virtual"), virtual * 0 + 5)
    assert open_plate(plate.url).channel_names(ref).count("DAPI_virtual") == 1
    other = list(again.iter_fields())[1]
    assert again.channel_names(other) == ["DNA", "Cytoplasm"]


def test_missing_channel_lists_available(plate):
    ref = next(plate.iter_fields())
    with pytest.raises(ChannelNotFoundError, match="'Cytoplasm'") as err:
        plate.read_channels(ref, ["GFP"])
    assert "GFP" in str(err.value) and "B/02/0" in str(err.value)


def test_not_a_plate(tmp_path):
    with pytest.raises(PlateFormatError, match="does not exist"):
        open_plate(tmp_path / "nothing.zarr")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "x.txt").write_text("hi")
    with pytest.raises(PlateFormatError):
        open_plate(tmp_path / "folder")
    zarr.open_group(str(tmp_path / "image.zarr"), mode="w").attrs["ome"] = {"multiscales": []}
    with pytest.raises(PlateFormatError, match="not an OME-Zarr HCS plate"):
        open_plate(tmp_path / "image.zarr")


def test_well_without_fields(plate):
    group = zarr.open_group(plate.url, mode="r+")
    well = group["C/03"]
    if plate.version == "0.5":
        well.attrs["ome"] = {"version": "0.5", "well": {"images": []}}
    else:
        well.attrs["well"] = {"version": "0.4", "images": []}
    with pytest.raises(PlateFormatError, match="well C03 .* has no fields"):
        open_plate(plate.url).fields("C03")
    with pytest.raises(HcssegError, match="no well 'H12'"):
        plate.fields("H12")


def test_names_and_layout_helpers():
    assert well_name("B", "3") == "B03" and parse_well("b03") == ("B", 3)
    assert parse_well("AF/48") == ("AF", 48)
    rows, cols = plate_layout([("O", 24)])
    assert len(rows) == 16 and len(cols) == 24  # 384-well plate
    assert pyramid_levels((256, 256)) == 1 and pyramid_levels((1040, 1159)) == 3
