"""Small real plates built from ../shared/data for pipeline tests."""

from __future__ import annotations

import json
from pathlib import Path

import tifffile

from hcsseg.io.plate import Plate, open_plate
from hcsseg.io.plate_writer import ChannelSpec, append_channel
from hcsseg.io.tiff_import import plate_from_arrays

ISL_TILE = 256


def isl_partly_stained(
    isl: Path,
    out: Path,
    *,
    stained: tuple[str, ...] = ("B02", "B03"),
    phase_planes: tuple[int, ...] = (2, 6, 10),
) -> Plate:
    """The isl-phase-dapi field as 8 fields of 256² in 4 wells, unannotated: phase planes and
    MAP2 everywhere, DAPI only in the `stained` wells (the annotation-free scenario)."""
    names = json.loads((isl / "channels.json").read_text())["channels"]
    data = tifffile.imread(isl / "field_A4.tif")
    phase = [n for n in names if n.startswith("PHASE")]
    sources = [phase[i] for i in phase_planes] + ["MAP2"]
    stack = data[[names.index(n) for n in sources]]
    dapi = data[names.index("DAPI")]
    tiles = [(y, x) for y in (0, ISL_TILE) for x in range(0, dapi.shape[1], ISL_TILE)][:8]
    wells = [("B", 2), ("B", 2), ("B", 3), ("B", 3), ("C", 2), ("C", 2), ("C", 3), ("C", 3)]
    plate = plate_from_arrays(
        out,
        name=out.stem,
        fields=[
            (w, stack[:, y : y + ISL_TILE, x : x + ISL_TILE])
            for w, (y, x) in zip(wells, tiles, strict=True)
        ],
        channels=sources,
        pixel_size_um=0.5,
    )
    writable = open_plate(plate.url, mode="r+")
    for ref, (y, x) in zip(writable.iter_fields(), tiles, strict=True):
        if ref.well in stained:
            append_channel(
                writable, ref, ChannelSpec("DAPI"), dapi[y : y + ISL_TILE, x : x + ISL_TILE]
            )
    return open_plate(plate.url)
