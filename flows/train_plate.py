"""Prefect flow: train a per-plate segmentation model and store it with its model card.

Meant for the GPU work pool (the heavy step); it passes back only the model id, and the
model lives in the model store beside the plate, where the CPU plate flow finds it.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from flows.common import artifact_key
from hcsseg.config import ProcessConfig
from hcsseg.model_store import load_card
from hcsseg.pipeline.orchestration import gpu_slot
from hcsseg.pipeline.training import TrainConfig, train_plate_segmentation
from hcsseg.report import training_report


@task(
    name="train segmentation model", task_run_name="train {config.method} for {config.compartment}"
)
def train_task(plate_url: str, config: TrainConfig, store: str) -> str:
    with gpu_slot():
        return train_plate_segmentation(plate_url, config, store=store)


@flow(name="train-plate", flow_run_name="train {config.compartment} model on {plate_url}")
def train_plate(
    plate_url: str, config: TrainConfig, model_store: str | None = None
) -> dict[str, Any]:
    """Train one segmentation model on the plate (GPU when the worker has one).

    Args:
        plate_url: Path or URL of the OME-Zarr HCS plate.
        config: What to train: compartment, method, input channels, ground truth, steps.
        model_store: Folder of stored models; default PLATE_models beside the plate
            (PLATE: the plate folder's name).
    """
    logger = get_run_logger()
    store = str(ProcessConfig(model_store=model_store).store(plate_url))
    model_id = train_task(plate_url, config, store)
    card = load_card(store, model_id)
    create_markdown_artifact(
        training_report(card),
        key=artifact_key("training", f"{card.get('plate', 'plate')}-{config.kind()}", plate_url),
        description=f"training curve of {model_id}",
    )
    logger.info("stored model %s in %s", model_id, store)
    return {"model_id": model_id, "model_store": store}
