"""Distance-map + foreground U-Net for cells or nuclei (Bonte et al. 2024).

An smp U-Net predicts two maps: each object's Euclidean distance transform divided by its
maximum (1 at the object's centre, falling to about 1/radius at its edge, so small and large
objects weigh alike) and the foreground. Instances are recovered by a seeded watershed on
the predicted distance: seeds are its h-maxima, flooding stays inside the predicted
foreground.

The network can start from random weights, from cached ImageNet weights, or from a plate's
virtual-staining U-Net with the same encoder (in-silico-labelling pretraining: a model that
learnt to predict the nucleus stain from the other channels has already learnt where nuclei
are, so few annotated fields suffice).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage as ndi
from scipy.special import expit
from skimage import filters, morphology, segmentation
from torch import nn

from hcsseg.errors import InputDataError, ModelError
from hcsseg.segment.training import (
    CropSampler,
    InitKind,
    LossFn,
    StateDict,
    TrainOptions,
    build_smp_model,
    check_pairs,
    first_conv_in_channels,
    fit,
    normalize_percentile,
    predict_dense,
    seed_everything,
    select_device,
    split_train_val,
    transfer_weights,
)


class DistanceUNetOptions(BaseModel):
    """Architecture, loss, post-processing and training of the distance U-Net."""

    model_config = ConfigDict(extra="forbid")

    encoder_name: str = Field("resnet18", description="smp encoder (resnet18, resnet34, ...)")
    decoder_channels: tuple[int, ...] = Field(
        (128, 64, 32, 16, 8),
        description="U-Net decoder widths; the default matches hcsseg.virtual_stain's, so a "
        "plate's virtual-staining model can initialise encoder and decoder",
    )
    init: InitKind = Field(
        "random", description="encoder start when no init_state is given: random or imagenet"
    )
    isl_transfer: Literal["encoder", "encoder_decoder"] = Field(
        "encoder_decoder",
        description="what to copy from a virtual-staining U-Net: the encoder only, or the "
        "decoder too (all but the output head)",
    )
    foreground_weight: float = Field(
        1.0,
        ge=0,
        description="α in MSE(distance) + α·BCE(foreground). Bonte et al. use 2000 with their "
        "distance scaling; with distances normalised to [0, 1] the MSE is ~0.01-0.05 and "
        "α = 1 keeps both terms in play",
    )
    h: float = Field(0.1, gt=0, description="h-maxima height on the predicted distance (0-1)")
    distance_sigma: float = Field(1.0, ge=0, description="smoothing of the distance, pixels")
    foreground_threshold: float = Field(0.5, gt=0, lt=1)
    min_area: int = Field(8, ge=0, description="smaller objects are dropped, pixels")
    tile: int = Field(512, ge=64, description="inference tile, multiple of 32")
    overlap: int = Field(64, ge=0)
    train: TrainOptions = Field(default_factory=TrainOptions)


# ---------------------------------------------------------------------------- targets


def normalized_distance(labels: np.ndarray) -> np.ndarray:
    """Per-object distance to the object's edge divided by its maximum, in (0, 1].

    Pixels on an object's outer ring (touching background or another object) get 1 before
    normalisation, so touching objects are separated by a valley."""
    fg = labels > 0
    if not fg.any():
        return np.zeros(labels.shape, dtype=np.float32)
    edge = segmentation.find_boundaries(labels, mode="inner")
    dist = ndi.distance_transform_edt(fg & ~edge) + fg
    ids = np.arange(int(labels.max()) + 1)
    peak = np.ones(ids.size)
    peak[1:] = np.maximum(ndi.maximum(dist, labels, index=ids[1:]), 1.0)
    return (dist / peak[labels]).astype(np.float32)


def distance_targets(labels: np.ndarray) -> np.ndarray:
    """(2, Y, X) float32 training targets: normalised distance and foreground."""
    return np.stack([normalized_distance(labels), (labels > 0).astype(np.float32)])


# ---------------------------------------------------------------------------- model


def _loss(options: DistanceUNetOptions) -> LossFn:
    alpha = options.foreground_weight

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mse = F.mse_loss(torch.sigmoid(out[:, 0]), target[:, 0])
        bce = F.binary_cross_entropy_with_logits(out[:, 1], target[:, 1])
        return mse + alpha * bce

    return loss


def build_model(in_channels: int, options: DistanceUNetOptions) -> nn.Module:
    return build_smp_model(
        "unet",
        encoder_name=options.encoder_name,
        in_channels=in_channels,
        classes=2,
        init=options.init,
        decoder_channels=options.decoder_channels,
    )


def _load(model_or_state: nn.Module | StateDict, options: DistanceUNetOptions) -> nn.Module:
    if isinstance(model_or_state, nn.Module):
        return model_or_state
    model = build_smp_model(
        "unet",
        encoder_name=options.encoder_name,
        in_channels=first_conv_in_channels(model_or_state),
        classes=2,
        decoder_channels=options.decoder_channels,
    )
    try:
        model.load_state_dict(model_or_state)
    except RuntimeError as exc:
        raise ModelError(
            f"state dict does not fit a distance U-Net with encoder {options.encoder_name!r} "
            f"and decoder {options.decoder_channels}: {str(exc)[:300]}"
        ) from None
    return model


def train_distance_unet(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    options: DistanceUNetOptions | None = None,
    init_state: StateDict | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train on (image, labels) pairs: ground truth or pseudo-labels of a plate's fields.

    `images`: (Y, X) or (C, Y, X); `labels`: matching 2-D instance labels (or non-overlapping
    (N, Y, X) stacks). `init_state`: a virtual-staining U-Net state dict whose encoder (and
    decoder, see `isl_transfer`) is copied before training; a different encoder or channel
    count raises ModelError. Returns CPU state dict and history (losses per step, validation
    losses, seconds, what was transferred)."""
    opts = options or DistanceUNetOptions()
    imgs, labs = check_pairs(images, labels)
    lo, hi = opts.train.normalize_percentiles
    norm = [normalize_percentile(im, lo, hi) for im in imgs]
    targets = [distance_targets(lab) for lab in labs]
    rng = seed_everything(opts.train.seed)
    model = build_model(norm[0].shape[0], opts)
    history_extra: dict[str, Any] = {"init": opts.init, "transferred_tensors": 0}
    if init_state is not None:
        prefixes = ("encoder.",) if opts.isl_transfer == "encoder" else ("encoder.", "decoder.")
        keys = transfer_weights(model, init_state, prefixes=prefixes, what="init_state")
        history_extra |= {"init": f"virtual-staining ({opts.isl_transfer})"}
        history_extra["transferred_tensors"] = len(keys)
    train_idx, val_idx = split_train_val(len(norm), opts.train.val_fraction, rng)
    crop = opts.train.crop_size
    sampler = CropSampler([norm[i] for i in train_idx], [targets[i] for i in train_idx], crop, rng)
    val = (
        CropSampler([norm[i] for i in val_idx], [targets[i] for i in val_idx], crop, rng)
        if val_idx
        else None
    )
    history = fit(model, _loss(opts), sampler, opts.train, val_sampler=val)
    history |= history_extra | {"in_channels": norm[0].shape[0], "n_images": len(norm)}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, history


# ---------------------------------------------------------------------------- inference


def predict_distance_unet(
    model_or_state: nn.Module | StateDict,
    image: np.ndarray,
    *,
    options: DistanceUNetOptions | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted normalised distance and foreground probability of a whole field."""
    opts = options or DistanceUNetOptions()
    model = _load(model_or_state, opts)
    lo, hi = opts.train.normalize_percentiles
    norm = normalize_percentile(image, lo, hi)
    want = first_conv_in_channels(model.state_dict())
    if norm.shape[0] != want:
        raise InputDataError(f"the model expects {want} channel(s); the image has {norm.shape[0]}")
    out = predict_dense(
        model,
        norm,
        device=select_device(opts.train.device),
        tile=opts.tile,
        overlap=opts.overlap,
        amp=opts.train.amp,
    )
    prob = expit(out)
    return prob[0], prob[1]


def segment_distance_unet(
    model_or_state: nn.Module | StateDict,
    image: np.ndarray,
    *,
    options: DistanceUNetOptions | None = None,
) -> np.ndarray:
    """uint32 instance labels (ids 1..N) of a field."""
    opts = options or DistanceUNetOptions()
    dist, fg = predict_distance_unet(model_or_state, image, options=opts)
    return instances_from_distance(
        dist,
        fg > opts.foreground_threshold,
        h=opts.h,
        sigma=opts.distance_sigma,
        min_area=opts.min_area,
    )


def instances_from_distance(
    dist: np.ndarray, mask: np.ndarray, *, h: float, sigma: float, min_area: int
) -> np.ndarray:
    """Watershed of -distance from its h-maxima, inside `mask`; uint32 ids 1..N."""
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.uint32)
    smooth = filters.gaussian(dist, sigma=sigma) if sigma > 0 else dist
    seeds, _ = ndi.label(morphology.h_maxima(smooth, h).astype(bool) & mask)
    return finish_labels(segmentation.watershed(-smooth, seeds, mask=mask), mask, min_area)


def finish_labels(labels: np.ndarray, mask: np.ndarray, min_area: int) -> np.ndarray:
    """Give seedless mask components their own ids, drop small objects, relabel 1..N."""
    orphans, n = ndi.label(mask & (labels == 0))
    out = np.where(orphans > 0, orphans + int(labels.max()), labels) if n else labels
    if min_area > 0:
        area = np.bincount(out.ravel())
        small = area < min_area
        small[0] = False
        out = np.where(small[out], 0, out)
    relabelled, _, _ = segmentation.relabel_sequential(out)
    return relabelled.astype(np.uint32)
