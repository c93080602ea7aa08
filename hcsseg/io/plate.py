"""Read OME-Zarr HCS plates (NGFF 0.4 on zarr v2, 0.5 on zarr v3) field by field.

A plate is only ever touched one field at a time: nothing here loads more than the
channels of one field image, so plates of any size stream through a fixed memory budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xarray as xr
import zarr

from hcsseg.errors import ChannelNotFoundError, HcssegError, InputDataError, PlateFormatError

NgffVersion = Literal["0.4", "0.5"]
# plate/row/well/field/labels/label/level: how far below a plate a user's path can be
MAX_PLATE_DEPTH = 6
# name suffixes (+ 8 hex digits) of a plate being built beside its final path, and of the
# old plate while a replacement is swapped in (`plate_writer.staged_plate`)
STAGED, BACKUP = ".tmp-", ".old-"


@dataclass(frozen=True, order=True)
class FieldRef:
    """One field of view: the unit of streaming, addressed by its zarr path."""

    row: str
    column: str
    field: str
    site: int  # 0-based position in the well's `images` list (Metadata_Site)

    @property
    def well_path(self) -> str:
        return f"{self.row}/{self.column}"

    @property
    def path(self) -> str:
        return f"{self.row}/{self.column}/{self.field}"

    @property
    def well(self) -> str:
        """CellProfiler-style well name, e.g. ``B03``."""
        return well_name(self.row, self.column)


def well_name(row: str, column: str) -> str:
    """``("B", "3")`` -> ``"B03"``: row letters + column zero-padded to two digits."""
    return f"{row}{int(column):02d}" if column.isdigit() else f"{row}{column}"


def parse_well(well: str) -> tuple[str, int]:
    """``"B03"`` -> ``("B", 3)``; accepts ``B/03`` and ``B3`` too."""
    m = re.fullmatch(r"([A-Za-z]+)/?0*(\d+)", well.strip())
    if not m:
        raise HcssegError(f"not a well name: {well!r} (expected e.g. 'B03')")
    return m.group(1).upper(), int(m.group(2))


def ome_attrs(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    """NGFF attributes of a node, whatever the version (0.5 nests them under ``ome``)."""
    attrs = dict(node.attrs)
    return dict(attrs["ome"]) if "ome" in attrs else attrs


class Plate:
    """An opened HCS plate. Cheap to create: metadata only."""

    def __init__(self, url: str | Path, group: zarr.Group):
        self.url = str(url)
        self.group = group
        attrs = ome_attrs(group)
        if "plate" not in attrs:
            raise PlateFormatError(
                f"{self.url} is not an OME-Zarr HCS plate: no 'plate' metadata "
                f"(found keys: {sorted(attrs) or 'none'})"
            )
        self.meta: dict[str, Any] = attrs["plate"]
        # opened field groups and arrays: each open re-reads zarr.json (70 reads per field
        # before); writes through this object update the cached nodes themselves
        self._nodes: dict[tuple[str, int], Any] = {}
        self.version: NgffVersion = "0.5" if "ome" in dict(group.attrs) else "0.4"
        self.name: str = str(self.meta.get("name") or Path(self.url.rstrip("/")).stem)
        for key in ("rows", "columns", "wells"):
            if key not in self.meta:
                raise PlateFormatError(f"plate {self.name}: metadata lacks '{key}'")
        for well in self.meta["wells"]:
            path = well.get("path") if isinstance(well, dict) else None
            if not isinstance(path, str) or not re.fullmatch(r"[A-Za-z0-9]+/[A-Za-z0-9]+", path):
                raise PlateFormatError(
                    f"plate {self.name}: well entry {well!r} in the plate metadata has no "
                    "'path' of the form ROW/COLUMN (e.g. 'B/03')"
                )

    # ---- layout -----------------------------------------------------------------
    @property
    def rows(self) -> list[str]:
        return [r["name"] for r in self.meta["rows"]]

    @property
    def columns(self) -> list[str]:
        return [c["name"] for c in self.meta["columns"]]

    @property
    def well_paths(self) -> list[str]:
        return [w["path"] for w in self.meta["wells"]]

    def wells(self) -> list[str]:
        """Wells present in the plate, as CellProfiler names (``B03``)."""
        return [well_name(*p.split("/")) for p in self.well_paths]

    def _well_path(self, well: str) -> str:
        if "/" in well and well in self.well_paths:
            return well
        row, col = parse_well(well)
        for p in self.well_paths:
            r, c = p.split("/")
            if r.upper() == row and c.isdigit() and int(c) == col:
                return p
        raise HcssegError(
            f"plate {self.name}: no well {well!r}; wells present: {', '.join(self.wells())}"
        )

    def fields(self, well: str) -> list[FieldRef]:
        """Fields of one well in `images` order; a well without fields is an error."""
        path = self._well_path(well)
        try:
            node = self.group[path]
        except KeyError as exc:
            raise PlateFormatError(
                f"plate {self.name}: well {well} is listed but {path} is missing"
            ) from exc
        attrs = ome_attrs(node)
        images = attrs.get("well", {}).get("images", [])
        if not images:
            raise PlateFormatError(f"plate {self.name}: well {well} ({path}) has no fields")
        row, col = path.split("/")
        return [FieldRef(row, col, str(im["path"]), i) for i, im in enumerate(images)]

    def iter_fields(self, wells: Sequence[str] | None = None) -> Iterator[FieldRef]:
        for well in wells if wells is not None else self.wells():
            yield from self.fields(well)

    # ---- one field ---------------------------------------------------------------
    def image_group(self, ref: FieldRef) -> zarr.Group:
        key = (ref.path, -1)
        if key not in self._nodes:
            try:
                node = self.group[ref.path]
            except KeyError as exc:
                raise PlateFormatError(
                    f"plate {self.name}: field {ref.path} (well {ref.well}) is missing"
                ) from exc
            assert isinstance(node, zarr.Group)
            self._nodes[key] = node
        return self._nodes[key]

    def image_meta(self, ref: FieldRef) -> dict[str, Any]:
        attrs = ome_attrs(self.image_group(ref))
        if "multiscales" not in attrs:
            raise PlateFormatError(
                f"plate {self.name}: field {ref.path} has no 'multiscales' metadata"
            )
        return attrs

    def channel_names(self, ref: FieldRef) -> list[str]:
        """Channel labels from ``omero.channels`` (the names users select by)."""
        meta = self.image_meta(ref)
        channels = meta.get("omero", {}).get("channels", [])
        names = [str(c.get("label", f"channel{i}")) for i, c in enumerate(channels)]
        if not names:
            raise PlateFormatError(
                f"plate {self.name}: field {ref.path} has no omero.channels labels"
            )
        return names

    def axes(self, ref: FieldRef) -> list[str]:
        return [a["name"] for a in self.image_meta(ref)["multiscales"][0]["axes"]]

    def level_paths(self, ref: FieldRef) -> list[str]:
        return [d["path"] for d in self.image_meta(ref)["multiscales"][0]["datasets"]]

    def scale(self, ref: FieldRef, level: int = 0) -> list[float]:
        ds = self.image_meta(ref)["multiscales"][0]["datasets"][level]
        for t in ds.get("coordinateTransformations", []):
            if t.get("type") == "scale":
                return [float(s) for s in t["scale"]]
        return [1.0] * len(self.axes(ref))

    def pixel_size_um(self, ref: FieldRef, level: int = 0) -> float:
        """Physical x pixel size at `level`, in micrometres (unit conversion applied)."""
        meta = self.image_meta(ref)
        axes = meta["multiscales"][0]["axes"]
        names = [a["name"] for a in axes]
        x = names.index("x")
        unit = axes[x].get("unit", "micrometer")
        factor = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3}.get(unit, 1.0)
        return self.scale(ref, level)[x] * factor

    def array(self, ref: FieldRef, level: int = 0) -> zarr.Array:
        key = (ref.path, level)
        if key not in self._nodes:
            self._nodes[key] = self._open_array(ref, level)
        return self._nodes[key]

    def _open_array(self, ref: FieldRef, level: int) -> zarr.Array:
        paths = self.level_paths(ref)
        where = f"plate {self.name} field {ref.path} (well {ref.well})"
        if level >= len(paths):
            raise PlateFormatError(f"{where}: no resolution level {level} in its multiscales")
        try:
            node = self.image_group(ref)[paths[level]]
        except KeyError:
            raise PlateFormatError(
                f"{where}: image array {paths[level]!r} listed in its multiscales is missing"
            ) from None
        except Exception as exc:  # damaged array metadata: zarr raises several types
            raise PlateFormatError(
                f"{where}: image array {paths[level]!r} has unreadable metadata "
                f"({type(exc).__name__}: {str(exc)[:160]})"
            ) from None
        if not isinstance(node, zarr.Array):
            raise PlateFormatError(f"{where}: {paths[level]!r} is a group, not an image array")
        return node

    def channel_index(self, ref: FieldRef, names: Sequence[str]) -> list[int]:
        available = self.channel_names(ref)
        missing = [n for n in names if n not in available]
        if missing:
            raise ChannelNotFoundError(
                missing, available, where=f"plate {self.name} field {ref.path} (well {ref.well})"
            )
        return [available.index(n) for n in names]

    def has_channel(self, ref: FieldRef, name: str) -> bool:
        return name in self.channel_names(ref)

    def read_channels(self, ref: FieldRef, names: Sequence[str], *, level: int = 0) -> np.ndarray:
        """Channels of one field as a ``(C, Y, X)`` array (singleton t/z squeezed)."""
        idx = self.channel_index(ref, names)
        arr = self.array(ref, level)
        axes = self.axes(ref)
        c_axis = axes.index("c")
        out = []
        for name, i in zip(names, idx, strict=True):
            sel: list[Any] = [0] * arr.ndim
            for k, a in enumerate(axes):
                if a in ("y", "x"):
                    sel[k] = slice(None)
            sel[c_axis] = i
            where = f"plate {self.name} field {ref.path} (well {ref.well}) channel {name!r}"
            out.append(_read_chunks(arr, tuple(sel), where))
        return np.stack(out) if out else np.empty((0, *arr.shape[-2:]), dtype=arr.dtype)

    def read_xarray(self, ref: FieldRef, names: Sequence[str], *, level: int = 0) -> xr.DataArray:
        """Channels with physical coordinates (µm), for analysts and notebooks."""
        data = self.read_channels(ref, names, level=level)
        px = self.pixel_size_um(ref, level)
        axes = self.axes(ref)
        py = self.scale(ref, level)[axes.index("y")]
        return xr.DataArray(
            data,
            dims=("c", "y", "x"),
            coords={
                "c": list(names),
                "y": np.arange(data.shape[1]) * py,
                "x": np.arange(data.shape[2]) * px,
            },
            attrs={
                "plate": self.name,
                "well": ref.well,
                "site": ref.site,
                "pixel_size_um": px,
                "units": "micrometer",
            },
        )

    def field_shape(self, ref: FieldRef) -> tuple[int, int]:
        shape = self.array(ref).shape
        return int(shape[-2]), int(shape[-1])

    # ---- labels ------------------------------------------------------------------
    def label_names(self, ref: FieldRef) -> list[str]:
        group = self.image_group(ref)
        if "labels" not in group:
            return []
        return [str(n) for n in ome_attrs(group["labels"]).get("labels", [])]

    def label_provenance(self, ref: FieldRef, name: str) -> dict[str, Any]:
        """How hcsseg made a label image (`image-label.hcsseg`); {} for foreign labels."""
        if name not in self.label_names(ref):
            return {}
        meta = ome_attrs(self.image_group(ref)[f"labels/{name}"]).get("image-label", {})
        return dict(meta.get("hcsseg") or {})

    def read_labels(self, ref: FieldRef, name: str, *, level: int = 0) -> np.ndarray:
        names = self.label_names(ref)
        if name not in names:
            raise HcssegError(
                f"plate {self.name} field {ref.path} (well {ref.well}): no label image "
                f"{name!r}; labels present: {', '.join(names) or '(none)'}"
            )
        where = f"plate {self.name} field {ref.path} (well {ref.well}) label image {name!r}"
        try:
            label_group = self.image_group(ref)[f"labels/{name}"]
            datasets = ome_attrs(label_group)["multiscales"][0]["datasets"]
            arr = label_group[datasets[level]["path"]]
        except (KeyError, IndexError, TypeError) as exc:
            raise PlateFormatError(f"{where}: no level {level} array ({exc})") from None
        data = _read_chunks(arr, ..., where)
        full = data.shape
        while data.ndim > 2 and data.shape[0] == 1:  # singleton t/c/z
            data = data[0]
        if data.ndim != 2:
            # cutting to the first plane once scored two overlapping annotations AP 1.000
            raise InputDataError(
                f"{where} has shape {full}; expected one (Y, X) plane (leading axes of size 1 "
                "allowed), not a stack of planes"
            )
        return data


def _read_chunks(arr: zarr.Array, selection: Any, where: str) -> np.ndarray:
    """Pixels of `arr`, with a damaged or missing chunk named by field and channel (the codec
    alone says only `Zstd decompression error`)."""
    try:
        return np.asarray(arr[selection])
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # codecs and stores raise many types for a damaged chunk
        detail = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise PlateFormatError(
            f"{where}: cannot read its pixels ({type(exc).__name__}: {detail}); a chunk file "
            f"under {arr.store_path} is damaged or unreadable"
        ) from None


def _part_kind(attrs: dict[str, Any]) -> str:
    """What a group inside a plate is, in the words the user knows it by."""
    if "well" in attrs:
        return "well"
    if "image-label" in attrs:
        return "label image"
    if "multiscales" in attrs:
        return "field"
    return "part"


def _enclosing_plate(path: Path) -> Plate | None:
    """The plate a path lies inside (a row, well, field, label or array), if any."""
    for parent in list(path.parents)[:MAX_PLATE_DEPTH]:
        try:
            group = zarr.open_group(str(parent), mode="r")
        except Exception:  # not a zarr group: keep walking up
            continue
        if "plate" in ome_attrs(group):
            try:
                return Plate(parent, group)
            except PlateFormatError:
                return None
    return None


def open_plate(url: str | Path, *, mode: Literal["r", "r+"] = "r") -> Plate:
    """Open a plate for reading (or metadata updates with ``r+``); clear error otherwise.

    A path inside a plate (well, field) is refused with the plate's path, since that is
    the usual slip and the fix is one copy-paste away.
    """
    path = Path(url)
    if not path.exists():
        raise PlateFormatError(f"no plate at {url}: path does not exist")
    unfinished = re.search(rf"({re.escape(STAGED)}|{re.escape(BACKUP)})[0-9a-f]{{8}}$", path.name)
    if unfinished:
        final = path.with_name(path.name[: unfinished.start()])
        raise PlateFormatError(
            f"{url} is an unfinished copy of plate {final.name} left by an import that was "
            f"killed or failed; run the import again (it cleans this up), then use {final}"
        )
    group: zarr.Group | None = None
    attrs: dict[str, Any] = {}
    try:
        group = zarr.open_group(str(path), mode=mode)
        attrs = ome_attrs(group)
    except Exception:  # zarr raises several types for a file, a non-zarr folder, an array
        pass
    if group is None or "plate" not in attrs:
        parent = _enclosing_plate(path)
        if parent is not None:
            raise PlateFormatError(
                f"{url} is a {_part_kind(attrs)} of plate {parent.name}; "
                f"pass the plate: {parent.url}"
            )
    if group is None:
        if path.is_file():
            raise PlateFormatError(
                f"{url} is a file, not an OME-Zarr HCS plate (plates are folders)"
            )
        what = "an empty folder" if not any(path.iterdir()) else "a folder without zarr metadata"
        raise PlateFormatError(f"{url} is not an OME-Zarr HCS plate: {what}")
    return Plate(url, group)


def _tree_stamp(folder: Path, digest: Any) -> None:
    """Feed every file below `folder` (name, size, mtime) into `digest`; chunks are not read."""
    stack = [root := folder]
    while stack:
        current = stack.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except FileNotFoundError:
            digest.update(f"missing:{os.path.relpath(current, root)}".encode())
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                stack.append(Path(entry.path))
            else:
                st = entry.stat()
                name = os.path.relpath(entry.path, root)
                digest.update(f"{name}:{st.st_size}:{st.st_mtime_ns};".encode())


def content_stamp(plate: Plate, ref: FieldRef, label: str | None = None) -> str:
    """A stamp of one field's level-0 image (or `label` image): its metadata and the size
    and modification time of each chunk file. A re-imported, replaced or re-stained field
    gets a new stamp, so results computed from the old one are not taken for current."""
    node = plate.image_group(ref) if label is None else plate.image_group(ref)[f"labels/{label}"]
    assert isinstance(node, zarr.Group)
    level = ome_attrs(node)["multiscales"][0]["datasets"][0]["path"]
    digest = hashlib.sha256()
    digest.update(json.dumps(ome_attrs(node), sort_keys=True, default=str).encode())
    _tree_stamp(
        Path(plate.url) / ref.path / ("" if label is None else f"labels/{label}") / level, digest
    )
    return digest.hexdigest()[:16]


def check_writable(path: str | Path, what: str) -> None:
    """Refuse at once a folder that cannot take writes (read-only mount, permissions, full
    disk): a probe file is made and removed, since `os.access` says yes to root on a
    read-only mount. A folder not made yet is probed at its nearest existing parent."""
    target = Path(path).absolute()
    probe_dir = next((p for p in (target, *target.parents) if p.exists()), target)
    try:
        fd, name = tempfile.mkstemp(prefix=".hcsseg-probe-", dir=probe_dir)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(name)
    except OSError as exc:
        raise HcssegError(
            f"{what} {target} cannot be written ({exc.strerror or exc}); nothing was changed"
        ) from None
