"""Task runner selection, GPU hand-off, plate report, watch-folder bookkeeping."""

from __future__ import annotations

import base64
import importlib.util
import os
import re
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner
from pydantic import ValidationError

from flows.process_plate import process_plate
from flows.watch_plates import settle_submitted, watch_plates
from hcsseg.config import ProcessConfig
from hcsseg.demo import synthetic_plate
from hcsseg.errors import HcssegError, InputDataError
from hcsseg.export.tables import read_table
from hcsseg.pipeline.orchestration import (
    GPU_DEPLOYMENT_ENV,
    TASK_RUNNER_ENV,
    PlateStatus,
    TaskRunnerConfig,
    WatchOptions,
    build_task_runner,
    emit_plate_ready,
    find_plates,
    needs_processing,
    read_status,
    status_path,
    submit_gpu_work,
    task_runner_from_env,
    write_status,
)
from hcsseg.report import ReportOptions, plate_report, row_index, row_label

# ---------------------------------------------------------------- task runners


def test_default_runner_is_a_two_thread_pool():
    runner = build_task_runner()
    assert isinstance(runner, ThreadPoolTaskRunner)
    assert runner._max_workers == 2
    assert build_task_runner(TaskRunnerConfig(max_workers=5))._max_workers == 5


def test_local_dask_cluster_has_single_threaded_worker_processes():
    runner = build_task_runner(TaskRunnerConfig(kind="dask", max_workers=3, adapt_maximum=6))
    assert isinstance(runner, DaskTaskRunner)
    assert runner.cluster_kwargs["n_workers"] == 3
    assert runner.cluster_kwargs["threads_per_worker"] == 1
    assert runner.cluster_kwargs["processes"] is True
    assert runner.adapt_kwargs == {"maximum": 6}
    assert runner.resolved_cluster_class.__name__ == "LocalCluster"


def test_existing_scheduler_address():
    runner = build_task_runner(TaskRunnerConfig(kind="dask", address="tcp://sched:8786"))
    assert isinstance(runner, DaskTaskRunner)
    assert runner.address == "tcp://sched:8786"


def test_cluster_class_by_import_path():
    cfg = TaskRunnerConfig(
        kind="dask",
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={"n_workers": 1},
        adapt_minimum=1,
        adapt_maximum=4,
    )
    runner = build_task_runner(cfg)
    assert runner.cluster_kwargs == {"n_workers": 1}
    assert runner.adapt_kwargs == {"minimum": 1, "maximum": 4}


@pytest.mark.skipif(
    importlib.util.find_spec("dask_jobqueue") is not None, reason="dask-jobqueue is installed"
)
def test_missing_cluster_package_says_what_to_install():
    cfg = TaskRunnerConfig(kind="dask", cluster_class="dask_jobqueue.SLURMCluster")
    with pytest.raises(HcssegError, match="pip install dask-jobqueue"):
        build_task_runner(cfg)
    with pytest.raises(HcssegError, match="has no 'NoSuchCluster'"):
        build_task_runner(TaskRunnerConfig(kind="dask", cluster_class="distributed.NoSuchCluster"))


@pytest.mark.parametrize(
    "fields",
    [
        {"kind": "threads", "address": "tcp://x:1"},
        {"kind": "threads", "cluster_class": "distributed.LocalCluster"},
        {"kind": "dask", "address": "tcp://x:1", "cluster_class": "distributed.LocalCluster"},
        {"kind": "dask", "adapt_minimum": 5, "adapt_maximum": 2},
        {"kind": "ray"},
        {"max_workers": 0},
    ],
)
def test_inconsistent_runner_configs_are_rejected(fields):
    with pytest.raises(ValidationError):
        TaskRunnerConfig(**fields)


def test_runner_from_environment():
    env = {TASK_RUNNER_ENV: '{"kind": "dask", "address": "tcp://sched:8786"}'}
    assert task_runner_from_env(env).address == "tcp://sched:8786"
    default = task_runner_from_env({}, default=TaskRunnerConfig(max_workers=3))
    assert isinstance(default, ThreadPoolTaskRunner) and default._max_workers == 3
    with pytest.raises(HcssegError, match=TASK_RUNNER_ENV):
        task_runner_from_env({TASK_RUNNER_ENV: '{"kind": "dask", "adress": "tcp://x:1"}'})
    with pytest.raises(HcssegError, match=TASK_RUNNER_ENV):
        task_runner_from_env({TASK_RUNNER_ENV: "dask please"})


def test_gpu_work_runs_locally_without_a_gpu_deployment(monkeypatch):
    monkeypatch.delenv(GPU_DEPLOYMENT_ENV, raising=False)
    assert submit_gpu_work(None, {"plate_url": "x.zarr"}) is None
    monkeypatch.setenv(GPU_DEPLOYMENT_ENV, "train-plate")
    with pytest.raises(HcssegError, match="flow-name/deployment-name"):
        submit_gpu_work(None, {})


@pytest.mark.parametrize(
    "processes",
    [
        # in-process Dask workers: the runner plumbing, in seconds
        False,
        # worker processes: plans and well tasks cross process boundaries (each worker
        # imports hcsseg: 15-90 s on 2 busy cores)
        pytest.param(True, marks=pytest.mark.slow),
    ],
)
def test_process_plate_on_a_local_dask_cluster(tmp_path, processes):
    plate = synthetic_plate(
        tmp_path / "d.zarr", wells=("B02",), fields_per_well=1, shape=(128, 128)
    )
    cfg = TaskRunnerConfig(kind="dask", max_workers=1, cluster_kwargs={"processes": processes})
    runner = build_task_runner(cfg)
    result = process_plate.with_options(task_runner=runner)(plate.url)
    cells = read_table(result["output"], "cells")
    assert result["wells"] == 1 and result["cells"] == len(cells) > 0


def test_wells_depend_on_the_plan_only(tmp_path):
    """The server's task graph: each well hangs off the plan, never off another well
    (three wells on two threads: the third starts after a first one has finished), and
    each well's fields show up as a progress artifact of its task run."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterTaskRunId,
        FlowRunFilter,
        FlowRunFilterId,
    )

    plate = synthetic_plate(
        tmp_path / "g.zarr", wells=("B02", "B03", "C02"), fields_per_well=2, shape=(96, 96)
    )
    state = process_plate(plate.url, return_state=True)
    assert state.is_completed()
    runs = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=runs)
        wells = {tr.id: tr for tr in task_runs if tr.name.startswith("well ")}
        # this run's artifacts only: a database kept between sessions holds many more
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(task_run_id=ArtifactFilterTaskRunId(any_=list(wells)))
        )
    (plan,) = [tr.id for tr in task_runs if tr.name.startswith("plan ")]
    assert len(wells) == 3
    for run in wells.values():
        upstream = {i.id for inputs in run.task_inputs.values() for i in inputs}
        assert not upstream & set(wells), (run.name, run.task_inputs)
        assert plan in upstream, (run.name, run.task_inputs)
    progress = [a for a in artifacts if a.task_run_id in wells and a.type == "progress"]
    assert len(progress) == 3 and all(a.data == 100.0 for a in progress), progress


# ---------------------------------------------------------------- plate report


def _qc(wells, cells, focus, pcc=None):
    df = pd.DataFrame(
        {
            "Metadata_Plate": "P1",
            "Metadata_Well": wells,
            "Metadata_FieldCount": 2,
            "Image_Count_Cells": cells,
            "Image_ImageQuality_FocusScore_DNA": focus,
        }
    )
    if pcc is not None:
        df["Image_VirtualStaining_PCC_DNA"] = pcc
    return df


def _pngs(markdown: str) -> list[bytes]:
    return [
        base64.b64decode(m)
        for m in re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    ]


def test_report_embeds_one_png_heat_map_per_metric():
    wells = [f"{r}{c:02d}" for r in "BCD" for c in range(2, 8)]
    cells = [100.0 + i for i in range(len(wells))]
    cells[4] = 900.0
    md = plate_report(_qc(wells, cells, 0.2, pcc=0.8))
    pngs = _pngs(md)
    assert len(pngs) == 3
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") for p in pngs)
    assert "# Plate report: P1" in md
    assert "## Cell count" in md and "## Focus score (DNA)" in md and "Virtual staining PCC" in md
    assert "18 wells with data on a 8 x 12 grid, 36 fields" in md
    assert re.search(r"Outlier wells .*: B06 \(z=\+", md)
    # Constant focus: no spread, no outliers
    focus_section = md.split("## Focus score (DNA)")[1].split("##")[0]
    assert "Outlier" not in focus_section


def test_report_handles_missing_wells_and_nan():
    df = _qc(["A01", "H12", "C05"], [10.0, np.nan, 30.0], [np.nan, np.nan, np.nan])
    df.index = [7, 3, 9]  # a filtered frame: labels are not positions
    md = plate_report(df, options=ReportOptions(plate_format="96"))
    assert len(_pngs(md)) == 2
    assert "| 20 | 10 (A01) | 30 (C05) | 1 |" in md
    assert "No well has a value." in md


def test_report_picks_the_plate_format_from_the_wells():
    md = plate_report(_qc(["A01", "P24"], [1, 2], [0.1, 0.2]), options=ReportOptions(dpi=40))
    assert "16 x 24 grid" in md
    md = plate_report(_qc(["AF48"], [1], [0.1]), options=ReportOptions(metrics=[], dpi=40))
    assert "32 x 48 grid" in md and "No QC metric columns" in md
    assert (row_index("AF"), row_label(31), row_label(0)) == (31, "AF", "A")


@pytest.mark.parametrize(
    ("df", "options", "message"),
    [
        (pd.DataFrame({"Well": ["A01"]}), None, "no Metadata_Well"),
        (_qc(["A01", "A01"], [1, 2], [0.1, 0.2]), None, "more than once"),
        (_qc(["A1x"], [1], [0.1]), None, "not a well name"),
        (_qc([], [], []), None, "empty"),
        (_qc(["P24"], [1], [0.1]), ReportOptions(plate_format="96"), "do not fit a 96-well"),
        (_qc(["A01"], [1], [0.1]), ReportOptions(metrics=["Image_Nope"]), "Image_Nope"),
        (
            _qc(["A01"], [1], [0.1]).assign(Metadata_Well=["A01"], x="s"),
            ReportOptions(metrics=["x"]),
            "not numeric",
        ),
    ],
)
def test_report_rejects_bad_tables(df, options, message):
    with pytest.raises(InputDataError, match=message):
        plate_report(df, options=options)


def test_report_rejects_several_plates():
    df = pd.concat([_qc(["A01"], [1], [0.1]), _qc(["A02"], [1], [0.1]).assign(Metadata_Plate="P2")])
    with pytest.raises(InputDataError, match="2 plates"):
        plate_report(df)


# ---------------------------------------------------------------- watch folder


def _tiny(path: Path) -> str:
    return synthetic_plate(path, wells=("B02",), fields_per_well=1, shape=(96, 96)).url


def test_find_plates_lists_only_settled_hcs_plates(tmp_path):
    old, fresh = _tiny(tmp_path / "old.zarr"), _tiny(tmp_path / "fresh.zarr")
    (tmp_path / "not-hcs.zarr").mkdir()
    (tmp_path / "other-folder").mkdir()
    past = time.time() - 600
    os.utime(old, (past, past))
    for meta in Path(old).glob("zarr.json"):
        os.utime(meta, (past, past))
    found = find_plates(tmp_path, options=WatchOptions(min_age_seconds=300))
    assert [c.plate_url for c in found] == [old]
    assert found[0].status is None
    assert found[0].status_path == tmp_path / "old_tables" / ".hcsseg/runs/demo-synthetic.json"
    everything = find_plates(tmp_path, options=WatchOptions(min_age_seconds=0))
    assert [c.plate_url for c in everything] == [fresh, old]
    nested = _tiny(tmp_path / "run1" / "nested.zarr")
    recursive = find_plates(tmp_path, options=WatchOptions(min_age_seconds=0, recursive=True))
    assert [c.plate_url for c in recursive] == [fresh, old, nested]
    (tmp_path / "a-file").write_text("")
    with pytest.raises(HcssegError, match="not a folder"):
        find_plates(tmp_path / "a-file")


def test_a_missing_watched_folder_is_created_with_a_warning(tmp_path, caplog):
    """After infra/bootstrap.sh nobody has made the folder yet: no plates, not a failure."""
    folder = tmp_path / "data" / "incoming"
    with caplog.at_level("WARNING", logger="hcsseg.pipeline.orchestration"):
        assert find_plates(folder) == []
    assert folder.is_dir()
    assert "did not exist; created it" in caplog.text
    report = watch_plates(str(tmp_path / "elsewhere"), WatchOptions(min_age_seconds=0))
    assert report == {"submitted": [], "completed": [], "failed": [], "waiting": []}
    assert (tmp_path / "elsewhere").is_dir()


def test_plate_ready_event_carries_preset_and_set_options_only(monkeypatch):
    import prefect.events

    sent: list[dict] = []
    monkeypatch.setattr(prefect.events, "emit_event", lambda **kw: sent.append(kw))
    emit_plate_ready("/data/p1.zarr")
    emit_plate_ready(
        "/data/p2.zarr", preset="annotation-free", config=ProcessConfig(cell_channel="MAP2")
    )
    assert sent[0]["payload"] == {"plate_url": "/data/p1.zarr"}
    assert sent[0]["resource"]["prefect.resource.id"] == "hcs.plate.p1"
    assert sent[1]["payload"] == {
        "plate_url": "/data/p2.zarr",
        "preset": "annotation-free",
        "config": {"cell_channel": "MAP2"},
    }


def test_status_decides_what_needs_processing(tmp_path):
    url = _tiny(tmp_path / "a.zarr")
    path = status_path(url, "demo-synthetic", ProcessConfig())
    (cand,) = find_plates(tmp_path, options=WatchOptions(min_age_seconds=0))
    assert needs_processing(cand, max_attempts=3)
    cases = [
        (PlateStatus(state="completed", plate_url=url, attempts=1), False),
        (PlateStatus(state="submitted", plate_url=url, attempts=1), False),
        (PlateStatus(state="failed", plate_url=url, attempts=2), True),
        (PlateStatus(state="failed", plate_url=url, attempts=3), False),
    ]
    for status, expected in cases:
        write_status(path, status)
        assert read_status(path) == status
        (cand,) = find_plates(tmp_path, options=WatchOptions(min_age_seconds=0))
        assert needs_processing(cand, max_attempts=3) is expected, status
    path.write_text("{not json")
    with pytest.raises(HcssegError, match="corrupt"):
        find_plates(tmp_path, options=WatchOptions(min_age_seconds=0))


def test_watch_processes_each_new_plate_once(tmp_path):
    done_url, new_url = _tiny(tmp_path / "done.zarr"), _tiny(tmp_path / "new.zarr")
    done_status = status_path(done_url, "demo-synthetic", ProcessConfig())
    write_status(done_status, PlateStatus(state="completed", plate_url=done_url, attempts=1))
    options = WatchOptions(min_age_seconds=0)

    report = watch_plates(str(tmp_path), options)
    assert report == {"submitted": [], "completed": [new_url], "failed": [], "waiting": []}
    assert not (tmp_path / "done_tables" / "cells").exists()
    assert len(read_table(tmp_path / "new_tables", "cells")) > 0
    status = read_status(status_path(new_url, "demo-synthetic", ProcessConfig()))
    assert status is not None and status.state == "completed" and status.attempts == 1
    uuid.UUID(status.flow_run_id or "")

    assert watch_plates(str(tmp_path), options)["completed"] == []

    # A submitted run the server no longer knows about is settled as failed, then retried.
    write_status(
        done_status,
        PlateStatus(
            state="submitted", plate_url=done_url, attempts=1, flow_run_id=str(uuid.uuid4())
        ),
    )
    (cand,) = [c for c in find_plates(tmp_path, options=options) if c.plate_url == done_url]
    settled = settle_submitted(cand)
    assert settled.status is not None and settled.status.state == "failed"
    assert "no longer on the server" in settled.status.message
    assert needs_processing(settled, max_attempts=3)
