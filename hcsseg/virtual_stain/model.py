"""Per-plate virtual nucleus staining: source channel(s) -> nucleus stain (U-Net, L1).

Following Bonte et al. 2024 (in-silico labelling), a segmentation-models-pytorch U-Net
regresses the nucleus stain from label-free or membrane channels, trained on the fields
of the same plate where both exist. Inputs and target are percentile-normalised per
field, so exposure drift between wells does not leak into the model. Training and
validation are split by field, never by pixel, so the validation loss measures the model
on fields it has not seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.special import expit
from skimage.filters import threshold_otsu

from hcsseg.errors import InputDataError, ModelError
from hcsseg.learning.data import (
    CropSampler,
    as_channels_first,
    normalize_percentile,
    split_train_val,
)
from hcsseg.learning.devices import seed_everything, select_device
from hcsseg.learning.loop import fit, thin_curve
from hcsseg.learning.networks import build_smp_model, predict_dense, transfer_weights
from hcsseg.virtual_stain.options import (
    VirtualStainOptions,
)


@dataclass
class VirtualStainModel:
    """A trained model and the facts a model card needs to reproduce its inputs."""

    network: torch.nn.Module
    options: VirtualStainOptions
    history: dict[str, Any]
    train_keys: list[str]
    val_keys: list[str]
    target_range: tuple[float, float] | None = None  # raw target intensities behind 0 and 1
    mask_threshold: float | None = None  # normalised level above which target_mode="mask" is 1

    def card(self) -> dict[str, Any]:
        return {
            "source_channels": self.options.source_channels,
            "target_channel": self.options.target_channel,
            "normalisation": {
                "source": "per-field percentile",
                "target": self.options.target_normalisation,  # "plate" or "field" percentile
                "percentiles": list(self.options.percentiles),
                "target_range": list(self.target_range) if self.target_range else None,
                "target_mode": self.options.target_mode,
                "mask_threshold": self.mask_threshold,
            },
            "architecture": {
                "arch": "unet",
                "encoder_name": self.options.encoder_name,
                "decoder_channels": self.options.decoder_channels,
                "in_channels": len(self.options.source_channels),
                "classes": 1,
            },
            "options": self.options.model_dump(mode="json"),
            "training_fields": self.train_keys,
            "validation_fields": self.val_keys,
            "history": {k: v for k, v in self.history.items() if k != "loss"},
            "final_train_loss": float(np.mean(self.history["loss"][-20:])),
            "loss_curve": thin_curve(self.history["loss"]),
        }


def build_network(options: VirtualStainOptions) -> torch.nn.Module:
    return build_smp_model(
        "unet",
        encoder_name=options.encoder_name,
        in_channels=len(options.source_channels),
        classes=1,
        decoder_channels=options.decoder_channels,
    )


def network_from_state(state: dict[str, torch.Tensor], card: dict[str, Any]) -> torch.nn.Module:
    """Rebuild a stored model from its card; refuses weights that do not fit the card."""
    try:
        options = VirtualStainOptions.model_validate(card["options"])
    except (KeyError, ValueError) as exc:
        raise ModelError(f"model card {card.get('model_id')} has no usable options: {exc}") from exc
    net = build_network(options)
    transfer_weights(net, state, prefixes=("",), what=f"model {card.get('model_id')}")
    return net.eval()


def _split_single_field(
    source: np.ndarray, target: np.ndarray, fraction: float
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """One field only: its right-hand strip is validation, so val pixels stay unseen."""
    cut = int(source.shape[-1] * (1 - max(fraction, 0.2)))
    return (source[..., :cut], target[..., :cut]), (source[..., cut:], target[..., cut:])


def train_virtual_stain(
    sources: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    keys: Sequence[str],
    *,
    options: VirtualStainOptions,
    init_state: dict[str, torch.Tensor] | None = None,
) -> VirtualStainModel:
    """Fit source (C, Y, X) -> target (Y, X) over fields; `init_state` fine-tunes a model."""
    if not sources:
        raise InputDataError(
            f"no field holds both the source channels {options.source_channels} and the "
            f"target {options.target_channel!r}: nothing to learn from"
        )
    if not len(sources) == len(targets) == len(keys):
        raise InputDataError("sources, targets and keys must have the same length")
    lo, hi = options.percentiles
    xs = [
        normalize_percentile(s, lo, hi, name=f"field {k} source")
        for s, k in zip(sources, keys, strict=True)
    ]
    # Checked float32 copies, scaled in place below.
    ys = [
        as_channels_first(t, name=f"field {k} target") for t, k in zip(targets, keys, strict=True)
    ]
    if options.target_normalisation == "plate":
        target_range = plate_target_range(ys, keys, lo, hi)
        t_lo, t_hi = target_range
        for y in ys:
            y -= t_lo
            y /= t_hi - t_lo
    else:
        # Informational only: the median raw intensities behind 0 and 1.
        med = np.median([np.percentile(y, (lo, hi)) for y in ys], axis=0)
        target_range = (float(med[0]), float(med[1]))
        ys = [
            normalize_percentile(y, lo, hi, name=f"field {k} target")
            for y, k in zip(ys, keys, strict=True)
        ]
    for x, y, k in zip(xs, ys, keys, strict=True):
        if x.shape[0] != len(options.source_channels):
            raise InputDataError(
                f"field {k}: {x.shape[0]} source channels, expected {options.source_channels}"
            )
        if y.shape != (1, *x.shape[1:]):
            raise InputDataError(
                f"field {k}: target {options.target_channel!r} has shape {y.shape[-2:]} "
                f"but the source channels are {x.shape[1:]}; expected one (Y, X) plane of that size"
            )
    mask_threshold = None
    if options.target_mode == "mask":
        mask_threshold = _mask_threshold(ys)
        ys = [(y > mask_threshold).astype(np.float32) for y in ys]
    train_opts = options.training
    rng = seed_everything(train_opts.seed)
    if len(xs) == 1:
        (tx, ty), (vx, vy) = _split_single_field(xs[0], ys[0], train_opts.val_fraction)
        train_x, train_y, val_x, val_y = [tx], [ty], [vx], [vy]
        train_keys, val_keys = [f"{keys[0]}[train strip]"], [f"{keys[0]}[validation strip]"]
    else:
        tr, va = split_train_val(len(xs), max(train_opts.val_fraction, 1 / len(xs)), rng)
        train_x, train_y = [xs[i] for i in tr], [ys[i] for i in tr]
        val_x, val_y = [xs[i] for i in va], [ys[i] for i in va]
        train_keys, val_keys = [keys[i] for i in tr], [keys[i] for i in va]
    net = build_network(options)
    if init_state is not None:
        transfer_weights(net, init_state, prefixes=("",), what="the initial model")
    sampler = CropSampler(
        train_x, train_y, train_opts.crop_size, rng, foreground=options.foreground_crops
    )
    val_sampler = CropSampler(val_x, val_y, train_opts.crop_size, np.random.default_rng(1))
    loss = (
        torch.nn.functional.binary_cross_entropy_with_logits
        if options.target_mode == "mask"
        else torch.nn.functional.l1_loss
    )
    history = fit(net, loss, sampler, train_opts, val_sampler=val_sampler)
    return VirtualStainModel(
        net, options, history, train_keys, val_keys, target_range, mask_threshold
    )


def _mask_threshold(targets: Sequence[np.ndarray]) -> float:
    """Otsu's level over the normalised targets pooled (subsampled to ~1 M pixels a field)."""
    pooled = np.concatenate(
        [np.asarray(t).ravel()[:: max(1, np.asarray(t).size // 1_000_000)] for t in targets]
    )
    level = float(threshold_otsu(pooled))
    if not (pooled > level).any():
        raise InputDataError("the target channel has no pixels above its Otsu threshold")
    return level


def plate_target_range(
    targets: Sequence[np.ndarray], keys: Sequence[str], low: float, high: float
) -> tuple[float, float]:
    """Target intensities that become 0 and 1 for the whole plate.

    0 is the median of the fields' `low` percentiles (the usual background); 1 is the
    `high` percentile of all fields' pixels pooled, i.e. a bright nucleus wherever in the
    plate the nuclei are. Pixels are subsampled to at most ~1 M per field to bound memory."""
    lows, pooled = [], []
    for t in targets:
        arr = np.asarray(t, dtype=np.float32)
        lows.append(float(np.percentile(arr, low)))
        stride = max(1, arr.size // 1_000_000)
        pooled.append(arr.ravel()[::stride])
    t_lo, t_hi = float(np.median(lows)), float(np.percentile(np.concatenate(pooled), high))
    if t_hi <= t_lo:
        raise InputDataError(
            f"the target channel has no contrast in the training fields {list(keys)[:5]}"
            f"{' ...' if len(keys) > 5 else ''}: its {high} percentile ({t_hi}) is not above "
            f"the background ({t_lo})"
        )
    return t_lo, t_hi


def predict_virtual_stain(
    network: torch.nn.Module, source: np.ndarray, options: VirtualStainOptions
) -> np.ndarray:
    """Virtual nucleus image (Y, X) in normalised target units (≈0 background, ≈1 bright)."""
    lo, hi = options.percentiles
    x = normalize_percentile(source, lo, hi, name="source")
    device = select_device(options.training.device)
    out = predict_dense(
        network,
        x,
        device=device,
        tile=options.tile,
        overlap=options.overlap,
        amp=options.training.amp,
    )
    return expit(out[0]) if options.target_mode == "mask" else out[0]


def to_storage(prediction: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Normalised units -> the plate's dtype: 1.0 maps to 80% of an integer range."""
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        top = 0.8 * np.iinfo(dtype).max
        return np.clip(np.rint(prediction * top), 0, np.iinfo(dtype).max).astype(dtype)
    return prediction.astype(dtype)
