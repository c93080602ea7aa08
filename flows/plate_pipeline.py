"""Prefect flow `plate-pipeline`: one plate, one run, every stage its preset asks for.

plan -> virtual stain (train, possibly on the GPU pool; predict; markers) -> train the
nucleus and cell models on this plate (GPU pool when configured) -> quality gate against
the classical baseline -> segment, measure and QC every well (`process-plate`, which
resumes per well) -> report. Each stage is a task or subflow of its own in the UI, passes
paths and ids (never arrays), and leaves a completion marker, so a re-run after a crash
starts at the first unfinished stage.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.runtime import flow_run

from flows.common import artifact_key
from flows.process_plate import process_plate
from flows.train_plate import train_plate
from flows.virtual_stain import virtual_stain_plate
from hcsseg.config import ProcessConfig
from hcsseg.errors import HcssegError
from hcsseg.export.tables import safe_name, write_parquet
from hcsseg.io.plate_lock import plate_write_lock
from hcsseg.model_store import find_model
from hcsseg.pipeline.gate import run_gate
from hcsseg.pipeline.orchestration import (
    check_remote_run,
    deployment_parameter,
    submit_gpu_work,
    task_runner_config_from_env,
    task_runner_from_env,
)
from hcsseg.pipeline.plan import (
    PipelinePlan,
    TrainStage,
    plan_pipeline,
    train_config,
    train_deployment,
)
from hcsseg.pipeline.presets import PresetName, preset_config, set_options
from hcsseg.pipeline.stages import StageLedger, stage_key
from hcsseg.pipeline.wells import make_segmenter
from hcsseg.report import pipeline_report


@task(name="plan pipeline", task_run_name="plan {plate_url}")
def plan_task(plate_url: str, config: ProcessConfig) -> PipelinePlan:
    return plan_pipeline(plate_url, config)


@task(name="train model", task_run_name="train {stage.compartment} {stage.method}")
def train_task(plan: PipelinePlan, stage: TrainStage) -> str:
    """Train here, or hand it to the GPU pool's `train-plate` deployment (paths cross, the
    model lands in the shared store and is found again by its request id)."""
    logger = get_run_logger()
    config = train_config(plan, stage)
    assert config.request_id is not None
    done = find_model(plan.model_store, request_id=config.request_id)
    if done is not None:  # trained by an earlier run that died before its stage marker
        logger.info("model %s of an earlier run is in the store; not training again", done)
        return done
    params = {
        "plate_url": plan.plate_url,
        "config": config.model_dump(mode="json"),
        "model_store": plan.model_store,
    }
    # one training run per pipeline run: a re-run after a crash must not get the dead
    # run of the crashed attempt back
    run = submit_gpu_work(
        train_deployment(plan.training),
        params,
        idempotency_key=f"{config.request_id}:{flow_run.get_id()}",
    )
    if run is None:
        return str(train_plate(plan.plate_url, config, plan.model_store)["model_id"])
    check_remote_run(run, f"{stage.compartment} training")
    model_id = find_model(plan.model_store, request_id=config.request_id)
    if model_id is None:
        raise HcssegError(f"training run {run.name} finished but stored no model")
    return model_id


@task(name="quality gate", task_run_name="gate {stage.compartment}")
def gate_task(
    plan: PipelinePlan,
    stage: TrainStage,
    model_id: str,
    config: ProcessConfig,
    nuclei: dict[str, Any],
) -> dict[str, Any]:
    segmenter = make_segmenter(
        "nuclei", nuclei["method"], nuclei["model_id"], plan.model_store, config
    )
    return run_gate(plan, stage, model_id, config, nuclei=segmenter)


class _Stages:
    """Runs stages once (the ledger remembers finished ones) and shows progress in the UI."""

    def __init__(self, ledger: StageLedger, total: int, plan: PipelinePlan) -> None:
        self.ledger, self.total = ledger, total
        self.done: list[dict[str, Any]] = []
        self.progress = create_progress_artifact(
            progress=0.0,
            key=artifact_key("pipeline-progress", plan.plate_name, plan.plate_url),
            description=f"pipeline stages done for plate {plan.plate_name}",
        )

    def note(self, entry: dict[str, Any]) -> None:
        self.done.append(entry)
        update_progress_artifact(self.progress, 100.0 * len(self.done) / self.total)

    def run(self, name: str, key: str, work: Any) -> dict[str, Any]:
        """`work()` unless the ledger holds this stage with this key; recorded after."""
        found = self.ledger.get(name, key)
        if found is not None:
            get_run_logger().info("stage %s already done by an earlier run; skipped", name)
            self.note({"stage": name, "state": "done earlier", "seconds": None})
            return found
        t0 = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - t0
        self.ledger.record(name, key, result, seconds=seconds)
        self.note({"stage": name, "state": "done", "seconds": round(seconds, 1)})
        return result


def _run_name() -> str:
    params = flow_run.parameters
    return f"{params.get('preset') or 'default'} pipeline on {params['plate_url']}"


@flow(name="plate-pipeline", flow_run_name=_run_name)
def plate_pipeline(
    plate_url: str,
    preset: PresetName | None = None,
    config: ProcessConfig | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Virtual stain, per-plate training, quality gate, segmentation, features and QC.

    Args:
        plate_url: Path or URL of the OME-Zarr HCS plate.
        preset: classical, annotation-free or supervised. Empty: the deployment's own
            `preset` parameter (an `hcs.plate.ready` event without one), else classical.
        config: Options that override the preset (only those set count). Empty: the
            deployment's own `config` parameter, if any.
        force: Redo every stage and well, ignoring completion markers.
    """
    if preset is None:
        preset = deployment_parameter("preset") or "classical"
    if config is None:
        config = deployment_parameter("config")
    cfg = preset_config(preset, set_options(config))
    # one writer at a time from staining to the last table; the subflows re-enter the lock
    with plate_write_lock(plate_url, "plate-pipeline"):
        return _pipeline(plate_url, preset, cfg, force)


def _pipeline(plate_url: str, preset: str, cfg: ProcessConfig, force: bool) -> dict[str, Any]:
    logger = get_run_logger()
    plan = plan_task(plate_url, cfg)
    for note in plan.notes:
        logger.info(note)
    ledger = StageLedger(plan.output_root, plan.plate_name)
    if force:
        ledger.clear()
    gated = plan.training is None or plan.training.gate
    total = (plan.virtual_stain is not None) + len(plan.train) * (1 + gated) + 1
    stages = _Stages(ledger, total, plan)

    if plan.virtual_stain is not None:
        vs_config = plan.virtual_stain

        def stain() -> dict[str, Any]:
            result = virtual_stain_plate(
                plan.plate_url, vs_config, output=plan.output_root, wells=cfg.wells
            )
            return {"model_id": result["model_id"], "qc": result["qc"]}

        vs = stages.run("virtual-stain", plan.virtual_stain_key or "", stain)
        logger.info("virtual stain: model %s, QC %s", vs["model_id"], vs["qc"])

    chosen: dict[str, dict[str, Any]] = {
        c: {"method": "classical", "model_id": None, "reason": "no model trained"}
        for c in ("nuclei", "cells")
    }
    gates: list[dict[str, Any]] = []
    for stage in plan.train:
        trained = stages.run(
            stage.name,
            stage.key,
            lambda stage=stage: {"model_id": train_task(plan, stage)},
        )
        model_id = trained["model_id"]
        if plan.training is not None and not plan.training.gate:
            chosen[stage.compartment] = {
                "method": stage.method,
                "model_id": model_id,
                "reason": "quality gate turned off",
            }
            continue
        nuclei = chosen["nuclei"]
        gate = stages.run(
            f"gate-{stage.compartment}",
            stage_key(stage.key, model_id, nuclei["method"], nuclei["model_id"]),
            lambda stage=stage, model_id=model_id, nuclei=nuclei: gate_task(
                plan, stage, model_id, cfg, nuclei
            ),
        )
        gates.append(gate)
        logger.info("quality gate %s: %s", stage.compartment, gate["reason"])
        if gate["winner"] == "candidate":
            chosen[stage.compartment] = {
                "method": stage.method,
                "model_id": model_id,
                "reason": gate["reason"],
            }
        else:
            chosen[stage.compartment]["reason"] = gate["reason"]

    segment_config = cfg.model_copy(
        update={
            "train": None,
            "virtual_stain": None,
            "nucleus_channel": plan.nucleus_channel,
            "nuclei_method": chosen["nuclei"]["method"],
            "nuclei_model": chosen["nuclei"]["model_id"],
            "cells_method": chosen["cells"]["method"],
            "cells_model": chosen["cells"]["model_id"],
        }
    )
    segment = process_plate
    if task_runner_config_from_env() is not None:  # wells on Dask (or N threads) by the env
        segment = process_plate.with_options(task_runner=task_runner_from_env())
    t0 = time.perf_counter()
    result = segment(plan.plate_url, segment_config, force=force)
    stages.note(
        {
            "stage": "segment-measure-qc",
            "state": f"{result['wells']} wells done, {result['skipped']} done earlier",
            "seconds": round(time.perf_counter() - t0, 1),
        }
    )
    if gates:
        write_parquet(
            pd.DataFrame(gates).assign(Metadata_Plate=plan.plate_name),
            Path(plan.output_root) / "quality_gate" / f"{safe_name(plan.plate_name)}.parquet",
            metadata={"flow_run_id": str(flow_run.get_id() or ""), "plate_url": plan.plate_url},
        )
    summary = Path(plan.output_root) / "well_qc" / f"{safe_name(plan.plate_name)}.parquet"
    well_qc = pd.read_parquet(summary) if summary.exists() else pd.DataFrame()
    create_markdown_artifact(
        pipeline_report(
            well_qc, plate_name=plan.plate_name, models=chosen, gates=gates, stages=stages.done
        ),
        key=artifact_key("pipeline-report", plan.plate_name, plan.plate_url),
        description=f"{preset} pipeline on {plan.plate_name}: stages, models, quality gate",
    )
    return {
        **result,
        "preset": preset,
        "virtual_stain": plan.virtual_stain is not None,
        "models": chosen,
        "gates": gates,
        "stages": stages.done,
    }
