"""Turn folders of per-field TIFFs into OME-Zarr HCS plates.

Two layouts are common in screening facilities and in annotated data sets:
* one file per (well, site, channel), named by the acquisition software
  (ImageXpress/CellProfiler: ``<plate>_<well>f<site>d<channel>.tif``);
* image/label pairs (``<stem>_img.tif`` + ``<stem>_lab.tif``), each pair one field,
  whose labels are kept as ground truth (``labels/<name>_gt``) for later evaluation.

Files are read twice, headers first (to lay the plate out) then pixels one field at a
time, so importing never holds more than one field in memory.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from pydantic import BaseModel, ConfigDict, Field, field_validator
from tqdm import tqdm

from hcsseg.errors import ImportPatternError, InputDataError
from hcsseg.io.labels import write_labels
from hcsseg.io.plate import FieldRef, NgffVersion, Plate, open_plate, parse_well
from hcsseg.io.plate_writer import (
    ChannelSpec,
    FieldSpec,
    create_plate,
    row_name,
    staged_plate,
    write_field_image,
)

log = logging.getLogger(__name__)

PRESETS: dict[str, str] = {
    # ImageXpress / CellProfiler example naming: AS_09125_050116030001_D03f00d0.tif
    "imagexpress": (
        r"^(?P<plate>.+)_(?P<well>[A-Za-z]{1,2}\d{1,2})f(?P<site>\d+)d(?P<channel>\d+)\.tiff?$"
    ),
    # Operetta/Harmony export: r01c03f02p01-ch1sk1fk1fl1.tiff
    "operetta": r"^r(?P<row>\d+)c(?P<col>\d+)f(?P<site>\d+)p\d+-ch(?P<channel>\d+).*\.tiff?$",
}


class ImportOptions(BaseModel):
    """How file names map to wells, sites and channels."""

    model_config = ConfigDict(extra="forbid")

    pattern: str = Field(
        "imagexpress",
        description="preset name (imagexpress, operetta) or a regex with named groups "
        "well (or row+col), site, channel; plate optional",
    )
    channel_names: dict[str, str] = Field(
        default_factory=dict,
        description="file channel token: channel name, e.g. {'0': 'DNA', '2': 'GFP'}",
    )
    pixel_size_um: float = Field(1.0, gt=0, description="pixel size in micrometres")
    plate_name: str | None = None
    version: NgffVersion = "0.5"

    @field_validator("pattern")
    @classmethod
    def _compile(cls, value: str) -> str:
        regex = PRESETS.get(value, value)
        try:
            compiled = re.compile(regex, re.IGNORECASE)
        except re.error as exc:
            raise ValueError(f"pattern {value!r} is not a valid regex: {exc}") from exc
        groups = set(compiled.groupindex)
        if not ({"well"} <= groups or {"row", "col"} <= groups):
            raise ValueError("pattern needs a named group 'well' (or 'row' and 'col')")
        return value

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile(PRESETS.get(self.pattern, self.pattern), re.IGNORECASE)


@dataclass
class _Field:
    well: tuple[str, int]
    site: int
    channel_files: dict[str, Path]  # channel name -> file (single-plane)
    label_files: dict[str, Path]


def _header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return tuple(series.shape), np.dtype(series.dtype)
    except Exception as exc:
        raise InputDataError(f"cannot read TIFF {path}: {exc}") from exc


def _read_plane(path: Path) -> np.ndarray:
    try:
        data = tifffile.imread(path)
    except Exception as exc:
        raise InputDataError(f"cannot read TIFF {path}: {exc}") from exc
    data = np.squeeze(data)
    if data.ndim != 2:
        raise InputDataError(f"{path}: expected a single 2-D plane, got shape {data.shape}")
    return data


def _well_from_match(m: re.Match[str]) -> tuple[str, int]:
    groups = m.groupdict()
    if groups.get("well"):
        return parse_well(groups["well"])
    return row_name(int(groups["row"]) - 1), int(groups["col"])


def scan_folder(folder: Path, options: ImportOptions) -> tuple[str, list[_Field], list[str]]:
    """Group matching files into fields; returns (plate name, fields, channel names)."""
    if not folder.is_dir():
        raise ImportPatternError(f"{folder} is not a folder")
    regex = options.regex
    files = sorted(p for p in folder.iterdir() if p.is_file())
    fields: dict[tuple[tuple[str, int], int], _Field] = {}
    plates: set[str] = set()
    tokens: set[str] = set()
    for path in files:
        m = regex.match(path.name)
        if not m:
            continue
        groups = m.groupdict()
        well = _well_from_match(m)
        site = int(groups.get("site") or 0)
        token = groups.get("channel") or "0"
        tokens.add(token)
        if groups.get("plate"):
            plates.add(groups["plate"])
        name = options.channel_names.get(token, f"ch{token}")
        entry = fields.setdefault((well, site), _Field(well, site, {}, {}))
        if name in entry.channel_files:
            raise ImportPatternError(
                f"two files map to well {well[0]}{well[1]:02d} site {site} channel {name!r}: "
                f"{entry.channel_files[name].name} and {path.name}"
            )
        entry.channel_files[name] = path
    if not fields:
        raise ImportPatternError(
            f"pattern {options.pattern!r} matched none of the {len(files)} files in {folder}"
            + (f" (e.g. {files[0].name!r})" if files else "")
        )
    unknown = sorted(set(options.channel_names) - tokens)
    if unknown:
        raise ImportPatternError(
            f"channel map names tokens {unknown} that no file has; tokens found: {sorted(tokens)}"
        )
    channels = sorted(
        {n for f in fields.values() for n in f.channel_files},
        key=lambda n: next((k for k, v in options.channel_names.items() if v == n), n),
    )
    for f in fields.values():
        missing = [c for c in channels if c not in f.channel_files]
        if missing:
            raise ImportPatternError(
                f"well {f.well[0]}{f.well[1]:02d} site {f.site} lacks channel(s) {missing}"
            )
    if len(plates) > 1:
        raise ImportPatternError(
            f"files from several plates match ({sorted(plates)}); import one plate at a time "
            "or narrow the pattern"
        )
    plate_name = options.plate_name or (plates.pop() if plates else folder.name)
    ordered = sorted(fields.values(), key=lambda f: (f.well, f.site))
    return plate_name, ordered, channels


def _write(
    out: Path,
    *,
    plate_name: str,
    fields: list[_Field],
    channels: list[str],
    pixel_size_um: float,
    version: NgffVersion,
) -> None:
    """Write the plate at `out` (a staged path: it is moved into place when complete)."""
    specs: list[FieldSpec] = []
    dtypes = []
    sites_per_well: dict[tuple[str, int], int] = {}
    field_index: list[int] = []
    for f in fields:
        shapes = {_header(p) for p in f.channel_files.values()}
        if len({s[0] for s in shapes}) > 1:
            raise InputDataError(
                f"well {f.well[0]}{f.well[1]:02d} site {f.site}: channel images differ in "
                f"shape {sorted(s[0] for s in shapes)}"
            )
        shape, dtype = next(iter(shapes))
        shape = tuple(s for s in shape if s > 1)
        if len(shape) != 2:
            raise InputDataError(
                f"{next(iter(f.channel_files.values()))}: expected one 2-D plane per file, "
                f"got shape {shape}"
            )
        dtypes.extend(d for _, d in shapes)
        idx = sites_per_well.get(f.well, 0)
        sites_per_well[f.well] = idx + 1
        field_index.append(idx)
        specs.append(FieldSpec(well=f.well, field=idx, shape_yx=(shape[0], shape[1])))
    dtype = np.result_type(*dtypes)
    plate = create_plate(
        out,
        name=plate_name,
        fields=specs,
        channels=[ChannelSpec(c) for c in channels],
        dtype=dtype,
        pixel_size_um=pixel_size_um,
        version=version,
    )
    for f, idx in tqdm(
        list(zip(fields, field_index, strict=True)), desc=f"importing {plate_name}", unit="field"
    ):
        ref = FieldRef(f.well[0], f"{f.well[1]:02d}", str(idx), idx)
        data = np.stack([_read_plane(f.channel_files[c]) for c in channels])
        write_field_image(plate, ref, data)
        group = plate.image_group(ref)
        group.attrs["hcsseg"] = {
            "source_files": {c: str(f.channel_files[c]) for c in channels},
            "acquisition_site": f.site,
        }
        for name, path in f.label_files.items():
            labels = _read_plane(path)
            if not np.issubdtype(labels.dtype, np.integer):
                raise InputDataError(f"{path}: labels must be integers, got {labels.dtype}")
            write_labels(plate, ref, name, labels, properties={"source_file": str(path)})


def import_tiff_folder(
    folder: str | Path, out: str | Path, *, options: ImportOptions, overwrite: bool = False
) -> Plate:
    """Import a folder of per-(well, site, channel) TIFFs as a plate.

    `out` is checked first and replaced only once the new plate is complete
    (`staged_plate`), so a failed import never costs the old plate.
    """
    with staged_plate(out, overwrite=overwrite) as staged:
        plate_name, fields, channels = scan_folder(Path(folder), options)
        log.info("importing %d fields, channels %s into %s", len(fields), channels, out)
        _write(
            staged,
            plate_name=plate_name,
            fields=fields,
            channels=channels,
            pixel_size_um=options.pixel_size_um,
            version=options.version,
        )
    return open_plate(Path(out), mode="r+")


class PairImportOptions(BaseModel):
    """Image/label TIFF pairs: ``STEM_img.tif`` (+ ``STEM_SUFFIX.tif`` channels)."""

    model_config = ConfigDict(extra="forbid")

    image_channel: str = Field("DNA", description="channel name for the *_img.tif images")
    extra_channels: dict[str, str] = Field(
        default_factory=dict,
        description="file suffix: channel name for more channels, e.g. {'dapi': 'DAPI'}",
    )
    labels_name: str = Field("nuclei_gt", description="label image name for *_lab.tif")
    pixel_size_um: float = Field(1.0, gt=0)
    plate_name: str | None = None
    wells_per_row: int = Field(12, ge=1, le=48, description="pairs fill wells row by row")
    limit: int | None = Field(None, ge=1, description="import only the first N pairs")
    version: NgffVersion = "0.5"


def _pair_fields(folder: Path, options: PairImportOptions) -> list[_Field]:
    stems = sorted(p.name[: -len("_img.tif")] for p in folder.glob("*_img.tif"))
    if not stems:
        raise ImportPatternError(f"no '*_img.tif' files in {folder}")
    if options.limit:
        stems = stems[: options.limit]
    fields = []
    for i, stem in enumerate(stems):
        row, col = divmod(i, options.wells_per_row)
        channel_files = {options.image_channel: folder / f"{stem}_img.tif"}
        for suffix, name in options.extra_channels.items():
            path = folder / f"{stem}_{suffix}.tif"
            if not path.exists():
                raise ImportPatternError(f"{stem}: missing {path.name} for channel {name!r}")
            channel_files[name] = path
        lab = folder / f"{stem}_lab.tif"
        labels = {options.labels_name: lab} if lab.exists() else {}
        fields.append(_Field((row_name(row), col + 1), 0, channel_files, labels))
    return fields


def import_tiff_pairs(
    folder: str | Path, out: str | Path, *, options: PairImportOptions, overwrite: bool = False
) -> Plate:
    """Import image/label pairs, one well per pair, labels kept as ground truth."""
    folder = Path(folder)
    with staged_plate(out, overwrite=overwrite) as staged:
        if not folder.is_dir():
            raise ImportPatternError(f"{folder} is not a folder")
        _write(
            staged,
            plate_name=options.plate_name or folder.name,
            fields=_pair_fields(folder, options),
            channels=[options.image_channel, *options.extra_channels.values()],
            pixel_size_um=options.pixel_size_um,
            version=options.version,
        )
    return open_plate(Path(out), mode="r+")


def plate_from_arrays(
    out: str | Path,
    *,
    name: str,
    fields: Iterable[tuple[tuple[str, int], np.ndarray]],
    channels: list[str],
    pixel_size_um: float,
    version: NgffVersion = "0.5",
    overwrite: bool = False,
) -> Plate:
    """Small plates from in-memory ``(C, Y, X)`` arrays (tests, demos, benchmarks)."""
    items = list(fields)
    counts: dict[tuple[str, int], int] = {}
    specs, refs = [], []
    for well, data in items:
        idx = counts.get(well, 0)
        counts[well] = idx + 1
        specs.append(FieldSpec(well=well, field=idx, shape_yx=data.shape[-2:]))
        refs.append(FieldRef(well[0], f"{well[1]:02d}", str(idx), idx))
    with staged_plate(out, overwrite=overwrite) as staged:
        plate = create_plate(
            staged,
            name=name,
            fields=specs,
            channels=[ChannelSpec(c) for c in channels],
            dtype=np.result_type(*[d.dtype for _, d in items]),
            pixel_size_um=pixel_size_um,
            version=version,
        )
        for ref, (_, data) in zip(refs, items, strict=True):
            write_field_image(plate, ref, data)
    return open_plate(Path(out), mode="r+")
