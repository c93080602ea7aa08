"""Virtual staining inside a plate run: the isl-phase-dapi field as a partly stained plate.

The 512 x 1024 field is cut into 8 fields of 256² over 4 wells (13 phase z-planes each);
DAPI is kept in wells B02 and B03 and removed from C02 and C03. `process_plate` with the
default virtual-staining options then trains on the stained fields (one of them held back
for validation), writes `DAPI_virtual` into every field and segments nuclei from it where
DAPI is missing. We report the plate's own QC table and, because this benchmark knows the
DAPI it removed, also score the unstained fields against it (with the smoothed-phase
baseline in the same run). Real markers there are found on the whole field's DAPI scale
(its 1st/99.8th percentiles): some 256² tiles hold no nucleus, and their own percentiles
would turn noise into reference markers.

    python bench/virtual_stain_plate.py [--threads 1] [--steps 600]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from virtual_stain import baseline  # the same baseline as bench/virtual_stain.py

from hcsseg.config import ProcessConfig
from hcsseg.export.tables import read_table
from hcsseg.io.plate import open_plate
from hcsseg.io.plate_writer import ChannelSpec, append_channel
from hcsseg.io.tiff_import import plate_from_arrays
from hcsseg.markers.qc import marker_qc
from hcsseg.virtual_stain.model import to_storage
from hcsseg.virtual_stain.options import VIRTUAL_RANGE, VirtualStainOptions
from hcsseg.virtual_stain.plate import VirtualStainConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "isl-phase-dapi"
RESULTS = Path(__file__).resolve().parent / "results"
PX = 0.5
TILES = [(y, x) for y in (0, 256) for x in (0, 256, 512, 768)]
WELLS = [("B", 2), ("B", 2), ("B", 3), ("B", 3), ("C", 2), ("C", 2), ("C", 3), ("C", 3)]
STAINED = ("B02", "B03")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # The embedded Prefect server needs more than the default 20 s to start on a busy machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.process_plate import process_plate

    names = json.loads((DATA / "channels.json").read_text())["channels"]
    data = tifffile.imread(DATA / "field_A4.tif")
    phase_names = [n for n in names if n.startswith("PHASE")]
    phase = data[[names.index(n) for n in phase_names]]
    dapi = data[names.index("DAPI")]
    dapi_range = tuple(float(v) for v in np.percentile(dapi, (1.0, 99.8)))
    hidden = {}
    with tempfile.TemporaryDirectory() as tmp:
        plate = plate_from_arrays(
            Path(tmp) / "isl.zarr",
            name="isl",
            fields=[
                (w, phase[:, y : y + 256, x : x + 256])
                for w, (y, x) in zip(WELLS, TILES, strict=True)
            ],
            channels=phase_names,
            pixel_size_um=PX,
        )
        writable = open_plate(plate.url, mode="r+")
        for ref, (y, x) in zip(writable.iter_fields(), TILES, strict=True):
            tile = dapi[y : y + 256, x : x + 256]
            if ref.well in STAINED:
                append_channel(writable, ref, ChannelSpec("DAPI"), tile)
            else:
                hidden[ref.path] = tile
        options = VirtualStainOptions(source_channels=phase_names)
        options.training.n_steps = args.steps
        config = ProcessConfig(
            nucleus_channel="DAPI", virtual_stain=VirtualStainConfig(model=options)
        )
        t0, c0 = time.perf_counter(), time.process_time()
        result = process_plate(plate.url, config)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        qc = read_table(result["output"], "virtual_stain_qc")
        cells = read_table(result["output"], "cells")
        plate = open_plate(plate.url)
        unstained = []
        for ref in plate.iter_fields():
            if ref.path not in hidden:
                continue
            virtual = plate.read_channels(ref, ["DAPI_virtual"])[0]
            stored_range = tuple(to_storage(np.array(VIRTUAL_RANGE), virtual.dtype).astype(float))
            base = baseline(plate.read_channels(ref, phase_names))
            real = hidden[ref.path]
            unstained.append(
                {
                    "field": ref.path,
                    "model": marker_qc(
                        virtual,
                        real,
                        pixel_size_um=PX,
                        virtual_range=stored_range,
                        real_range=dapi_range,
                    ),
                    "baseline": marker_qc(base, real, pixel_size_um=PX, real_range=dapi_range),
                }
            )
    cols = [
        "Metadata_Well",
        "Metadata_Site",
        "Metadata_VirtualStainRole",
        "Image_VirtualStain_PCC_DAPI",
        "Image_VirtualStain_MarkerFNRate",
        "Image_VirtualStain_MarkerFPRate",
    ]
    qc_rows = qc[[c for c in cols if c in qc.columns]].to_dict(orient="records")
    nuclei = cells.groupby(["Metadata_Well", "Metadata_NucleusChannelSource"]).size()

    def pooled(kind: str) -> dict[str, float]:
        real = sum(r[kind]["n_markers_real"] for r in unstained)
        virt = sum(r[kind]["n_markers_virtual"] for r in unstained)
        matched = sum(r[kind]["n_matched"] for r in unstained)
        return {
            "pcc_mean": float(np.mean([r[kind]["pcc"] for r in unstained])),
            "fn_rate": 1 - matched / real if real else float("nan"),
            "fp_rate": 1 - matched / virt if virt else float("nan"),
            "n_markers_real": real,
        }

    out = {
        "plate": "isl-phase-dapi as 8 fields of 256², DAPI in B02/B03 only",
        "pixel_size_um": PX,
        "steps": args.steps,
        "torch_threads": args.threads,
        "process_plate_wall_seconds": wall,
        "process_plate_cpu_seconds": cpu,
        "load_average_after": os.getloadavg(),
        "qc_table": qc_rows,
        "nuclei_per_well_and_source": {f"{w} ({s})": int(n) for (w, s), n in nuclei.items()},
        "unstained_fields_against_removed_dapi": unstained,
        "unstained_pooled": {"model": pooled("model"), "baseline": pooled("baseline")},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "virtual_stain_plate.json").write_text(json.dumps(out, indent=2, default=float))
    lines = [
        "# Virtual staining inside process_plate (isl-phase-dapi, DAPI removed from 2 wells)",
        "",
        f"process_plate: {wall:.0f} s wall, {cpu:.0f} s CPU ({args.threads} torch thread, "
        f"{args.steps} training steps). Marker matching within 15 µm.",
        "",
        "QC table written by the run (fields that still have DAPI):",
        "",
        "| well | site | role | PCC | marker FN | marker FP |",
        "|---|---|---|---|---|---|",
    ]
    for r in qc_rows:
        if np.isfinite(r.get("Image_VirtualStain_PCC_DAPI", np.nan)):
            lines.append(
                f"| {r['Metadata_Well']} | {r['Metadata_Site']} | "
                f"{r['Metadata_VirtualStainRole']} | {r['Image_VirtualStain_PCC_DAPI']:.3f} | "
                f"{r['Image_VirtualStain_MarkerFNRate']:.3f} | "
                f"{r['Image_VirtualStain_MarkerFPRate']:.3f} |"
            )
    m, b = out["unstained_pooled"]["model"], out["unstained_pooled"]["baseline"]
    lines += [
        "",
        "Unstained wells C02/C03 scored against the DAPI this benchmark removed "
        f"({int(m['n_markers_real'])} real markers), model / smoothed-phase baseline:",
        "",
        "| PCC | marker FN | marker FP |",
        "|---|---|---|",
        f"| {m['pcc_mean']:.3f} / {b['pcc_mean']:.3f} | {m['fn_rate']:.3f} / {b['fn_rate']:.3f} "
        f"| {m['fp_rate']:.3f} / {b['fp_rate']:.3f} |",
        "",
        "Nuclei per well (nucleus channel source): "
        + ", ".join(f"{k}: {v}" for k, v in out["nuclei_per_well_and_source"].items()),
    ]
    (RESULTS / "virtual_stain_plate.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
