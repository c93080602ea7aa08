"""Demo plates: real example images when ../shared/data is present, synthetic otherwise.

The synthetic plate renders cells (cytoplasm stain) around nuclei (DNA stain) with
known positions, so a fresh machine can run the whole pipeline without any download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from hcsseg.io.plate import Plate
from hcsseg.io.tiff_import import ImportOptions, import_tiff_folder, plate_from_arrays


def synthetic_field(
    rng: np.random.Generator, shape: tuple[int, int] = (512, 512), n_cells: int = 40
) -> np.ndarray:
    """A ``(2, Y, X)`` uint16 field: DNA and cytoplasm stains of touching round cells."""
    centres = rng.uniform(24, np.array(shape) - 24, size=(n_cells, 2))
    nuc = np.zeros(shape, np.float32)
    cyto = np.zeros(shape, np.float32)
    for cy, cx in centres:
        r_n = rng.uniform(6, 10)
        r_c = r_n * rng.uniform(1.8, 2.4)
        y0, y1 = int(max(cy - r_c - 1, 0)), int(min(cy + r_c + 2, shape[0]))
        x0, x1 = int(max(cx - r_c - 1, 0)), int(min(cx + r_c + 2, shape[1]))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d2 = (yy - cy) ** 2 + (xx - cx) ** 2
        window = (slice(y0, y1), slice(x0, x1))
        nuc[window] = np.maximum(nuc[window], (d2 <= r_n**2) * rng.uniform(0.6, 1.0))
        cyto[window] = np.maximum(cyto[window], (d2 <= r_c**2) * rng.uniform(0.3, 0.6))
    nuc = ndi.gaussian_filter(nuc, 1.5)
    cyto = ndi.gaussian_filter(cyto, 2.0) + 0.3 * nuc
    out = []
    for img in (nuc, cyto):
        noisy = img * 3000 + 200 + rng.normal(0, 40, shape)
        out.append(np.clip(noisy, 0, 65535).astype(np.uint16))
    return np.stack(out)


def synthetic_plate(
    out: str | Path,
    *,
    wells: tuple[str, ...] = ("B02", "B03", "C02", "C03"),
    fields_per_well: int = 2,
    shape: tuple[int, int] = (512, 512),
    seed: int = 0,
    version: str = "0.5",
    overwrite: bool = True,
) -> Plate:
    rng = np.random.default_rng(seed)
    items = [
        ((w[0], int(w[1:])), synthetic_field(rng, shape))
        for w in wells
        for _ in range(fields_per_well)
    ]
    return plate_from_arrays(
        out,
        name="demo-synthetic",
        fields=items,
        channels=["DNA", "Cytoplasm"],
        pixel_size_um=0.65,
        version=version,  # type: ignore[arg-type]
        overwrite=overwrite,
    )


def demo_plate(out: str | Path, *, shared_data: Path | None = None) -> Plate:
    """CellProfiler's ExampleHuman field when the shared data is there, else synthetic."""
    source = (shared_data or Path()) / "cellprofiler-human"
    if shared_data is not None and source.is_dir():
        return import_tiff_folder(
            source,
            out,
            options=ImportOptions(
                channel_names={"0": "DNA", "1": "PH3", "2": "Cells"}, pixel_size_um=0.65
            ),
            overwrite=True,
        )
    return synthetic_plate(out)
