"""A folder of trained models, each with its weights and a model card.

    <store>/<model_id>/weights.safetensors
    <store>/<model_id>/model_card.json     kind, channels, normalisation, architecture,
                                           training/validation fields, metrics, provenance

A model is written under a temporary name and renamed into place, so a crash never leaves
half a model that a later run would pick up. Weights are safetensors: loading them runs no
code, unlike pickled checkpoints.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hcsseg.errors import ModelError

if TYPE_CHECKING:  # torch is imported when weights are saved or loaded, not for cards
    import torch

WEIGHTS = "weights.safetensors"
CARD = "model_card.json"

log = logging.getLogger(__name__)


def default_store(plate_url: str, model_store: str | None = None) -> Path:
    """`model_store` when given, else ``<plate>_models`` beside the plate."""
    if model_store:
        return Path(model_store)
    path = Path(plate_url.rstrip("/"))
    return path.with_name(f"{path.stem}_models")


def _json_default(value: Any) -> Any:
    """numpy scalars/arrays (metrics, percentiles) as JSON numbers, not their repr strings."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return str(value)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _code_version() -> str:
    try:
        return version("hcsseg")
    except PackageNotFoundError:
        return "0+unknown"


def save_model(
    store: str | Path, kind: str, state_dict: dict[str, torch.Tensor], card: dict[str, Any]
) -> str:
    """Store weights + card; returns the new model id (``<kind>-<utc time>-<hash>``)."""
    import torch
    from safetensors.torch import save

    root = Path(store)
    root.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].numpy().tobytes())
    now = dt.datetime.now(dt.UTC)
    model_id = f"{kind}-{now:%Y%m%dT%H%M%S}-{digest.hexdigest()[:8]}"
    full_card = {
        "model_id": model_id,
        "kind": kind,
        "created": now.isoformat(),
        "code_version": _code_version(),
        "torch_version": torch.__version__,
        **card,
    }
    tmp = root / f".tmp-{model_id}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir()
    try:
        # Synced before the rename, so the folder that appears is whole even after a power cut.
        _write_synced(tmp / WEIGHTS, save(tensors))
        _write_synced(tmp / CARD, json.dumps(full_card, indent=2, default=_json_default).encode())
        final = root / model_id
        if final.exists():  # same weights saved twice in one second: keep the first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_id


def model_dir(store: str | Path, model: str) -> Path:
    """A model id in `store`, or a path to a model folder."""
    path = Path(model)
    if not (path / CARD).exists():
        path = Path(store) / model
    if not (path / CARD).exists():
        cards, damaged = scan_store(store)
        known = ", ".join(c["model_id"] for c in cards) or "none"
        bad = f"; damaged cards: {', '.join(str(p) for p, _ in damaged)}" if damaged else ""
        raise ModelError(f"no model {model!r} in model store {store} (models: {known}{bad})")
    return path


def load_card(store: str | Path, model: str) -> dict[str, Any]:
    path = model_dir(store, model) / CARD
    try:
        card = json.loads(path.read_text())
    except ValueError as exc:
        raise ModelError(f"model card {path} is not valid JSON: {exc}") from exc
    if not isinstance(card, dict):
        raise ModelError(f"model card {path} is not a JSON object")
    return card


def load_model(store: str | Path, model: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and card of a stored model; a damaged weights file is a clear ModelError."""
    folder = model_dir(store, model)
    card = load_card(store, model)
    try:
        from safetensors.torch import load_file

        state = load_file(str(folder / WEIGHTS), device="cpu")
    except Exception as exc:  # safetensors raises several types for a damaged file
        raise ModelError(f"weights file {folder / WEIGHTS} cannot be loaded: {exc}") from exc
    return state, card


def scan_store(store: str | Path) -> tuple[list[dict[str, Any]], list[tuple[Path, str]]]:
    """Cards of the complete models in `store`, oldest first, and (card file, why) for each
    damaged card: a listing must show those, since their models are missing from it."""
    cards: list[dict[str, Any]] = []
    damaged: list[tuple[Path, str]] = []
    root = Path(store)
    if not root.is_dir():
        return cards, damaged
    for folder in sorted(root.iterdir()):
        path = folder / CARD
        if folder.name.startswith(".") or not path.exists():
            continue
        try:
            card = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            damaged.append((path, f"not valid JSON: {exc}"))
            continue
        if not isinstance(card, dict):
            damaged.append((path, "not a JSON object"))
        elif not isinstance(card.get("model_id"), str):
            damaged.append((path, "has no model_id"))
        else:
            cards.append(card)
    return sorted(cards, key=lambda c: c.get("created", "")), damaged


def _damaged_error(store: str | Path, damaged: list[tuple[Path, str]]) -> ModelError:
    path, why = damaged[0]
    more = f" (and {len(damaged) - 1} more damaged card(s))" if len(damaged) > 1 else ""
    return ModelError(
        f"model card {path} is {why}{more}; no model is chosen from {store} while the "
        f"damaged one may be it: repair the card or move {path.parent} out of the store"
    )


def list_models(
    store: str | Path, kind: str | None = None, *, strict: bool = False
) -> list[dict[str, Any]]:
    """Cards of all complete models, oldest first.

    A damaged card is skipped with a warning naming its file (see `scan_store`); with
    `strict` it is a ModelError instead: whoever picks a model from the listing would
    otherwise silently get an older one in place of the damaged, possibly newest, model."""
    cards, damaged = scan_store(store)
    if damaged and strict:
        raise _damaged_error(store, damaged)
    for path, why in damaged:
        log.warning("model card %s is %s, skipped", path, why)
    return [c for c in cards if kind is None or c.get("kind") == kind]


def latest_model(store: str | Path, kind: str, *, plate: str | None = None) -> str | None:
    """Newest model of `kind` (for `plate`); a damaged card in the store is a ModelError."""
    cards = [
        c for c in list_models(store, kind, strict=True) if plate is None or c.get("plate") == plate
    ]
    return cards[-1]["model_id"] if cards else None


def find_model(store: str | Path, *, request_id: str) -> str | None:
    """The latest model whose card carries `request_id`: how a caller that handed training to
    another process (a GPU deployment) finds the model it asked for. A damaged card in the
    store is a ModelError (it may be that model)."""
    cards = [c for c in list_models(store, strict=True) if c.get("request_id") == request_id]
    return cards[-1]["model_id"] if cards else None


def parent_id(card: dict[str, Any]) -> str | None:
    """The model a stored model was fine-tuned from: `parent_model` of a segmentation model,
    `fine_tuned_from` of a virtual-staining model; None when trained from scratch."""
    return card.get("parent_model") or card.get("fine_tuned_from")


def lineage(store: str | Path, model_id: str) -> list[str]:
    """The model, its parent, the parent's parent, ... A parent no longer in the store ends
    the chain (its id is still listed); an unknown `model_id` is a ModelError."""
    chain: list[str] = []
    current: str | None = model_id
    while current is not None:
        try:
            card = load_card(store, current)
        except ModelError:
            if not chain:
                raise
            chain.append(current)
            break
        current_id = card.get("model_id", current)
        if current_id in chain:
            raise ModelError(f"model cards in {store} name each other as parents: {chain}")
        chain.append(current_id)
        current = parent_id(card)
    return chain


def check_card_channels(card: dict[str, Any], available: list[str], *, where: str) -> None:
    """A model only applies where its source channels exist under the same names."""
    needed = list(card.get("source_channels", []))
    missing = [c for c in needed if c not in available]
    if missing:
        raise ModelError(
            f"model {card.get('model_id')} was trained on channels {needed}, but {where} "
            f"lacks {missing}; available channels: {available}"
        )
