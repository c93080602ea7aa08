"""Optional Cellpose 3 backend: run a built-in or user model, fine-tune on a plate's fields.

Cellpose is imported only when used. Built-in weights live in `~/.cellpose/models` (or
`$CELLPOSE_LOCAL_MODELS_PATH`) and Cellpose downloads missing ones on first use; on an
offline machine that download would stall or fail deep inside Cellpose, so missing weights
are detected first and reported as a ModelError within seconds. Cellpose also silently
falls back to `cyto3` for a model name it does not know; here an unknown name is an error.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hcsseg.errors import InputDataError, ModelError
from hcsseg.learning.data import as_channels_first, validate_labels
from hcsseg.learning.devices import reachable, select_device

CELLPOSE_HOST = "www.cellpose.org"


def _cellpose_models() -> Any:
    try:
        from cellpose import models
    except ImportError as exc:
        raise ModelError(f"the Cellpose backend needs the cellpose package: {exc}") from None
    return models


def builtin_weights_path(name: str) -> Path:
    """Where Cellpose keeps (or would download) the weights of a built-in model."""
    models = _cellpose_models()
    basename = f"{name}torch_0" if name in ("cyto", "cyto2", "nuclei") else name
    return Path(models.MODEL_DIR) / basename


def _load_model(model: str | Path | None, device: str, timeout: float) -> Any:
    """A CellposeModel from a weights file, a built-in name, or None (random weights)."""
    models = _cellpose_models()
    dev = select_device(device)
    if model is None:
        return models.CellposeModel(pretrained_model=False, device=dev)
    path = Path(model).expanduser()
    if path.is_file():
        try:
            return models.CellposeModel(pretrained_model=str(path), device=dev)
        except Exception as exc:  # torch.load/unpickling/shape errors all mean "not usable"
            raise ModelError(
                f"Cellpose weights {path} cannot be loaded ({type(exc).__name__}: "
                f"{str(exc)[:200]}); is it a Cellpose 3 model file?"
            ) from None
    name = str(model)
    if name not in models.MODEL_NAMES:
        raise ModelError(
            f"Cellpose model {name!r} is neither a weights file nor a built-in model "
            f"({', '.join(models.MODEL_NAMES[:12])}, ...)"
        )
    weights = builtin_weights_path(name)
    if not weights.is_file() and not reachable(CELLPOSE_HOST, timeout=timeout):
        raise ModelError(
            f"weights of the built-in Cellpose model {name!r} are not at {weights} and "
            f"{CELLPOSE_HOST} cannot be reached to download them (offline?); copy the file "
            "there, set CELLPOSE_LOCAL_MODELS_PATH, or pass the path of a weights file"
        )
    try:
        return models.CellposeModel(model_type=name, device=dev)
    except Exception as exc:  # failed download or unreadable cached file
        raise ModelError(
            f"cannot load built-in Cellpose model {name!r} ({weights}): "
            f"{type(exc).__name__}: {str(exc)[:200]}"
        ) from None


def run_cellpose(
    image: np.ndarray,
    *,
    model: str | Path = "cyto",
    diameter: float | None = None,
    channels: Sequence[int] = (0, 0),
    flow_threshold: float = 0.4,
    cellprob_threshold: float = 0.0,
    min_size: int = 15,
    bsize: int = 224,
    batch_size: int = 8,
    device: str = "auto",
    download_timeout: float = 3.0,
) -> np.ndarray:
    """uint32 labels of one field from a built-in Cellpose model or a weights file.

    `image`: (Y, X) or (C, Y, X); `channels` follows Cellpose ([cyto, nucleus], 1-based,
    0 = grey). `diameter` in pixels; None uses the model's own (30 px for cyto, the training
    mean for a fine-tuned model)."""
    arr = as_channels_first(image)
    if diameter is not None and not diameter > 0:
        raise InputDataError(f"diameter must be positive pixels or None, got {diameter}")
    net = _load_model(model, device, download_timeout)
    x = arr[0] if arr.shape[0] == 1 else arr
    try:
        masks, _, _ = net.eval(
            x,
            channels=list(channels),
            channel_axis=None if arr.shape[0] == 1 else 0,
            diameter=diameter,
            flow_threshold=flow_threshold,
            cellprob_threshold=cellprob_threshold,
            min_size=min_size,
            bsize=bsize,
            batch_size=batch_size,
        )
    except (ValueError, IndexError) as exc:  # bad channel spec for this image
        raise InputDataError(f"Cellpose cannot run on this image: {exc}") from None
    return np.asarray(masks).astype(np.uint32)


@contextlib.contextmanager
def _rotation(enabled: bool) -> Iterator[None]:
    """Turn Cellpose's random rotation augmentation off for the duration of a training run
    (Han et al. 2024 found rotation hurts densely packed cells); train_seg has no switch."""
    if enabled:
        yield
        return
    from cellpose import transforms

    original = transforms.random_rotate_and_resize
    transforms.random_rotate_and_resize = functools.partial(original, rotate=False)
    try:
        yield
    finally:
        transforms.random_rotate_and_resize = original


def finetune_cellpose(
    images: Sequence[np.ndarray],
    labels: Sequence[np.ndarray],
    *,
    save_path: str | Path,
    base_model: str | Path | None = "cyto",
    n_epochs: int = 100,
    learning_rate: float = 0.005,
    weight_decay: float = 1e-5,
    batch_size: int = 8,
    bsize: int = 224,
    rotate: bool = False,
    channels: Sequence[int] = (0, 0),
    min_train_masks: int = 5,
    nimg_per_epoch: int | None = None,
    model_name: str | None = None,
    device: str = "auto",
    download_timeout: float = 3.0,
) -> tuple[Path, np.ndarray]:
    """Fine-tune `base_model` (built-in name, weights file, or None for random weights) with
    `cellpose.train.train_seg`; returns the saved weights file and the per-epoch losses.

    Han et al. 2024 (dense T cells) train on 448 px patches (`bsize=448`) without rotation.
    `nimg_per_epoch` (default: the number of images) sets how many crops one epoch draws.
    Weights go to `save_path/models/<model_name>`."""
    if len(images) == 0 or len(images) != len(labels):
        raise InputDataError(f"need matching images and labels, got {len(images)}/{len(labels)}")
    arrs = [as_channels_first(im, name=f"image {i}") for i, im in enumerate(images)]
    labs = [
        validate_labels(lab, name=f"labels {i}", shape=im.shape[1:])
        for i, (im, lab) in enumerate(zip(arrs, labels, strict=True))
    ]
    if max(int(lab.max()) for lab in labs) < min_train_masks:
        raise InputDataError(
            f"no training image has at least min_train_masks={min_train_masks} objects"
        )
    net = _load_model(base_model, device, download_timeout)
    from cellpose import train

    multi = arrs[0].shape[0] > 1
    save = Path(save_path)
    save.mkdir(parents=True, exist_ok=True)
    with _rotation(rotate):
        path, losses, _ = train.train_seg(
            net.net,
            train_data=[a if multi else a[0] for a in arrs],
            train_labels=[lab.astype(np.int32) for lab in labs],
            channels=list(channels),
            channel_axis=0 if multi else None,
            save_path=str(save),
            n_epochs=n_epochs,
            learning_rate=learning_rate,
            weight_decay=weight_decay,
            batch_size=batch_size,
            bsize=bsize,
            min_train_masks=min_train_masks,
            nimg_per_epoch=nimg_per_epoch,
            model_name=model_name,
        )
    return Path(path), np.asarray(losses)
