"""Training options of the learned models, importable without torch (the classical path and
the options of every command load them; torch costs ~800 MB and seconds per process)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class TrainOptions(BaseModel):
    """Optimisation knobs shared by the supervised models."""

    model_config = ConfigDict(extra="forbid")

    n_steps: int = Field(1500, ge=1, description="optimiser steps (batches)")
    batch_size: int = Field(8, ge=1)
    crop_size: int = Field(256, ge=32, description="square training crop, multiple of 32")
    learning_rate: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(50, ge=0, description="linear warm-up before cosine decay")
    val_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of training images held out for early stopping (0 = none; at "
        "least one image stays in training)",
    )
    val_every: int = Field(100, ge=1, description="steps between validation checks")
    patience: int = Field(5, ge=1, description="validation checks without improvement")
    val_crops: int = Field(16, ge=1, description="fixed crops scored at each check")
    normalize_percentiles: tuple[float, float] = (1.0, 99.8)
    zoom: float = Field(
        1.0, ge=1, le=2, description="scale augmentation: crops resized by up to this factor"
    )
    augment: bool = Field(False, description="contrast/gamma/blur/noise augmentation")
    snapshot_steps: list[int] = Field(
        default_factory=list,
        description="steps at which a copy of the weights is kept in the history (learning curves)",
    )
    seed: int = 0
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, mps")
    amp: bool = Field(
        True, description="bfloat16 autocast on CUDA and on CPUs with native bfloat16"
    )

    @model_validator(mode="after")
    def _check(self) -> TrainOptions:
        if self.crop_size % 32:
            raise ValueError(f"crop_size must be a multiple of 32, got {self.crop_size}")
        lo, hi = self.normalize_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"normalize_percentiles must satisfy 0 <= low < high <= 100: {lo, hi}")
        return self
