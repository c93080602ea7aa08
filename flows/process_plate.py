"""Prefect flow: a plate in, labels back in the plate, per-cell and QC Parquet out.

Thin wrapper over `hcsseg.pipeline.wells`: plan once, one task per well (fields are looped
inside the task; per-task overhead makes field-level tasks too costly on big plates),
then finalize. Tasks receive paths and keys, never arrays.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.runtime import flow_run
from prefect.task_runners import ThreadPoolTaskRunner

from flows.common import artifact_key
from flows.virtual_stain import virtual_stain_plate
from hcsseg.config import ProcessConfig
from hcsseg.errors import HcssegError
from hcsseg.io.plate import FieldRef, open_plate
from hcsseg.io.plate_lock import plate_write_lock
from hcsseg.pipeline.wells import (
    PlatePlan,
    finalize_plate,
    forget_vanished_wells,
    plan_plate,
    plate_lock,
    process_well,
    well_is_done,
)
from hcsseg.report import plate_report

QC_COLUMNS = ("Metadata_Well", "Metadata_FieldCount", "Image_Count_Nuclei", "Image_Count_Cells")


@task(name="plan plate", task_run_name="plan {plate_url}")
def plan_task(plate_url: str, config: ProcessConfig) -> PlatePlan:
    return plan_plate(plate_url, config)


@task(name="segment and measure well", task_run_name="well {well}")
def well_task(plan: PlatePlan, well: str, config: ProcessConfig) -> dict[str, Any]:
    """One well; a progress artifact on the task run shows its fields as they finish."""
    logger = get_run_logger()
    total = len(open_plate(plan.plate_url).fields(well))
    progress = create_progress_artifact(0.0, description=f"fields done in well {well}")
    finished: list[FieldRef] = []

    def on_field(ref: FieldRef) -> None:
        finished.append(ref)
        logger.info("well %s: field %s done (%d of %d)", well, ref.field, len(finished), total)
        update_progress_artifact(progress, 100.0 * len(finished) / total)

    result = process_well(
        plan, well, config, run_id=str(flow_run.get_id() or ""), on_field=on_field
    )
    logger.info("well %s: %d fields, %d cells", well, result.n_fields, result.n_cells)
    # no well name in the result: Prefect ties a task's inputs to earlier results by object
    # identity, and the plan every well receives holds this very string in `plan.wells`,
    # so each well would be drawn as depending on every well finished before it started
    return {"n_fields": result.n_fields, "n_cells": result.n_cells}


@task(name="finalize plate", task_run_name="finalize {plan.plate_name}")
def finalize_task(plan: PlatePlan) -> list[dict[str, Any]]:
    """Per-well QC summary of the plate (each well wrote its own tables)."""
    summary = finalize_plate(plan, run_id=str(flow_run.get_id() or ""))
    return summary.to_dict(orient="records")


def _qc_markdown_rows(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rec in summary:
        row = {k: rec.get(k) for k in QC_COLUMNS}
        for key, value in rec.items():
            if key.startswith("Image_ImageQuality_FocusScore_"):
                row[key] = round(float(value), 4)
        rows.append(row)
    return rows


@flow(
    name="process-plate",
    flow_run_name="process {plate_url}",
    task_runner=ThreadPoolTaskRunner(max_workers=2),
)
def process_plate(
    plate_url: str, config: ProcessConfig | None = None, force: bool = False
) -> dict[str, Any]:
    """Segment nuclei and cells in every well, write labels, features and QC tables.

    Wells finished by an earlier run with the same options are skipped (so a re-run
    after a crash does only the missing wells).

    Args:
        plate_url: Path or URL of the OME-Zarr HCS plate.
        config: Segmentation, measurement and output options; unset ones keep their defaults.
        force: Redo every well, even those an earlier run finished with the same options.
    """
    config = config or ProcessConfig()
    # staining writes a channel: the plate is held from before it until the last table
    with plate_write_lock(plate_url, "process"):
        return _process(plate_url, config, force)


def _process(plate_url: str, config: ProcessConfig, force: bool) -> dict[str, Any]:
    logger = get_run_logger()
    if config.virtual_stain is not None:
        vs = virtual_stain_plate(
            plate_url, config.virtual_stain, output=config.output, wells=config.wells
        )
        logger.info("virtual staining with model %s: %s", vs["model_id"], vs["qc"])
    plan = plan_task(plate_url, config)
    logger.info(
        "plate %s: %d wells, %d fields; nuclei from %r, cells from %r; tables in %s",
        plan.plate_name,
        len(plan.wells),
        plan.n_fields,
        plan.nucleus_channel,
        plan.cell_channel,
        plan.output_root,
    )
    progress = create_progress_artifact(
        progress=0.0,
        key=artifact_key("progress", plan.plate_name, plan.plate_url),
        description=f"wells done in plate {plan.plate_name}",
    )
    done: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    with plate_lock(plan):
        plate = open_plate(plan.plate_url)
        vanished = forget_vanished_wells(plan, plate)
        if vanished:
            logger.info("dropped tables of wells the plate no longer has: %s", vanished)
        todo = [w for w in plan.wells if force or not well_is_done(plan, w, plate)]
        skipped = len(plan.wells) - len(todo)
        if skipped:
            logger.info("%d wells already done with these options; skipping them", skipped)
        futures = {well_task.submit(plan, w, config): w for w in todo}
        for future in as_completed(list(futures)):
            well = futures[future]
            try:
                done.append(future.result())
            except Exception as exc:  # one bad well must not stop the others
                failed[well] = str(exc)
                logger.error("well %s failed: %s", well, exc)
            finished = skipped + len(done) + len(failed)
            update_progress_artifact(progress, 100.0 * finished / len(plan.wells))
        summary = finalize_task(plan)
    create_table_artifact(
        table=_qc_markdown_rows(summary),
        key=artifact_key("plate-qc", plan.plate_name, plan.plate_url),
        description=f"Per-well QC of plate {plan.plate_name} (tables in {plan.output_root})",
    )
    if summary:
        create_markdown_artifact(
            plate_report(pd.DataFrame(summary), plate_name=plan.plate_name),
            key=artifact_key("plate-report", plan.plate_name, plan.plate_url),
            description=f"Plate heat maps of cell count and focus for {plan.plate_name}",
        )
    if failed:
        lines = "; ".join(f"{w}: {msg}" for w, msg in sorted(failed.items()))
        raise HcssegError(f"{len(failed)} of {len(plan.wells)} wells failed: {lines}")
    return {
        "plate": plan.plate_name,
        "wells": len(done),
        "skipped": skipped,
        "cells": int(sum(rec.get("Image_Count_Cells", 0) for rec in summary)),
        "output": plan.output_root,
    }
