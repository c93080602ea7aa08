"""FPN2-WS nucleus segmentation (NCI HiTIF, Keikhosravi/Zaki et al.).

Two feature-pyramid networks look at the same image: one predicts each nucleus's distance
transform normalised to its maximum, the other a Gaussian-blurred map of nucleus borders.
Seeds are the confident nucleus cores (distance above a threshold, away from predicted
borders); a seeded watershed on the border map (minus the distance, which breaks ties on
flat stretches) then grows them inside the predicted nuclei (distance above a low
threshold). Two separate networks, as in the paper, so each output gets a whole decoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage as ndi
from scipy.special import expit
from skimage import filters, segmentation
from torch import nn

from hcsseg.errors import InputDataError, ModelError
from hcsseg.learning.data import CropSampler, check_pairs, normalize_percentile, split_train_val
from hcsseg.learning.devices import seed_everything, select_device
from hcsseg.learning.loop import LossFn, fit
from hcsseg.learning.networks import (
    InitKind,
    StateDict,
    build_smp_model,
    first_conv_in_channels,
    predict_dense,
    transfer_weights,
)
from hcsseg.learning.options import TrainOptions
from hcsseg.segment.distance_unet import finish_labels, normalized_distance


class FPN2WSOptions(BaseModel):
    """Architecture, targets, post-processing and training of FPN2-WS."""

    model_config = ConfigDict(extra="forbid")

    encoder_name: str = Field("resnet18", description="smp encoder of both FPNs")
    init: InitKind = "random"
    border_sigma: float = Field(1.0, gt=0, description="blur of the border target, pixels")
    seed_threshold: float = Field(0.5, gt=0, lt=1, description="distance above: nucleus core")
    border_threshold: float = Field(0.5, gt=0, lt=1, description="border above: not a seed")
    mask_threshold: float = Field(0.1, gt=0, lt=1, description="distance above: nucleus")
    min_area: int = Field(8, ge=0, description="smaller objects are dropped, pixels")
    tile: int = Field(512, ge=64, description="inference tile, multiple of 32")
    overlap: int = Field(64, ge=0)
    train: TrainOptions = Field(default_factory=TrainOptions)


class FPNPair(nn.Module):
    """The two FPNs; the output stacks (distance logit, border logit)."""

    def __init__(self, distance: nn.Module, border: nn.Module) -> None:
        super().__init__()
        self.distance = distance
        self.border = border

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.distance(x), self.border(x)], dim=1)


def border_map(labels: np.ndarray, sigma: float) -> np.ndarray:
    """Inner object borders blurred by a Gaussian and scaled so a straight border peaks at 1
    (NCI's 'blurred contour' target)."""
    edge = segmentation.find_boundaries(labels, mode="inner").astype(np.float32)
    blurred = filters.gaussian(edge, sigma=sigma, mode="constant")
    line_peak = 1.0 / (np.sqrt(2 * np.pi) * sigma)  # a 1-px line blurred along its normal
    return np.clip(blurred / min(line_peak, 1.0), 0.0, 1.0).astype(np.float32)


def fpn2ws_targets(labels: np.ndarray, sigma: float) -> np.ndarray:
    return np.stack([normalized_distance(labels), border_map(labels, sigma)])


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(torch.sigmoid(out), target)


def build_model(in_channels: int, options: FPN2WSOptions) -> FPNPair:
    def one() -> nn.Module:
        return build_smp_model(
            "fpn",
            encoder_name=options.encoder_name,
            in_channels=in_channels,
            classes=1,
            init=options.init,
        )

    return FPNPair(one(), one())


def _load(model_or_state: nn.Module | StateDict, options: FPN2WSOptions) -> nn.Module:
    if isinstance(model_or_state, nn.Module):
        return model_or_state
    in_channels = first_conv_in_channels(model_or_state, prefix="distance.encoder.")
    model = build_model(in_channels, options.model_copy(update={"init": "random"}))
    try:
        model.load_state_dict(model_or_state)
    except RuntimeError as exc:
        raise ModelError(
            f"state dict does not fit FPN2-WS with encoder {options.encoder_name!r}: "
            f"{str(exc)[:300]}"
        ) from None
    return model


def train_fpn2ws(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    options: FPN2WSOptions | None = None,
    init_state: StateDict | None = None,
    parent_state: StateDict | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train both FPNs on (image, labels) pairs.

    `init_state` is either a saved FPN2-WS pair (training resumes from it) or any smp model
    with the same encoder, e.g. a plate's virtual-staining U-Net, whose encoder then
    initialises both FPNs. `parent_state` is an FPN2-WS pair of an earlier plate to
    fine-tune (nothing else is accepted there). Returns the CPU state dict (keys
    `distance.*`, `border.*`) and the training history."""
    opts = options or FPN2WSOptions()
    imgs, labs = check_pairs(images, labels)
    lo, hi = opts.train.normalize_percentiles
    norm = [normalize_percentile(im, lo, hi) for im in imgs]
    targets = [fpn2ws_targets(lab, opts.border_sigma) for lab in labs]
    rng = seed_everything(opts.train.seed)
    init = opts.init
    what = "init_state" if parent_state is None else "parent_state"
    start = init_state if parent_state is None else parent_state
    whole = start is not None and any(k.startswith("distance.") for k in start)
    if parent_state is not None and (init_state is not None or not whole):
        raise ModelError(
            "parent_state must be an FPN2-WS pair (distance.*, border.*) and excludes init_state"
        )
    if start is None or not whole:
        model: nn.Module = build_model(norm[0].shape[0], opts)
        if start is not None:
            for net in (model.distance, model.border):
                transfer_weights(net, start, prefixes=("encoder.",), what="init_state")
            init = "encoder of init_state"
    else:
        model = _load(start, opts)
        init = "parent" if parent_state is not None else "resumed from init_state"
        want = first_conv_in_channels(model.state_dict(), prefix="distance.encoder.")
        if want != norm[0].shape[0]:
            raise ModelError(
                f"{what} expects {want} channel(s); the images have {norm[0].shape[0]}"
            )
    train_idx, val_idx = split_train_val(len(norm), opts.train.val_fraction, rng)
    crop = opts.train.crop_size
    sampler = CropSampler([norm[i] for i in train_idx], [targets[i] for i in train_idx], crop, rng)
    val = (
        CropSampler([norm[i] for i in val_idx], [targets[i] for i in val_idx], crop, rng)
        if val_idx
        else None
    )
    loss: LossFn = _loss
    history = fit(model, loss, sampler, opts.train, val_sampler=val)
    history |= {"in_channels": norm[0].shape[0], "n_images": len(norm), "init": init}
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, history


def predict_fpn2ws(
    model_or_state: nn.Module | StateDict,
    image: np.ndarray,
    *,
    options: FPN2WSOptions | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Predicted normalised distance and border maps (both in [0, 1]) of a whole field."""
    opts = options or FPN2WSOptions()
    model = _load(model_or_state, opts)
    lo, hi = opts.train.normalize_percentiles
    norm = normalize_percentile(image, lo, hi)
    want = first_conv_in_channels(model.state_dict(), prefix="distance.encoder.")
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


def segment_fpn2ws(
    model_or_state: nn.Module | StateDict,
    image: np.ndarray,
    *,
    options: FPN2WSOptions | None = None,
) -> np.ndarray:
    """uint32 nucleus labels (ids 1..N) of a field."""
    opts = options or FPN2WSOptions()
    dist, border = predict_fpn2ws(model_or_state, image, options=opts)
    mask = dist > opts.mask_threshold
    seeds, _ = ndi.label((dist > opts.seed_threshold) & (border < opts.border_threshold))
    labels = segmentation.watershed(border - dist, seeds, mask=mask)
    return finish_labels(labels, mask, opts.min_area)
