"""Train a segmentation model on one plate and store it with its model card.

Training data comes from whatever the plate offers: ground-truth label images stored
in it (``labels/*_gt`` from ``hcsseg import-pairs``), or pseudo-labels from the classical
baseline on a real nucleus stain; the annotation-free method needs only nucleus markers.
At most `max_fields` fields (spread over the wells) are read, so memory stays bounded.

A new plate rarely needs a model from scratch: when the store holds a model of the same kind
on the same channels from an earlier plate, training starts from its weights and gets only
`fine_tune_fraction` of the step budget (bench/results/transfer.md measures what that gives).
The card records the parent, so `hcsseg models` shows each model's lineage.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from hcsseg.errors import ChannelNotFoundError, HcssegError, ModelError
from hcsseg.io.plate import FieldRef, Plate, open_plate
from hcsseg.learning.data import validate_labels
from hcsseg.model_store import latest_model, list_models, load_model, save_model
from hcsseg.segment.classical import segment_cells, segment_cells_from_stain, segment_nuclei
from hcsseg.segment.methods import OPTIONED, centroids, option_model, parse_options, train_method
from hcsseg.segment.pseudo_labels import confident_objects
from hcsseg.segment.scale import pixel_size_from_objects
from hcsseg.virtual_stain.options import KIND as VIRTUAL_KIND

log = logging.getLogger(__name__)

# Options that shape a method's network: a fine-tuned model takes them from its parent's card,
# or the parent's weights would not fit (canonical_diameter: the scale the weights learnt).
ARCHITECTURE_OPTIONS: dict[str, tuple[str, ...]] = {
    "distance_unet": ("encoder_name", "decoder_channels", "canonical_diameter"),
    "fpn2ws": ("encoder_name",),
    "unsupervised": ("base_channels", "depth", "patch_size", "position_sigma"),
    "cellpose": (),
}


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
    confident_pseudo_labels: bool = Field(
        True,
        description="distance_unet cells from stain pseudo-labels: leave the teacher's "
        "likely fragments and merges (objects below 3/4 or above 3x its median area) out of "
        "the loss instead of teaching them (+0.08 AP@0.5 on the dense-cells training fields)",
    )
    max_fields: int = Field(32, ge=1)
    wells: list[str] | None = None
    fields: list[str] | None = Field(
        None,
        description="only these fields (paths such as B/03/0), e.g. to hold others back for "
        "a quality gate",
    )
    pixel_size_um: float | None = Field(None, description="override the plate's pixel size")
    scale: Literal["estimate", "metadata"] = Field(
        "estimate",
        description="scale of the classical pseudo-labels and markers, as ProcessConfig.scale: "
        "each field's estimated nucleus diameter taken as typical_nucleus_um, or the metadata",
    )
    typical_nucleus_um: float = Field(
        10.0, gt=0, description="nucleus diameter an estimated scale maps to, micrometres"
    )
    parent_model: str | None = Field(
        None,
        description="fine-tune this stored model (id or folder): same method, compartment and "
        "input channels; its architecture options are used",
    )
    transfer: bool = Field(
        True,
        description="without parent_model (and with init=random): fine-tune the latest "
        "compatible model of another plate in the store (compatible_model) when there is "
        "one; False: always from scratch",
    )
    fine_tune_fraction: float = Field(
        0.25,
        gt=0,
        le=1,
        description="share of the step budget a fine-tuned model gets (of the recipe's "
        "n_steps, or of the n_steps given in options; epochs for cellpose)",
    )
    request_id: str | None = Field(
        None,
        description="opaque id written into the model card, so a caller that hands training "
        "to another process finds the model it asked for (model_store.find_model)",
    )

    def kind(self) -> str:
        return f"{self.compartment}-{self.method}"


def budget_options(method: str, steps: int | None) -> dict[str, Any]:
    """Method options that change only the step budget; the method's recipe stays."""
    if steps is None:
        return {}
    if method == "unsupervised":
        return {"n_steps": steps}
    if method in OPTIONED:
        recipe = option_model(method)().train.model_dump(mode="json")
        return {"train": recipe | {"n_steps": steps}}
    return {}


def _spread(refs: list[FieldRef], n: int) -> list[FieldRef]:
    if len(refs) <= n:
        return refs
    return [refs[i] for i in np.linspace(0, len(refs) - 1, n).round().astype(int)]


def _classical_scale(
    plate: Plate, ref: FieldRef, nucleus: np.ndarray, config: TrainConfig
) -> float:
    """The pixel size the classical teacher works at: the one `process` would use, so a
    model never learns from a weaker baseline than the one its quality gate compares with."""
    if config.pixel_size_um is not None:
        return config.pixel_size_um
    px = plate.pixel_size_um(ref)
    if config.scale == "metadata":
        return px
    return pixel_size_from_objects(nucleus, config.typical_nucleus_um) or px


def _pseudo_labels(plate: Plate, ref: FieldRef, config: TrainConfig) -> np.ndarray:
    if config.nucleus_channel is None:
        raise HcssegError(
            "no ground truth given (truth=...) and no nucleus_channel for pseudo-labels"
        )
    nucleus = plate.read_channels(ref, [config.nucleus_channel])[0]
    px = _classical_scale(plate, ref, nucleus, config)
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
        nucleus = plate.read_channels(ref, [config.nucleus_channel])[0]
        nuclei = segment_nuclei(
            nucleus, pixel_size_um=_classical_scale(plate, ref, nucleus, config)
        )
    return centroids(nuclei)[1]


def gather(plate: Plate, config: TrainConfig) -> tuple[list[FieldRef], list, list]:
    """Fields, images and targets (labels or markers) for training."""
    refs = list(plate.iter_fields(config.wells))
    if config.fields is not None:
        wanted = set(config.fields)
        refs = [r for r in refs if r.path in wanted]
        if not refs:
            raise HcssegError(f"plate {plate.name}: none of the fields {config.fields} exist")
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


def _architecture_conflicts(card: dict[str, Any], config: TrainConfig) -> list[str]:
    """Architecture options given in `config.options` that differ from the model in `card`."""
    keys = [k for k in ARCHITECTURE_OPTIONS[config.method] if k in config.options]
    if not keys:
        return []
    mine = parse_options(config.method, config.options)
    theirs = parse_options(config.method, card.get("options") or {})
    return [k for k in keys if getattr(mine, k) != getattr(theirs, k)]


def compatible_model(store: str | Path, config: TrainConfig, *, plate: str) -> str | None:
    """Latest stored model of another plate that `config` can fine-tune: same kind
    (compartment and method), same input channels, and no architecture option asked for in
    `config.options` that differs from it; None when there is none."""
    cards = [
        c
        for c in list_models(store, config.kind(), strict=True)
        if c.get("plate") != plate
        and c.get("input_channels") == config.input_channels
        and not _architecture_conflicts(c, config)
    ]
    return cards[-1]["model_id"] if cards else None


def _parent_model(store: str, config: TrainConfig, plate: str) -> str | None:
    """The model to fine-tune: the one asked for, else a compatible one when transfer is on
    and no other start (imagenet, virtual staining, a cellpose base model) was asked for."""
    other_start = config.init != "random" or (
        config.method == "cellpose" and "base_model" in config.options
    )
    if config.parent_model is not None:
        if other_start:
            raise ModelError(
                f"parent_model {config.parent_model} and init={config.init!r} (or a cellpose "
                "base_model) are two different starts; give one"
            )
        return config.parent_model
    if not config.transfer or other_start:
        return None
    return compatible_model(store, config, plate=plate)


def _check_parent(card: dict[str, Any], config: TrainConfig) -> None:
    model = card.get("model_id")
    if card.get("kind") != config.kind():
        raise ModelError(
            f"parent model {model} is a {card.get('kind')} model; training {config.kind()} "
            "needs a parent of the same compartment and method"
        )
    if card.get("input_channels") != config.input_channels:
        raise ModelError(
            f"parent model {model} was trained on channels {card.get('input_channels')}, not "
            f"{config.input_channels}; its weights would read the wrong channels"
        )
    conflicts = _architecture_conflicts(card, config)
    if conflicts:
        raise ModelError(
            f"options {conflicts} differ from those of parent model {model}, whose weights "
            "only fit its own architecture; drop them or fine-tune another model"
        )


def _share(n: int, fraction: float) -> int:
    return max(1, round(n * fraction))


def fine_tune_options(
    method: str, options: dict[str, Any], parent_card: dict[str, Any], fraction: float
) -> dict[str, Any]:
    """Method options for fine-tuning the model of `parent_card`: its architecture options
    (so its weights fit) and `fraction` of the step budget `options` would give.

    The annotation-free model also skips its warm-up on grown markers, which exists only to
    keep random weights from collapsing to empty masks and would pull a trained model back
    towards small discs."""
    out = dict(options)
    parent_options = parent_card.get("options") or {}
    for key in ARCHITECTURE_OPTIONS[method]:
        if key in parent_options:
            out[key] = parent_options[key]
    if method == "cellpose":
        from hcsseg.segment.cellpose_backend import finetune_cellpose

        weights = parent_card.get("weights")
        if not weights or not Path(weights).is_file():
            raise ModelError(
                f"parent model {parent_card.get('model_id')} has no Cellpose weights file "
                f"(card says {weights!r})"
            )
        default = inspect.signature(finetune_cellpose).parameters["n_epochs"].default
        out["base_model"] = weights
        out["n_epochs"] = _share(int(out.get("n_epochs", default)), fraction)
    elif method == "unsupervised":
        out["n_steps"] = _share(parse_options(method, out).n_steps, fraction)
        out["warmup_steps"] = 0
    else:
        train = parse_options(method, out).train
        out["train"] = train.model_copy(
            update={"n_steps": _share(train.n_steps, fraction)}
        ).model_dump(mode="json")
    return out


def _filters_pseudo_labels(config: TrainConfig) -> bool:
    """Whether the teacher's doubtful objects are left out of the loss: measured for the
    distance U-Net learning cells from the stain's classical cells (bench/results/accuracy.md)."""
    return (
        config.confident_pseudo_labels
        and config.truth is None
        and config.method == "distance_unet"
        and config.compartment == "cells"
        and config.cell_pseudo_labels == "stain"
    )


def train_plate_segmentation(plate_url: str, config: TrainConfig, *, store: str) -> str:
    """Train, store and return the model id."""
    plate = open_plate(plate_url)
    options = dict(config.options)
    if config.init == "imagenet":
        if config.method not in ("distance_unet", "fpn2ws"):
            raise ModelError(f"init=imagenet applies to smp models, not {config.method!r}")
        options["init"] = "imagenet"
    parent = _parent_model(store, config, plate.name)
    parent_state = None
    if parent is not None:
        parent_state, parent_card = load_model(store, parent)
        _check_parent(parent_card, config)
        parent = str(parent_card["model_id"])
        options = fine_tune_options(config.method, options, parent_card, config.fine_tune_fraction)
        log.info(
            "fine-tuning %s from %s (plate %s) with %.0f%% of the steps",
            config.kind(),
            parent,
            parent_card.get("plate"),
            100 * config.fine_tune_fraction,
        )
    refs, images, targets = gather(plate, config)
    init = _init_state(plate, config, store)
    if config.method == "cellpose":
        from hcsseg.segment.cellpose_backend import finetune_cellpose

        weights, losses = finetune_cellpose(
            images, targets, save_path=f"{store}/cellpose-weights", **options
        )
        card: dict[str, Any] = {"weights": str(weights), "options": options}
        state: dict = {}
        history: dict[str, Any] = {"loss": [float(x) for x in losses], "steps": len(losses)}
    else:
        if config.method == "distance_unet" and config.compartment == "cells":
            # a cell's size cannot be read off a membrane stain: scale from the training fields
            options.setdefault("scale_channel", None)
        weights = None
        if _filters_pseudo_labels(config):
            pairs = [confident_objects(t) for t in targets]
            targets, weights = [p[0] for p in pairs], [p[1] for p in pairs]
        state, history = train_method(
            config.method,
            images,
            targets,
            options=options,
            init_state=init,
            parent_state=parent_state,
            weights=weights,
        )
        # post-processing picked on held-out training fields, the training fields' scale
        tuned = parse_options(config.method, options).model_copy(
            update=history.pop("tuned_options", {})
        )
        history.pop("snapshots", None)
        card = {"options": tuned.model_dump(mode="json")}
    from hcsseg.learning.loop import thin_curve  # torch: only once a model was trained

    card |= {
        "method": config.method,
        "compartment": config.compartment,
        "input_channels": config.input_channels,
        "source_channels": config.input_channels,
        "truth": config.truth or ("markers" if config.method == "unsupervised" else "pseudo"),
        "confident_pseudo_labels": _filters_pseudo_labels(config),
        "init": "parent" if parent else config.init,
        "parent_model": parent,
        "fine_tune_fraction": config.fine_tune_fraction if parent else None,
        "request_id": config.request_id,
        "training_fields": [r.path for r in refs],
        "plate": plate.name,
        "plate_url": str(plate_url),
        "history": {k: v for k, v in history.items() if k != "loss"},
        "loss_curve": thin_curve(history.get("loss", [])),
    }
    model_id = save_model(store, config.kind(), state, card)
    log.info("stored %s model %s", config.kind(), model_id)
    return model_id
