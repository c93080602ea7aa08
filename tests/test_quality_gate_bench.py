"""The quality-gate benchmark's smoke version: both presets train a few steps on a small real
plate through the pipeline's own functions, the gate gives verdicts, the test fields check
them, and the report is written. Whether the gate is right is measured by
`python bench/quality_gate.py`, not here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, dataset


def test_quality_gate_benchmark_quick(shared_data: Path, tmp_path: Path) -> None:
    dataset(shared_data, "nuclei-dsb2018")
    env = os.environ | {
        "HCSSEG_BENCH_RESULTS": str(tmp_path),
        "HCSSEG_SHARED_DATA": str(shared_data),
    }
    proc = subprocess.run(
        [sys.executable, "bench/quality_gate.py", "--quick", "--threads", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "quality_gate_quick.json").read_text())
    assert result["machine"]["threads"] == 1
    assert set(result["scenarios"]) == {"supervised", "annotation-free"}
    metrics = {"supervised": "AP@0.5 vs nuclei_gt", "annotation-free": "marker F1"}
    for scenario, runs in result["scenarios"].items():
        assert [r["budget"] for r in runs] == [2, 4]
        for r in runs:
            gate = r["gate"]
            assert gate["metric"].startswith(metrics[scenario])
            assert gate["n_fields"] >= 1 and gate["winner"] in ("candidate", "baseline")
            assert r["steps_done"] == r["budget"] and r["tta"] is False
            assert r["right"] == (gate["winner"] == r["test"]["better"])
            # the per-field breakdown runs the same gate: its mean is the verdict's score
            own = "ap50" if scenario == "supervised" else "proxy"
            assert abs(r["held_back"][f"{own}_classical"] - gate["baseline_score"]) < 1e-9
            assert abs(r["held_back"][f"{own}_model"] - gate["candidate_score"]) < 1e-9
            assert 0 <= r["test"]["ap50_classical"] <= 1
    # the classical baseline is scored on the test fields, and finds nuclei
    assert result["scenarios"]["supervised"][0]["test"]["ap50_classical"] > 0.5
    report = (tmp_path / "quality_gate_quick.md").read_text()
    assert "## supervised" in report and "## annotation-free" in report
