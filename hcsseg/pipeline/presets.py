"""Named starting points for a plate run, picked by name on the CLI, in the UI or in an event.

A preset is a partial `ProcessConfig`; the options a user gives override it field by field
(nested sections merge), so `--preset annotation-free --nucleus-channel Hoechst` keeps the
rest of the preset.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal, get_args

from hcsseg.errors import HcssegError

if TYPE_CHECKING:  # the CLI reads the preset names without importing the config (torch)
    from hcsseg.config import ProcessConfig

PresetName = Literal["classical", "annotation-free", "supervised"]
PRESET_NAMES: tuple[str, ...] = get_args(PresetName)

PRESETS: dict[str, dict[str, Any]] = {
    # the CellProfiler-style baseline: nothing is trained
    "classical": {},
    # no annotation: virtual nucleus stain where it is missing, nuclei learnt from classical
    # pseudo-labels on the real stain, cells from nucleus markers (Yu lab)
    "annotation-free": {
        "train": {"nuclei": "distance_unet", "cells": "unsupervised", "virtual_stain": "missing"},
    },
    # ground truth stored in the plate (hcsseg import-pairs): fine-tune on it
    "supervised": {
        "train": {
            "nuclei": "distance_unet",
            "cells": "distance_unet",
            "nuclei_truth": "nuclei_gt",
            "cells_truth": "cells_gt",
            "virtual_stain": "missing",
        },
    },
}

PRESET_HELP = (
    "classical: no training; annotation-free: virtual stain where the nucleus stain is missing, "
    "nuclei and cells learnt on this plate without annotation; supervised: fine-tune on the "
    "plate's ground-truth labels (nuclei_gt, cells_gt)"
)


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def preset_config(name: str, overrides: Mapping[str, Any] | None = None) -> ProcessConfig:
    """The preset's options with `overrides` (only options the user set) applied on top."""
    from hcsseg.config import ProcessConfig

    if name not in PRESETS:
        raise HcssegError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return ProcessConfig.model_validate(_merge(PRESETS[name], overrides or {}))


def set_options(config: ProcessConfig | Mapping[str, Any] | None) -> dict[str, Any]:
    """Only the options a user gave (a UI form or JSON payload), never the model's defaults."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return dict(config)
    return config.model_dump(mode="json", exclude_unset=True)
