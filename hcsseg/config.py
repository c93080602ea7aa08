"""Typed options for a plate run; every default works on a typical fluorescence plate."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hcsseg.model_store import default_store
from hcsseg.segment.classical import CellOptions, NucleiOptions
from hcsseg.virtual_stain.plate import VirtualStainConfig

NUCLEUS_NAMES = re.compile(r"dapi|hoechst|h33342|dna|nucle", re.IGNORECASE)
CELL_NAMES = re.compile(
    r"cell|cyto|membr|actin|phalloidin|wga|tubulin|mask|body|cd\d+", re.IGNORECASE
)


class PlateTraining(BaseModel):
    """Models a plate run trains on the plate itself before segmenting it (presets fill this)."""

    model_config = ConfigDict(extra="forbid")

    nuclei: Literal["distance_unet", "fpn2ws"] | None = Field(
        None, description="nucleus model to train on this plate; None: no nucleus training"
    )
    cells: Literal["distance_unet", "unsupervised"] | None = Field(
        None, description="cell model to train on this plate; None: no cell training"
    )
    nuclei_truth: str | None = Field(
        None,
        description="ground-truth nucleus labels in the plate (e.g. nuclei_gt); without them "
        "the nucleus model learns from classical pseudo-labels on the real nucleus stain",
    )
    cells_truth: str | None = Field(
        None,
        description="ground-truth cell labels in the plate (e.g. cells_gt); without them "
        "distance_unet learns from classical cells, unsupervised from nucleus markers",
    )
    cell_pseudo_labels: Literal["propagation", "stain"] = Field(
        "propagation",
        description="classical cells that teach a distance_unet cell model without ground "
        "truth: grown from the nuclei, or found in the cell stain alone (surface stains)",
    )
    steps: int | None = Field(
        None, ge=1, description="training steps of every model (default: each method's recipe)"
    )
    nuclei_options: dict[str, Any] = Field(
        default_factory=dict,
        description="options of the nucleus method (see its options model), e.g. "
        "{'tta': false} or {'train': {'learning_rate': 0.001}}",
    )
    cells_options: dict[str, Any] = Field(
        default_factory=dict, description="options of the cell method, as nuclei_options"
    )
    transfer: bool = Field(
        True,
        description="fine-tune from a compatible model of an earlier plate in the model "
        "store (same method, compartment, channels) with fewer steps, instead of from scratch",
    )
    gate: bool = Field(
        True,
        description="score each new model against the classical baseline on held-back fields "
        "and segment with whichever wins",
    )
    gate_fields: int = Field(
        8,
        ge=1,
        description="fields held back from training for the quality gate (at most; about a "
        "fifth of the plate's fields): more resolve smaller differences",
    )
    gate_margin: float = Field(
        0.01,
        ge=0,
        description="a model replaces the baseline only if its mean per-field score is ahead "
        "by more than this plus one standard error of the per-field differences",
    )
    max_fields: int = Field(32, ge=1, description="training fields read per model (memory)")
    virtual_stain: Literal["missing", "never"] = Field(
        "missing",
        description="missing: learn the nucleus stain from other channels when some fields "
        "lack it (virtual_sources, or label-free/membrane channels found by name)",
    )
    virtual_sources: list[str] | None = Field(
        None, description="channels the virtual nucleus stain is learnt from; default: by name"
    )
    virtual_steps: int | None = Field(
        None, ge=1, description="virtual-staining training steps (default: its recipe)"
    )
    deployment: str | None = Field(
        None,
        description="train on this GPU-pool deployment (e.g. train-plate/gpu); default: "
        "$HCSSEG_TRAIN_DEPLOYMENT, else in this run",
    )


class ProcessConfig(BaseModel):
    """What `process_plate` segments, measures and where it writes tables."""

    model_config = ConfigDict(extra="forbid")

    nucleus_channel: str | None = Field(
        None,
        description="channel to find nuclei in; default: the first channel named like "
        "DAPI/Hoechst/DNA (or its _virtual prediction)",
    )
    cell_channel: str | None = Field(
        None,
        description="cytoplasm/membrane channel for cell outlines; default: a channel named "
        "like cell/cyto/membrane/actin, else cells are nuclei grown by a fixed distance",
    )
    measure_channels: list[str] | None = Field(
        None, description="channels to measure intensities in; default: all"
    )
    wells: list[str] | None = Field(None, description="only these wells (e.g. ['B03'])")
    output: str | None = Field(
        None,
        description="folder for Parquet tables; default: PLATE_tables beside the plate "
        "(PLATE: the plate folder's name without .zarr)",
    )
    virtual_stain: VirtualStainConfig | None = Field(
        None,
        description="first learn the nucleus stain from other channels and predict "
        "TARGET_virtual into every field (TARGET: the nucleus channel, e.g. DAPI_virtual; "
        "fields without the stain then use it)",
    )
    nuclei_method: Literal["classical", "distance_unet", "fpn2ws", "cellpose"] = Field(
        "classical", description="how nuclei are found; model methods need `hcsseg train` first"
    )
    cells_method: Literal["classical", "distance_unet", "unsupervised", "cellpose"] = Field(
        "classical", description="how cells are found; unsupervised grows cells from nuclei"
    )
    nuclei_model: str | None = Field(
        None, description="stored model id for nuclei; default: the latest for this plate"
    )
    cells_model: str | None = Field(
        None, description="stored model id for cells; default: the latest for this plate"
    )
    model_store: str | None = Field(
        None,
        description="folder of trained models; default: PLATE_models beside the plate "
        "(PLATE: the plate folder's name without .zarr)",
    )
    pixel_size_um: float | None = Field(
        None,
        gt=0,
        description="pixel size in micrometres for segmentation and features, overriding the "
        "plate's metadata (and the per-field estimate)",
    )
    scale: Literal["estimate", "metadata"] = Field(
        "estimate",
        description="scale of the classical segmentation: 'estimate' reads each field's "
        "typical nucleus diameter off the nucleus channel and takes it as typical_nucleus_um "
        "(pixel sizes in metadata are often missing or wrong; the plate's value is used when a "
        "field has no nuclei); 'metadata' trusts the plate's pixel size",
    )
    typical_nucleus_um: float = Field(
        10.0, gt=0, description="nucleus diameter an estimated scale maps to, micrometres"
    )
    tile_size: int = Field(
        4096,
        ge=256,
        description="fields wider or taller than this (pixels) are segmented by the classical "
        "methods tile by tile, labels stitched, so memory is bounded by a tile instead of the "
        "field; the overlap follows from the nucleus size and the cells' max_expansion_um "
        "(smaller fields give the same labels as untiled)",
    )
    saturation_fraction: float = Field(
        0.01,
        ge=0,
        le=1,
        description="a field whose share of saturated pixels (at the integer maximum) in a "
        "channel exceeds this is flagged (Image_ImageQuality_Saturated_ plus the channel), warned "
        "about and counted in the plate report: bright nuclei clipped to one value merge",
    )
    train: PlateTraining | None = Field(
        None,
        description="train models on this plate first (the annotation-free and supervised "
        "presets of `hcsseg run` fill this in)",
    )
    nuclei: NucleiOptions = Field(default_factory=NucleiOptions)
    cells: CellOptions = Field(default_factory=CellOptions)

    def store(self, plate_url: str) -> Path:
        return default_store(plate_url, self.model_store)

    def output_root(self, plate_url: str) -> Path:
        if self.output:
            return Path(self.output)
        path = Path(plate_url.rstrip("/"))
        return path.with_name(f"{path.stem}_tables")
