"""End-to-end plate pipeline on nuclei-dsb2018: import -> process-plate -> evaluate.

Runs the real CLI (Prefect embedded server included) in subprocesses so the timings and
peak memory are what a user sees; scores the classical baseline's nuclei against the
ground truth with AP = TP/(TP+FP+FN) (one-to-one matching, IoU >= 0.5).

    python bench/plate_pipeline.py
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "nuclei-dsb2018"
RESULTS = Path(__file__).resolve().parent / "results"
HCSSEG = [sys.executable, "-m", "hcsseg.cli"]


def timed(args: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "wall_s": time.perf_counter() - t0,
        "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "peak_rss_mb_children": after.ru_maxrss / 1024,
    }


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="hcsseg-bench-"))
    plate = work / "dsb.zarr"
    try:
        result = {
            "data": "nuclei-dsb2018 (140 images, 6,114 nuclei), one well per image",
            "import": timed([*HCSSEG, "import-pairs", str(DATA), str(plate)]),
            "process": timed([*HCSSEG, "process", str(plate), "--nucleus-channel", "DNA"]),
        }
        timed([*HCSSEG, "evaluate", str(plate), "--pred", "nuclei", "--truth", "nuclei_gt"])
        summary = json.loads(
            (work / "dsb_tables" / "eval" / "nuclei-dsb2018_nuclei_vs_nuclei_gt.json").read_text()
        )
        result["metrics"] = {
            k: summary[k]
            for k in (
                "ap_50_image_mean",
                "ap_50_pooled",
                "ap_75_image_mean",
                "ap_mean_image_mean",
                "f1_50_pooled",
                "splits_total",
                "merges_total",
                "n_true",
                "n_pred",
            )
        }
        result["note"] = "classical baseline, default options, pixel size 1 µm (unknown)"
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "plate_pipeline_dsb.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
