"""Training data of the per-plate models: input checks, normalisation, label validation,
and random crops with flips, 90° rotations and intensity augmentation (small-data habits).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential

from hcsseg.errors import InputDataError
from hcsseg.segment.scale import resize

if TYPE_CHECKING:
    import torch

    from hcsseg.io.plate import FieldRef, Plate


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


def read_truth_labels(
    plate: Plate, ref: FieldRef, name: str, *, shape: tuple[int, int] | None = None
) -> np.ndarray:
    """Ground truth stored in a plate (evaluation, quality gate, training targets) as
    validated uint32 (Y, X) labels: exactly one integer plane, of the field's shape."""
    arr = plate.read_labels(ref, name)
    label = f"plate {plate.name} field {ref.path} ground-truth labels {name!r}"
    return validate_labels(arr, name=label, shape=shape or plate.field_shape(ref))


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
        import torch  # here, so label checks and plate code do not load torch

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


def split_train_val(n: int, val_fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    """Indices of training and held-out images; never holds out the only image."""
    n_val = min(round(n * val_fraction), n - 1)
    order = rng.permutation(n)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())
