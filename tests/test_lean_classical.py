"""Issue 13: the classical path stays lean. torch costs ~800 MB of RSS and seconds of
import per process, paid again by every Dask worker; a plate run without a learned model
must never load it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

LEAN = """
import sys
from hcsseg.config import ProcessConfig
from hcsseg.demo import synthetic_plate
from hcsseg.pipeline.wells import finalize_plate, plan_plate, plate_lock, process_well
import flows.process_plate, flows.plate_pipeline, hcsseg.cli  # what `hcsseg process` loads
plate = synthetic_plate(sys.argv[1] + "/p.zarr", wells=("B02",), fields_per_well=1,
                        shape=(128, 128))
config = ProcessConfig(output=sys.argv[1] + "/t")
plan = plan_plate(plate.url, config)
with plate_lock(plan):
    process_well(plan, "B02", config)
    finalize_plate(plan)
heavy = ("torch", "segmentation_models_pytorch", "cellpose")
loaded = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
print(",".join(loaded) or "lean")
"""


def test_a_classical_run_never_imports_torch(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", LEAN, str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "lean", proc.stdout[-500:]
