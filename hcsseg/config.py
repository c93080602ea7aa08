"""Typed options for a plate run; every default works on a typical fluorescence plate."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from hcsseg.model_store import default_store
from hcsseg.segment.classical import CellOptions, NucleiOptions
from hcsseg.virtual_stain.plate import VirtualStainConfig

NUCLEUS_NAMES = re.compile(r"dapi|hoechst|h33342|dna|nucle", re.IGNORECASE)
CELL_NAMES = re.compile(
    r"cell|cyto|membr|actin|phalloidin|wga|tubulin|mask|body|cd\d+", re.IGNORECASE
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
        None, description="folder for Parquet tables; default: <plate>_tables beside the plate"
    )
    virtual_stain: VirtualStainConfig | None = Field(
        None,
        description="first learn the nucleus stain from other channels and predict "
        "<target>_virtual into every field (fields without the stain then use it)",
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
        None, description="folder of trained models; default: <plate>_models beside the plate"
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
    nuclei: NucleiOptions = Field(default_factory=NucleiOptions)
    cells: CellOptions = Field(default_factory=CellOptions)

    def store(self, plate_url: str) -> Path:
        return default_store(plate_url, self.model_store)

    def output_root(self, plate_url: str) -> Path:
        if self.output:
            return Path(self.output)
        path = Path(plate_url.rstrip("/"))
        return path.with_name(f"{path.stem}_tables")
