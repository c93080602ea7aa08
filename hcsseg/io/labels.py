"""Write label images into a field (``labels/<name>``) as NGFF image-labels.

A label image is built under a temporary name and renamed into place, so a crash never
leaves a ``labels/nuclei`` that looks complete but is not; re-running replaces it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from hcsseg.errors import InputDataError
from hcsseg.io.plate import FieldRef, Plate, ome_attrs
from hcsseg.io.plate_writer import (
    LABEL_AXES,
    create_array,
    downsample_nearest,
    multiscales,
    set_ome,
)

LABEL_DTYPE = np.uint32
TMP_PREFIX = ".tmp-"


def _field_dir(plate: Plate, ref: FieldRef) -> Path:
    return Path(plate.url) / ref.path


def write_labels(
    plate: Plate,
    ref: FieldRef,
    name: str,
    labels: np.ndarray,
    *,
    properties: dict[str, Any] | None = None,
) -> None:
    """Store `labels` (Y, X) as ``labels/<name>`` with the image's pyramid depth."""
    shape = plate.field_shape(ref)
    if labels.shape != shape:
        raise InputDataError(
            f"plate {plate.name} field {ref.path}: labels {name!r} have shape {labels.shape}, "
            f"the field is {shape}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputDataError(f"labels {name!r} must be integers, got {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise InputDataError(f"labels {name!r} contain negative ids")
    image = plate.image_group(ref)
    labels_group = image.require_group("labels")
    n_levels = len(plate.level_paths(ref))
    pixel_size = plate.pixel_size_um(ref)

    tmp_name = f"{TMP_PREFIX}{name}-{uuid.uuid4().hex[:8]}"
    tmp = labels_group.create_group(tmp_name)
    label_meta: dict[str, Any] = {"source": {"image": "../../"}}
    if plate.version == "0.4":
        label_meta["version"] = "0.4"
    if properties:
        label_meta["hcsseg"] = properties  # provenance only; per-object data lives in tables
    level_data = labels.astype(LABEL_DTYPE, copy=False)
    for level in range(n_levels):
        if level:
            level_data = downsample_nearest(level_data)
        arr = create_array(
            tmp,
            str(level),
            shape=level_data.shape,
            dtype=LABEL_DTYPE,
            dims=["y", "x"],
            version=plate.version,
        )
        arr[...] = level_data
    set_ome(
        tmp,
        plate.version,
        multiscales=multiscales(name, LABEL_AXES, n_levels, pixel_size, plate.version),
        **{"image-label": label_meta},
    )

    # Swap into place: rename the old one away, the new one in, then delete the old.
    base = _field_dir(plate, ref) / "labels"
    final, staged = base / name, base / tmp_name
    old = base / f"{TMP_PREFIX}old-{name}-{uuid.uuid4().hex[:8]}"
    if final.exists():
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)

    names = [str(n) for n in ome_attrs(labels_group).get("labels", [])]
    if name not in names:
        set_ome(labels_group, plate.version, labels=[*names, name])


def remove_stale_temporaries(plate: Plate, ref: FieldRef) -> None:
    """Drop half-written label groups a crashed run left behind."""
    base = _field_dir(plate, ref) / "labels"
    if base.is_dir():
        for child in base.iterdir():
            if child.name.startswith(TMP_PREFIX):
                shutil.rmtree(child, ignore_errors=True)


def label_group(plate: Plate, ref: FieldRef, name: str) -> zarr.Group:
    node = plate.image_group(ref)[f"labels/{name}"]
    assert isinstance(node, zarr.Group)
    return node
