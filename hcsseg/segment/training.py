"""Shared pieces of the per-plate models: input checks, normalisation, crops, device, loop.

Every learned segmenter in `hcsseg.segment` trains on a handful of fields of one plate, so
the helpers here favour small-data habits: random crops with flips and 90° rotations, a fixed
step budget rather than epochs, optional early stopping on held-out crops, and seeding so two
runs on the same data give the same model.
"""

from __future__ import annotations

import contextlib
import math
import random
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential
from torch import nn

from hcsseg.errors import InputDataError, ModelError
from hcsseg.segment.scale import resize

StateDict = Mapping[str, torch.Tensor]
InitKind = Literal["random", "imagenet"]

HF_HOST = "huggingface.co"


# ---------------------------------------------------------------------------- reproducibility


def seed_everything(seed: int) -> np.random.Generator:
    """Seed python, numpy and torch; return a numpy generator for the caller's own draws."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def select_device(device: str = "auto") -> torch.device:
    """`auto` takes CUDA, then Apple MPS, then CPU; an explicit device must be usable."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ModelError(f"unknown torch device {device!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} requested but CUDA is not available here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"device {device!r} requested but Apple MPS is not available here")
    return dev


def autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on CUDA (no loss scaling needed); full precision elsewhere, where
    mixed precision gains nothing or is unsupported."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def reachable(host: str, port: int = 443, timeout: float = 2.0) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds.

    Checked before any weight download so that an offline machine fails in seconds with a
    clear message instead of waiting through a library's retry loop."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------- input checks


def as_channels_first(image: np.ndarray, *, name: str = "image") -> np.ndarray:
    """A finite, non-empty (C, Y, X) float32 copy of a (Y, X) or (C, Y, X) image."""
    arr = np.asarray(image)
    if arr.dtype.kind not in "biuf":
        raise InputDataError(f"{name} has dtype {arr.dtype}; expected real numbers")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise InputDataError(f"{name} must be (Y, X) or (C, Y, X), got shape {arr.shape}")
    if arr.size == 0 or min(arr.shape[1:]) < 2:
        raise InputDataError(f"{name} is empty or degenerate (shape {arr.shape})")
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise InputDataError(f"{name} contains NaN or infinite pixel values")
    return out


def normalize_percentile(
    image: np.ndarray, low: float = 1.0, high: float = 99.8, *, name: str = "image"
) -> np.ndarray:
    """Scale each channel so its `low`/`high` percentiles map to 0/1 (CSBDeep style).

    Per-field normalisation makes a model trained on some fields of a plate usable on the
    others despite exposure drift. A channel without contrast becomes zeros."""
    arr = as_channels_first(image, name=name)
    out = np.empty_like(arr)
    for c, chan in enumerate(arr):
        lo, hi = np.percentile(chan, (low, high))
        if hi <= lo:
            lo, hi = float(chan.min()), float(chan.max())
        out[c] = (chan - lo) / (hi - lo) if hi > lo else 0.0
    return out


def validate_labels(
    labels: np.ndarray, *, name: str = "labels", shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Ground-truth or pseudo-labels as uint32 (Y, X) with consecutive ids 1..N.

    Accepts a 2-D label image or a (N, Y, X) stack of masks/label images (one object or one
    annotator layer per plane), which must not overlap: an overlapping stack cannot be
    flattened into one instance image without deciding who owns the shared pixels. Floats
    are accepted only when every value is a whole number."""
    arr = np.asarray(labels)
    if arr.dtype.kind not in "biuf":
        raise InputDataError(f"{name} has dtype {arr.dtype}; expected integer labels")
    if arr.ndim not in (2, 3) or arr.size == 0:
        raise InputDataError(
            f"{name} must be a non-empty (Y, X) or (N, Y, X) array, got {arr.shape}"
        )
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise InputDataError(f"{name} contains NaN or infinite values")
        if not np.array_equal(arr, np.round(arr)):
            raise InputDataError(
                f"{name} has non-integer values (e.g. {arr[arr != np.round(arr)][0]!r}); "
                "instance labels must be whole numbers (was a probability map passed?)"
            )
    if arr.dtype.kind in "if" and arr.min() < 0:
        raise InputDataError(f"{name} contains negative values; ids must be >= 0")
    if arr.dtype.kind == "f" and arr.max() >= 2**32:
        raise InputDataError(f"{name} has ids beyond the uint32 range")
    arr = arr.astype(np.int64)
    if arr.ndim == 3:
        arr = _flatten_stack(arr, name)
    if shape is not None and arr.shape != tuple(shape):
        raise InputDataError(f"{name} has shape {arr.shape}; the image has shape {tuple(shape)}")
    out, _, _ = relabel_sequential(arr)
    return out.astype(np.uint32)


def _flatten_stack(stack: np.ndarray, name: str) -> np.ndarray:
    occupied = (stack > 0).sum(axis=0)
    shared = int(np.count_nonzero(occupied > 1))
    if shared:
        planes = np.unique(np.nonzero(stack[:, occupied > 1])[0])
        raise InputDataError(
            f"{name}: {shared} pixel(s) belong to objects in more than one plane of the stack "
            f"(planes {planes[:10].tolist()}); overlapping annotations cannot be flattened "
            "into one instance label image"
        )
    out = np.zeros(stack.shape[1:], dtype=np.int64)
    offset = 0
    for plane in stack:
        ids, inverse = np.unique(plane, return_inverse=True)
        new = np.arange(ids.size) + offset + (0 if ids[0] == 0 else 1)
        new[ids == 0] = 0
        out += new[inverse.reshape(plane.shape)]
        offset += int(np.count_nonzero(ids))
    return out


def check_pairs(
    images: Sequence[np.ndarray], labels: Sequence[np.ndarray]
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(C, Y, X) float32 images and uint32 labels of equal number and matching shapes."""
    if len(images) == 0:
        raise InputDataError("no training images given")
    if len(images) != len(labels):
        raise InputDataError(f"{len(images)} images but {len(labels)} label images")
    imgs = [as_channels_first(im, name=f"image {i}") for i, im in enumerate(images)]
    n_chan = {im.shape[0] for im in imgs}
    if len(n_chan) > 1:
        raise InputDataError(f"training images have different channel counts {sorted(n_chan)}")
    labs = [
        validate_labels(lab, name=f"labels {i}", shape=im.shape[1:])
        for i, (im, lab) in enumerate(zip(imgs, labels, strict=True))
    ]
    if not any(lab.any() for lab in labs):
        raise InputDataError("the training label images contain no objects")
    return imgs, labs


# ---------------------------------------------------------------------------- crops


class CropSampler:
    """Random square crops of (image, target) pairs with flips and 90° rotations.

    Images are drawn with probability proportional to their area, so every pixel of the
    training set is equally likely to be seen; images smaller than the crop are padded by
    reflection (image and targets alike). With `foreground` > 0 that share of the crops is
    instead centred on a pixel drawn in proportion to the target's intensity (the weighted
    crops of VisCy's virtual staining): on a sparse plate, uniform crops are mostly empty
    background and an L1 model learns to predict nothing. `zoom` > 1 reads a region between
    crop/zoom and crop·zoom wide (log-uniform) and resizes it to the crop, so a model sees
    objects of a range of sizes; `augment` changes the image part of each crop (contrast,
    gamma, noise, blur: see `intensity_augment`), never the targets."""

    GRID = 4  # foreground centres are drawn on a coarse grid to keep the weights small

    def __init__(
        self,
        images: Sequence[np.ndarray],
        targets: Sequence[np.ndarray],
        crop: int,
        rng: np.random.Generator,
        foreground: float = 0.0,
        *,
        zoom: float = 1.0,
        augment: Augment | None = None,
    ) -> None:
        self.crop = crop
        self.rng = rng
        self.foreground = foreground
        self.zoom = zoom
        self.augment = augment
        reach = math.ceil(crop * zoom)  # the largest region a zoomed-out crop reads
        self.images = [_pad_to(im, reach) for im in images]
        self.targets = [_pad_to(t, reach) for t in targets]
        areas = np.array([im.shape[1] * im.shape[2] for im in images], dtype=float)
        self.p = areas / areas.sum()
        self.cdf: list[np.ndarray] = []
        self.fg_p: np.ndarray | None = None
        if foreground > 0:
            g = self.GRID
            coarse = [t.sum(axis=0)[::g, ::g].astype(np.float64) for t in self.targets]
            # Above the image's median, so a large faint background does not outweigh nuclei.
            weights = [np.clip(c - np.median(c), 0, None) for c in coarse]
            totals = np.array([w.sum() for w in weights])
            self.cdf = [np.cumsum(w.ravel()) for w in weights]
            self.fg_p = totals / totals.sum() if totals.sum() > 0 else None

    def _corner(self, k: int, weighted: bool, size: int) -> tuple[int, int]:
        h, w = self.images[k].shape[1:]
        if not weighted:
            y0 = int(self.rng.integers(0, h - size + 1))
            x0 = int(self.rng.integers(0, w - size + 1))
            return y0, x0
        cdf = self.cdf[k]
        flat = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        grid_shape = (-(-h // self.GRID), -(-w // self.GRID))  # that of t[::GRID, ::GRID]
        gy, gx = np.unravel_index(min(flat, cdf.size - 1), grid_shape)
        cy = gy * self.GRID + int(self.rng.integers(self.GRID))
        cx = gx * self.GRID + int(self.rng.integers(self.GRID))
        y0 = int(np.clip(cy - size // 2, 0, h - size))
        x0 = int(np.clip(cx - size // 2, 0, w - size))
        return y0, x0

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        if self.fg_p is not None:
            weighted = self.rng.random(n) < self.foreground
            picks = [
                int(self.rng.choice(len(self.images), p=self.fg_p if w else self.p))
                for w in weighted
            ]
        else:
            weighted = np.zeros(n, bool)
            picks = self.rng.choice(len(self.images), size=n, p=self.p).tolist()
        for k, w in zip(picks, weighted, strict=True):
            im, t = self.images[k], self.targets[k]
            size = self.crop
            if self.zoom > 1:
                z = math.exp(self.rng.uniform(-math.log(self.zoom), math.log(self.zoom)))
                size = min(round(self.crop * z), *im.shape[1:])
            y0, x0 = self._corner(k, bool(w), size)
            sl = np.s_[:, y0 : y0 + size, x0 : x0 + size]
            a, b = im[sl], t[sl]
            if size != self.crop:
                a = resize(a, (self.crop, self.crop))
                b = resize(b, (self.crop, self.crop))
            if self.augment is not None:
                a = self.augment(a, self.rng)
            rot = int(self.rng.integers(4))
            flip = bool(self.rng.integers(2))
            a, b = np.rot90(a, rot, axes=(1, 2)), np.rot90(b, rot, axes=(1, 2))
            if flip:
                a, b = a[:, :, ::-1], b[:, :, ::-1]
            xs.append(np.ascontiguousarray(a))
            ys.append(np.ascontiguousarray(b))
        return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))

    def fixed(self, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`n` single-crop batches drawn once (validation crops stay the same across checks)."""
        return [self.sample(1) for _ in range(n)]


Augment = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def intensity_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random contrast, brightness, gamma, blur and noise of a normalised (C, Y, X) crop.

    A per-plate model sees a few fields of one microscope; these are the differences
    between fields and plates (exposure, focus, camera noise) that it must not mistake for
    objects. Each channel gets its own draw."""
    out = np.empty_like(image, dtype=np.float32)
    for c, chan in enumerate(image):
        x = chan * rng.uniform(0.7, 1.3) + rng.uniform(-0.1, 0.1)
        if rng.random() < 0.5:
            x = np.clip(x, 0, None) ** rng.uniform(0.7, 1.5)
        if rng.random() < 0.3:
            x = ndi.gaussian_filter(x, rng.uniform(0.3, 1.5))
        if rng.random() < 0.5:
            x = x + rng.normal(0, rng.uniform(0.005, 0.05), x.shape)
        out[c] = x
    return out


def _pad_to(arr: np.ndarray, size: int) -> np.ndarray:
    py, px = max(size - arr.shape[1], 0), max(size - arr.shape[2], 0)
    if not (py or px):
        return arr
    return np.pad(arr, ((0, 0), (py // 2, py - py // 2), (px // 2, px - px // 2)), "symmetric")


# ---------------------------------------------------------------------------- training loop


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
    amp: bool = Field(True, description="bfloat16 autocast on CUDA")

    @model_validator(mode="after")
    def _check(self) -> TrainOptions:
        if self.crop_size % 32:
            raise ValueError(f"crop_size must be a multiple of 32, got {self.crop_size}")
        lo, hi = self.normalize_percentiles
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"normalize_percentiles must satisfy 0 <= low < high <= 100: {lo, hi}")
        return self


LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def crop_sampler(
    images: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    options: TrainOptions,
    rng: np.random.Generator,
    *,
    train: bool = True,
    foreground: float = 0.0,
) -> CropSampler:
    """The sampler `options` ask for; validation crops (`train=False`) are not augmented."""
    return CropSampler(
        images,
        targets,
        options.crop_size,
        rng,
        foreground,
        zoom=options.zoom if train else 1.0,
        augment=intensity_augment if train and options.augment else None,
    )


def split_train_val(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    """Indices of training and held-out images; never holds out the only image."""
    n_val = min(round(n * val_fraction), n - 1)
    order = rng.permutation(n)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    sampler: CropSampler,
    options: TrainOptions,
    *,
    val_sampler: CropSampler | None = None,
) -> dict[str, Any]:
    """AdamW with warm-up and cosine decay; returns the history and leaves the best weights
    (lowest validation loss, or the last step without validation) in `model`."""
    device = select_device(options.device)
    model.to(device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=options.learning_rate, weight_decay=options.weight_decay
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(options))
    val_batches = val_sampler.fixed(options.val_crops) if val_sampler is not None else []
    history: dict[str, Any] = {"loss": [], "val_loss": [], "val_step": [], "device": str(device)}
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    stale = 0
    t0, cpu0 = time.perf_counter(), time.process_time()
    step = 0
    for step in range(1, options.n_steps + 1):
        model.train()
        x, y = sampler.sample(options.batch_size)
        x, y = x.to(device), y.to(device)
        with autocast(device, options.amp):
            out = model(x)
        loss = loss_fn(out.float(), y)
        if not torch.isfinite(loss):
            raise ModelError(f"training diverged: loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history["loss"].append(float(loss.item()))
        if step in options.snapshot_steps:
            history.setdefault("snapshots", {})[step] = {
                k: t.detach().cpu().clone() for k, t in model.state_dict().items()
            }
        if val_batches and (step % options.val_every == 0 or step == options.n_steps):
            v = evaluate_loss(model, loss_fn, val_batches, device, options.amp)
            history["val_loss"].append(v)
            history["val_step"].append(step)
            if best is None or v < best[0]:
                best = (v, {k: t.detach().clone() for k, t in model.state_dict().items()})
                stale = 0
            else:
                stale += 1
                if stale >= options.patience:
                    break
    if best is not None:
        model.load_state_dict(best[1])
        history["best_val_loss"] = best[0]
    history["steps"] = step
    history["seconds"] = time.perf_counter() - t0
    history["cpu_seconds"] = time.process_time() - cpu0
    model.eval()
    return history


def evaluate_loss(
    model: nn.Module,
    loss_fn: LossFn,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    amp: bool = True,
) -> float:
    model.eval()
    total = 0.0
    with torch.no_grad():
        for x, y in batches:
            with autocast(device, amp):
                out = model(x.to(device))
            total += float(loss_fn(out.float(), y.to(device)).item())
    return total / len(batches)


def _warmup_cosine(options: TrainOptions) -> Callable[[int], float]:
    warm = min(options.warmup_steps, max(options.n_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        span = max(options.n_steps - warm, 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(step - warm, span) / span))

    return factor


# ---------------------------------------------------------------------------- smp models


def build_smp_model(
    arch: Literal["unet", "fpn"],
    *,
    encoder_name: str,
    in_channels: int,
    classes: int,
    init: InitKind = "random",
    decoder_channels: Sequence[int] | None = None,
) -> nn.Module:
    """An smp U-Net/FPN; `init="imagenet"` loads cached ImageNet encoder weights.

    ImageNet weights are looked up in the Hugging Face cache first and downloaded only when
    huggingface.co answers within two seconds, so an offline machine gets a ModelError at
    once instead of smp's minute of retries."""
    import segmentation_models_pytorch as smp

    kwargs: dict[str, Any] = {
        "encoder_name": encoder_name,
        "encoder_weights": None,
        "in_channels": 3 if init == "imagenet" else in_channels,
        "classes": classes,
    }
    if arch == "unet" and decoder_channels is not None:
        kwargs["decoder_channels"] = tuple(decoder_channels)
    try:
        model = smp.Unet(**kwargs) if arch == "unet" else smp.FPN(**kwargs)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ModelError(
            f"cannot build {arch} with encoder {encoder_name!r}: {str(exc)[:160]}"
        ) from None
    if init == "imagenet":
        model.encoder.load_state_dict(_imagenet_encoder_state(encoder_name))
        model.encoder.set_in_channels(in_channels, pretrained=True)
    return model


def _imagenet_encoder_state(encoder_name: str) -> dict[str, torch.Tensor]:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    from safetensors.torch import load_file
    from segmentation_models_pytorch.encoders import encoders

    settings = encoders.get(encoder_name, {}).get("pretrained_settings", {}).get("imagenet")
    if settings is None:
        raise ModelError(f"smp has no ImageNet weights for encoder {encoder_name!r}")
    where = {"repo_id": settings["repo_id"], "revision": settings["revision"]}
    try:
        path = hf_hub_download(filename="model.safetensors", local_files_only=True, **where)
    except (LocalEntryNotFoundError, FileNotFoundError):
        if not reachable(HF_HOST):
            raise ModelError(
                f"ImageNet weights for encoder {encoder_name!r} are not in the Hugging Face "
                f"cache ({constants.HF_HUB_CACHE}) and {HF_HOST} cannot be reached; use "
                "init='random', initialise from a virtual-staining model, or copy the "
                f"{settings['repo_id']} snapshot into the cache"
            ) from None
        try:
            path = hf_hub_download(filename="model.safetensors", **where)
        except Exception as exc:  # any network/HTTP failure of the hub client
            raise ModelError(
                f"downloading ImageNet weights for {encoder_name!r} failed: {exc}"
            ) from None
    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # a truncated or foreign file
        raise ModelError(f"cached ImageNet weights {path} cannot be read: {exc}") from None


def first_conv_in_channels(state: StateDict, prefix: str = "encoder.") -> int:
    """Input channels of a saved smp model: those of the encoder's first convolution."""
    for key, value in state.items():
        if key.startswith(prefix) and key.endswith("weight") and value.ndim == 4:
            return int(value.shape[1])
    raise ModelError("state dict has no encoder convolution; it is not an smp model")


def transfer_weights(
    model: nn.Module, state: StateDict, *, prefixes: Sequence[str], what: str
) -> list[str]:
    """Copy the tensors under `prefixes` from `state` into `model`; all must match by name and
    shape (an encoder from another architecture or channel count is refused, not half-loaded).
    Returns the copied keys."""
    target = model.state_dict()
    keys = [k for k in target if k.startswith(tuple(prefixes))]
    missing = [k for k in keys if k not in state]
    if missing:
        raise ModelError(
            f"{what} lacks {len(missing)} of the {len(keys)} tensors under {list(prefixes)} "
            f"(e.g. {missing[0]!r}): it was trained with another encoder"
        )
    extra = [k for k in state if k.startswith(tuple(prefixes)) and k not in target]
    if extra:
        raise ModelError(
            f"{what} has {len(extra)} tensors this model lacks under {list(prefixes)} "
            f"(e.g. {extra[0]!r}): it was trained with another encoder"
        )
    bad = [(k, tuple(state[k].shape), tuple(target[k].shape)) for k in keys]
    bad = [b for b in bad if b[1] != b[2]]
    if bad:
        k, got, want = bad[0]
        raise ModelError(
            f"{what} does not fit this model: {k} has shape {got}, expected {want} "
            "(different input channels or encoder width)"
        )
    model.load_state_dict({k: state[k] for k in keys}, strict=False)
    return keys


def predict_dense(
    model: nn.Module,
    image: np.ndarray,
    *,
    device: torch.device,
    tile: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
    amp: bool = True,
    tta: bool = False,
) -> np.ndarray:
    """Raw network outputs (K, Y, X) for a normalised (C, Y, X) field, tiled and blended;
    with `tta` the mean over the four flips of each tile (for flip-equivariant targets)."""
    from hcsseg.segment.tiling import predict_tiled

    model.to(device).eval()
    flips: list[tuple[int, ...]] = [(), (-1,), (-2,), (-2, -1)] if tta else [()]

    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(device)
        total = None
        with torch.no_grad(), autocast(device, amp):
            for dims in flips:
                out = model(x.flip(dims) if dims else x).float()
                out = out.flip(dims) if dims else out
                total = out if total is None else total + out
        assert total is not None
        return (total / len(flips)).cpu().numpy()

    return predict_tiled(run, image, tile=tile, overlap=overlap, batch_size=batch_size)


def thin_curve(values: list[float], n: int = 200) -> list[float]:
    """At most ~n points of a loss curve for the model card and the UI."""
    step = max(1, len(values) // n)
    return [float(v) for v in values[::step]]
