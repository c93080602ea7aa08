"""Prefect flow: learn a plate's nucleus stain and predict it into every field.

Thin wrapper over `hcsseg.virtual_stain.plate`: plan (channel checks, nothing written),
one training task (GPU when the worker has one), one prediction task per well, then a
QC artifact comparing virtual and real markers on fields the model never trained on.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.futures import as_completed

from flows.common import artifact_key
from hcsseg.config import ProcessConfig
from hcsseg.errors import HcssegError
from hcsseg.io.plate_lock import plate_write_lock
from hcsseg.model_store import latest_model, load_card
from hcsseg.pipeline.orchestration import check_remote_run, gpu_slot, submit_gpu_work
from hcsseg.report import training_report
from hcsseg.virtual_stain.options import KIND
from hcsseg.virtual_stain.plate import (
    VirtualStainConfig,
    VirtualStainPlan,
    plan_virtual_stain,
    predict_well,
    train_plate_model,
)

QC_KEYS = ("Image_VirtualStain_MarkerFNRate", "Image_VirtualStain_MarkerFPRate")


@task(name="train virtual-staining model", task_run_name="train on {plan.plate_name}")
def train_task(plan: VirtualStainPlan, config: VirtualStainConfig) -> str:
    with gpu_slot():
        return train_plate_model(plan, config)


@flow(name="train-virtual-stain", flow_run_name="train virtual stain {plate_url}")
def train_virtual_stain(
    plate_url: str,
    config: VirtualStainConfig,
    output: str | None = None,
    wells: list[str] | None = None,
) -> str:
    """Training alone, for a GPU work pool: the model lands in the store, its id returns.

    Args:
        plate_url: Path or URL of the OME-Zarr HCS plate.
        config: Virtual-staining options: source and target channels, model, training.
        output: Tables folder; default PLATE_tables beside the plate
            (PLATE: the plate folder's name).
        wells: Wells to learn from (e.g. ``["B02"]``); default every well.
    """
    output_root = str(ProcessConfig(output=output).output_root(plate_url))
    plan = plan_virtual_stain(plate_url, config, output_root=output_root, wells=wells)
    return train_task(plan, config)


def _train(plan: VirtualStainPlan, config: VirtualStainConfig, output: str | None) -> str:
    """Train here, or on the GPU pool when a GPU deployment is configured (paths cross, not
    weights: the GPU run writes the model into the shared store, we read its id back)."""
    params = {
        "plate_url": plan.plate_url,
        "config": config.model_dump(mode="json"),
        "output": output,
        "wells": plan.wells,
    }
    run = submit_gpu_work(config.gpu_deployment, params)
    if run is None:
        return train_task(plan, config)
    check_remote_run(run, "virtual-staining training")
    model_id = latest_model(config.store(plan.plate_url), KIND, plate=plan.plate_name)
    if model_id is None:
        raise HcssegError(f"GPU training run {run.name} finished but stored no model")
    return model_id


@task(name="predict virtual stain", task_run_name="virtual stain well {well}")
def predict_task(
    plan: VirtualStainPlan,
    well: str,
    config: VirtualStainConfig,
    model_id: str,
    validation_fields: list[str],
    training_fields: list[str],
) -> list[dict[str, Any]]:
    return predict_well(
        plan,
        well,
        config,
        model_id,
        validation_fields=validation_fields,
        training_fields=training_fields,
    )


def qc_summary(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean PCC and marker FN/FP per role (training / validation / held-out fields)."""
    frame = pd.DataFrame(rows)
    pcc = [c for c in frame.columns if c.startswith("Image_VirtualStain_PCC_")]
    if frame.empty or not pcc:
        return []
    scored = frame.dropna(subset=pcc)
    out = []
    for role, group in scored.groupby("Metadata_VirtualStainRole"):
        out.append(
            {
                "fields": role,
                "n": len(group),
                "pcc": round(float(group[pcc[0]].mean()), 4),
                "marker_fn_rate": round(float(group[QC_KEYS[0]].mean()), 4),
                "marker_fp_rate": round(float(group[QC_KEYS[1]].mean()), 4),
            }
        )
    return out


@flow(name="virtual-stain-plate", flow_run_name="virtual stain {plate_url}")
def virtual_stain_plate(
    plate_url: str,
    config: VirtualStainConfig,
    output: str | None = None,
    wells: list[str] | None = None,
) -> dict[str, Any]:
    """Train (or reuse) the plate's virtual-staining model and fill TARGET_virtual in
    (TARGET: the nucleus stain).

    Args:
        plate_url: Path or URL of the OME-Zarr HCS plate.
        config: Virtual-staining options; `model_id` reuses a stored model.
        output: Tables folder for markers and QC; default PLATE_tables beside the plate
            (PLATE: the plate folder's name).
        wells: Wells to train on and predict into (e.g. ``["B02"]``); default every well.
    """
    with plate_write_lock(plate_url, "virtual-stain"):  # it appends a channel to every field
        return _virtual_stain(plate_url, config, output, wells)


def _virtual_stain(
    plate_url: str, config: VirtualStainConfig, output: str | None, wells: list[str] | None
) -> dict[str, Any]:
    logger = get_run_logger()
    output_root = str(ProcessConfig(output=output).output_root(plate_url))
    plan = plan_virtual_stain(plate_url, config, output_root=output_root, wells=wells)
    logger.info(
        "plate %s: %d fields hold %r, %d used for training",
        plan.plate_name,
        len(plan.with_target),
        config.model.target_channel,
        len(plan.training_fields),
    )
    model_id = config.model_id or _train(plan, config, output)
    card = load_card(config.store(plate_url), model_id)
    if not config.model_id:  # trained in this run: show how training went
        create_markdown_artifact(
            training_report(card),
            key=artifact_key("vs-training", plan.plate_name, plan.plate_url),
            description=f"training curve of {model_id}",
        )
    rows: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    futures = {
        predict_task.submit(
            plan,
            w,
            config,
            model_id,
            list(card.get("validation_fields", [])),
            list(card.get("training_fields", [])),
        ): w
        for w in plan.wells
    }
    for future in as_completed(list(futures)):
        try:
            rows.extend(future.result())
        except Exception as exc:
            failed[futures[future]] = str(exc)
    summary = qc_summary(rows)
    if summary:
        create_table_artifact(
            table=summary,
            key=artifact_key("virtual-stain-qc", plan.plate_name, plan.plate_url),
            description=(
                f"Virtual {config.model.target_channel} vs real, model {model_id}: PCC and "
                f"marker FN/FP rates (one-to-one within {config.match_distance_um} µm)"
            ),
        )
    if failed:
        raise HcssegError(
            f"virtual staining failed in {len(failed)} wells: "
            + "; ".join(f"{w}: {m}" for w, m in sorted(failed.items()))
        )
    return {"model_id": model_id, "qc": summary, "wells": len(plan.wells)}
