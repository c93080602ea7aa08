"""What Prefect costs on top of the plate work: per-task overhead and plate wall time.

Measures, on Prefect's embedded server (started once, before any timing):

* no-op task overhead: N empty tasks submitted to a thread pool (2 threads) and to an
  already running local Dask cluster (2 single-thread worker processes), minus an empty
  flow run on the same runner;
* a small synthetic plate (4 wells x 2 fields of 384 x 384 px) processed without Prefect
  (plan -> wells -> finalize in a loop), then by the `process-plate` flow on the thread
  pool (1 and 2 threads) and on a local Dask cluster of 1 and 2 worker processes: cluster
  start-up, a first (cold: hcsseg imported in each worker) and a second (warm) run.

    python bench/prefect_overhead.py          # about 3-5 min on 2 shared cores

Writes bench/results/prefect_overhead.json and .md.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
N_THREAD_TASKS = 200
N_DASK_TASKS = 40
WELLS = ("B02", "B03", "C02", "C03")
FIELDS_PER_WELL = 2
SHAPE = (384, 384)


def _noop_flows() -> tuple[Any, Any]:
    from prefect import flow, task

    @task
    def noop(i: int) -> int:
        return i

    @flow(name="bench-noop")
    def many(n: int) -> int:
        futures = [noop.submit(i) for i in range(n)]
        return sum(f.result() for f in futures)

    return many, noop


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def noop_overhead(runner_name: str, runner: Any, n: int) -> dict[str, Any]:
    many, _ = _noop_flows()
    flow = many.with_options(task_runner=runner)
    empty, _ = _timed(flow, 0)  # flow run + runner start-up, no tasks
    full, total = _timed(flow, n)
    assert total == n * (n - 1) // 2
    return {
        "runner": runner_name,
        "tasks": n,
        "empty_flow_s": round(empty, 3),
        "flow_with_tasks_s": round(full, 3),
        "per_task_ms": round(1000 * (full - empty) / n, 2),
    }


@contextmanager
def local_cluster(n_workers: int) -> Iterator[tuple[str, float]]:
    """A local Dask cluster like the one `TaskRunnerConfig(kind="dask")` starts, kept running."""
    from distributed import LocalCluster

    t0 = time.perf_counter()
    cluster = LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=None
    )
    try:
        yield cluster.scheduler_address, time.perf_counter() - t0
    finally:
        cluster.close()


def direct_plate(plate_url: str) -> float:
    """The same work with no Prefect at all: the floor for the flow's wall time."""
    from hcsseg.config import ProcessConfig
    from hcsseg.pipeline.wells import finalize_plate, plan_plate, process_well

    config = ProcessConfig()
    t0 = time.perf_counter()
    plan = plan_plate(plate_url, config)
    for well in plan.wells:
        process_well(plan, well, config)
    finalize_plate(plan)
    return time.perf_counter() - t0


def time_plate_report(plate_url: str) -> float:
    """The plate report (3 heat maps) is part of every flow run's fixed cost."""
    from hcsseg.config import ProcessConfig
    from hcsseg.pipeline.wells import finalize_plate, plan_plate
    from hcsseg.report import plate_report

    summary = finalize_plate(plan_plate(plate_url, ProcessConfig()))
    plate_report(summary)  # first call imports matplotlib and may build its font cache
    wall, _ = _timed(plate_report, summary)
    return wall


def flow_plate(plate_url: str, runner: Any) -> float:
    from flows.process_plate import process_plate

    wall, result = _timed(process_plate.with_options(task_runner=runner), plate_url, force=True)
    assert result["wells"] == len(WELLS), result
    return wall


def main() -> None:
    os.environ.pop("PREFECT_API_URL", None)
    home = Path(tempfile.mkdtemp(prefix="hcsseg-bench-prefect-"))
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    # the embedded server needs more than the default 20 s to start on a busy machine
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    sys.path.insert(0, str(REPO))

    import dask
    import prefect

    from hcsseg.demo import synthetic_plate
    from hcsseg.pipeline.orchestration import TaskRunnerConfig, build_task_runner

    work = home / "plates"
    load_before = os.getloadavg()
    t_start = time.perf_counter()
    plate_url = synthetic_plate(
        work / "bench.zarr", wells=WELLS, fields_per_well=FIELDS_PER_WELL, shape=SHAPE
    ).url

    def threads(n: int) -> Any:
        return build_task_runner(TaskRunnerConfig(kind="threads", max_workers=n))

    # Start the embedded server and warm imports before any timing.
    warm, _ = _timed(noop_overhead, "warm-up", threads(2), 5)
    print(f"embedded server + warm-up: {warm:.1f} s", flush=True)

    def on_cluster(address: str) -> Any:
        return build_task_runner(TaskRunnerConfig(kind="dask", address=address))

    noop = [noop_overhead("thread pool, 2 threads", threads(2), N_THREAD_TASKS)]
    with local_cluster(2) as (address, _):
        noop_overhead("warm-up", on_cluster(address), 2)  # imports in the workers
        noop.append(noop_overhead("local Dask, 2 processes", on_cluster(address), N_DASK_TASKS))
    for row in noop:
        print(row, flush=True)

    direct = min(direct_plate(plate_url) for _ in range(2))
    print(f"direct (no Prefect): {direct:.2f} s", flush=True)
    report_s = time_plate_report(plate_url)
    n_tasks = len(WELLS) + 2  # plan + wells + finalize
    plate_rows: list[dict[str, Any]] = [
        {"how": "no Prefect (sequential loop)", "workers": 1, "wall_s": round(direct, 2)}
    ]

    def plate_row(how: str, workers: int, wall: float, **extra: Any) -> None:
        row = {"how": how, "workers": workers, "wall_s": round(wall, 2)}
        row["speedup_vs_no_prefect"] = round(direct / wall, 2)
        if workers == 1:
            row["overhead_s"] = round(wall - direct, 2)
        row.update(extra)
        plate_rows.append(row)
        print(row, flush=True)

    for workers in (1, 2):
        plate_row(
            "thread pool", workers, min(flow_plate(plate_url, threads(workers)) for _ in "ab")
        )
    for workers in (1, 2):
        with local_cluster(workers) as (address, start):
            cold = flow_plate(plate_url, on_cluster(address))
            warm = flow_plate(plate_url, on_cluster(address))
        plate_row(
            "local Dask, warm workers",
            workers,
            warm,
            cluster_start_s=round(start, 2),
            first_run_s=round(cold, 2),
        )

    result = {
        "benchmark": "prefect_overhead",
        "plate": {
            "wells": len(WELLS),
            "fields_per_well": FIELDS_PER_WELL,
            "shape": list(SHAPE),
            "tasks_per_run": n_tasks,
            "plate_report_s": round(report_s, 2),
        },
        "noop_tasks": noop,
        "plate_runs": plate_rows,
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m_before": round(load_before[0], 2),
            "load_avg_1m_after": round(os.getloadavg()[0], 2),
            "python": platform.python_version(),
            "prefect": prefect.__version__,
            "dask": dask.__version__,
        },
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prefect_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "prefect_overhead.md").write_text(markdown(result))
    shutil.rmtree(home, ignore_errors=True)
    print(markdown(result))


def markdown(r: dict[str, Any]) -> str:
    p, m = r["plate"], r["machine"]
    lines = [
        "# Prefect overhead",
        "",
        f"Prefect {m['prefect']}, Dask {m['dask']}, Python {m['python']}, {m['cpus']} CPU cores "
        f"shared with other jobs (1-min load average {m['load_avg_1m_before']} before, "
        f"{m['load_avg_1m_after']} after). Embedded Prefect server (SQLite). "
        "`python bench/prefect_overhead.py`.",
        "",
        "## No-op tasks",
        "",
        "| task runner | tasks | empty flow run (s) | flow run with tasks (s) | per task (ms) |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['runner']} | {row['tasks']} | {row['empty_flow_s']} | "
        f"{row['flow_with_tasks_s']} | {row['per_task_ms']} |"
        for row in r["noop_tasks"]
    ]
    lines += [
        "",
        f"## Synthetic plate: {p['wells']} wells x {p['fields_per_well']} fields of "
        f"{p['shape'][0]} x {p['shape'][1]} px ({p['tasks_per_run']} tasks per run)",
        "",
        "Overhead = flow wall - no-Prefect wall, with 1 worker: the flow run itself, "
        f"{p['tasks_per_run']} task runs, the progress/table/markdown artifacts and the "
        f"plate report (its heat maps alone take {p['plate_report_s']} s). Dask: wall of "
        "a second run on a running cluster; a deployment that starts its own cluster also "
        "pays the cluster start and the first (cold) run, in which every worker process "
        "imports hcsseg.",
        "",
        "| how | workers | wall (s) | speed-up vs no Prefect | overhead (s) "
        "| cluster start (s) | first run (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {row['how']} | {row['workers']} | {row['wall_s']} | "
        f"{row.get('speedup_vs_no_prefect', '')} | {row.get('overhead_s', '')} | "
        f"{row.get('cluster_start_s', '')} | {row.get('first_run_s', '')} |"
        for row in r["plate_runs"]
    ]
    lines += ["", f"Total benchmark time: {r['total_s']} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
