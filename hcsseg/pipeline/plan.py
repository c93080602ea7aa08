"""What a plate pipeline will do, decided and checked before anything is trained or written.

`plan_pipeline` opens the plate once, reads only metadata, and settles every choice the
stages need: whether (and from which channels) a virtual nucleus stain is learnt, which
models are trained on which fields, and which fields are held back for the quality gate.
A request that cannot work (a missing channel, a supervised preset without ground truth)
fails here, in seconds, with nothing touched.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from hcsseg.config import CELL_NAMES, PlateTraining, ProcessConfig
from hcsseg.errors import ChannelNotFoundError, HcssegError
from hcsseg.io.plate import open_plate
from hcsseg.pipeline.stages import stage_key
from hcsseg.pipeline.wells import (
    absolute_url,
    channel_sets,
    choose_nucleus_channel,
    pick_channel,
    select_wells,
)
from hcsseg.virtual_stain.plate import VIRTUAL_SUFFIX, VirtualStainConfig

LABEL_FREE_NAMES = re.compile(
    r"bright|phase|dic|\bbf\b|^bf|trans|tl\b|label.?free|dpc", re.IGNORECASE
)
if TYPE_CHECKING:
    from hcsseg.pipeline.training import TrainConfig

TRAIN_DEPLOYMENT_ENV = "HCSSEG_TRAIN_DEPLOYMENT"


@dataclass(frozen=True)
class TrainStage:
    """One model to train on the plate and gate against the classical baseline."""

    compartment: str
    method: str
    input_channels: list[str]
    truth: str | None
    nucleus_channel: str
    fields: list[str]  # training fields (field paths), gate fields excluded
    gate_fields: list[str]
    in_sample_gate: bool
    key: str

    @property
    def name(self) -> str:
        return f"train-{self.compartment}"


@dataclass(frozen=True)
class PipelinePlan:
    """Plain data (crosses process and work-pool boundaries as task parameters)."""

    plate_url: str
    plate_name: str
    output_root: str
    model_store: str
    nucleus_channel: str
    cell_channel: str | None
    virtual_stain: VirtualStainConfig | None
    virtual_stain_key: str | None
    train: list[TrainStage]
    training: PlateTraining | None
    # the classical teacher's scale (pseudo-labels, markers) follows the run's own
    scale: str = "estimate"
    typical_nucleus_um: float = 10.0
    pixel_size_um: float | None = None
    notes: list[str] = field(default_factory=list)

    def stage(self, compartment: str) -> TrainStage | None:
        return next((s for s in self.train if s.compartment == compartment), None)


def _spread(items: list[str], n: int) -> list[str]:
    if len(items) <= n:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def split_gate_fields(candidates: list[str], limit: int) -> tuple[list[str], list[str], bool]:
    """(training fields, gate fields, in-sample?): about a fifth held back, at most `limit`.

    A one-field plate cannot hold a field back, so its gate scores on the training field and
    says so."""
    if len(candidates) < 2:
        return list(candidates), list(candidates), True
    k = min(limit, max(1, len(candidates) // 5))
    gate = _spread(candidates, k)
    return [c for c in candidates if c not in gate], gate, False


def _virtual_sources(
    training: PlateTraining, everywhere: list[str], nucleus: str, cell: str | None
) -> list[str]:
    if training.virtual_sources:
        missing = [c for c in training.virtual_sources if c not in everywhere]
        if missing:
            raise ChannelNotFoundError(
                missing, everywhere, where="every field (virtual_sources must be in all fields)"
            )
        return list(training.virtual_sources)
    others = [c for c in everywhere if c != nucleus and not c.endswith(VIRTUAL_SUFFIX)]
    label_free = [c for c in others if LABEL_FREE_NAMES.search(c)]
    if label_free:
        return label_free
    if cell is not None:
        return [cell]
    return others


def plan_pipeline(plate_url: str, config: ProcessConfig) -> PipelinePlan:
    """Check the plate against the request and decide every stage; writes nothing.

    Paths are made absolute here, once, so the plan means the same on any worker."""
    plate_url = absolute_url(str(plate_url))
    plate = open_plate(plate_url)
    wells = select_wells(plate, config.wells)
    refs = list(plate.iter_fields(wells))
    if not refs:
        raise HcssegError(f"plate {plate.name} has no fields in wells {wells}")
    channels = {r.path: plate.channel_names(r) for r in refs}
    labels = {r.path: plate.label_names(r) for r in refs}
    everywhere, anywhere = channel_sets(channels)
    nucleus = choose_nucleus_channel(config, anywhere, plate.name)
    virtual = f"{nucleus}{VIRTUAL_SUFFIX}"
    stained = [p for p, n in channels.items() if nucleus in n]
    lacking = [p for p, n in channels.items() if nucleus not in n]
    cell = config.cell_channel
    if cell is None:
        cell = pick_channel([c for c in everywhere if c != nucleus], CELL_NAMES)
    elif cell not in everywhere:
        raise ChannelNotFoundError(cell, everywhere, where=f"every field of plate {plate.name}")
    training = config.train
    notes: list[str] = []

    vs = config.virtual_stain
    if vs is None and lacking and training is not None and training.virtual_stain == "missing":
        if not stained:
            raise HcssegError(
                f"plate {plate.name}: no field holds {nucleus!r}, so a virtual stain cannot "
                "be learnt here; pass a trained virtual_stain.model_id or name the nucleus "
                "channel (--nucleus-channel)"
            )
        from hcsseg.virtual_stain.options import VirtualStainOptions

        sources = _virtual_sources(training, everywhere, nucleus, cell)
        if not sources:
            raise HcssegError(
                f"plate {plate.name}: {len(lacking)} fields lack {nucleus!r} and no other "
                f"channel is in every field to learn it from; channels: {', '.join(anywhere)}"
            )
        options = VirtualStainOptions(source_channels=sources, target_channel=nucleus)
        if training.virtual_steps is not None:
            options.training.n_steps = training.virtual_steps
        vs = VirtualStainConfig(model=options, model_store=config.model_store)
        notes.append(
            f"{len(lacking)} of {len(refs)} fields lack {nucleus!r}: learning it from "
            f"{', '.join(sources)} on the {len(stained)} fields that hold it"
        )
    if vs is not None and vs.model.target_channel != nucleus:
        raise HcssegError(
            f"virtual_stain predicts {vs.model.target_channel!r} but the nucleus channel is "
            f"{nucleus!r}"
        )
    if lacking and vs is None:
        no_virtual = [p for p in lacking if virtual not in channels[p]]
        if no_virtual:
            raise ChannelNotFoundError(
                nucleus,
                anywhere,
                where=f"plate {plate.name} fields {', '.join(no_virtual[:5])}"
                + (" ..." if len(no_virtual) > 5 else "")
                + f" (and no {virtual!r} there: use the annotation-free preset or "
                "--virtual-source)",
            )

    store = absolute_url(str(config.store(plate_url)))
    stages: list[TrainStage] = []
    if training is not None:
        # pseudo-labels and markers need the real stain; a plate without it anywhere learns
        # from its virtual stain
        teach = nucleus if stained else virtual
        teach_fields = stained if stained else list(channels)
        for compartment, method, truth in (
            ("nuclei", training.nuclei, training.nuclei_truth),
            ("cells", training.cells, training.cells_truth),
        ):
            if method is None:
                continue
            if compartment == "cells" and cell is None:
                notes.append(
                    f"no cell channel in every field: cells are nuclei grown by "
                    f"{config.cells.max_expansion_um:g} µm, no {method} model is trained"
                )
                continue
            candidates = teach_fields
            if truth is not None:
                candidates = [p for p, n in labels.items() if truth in n]
                if not candidates:
                    found = sorted({n for names in labels.values() for n in names})
                    if method == "unsupervised":
                        truth, candidates = None, teach_fields
                    else:
                        notes.append(
                            f"no field holds {truth!r}: {compartment} are not trained "
                            f"(labels in the plate: {', '.join(found) or 'none'})"
                        )
                        continue
            if compartment == "nuclei":
                inputs = [nucleus]
            elif method == "distance_unet" and truth is not None:
                inputs = [cell, nucleus] if not lacking else [cell]
            else:
                inputs = [cell]
            train_fields, gate_fields, in_sample = split_gate_fields(
                candidates, training.gate_fields
            )
            key = stage_key(
                compartment,
                method,
                inputs,
                truth,
                teach,
                train_fields,
                training,
                [config.scale, config.typical_nucleus_um, config.pixel_size_um],
            )
            stages.append(
                TrainStage(
                    compartment=compartment,
                    method=method,
                    input_channels=[c for c in inputs if c is not None],
                    truth=truth,
                    nucleus_channel=teach,
                    fields=train_fields,
                    gate_fields=gate_fields,
                    in_sample_gate=in_sample,
                    key=key,
                )
            )
        if (training.nuclei or training.cells) and not stages:
            raise HcssegError(
                f"plate {plate.name}: nothing to train ({'; '.join(notes)}); use the "
                "classical preset or import ground truth (hcsseg import-pairs)"
            )
    return PipelinePlan(
        plate_url=plate_url,
        plate_name=plate.name,
        output_root=absolute_url(str(config.output_root(plate_url))),
        model_store=store,
        nucleus_channel=nucleus,
        cell_channel=cell,
        virtual_stain=vs,
        virtual_stain_key=stage_key(vs, wells) if vs is not None else None,
        train=stages,
        training=training,
        scale=config.scale,
        typical_nucleus_um=config.typical_nucleus_um,
        pixel_size_um=config.pixel_size_um,
        notes=notes,
    )


def train_deployment(training: PlateTraining | None) -> str | None:
    """The GPU-pool deployment that trains models, if one is configured."""
    name = (training.deployment if training else None) or os.environ.get(TRAIN_DEPLOYMENT_ENV)
    return (name or "").strip() or None


def train_config(plan: PipelinePlan, stage: TrainStage) -> TrainConfig:
    """The `TrainConfig` of a stage; its request id lets a GPU-pool run be found again."""
    from hcsseg.pipeline.training import TrainConfig, budget_options

    training = plan.training or PlateTraining()
    options = budget_options(stage.method, training.steps)
    extra = training.nuclei_options if stage.compartment == "nuclei" else training.cells_options
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(options.get(key), dict):
            options[key] = {**options[key], **value}
        else:
            options[key] = value
    return TrainConfig(
        compartment=stage.compartment,  # type: ignore[arg-type]
        method=stage.method,  # type: ignore[arg-type]
        input_channels=stage.input_channels,
        truth=stage.truth,
        nucleus_channel=stage.nucleus_channel,
        cell_pseudo_labels=training.cell_pseudo_labels,
        options=options,
        max_fields=training.max_fields,
        fields=stage.fields,
        transfer=training.transfer,
        pixel_size_um=plan.pixel_size_um,
        scale=plan.scale,  # type: ignore[arg-type]
        typical_nucleus_um=plan.typical_nucleus_um,
        request_id=f"{plan.plate_name}:{stage.name}:{stage.key}",
    )
