"""Plate processing as plan -> per-well work -> finalize (the ngio iterator pattern).

`plan_plate` checks everything that can be checked before a single byte is written
(plate format, channel names, well list), so a bad request fails with nothing touched.
`process_well` streams the fields of one well; its tables land with one atomic rename
per table after all fields are done, so a killed run never leaves partial rows.
`finalize_plate` builds plate-level summaries from the per-well files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pandas as pd

from hcsseg.config import CELL_NAMES, NUCLEUS_NAMES, ProcessConfig
from hcsseg.errors import ChannelNotFoundError, HcssegError, InputDataError, ModelError
from hcsseg.export.ngio_tables import field_table_path, write_well_field_tables
from hcsseg.export.tables import read_table, safe_name, write_parquet, write_well_table
from hcsseg.io.labels import remove_stale_temporaries, write_labels
from hcsseg.io.plate import FieldRef, Plate, check_writable, content_stamp, open_plate
from hcsseg.io.plate_lock import exclusive, plate_write_lock
from hcsseg.measure.features import (
    channel_token,
    feature_columns,
    measure_objects_tiled,
    object_metadata_columns,
)
from hcsseg.measure.quality import (
    QUALITY_FEATURES,
    QUALITY_FLAGS,
    image_quality,
    quality_columns,
    quality_flags,
)
from hcsseg.model_store import check_card_channels, latest_model, load_model
from hcsseg.pipeline.stages import LEDGER_DIR
from hcsseg.segment.methods import Segmenter
from hcsseg.segment.scale import pixel_size_from_objects
from hcsseg.segment.tiling import central_crop

log = logging.getLogger(__name__)

VIRTUAL_SUFFIX = "_virtual"
FIELD_METADATA = (
    "Metadata_Plate",
    "Metadata_Well",
    "Metadata_Site",
    "Metadata_ImagePath",
    "Metadata_NucleusChannel",
    "Metadata_NucleusChannelSource",
    "Metadata_NucleiModel",
    "Metadata_CellsModel",
)


@dataclass(frozen=True)
class PlatePlan:
    """What a run will do; plain data so it can cross process/worker boundaries."""

    plate_url: str
    plate_name: str
    wells: list[str]
    nucleus_channel: str
    cell_channel: str | None
    measure_channels: list[str]
    output_root: str
    n_fields: int
    config_hash: str
    nuclei_model: str | None = None
    cells_model: str | None = None
    model_store: str | None = None


@dataclass
class WellResult:
    well: str
    n_fields: int
    n_cells: int
    qc: list[dict[str, Any]] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)


def select_wells(plate: Plate, wanted: list[str] | None) -> list[str]:
    """The plate's wells, or the `wanted` ones in plate order; an unknown well is an error."""
    wells = plate.wells()
    if wanted:
        unknown = [w for w in wanted if w not in wells]
        if unknown:
            raise HcssegError(
                f"plate {plate.name}: wells {unknown} not in the plate; wells: {', '.join(wells)}"
            )
        wells = [w for w in wells if w in wanted]
    return wells


def pick_channel(names: list[str], pattern: Any) -> str | None:
    """The first measured (not virtual) channel whose name matches `pattern`."""
    return next((n for n in names if pattern.search(n) and not n.endswith(VIRTUAL_SUFFIX)), None)


def _field_channels(plate: Plate, wells: list[str]) -> dict[str, list[str]]:
    """Channel names of every field (metadata only: cheap even for big plates)."""
    return {ref.path: plate.channel_names(ref) for ref in plate.iter_fields(wells)}


def absolute_url(url: str) -> str:
    """A local path made absolute (rows and plans then work from any directory or worker);
    URLs with a scheme (``s3://``, ``file://``) are kept as they are."""
    if len(urlsplit(url).scheme) > 1:  # one letter is a Windows drive, not a scheme
        return url
    return str(Path(url).resolve())


def channel_sets(per_field: dict[str, list[str]]) -> tuple[list[str], list[str]]:
    """(channels in every field, channels in any field), in the plate's channel order."""
    first = next(iter(per_field.values()))
    everywhere = [c for c in first if all(c in names for names in per_field.values())]
    anywhere = list(dict.fromkeys(c for names in per_field.values() for c in names))
    return everywhere, anywhere


def choose_nucleus_channel(config: ProcessConfig, anywhere: list[str], plate_name: str) -> str:
    """The configured nucleus channel, else the first named like a nucleus stain."""
    nucleus = config.nucleus_channel or pick_channel(anywhere, NUCLEUS_NAMES)
    if nucleus is None:
        raise ChannelNotFoundError(
            "<a nucleus stain such as DAPI/Hoechst/DNA>",
            anywhere,
            where=f"plate {plate_name} (set nucleus_channel / --nucleus-channel)",
        )
    return nucleus


def plan_plate(plate_url: str, config: ProcessConfig) -> PlatePlan:
    """Validate the request against the plate; raises before anything is written.

    A field without the nucleus channel uses ``<nucleus>_virtual`` when it has one (the
    virtual-staining step writes it), so plates stained in only some wells still work.
    Paths are made absolute here, once, so everything derived from the plan is.
    """
    plate_url = absolute_url(str(plate_url))
    plate = open_plate(plate_url)
    wells = select_wells(plate, config.wells)
    if not wells:
        raise HcssegError(f"plate {plate.name} has no wells")
    per_field = _field_channels(plate, wells)
    everywhere, anywhere = channel_sets(per_field)
    nucleus = choose_nucleus_channel(config, anywhere, plate.name)
    fallback = f"{nucleus}{VIRTUAL_SUFFIX}"
    lacking = [
        f for f, names in per_field.items() if nucleus not in names and fallback not in names
    ]
    if lacking:
        where = f"plate {plate.name}"
        if len(lacking) < len(per_field):
            where += (
                f" fields {', '.join(lacking[:5])}"
                + (" ..." if len(lacking) > 5 else "")
                + f" (and no {fallback!r} there: predict a virtual nucleus channel first)"
            )
        raise ChannelNotFoundError(nucleus, anywhere, where=where)
    cell = config.cell_channel
    if cell is None:
        cell = pick_channel([c for c in everywhere if c != nucleus], CELL_NAMES)
    elif cell not in everywhere:
        raise ChannelNotFoundError(cell, everywhere, where=f"plate {plate.name}")
    if config.measure_channels:
        missing = [c for c in config.measure_channels if c not in anywhere]
        if missing:
            raise ChannelNotFoundError(missing, anywhere, where=f"plate {plate.name}")
        measure = list(config.measure_channels)
    else:
        measure = [c for c in anywhere if c in everywhere or c in (nucleus, fallback)]
    tokens = [channel_token(c) for c in measure]
    if len(set(tokens)) != len(tokens):
        raise HcssegError(f"channels {measure} map to clashing feature tokens {tokens}")
    store = absolute_url(str(config.store(plate_url)))
    # a model reading the nucleus stain reads its virtual prediction where the stain is missing
    readable = everywhere + [c.removesuffix(VIRTUAL_SUFFIX) for c in everywhere if c == fallback]
    nuclei_model = _resolve_model(
        store, "nuclei", config.nuclei_method, config.nuclei_model, plate.name, readable
    )
    cells_model = _resolve_model(
        store, "cells", config.cells_method, config.cells_model, plate.name, readable
    )
    output_root = absolute_url(str(config.output_root(plate_url)))
    check_writable(plate_url, f"plate {plate.name} (labels go there):")
    check_writable(output_root, "tables folder")
    return PlatePlan(
        plate_url=plate_url,
        plate_name=plate.name,
        wells=wells,
        nucleus_channel=nucleus,
        cell_channel=cell,
        measure_channels=measure,
        output_root=output_root,
        n_fields=len(per_field),
        config_hash=config_hash(config),
        nuclei_model=nuclei_model,
        cells_model=cells_model,
        model_store=store,
    )


def _resolve_model(
    store: str, compartment: str, method: str, model: str | None, plate: str, channels: list[str]
) -> str | None:
    """The stored model a method uses; its input channels must exist in every field."""
    if method == "classical":
        return None
    model = model or latest_model(store, f"{compartment}-{method}", plate=plate)
    if model is None:
        if method == "cellpose":
            return None  # built-in Cellpose weights (downloaded by Cellpose when online)
        raise ModelError(
            f"{compartment}_method={method!r} needs a trained model, and the model store "
            f"{store} has none for plate {plate}: run `hcsseg train` first or pass "
            f"{compartment}_model"
        )
    _, card = load_model(store, model)  # a damaged file fails here, before any write
    if card.get("method") != method or card.get("compartment") != compartment:
        raise ModelError(
            f"model {model} is a {card.get('compartment')} {card.get('method')} model, "
            f"not {compartment} {method}"
        )
    check_card_channels(card, channels, where=f"plate {plate}")
    return model


def config_hash(config: ProcessConfig) -> str:
    """Hash of the options that change results (not which wells or where tables go)."""
    payload = config.model_dump(mode="json", exclude={"wells", "output"})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def bookkeeping_dir(output_root: str | Path) -> Path:
    """``<tables>/.hcsseg``: markers and locks, hidden so each table folder stays a clean
    Parquet dataset (pandas, pyarrow and DuckDB skip dot-folders and never look there)."""
    return Path(output_root) / LEDGER_DIR


def _marker_dir(plan: PlatePlan) -> Path:
    return bookkeeping_dir(plan.output_root) / "done" / safe_name(plan.plate_name)


def _marker_path(plan: PlatePlan, well: str) -> Path:
    return _marker_dir(plan) / f"{well}.json"


def well_stamps(plate: Plate, well: str) -> dict[str, dict[str, str]]:
    """What a well's results were computed from and wrote: each field's image stamp and the
    stamps of the label images a run wrote there (those present)."""
    images, labels = {}, {}
    for ref in plate.fields(well):
        images[ref.path] = content_stamp(plate, ref)
        present = plate.label_names(ref)
        for name in ("nuclei", "cells"):
            if name in present:
                labels[f"{ref.path}/labels/{name}"] = content_stamp(plate, ref, name)
    return {"images": images, "labels": labels}


def well_is_done(plan: PlatePlan, well: str, plate: Plate | None = None) -> bool:
    """A well counts as done only if its marker (written last) matches this config, the
    field images it was computed from, the labels it wrote and its tables (the Parquet files
    and each field's ngio table in the plate) still exist.

    A plate re-imported or re-stained at the same path, or labels overwritten since, make
    the well be redone rather than reported from stale tables."""
    path = _marker_path(plan, well)
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    if marker.get("config_hash") != plan.config_hash:
        return False
    root = Path(plan.output_root)
    if not all((root / t).exists() for t in marker.get("tables", [None])):
        return False
    try:
        plate = plate or open_plate(plan.plate_url)
        current = well_stamps(plate, well)
        refs = plate.fields(well)
    except (KeyError, OSError, HcssegError):  # the well or a field is gone or unreadable
        return False
    if not all(field_table_path(plan.plate_url, ref).is_file() for ref in refs):
        return False  # e.g. done by a run that died before writing them
    return marker.get("stamps") == current


def _mark_done(
    plan: PlatePlan, well: str, tables: list[Path], stamps: dict, run_id: str | None
) -> None:
    path = _marker_path(plan, well)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    # table paths relative to the tables folder: a run from another folder finds them
    rel = [str(Path(t).absolute().relative_to(Path(plan.output_root).absolute())) for t in tables]
    tmp.write_text(
        json.dumps(
            {
                "config_hash": plan.config_hash,
                "tables": rel,
                "stamps": stamps,
                "run_id": run_id or "",
            }
        )
    )
    os.replace(tmp, path)


def forget_vanished_wells(plan: PlatePlan, plate: Plate) -> list[str]:
    """Drop tables and markers of wells the plate no longer has (it was replaced), so the
    tables never report wells that do not exist."""
    present = set(plate.wells())
    gone = set()
    for kind in ("cells", "image_qc"):
        folder = Path(plan.output_root) / kind / safe_name(plan.plate_name)
        for table in folder.glob("*.parquet") if folder.is_dir() else []:
            if table.stem not in present:
                table.unlink()
                gone.add(table.stem)
    done = _marker_dir(plan)
    for marker in done.glob("*.json") if done.is_dir() else []:
        if marker.stem not in present:
            marker.unlink()
            gone.add(marker.stem)
    return sorted(gone)


@contextmanager
def plate_lock(plan: PlatePlan) -> Iterator[None]:
    """One run per plate at a time, refused at once if another run holds the plate: the
    plate's own write lock (`plate_write_lock`, shared with every command that writes to it)
    and one on its tables folder (two plates of one name may share one).

    `filelock` takes an OS lock (flock, or msvcrt on Windows) that dies with its holder, so a
    killed run never blocks the next one.  It owns the lock file, so who holds it goes in a
    small file beside it for the refusal message.
    """
    folder = bookkeeping_dir(plan.output_root) / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    lock, holder = (folder / f"{safe_name(plan.plate_name)}{ext}" for ext in (".lock", ".holder"))
    with (
        plate_write_lock(plan.plate_url, "process"),
        exclusive(lock, holder, holder_note="", name=plan.plate_name),
    ):
        yield


def _check_finite(image: np.ndarray, plate: Plate, ref: FieldRef, channel: str) -> None:
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        bad = int((~np.isfinite(image)).sum())
        raise InputDataError(
            f"plate {plate.name} well {ref.well} field {ref.field} channel {channel!r}: "
            f"{bad} NaN/infinite pixel(s); fix or mask the image before segmenting"
        )


def _count(labels: np.ndarray) -> int:
    ids = np.unique(labels)
    return int((ids > 0).sum())


def schema(plan: PlatePlan) -> list[str]:
    """Identifier + feature columns every per-cell file of the plate has, in order.

    Fields lacking a channel get NaN there, so all files of a plate share one schema and
    readers can concatenate them without schema merging.
    """
    tokens = tuple(channel_token(c) for c in plan.measure_channels)
    return [*object_metadata_columns(), *feature_columns(tokens)]


def qc_schema(plan: PlatePlan) -> list[str]:
    """Columns of every image-QC file of the plate: keys, counts, metrics, then the boolean
    flags (``Image_ImageQuality_Saturated_<Ch>``) per channel."""
    quality = [
        f"Image_ImageQuality_{k}_{channel_token(c)}"
        for c in plan.measure_channels
        for k in (*QUALITY_FEATURES, *QUALITY_FLAGS)
    ]
    return [
        *FIELD_METADATA,
        "Image_Count_Nuclei",
        "Image_Count_Cells",
        "Image_Width",
        "Image_Height",
        "Metadata_SegmentationPixelSize",
        *quality,
    ]


def segmentation_pixel_size(
    nucleus: np.ndarray, pixel_size_um: float, config: ProcessConfig
) -> float:
    """Pixel size the classical methods work at: the field's own scale (its estimated nucleus
    diameter taken as the typical one) unless told to trust the metadata or given a value."""
    if config.scale == "metadata" or config.pixel_size_um is not None:
        return pixel_size_um
    return pixel_size_from_objects(nucleus, config.typical_nucleus_um) or pixel_size_um


def make_segmenter(
    compartment: str, method: str, model: str | None, store: str | None, config: ProcessConfig
) -> Segmenter:
    """The classical baseline with the run's options, or a stored model with its card."""
    if model is None:
        card = {"weights": "nuclei" if compartment == "nuclei" else "cyto"}
        return Segmenter(method, card=card, nuclei_options=config.nuclei, cell_options=config.cells)
    state, card = load_model(store or "", model)
    return Segmenter(method, state=state, card=card)


def _segmenter(plan: PlatePlan, compartment: str, config: ProcessConfig) -> Segmenter:
    method = config.nuclei_method if compartment == "nuclei" else config.cells_method
    model = plan.nuclei_model if compartment == "nuclei" else plan.cells_model
    return make_segmenter(compartment, method, model, plan.model_store, config)


def readable_channels(wanted: list[str], present: list[str]) -> list[str]:
    """Channel names to read for `wanted`: a missing stain is read from its virtual channel."""
    return [
        c if c in present or f"{c}{VIRTUAL_SUFFIX}" not in present else f"{c}{VIRTUAL_SUFFIX}"
        for c in wanted
    ]


def segmenter_input(
    segmenter: Segmenter, plate: Plate, ref: FieldRef, fallback: np.ndarray | None
) -> np.ndarray | None:
    """The image a segmenter reads: its model's input channels, else the fallback image."""
    names = (segmenter.card or {}).get("input_channels")
    if not names:
        return fallback
    return plate.read_channels(ref, readable_channels(list(names), plate.channel_names(ref)))


@dataclass
class SegmentedField:
    """One field's labels and the images they came from (kept for measuring)."""

    nuclei: np.ndarray
    cells: np.ndarray
    images: dict[str, np.ndarray]
    nucleus_channel: str
    pixel_size_um: float
    segmentation_pixel_size_um: float


def segment_field(
    plate: Plate,
    ref: FieldRef,
    *,
    nucleus_channel: str,
    cell_channel: str | None,
    nuclei_seg: Segmenter,
    cells_seg: Segmenter,
    config: ProcessConfig,
    extra_channels: list[str] | None = None,
) -> SegmentedField:
    """Nuclei then cells of one field, as a plate run (and its quality gate) does them."""
    names = plate.channel_names(ref)
    nucleus = readable_channels([nucleus_channel], names)[0]
    wanted = list(dict.fromkeys([*(extra_channels or []), nucleus, cell_channel or nucleus]))
    images = dict(zip(wanted, plate.read_channels(ref, wanted), strict=True))
    for name, image in images.items():
        _check_finite(image, plate, ref, name)
    px = config.pixel_size_um or plate.pixel_size_um(ref)
    # a field larger than a tile has its scale read off its central tile: the estimate is a
    # median over thousands of nuclei there, and memory stays bounded by a tile
    seg_px = segmentation_pixel_size(central_crop(images[nucleus], config.tile_size), px, config)
    nuclei = nuclei_seg.nuclei(
        segmenter_input(nuclei_seg, plate, ref, images[nucleus]),
        pixel_size_um=seg_px,
        tile_size=config.tile_size,
    )
    cell_image = images[cell_channel] if cell_channel else None
    cells = cells_seg.cells(
        nuclei,
        segmenter_input(cells_seg, plate, ref, cell_image),
        pixel_size_um=seg_px,
        tile_size=config.tile_size,
    )
    return SegmentedField(nuclei, cells, images, nucleus, px, seg_px)


def process_well(
    plan: PlatePlan,
    well: str,
    config: ProcessConfig,
    *,
    run_id: str | None = None,
    on_field: Callable[[FieldRef], None] | None = None,
) -> WellResult:
    """Segment, write labels, measure and QC every field of one well."""
    plate = open_plate(plan.plate_url, mode="r+")
    refs = plate.fields(well)
    cell_tables: list[pd.DataFrame] = []
    qc_rows: list[dict[str, Any]] = []
    tokens = {c: channel_token(c) for c in plan.measure_channels}
    nuclei_seg = _segmenter(plan, "nuclei", config)
    cells_seg = _segmenter(plan, "cells", config)
    for ref in refs:
        remove_stale_temporaries(plate, ref)
        present = [c for c in plan.measure_channels if c in plate.channel_names(ref)]
        seg = segment_field(
            plate,
            ref,
            nucleus_channel=plan.nucleus_channel,
            cell_channel=plan.cell_channel,
            nuclei_seg=nuclei_seg,
            cells_seg=cells_seg,
            config=config,
            extra_channels=present,
        )
        nuclei, cells, images, nucleus = seg.nuclei, seg.cells, seg.images, seg.nucleus_channel
        provenance = {
            "nucleus_channel": nucleus,
            "nuclei_method": config.nuclei_method,
            "nuclei_model": plan.nuclei_model,
            "cells_method": config.cells_method,
            "cells_model": plan.cells_model,
        }
        write_labels(plate, ref, "nuclei", nuclei, properties=provenance)
        write_labels(plate, ref, "cells", cells, properties={**provenance, "parent": "nuclei"})

        features = measure_objects_tiled(
            nuclei,
            cells,
            {tokens[c]: images[c] for c in present},
            tile_size=config.tile_size,
            pixel_size_um=seg.pixel_size_um,
            # the nucleus size the segmentation expected at the scale it worked at
            typical_diameter_px=config.typical_nucleus_um / seg.segmentation_pixel_size_um,
        )
        meta = {
            "Metadata_Plate": plan.plate_name,
            "Metadata_Well": ref.well,
            "Metadata_Site": ref.site,
            "Metadata_ImagePath": f"{plan.plate_url}/{ref.path}",
            "Metadata_NucleusChannel": nucleus,
            "Metadata_NucleusChannelSource": (
                "virtual" if nucleus.endswith(VIRTUAL_SUFFIX) else "measured"
            ),
            "Metadata_NucleiModel": plan.nuclei_model or config.nuclei_method,
            "Metadata_CellsModel": plan.cells_model or config.cells_method,
        }
        # typed columns, so a field without cells keeps the schema (Metadata_Site int64)
        features = pd.concat(
            [pd.DataFrame({k: np.full(len(features), v) for k, v in meta.items()}), features],
            axis=1,
        )
        cell_tables.append(features.reindex(columns=[*meta, *schema(plan)]))

        qc: dict[str, Any] = dict(meta)
        qc["Image_Count_Nuclei"] = _count(nuclei)
        qc["Image_Count_Cells"] = _count(cells)
        qc["Image_Width"], qc["Image_Height"] = int(nuclei.shape[1]), int(nuclei.shape[0])
        # the scale the classical methods worked at (µm/px), estimated or from metadata
        qc["Metadata_SegmentationPixelSize"] = float(seg.segmentation_pixel_size_um)
        for name in plan.measure_channels:  # a channel the field lacks has nothing saturated
            qc.update(quality_columns(dict.fromkeys(QUALITY_FLAGS, False), tokens[name]))
        for name in present:
            image = images[name]
            sat = (
                float(np.iinfo(image.dtype).max) if np.issubdtype(image.dtype, np.integer) else None
            )
            metrics = image_quality(image, saturation_value=sat)
            flags = quality_flags(metrics, saturation_fraction=config.saturation_fraction)
            if flags["Saturated"]:
                log.warning(
                    "plate %s well %s field %s channel %r: %.1f%% of pixels saturated (at %s), "
                    "over the %g%% limit (saturation_fraction): clipped nuclei merge and "
                    "intensities are floors; the QC column %s is True",
                    plan.plate_name,
                    ref.well,
                    ref.field,
                    name,
                    metrics["PercentMaximal"],
                    "the image maximum" if sat is None else f"{sat:g}",
                    100 * config.saturation_fraction,
                    f"Image_ImageQuality_Saturated_{tokens[name]}",
                )
            qc.update(quality_columns({**metrics, **flags}, tokens[name]))
        qc_rows.append(qc)
        if on_field:
            on_field(ref)

    cells_df = pd.concat(cell_tables, ignore_index=True)
    qc_df = pd.DataFrame(qc_rows).reindex(columns=qc_schema(plan))
    px = config.pixel_size_um or plate.pixel_size_um(refs[0])
    file_meta = {
        "flow_run_id": run_id or "",
        "plate_url": plan.plate_url,
        "source_labels": [f"{r.path}/labels/nuclei" for r in refs]
        + [f"{r.path}/labels/cells" for r in refs],
        "channel_tokens": tokens,
        "pixel_size_um": px,
        "units": "pixels (Location, AreaShape); multiply by pixel_size_um for micrometres",
        "site_index": "0-based position of the field in the well's images list",
    }
    cells_path = write_well_table(
        cells_df, plan.output_root, "cells", plate=plan.plate_name, well=well, metadata=file_meta
    )
    # each field's cells also inside the plate, where ngio and Fractal list tables
    write_well_field_tables(plan.plate_url, refs, cells_df, source=cells_path)
    paths = [
        cells_path,
        write_well_table(
            qc_df,
            plan.output_root,
            "image_qc",
            plate=plan.plate_name,
            well=well,
            metadata=file_meta,
        ),
    ]
    _mark_done(plan, well, paths, well_stamps(plate, well), run_id)
    return WellResult(
        well=well,
        n_fields=len(refs),
        n_cells=len(cells_df),
        qc=qc_rows,
        tables=[str(p) for p in paths],
    )


def summarise_wells(image_qc: pd.DataFrame) -> pd.DataFrame:
    """Per-well QC: counts summed, quality metrics averaged over fields."""
    if image_qc.empty:
        return image_qc
    keys = ["Metadata_Plate", "Metadata_Well"]
    numeric = [
        c
        for c in image_qc.columns
        if c.startswith("Image_") and pd.api.types.is_numeric_dtype(image_qc[c])
    ]
    counts = [c for c in numeric if c.startswith("Image_Count_")]
    quality = [c for c in numeric if c not in counts and c not in ("Image_Width", "Image_Height")]
    grouped = image_qc.groupby(keys, sort=True)
    out = grouped[counts].sum()
    out = out.join(grouped[quality].mean())
    out.insert(0, "Metadata_FieldCount", grouped.size())
    return out.reset_index()


def finalize_plate(plan: PlatePlan, *, run_id: str | None = None) -> pd.DataFrame:
    """Write the per-well QC summary of the plate from the per-well QC files.

    Virtual-staining QC (PCC, marker FN/FP on fields with the real stain) joins in as
    per-well means when that step ran.
    """
    summary = summarise_wells(read_table(plan.output_root, "image_qc", plan.plate_name))
    virtual = read_table(plan.output_root, "virtual_stain_qc", plan.plate_name)
    scores = [c for c in virtual.columns if c.startswith("Image_VirtualStain_")]
    if not summary.empty and scores:
        keys = ["Metadata_Plate", "Metadata_Well"]
        means = virtual.groupby(keys)[scores].mean().reset_index()
        summary = summary.merge(means, on=keys, how="left")
    write_parquet(
        summary,
        Path(plan.output_root) / "well_qc" / f"{safe_name(plan.plate_name)}.parquet",
        metadata={"flow_run_id": run_id or "", "plate_url": plan.plate_url},
    )
    return summary
