"""Prefect flow: process every finished plate that lands in a folder, exactly once.

Run on a cron schedule (deployments/prefect.yaml). Each run lists the HCS plates in the
folder, skips those whose status file says they are done (``TABLES/.hcsseg/runs/PLATE.json``,
see `hcsseg.pipeline.orchestration.status_path`), and hands the others to `plate-pipeline` with
the watcher's preset: inside this flow run by default, or as runs of a deployment when
``options.deployment_name`` is set, so a CPU pool (or Dask) does the work while the
watcher stays light. Plates handed to a deployment are marked ``submitted`` and settled on
a later run from the server's record of how their run ended, so a watcher never waits on,
or duplicates, a long run.
"""

from __future__ import annotations

from prefect import flow, get_client, get_run_logger
from prefect.exceptions import ObjectNotFound

from flows.plate_pipeline import plate_pipeline
from hcsseg.config import ProcessConfig
from hcsseg.errors import HcssegError
from hcsseg.pipeline.orchestration import (
    PlateCandidate,
    PlateStatus,
    WatchOptions,
    build_task_runner,
    find_plates,
    needs_processing,
    write_status,
)
from hcsseg.pipeline.presets import PresetName, set_options


def settle_submitted(candidate: PlateCandidate) -> PlateCandidate:
    """Turn a ``submitted`` status into ``completed``/``failed`` once its run has ended."""
    status = candidate.status
    if status is None or status.state != "submitted" or not status.flow_run_id:
        return candidate
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(status.flow_run_id).state
    except ObjectNotFound:
        new = status.moved_to("failed", "flow run no longer on the server")
    else:
        if state is None or not state.is_final():
            return candidate
        if state.is_completed():
            new = status.moved_to("completed")
        else:
            new = status.moved_to("failed", f"{state.type.value}: {state.message or ''}")
    write_status(candidate.status_path, new)
    return candidate.model_copy(update={"status": new})


def submit_plate(
    candidate: PlateCandidate,
    deployment: str,
    config: ProcessConfig,
    *,
    attempt: int,
    preset: PresetName = "classical",
) -> PlateStatus:
    """Create a run of ``deployment`` (a plate-pipeline deployment) and return at once."""
    from prefect.deployments import run_deployment

    run = run_deployment(
        deployment,
        parameters={
            "plate_url": candidate.plate_url,
            "preset": preset,
            "config": set_options(config),
        },
        timeout=0,
        # a second watcher racing this one gets the same flow run back, not a duplicate
        idempotency_key=f"{candidate.plate_url}#{attempt}",
    )
    status = PlateStatus(
        state="submitted", plate_url=candidate.plate_url, attempts=attempt, flow_run_id=str(run.id)
    )
    write_status(candidate.status_path, status)
    return status


@flow(name="watch-plates", flow_run_name="watch {folder}")
def watch_plates(
    folder: str,
    options: WatchOptions | None = None,
    config: ProcessConfig | None = None,
    preset: PresetName = "classical",
) -> dict[str, list[str]]:
    """Run the plate pipeline on every plate in ``folder`` that has not been processed yet.

    Args:
        folder: Folder the acquisition side copies plates (``*.zarr``) into; created, with
            a warning, when missing.
        options: How plates are found and handed on (pattern, settling age, deployment).
        config: Options that override the preset for every plate (only those set count).
        preset: classical, annotation-free or supervised.
    """
    logger = get_run_logger()
    options = options or WatchOptions()
    config = config or ProcessConfig()
    found = find_plates(folder, options=options, config=config, logger=logger)
    candidates = [settle_submitted(c) for c in found]
    todo = [c for c in candidates if needs_processing(c, max_attempts=options.max_attempts)]
    now, later = todo[: options.max_plates], todo[options.max_plates :]
    logger.info(
        "%s: %d plates, %d to process, %d this run", folder, len(candidates), len(todo), len(now)
    )
    report: dict[str, list[str]] = {
        "submitted": [],
        "completed": [],
        "failed": [],
        "waiting": [c.plate_url for c in later],
    }
    runner = plate_pipeline
    if options.task_runner is not None:
        runner = plate_pipeline.with_options(task_runner=build_task_runner(options.task_runner))
    for cand in now:
        attempt = (cand.status.attempts if cand.status else 0) + 1
        if options.deployment_name:
            submit_plate(cand, options.deployment_name, config, attempt=attempt, preset=preset)
            report["submitted"].append(cand.plate_url)
            continue
        state = runner(cand.plate_url, preset, config, return_state=True)
        ok = state.is_completed()
        write_status(
            cand.status_path,
            PlateStatus(
                state="completed" if ok else "failed",
                plate_url=cand.plate_url,
                attempts=attempt,
                flow_run_id=str(state.state_details.flow_run_id or ""),
                message="" if ok else str(state.message or state.type.value),
            ),
        )
        report["completed" if ok else "failed"].append(cand.plate_url)
        if not ok:
            logger.error("plate %s failed (attempt %d): %s", cand.plate_url, attempt, state.message)
    if report["failed"]:
        raise HcssegError(f"{len(report['failed'])} plate(s) failed: {', '.join(report['failed'])}")
    return report
