"""bench/plate_speed.py's measuring parts on a tiny real plate (the full benchmark is not a
test: `python bench/plate_speed.py --baseline REV`)."""

from __future__ import annotations

import sys
from pathlib import Path

from hcsseg.segment.distance_unet import MIN_LOOK_SIDE
from tests.conftest import REPO, dataset

sys.path.insert(0, str(REPO / "bench"))

import plate_speed


def test_stage_timing_and_process_tree_measurement(shared_data: Path, tmp_path: Path) -> None:
    dataset(shared_data, "cellprofiler-human")
    url = plate_speed.build_plate(tmp_path / "p.zarr", 2, 1, 256)
    stages = plate_speed.per_stage(url, 2)
    assert {"read", "nuclei", "cells", "features", "image_qc", "labels"} <= set(stages)
    assert stages["total"] > 0 and stages["fields_per_s_per_core"] > 0
    run = plate_speed.measured(
        [sys.executable, "-c", plate_speed.PLAIN, url, str(tmp_path / "t")], plate_speed.ENV
    )
    assert run["cpu_s"] > 0 and run["peak_rss_mb"] > 50
    assert list((tmp_path / "t" / "cells").rglob("*.parquet"))


def test_learned_inference_timing(shared_data: Path) -> None:
    """The learned-inference child trains a few steps and times network and post-processing
    on one field (the full run: 2160², with and without test-time flips)."""
    dataset(shared_data, "cellprofiler-human")
    out = plate_speed.learned_inference("cpu", 256, 2, "0")
    assert out["device"] == "cpu" and out["torch_threads"] == 1
    # the shipped precision (bfloat16 where native) and float32 beside it
    assert [r["amp"] for r in out["runs"]] == [True, False]
    for run in out["runs"]:
        assert run["tta"] is False and run["network_cpu_s"] > 0 and run["post_cpu_s"] >= 0
        # a 2-step network's blobs decide which look is kept (the field enlarged to its
        # estimated scale, or half or a quarter of that), never one below MIN_LOOK_SIDE
        assert run["working_shape"][0] >= MIN_LOOK_SIDE
