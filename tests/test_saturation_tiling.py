"""Issue 14 item 8: saturated fields are flagged, large fields are segmented in tiles.

Saturation: a uint16 field with half its DNA at 65535 segments into a few giant "nuclei"
with no error, so its QC row flags it, the run warns naming the field and the plate report
counts it.  Tiling: a real field mirrored to 3072² segmented in 768 px tiles matches the
whole-field result, with no nucleus cut or doubled on a seam, in a fraction of the memory.
"""

from __future__ import annotations

import logging
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from skimage import filters

from hcsseg.config import ProcessConfig
from hcsseg.errors import HcssegError, InputDataError
from hcsseg.evaluate.metrics import instance_metrics
from hcsseg.export.tables import read_table
from hcsseg.io.tiff_import import plate_from_arrays
from hcsseg.measure.quality import image_quality, quality_flags
from hcsseg.pipeline.wells import (
    finalize_plate,
    plan_plate,
    plate_lock,
    process_well,
    qc_schema,
)
from hcsseg.report import plate_report, saturated_fields
from hcsseg.segment.classical import (
    _LOG_OFFSET,
    _THRESHOLDS,
    CellOptions,
    NucleiOptions,
    _normalise,
    cells_overlap,
    field_levels,
    nuclei_overlap,
    segment_cells,
    segment_nuclei,
)
from hcsseg.segment.methods import Segmenter
from hcsseg.segment.tiling import grow_tiled, label_centroids, tile_grid
from tests.conftest import dataset

CP_STEM = "AS_09125_050116030001_D03f00d{}.tif"
PX = 0.84  # what the scale estimate reads off this field for 10 µm nuclei
LARGE, TILE = 3072, 768
SATURATED_DNA = "Image_ImageQuality_Saturated_DNA"


def _channel(shared_data: Path, d: int) -> np.ndarray:
    """cellprofiler-human channel `d` (0 DNA, 2 cell body) as the uint16 a camera writes."""
    image = tifffile.imread(dataset(shared_data, "cellprofiler-human") / CP_STEM.format(d))
    return image.astype(np.uint16) * 257


def _mirrored(image: np.ndarray, size: int) -> np.ndarray:
    """`image` tiled by mirroring to size x size: a large field of real nuclei, continuous
    across the copies' borders (objects there are mirrored, not cut)."""
    reps = -(-size // image.shape[0])
    rows = [
        np.hstack([image[:: -1 if i % 2 else 1, :: -1 if j % 2 else 1] for j in range(reps)])
        for i in range(reps)
    ]
    return np.ascontiguousarray(np.vstack(rows)[:size, :size])


def _half_saturated(dna: np.ndarray) -> np.ndarray:
    out = dna.copy()
    out[dna >= np.median(dna)] = np.iinfo(np.uint16).max
    return out


def _ap50(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(instance_metrics(pred, truth, thresholds=[0.5]).ap[0])


# ---------------------------------------------------------------- saturation flag


def test_quality_flags_mark_a_half_saturated_channel(shared_data: Path) -> None:
    dna = _channel(shared_data, 0)
    normal = image_quality(dna, saturation_value=65535)
    clipped = image_quality(_half_saturated(dna), saturation_value=65535)
    assert clipped["PercentMaximal"] >= 50
    assert quality_flags(clipped) == {"Saturated": True}
    assert quality_flags(normal) == {"Saturated": False}
    # the threshold is a share of the field's pixels
    assert not quality_flags(clipped, saturation_fraction=0.7)["Saturated"]
    with pytest.raises(InputDataError, match="saturation_fraction"):
        quality_flags(normal, saturation_fraction=2.0)


def test_a_half_saturated_field_is_flagged_warned_and_reported(
    shared_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dna, cell = _channel(shared_data, 0), _channel(shared_data, 2)
    fields = [
        (("B", 2), np.stack([dna, cell])),
        (("B", 2), np.stack([_half_saturated(dna), cell])),
        (("B", 3), np.stack([dna, cell])),
    ]
    plate = plate_from_arrays(
        tmp_path / "sat.zarr",
        name="sat",
        fields=fields,
        channels=["DNA", "Actin"],
        pixel_size_um=PX,
    )
    config = ProcessConfig(output=str(tmp_path / "tables"))
    plan = plan_plate(plate.url, config)
    assert {SATURATED_DNA, "Image_ImageQuality_Saturated_Actin"} <= set(qc_schema(plan))
    with caplog.at_level(logging.WARNING, logger="hcsseg.pipeline.wells"), plate_lock(plan):
        for well in plan.wells:
            process_well(plan, well, config)
        summary = finalize_plate(plan)

    qc = read_table(plan.output_root, "image_qc", plan.plate_name).sort_values(
        ["Metadata_Well", "Metadata_Site"]
    )
    assert qc[SATURATED_DNA].dtype == bool
    assert qc[SATURATED_DNA].tolist() == [False, True, False]
    assert not qc["Image_ImageQuality_Saturated_Actin"].any()
    # the clipped field really is the failure the flag is for: its nuclei fused
    counts = qc["Image_Count_Nuclei"].tolist()
    assert counts[1] < 0.5 * counts[0]

    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    saturated = [m for m in warned if "saturated" in m]
    assert len(saturated) == 1
    assert "plate sat well B02 field 1 channel 'DNA'" in saturated[0]
    assert (
        f"{qc[qc[SATURATED_DNA]]['Image_ImageQuality_PercentMaximal_DNA'].iloc[0]:.1f}%"
        in (saturated[0])
    )

    found = saturated_fields(summary)
    assert found[["well", "channel", "fields", "of"]].values.tolist() == [["B02", "DNA", 1, 2]]
    report = plate_report(summary)
    assert "Saturated fields: 1 in 1 well" in report
    assert "| B02 | DNA | 1 of 2 |" in report


def test_report_without_saturation_columns_or_saturated_fields() -> None:
    base = pd.DataFrame(
        {
            "Metadata_Well": ["B02", "B03"],
            "Metadata_FieldCount": [2, 2],
            "Image_Count_Cells": [5, 6],
        }
    )
    assert "Saturated" not in plate_report(base)
    clean = base.assign(**{SATURATED_DNA: [0.0, 0.0]})
    assert "Saturated fields: none." in plate_report(clean)


# ---------------------------------------------------------------- tiled segmentation


@pytest.fixture(scope="module")
def large_field(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    return _mirrored(_channel(shared_data, 0), LARGE), _mirrored(_channel(shared_data, 2), LARGE)


@pytest.fixture(scope="module")
def whole_and_tiled(large_field: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """Nuclei and cells of the 3072² field, whole and in 768 px tiles (tiled peak memory
    traced)."""
    dna, cell = large_field
    out = {"nuclei": segment_nuclei(dna, pixel_size_um=PX)}
    out["cells"] = segment_cells(out["nuclei"], cell, pixel_size_um=PX)
    tracemalloc.start()
    try:
        out["nuclei_tiled"] = segment_nuclei(dna, pixel_size_um=PX, tile_size=TILE)
        nuclei_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        out["cells_tiled"] = segment_cells(out["nuclei"], cell, pixel_size_um=PX, tile_size=TILE)
        cells_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    out["peaks"] = np.array([nuclei_peak, cells_peak])
    return out


def _seams(shape: tuple[int, int], tile: int, overlap: int) -> tuple[set[int], set[int]]:
    """Rows and columns where ownership passes from one tile to the next."""
    grid = tile_grid(shape, max(tile, 2 * overlap), overlap)
    return {g[2][0] for g in grid} - {0}, {g[3][0] for g in grid} - {0}


def _split_on_seams(whole: np.ndarray, tiled: np.ndarray, rows: set[int], cols: set[int]) -> int:
    """Whole-field objects crossing a seam that the tiled labels cut or double: fewer than
    95% of their pixels under one tiled label."""
    on_seam = np.zeros(whole.shape, bool)
    on_seam[sorted(rows), :] = True
    on_seam[:, sorted(cols)] = True
    ids = np.unique(whole[on_seam & (whole > 0)])
    assert ids.size > 100  # the seams do cross many nuclei
    pick = np.isin(whole, ids)
    pairs, counts = np.unique(
        np.stack([whole[pick], tiled[pick]]).astype(np.int64), axis=1, return_counts=True
    )
    frame = pd.DataFrame({"whole": pairs[0], "tiled": pairs[1], "n": counts})
    frame = frame[frame.tiled > 0]
    share = frame.groupby("whole").n.max() / pd.Series(np.bincount(whole[pick])[ids], ids)
    return int((share.reindex(ids).fillna(0) < 0.95).sum())


def test_tiled_nuclei_match_whole_field_nuclei(whole_and_tiled: dict[str, np.ndarray]) -> None:
    whole, tiled = whole_and_tiled["nuclei"], whole_and_tiled["nuclei_tiled"]
    assert tiled.dtype == np.uint32 and tiled.shape == (LARGE, LARGE)
    n_whole, n_tiled = int(whole.max()), int(tiled.max())
    assert n_whole > 10_000
    assert np.array_equal(np.unique(tiled)[1:], np.arange(1, n_tiled + 1))
    assert abs(n_tiled - n_whole) <= 0.02 * n_whole
    assert _ap50(tiled, whole) >= 0.95
    rows, cols = _seams(whole.shape, TILE, nuclei_overlap(NucleiOptions(), PX))
    assert _split_on_seams(whole, tiled, rows, cols) <= 0.002 * n_whole


def test_tiled_cells_keep_their_nucleus(whole_and_tiled: dict[str, np.ndarray]) -> None:
    nuclei, whole, tiled = (whole_and_tiled[k] for k in ("nuclei", "cells", "cells_tiled"))
    assert tiled.dtype == np.uint32
    inside = nuclei > 0
    assert np.array_equal(tiled[inside], nuclei[inside])  # every cell holds its nucleus
    assert set(np.unique(tiled)[1:].tolist()) == set(np.unique(nuclei)[1:].tolist())
    assert _ap50(tiled, whole) >= 0.95
    assert (tiled == whole).mean() > 0.995
    area, _, _ = label_centroids(nuclei)
    rows, cols = _seams(nuclei.shape, TILE, cells_overlap(area[1:].max(), CellOptions(), PX))
    assert _split_on_seams(whole, tiled, rows, cols) <= 0.002 * nuclei.max()


def test_tiled_memory_is_bounded_by_the_tile(whole_and_tiled: dict[str, np.ndarray]) -> None:
    """Traced numpy peaks of the tiled runs: the uint32 canvas (4 B/px) plus one tile's
    work, far below the ~100 B/px the whole-field baseline takes."""
    nuclei_peak, cells_peak = whole_and_tiled["peaks"]
    assert nuclei_peak < 24 * LARGE**2
    assert cells_peak < 24 * LARGE**2


def test_fields_within_a_tile_are_unchanged(large_field: tuple[np.ndarray, np.ndarray]) -> None:
    dna, cell = (a[:700, :900] for a in large_field)
    nuclei = segment_nuclei(dna, pixel_size_um=PX)
    assert np.array_equal(segment_nuclei(dna, pixel_size_um=PX, tile_size=900), nuclei)
    seg = Segmenter("classical")
    assert np.array_equal(seg.nuclei(dna, pixel_size_um=PX, tile_size=4096), nuclei)
    cells = segment_cells(nuclei, cell, pixel_size_um=PX)
    assert np.array_equal(seg.cells(nuclei, cell, pixel_size_um=PX, tile_size=900), cells)


def test_distance_cells_and_border_exclusion_tiled(
    large_field: tuple[np.ndarray, np.ndarray],
) -> None:
    dna = large_field[0][:1600, :1500]
    opts = NucleiOptions(exclude_border=True)
    whole = segment_nuclei(dna, pixel_size_um=PX, options=opts)
    tiled = segment_nuclei(dna, pixel_size_um=PX, options=opts, tile_size=512)
    edge = np.concatenate([tiled[0], tiled[-1], tiled[:, 0], tiled[:, -1]])
    assert not edge.any()
    assert tiled.max() == np.unique(tiled).size - 1
    assert _ap50(tiled, whole) >= 0.98
    distance = CellOptions(method="distance")
    grown = segment_cells(whole, None, pixel_size_um=PX, options=distance)
    # growing by distance is local: tiled, it is exactly the whole-field result
    assert np.array_equal(
        segment_cells(whole, None, pixel_size_um=PX, options=distance, tile_size=512), grown
    )


@pytest.mark.parametrize("method", ["otsu", "li", "triangle"])
@pytest.mark.parametrize("log", [False, True])
def test_field_levels_match_whole_field_thresholds(
    shared_data: Path, method: str, log: bool
) -> None:
    """Thresholds from the tile-by-tile histogram draw the same foreground as skimage's on
    the whole smoothed field."""
    image = _channel(shared_data, 2)
    sigma = 1.2
    smooth = filters.gaussian(_normalise(image.astype(np.float64)), sigma=sigma)
    if log:
        level = float(np.exp(_THRESHOLDS[method](np.log(smooth + _LOG_OFFSET)))) - _LOG_OFFSET
    else:
        level = float(_THRESHOLDS[method](smooth))
    levels = field_levels(image, sigma, method, log, tile=128)  # type: ignore[arg-type]
    assert levels is not None
    assert np.mean((smooth > level) != (smooth > levels.threshold)) < 1e-4
    assert field_levels(np.full((300, 300), 7, np.uint16), sigma, "otsu", False, tile=128) is None


def test_grow_tiled_checks_its_inputs() -> None:
    seeds = np.zeros((300, 300), np.uint32)
    seeds[100:110, 100:110] = 1
    with pytest.raises(InputDataError, match="overlap"):
        grow_tiled(lambda s, _: s, seeds, None, tile=64, overlap=64)
    with pytest.raises(HcssegError, match="not seed ids"):
        grow_tiled(lambda s, _: s.astype(np.int64) + 5, seeds, None, tile=128, overlap=16)
    grown = grow_tiled(lambda s, _: s, seeds, None, tile=128, overlap=16)
    assert np.array_equal(grown, seeds)


def test_process_well_tiles_large_fields(shared_data: Path, tmp_path: Path) -> None:
    """A run with a tile smaller than its fields: tiled segmentation end to end, nucleus
    counts as in an untiled run (the scale is taken from the plate to compare alike)."""
    dna, cell = _channel(shared_data, 0), _channel(shared_data, 2)
    plate = plate_from_arrays(
        tmp_path / "big.zarr",
        name="big",
        fields=[(("B", 2), np.stack([dna, cell]))],
        channels=["DNA", "Actin"],
        pixel_size_um=PX,
    )
    counts = []
    for tile in (4096, 256):
        config = ProcessConfig(output=str(tmp_path / f"t{tile}"), scale="metadata", tile_size=tile)
        plan = plan_plate(plate.url, config)
        with plate_lock(plan):
            counts.append(process_well(plan, "B02", config).qc[0]["Image_Count_Nuclei"])
    assert counts[0] > 100
    assert abs(counts[1] - counts[0]) <= 0.02 * counts[0]
