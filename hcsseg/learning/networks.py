"""segmentation-models-pytorch networks: building them, ImageNet encoder weights when
online, copying weights between related networks, and tiled dense prediction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from hcsseg.errors import ModelError
from hcsseg.learning.devices import HF_HOST, autocast, reachable, to_device

StateDict = Mapping[str, torch.Tensor]


InitKind = Literal["random", "imagenet"]


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

    # channels-last with bfloat16: a 512² tile 4x faster on a 2-core CPU than float32
    model.to(device, memory_format=torch.channels_last).eval()
    flips: list[tuple[int, ...]] = [(), (-1,), (-2,), (-2, -1)] if tta else [()]

    def run(batch: np.ndarray) -> np.ndarray:
        x = to_device(torch.from_numpy(batch), device)
        total = None
        with torch.no_grad(), autocast(device, amp):
            for dims in flips:
                out = model(x.flip(dims) if dims else x).float()
                out = out.flip(dims) if dims else out
                total = out if total is None else total + out
        assert total is not None
        return (total / len(flips)).cpu().numpy()

    out = predict_tiled(run, image, tile=tile, overlap=overlap, batch_size=batch_size)
    model.to(memory_format=torch.contiguous_format)
    return out
