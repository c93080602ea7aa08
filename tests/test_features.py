"""measure_objects against scikit-image / numpy references, edge cases and speed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import label, regionprops
from skimage.segmentation import expand_labels

from hcsseg.errors import InputDataError
from hcsseg.measure.features import (
    CQC_COLUMNS,
    FEATURE_COMPARTMENTS,
    feature_columns,
    location_columns,
    measure_objects,
    object_metadata_columns,
)


def _objects() -> np.ndarray:
    """Random blobs (some cut by the image edge, some with holes) plus degenerate shapes."""
    rng = np.random.default_rng(1)
    labels = label(ndi.gaussian_filter(rng.random((160, 160)), 3) > 0.5)
    labels[0:6, 0:9] = 400  # touches row 0 and column 0
    labels[5, 150] = 500  # one pixel
    labels[10, 130:150] = 501  # horizontal line
    labels[np.arange(20, 30), np.arange(140, 150)] = 502  # diagonal line
    ring = np.zeros(labels.shape, bool)
    ring[130:150, 130:150] = True
    ring[135:145, 135:145] = False
    labels[ring] = 503  # Euler number 0
    return labels


def _cp_quantile(sorted_values: np.ndarray, q: float) -> float:
    """CellProfiler's MeasureObjectIntensity rule: position n * q, linear interpolation."""
    n = sorted_values.size
    pos = n * q
    low = int(np.floor(pos))
    if low < n - 1:
        return float(sorted_values[low] * (1 - (pos - low)) + sorted_values[low + 1] * (pos - low))
    return float(sorted_values[min(low, n - 1)])


@pytest.mark.parametrize("dtype", [np.uint16, np.float32])
def test_matches_regionprops_and_numpy(dtype: type) -> None:
    labels = _objects()
    rng = np.random.default_rng(2)
    image = rng.integers(0, 4096, labels.shape).astype(dtype)
    scale = 65535.0 if dtype is np.uint16 else 1.0
    table = measure_objects(labels, None, {"DNA": image}).set_index("Metadata_ObjectNumber")
    props = regionprops(labels)
    assert list(table.index) == [p.label for p in props]
    for p in props:
        row = table.loc[p.label]
        expected_shape = {
            "Area": p.area,
            "Perimeter": p.perimeter,
            "Eccentricity": p.eccentricity,
            "Solidity": p.solidity,
            "Extent": p.extent,
            "MajorAxisLength": p.axis_major_length,
            "MinorAxisLength": p.axis_minor_length,
            "Orientation": np.degrees(p.orientation),
            "EquivalentDiameter": p.equivalent_diameter_area,
            "Compactness": p.perimeter**2 / (4 * np.pi * p.area),
        }
        for name, value in expected_shape.items():
            assert row[f"Nuclei_AreaShape_{name}"] == pytest.approx(value, abs=1e-9), name
        # EulerNumber is no feature (constant); it flags nuclei in pieces or with holes
        assert row.Metadata_cqc_nucleus_not_simply_connected == (p.euler_number != 1)
        assert row.Metadata_Nuclei_Location_Center_X == pytest.approx(p.centroid[1])
        assert row.Metadata_Nuclei_Location_Center_Y == pytest.approx(p.centroid[0])
        values = np.sort(image[labels == p.label].astype(np.float64) / scale)
        expected_intensity = {
            "IntegratedIntensity": values.sum(),
            "MeanIntensity": values.mean(),
            "StdIntensity": values.std(),
            "MinIntensity": values[0],
            "MaxIntensity": values[-1],
            "MedianIntensity": _cp_quantile(values, 0.5),
            "LowerQuartileIntensity": _cp_quantile(values, 0.25),
            "UpperQuartileIntensity": _cp_quantile(values, 0.75),
        }
        for name, value in expected_intensity.items():
            assert row[f"Nuclei_Intensity_{name}_DNA"] == pytest.approx(value, rel=1e-9), name
    ring = table.loc[503]
    assert ring.Metadata_cqc_nucleus_not_simply_connected
    assert table.loc[500].Nuclei_AreaShape_Solidity == 1.0


def test_known_values_for_a_disc_and_a_bar() -> None:
    labels = np.zeros((60, 60), np.uint16)
    yy, xx = np.mgrid[:60, :60]
    labels[(yy - 20) ** 2 + (xx - 20) ** 2 <= 10**2] = 1
    labels[45:50, 10:50] = 2  # 5 x 40 horizontal bar
    image = np.zeros((60, 60), np.float64)
    image[labels == 2] = 0.5
    image[45:50, 40:50] = 1.0  # the bar's right end is brighter
    table = measure_objects(labels, None, {"GFP": image}).set_index("Metadata_ObjectNumber")
    disc, bar = table.loc[1], table.loc[2]
    assert disc.Nuclei_AreaShape_Compactness == pytest.approx(1 / disc.Nuclei_AreaShape_FormFactor)
    assert disc.Nuclei_AreaShape_Eccentricity < 0.05
    # CellProfiler's hull runs through pixel-edge midpoints, so even a disc scores below 1
    assert 0.9 < disc.Nuclei_AreaShape_Solidity < 0.95
    assert bar.Nuclei_AreaShape_Area == 200 and bar.Nuclei_AreaShape_Extent == 1.0
    assert abs(bar.Nuclei_AreaShape_Orientation) == pytest.approx(90.0)  # along x, in degrees
    # weighted centroid x: (0.5 * sum(10..39) + sum(40..49)) / 25 = 32.5, plain 29.5
    assert bar.Nuclei_Intensity_MassDisplacement_GFP == pytest.approx(3.0)
    assert disc.Nuclei_Intensity_IntegratedIntensity_GFP == 0
    assert np.isnan(disc.Nuclei_Intensity_MassDisplacement_GFP)


def test_compartments_parents_and_missing_objects() -> None:
    nuclei = np.zeros((30, 40), np.uint32)
    cells = np.zeros((30, 40), np.uint32)
    nuclei[5:10, 5:10] = 4
    cells[3:12, 3:12] = 4
    nuclei[20:25, 20:25] = 6  # nucleus without a cell
    nuclei[5:10, 30:35] = 8
    cells[5:10, 30:35] = 8  # cell == nucleus: empty cytoplasm
    table = measure_objects(nuclei, cells, {}).set_index("Metadata_ObjectNumber")
    assert list(table.index) == [4, 6, 8]
    assert list(table.Metadata_Cells_Parent_Nuclei) == [4, 6, 8]
    assert table.loc[4].Cytoplasm_AreaShape_Area == 81 - 25
    assert np.isnan(table.loc[6].Cells_AreaShape_Area)
    assert table.loc[6].Nuclei_AreaShape_Area == 25
    assert np.isnan(table.loc[8].Cytoplasm_AreaShape_Area)
    assert table.loc[8].Cells_AreaShape_Area == 25


def test_sparse_large_ids_and_wide_dtypes() -> None:
    labels = np.zeros((20, 20), np.uint64)
    labels[2:6, 2:6] = 2**40
    labels[10:15, 10:12] = 7
    table = measure_objects(labels, labels, {"A": np.ones((20, 20), np.uint8)})
    assert list(table.Metadata_ObjectNumber) == [7, 2**40]
    assert list(table.Nuclei_AreaShape_Area) == [10, 16]
    assert list(table.Nuclei_Intensity_MeanIntensity_A) == pytest.approx([1 / 255] * 2)


def test_empty_table_has_schema_and_dtypes() -> None:
    empty = np.zeros((8, 8), np.uint32)
    table = measure_objects(empty, empty, {"DNA": np.zeros((8, 8), np.uint16)})
    assert len(table) == 0
    meta = object_metadata_columns()
    assert list(table.columns) == [*meta, *feature_columns(("DNA",))]
    features = table.columns[len(meta) :]
    assert {c.split("_")[0] for c in features} == set(FEATURE_COMPARTMENTS)
    assert table.Metadata_ObjectNumber.dtype == np.int64
    assert (table.dtypes[features] == np.float64).all()
    assert (table.dtypes[list(CQC_COLUMNS)] == np.bool_).all()
    nuclei_only = measure_objects(empty, None, {})
    assert list(nuclei_only.columns) == [
        "Metadata_ObjectNumber",
        *location_columns(("Nuclei",)),
        *CQC_COLUMNS,
        *(c for c in feature_columns(()) if c.startswith("Nuclei_")),
    ]


def test_bad_channels() -> None:
    labels = np.ones((4, 4), np.uint8)
    with pytest.raises(InputDataError, match="NaN"):
        measure_objects(labels, None, {"DNA": np.full((4, 4), np.nan)})
    with pytest.raises(InputDataError, match="shape"):
        measure_objects(labels, None, {"DNA": np.zeros((4, 5))})
    with pytest.raises(InputDataError, match="ids must lie"):
        measure_objects(-labels.astype(np.int8), None, {})


@pytest.mark.slow
def test_speed_5000_objects_2k_field() -> None:
    rng = np.random.default_rng(0)
    seeds = np.zeros((2048, 2048), np.uint32)
    points = rng.integers(10, 2038, (5200, 2))
    seeds[points[:, 0], points[:, 1]] = np.arange(1, len(points) + 1)
    nuclei = expand_labels(seeds, 6).astype(np.uint32)
    cells = expand_labels(nuclei, 10).astype(np.uint32)
    channels = {c: rng.integers(0, 4096, nuclei.shape).astype(np.uint16) for c in "ABC"}
    start = time.process_time()
    table = measure_objects(nuclei, cells, channels)
    cpu = time.process_time() - start
    assert len(table) > 5000
    assert cpu < 10, f"{cpu:.1f} s of CPU"  # measured about 3 s


def test_tiled_measurement_gives_the_whole_field_rows(shared_data) -> None:
    """Issue 14.8: a large field is measured a tile at a time with the same rows."""
    import sys

    import pandas as pd

    from hcsseg.measure.features import measure_objects_tiled
    from hcsseg.segment.classical import segment_cells, segment_nuclei
    from tests.conftest import REPO, dataset

    dataset(shared_data, "cellprofiler-human")
    sys.path.insert(0, str(REPO / "bench"))
    from plate_speed import source_field, variant

    field = variant(source_field(), 1, 1200).astype(np.uint16) * 200
    nuclei = segment_nuclei(field[0], pixel_size_um=0.65)
    cells = segment_cells(nuclei, field[1], pixel_size_um=0.65)
    channels = {"DNA": field[0], "Cyto": field[1]}
    whole = measure_objects(nuclei, cells, channels, typical_diameter_px=15.0)
    tiled = measure_objects_tiled(nuclei, cells, channels, tile_size=300, typical_diameter_px=15.0)
    assert len(whole) == len(tiled) > 1000
    orientation = [c for c in whole.columns if c.endswith("Orientation")]  # ±90° is one axis
    pd.testing.assert_frame_equal(
        whole.drop(columns=orientation), tiled.drop(columns=orientation), rtol=1e-9, atol=1e-9
    )
    assert whole[orientation].isna().equals(tiled[orientation].isna())
    off = np.nan_to_num((whole[orientation] - tiled[orientation]).abs().to_numpy()) % 180
    assert np.all((off < 1e-6) | (off > 180 - 1e-6))
    assert tiled["Metadata_cqc_touches_border"].sum() == whole["Metadata_cqc_touches_border"].sum()
