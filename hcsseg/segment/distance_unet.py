"""Distance-map + foreground U-Net for cells or nuclei (Bonte et al. 2024).

An smp U-Net predicts two maps: each object's Euclidean distance transform divided by its
maximum (1 at the object's centre, falling to about 1/radius at its edge, so small and large
objects weigh alike) and the foreground. Instances are recovered by a seeded watershed on
the predicted distance: seeds are its h-maxima, flooding stays inside the predicted
foreground.

The network can start from random weights, from cached ImageNet weights, from a plate's
virtual-staining U-Net with the same encoder (in-silico-labelling pretraining: a model that
learnt to predict the nucleus stain from the other channels has already learnt where nuclei
are, so few annotated fields suffice), or from a whole distance U-Net trained on an earlier
plate (fine-tuning: the new plate needs only a fraction of the steps).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage as ndi
from scipy.special import expit
from skimage import filters, segmentation
from torch import nn

from hcsseg.errors import InputDataError, ModelError
from hcsseg.learning.data import check_pairs, normalize_percentile, split_train_val
from hcsseg.learning.devices import seed_everything, select_device
from hcsseg.learning.loop import LossFn, clear_lead, crop_sampler, fit
from hcsseg.learning.networks import (
    InitKind,
    StateDict,
    build_smp_model,
    first_conv_in_channels,
    predict_dense,
    transfer_weights,
)
from hcsseg.learning.options import TrainOptions
from hcsseg.segment.classical import drop_small_objects
from hcsseg.segment.distance import distance_to_background
from hcsseg.segment.parts import h_maxima_by_component, watershed_by_component
from hcsseg.segment.scale import (
    estimate_diameter,
    median_diameter,
    resize,
    resize_labels,
    resize_labels_on_foreground,
    scale_factor,
    scaled_shape,
)


def recipe() -> TrainOptions:
    """The training recipe measured in bench/results/accuracy.md: small crops of fields
    brought to the canonical object size, scale (±25 %) and intensity augmentation, 15 % of
    the fields held out for early stopping and for tuning the post-processing. 4,000 steps:
    on held-out training fields 4,800 steps gained +0.046 AP@0.5 over 2,400 on dense cells
    and nothing clear on nuclei, and 4,000 fit 20 min on a 2-core CPU with native bfloat16
    (0.25 s a step); about twice that on CPUs without it, a few minutes on a GPU."""
    return TrainOptions(
        n_steps=4000,
        batch_size=8,
        crop_size=128,
        learning_rate=2e-3,
        zoom=1.25,
        augment=True,
        val_fraction=0.15,
        val_every=400,
        patience=5,
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
    foreground_threshold: float = Field(
        0.4,
        gt=0,
        lt=1,
        description="foreground probability above which a pixel belongs to an object; below "
        "0.5 because the annotated masks run wider than the network's confident core",
    )
    min_area: int | None = Field(
        None,
        ge=0,
        description="smaller objects are dropped, pixels at the working scale; None: a fifth "
        "of a canonical object's area (95 px at 24 px), or 8 px at each field's own scale",
    )
    canonical_diameter: float | None = Field(
        24.0,
        gt=0,
        description="objects are resized to this median diameter (px) before the network, in "
        "training (from the labels) and inference (estimated); None keeps each field's scale",
    )
    scale_channel: int | None = Field(
        0,
        ge=0,
        description="input channel whose bright objects give the inference scale estimate "
        "(a nucleus stain); None: use prior_factor (cells from a membrane stain)",
    )
    prior_factor: float | None = Field(
        None,
        gt=0,
        description="resize factor of the training fields (set by training): used when a "
        "field's object size cannot be estimated",
    )
    refine_scale: bool = Field(
        True,
        description="measure the objects found at the first scale and predict again when "
        "their size is off the canonical diameter by more than 25 %",
    )
    tta: bool = Field(
        True,
        description="average predictions over the four flips (4x the inference time; +0.01 "
        "AP@0.5 on dense cells in bench/results/accuracy.md)",
    )
    tune_postprocessing: bool = Field(
        True,
        description="pick h, foreground_threshold and min_area on the held-out training "
        "fields (when train.val_fraction is above 0), never on the fields to be segmented",
    )
    tile: int = Field(512, ge=64, description="inference tile, multiple of 32")
    overlap: int = Field(64, ge=0)
    train: TrainOptions = Field(default_factory=lambda: recipe())


# ---------------------------------------------------------------------------- targets


def normalized_distance(labels: np.ndarray) -> np.ndarray:
    """Per-object distance to the object's edge divided by its maximum, in (0, 1].

    Pixels on an object's outer ring (touching background or another object) get 1 before
    normalisation, so touching objects are separated by a valley."""
    fg = labels > 0
    if not fg.any():
        return np.zeros(labels.shape, dtype=np.float32)
    edge = segmentation.find_boundaries(labels, mode="inner")
    dist = distance_to_background(fg & ~edge) + fg
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
        fg = target[:, 1]
        # a third target channel weighs pixels (0: left out, e.g. a doubtful pseudo-label)
        keep = target[:, 2] if target.shape[1] > 2 else torch.ones_like(fg)
        total = keep.sum().clamp_min(1.0)
        mse = (keep * (torch.sigmoid(out[:, 0]) - target[:, 0]) ** 2).sum() / total
        bce = F.binary_cross_entropy_with_logits(out[:, 1], fg, weight=keep, reduction="sum")
        return mse + alpha * bce / total

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
    parent_state: StateDict | None = None,
    weights: Sequence[np.ndarray] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train on (image, labels) pairs: ground truth or pseudo-labels of a plate's fields.

    `images`: (Y, X) or (C, Y, X); `labels`: matching 2-D instance labels (or non-overlapping
    (N, Y, X) stacks). `init_state`: a virtual-staining U-Net state dict whose encoder (and
    decoder, see `isl_transfer`) is copied before training; a different encoder or channel
    count raises ModelError. `parent_state`: a whole distance U-Net (another plate's model)
    to fine-tune; it must fit `options`' encoder and decoder and the images' channel count.
    `weights`: per-field (Y, X) loss weights, 0 where the labels are not to be trusted
    (`hcsseg.segment.pseudo_labels.confident_objects`). Returns CPU state dict and history
    (losses per step, validation losses, seconds, what was transferred)."""
    opts = options or DistanceUNetOptions()
    imgs, labs = check_pairs(images, labels)
    # before any field is resized or transformed: bad input fails in milliseconds
    if weights is not None:
        if len(weights) != len(labs):
            raise InputDataError(f"{len(labs)} label images but {len(weights)} weight maps")
        for i, (w, lab) in enumerate(zip(weights, labs, strict=True)):
            if np.shape(w) != lab.shape:
                raise InputDataError(
                    f"weight map {i} has shape {np.shape(w)}, its labels {lab.shape}"
                )
    lo, hi = opts.train.normalize_percentiles
    norm = [normalize_percentile(im, lo, hi) for im in imgs]
    factors = [scale_factor(median_diameter(lab), opts.canonical_diameter) for lab in labs]
    scaled = [
        resize(im, scaled_shape(im.shape, f)) if f != 1 else im
        for im, f in zip(norm, factors, strict=True)
    ]
    targets = [
        distance_targets(resize_labels(lab, scaled_shape(lab.shape, f)))
        for lab, f in zip(labs, factors, strict=True)
    ]
    if weights is not None:
        targets = [
            np.concatenate([t, resize(np.asarray(w, np.float32)[None], t.shape[1:])])
            for t, w in zip(targets, weights, strict=True)
        ]
    rng = seed_everything(opts.train.seed)
    if parent_state is not None:
        if init_state is not None:
            raise ModelError("give init_state (virtual-staining init) or parent_state, not both")
        want = first_conv_in_channels(parent_state)
        if want != norm[0].shape[0]:
            raise ModelError(
                f"parent_state expects {want} channel(s); the images have {norm[0].shape[0]}"
            )
        model = _load(parent_state, opts)
        history_extra: dict[str, Any] = {"init": "parent", "transferred_tensors": len(parent_state)}
    else:
        model = build_model(norm[0].shape[0], opts)
        history_extra = {"init": opts.init, "transferred_tensors": 0}
    if init_state is not None:
        prefixes = ("encoder.",) if opts.isl_transfer == "encoder" else ("encoder.", "decoder.")
        keys = transfer_weights(model, init_state, prefixes=prefixes, what="init_state")
        history_extra |= {"init": f"virtual-staining ({opts.isl_transfer})"}
        history_extra["transferred_tensors"] = len(keys)
    train_idx, val_idx = split_train_val(len(norm), opts.train.val_fraction, rng)
    sampler = crop_sampler(
        [scaled[i] for i in train_idx], [targets[i] for i in train_idx], opts.train, rng
    )
    val = (
        crop_sampler(
            [scaled[i] for i in val_idx],
            [targets[i] for i in val_idx],
            opts.train,
            rng,
            train=False,
        )
        if val_idx
        else None
    )
    history = fit(model, _loss(opts), sampler, opts.train, val_sampler=val)
    tuned: dict[str, Any] = {}
    if opts.canonical_diameter is not None:
        tuned["prior_factor"] = float(np.median([factors[i] for i in train_idx]))
    if val_idx and opts.tune_postprocessing:
        final = opts.model_copy(update=tuned)
        maps = [predict_distance_unet(model, imgs[i], options=final) for i in val_idx]
        picked = tune_postprocessing(maps, [labs[i] for i in val_idx], final)
        history["validation_score"] = picked.pop("validation_score")
        tuned |= picked
    history |= history_extra | {
        "in_channels": norm[0].shape[0],
        "n_images": len(norm),
        "scale_factors": [round(f, 3) for f in factors],
        "validation_images": val_idx,
        "tuned_options": tuned,
    }
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}, history


H_GRID = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
THRESHOLD_GRID = (0.3, 0.4, 0.5, 0.6)
MIN_AREA_GRID = (8, 24, 48, 96, 144)
# Objects below this share of a canonical object's area are dropped by default: on held-out
# DSB training fields 96 px at 24 px (a fifth of the disc) beat every smaller minimum.
MIN_AREA_SHARE = 0.21
# How many standard errors a tuned setting must lead the defaults by. On held-out DSB
# training fields (six models: two seeds, three checkpoints) one standard error let the
# tuning move four times, losing 0.012-0.043 AP@0.5 each time; two never moved and lost
# nothing (bench/results/accuracy.md).
LEAD_SE = 2.0
# Held-out fields below this count are scored in blocks, so the lead has a spread to beat.
MIN_TUNING_UNITS = 8
# Smaller looks at a field's scale stop below this side (px): too few objects to measure.
MIN_LOOK_SIDE = 64


def min_area_px(options: DistanceUNetOptions) -> int:
    """The minimum object area in working-scale pixels that `options` ask for."""
    if options.min_area is not None:
        return options.min_area
    if options.canonical_diameter is None:
        return 8
    return round(MIN_AREA_SHARE * np.pi / 4 * options.canonical_diameter**2)


def tune_postprocessing(
    maps: Sequence[FieldMaps], truths: Sequence[np.ndarray], options: DistanceUNetOptions
) -> dict[str, Any]:
    """h, foreground threshold and minimum area for the held-out fields: first h × threshold,
    then the minimum area (working-scale pixels), each scored by (AP@0.5 + mean AP) / 2.

    A setting replaces the options' own (h, threshold, `min_area_px`) only when its
    mean lead over them exceeds `LEAD_SE` standard errors of the per-field differences:
    on 10-15 held-out fields the best of 24 grid points leads by about two standard errors
    by chance alone. Fewer than `MIN_TUNING_UNITS` fields are scored in blocks (a single
    held-out field of dense cells in 3 × 3), so that a lead is tested against a spread
    there too instead of the plain best of one field being taken. The network's maps are
    computed once; only the watershed is repeated per setting."""
    from hcsseg.evaluate.metrics import instance_metrics

    side = int(np.ceil(np.sqrt(MIN_TUNING_UNITS / len(maps))))
    cuts = [blocks(truth.shape, side) for truth in truths]  # the same for every setting

    def scores(**kw: Any) -> np.ndarray:
        out = []
        for m, truth, field_blocks in zip(maps, truths, cuts, strict=True):
            labels = labels_from_maps(m, options, **kw)
            for block in field_blocks:
                res = instance_metrics(labels[block], truth[block])
                out.append((float(res.ap[0]) + res.mean_ap) / 2)
        return np.nan_to_num(np.asarray(out))

    area = min_area_px(options)
    ref = (options.h, options.foreground_threshold)
    grid = {(h, t): scores(h=h, threshold=t, min_area=area) for h in H_GRID for t in THRESHOLD_GRID}
    if ref not in grid:
        grid[ref] = scores(h=ref[0], threshold=ref[1], min_area=area)
    h, thr = clear_winner(grid, ref)
    areas = {a: scores(h=h, threshold=thr, min_area=a) for a in {*MIN_AREA_GRID, area}}
    area = clear_winner(areas, area)
    return {
        "h": h,
        "foreground_threshold": thr,
        "min_area": area,
        "validation_score": round(float(areas[area].mean()), 4),
    }


def blocks(shape: tuple[int, ...], side: int) -> list[tuple[slice, slice]]:
    """A field cut into side × side blocks (the whole field for side 1)."""
    ys = np.linspace(0, shape[0], side + 1).astype(int)
    xs = np.linspace(0, shape[1], side + 1).astype(int)
    return [
        (slice(y0, y1), slice(x0, x1))
        for y0, y1 in itertools.pairwise(ys)
        for x0, x1 in itertools.pairwise(xs)
    ]


def clear_winner(candidates: dict[Any, np.ndarray], reference: Any, lead: float = LEAD_SE) -> Any:
    """The candidate with the best mean per-field score when it leads `reference` by more
    than `lead` standard errors of the per-field differences, else `reference`."""
    best = max(candidates, key=lambda k: float(candidates[k].mean()))
    return best if clear_lead(candidates[best] - candidates[reference], lead) else reference


@dataclass
class FieldMaps:
    """Network outputs of one field at the working scale (objects at the canonical diameter)
    and the field's own shape, to which labels are resized back."""

    dist: np.ndarray
    fg: np.ndarray
    shape: tuple[int, int]


def predict_distance_unet(
    model_or_state: nn.Module | StateDict,
    image: np.ndarray,
    *,
    options: DistanceUNetOptions | None = None,
) -> FieldMaps:
    """Predicted normalised distance and foreground probability of a whole field.

    With a canonical diameter the field is resized so its objects have that diameter (the
    estimate from `scale_channel`, else the training fields' factor). With `refine_scale`
    the objects the network finds are measured: separate objects (a `scale_channel`) that
    measure more than 25 % below the canonical size are also looked at with half and a
    quarter of the factor, and the look whose objects are nearest the canonical size kept;
    then, when their median diameter is still off by more than 25 %, the field is predicted
    again at the measured scale (a first estimate fooled by texture or clumps), for
    separate objects only if that lands nearer."""
    opts = options or DistanceUNetOptions()
    model = _load(model_or_state, opts)
    lo, hi = opts.train.normalize_percentiles
    norm = normalize_percentile(image, lo, hi)
    want = first_conv_in_channels(model.state_dict())
    if norm.shape[0] != want:
        raise InputDataError(f"the model expects {want} channel(s); the image has {norm.shape[0]}")
    shape = (int(norm.shape[1]), int(norm.shape[2]))
    factor = field_factor(norm, opts)

    def look_at(f: float) -> FieldMaps:
        return FieldMaps(*_predict_at(model, norm, f, opts), shape)

    def nearer(d: float | None, than: float | None) -> bool:
        return d is not None and (than is None or _off(d, opts) < _off(than, opts))

    maps = look_at(factor)
    if opts.canonical_diameter is None or not opts.refine_scale:
        return maps
    diameter = _working_diameter(maps, opts)
    separate = opts.scale_channel is not None
    tolerance = np.log(1.25)
    small = diameter is None or np.log(opts.canonical_diameter / diameter) > tolerance
    if separate and small:
        # Objects the network sees larger than it learnt come out in fragments, and fragments
        # measure small: following that measurement enlarges the field further and shatters
        # it (bench/results/accuracy.md: two DSB test fields, 2,825 objects for 18 nuclei).
        # So objects that measure small are also looked at with half and a quarter of the
        # factor (5/16 of the first look's cost), and the look whose objects come out
        # nearest the canonical size is kept.
        for f in (factor / 2, factor / 4):
            if min(scaled_shape(norm.shape, f)) < MIN_LOOK_SIDE:
                break
            look = look_at(f)
            d = _working_diameter(look, opts)
            if nearer(d, diameter):
                maps, factor, diameter = look, f, d
    if diameter is not None and _off(diameter, opts) > tolerance:
        # at most 2x either way: a field the first estimate got that wrong is noise
        # or texture the second look cannot be trusted on either
        better = float(
            np.clip(
                scale_factor(diameter / factor, opts.canonical_diameter), factor / 2, factor * 2
            )
        )
        look = look_at(better)
        # for separate objects kept only when it lands nearer the canonical size (fragments
        # again would not)
        if not separate or nearer(_working_diameter(look, opts), diameter):
            maps = look
    return maps


def _off(diameter: float, opts: DistanceUNetOptions) -> float:
    """How far (log ratio) a working-scale diameter is from the canonical one."""
    return abs(float(np.log((opts.canonical_diameter or diameter) / diameter)))


def _working_diameter(maps: FieldMaps, opts: DistanceUNetOptions) -> float | None:
    """Object diameter at the working scale, read off the network's own output.

    Separate objects (nuclei): the foreground map is a clean, texture-free image of them,
    and its size estimate does not depend on how the watershed splits them (a model run at
    too large a scale over-splits, and split pieces would call for an even larger one).
    Carpets of touching cells have no separate foreground blobs: there the instances
    found at this scale are measured."""
    if opts.scale_channel is not None:
        return estimate_diameter(maps.fg)
    return median_diameter(_instances(maps.dist, maps.fg, opts, opts.h, opts.foreground_threshold))


def field_factor(norm: np.ndarray, options: DistanceUNetOptions) -> float:
    """Resize factor of one normalised (C, Y, X) field: its estimated object diameter to the
    canonical one, else the training fields' factor, else 1."""
    if options.canonical_diameter is None:
        return 1.0
    diameter = None
    if options.scale_channel is not None and options.scale_channel < norm.shape[0]:
        diameter = estimate_diameter(norm[options.scale_channel])
    if diameter is None:
        return options.prior_factor or 1.0
    return scale_factor(diameter, options.canonical_diameter)


def _predict_at(
    model: nn.Module, norm: np.ndarray, factor: float, opts: DistanceUNetOptions
) -> tuple[np.ndarray, np.ndarray]:
    scaled = resize(norm, scaled_shape(norm.shape, factor)) if factor != 1 else norm
    out = predict_dense(
        model,
        scaled,
        device=select_device(opts.train.device),
        tile=opts.tile,
        overlap=opts.overlap,
        amp=opts.train.amp,
        tta=opts.tta,
    )
    prob = expit(out)
    return prob[0], prob[1]


def _instances(
    dist: np.ndarray,
    fg: np.ndarray,
    opts: DistanceUNetOptions,
    h: float,
    threshold: float,
    min_area: int | None = None,
) -> np.ndarray:
    return instances_from_distance(
        dist,
        fg > threshold,
        h=h,
        sigma=opts.distance_sigma,
        min_area=min_area_px(opts) if min_area is None else min_area,
    )


def labels_from_maps(
    maps: FieldMaps,
    options: DistanceUNetOptions,
    *,
    h: float | None = None,
    threshold: float | None = None,
    min_area: int | None = None,
) -> np.ndarray:
    """Instances at the working scale (h, threshold, min_area in its units), brought back to
    the field's shape with their edges on the background drawn at its own pixels."""
    thr = options.foreground_threshold if threshold is None else threshold
    lab = _instances(maps.dist, maps.fg, options, options.h if h is None else h, thr, min_area)
    return resize_labels_on_foreground(lab, maps.fg, thr, maps.shape).astype(np.uint32)


def segment_distance_unet(
    model_or_state: nn.Module | StateDict,
    image: np.ndarray,
    *,
    options: DistanceUNetOptions | None = None,
) -> np.ndarray:
    """uint32 instance labels (ids 1..N) of a field."""
    opts = options or DistanceUNetOptions()
    return labels_from_maps(predict_distance_unet(model_or_state, image, options=opts), opts)


def instances_from_distance(
    dist: np.ndarray, mask: np.ndarray, *, h: float, sigma: float, min_area: int
) -> np.ndarray:
    """Watershed of -distance from its h-maxima, inside `mask`; uint32 ids 1..N.

    Both run on each connected part of `mask` alone (`hcsseg.segment.parts`): what the
    network predicts outside the foreground never merges or suppresses a seed inside it,
    and a 4356² working field (a 2160² plate field enlarged 2x) is done in a fraction of
    the time of one whole-image h-maxima and watershed."""
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.uint32)
    smooth = filters.gaussian(dist, sigma=sigma) if sigma > 0 else dist
    inside = np.where(mask, np.maximum(smooth, np.finfo(np.float32).tiny), 0.0)
    seeds, _ = ndi.label(h_maxima_by_component(inside, h) & mask)
    labels = watershed_by_component(-smooth, seeds, mask)
    return finish_labels(labels, mask, min_area)


def finish_labels(labels: np.ndarray, mask: np.ndarray, min_area: int) -> np.ndarray:
    """Give seedless mask components their own ids, drop small objects, relabel 1..N."""
    orphans, n = ndi.label(mask & (labels == 0))
    out = np.where(orphans > 0, orphans + int(labels.max()), labels) if n else labels
    relabelled, _, _ = segmentation.relabel_sequential(drop_small_objects(out, min_area))
    return relabelled.astype(np.uint32)
