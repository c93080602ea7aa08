"""Deployment entrypoint: `process-plate` with its task runner chosen by the worker's env.

``$HCSSEG_TASK_RUNNER`` (JSON of `hcsseg.pipeline.orchestration.TaskRunnerConfig`, set through the
deployment's ``job_variables.env``) is read when the flow-run process loads this file, so
one deployment per cluster kind (local Dask, a scheduler address, SLURM via
dask-jobqueue) needs no code. Unset, it is the flow's default thread pool.
"""

from __future__ import annotations

from flows.process_plate import process_plate as _process_plate
from hcsseg.pipeline.orchestration import TaskRunnerConfig, task_runner_from_env

process_plate = _process_plate.with_options(
    task_runner=task_runner_from_env(default=TaskRunnerConfig(kind="threads", max_workers=2))
)
