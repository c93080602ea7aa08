"""Train a segmentation model on one plate and store it with its model card.

Training data comes from whatever the plate offers: ground-truth label images stored
in it (``labels/*_gt`` from ``hcsseg import-pairs``), or pseudo-labels from the classical
baseline on a real nucleus stain; the annotation-free method needs only nucleus markers.
At most `max_fields` fields (spread over the wells) are read, so memory stays bounded.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from hcsseg.errors import ChannelNotFoundError, HcssegError, ModelError
from hcsseg.io.plate import FieldRef, Plate, open_plate
from hcsseg.model_store import latest_model, load_model, save_model
from hcsseg.segment.classical import segment_cells, segment_cells_from_stain, segment_nuclei
from hcsseg.segment.methods import centroids, parse_options, train_method
from hcsseg.segment.training import validate_labels
from hcsseg.virtual_stain.model import KIND as VIRTUAL_KIND

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Which model to train for which compartment, on which channels and labels."""

    model_config = ConfigDict(extra="forbid")

    compartment: Literal["nuclei", "cells"] = "nuclei"
    method: Literal["distance_unet", "fpn2ws", "unsupervised", "cellpose"] = "distance_unet"
    input_channels: list[str] = Field(..., min_length=1, description="channels the model sees")
    truth: str | None = Field(
        None,
        description="ground-truth label image in the plate (e.g. cells_gt); None: pseudo-labels "
        "from the classical baseline (supervised methods) or markers only (unsupervised)",
    )
    nucleus_channel: str | None = Field(
        None, description="nucleus stain for pseudo-labels and markers (real or *_virtual)"
    )
    init: Literal["random", "imagenet", "virtual_stain"] = Field(
        "random", description="virtual_stain: start from the plate's virtual-staining U-Net"
    )
    init_model: str | None = Field(None, description="virtual-staining model id for init")
    options: dict[str, Any] = Field(
        default_factory=dict, description="method options, e.g. {'train': {'n_steps': 300}}"
    )
    cell_pseudo_labels: Literal["propagation", "stain"] = Field(
        "propagation",
        description="classical cells that teach a cell model without ground truth: grown "
        "from the nuclei (propagation), or found in the cell stain alone (stain: surface "
        "stains that outline only some cells, e.g. CD3 among all DAPI nuclei)",
    )
    max_fields: int = Field(32, ge=1)
    wells: list[str] | None = None
    pixel_size_um: float | None = Field(None, description="override the plate's pixel size")

    def kind(self) -> str:
        return f"{self.compartment}-{self.method}"


def _spread(refs: list[FieldRef], n: int) -> list[FieldRef]:
    if len(refs) <= n:
        return refs
    return [refs[i] for i in np.linspace(0, len(refs) - 1, n).round().astype(int)]


def _pseudo_labels(plate: Plate, ref: FieldRef, config: TrainConfig) -> np.ndarray:
    if config.nucleus_channel is None:
        raise HcssegError(
            "no ground truth given (truth=...) and no nucleus_channel for pseudo-labels"
        )
    px = config.pixel_size_um or plate.pixel_size_um(ref)
    nucleus = plate.read_channels(ref, [config.nucleus_channel])[0]
    nuclei = segment_nuclei(nucleus, pixel_size_um=px)
    if config.compartment == "nuclei":
        return nuclei
    cell_image = plate.read_channels(ref, config.input_channels[:1])[0]
    if config.cell_pseudo_labels == "stain":
        return segment_cells_from_stain(cell_image, pixel_size_um=px)
    return segment_cells(nuclei, cell_image, pixel_size_um=px)


def _markers(plate: Plate, ref: FieldRef, config: TrainConfig) -> np.ndarray:
    """Marker = nucleus centre: stored nuclei labels if present, else classical nuclei."""
    if "nuclei" in plate.label_names(ref):
        nuclei = plate.read_labels(ref, "nuclei")
    else:
        if config.nucleus_channel is None:
            raise HcssegError(
                f"field {ref.path}: the annotation-free method needs nucleus markers: "
                "run process_plate first or set nucleus_channel"
            )
        px = config.pixel_size_um or plate.pixel_size_um(ref)
        nucleus = plate.read_channels(ref, [config.nucleus_channel])[0]
        nuclei = segment_nuclei(nucleus, pixel_size_um=px)
    return centroids(nuclei)[1]


def gather(plate: Plate, config: TrainConfig) -> tuple[list[FieldRef], list, list]:
    """Fields, images and targets (labels or markers) for training."""
    refs = list(plate.iter_fields(config.wells))
    if config.truth:
        refs = [r for r in refs if config.truth in plate.label_names(r)]
        if not refs:
            raise HcssegError(f"plate {plate.name}: no field has label image {config.truth!r}")
    refs = _spread(refs, config.max_fields)
    images, targets = [], []
    for ref in refs:
        names = plate.channel_names(ref)
        missing = [c for c in config.input_channels if c not in names]
        if missing:
            raise ChannelNotFoundError(missing, names, where=f"plate {plate.name} field {ref.path}")
        images.append(plate.read_channels(ref, config.input_channels))
        if config.method == "unsupervised":
            targets.append(_markers(plate, ref, config))
        elif config.truth:
            labels = plate.read_labels(ref, config.truth)
            targets.append(validate_labels(labels, name=f"{config.truth} of field {ref.path}"))
        else:
            targets.append(_pseudo_labels(plate, ref, config))
    return refs, images, targets


def _init_state(plate: Plate, config: TrainConfig, store: str) -> dict | None:
    if config.init != "virtual_stain":
        return None
    model = config.init_model or latest_model(store, VIRTUAL_KIND, plate=plate.name)
    if model is None:
        raise ModelError(
            f"init=virtual_stain but the model store {store} has no virtual-staining model "
            f"for plate {plate.name}; run `hcsseg virtual-stain` first or pass init_model"
        )
    state, _ = load_model(store, model)
    return state


def _thin(values: list[float], n: int = 200) -> list[float]:
    """At most ~n points of a loss curve for the model card and the UI."""
    step = max(1, len(values) // n)
    return [float(v) for v in values[::step]]


def train_plate_segmentation(plate_url: str, config: TrainConfig, *, store: str) -> str:
    """Train, store and return the model id."""
    plate = open_plate(plate_url)
    options = dict(config.options)
    if config.init == "imagenet":
        if config.method not in ("distance_unet", "fpn2ws"):
            raise ModelError(f"init=imagenet applies to smp models, not {config.method!r}")
        options["init"] = "imagenet"
    refs, images, targets = gather(plate, config)
    init = _init_state(plate, config, store)
    if config.method == "cellpose":
        from hcsseg.segment.cellpose_backend import finetune_cellpose

        weights, losses = finetune_cellpose(
            images, targets, save_path=f"{store}/cellpose-weights", **options
        )
        card: dict[str, Any] = {"weights": str(weights), "options": options}
        state: dict = {}
        history: dict[str, Any] = {"loss": [float(x) for x in losses]}
    else:
        if config.method == "distance_unet" and config.compartment == "cells":
            # a cell's size cannot be read off a membrane stain: scale from the training fields
            options.setdefault("scale_channel", None)
        state, history = train_method(
            config.method, images, targets, options=options, init_state=init
        )
        # post-processing picked on held-out training fields, the training fields' scale
        tuned = parse_options(config.method, options).model_copy(
            update=history.pop("tuned_options", {})
        )
        history.pop("snapshots", None)
        card = {"options": tuned.model_dump(mode="json")}
    card |= {
        "method": config.method,
        "compartment": config.compartment,
        "input_channels": config.input_channels,
        "source_channels": config.input_channels,
        "truth": config.truth or ("markers" if config.method == "unsupervised" else "pseudo"),
        "init": config.init,
        "training_fields": [r.path for r in refs],
        "plate": plate.name,
        "plate_url": str(plate_url),
        "history": {k: v for k, v in history.items() if k != "loss"},
        "loss_curve": _thin(history.get("loss", [])),
    }
    model_id = save_model(store, config.kind(), state, card)
    log.info("stored %s model %s", config.kind(), model_id)
    return model_id
