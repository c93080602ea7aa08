"""Virtual staining of a plate: plan -> train on fields with the stain -> predict per well.

The I/O side of `hcsseg.virtual_stain.model`: picks the fields that hold both source and
target channels, streams a bounded number of them into training, stores the model with
its card, then predicts ``<target>_virtual`` into every field one at a time and writes
nucleus markers and marker QC tables per well.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from hcsseg.errors import ChannelNotFoundError, InputDataError, ModelError
from hcsseg.export.tables import write_well_table
from hcsseg.io.plate import FieldRef, Plate, check_writable, open_plate
from hcsseg.io.plate_writer import ChannelSpec, append_channel
from hcsseg.markers.detect import MarkerOptions, detect_markers
from hcsseg.markers.qc import marker_qc
from hcsseg.model_store import (
    check_card_channels,
    default_store,
    load_card,
    load_model,
    save_model,
)
from hcsseg.virtual_stain.options import (
    KIND,
    VIRTUAL_RANGE,
    VirtualStainOptions,
    card_target_range,
)

log = logging.getLogger(__name__)
VIRTUAL_SUFFIX = "_virtual"


class VirtualStainConfig(BaseModel):
    """The virtual-staining step of a plate run."""

    model_config = ConfigDict(extra="forbid")

    model: VirtualStainOptions
    model_store: str | None = Field(
        None,
        description="folder of trained models; default: PLATE_models beside the plate "
        "(PLATE: the plate folder's name without .zarr)",
    )
    model_id: str | None = Field(
        None, description="use this stored model instead of training a new one"
    )
    fine_tune_from: str | None = Field(
        None, description="start training from this stored model (e.g. an earlier plate's)"
    )
    max_training_fields: int = Field(
        32, ge=1, description="fields read for training (spread over wells); bounds memory"
    )
    gpu_deployment: str | None = Field(
        None,
        description="train on this GPU-pool deployment (e.g. train-virtual-stain/gpu) "
        "instead of here; default: $HCSSEG_GPU_DEPLOYMENT, else here",
    )
    markers: MarkerOptions = Field(default_factory=MarkerOptions)
    match_distance_um: float = Field(15.0, gt=0, description="marker matching radius for QC")

    @property
    def virtual_channel(self) -> str:
        return f"{self.model.target_channel}{VIRTUAL_SUFFIX}"

    def store(self, plate_url: str) -> Path:
        return default_store(plate_url, self.model_store)


@dataclass(frozen=True)
class VirtualStainPlan:
    plate_url: str
    plate_name: str
    wells: list[str]
    with_target: list[str]  # field paths holding the real target
    training_fields: list[str]
    output_root: str


def _spread(items: list[str], n: int) -> list[str]:
    """At most n items evenly spread over the list (fields of many wells, not the first few)."""
    if len(items) <= n:
        return items
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def plan_virtual_stain(
    plate_url: str, config: VirtualStainConfig, *, output_root: str, wells: list[str] | None = None
) -> VirtualStainPlan:
    """Check channels before anything is trained or written."""
    plate = open_plate(plate_url)
    wells = wells or plate.wells()
    sources, target = config.model.source_channels, config.model.target_channel
    if config.model_id or config.fine_tune_from:
        model = config.model_id or config.fine_tune_from
        card = load_card(config.store(str(plate_url)), str(model))
        if card.get("source_channels") != sources or card.get("target_channel") != target:
            raise ModelError(
                f"model {model} maps {card.get('source_channels')} -> "
                f"{card.get('target_channel')!r}, but this run asks for {sources} -> {target!r}"
            )
    with_target = []
    for ref in plate.iter_fields(wells):
        names = plate.channel_names(ref)
        missing = [c for c in sources if c not in names]
        if missing:
            raise ChannelNotFoundError(
                missing, names, where=f"plate {plate.name} field {ref.path} (well {ref.well})"
            )
        if target in names:
            with_target.append(ref.path)
    if not with_target and config.model_id is None:
        raise InputDataError(
            f"plate {plate.name}: no field holds the target channel {target!r}, so there is "
            "nothing to learn from; pass model_id of a model trained on another plate"
        )
    check_writable(plate_url, f"plate {plate.name} (the virtual channel goes there):")
    check_writable(output_root, "tables folder")
    return VirtualStainPlan(
        plate_url=str(plate_url),
        plate_name=plate.name,
        wells=list(wells),
        with_target=with_target,
        training_fields=_spread(with_target, config.max_training_fields),
        output_root=output_root,
    )


def _ref(plate: Plate, path: str) -> FieldRef:
    row, col, field = path.split("/")
    return next(r for r in plate.fields(f"{row}/{col}") if r.field == field)


def train_plate_model(plan: VirtualStainPlan, config: VirtualStainConfig) -> str:
    from hcsseg.virtual_stain.model import train_virtual_stain  # torch: only when training

    """Train (or fine-tune) the plate's model and store it; returns the model id."""
    plate = open_plate(plan.plate_url)
    opts = config.model
    sources, targets = [], []
    for path in plan.training_fields:
        ref = _ref(plate, path)
        data = plate.read_channels(ref, [*opts.source_channels, opts.target_channel])
        sources.append(data[:-1])
        targets.append(data[-1])
    store = config.store(plan.plate_url)
    init = None
    if config.fine_tune_from:
        init, card = load_model(store, config.fine_tune_from)
        check_card_channels(card, opts.source_channels, where="this training request")
    model = train_virtual_stain(
        sources, targets, plan.training_fields, options=opts, init_state=init
    )
    del sources, targets
    card = {
        **model.card(),
        "plate": plan.plate_name,
        "plate_url": plan.plate_url,
        "fine_tuned_from": config.fine_tune_from,
    }
    model_id = save_model(store, KIND, model.network.state_dict(), card)
    log.info("stored virtual-staining model %s in %s", model_id, store)
    return model_id


def predict_well(
    plan: VirtualStainPlan,
    well: str,
    config: VirtualStainConfig,
    model_id: str,
    *,
    validation_fields: list[str],
    training_fields: list[str],
) -> list[dict[str, Any]]:
    """Write ``<target>_virtual`` into every field of a well, plus markers and marker QC."""
    from hcsseg.virtual_stain.model import network_from_state, predict_virtual_stain, to_storage

    plate = open_plate(plan.plate_url, mode="r+")
    state, card = load_model(config.store(plan.plate_url), model_id)
    opts = config.model
    network = network_from_state(state, card)
    # Real and virtual markers on the plate-wide scale the model learnt, so a field without
    # nuclei yields none instead of its stretched noise.
    real_range = card_target_range(card)
    markers_tables, qc_rows = [], []
    for ref in plate.fields(well):
        names = plate.channel_names(ref)
        check_card_channels(card, names, where=f"plate {plan.plate_name} field {ref.path}")
        source = plate.read_channels(ref, card["source_channels"])
        prediction = predict_virtual_stain(network, source, opts)
        dtype = plate.array(ref).dtype
        append_channel(
            plate, ref, ChannelSpec(config.virtual_channel), to_storage(prediction, dtype)
        )
        px = plate.pixel_size_um(ref)
        has_real = opts.target_channel in names
        nucleus = plate.read_channels(ref, [opts.target_channel])[0] if has_real else None
        markers = detect_markers(
            nucleus if nucleus is not None else prediction,
            pixel_size_um=px,
            options=config.markers,
            value_range=real_range if nucleus is not None else VIRTUAL_RANGE,
        )
        meta = {
            "Metadata_Plate": plan.plate_name,
            "Metadata_Well": ref.well,
            "Metadata_Site": ref.site,
        }
        markers.insert(0, "Metadata_MarkerSource", "measured" if has_real else "virtual")
        for k, v in reversed(meta.items()):
            markers.insert(0, k, v)
        markers_tables.append(markers)
        row: dict[str, Any] = {
            **meta,
            "Metadata_VirtualStainModel": model_id,
            "Metadata_VirtualStainRole": (
                "training"
                if ref.path in training_fields
                else "validation"
                if ref.path in validation_fields
                else "held-out"
                if has_real
                else "no-target"
            ),
            "Image_Count_Markers": len(markers),
        }
        if nucleus is not None:
            qc = marker_qc(
                prediction,
                nucleus,
                pixel_size_um=px,
                max_distance_um=config.match_distance_um,
                marker_options=config.markers,
                virtual_range=VIRTUAL_RANGE,
                real_range=real_range,
            )
            token = "".join(ch for ch in opts.target_channel if ch.isalnum())
            row.update(
                {
                    f"Image_VirtualStain_PCC_{token}": qc["pcc"],
                    "Image_VirtualStain_MarkerFNRate": qc["fn_rate"],
                    "Image_VirtualStain_MarkerFPRate": qc["fp_rate"],
                    "Image_VirtualStain_MarkersReal": qc["n_markers_real"],
                    "Image_VirtualStain_MarkersVirtual": qc["n_markers_virtual"],
                }
            )
        qc_rows.append(row)
    meta_kv = {
        "model_id": model_id,
        "plate_url": plan.plate_url,
        "coordinates": "pixels (y, x) and micrometres (y_um, x_um) in the field",
        "match_distance_um": config.match_distance_um,
    }
    write_well_table(
        pd.concat(markers_tables, ignore_index=True),
        plan.output_root,
        "markers",
        plate=plan.plate_name,
        well=well,
        metadata=meta_kv,
    )
    write_well_table(
        pd.DataFrame(qc_rows),
        plan.output_root,
        "virtual_stain_qc",
        plate=plan.plate_name,
        well=well,
        metadata=meta_kv,
    )
    return qc_rows
