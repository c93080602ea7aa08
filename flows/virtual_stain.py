"""Prefect flow: learn a plate's nucleus stain and predict it into every field.

Thin wrapper over `hcsseg.virtual_stain.plate`: plan (channel checks, nothing written),
one training task (GPU when the worker has one), one prediction task per well, then a
QC artifact comparing virtual and real markers on fields the model never trained on.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.futures import as_completed

from flows.common import artifact_key
from hcsseg.config import ProcessConfig
from hcsseg.errors import HcssegError
from hcsseg.model_store import load_card
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
    return train_plate_model(plan, config)


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
    """Train (or reuse) the plate's virtual-staining model and fill `<target>_virtual` in."""
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
    model_id = config.model_id or train_task(plan, config)
    card = load_card(config.store(plate_url), model_id)
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
            key=artifact_key("virtual-stain-qc", plan.plate_name),
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
