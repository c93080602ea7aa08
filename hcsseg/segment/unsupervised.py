"""Annotation-free cell segmentation from nucleus markers (Yu lab, Sci Rep 2021; cellcutter).

A small U-Net looks at a square patch centred on each nucleus marker (image channels plus a
Gaussian "this is the cell I mean" channel) and outputs a soft mask y_i of that marker's
cell. No annotation is needed: the loss rewards large masks, penalises two masks claiming
the same pixel, and penalises mask pixels outside the image foreground M,

    L = -Σ_i Σ_p y_i  -  λ Σ_{i≠j} Σ_p y_i log(1 - y_j)  +  β Σ_i Σ_p y_i (1 - M),

so cells grow until they meet their neighbours or the background, and the network learns
from the image where such borders lie. As in cellcutter, a short supervised warm-up on
markers grown by a few pixels comes first; started from random weights, the overlap and
background penalties otherwise drive every mask to zero before any cell takes shape.

The pairwise term is evaluated in field coordinates: all markers of one training area share
a canvas where S = Σ_j log(1 - y_j) is accumulated, and Σ_{j≠i} log(1 - y_j) = S - log(1 -
y_i) is read back per patch (linear in the number of markers). Fields are assembled by a
per-pixel argmax over the patches; pixels where the best mask is below the threshold are
background.

Cell ids are marker row + 1, so a cell keeps the id of the nucleus that seeded it; a
marker whose mask is empty leaves a gap in the ids.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage as ndi
from skimage import filters, measure, segmentation
from torch import nn

from hcsseg.errors import InputDataError, ModelError
from hcsseg.learning.data import as_channels_first, normalize_percentile
from hcsseg.learning.devices import autocast, seed_everything, select_device
from hcsseg.learning.networks import StateDict
from hcsseg.segment.classical import drop_small_objects

MarkersLike = np.ndarray | pd.DataFrame | Sequence[Sequence[float]]


class UnsupervisedOptions(BaseModel):
    """Model, loss and training parameters; lengths in pixels of the field."""

    model_config = ConfigDict(extra="forbid")

    patch_size: int = Field(64, ge=16, description="patch side, a multiple of 2**depth")
    position_sigma: float = Field(15.0, gt=0, description="sigma of the position channel")
    overlap_weight: float = Field(3.32, ge=0, description="λ, penalty on masks overlapping")
    background_weight: float = Field(15.0, ge=0, description="β, penalty on mask outside M")
    base_channels: int = Field(16, ge=4, description="U-Net width at full resolution")
    depth: int = Field(3, ge=1, le=5, description="U-Net poolings")
    area_size: int = Field(192, ge=32, description="side of the training areas")
    areas_per_step: int = Field(1, ge=1)
    max_markers_per_area: int = Field(160, ge=1, description="random subset beyond this")
    warmup_steps: int = Field(
        100,
        ge=0,
        description="supervised steps on markers grown by warmup_radius (cellcutter's fake "
        "labels) before the annotation-free loss: training then starts from compact masks "
        "around each marker instead of collapsing to empty masks",
    )
    warmup_radius: float = Field(5.0, gt=0, description="growth of the fake labels, pixels")
    n_steps: int = Field(600, ge=1, description="steps with the annotation-free loss")
    learning_rate: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    flip_augment: bool = Field(True, description="random patch flips, undone on the output")
    test_time_flips: bool = Field(True, description="average the 4 flips at inference")
    threshold: float = Field(0.5, gt=0, lt=1, description="below: background")
    keep_largest_component: bool = Field(True, description="drop detached fragments of a cell")
    min_area: int = Field(
        0,
        ge=0,
        description="cells smaller than this (pixels) are dropped: slivers squeezed "
        "between neighbours are rarely cells",
    )
    batch_size: int = Field(256, ge=1, description="patches per forward pass at inference")
    normalize_percentiles: tuple[float, float] = (1.0, 99.8)
    seed: int = 0
    device: str = "auto"
    amp: bool = True

    @model_validator(mode="after")
    def _check(self) -> UnsupervisedOptions:
        if self.patch_size % (2**self.depth):
            raise ValueError(
                f"patch_size {self.patch_size} must be a multiple of 2**depth = {2**self.depth}"
            )
        return self


# ---------------------------------------------------------------------------- network


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class PatchUNet(nn.Module):
    """Plain U-Net mapping a (C + 1)-channel patch to one logit map."""

    def __init__(self, in_channels: int, base: int = 16, depth: int = 3) -> None:
        super().__init__()
        widths = [base * 2**d for d in range(depth + 1)]
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(_block(cin, w))
            cin = w
        self.up = nn.ModuleList()
        self.fuse = nn.ModuleList()
        for w_hi, w_lo in zip(widths[-1:0:-1], widths[-2::-1], strict=True):
            self.up.append(nn.ConvTranspose2d(w_hi, w_lo, 2, stride=2))
            self.fuse.append(_block(2 * w_lo, w_lo))
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for up, fuse, skip in zip(self.up, self.fuse, skips[-2::-1], strict=True):
            x = fuse(torch.cat([up(x), skip], dim=1))
        return self.head(x)


def build_network(in_channels: int, options: UnsupervisedOptions) -> PatchUNet:
    """Network for images with `in_channels` channels (the position channel is added)."""
    return PatchUNet(in_channels + 1, options.base_channels, options.depth)


def _load(model_or_state: nn.Module | StateDict, options: UnsupervisedOptions) -> nn.Module:
    if isinstance(model_or_state, nn.Module):
        return model_or_state
    first = model_or_state.get("down.0.0.weight")
    if first is None or first.ndim != 4:
        raise ModelError("state dict is not an annotation-free patch U-Net (no down.0.0.weight)")
    net = build_network(int(first.shape[1]) - 1, options)
    try:
        net.load_state_dict(model_or_state)
    except RuntimeError as exc:
        raise ModelError(
            f"state dict does not fit a patch U-Net with base_channels="
            f"{options.base_channels}, depth={options.depth}: {exc}"
        ) from None
    return net


# ---------------------------------------------------------------------------- inputs


def as_markers(
    markers: MarkersLike, shape: tuple[int, int], *, name: str = "markers"
) -> np.ndarray:
    """Integer (N, 2) row/column marker positions inside an image of `shape`.

    Accepts an (N, 2) array of (y, x) or a DataFrame with `y` and `x` columns (what
    `hcsseg.markers` returns); positions are rounded to the nearest pixel."""
    if isinstance(markers, pd.DataFrame):
        missing = {"y", "x"} - set(markers.columns)
        if missing:
            raise InputDataError(f"{name} table lacks column(s) {sorted(missing)}")
        arr = markers[["y", "x"]].to_numpy(dtype=float)
    else:
        arr = np.asarray(markers, dtype=float)
        if arr.size == 0:
            arr = arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise InputDataError(f"{name} must be (N, 2) rows of (y, x), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise InputDataError(f"{name} contain NaN or infinite coordinates")
    pos = np.rint(arr).astype(np.int64)
    outside = (pos < 0).any(axis=1) | (pos[:, 0] >= shape[0]) | (pos[:, 1] >= shape[1])
    if outside.any():
        raise InputDataError(
            f"{int(outside.sum())} of {len(pos)} {name} lie outside the image of shape {shape} "
            f"(first: {arr[outside][0].tolist()})"
        )
    return pos


def foreground_mask(
    image: np.ndarray,
    *,
    sigma: float = 1.0,
    correction: float = 1.0,
    percentiles: tuple[float, float] = (1.0, 99.8),
) -> np.ndarray:
    """M for the loss: Otsu (times `correction`, as in CellProfiler) on the smoothed mean of
    the normalised channels, holes filled.

    Filling holes keeps the dim interior of a cell whose surface stain draws only its rim."""
    norm = normalize_percentile(image, *percentiles).mean(axis=0)
    smooth = filters.gaussian(norm, sigma=sigma) if sigma > 0 else norm
    if smooth.max() <= smooth.min():
        return np.zeros(smooth.shape, dtype=bool)
    return ndi.binary_fill_holes(smooth > correction * filters.threshold_otsu(smooth))


def _position_channel(options: UnsupervisedOptions) -> np.ndarray:
    p = options.patch_size
    r = np.arange(p, dtype=np.float32) - p // 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * options.position_sigma**2))
    return g.astype(np.float32)


def _patch_index(pos: np.ndarray, p: int) -> tuple[np.ndarray, np.ndarray]:
    """Row/column index arrays (N, p, 1), (N, 1, p) of patches centred at `pos` in an image
    padded by p // 2 on every side (the marker lands on patch pixel (p//2, p//2))."""
    r = np.arange(p)
    return (pos[:, 0, None, None] + r[None, :, None]), (pos[:, 1, None, None] + r[None, None, :])


def _patches(padded: np.ndarray, pos: np.ndarray, gauss: np.ndarray) -> np.ndarray:
    rows, cols = _patch_index(pos, gauss.shape[0])
    img = padded[:, rows, cols]  # (C, N, p, p)
    g = np.broadcast_to(gauss, (1, len(pos), *gauss.shape))
    return np.ascontiguousarray(np.concatenate([img, g], axis=0).transpose(1, 0, 2, 3))


# ---------------------------------------------------------------------------- loss


def unsupervised_loss(
    logits: torch.Tensor,
    canvas_index: torch.Tensor,
    canvas_size: int,
    mask: torch.Tensor,
    options: UnsupervisedOptions,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss of one batch of patches, averaged over patch pixels.

    `canvas_index` (N, p, p) gives each patch pixel's position in a flat canvas of
    `canvas_size` pixels shared by patches of the same area (areas occupy disjoint ranges);
    `mask` (N, p, p) is M read at the patch pixels."""
    y = torch.sigmoid(logits)
    log1m = -F.softplus(logits)  # log(1 - y), finite even where y rounds to 1
    s = torch.zeros(canvas_size, dtype=log1m.dtype, device=log1m.device)
    s = s.index_add(0, canvas_index.reshape(-1), log1m.reshape(-1))
    others = s[canvas_index] - log1m  # Σ_{j≠i} log(1 - y_j) at each pixel of patch i
    n = y.numel()
    area = -y.sum() / n
    overlap = -(y * others).sum() / n
    background = (y * (1 - mask)).sum() / n
    loss = area + options.overlap_weight * overlap + options.background_weight * background
    parts = {
        k: float(v.detach())
        for k, v in [("area", area), ("overlap", overlap), ("background", background)]
    }
    return loss, parts


# ---------------------------------------------------------------------------- training


class _Field:
    """One training field: padded normalised image, mask and warm-up labels (marker i grown
    into label i + 1), and the marker positions."""

    def __init__(
        self, image: np.ndarray, pos: np.ndarray, mask: np.ndarray, pad: int, radius: float
    ) -> None:
        self.shape = image.shape[1:]
        self.pos = pos
        self.image = np.pad(image, ((0, 0), (pad, pad), (pad, pad)))
        points = np.zeros(self.shape, dtype=np.int64)
        points[pos[:, 0], pos[:, 1]] = np.arange(1, len(pos) + 1)
        seeds = segmentation.expand_labels(points, radius)
        self.seeds = np.pad(seeds, pad)
        # a marker is a nucleus, inside its cell by definition: its disk is always foreground
        self.mask = np.pad((mask | (seeds > 0)).astype(np.float32), pad)


def _prepare_fields(
    images: Sequence[np.ndarray],
    markers: Sequence[MarkersLike],
    masks: Sequence[np.ndarray] | None,
    options: UnsupervisedOptions,
) -> list[_Field]:
    if len(images) == 0:
        raise InputDataError("no training images given")
    if len(markers) != len(images) or (masks is not None and len(masks) != len(images)):
        raise InputDataError(
            f"{len(images)} images, {len(markers)} marker sets"
            + (f", {len(masks)} masks" if masks is not None else "")
            + "; one of each per field is needed"
        )
    fields = []
    for i, image in enumerate(images):
        norm = normalize_percentile(image, *options.normalize_percentiles, name=f"image {i}")
        pos = as_markers(markers[i], norm.shape[1:], name=f"markers of image {i}")
        if masks is None:
            m = foreground_mask(image, percentiles=options.normalize_percentiles)
        else:
            m = np.asarray(masks[i])
            if m.shape != norm.shape[1:]:
                raise InputDataError(
                    f"mask {i} has shape {m.shape}; image {i} has shape {norm.shape[1:]}"
                )
            m = m > 0
        if len(pos):
            fields.append(_Field(norm, pos, m, options.patch_size // 2, options.warmup_radius))
    if not fields:
        raise InputDataError(
            "none of the training images has nucleus markers; the annotation-free model "
            "learns cells around markers and cannot train without any"
        )
    channels = {f.image.shape[0] for f in fields}
    if len(channels) > 1:
        raise InputDataError(f"training images have different channel counts {sorted(channels)}")
    return fields


def _sample_area(
    fields: list[_Field], options: UnsupervisedOptions, rng: np.random.Generator
) -> tuple[_Field, np.ndarray, int, int]:
    """A random square area holding a random marker (every marker equally likely), the
    indices of its markers (a random subset beyond `max_markers_per_area`) and its origin."""
    counts = np.array([len(f.pos) for f in fields], dtype=float)
    f = fields[rng.choice(len(fields), p=counts / counts.sum())]
    my, mx = f.pos[rng.integers(len(f.pos))]
    ah, aw = min(options.area_size, f.shape[0]), min(options.area_size, f.shape[1])
    y0 = int(rng.integers(max(my - ah + 1, 0), min(my, f.shape[0] - ah) + 1))
    x0 = int(rng.integers(max(mx - aw + 1, 0), min(mx, f.shape[1] - aw) + 1))
    inside = (
        (f.pos[:, 0] >= y0)
        & (f.pos[:, 0] < y0 + ah)
        & (f.pos[:, 1] >= x0)
        & (f.pos[:, 1] < x0 + aw)
    )
    sel = np.flatnonzero(inside)
    if len(sel) > options.max_markers_per_area:
        sel = rng.choice(sel, options.max_markers_per_area, replace=False)
    return f, sel, y0, x0


def _flip(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Flip each patch: bit 0 of `code` flips columns, bit 1 rows (an involution)."""
    out = x.clone()
    cols = (code & 1).bool()
    rows = (code & 2).bool()
    out[cols] = out[cols].flip(-1)
    out[rows] = out[rows].flip(-2)
    return out


def train_unsupervised(
    images: Sequence[np.ndarray],
    markers: Sequence[MarkersLike],
    masks: Sequence[np.ndarray] | None = None,
    *,
    options: UnsupervisedOptions | None = None,
    init_state: StateDict | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train on fields with their markers (and foreground masks, else Otsu masks).

    `images`: (Y, X) or (C, Y, X) arrays; `markers`: per field an (N, 2) array of (y, x) or a
    DataFrame with y/x columns; fields without markers are skipped, none at all is an
    InputDataError. Returns the state dict (CPU tensors) and a history with the warm-up
    losses, then the loss and its three terms per step."""
    opts = options or UnsupervisedOptions()
    fields = _prepare_fields(images, markers, masks, opts)
    rng = seed_everything(opts.seed)
    device = select_device(opts.device)
    if init_state is None:
        net = build_network(fields[0].image.shape[0], opts)
    else:
        net = _load(init_state, opts)
        if net.down[0][0].in_channels != fields[0].image.shape[0] + 1:
            raise ModelError(
                f"init_state expects {net.down[0][0].in_channels - 1} image channel(s); the "
                f"training images have {fields[0].image.shape[0]}"
            )
    net.to(device)
    optim = torch.optim.AdamW(
        net.parameters(), lr=opts.learning_rate, weight_decay=opts.weight_decay
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, opts.n_steps, opts.learning_rate / 20)
    gauss = _position_channel(opts)
    p = opts.patch_size
    canvas_side = opts.area_size + p
    hist: dict[str, Any] = {
        "warmup_loss": [],
        "loss": [],
        "area": [],
        "overlap": [],
        "background": [],
    }
    t0, cpu0 = time.perf_counter(), time.process_time()
    for step in range(opts.warmup_steps + opts.n_steps):
        warm = step < opts.warmup_steps
        xs, idx, ms = [], [], []
        for a in range(opts.areas_per_step):
            f, sel, y0, x0 = _sample_area(fields, opts, rng)
            pos = f.pos[sel]
            rows, cols = _patch_index(pos, p)
            xs.append(_patches(f.image, pos, gauss))
            if warm:
                ms.append((f.seeds[rows, cols] == (sel + 1)[:, None, None]).astype(np.float32))
            else:
                ms.append(f.mask[rows, cols])
            # canvas coordinates: patch pixel (r, c) of marker m sits at m - origin + (r, c)
            idx.append((rows - y0) * canvas_side + (cols - x0) + a * canvas_side**2)
        x = torch.from_numpy(np.concatenate(xs)).to(device)
        target = torch.from_numpy(np.concatenate(ms)).to(device)
        net.train()
        code = torch.from_numpy(rng.integers(0, 4, len(x))).to(device)
        if not opts.flip_augment:
            code.zero_()
        with autocast(device, opts.amp):
            logits = net(_flip(x, code))
        logits = _flip(logits.float()[:, 0], code)
        if warm:
            loss = F.binary_cross_entropy_with_logits(logits, target)
        else:
            index = torch.from_numpy(np.concatenate(idx)).to(device)
            loss, parts = unsupervised_loss(
                logits, index, opts.areas_per_step * canvas_side**2, target, opts
            )
        if not torch.isfinite(loss):
            raise ModelError(f"annotation-free training diverged (loss {loss.item()})")
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        if warm:
            hist["warmup_loss"].append(float(loss.item()))
            continue
        sched.step()
        hist["loss"].append(float(loss.item()))
        for k, v in parts.items():
            hist[k].append(v)
    hist["steps"] = opts.warmup_steps + opts.n_steps
    hist["seconds"] = time.perf_counter() - t0
    hist["cpu_seconds"] = time.process_time() - cpu0
    hist["device"] = str(device)
    hist["n_markers"] = int(sum(len(f.pos) for f in fields))
    net.eval()
    return {k: v.detach().cpu() for k, v in net.state_dict().items()}, hist


# ---------------------------------------------------------------------------- inference


def predict_patches(
    model_or_state: nn.Module | StateDict,
    image: np.ndarray,
    markers: MarkersLike,
    *,
    options: UnsupervisedOptions | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-marker probability patches (N, p, p) and the integer marker positions (N, 2)."""
    opts = options or UnsupervisedOptions()
    norm = normalize_percentile(image, *opts.normalize_percentiles)
    pos = as_markers(markers, norm.shape[1:])
    net = _load(model_or_state, opts)
    if net.down[0][0].in_channels != norm.shape[0] + 1:
        raise InputDataError(
            f"the model expects {net.down[0][0].in_channels - 1} image channel(s); the image "
            f"has {norm.shape[0]}"
        )
    device = select_device(opts.device)
    net.to(device).eval()
    p = opts.patch_size
    padded = np.pad(norm, ((0, 0), (p // 2, p // 2), (p // 2, p // 2)))
    gauss = _position_channel(opts)
    codes = range(4) if opts.test_time_flips else range(1)
    out = np.zeros((len(pos), p, p), dtype=np.float32)
    for start in range(0, len(pos), opts.batch_size):
        sl = slice(start, min(start + opts.batch_size, len(pos)))
        x = torch.from_numpy(_patches(padded, pos[sl], gauss)).to(device)
        prob = torch.zeros(len(x), p, p, device=device)
        with torch.no_grad():
            for c in codes:
                code = torch.full((len(x),), c, device=device, dtype=torch.int64)
                with autocast(device, opts.amp):
                    logits = net(_flip(x, code))
                prob += torch.sigmoid(_flip(logits.float()[:, 0], code))
        out[sl] = (prob / len(codes)).cpu().numpy()
    return out, pos


def segment_unsupervised(
    model_or_state: nn.Module | StateDict,
    image: np.ndarray,
    markers: MarkersLike,
    *,
    options: UnsupervisedOptions | None = None,
    allow_empty: bool = False,
) -> np.ndarray:
    """Cell labels (uint32) of a field: cell i + 1 grows from marker i.

    A field without markers raises InputDataError, or gives all-zero labels with
    `allow_empty=True` (the per-field loop of a plate, where empty wells are normal)."""
    opts = options or UnsupervisedOptions()
    arr = as_channels_first(image)
    h, w = arr.shape[1:]
    pos = as_markers(markers, (h, w))
    if len(pos) == 0:
        if allow_empty:
            return np.zeros((h, w), dtype=np.uint32)
        raise InputDataError(
            "no nucleus markers in this field; the annotation-free model grows cells from "
            "markers (pass allow_empty=True to get empty labels instead)"
        )
    probs, pos = predict_patches(model_or_state, arr, pos, options=opts)
    p = opts.patch_size
    best = np.zeros((h + p, w + p), dtype=np.float32)
    ids = np.zeros((h + p, w + p), dtype=np.uint32)
    for i, ((y, x), prob) in enumerate(zip(pos, probs, strict=True)):
        b, d = best[y : y + p, x : x + p], ids[y : y + p, x : x + p]
        win = prob > b
        b[win] = prob[win]
        d[win] = i + 1
    half = p // 2
    labels = np.where(best >= opts.threshold, ids, 0)[half : half + h, half : half + w]
    if opts.keep_largest_component:
        labels = _largest_components(labels)
    return drop_small_objects(labels, opts.min_area).astype(np.uint32)


def _largest_components(labels: np.ndarray) -> np.ndarray:
    """Keep, per id, only its largest 4-connected piece (ids unchanged)."""
    pieces = measure.label(labels, background=0, connectivity=1)
    n = int(pieces.max())
    if n == 0:
        return labels
    owner = np.zeros(n + 1, dtype=np.int64)
    owner[pieces.ravel()] = labels.ravel()
    size = np.bincount(pieces.ravel(), minlength=n + 1)
    order = np.lexsort((size[1:], owner[1:])) + 1  # by owner, then size
    largest = order[np.r_[owner[order][1:] != owner[order][:-1], True]]
    keep = np.zeros(n + 1, dtype=bool)
    keep[largest] = True
    return np.where(keep[pieces], labels, 0)
