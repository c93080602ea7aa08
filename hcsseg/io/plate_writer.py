"""Create OME-Zarr HCS plates (NGFF 0.5 on zarr v3 by default, 0.4 on zarr v2).

Follows the write order the NGFF concurrency notes ask for: all group and array
metadata is created in one process first (``create_plate``), pixel writes then touch
one field's chunks at a time (``write_field_image``), so per-well workers never share a
chunk.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from hcsseg.errors import HcssegError, InputDataError, PlateFormatError
from hcsseg.io.plate import BACKUP, STAGED, FieldRef, NgffVersion, Plate, ome_attrs, open_plate
from hcsseg.io.plate_lock import plate_write_lock

log = logging.getLogger(__name__)

DEFAULT_COLORS = ["0000FF", "00FF00", "FF0000", "FF00FF", "00FFFF", "FFFF00", "FFFFFF"]
CHUNK = 1024

# Physical plate formats (96, 384, 1536 wells); the smallest that holds every well is used.
PLATE_FORMATS = [(8, 12), (16, 24), (32, 48)]


@dataclass(frozen=True)
class ChannelSpec:
    """A channel as written to ``omero.channels``."""

    label: str
    color: str | None = None
    window: tuple[float, float] | None = None  # display start/end


def row_name(index: int) -> str:
    """0 -> A, 25 -> Z, 26 -> AA (1536-well plates have 32 rows)."""
    name = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        name = chr(65 + rem) + name
    return name


def row_index(name: str) -> int:
    value = 0
    for ch in name.upper():
        value = value * 26 + (ord(ch) - 64)
    return value - 1


def plate_layout(wells: Sequence[tuple[str, int]]) -> tuple[list[str], list[str]]:
    """All row and column names of the smallest standard plate holding `wells`."""
    max_row = max((row_index(r) for r, _ in wells), default=0)
    max_col = max((c for _, c in wells), default=1)
    for n_rows, n_cols in PLATE_FORMATS:
        if max_row < n_rows and max_col <= n_cols:
            break
    else:
        n_rows, n_cols = max_row + 1, max_col
    return [row_name(i) for i in range(n_rows)], [f"{c:02d}" for c in range(1, n_cols + 1)]


def pyramid_levels(shape_yx: tuple[int, int], *, min_size: int = 256, max_levels: int = 5) -> int:
    """Halve until the smaller side would drop below `min_size` (at least one level)."""
    smallest = min(shape_yx)
    if smallest <= min_size:
        return 1
    return max(1, min(max_levels, 1 + math.floor(math.log2(smallest / min_size))))


def level_shape(shape_yx: tuple[int, int], level: int) -> tuple[int, int]:
    y, x = shape_yx
    for _ in range(level):
        y, x = (y + 1) // 2, (x + 1) // 2
    return y, x


def downsample_mean(image: np.ndarray) -> np.ndarray:
    """2× mean pooling over the last two axes (images: interpolation is fine)."""
    y, x = image.shape[-2:]
    pad = [(0, 0)] * (image.ndim - 2) + [(0, y % 2), (0, x % 2)]
    padded = np.pad(image.astype(np.float32), pad, mode="edge")
    pooled = (
        padded[..., 0::2, 0::2]
        + padded[..., 1::2, 0::2]
        + padded[..., 0::2, 1::2]
        + padded[..., 1::2, 1::2]
    ) / 4.0
    if np.issubdtype(image.dtype, np.integer):
        return np.rint(pooled).astype(image.dtype)
    return pooled.astype(image.dtype)


def downsample_nearest(labels: np.ndarray) -> np.ndarray:
    """2× nearest-neighbour subsampling: label values are ids, never interpolated."""
    return labels[..., ::2, ::2]


def multiscales(
    name: str,
    axes: list[dict[str, Any]],
    n_levels: int,
    pixel_size_um: float,
    version: NgffVersion,
) -> list[dict[str, Any]]:
    datasets = []
    for level in range(n_levels):
        factor = 2**level
        scale = [1.0 if a["type"] != "space" else pixel_size_um * factor for a in axes]
        datasets.append(
            {"path": str(level), "coordinateTransformations": [{"type": "scale", "scale": scale}]}
        )
    ms: dict[str, Any] = {"name": name, "axes": axes, "datasets": datasets}
    if version == "0.4":
        ms["version"] = "0.4"
    return [ms]


IMAGE_AXES = [
    {"name": "c", "type": "channel"},
    {"name": "y", "type": "space", "unit": "micrometer"},
    {"name": "x", "type": "space", "unit": "micrometer"},
]
LABEL_AXES = IMAGE_AXES[1:]


def set_ome(node: zarr.Group, version: NgffVersion, **entries: Any) -> None:
    """Merge NGFF entries into a node's attributes in the layout of `version`."""
    if version == "0.5":
        ome = dict(node.attrs.get("ome", {}))
        ome.update(entries)
        ome["version"] = "0.5"
        node.attrs["ome"] = ome
    else:
        node.attrs.update(entries)


def omero(channels: Sequence[ChannelSpec], dtype: np.dtype, version: NgffVersion) -> dict:
    if np.issubdtype(dtype, np.integer):
        lo, hi = float(np.iinfo(dtype).min), float(np.iinfo(dtype).max)
    else:
        lo, hi = 0.0, 1.0
    out: dict[str, Any] = {
        "channels": [
            {
                "label": ch.label,
                "color": ch.color or DEFAULT_COLORS[i % len(DEFAULT_COLORS)],
                "active": True,
                "window": {
                    "min": lo,
                    "max": hi,
                    "start": ch.window[0] if ch.window else lo,
                    "end": ch.window[1] if ch.window else hi,
                },
            }
            for i, ch in enumerate(channels)
        ],
        # defaultT/defaultZ: iohub (and OMERO) require them to list any position
        "rdefs": {"model": "color", "defaultT": 0, "defaultZ": 0},
    }
    if version == "0.4":
        out["version"] = "0.4"
    return out


def create_array(
    group: zarr.Group,
    name: str,
    *,
    shape: tuple[int, ...],
    dtype: Any,
    dims: list[str],
    version: NgffVersion,
    overwrite: bool = False,
) -> zarr.Array:
    chunks = tuple(
        1 if d in ("c", "t", "z") else min(s, CHUNK) for d, s in zip(dims, shape, strict=True)
    )
    kwargs: dict[str, Any] = {}
    if version == "0.5":
        kwargs["dimension_names"] = dims
    else:
        kwargs["chunk_key_encoding"] = {"name": "v2", "separator": "/"}
    return group.create_array(
        name, shape=shape, chunks=chunks, dtype=dtype, fill_value=0, overwrite=overwrite, **kwargs
    )


@dataclass(frozen=True)
class FieldSpec:
    """What `create_plate` needs to lay out one field before any pixels exist."""

    well: tuple[str, int]  # ("B", 3)
    field: int
    shape_yx: tuple[int, int]


def check_destination(url: str | Path, *, overwrite: bool) -> None:
    """Refuse to write a plate at `url` unless nothing is there or, with `overwrite`, a plate.

    Anything else (a user's folder, a file) is never replaced: `--overwrite` once deleted a
    folder that was not a plate.
    """
    path = Path(url)
    if not path.exists():
        return
    if not overwrite:
        raise HcssegError(f"{url} already exists; pass --overwrite to replace it")
    try:
        open_plate(path)
    except PlateFormatError:
        what = "a folder" if path.is_dir() else "a file"
        raise HcssegError(
            f"{url} is {what}, not an OME-Zarr HCS plate; --overwrite replaces only a plate, "
            "so it was left alone (remove it yourself or choose another OUT)"
        ) from None


@contextmanager
def staged_plate(url: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """A fresh path beside `url` to build a plate in, swapped into place once complete.

    The old plate (with `overwrite`) stays untouched until the new one is whole, and a
    failed build leaves nothing behind: the swap renames the old plate to a backup name,
    the new one into place, then deletes the backup.
    """
    final = Path(url).absolute()
    check_destination(url, overwrite=overwrite)  # refused input leaves not even a lock file
    with plate_write_lock(final, "import"):
        _recover_interrupted(final)
        check_destination(url, overwrite=overwrite)
        token = uuid.uuid4().hex[:8]
        staged = final.with_name(f"{final.name}{STAGED}{token}")
        backup = final.with_name(f"{final.name}{BACKUP}{token}")
        try:
            yield staged
            check_destination(url, overwrite=overwrite)  # something may have appeared
            if final.exists():
                os.replace(final, backup)
            try:
                os.replace(staged, final)
            except OSError:
                if backup.exists():
                    os.replace(backup, final)
                raise
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        shutil.rmtree(backup, ignore_errors=True)


def _recover_interrupted(final: Path) -> None:
    """Clear what a killed import left beside `final` (the caller holds the plate's lock, so
    no live import owns it): half-built copies go; a backup whose swap was cut short between
    its two renames is the only copy of the old plate, so it is put back."""
    for leftover in sorted(final.parent.glob(f"{glob.escape(final.name)}.*-*")):
        kind = leftover.name[len(final.name) :][:5]
        if kind == BACKUP[:5] and not final.exists():
            os.replace(leftover, final)
            log.warning("restored plate %s from an interrupted replacement", final)
        elif kind in (STAGED[:5], BACKUP[:5]):
            shutil.rmtree(leftover, ignore_errors=True)
            log.info("removed %s, left by an interrupted import", leftover)


def create_plate(
    url: str | Path,
    *,
    name: str,
    fields: Sequence[FieldSpec],
    channels: Sequence[ChannelSpec],
    dtype: Any,
    pixel_size_um: float,
    version: NgffVersion = "0.5",
) -> Plate:
    """Lay out a plate: every group, metadata entry and (empty) array, no pixels yet.

    `url` must not exist; to replace a plate, build it in `staged_plate`.
    """
    path = Path(url)
    check_destination(path, overwrite=False)
    if not fields:
        raise InputDataError(f"plate {name}: no fields to write")
    if pixel_size_um <= 0 or not math.isfinite(pixel_size_um):
        raise InputDataError(f"plate {name}: pixel size must be a positive number of µm")
    dtype = np.dtype(dtype)
    zarr_format = 3 if version == "0.5" else 2
    root = zarr.open_group(str(path), mode="w", zarr_format=zarr_format)

    wells = sorted({f.well for f in fields}, key=lambda w: (row_index(w[0]), w[1]))
    rows, cols = plate_layout(wells)
    by_well: dict[tuple[str, int], list[FieldSpec]] = {}
    for f in sorted(fields, key=lambda f: f.field):
        by_well.setdefault(f.well, []).append(f)
    max_fields = max(len(v) for v in by_well.values())
    plate_meta: dict[str, Any] = {
        "name": name,
        "version": version,
        "rows": [{"name": r} for r in rows],
        "columns": [{"name": c} for c in cols],
        "wells": [
            {
                "path": f"{r}/{c:02d}",
                "rowIndex": rows.index(r),
                "columnIndex": cols.index(f"{c:02d}"),
            }
            for r, c in wells
        ],
        "field_count": max_fields,
        "acquisitions": [{"id": 0, "name": name}],
    }
    set_ome(root, version, plate=plate_meta)
    for (r, c), well_fields in by_well.items():
        well_group = root.require_group(f"{r}/{c:02d}")
        row_group = root[r]
        assert isinstance(row_group, zarr.Group)
        images = [{"path": str(f.field), "acquisition": 0} for f in well_fields]
        well_meta: dict[str, Any] = {"images": images}
        if version == "0.4":
            well_meta["version"] = "0.4"
        set_ome(well_group, version, well=well_meta)
        for f in well_fields:
            image = well_group.create_group(str(f.field))
            n_levels = pyramid_levels(f.shape_yx)
            set_ome(
                image,
                version,
                multiscales=multiscales(
                    f"{r}{c:02d}_{f.field}", IMAGE_AXES, n_levels, pixel_size_um, version
                ),
                omero=omero(channels, dtype, version),
            )
            for level in range(n_levels):
                create_array(
                    image,
                    str(level),
                    shape=(len(channels), *level_shape(f.shape_yx, level)),
                    dtype=dtype,
                    dims=["c", "y", "x"],
                    version=version,
                )
    return Plate(path, zarr.open_group(str(path), mode="r+"))  # maybe staged: not open_plate


def write_field_image(plate: Plate, ref: FieldRef, data: np.ndarray) -> None:
    """Write all channels ``(C, Y, X)`` of one field and its pyramid."""
    arr0 = plate.array(ref, 0)
    if tuple(data.shape) != tuple(arr0.shape):
        raise InputDataError(
            f"plate {plate.name} field {ref.path}: image shape {data.shape} does not match "
            f"the plate layout {arr0.shape}"
        )
    level_data = data.astype(arr0.dtype, copy=False)
    for level in range(len(plate.level_paths(ref))):
        if level:
            level_data = downsample_mean(level_data)
        plate.array(ref, level)[...] = level_data


def append_channel(plate: Plate, ref: FieldRef, spec: ChannelSpec, data: np.ndarray) -> None:
    """Add (or overwrite) one named channel of a field, pyramid included.

    Pixels go in first and the ``omero`` entry last, so a crash in between leaves a
    channel slot that is not yet named and gets reused by the next run.
    """
    names = plate.channel_names(ref)
    arr0 = plate.array(ref, 0)
    if data.shape != arr0.shape[-2:]:
        raise InputDataError(
            f"plate {plate.name} field {ref.path}: channel {spec.label!r} has shape "
            f"{data.shape}, the field is {arr0.shape[-2:]}"
        )
    index = names.index(spec.label) if spec.label in names else len(names)
    level_data = data.astype(arr0.dtype, copy=False)
    for level in range(len(plate.level_paths(ref))):
        arr = plate.array(ref, level)
        if level:
            level_data = downsample_mean(level_data)
        if arr.shape[0] <= index:
            arr.resize((index + 1, *arr.shape[1:]))
        arr[index] = level_data
    if spec.label not in names:
        group = plate.image_group(ref)
        meta = ome_attrs(group)
        entry = omero([spec], arr0.dtype, plate.version)["channels"][0]
        entry["color"] = spec.color or DEFAULT_COLORS[index % len(DEFAULT_COLORS)]
        om = dict(meta["omero"])
        om["channels"] = [*om["channels"], entry]
        set_ome(group, plate.version, omero=om)
