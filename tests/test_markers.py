"""Nucleus markers and their matching QC."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from hcsseg.errors import InputDataError
from hcsseg.markers.detect import MarkerOptions, detect_markers
from hcsseg.markers.qc import marker_qc, match_markers
from tests.conftest import dataset


def _blobs(centres, shape=(200, 200), radius=6.0) -> np.ndarray:
    yy, xx = np.indices(shape)
    img = np.zeros(shape, np.float32)
    for cy, cx in centres:
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (radius / 2) ** 2))
    return img


def test_detects_synthetic_nuclei_at_their_centres():
    centres = [(30, 30), (30, 120), (100, 60), (160, 170), (150, 40)]
    markers = detect_markers(_blobs(centres), pixel_size_um=1.0)
    assert len(markers) == len(centres)
    pairs, fn, fp = match_markers(
        markers[["y", "x"]].to_numpy(), np.array(centres), max_distance_px=2
    )
    assert len(pairs) == 5 and fn == 0 and fp == 0
    assert markers.x_um.iloc[0] == pytest.approx(markers.x.iloc[0])


def test_sizes_follow_pixel_size():
    img = _blobs([(100, 100)], radius=6)
    # At 1 µm/px the blob is a 6 µm nucleus; at 0.05 µm/px it is 0.3 µm, far below the minimum.
    assert len(detect_markers(img, pixel_size_um=1.0)) == 1
    assert len(detect_markers(img, pixel_size_um=0.05)) == 0


def test_empty_and_bad_images():
    assert detect_markers(np.zeros((64, 64)), pixel_size_um=1.0).empty
    empty = detect_markers(np.zeros((0, 64)), pixel_size_um=1.0)
    assert empty.empty and list(empty.columns) == [
        "y",
        "x",
        "y_um",
        "x_um",
        "sigma_px",
        "intensity",
    ]
    with pytest.raises(InputDataError, match="NaN"):
        detect_markers(np.full((8, 8), np.nan), pixel_size_um=1.0)
    with pytest.raises(ValueError, match="min_diameter_um"):
        MarkerOptions(min_diameter_um=10, max_diameter_um=5)


def test_known_scale_keeps_an_empty_field_empty():
    """Scaled by its own percentiles, a field of pure noise turns into blobs; on the scale
    of the stain (0 = background, 1 = bright nucleus) it has none, while real nuclei on
    that scale are still found."""
    noise = np.random.default_rng(0).normal(0.0, 0.01, (200, 200)).astype(np.float32)
    assert len(detect_markers(noise, pixel_size_um=1.0)) > 5
    assert detect_markers(noise, pixel_size_um=1.0, value_range=(0.0, 1.0)).empty
    nuclei = noise + _blobs([(50, 50), (120, 150)])
    assert len(detect_markers(nuclei, pixel_size_um=1.0, value_range=(0.0, 1.0))) == 2
    with pytest.raises(InputDataError, match="value range"):
        detect_markers(nuclei, pixel_size_um=1.0, value_range=(1.0, 1.0))


def test_matching_is_one_to_one_within_distance():
    true = np.array([[0, 0], [0, 10], [50, 50]])
    pred = np.array([[0, 4], [0, 6], [90, 90], [1, 11]])
    pairs, fn, fp = match_markers(pred, true, max_distance_px=5)
    # (0,4)->(0,0), (0,6)->(0,10) or (1,11)->(0,10): one of them stays unmatched.
    assert len(pairs) == 2
    assert len(set(pairs[:, 0])) == 2 and len(set(pairs[:, 1])) == 2
    assert fn == pytest.approx(1 / 3) and fp == pytest.approx(2 / 4)
    # Greedy closest-first would pair (0, 4.5) with (0, 8) and strand (0, 12); the optimal
    # one-to-one assignment matches both.
    pairs, fn, fp = match_markers(
        np.array([[0, 4.5], [0, 12]]), np.array([[0, 0], [0, 8]]), max_distance_px=5
    )
    assert sorted(map(tuple, pairs.tolist())) == [(0, 0), (1, 1)] and fn == 0 and fp == 0
    none, fn0, fp0 = match_markers(np.empty((0, 2)), true, max_distance_px=5)
    assert len(none) == 0 and fn0 == 1.0 and np.isnan(fp0)


def test_marker_qc_on_real_dapi(shared_data):
    import json

    src = dataset(shared_data, "isl-phase-dapi")
    names = json.loads((src / "channels.json").read_text())["channels"]
    dapi = tifffile.imread(src / "field_A4.tif")[names.index("DAPI")].astype(np.float32)
    same = marker_qc(dapi, dapi, pixel_size_um=0.5)
    assert same["pcc"] == pytest.approx(1.0)
    assert same["fn_rate"] == 0 and same["fp_rate"] == 0 and same["n_markers_real"] > 20
    shifted = marker_qc(np.roll(dapi, 200, axis=1), dapi, pixel_size_um=0.5)
    assert shifted["pcc"] < 0.5 and shifted["fn_rate"] > 0.3


def test_gate_markers_keeps_those_inside_the_stain() -> None:
    import pandas as pd

    from hcsseg.markers.detect import gate_markers

    mask = np.zeros((50, 50), bool)
    mask[10:30, 10:30] = True
    markers = pd.DataFrame({"y": [20.0, 40.0, 29.0], "x": [20.0, 40.0, 29.0]})
    kept = gate_markers(markers, mask, radius=3)
    assert kept[["y", "x"]].values.tolist() == [[20.0, 20.0]]
    assert gate_markers(markers.iloc[:0], mask, radius=3).empty
