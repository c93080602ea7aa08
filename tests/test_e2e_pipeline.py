"""The annotation-free plate pipeline as one deployment run on a real Prefect server.

Production on a laptop: `prefect server start`, two process work pools (`hcsseg-cpu` for
the pipeline, `hcsseg-gpu` standing in for the GPU pool that trains), the deployments of
deployments/prefect.yaml, and workers in their own processes. An unannotated plate built
from isl-phase-dapi (DAPI only in half the wells) goes through virtual staining, per-plate
training handed to the second pool, the quality gate, segmentation and the report. Both
workers are killed while a model trains on the second pool; a new run of the deployment
resumes after the finished stages and completes.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from prefect.workers.process import ProcessWorker

from hcsseg.export.tables import read_table
from hcsseg.io.plate import open_plate
from hcsseg.model_store import list_models
from hcsseg.pipeline.stages import StageLedger
from tests.conftest import dataset
from tests.plates import isl_partly_stained
from tests.test_e2e_server import (
    PREFECT,
    REPO,
    _api,
    _cli,
    _read_flow_run,
    _runs_of,
    prefect_server,
)

pytestmark = pytest.mark.timeout(900)

CPU, GPU = "hcsseg-cpu", "hcsseg-gpu"
PIPELINE, TRAIN = "plate-pipeline/on-demand", "train-plate/gpu"


def _worker(env: dict[str, str], pool: str, log: Path, *, once: bool) -> subprocess.Popen:
    args = [PREFECT, "worker", "start", "--pool", pool] + (["--run-once"] if once else [])
    with log.open("a") as out:
        return subprocess.Popen(
            args,
            # one torch/BLAS thread per flow run: on a shared 2-core runner thread contention
            # made training 10-30x slower; INFO logs say what hung, if anything
            env={**env, "PREFECT_LOGGING_LEVEL": "INFO", "OMP_NUM_THREADS": "1"},
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _runs(env: dict[str, str]) -> str:
    runs = _api(env, "POST", "/flow_runs/filter", {})
    return "\n".join(f"{r['name']}: {(r.get('state') or {}).get('type')}" for r in runs)


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a worker and every flow-run process under it: no cleanup runs."""
    try:
        root = psutil.Process(proc.pid)
        for child in [*root.children(recursive=True), root]:
            child.kill()
    except psutil.NoSuchProcess:
        pass
    proc.wait(timeout=30)


def _run_pipeline(env: dict[str, str], plate_url: str, config: dict) -> str:
    before = {r["id"] for r in _runs_of(env, PIPELINE)}
    _cli(
        env,
        "deployment",
        "run",
        PIPELINE,
        "--param",
        f"plate_url={plate_url}",
        "--param",
        "preset=annotation-free",
        "--params",
        json.dumps({"config": config}),
    )
    (run,) = [r for r in _runs_of(env, PIPELINE) if r["id"] not in before]
    return run["id"]


def _wait(what: str, condition, timeout: float, *logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            tails = "\n".join(p.read_text(errors="replace")[-3000:] for p in logs if p.exists())
            pytest.fail(f"timed out waiting for {what}:\n{tails}")
        time.sleep(0.5)


def test_annotation_free_pipeline_deployment_with_kill_and_resume(tmp_path, shared_data):
    isl = dataset(shared_data, "isl-phase-dapi")
    plate = isl_partly_stained(isl, tmp_path / "plates" / "isl.zarr")
    home = tmp_path / "prefect-home"
    home.mkdir()
    config = {
        "cell_channel": "MAP2",
        # enough steps that the kill below lands inside a training run
        "train": {"steps": 60, "virtual_steps": 20, "deployment": TRAIN},
    }
    logs = tmp_path / "logs"
    logs.mkdir()
    with prefect_server(home) as env:
        template = ProcessWorker.get_default_base_job_template()
        for pool in (CPU, GPU):
            _api(
                env,
                "POST",
                "/work_pools/",
                {"name": pool, "type": "process", "base_job_template": template},
            )
        _cli(
            env,
            "--no-prompt",
            "deploy",
            "--prefect-file",
            "deployments/prefect.yaml",
            "--name",
            PIPELINE,
            "--name",
            TRAIN,
        )
        # attempt 1: killed while the nucleus model trains on the "GPU" pool
        first = _run_pipeline(env, plate.url, config)
        gpu = _worker(env, GPU, logs / "gpu.log", once=False)
        cpu = _worker(env, CPU, logs / "cpu.log", once=True)
        try:
            _wait(
                "a training run on the GPU pool",
                lambda: any(
                    (r.get("state") or {}).get("type") == "RUNNING" for r in _runs_of(env, TRAIN)
                ),
                420,
                logs / "cpu.log",
                logs / "gpu.log",
            )
            time.sleep(3)
        finally:
            _kill_tree(cpu)
            _kill_tree(gpu)
        ledger = StageLedger(Path(plate.url).with_name("isl_tables"), "isl")
        vs_marker = ledger.root / "virtual-stain.json"
        assert vs_marker.exists(), "the virtual-stain stage should have finished before training"
        assert not (ledger.root / "train-nuclei.json").exists(), "killed before training ended"
        vs_finished = json.loads(vs_marker.read_text())["finished"]
        store = Path(plate.url).with_name("isl_models")
        assert [c["kind"] for c in list_models(store)] == ["virtual_stain"], list_models(store)

        # attempt 2: a new run of the same deployment resumes after the finished stages
        second = _run_pipeline(env, plate.url, config)
        gpu = _worker(env, GPU, logs / "gpu2.log", once=False)
        cpu = _worker(env, CPU, logs / "cpu2.log", once=True)
        try:
            cpu.wait(timeout=600)
        except subprocess.TimeoutExpired:
            tails = "\n".join(
                (logs / n).read_text(errors="replace")[-4000:] for n in ("cpu2.log", "gpu2.log")
            )
            pytest.fail(f"the resumed run did not finish:\n{_runs(env)}\n{tails}")
        finally:
            _kill_tree(cpu)
            _kill_tree(gpu)
        flow_run, artifacts = _read_flow_run(env, second)
        assert flow_run.state is not None
        assert flow_run.state.is_completed(), (flow_run.state.type, flow_run.state.message)
        first_run, _ = _read_flow_run(env, first)
        assert not first_run.state.is_completed()

    # virtual stain done once, by the first attempt; models trained on the second pool
    assert json.loads(vs_marker.read_text())["finished"] == vs_finished
    kinds = sorted(c["kind"] for c in list_models(store))
    assert kinds == ["cells-unsupervised", "nuclei-distance_unet", "virtual_stain"], kinds
    assert all(c.get("request_id") for c in list_models(store) if c["kind"] != "virtual_stain")
    plate = open_plate(plate.url)
    for ref in plate.iter_fields():
        assert "DAPI_virtual" in plate.channel_names(ref)
        assert {"nuclei", "cells"} <= set(plate.label_names(ref))
    tables = Path(plate.url).with_name("isl_tables")
    assert len(read_table(tables, "markers")) > 0
    cells = read_table(tables, "cells")
    assert set(cells.Metadata_Well) == {"B02", "B03", "C02", "C03"}
    assert set(cells.Metadata_NucleusChannelSource) == {"measured", "virtual"}
    gate = read_table(tables, "quality_gate")
    assert set(gate.compartment) == {"nuclei", "cells"}
    for row in gate.itertuples():  # the labels come from whichever the gate picked
        picked = (
            cells.Metadata_NucleiModel if row.compartment == "nuclei" else cells.Metadata_CellsModel
        )
        expected = row.candidate.split()[1] if row.winner == "candidate" else "classical"
        assert set(picked) == {expected}, (row.compartment, row.reason)
    keys = {a.key for a in artifacts if a.flow_run_id == flow_run.id}
    assert any(k.startswith("pipeline-report-isl-") for k in keys if k), keys
