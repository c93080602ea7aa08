"""The accuracy benchmark's smoke version: every recipe trains for a few steps on real data
through the same functions the full benchmark (and `hcsseg train`) runs, and the report is
written. Accuracy itself is measured by `python bench/accuracy.py`, not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.conftest import REPO, dataset


def test_accuracy_benchmark_quick(shared_data: Path, tmp_path: Path) -> None:
    dataset(shared_data, "nuclei-dsb2018")
    dataset(shared_data, "dense-cells")
    env = os.environ | {
        "HCSSEG_BENCH_RESULTS": str(tmp_path),
        "HCSSEG_SHARED_DATA": str(shared_data),
    }
    proc = subprocess.run(
        [sys.executable, "bench/accuracy.py", "--quick", "--threads", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "accuracy_quick.json").read_text())
    assert set(result["sections"]) == {"nuclei", "dense", "dense_cellpose", "dense_free"}
    for section in result["sections"].values():
        assert section["machine"]["threads"] == 1
        for name, method in section["methods"].items():
            assert 0 <= method["ap50_image_mean"] <= 1, name
            if "learning_curve" in method:
                assert [c["step"] for c in method["learning_curve"]] == sorted(
                    c["step"] for c in method["learning_curve"]
                )
    nuclei = result["sections"]["nuclei"]["methods"]
    # the classical baseline is scored in the same run, and finds nuclei
    assert nuclei["classical (estimated scale)"]["ap50_image_mean"] > 0.5
    report = (tmp_path / "accuracy_quick.md").read_text()
    assert "## Nuclei" in report and "## Dense cells" in report

    # the full report opens with issue 10's targets, each judged from the measured numbers
    sys.path.insert(0, str(REPO / "bench"))
    import accuracy

    table = "\n".join(accuracy.targets(result))
    row = next(line for line in table.splitlines() if line.startswith("| 3 nuclei"))
    ok = nuclei["distance U-Net (resnet18, random init)"]["ap50_image_mean"] >= 0.82
    assert row.endswith("| yes |" if ok else "| no |")
    assert "| 9 GPU figures | accuracy.py --device cuda on a lent GPU | cpu | – | no |" in table
    # annotation-free: the product's route (doubtful pseudo-labels left out) beside every
    # pseudo-label taught, and the targets row reports the product's route
    free = result["sections"]["dense_free"]["methods"]
    assert accuracy.PRODUCT_FREE in free
    assert "annotation-free: distance U-Net on every surface-stain pseudo-label" in free
    row = next(line for line in table.splitlines() if line.startswith("| 5 dense"))
    assert f"| {accuracy.PRODUCT_FREE}: " in row


def test_holdout_tuning_rule_moves_only_on_a_lead_of_the_asked_size() -> None:
    """bench/holdout_nuclei.py replays tune_postprocessing's rule at several leads."""
    sys.path.insert(0, str(REPO / "bench"))
    import holdout_nuclei

    ref = np.array([0.5, 0.6, 0.7, 0.8])
    val = {"ref": ref, "noisy": ref + np.array([0.2, -0.1, 0.15, -0.05]), "clear": ref + 0.01}
    assert holdout_nuclei._pick(val, ["ref", "noisy"], "ref", 0.0) == "noisy"
    assert holdout_nuclei._pick(val, ["ref", "noisy"], "ref", 2.0) == "ref"
    assert holdout_nuclei._pick(val, ["ref", "clear"], "ref", 2.0) == "clear"
