"""Issue 14: data integrity and security under faults.

14.4 a run parameter cannot name arbitrary code as the Dask cluster class; 14.5 ground truth
that is not one label plane, and damaged model cards, are named instead of silently
scoring or choosing wrong; 14.6 the embedded Prefect server dies with a killed command.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from prefect_dask import DaskTaskRunner
from pydantic import ValidationError
from typer.testing import CliRunner

from hcsseg.cli import app
from hcsseg.demo import synthetic_plate
from hcsseg.errors import HcssegError, InputDataError, ModelError
from hcsseg.evaluate.plate_eval import evaluate_plate
from hcsseg.io.labels import label_group, write_labels
from hcsseg.io.plate import Plate, open_plate
from hcsseg.io.plate_writer import create_array
from hcsseg.learning.data import read_truth_labels
from hcsseg.model_store import find_model, latest_model, list_models, model_dir, save_model
from hcsseg.pipeline import orchestration
from hcsseg.pipeline.orchestration import (
    CLUSTER_CLASSES_ENV,
    SERVER_APP,
    SERVER_REGISTRY_ENV,
    TASK_RUNNER_ENV,
    TaskRunnerConfig,
    build_task_runner,
    reap_orphan_servers,
    task_runner_from_env,
)

REPO = Path(__file__).resolve().parents[1]
LINUX = sys.platform.startswith("linux")

# ---------------------------------------------------------------- 14.4 cluster allow-list


@pytest.fixture
def no_imports_or_commands(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) any module import or process start the code under test makes."""
    calls: list[str] = []

    def no_import(name: str, *args: object, **kwargs: object) -> None:
        calls.append(f"import {name}")
        raise AssertionError(f"imported {name}")

    def no_popen(*args: object, **kwargs: object) -> None:
        calls.append(f"Popen {args}")
        raise AssertionError("started a process")

    monkeypatch.setattr(importlib, "import_module", no_import)
    monkeypatch.setattr(subprocess, "Popen", no_popen)
    return calls


def test_cluster_class_outside_the_allow_list_is_refused_before_any_import(
    monkeypatch: pytest.MonkeyPatch, no_imports_or_commands: list[str]
) -> None:
    monkeypatch.delenv(CLUSTER_CLASSES_ENV, raising=False)
    with pytest.raises(ValidationError, match=rf"not an allowed.*\${CLUSTER_CLASSES_ENV}") as info:
        TaskRunnerConfig(
            kind="dask", cluster_class="subprocess.Popen", cluster_kwargs={"args": "x"}
        )
    message = str(info.value.errors()[0]["msg"])
    assert "dask_jobqueue.SLURMCluster" in message and "distributed.LocalCluster" in message
    assert "\n" not in message
    # the same parameter through the worker's environment
    raw = json.dumps({"kind": "dask", "cluster_class": "os.system"})
    with pytest.raises(HcssegError, match="not an allowed"):
        task_runner_from_env({TASK_RUNNER_ENV: raw})
    # a config built without validation is checked again before the import
    unchecked = TaskRunnerConfig.model_construct(kind="dask", cluster_class="subprocess.Popen")
    with pytest.raises(HcssegError, match="'subprocess.Popen' is not an allowed"):
        build_task_runner(unchecked)
    assert no_imports_or_commands == []


def test_known_cluster_classes_still_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(CLUSTER_CLASSES_ENV, raising=False)
    runner = build_task_runner(
        TaskRunnerConfig(kind="dask", cluster_class="distributed.LocalCluster")
    )
    assert isinstance(runner, DaskTaskRunner)
    assert runner.resolved_cluster_class.__name__ == "LocalCluster"
    # a trusted cluster package, but not a cluster: refused before it is called
    with pytest.raises(HcssegError, match="'distributed.Client' is not a Dask cluster class"):
        build_task_runner(TaskRunnerConfig(kind="dask", cluster_class="distributed.Client"))


def test_operator_registers_more_cluster_classes_in_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    extra = "distributed.deploy.spec.SpecCluster"
    monkeypatch.delenv(CLUSTER_CLASSES_ENV, raising=False)
    with pytest.raises(ValidationError, match="not an allowed"):
        TaskRunnerConfig(kind="dask", cluster_class=extra)
    monkeypatch.setenv(CLUSTER_CLASSES_ENV, f"site.Cluster , {extra},")
    runner = build_task_runner(TaskRunnerConfig(kind="dask", cluster_class=extra))
    assert runner.resolved_cluster_class.__name__ == "SpecCluster"
    with pytest.raises(ValidationError, match="not an allowed"):
        TaskRunnerConfig(kind="dask", cluster_class="subprocess.Popen")


# ---------------------------------------------------------------- 14.5 ground truth planes


def _plate_with_truth(tmp_path: Path, truth: np.ndarray) -> Plate:
    """One 64² field with `nuclei` (two objects) and `nuclei_gt` stored as `truth`, whatever
    its shape (foreign annotations are not written by hcsseg)."""
    synthetic_plate(tmp_path / "p.zarr", wells=("B02",), fields_per_well=1, shape=(64, 64))
    plate = open_plate(tmp_path / "p.zarr", mode="r+")
    (ref,) = plate.iter_fields()
    pred = np.zeros((64, 64), np.uint32)
    pred[5:20, 5:20], pred[30:50, 30:50] = 1, 2
    write_labels(plate, ref, "nuclei", pred)
    write_labels(plate, ref, "nuclei_gt", pred)
    group = label_group(plate, ref, "nuclei_gt")
    dims = [*["t", "c", "z"][5 - truth.ndim :], "y", "x"]
    arr = create_array(
        group, "0", shape=truth.shape, dtype=truth.dtype, dims=dims, version="0.5", overwrite=True
    )
    arr[...] = truth
    return open_plate(plate.url)


def _two_overlapping_planes() -> np.ndarray:
    stack = np.zeros((2, 64, 64), np.uint32)
    stack[0, 5:20, 5:20], stack[0, 30:50, 30:50] = 1, 2
    stack[1, 10:40, 10:40] = 1  # overlaps both objects of plane 0
    return stack


def test_overlapping_truth_planes_are_refused_not_cut_to_one(tmp_path: Path) -> None:
    plate = _plate_with_truth(tmp_path, _two_overlapping_planes())
    expected = r"plate demo-synthetic field B/02/0 \(well B02\) label image 'nuclei_gt' has shape "
    with pytest.raises(InputDataError, match=expected + r"\(2, 64, 64\)"):
        evaluate_plate(plate.url, pred="nuclei", truth="nuclei_gt")
    (ref,) = plate.iter_fields()
    with pytest.raises(InputDataError, match=r"\(2, 64, 64\)"):
        read_truth_labels(plate, ref, "nuclei_gt")  # what gate and training truths use
    result = CliRunner().invoke(
        app, ["evaluate", plate.url, "--pred", "nuclei", "--truth", "nuclei_gt"]
    )
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert "'nuclei_gt'" in line and "(2, 64, 64)" in line and "B/02/0" in line


def test_singleton_leading_axes_of_truth_are_fine(tmp_path: Path) -> None:
    plate = _plate_with_truth(tmp_path, _two_overlapping_planes()[:1, None])  # (1, 1, Y, X)
    _, summary = evaluate_plate(plate.url, pred="nuclei", truth="nuclei_gt")
    assert summary["n_true"] == 2 and summary["ap_50_pooled"] == pytest.approx(1.0)


def test_float_truth_is_refused(tmp_path: Path) -> None:
    plate = _plate_with_truth(tmp_path, np.full((64, 64), 0.5, np.float32))
    with pytest.raises(InputDataError, match="'nuclei_gt' has non-integer values"):
        evaluate_plate(plate.url, pred="nuclei", truth="nuclei_gt")


# ---------------------------------------------------------------- 14.5 damaged model cards


def test_damaged_card_is_named_not_silently_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    older = save_model(tmp_path, "virtual_stain", {"w": torch.ones(2)}, {"plate": "P1"})
    newer = save_model(
        tmp_path, "virtual_stain", {"w": torch.zeros(2)}, {"plate": "P1", "request_id": "r1"}
    )
    assert latest_model(tmp_path, "virtual_stain", plate="P1") == newer
    card = tmp_path / newer / "model_card.json"
    card.write_text('{"model_id": "' + newer + '", truncated')
    # the caller asked for the newest model of P1: not the older one in its place
    with pytest.raises(ModelError, match=rf"model card {re.escape(str(card))} is not valid JSON"):
        latest_model(tmp_path, "virtual_stain", plate="P1")
    with pytest.raises(ModelError, match=re.escape(str(card))):
        find_model(tmp_path, request_id="r1")
    with pytest.raises(ModelError, match=rf"damaged cards: {re.escape(str(card))}"):
        model_dir(tmp_path, "nope")
    assert [c["model_id"] for c in list_models(tmp_path)] == [older]  # listing: warning
    assert str(card) in caplog.text
    result = CliRunner().invoke(app, ["models", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert f"damaged model card {card}: not valid JSON" in result.stderr
    assert older in result.stdout and newer not in result.stdout


def test_card_that_is_not_an_object_is_damaged(tmp_path: Path) -> None:
    model = save_model(tmp_path, "virtual_stain", {"w": torch.ones(2)}, {"plate": "P1"})
    (tmp_path / model / "model_card.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match="is not a JSON object"):
        latest_model(tmp_path, "virtual_stain")
    result = CliRunner().invoke(app, ["models", str(tmp_path)])
    assert result.exit_code == 0 and "not a JSON object" in result.stderr
    assert f"no models in {tmp_path}" in result.stdout


# ---------------------------------------------------------------- 14.6 orphaned server

CHILD = """
import sys, time
from hcsseg.pipeline.orchestration import embedded_server, prefect_api
with prefect_api():
    print(embedded_server().process.pid, flush=True)
    time.sleep(600)
"""


def _pid_gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not orchestration._process_alive(pid):
            return True
        time.sleep(0.2)
    return False


@pytest.mark.skipif(not LINUX, reason="the parent-death signal is Linux's")
@pytest.mark.timeout(400)
def test_embedded_server_dies_with_a_killed_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = tmp_path / "registry"
    monkeypatch.setenv(SERVER_REGISTRY_ENV, str(registry))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        SERVER_REGISTRY_ENV: str(registry),
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "OMP_NUM_THREADS": "1",
    }
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first: list[str] = []
    reader = threading.Thread(target=lambda: first.append(child.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout=300)  # the embedded server needs 10-60 s on a loaded machine
    server = int(first[0]) if first and first[0].strip() else None
    try:
        assert server is not None, f"no server pid; stderr: {child.stderr.read()[-2000:]}"
        assert orchestration._is_prefect_server(server)
        assert [p.name for p in registry.glob("*.json")] == [f"{server}.json"]
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=30)
        assert _pid_gone(server, within=15), f"server {server} outlived its killed command"
        # the entry the killed command left is stale: the next start drops it
        assert reap_orphan_servers() == []
        assert list(registry.glob("*.json")) == []
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if server is not None and orchestration._is_prefect_server(server):
            os.kill(server, signal.SIGKILL)


def _entry(registry: Path, server: int, owner: int, **extra: object) -> Path:
    path = registry / f"{server}.json"
    path.write_text(json.dumps({"server_pid": server, "owner_pid": owner, "port": 1, **extra}))
    return path


def _sleeper(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", *args])


@pytest.mark.skipif(not LINUX, reason="command lines are read from /proc")
def test_orphans_are_stopped_and_stale_entries_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = tmp_path / "registry"
    monkeypatch.setenv(SERVER_REGISTRY_ENV, str(registry))
    assert reap_orphan_servers() == []  # makes the (private) folder
    assert registry.stat().st_mode & 0o777 == 0o700
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    orphan = _sleeper("-m", "uvicorn", "--factory", SERVER_APP)  # looks like the server
    other = _sleeper()  # an unrelated process whose pid an entry names
    mine = _sleeper("-m", "uvicorn", "--factory", SERVER_APP)  # a live owner's server
    try:
        time.sleep(0.5)  # let the sleepers exec, so /proc shows their own command lines
        start = orchestration._proc_stat(orphan.pid)
        assert start is not None
        _entry(registry, orphan.pid, gone.pid, server_start=start[1])
        _entry(registry, other.pid, gone.pid)
        _entry(registry, gone.pid, os.getpid())  # server already gone
        kept = _entry(registry, mine.pid, os.getpid())
        (registry / "999999999.json").write_text("{broken")
        assert reap_orphan_servers(grace=5) == [orphan.pid]
        assert orphan.wait(timeout=10) == -signal.SIGTERM
        assert other.poll() is None and mine.poll() is None  # never signalled
        assert sorted(registry.glob("*.json")) == [kept]
    finally:
        for proc in (orphan, other, mine):
            proc.kill()
            proc.wait()
