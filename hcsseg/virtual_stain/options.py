"""What a virtual-staining model learns and how: options and card helpers, without torch (the
configuration of every command holds them)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hcsseg.learning.options import TrainOptions

KIND = "virtual_stain"
# Predictions are in normalised target units: background 0, a bright nucleus 1.
VIRTUAL_RANGE = (0.0, 1.0)


def _default_training() -> TrainOptions:
    # On dense tissue the validation L1 creeps down for ~1000 steps while the images keep
    # sharpening (bench/virtual_stain.py), hence the long budget and patient early stopping.
    return TrainOptions(
        n_steps=1500,
        batch_size=8,
        crop_size=128,
        learning_rate=2e-3,
        val_fraction=0.2,
        val_every=50,
        patience=10,
        val_crops=32,
    )


class VirtualStainOptions(BaseModel):
    """What to learn and how; the defaults train a small CPU-friendly model in minutes."""

    model_config = ConfigDict(extra="forbid")

    source_channels: list[str] = Field(
        ..., min_length=1, description="input channels, e.g. phase z-planes or a membrane stain"
    )
    target_channel: str = Field("DAPI", description="nucleus stain to predict")
    encoder_name: str = Field(
        "resnet18", description="smp encoder; densenet121 as in Bonte et al. 2024 on a GPU"
    )
    decoder_channels: list[int] = Field(default_factory=lambda: [128, 64, 32, 16, 8])
    training: TrainOptions = Field(default_factory=_default_training)
    foreground_crops: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of training crops centred where the nucleus stain is bright; "
        "on a sparse plate uniform crops are mostly background and the model learns to "
        "predict nothing; 0 suits dense tissue, where every crop holds nuclei",
    )
    target_mode: Literal["intensity", "mask"] = Field(
        "intensity",
        description="'intensity': regress the normalised stain (L1, Bonte et al. 2024); "
        "'mask': learn where the stain is above Otsu's threshold (cross-entropy, as the "
        "Yu-lab synthetic-nucleus U-Net does), because markers need nucleus positions, not "
        "intensities; predictions are then probabilities",
    )
    percentiles: tuple[float, float] = (1.0, 99.8)
    target_normalisation: Literal["plate", "field"] = Field(
        "plate",
        description="'plate': one target intensity range for all training fields, so a "
        "field with few nuclei keeps a dark background (per-field percentiles would stretch "
        "its noise to full range and teach the model a bright haze); 'field': per-field "
        "percentiles, for plates whose nucleus stain exposure varies between fields",
    )
    tile: int = Field(512, description="prediction tile size (multiple of 32)")
    overlap: int = Field(64, description="prediction tile overlap, blended")


def card_target_range(card: dict[str, Any]) -> tuple[float, float] | None:
    """Raw target intensities the model learnt as 0 and 1, if one range held plate-wide."""
    norm = card.get("normalisation") or {}
    if norm.get("target") != "plate" or not norm.get("target_range"):
        return None
    lo, hi = norm["target_range"]
    return float(lo), float(hi)
