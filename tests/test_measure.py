"""Per-object features and image QC on hand-made images with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from hcsseg.errors import InputDataError
from hcsseg.measure.features import channel_token, feature_columns, measure_objects
from hcsseg.measure.quality import image_quality, quality_columns


def _scene():
    nuclei = np.zeros((40, 60), np.uint32)
    cells = np.zeros((40, 60), np.uint32)
    nuclei[5:10, 5:10] = 3  # 25 px
    cells[2:14, 2:14] = 3  # 144 px, cytoplasm 119 px
    nuclei[20:30, 30:34] = 7  # 40 px, elongated
    cells[18:32, 28:36] = 7
    cells[2:6, 50:58] = 9  # a cell without a nucleus
    image = np.zeros((40, 60), np.uint16)
    image[cells == 3] = 1000
    image[nuclei == 3] = 4000
    image[cells == 7] = 500
    return nuclei, cells, image


def test_values_names_and_parents():
    nuclei, cells, image = _scene()
    table = measure_objects(nuclei, cells, {"DNA": image})
    assert list(table.Metadata_ObjectNumber) == [3, 7, 9]
    assert list(table.Metadata_Cells_Parent_Nuclei) == [3, 7, 0]
    row = table.set_index("Metadata_ObjectNumber").loc[3]
    assert row.Nuclei_AreaShape_Area == 25 and row.Cells_AreaShape_Area == 144
    assert row.Cytoplasm_AreaShape_Area == 119
    # Integer images are scaled by the dtype maximum, as CellProfiler does.
    assert row.Nuclei_Intensity_MeanIntensity_DNA == pytest.approx(4000 / 65535)
    assert row.Nuclei_Intensity_IntegratedIntensity_DNA == pytest.approx(25 * 4000 / 65535)
    assert row.Cytoplasm_Intensity_MaxIntensity_DNA == pytest.approx(1000 / 65535)
    assert row.Metadata_Nuclei_Location_Center_X == pytest.approx(7.0)
    assert row.Metadata_Nuclei_Location_Center_Y == pytest.approx(7.0)
    elongated = table.set_index("Metadata_ObjectNumber").loc[7]
    assert elongated.Nuclei_AreaShape_Eccentricity > 0.8
    orphan = table.set_index("Metadata_ObjectNumber").loc[9]
    assert np.isnan(orphan.Nuclei_AreaShape_Area) and orphan.Cells_AreaShape_Area == 32
    for column in table.columns:
        if "_Intensity_" in column:
            assert column.rsplit("_", 1)[1] == "DNA"


def test_empty_and_bad_input():
    empty = measure_objects(
        np.zeros((8, 8), np.uint32), np.zeros((8, 8), np.uint32), {"DNA": np.zeros((8, 8))}
    )
    assert empty.empty
    assert [c for c in empty.columns if not c.startswith("Metadata_")] == feature_columns(("DNA",))
    with pytest.raises(ValueError, match="contains '_'"):
        measure_objects(np.zeros((8, 8), np.uint32), None, {"DAPI_virtual": np.zeros((8, 8))})
    with pytest.raises(InputDataError, match="integers"):
        measure_objects(np.zeros((8, 8), np.float32), None, {})
    assert channel_token("DAPI_virtual") == "DAPIvirtual"
    assert channel_token("Hoechst 33342") == "Hoechst33342"


def test_quality_blur_and_saturation():
    rng = np.random.default_rng(0)
    sharp = (rng.random((128, 128)) > 0.9).astype(np.float64)
    sharp = ndi.gaussian_filter(sharp, 0.7) * 200 + 10
    blurred = ndi.gaussian_filter(sharp, 4)
    q_sharp, q_blur = image_quality(sharp), image_quality(blurred)
    assert q_blur["FocusScore"] < q_sharp["FocusScore"]
    assert q_blur["PowerLogLogSlope"] < q_sharp["PowerLogLogSlope"]
    img = np.zeros((10, 10), np.uint8)
    img[:2] = 255
    q = image_quality(img, saturation_value=255)
    assert q["PercentMaximal"] == pytest.approx(20.0)
    assert q["BackgroundLevel"] == pytest.approx(0.0)
    flat = image_quality(np.full((16, 16), 7, np.uint16))
    assert flat["FocusScore"] == 0 and np.isnan(flat["PowerLogLogSlope"])
    with pytest.raises(InputDataError, match="NaN"):
        image_quality(np.full((4, 4), np.nan))
    cols = quality_columns(q, "DNA")
    assert "Image_ImageQuality_PercentMaximal_DNA" in cols
