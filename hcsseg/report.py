"""Per-well QC as a self-contained markdown plate report (heat maps as embedded PNGs).

Pure: a DataFrame in, a markdown string out. The PNGs are base64 ``data:`` URIs, so the
report renders anywhere markdown does (a Prefect markdown artifact, a notebook, a
browser) with no file next to it. matplotlib is used through its object API on the Agg
canvas: no pyplot state, safe in worker threads.
"""

from __future__ import annotations

import base64
import io
import math
import re
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from hcsseg.errors import HcssegError, InputDataError
from hcsseg.io.plate import parse_well

WELL_COLUMN = "Metadata_Well"
COUNT_COLUMN = "Image_Count_Cells"
FOCUS_PREFIX = "Image_ImageQuality_FocusScore_"
PCC_PATTERN = re.compile(r"(^|_)PCC(_|$)")
PLATE_FORMATS: dict[str, tuple[int, int]] = {"96": (8, 12), "384": (16, 24), "1536": (32, 48)}

PlateFormat = Literal["auto", "96", "384", "1536"]


class ReportOptions(BaseModel):
    """What the plate report shows."""

    model_config = ConfigDict(extra="forbid")

    metrics: list[str] | None = Field(
        None,
        description="columns to map; default: cell count, focus score per channel and any "
        "virtual-staining PCC column",
    )
    plate_format: PlateFormat = Field(
        "auto", description="well grid; auto: the smallest of 96/384/1536 holding every well"
    )
    outlier_z: float = Field(
        3.5, gt=0, description="flag wells whose robust z-score (median/MAD) exceeds this"
    )
    dpi: int = Field(80, ge=30, le=300, description="heat map resolution")


def row_index(letters: str) -> int:
    """``A`` -> 0, ``Z`` -> 25, ``AA`` -> 26 (1536-well rows run to ``AF``)."""
    index = 0
    for ch in letters.upper():
        index = index * 26 + (ord(ch) - ord("A") + 1)
    return index - 1


def row_label(index: int) -> str:
    label = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        label = chr(ord("A") + rem) + label
    return label


def default_metrics(columns: list[str]) -> list[str]:
    metrics = [COUNT_COLUMN] if COUNT_COLUMN in columns else []
    metrics += sorted(c for c in columns if c.startswith(FOCUS_PREFIX))
    metrics += sorted(c for c in columns if PCC_PATTERN.search(c) and c not in metrics)
    return metrics


def metric_title(column: str) -> str:
    if column == COUNT_COLUMN:
        return "Cell count"
    if column.startswith(FOCUS_PREFIX):
        return f"Focus score ({column.removeprefix(FOCUS_PREFIX)})"
    if PCC_PATTERN.search(column):
        return f"Virtual staining PCC ({column})"
    return column


def _positions(wells: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = [], []
    for well in wells:
        try:
            letters, column = parse_well(str(well))
        except HcssegError as exc:
            raise InputDataError(f"{WELL_COLUMN}: {exc}") from exc
        rows.append(row_index(letters))
        cols.append(column - 1)
    return np.asarray(rows), np.asarray(cols)


def plate_shape(rows: np.ndarray, cols: np.ndarray, plate_format: PlateFormat) -> tuple[int, int]:
    need = (int(rows.max()) + 1, int(cols.max()) + 1)
    if plate_format != "auto":
        shape = PLATE_FORMATS[plate_format]
        if need[0] > shape[0] or need[1] > shape[1]:
            raise InputDataError(
                f"wells up to row {row_label(need[0] - 1)} column {need[1]} do not fit a "
                f"{plate_format}-well plate ({shape[0]} x {shape[1]})"
            )
        return shape
    for shape in PLATE_FORMATS.values():
        if need[0] <= shape[0] and need[1] <= shape[1]:
            return shape
    return need


def heat_map_png(grid: np.ndarray, present: np.ndarray, *, title: str, dpi: int = 80) -> bytes:
    """One plate map: colour = value, grey = well with no value (NaN), white = no well."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    n_rows, n_cols = grid.shape
    cell = 0.32 if n_cols <= 12 else 0.2 if n_cols <= 24 else 0.12
    fig = Figure(figsize=(max(4.0, n_cols * cell + 1.6), max(2.4, n_rows * cell + 0.9)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    finite = np.isfinite(grid)
    if finite.any():
        lo, hi = float(np.nanmin(grid)), float(np.nanmax(grid))
        image = ax.imshow(
            np.ma.masked_invalid(grid),
            cmap="viridis",
            vmin=lo,
            vmax=hi if hi > lo else lo + 1e-9,
            interpolation="nearest",
        )
        fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    nan_wells = np.where(present & ~finite, 1.0, np.nan)
    ax.imshow(
        np.ma.masked_invalid(nan_wells),
        cmap=ListedColormap(["#b0b0b0"]),
        interpolation="nearest",
    )
    ax.set_xlim(-0.5, n_cols - 0.5)
    ax.set_ylim(n_rows - 0.5, -0.5)
    step = 1 if n_cols <= 24 else 4
    ax.set_xticks(np.arange(0, n_cols, step), [str(c + 1) for c in range(0, n_cols, step)])
    ax.set_yticks(
        np.arange(0, n_rows, 1 if n_rows <= 16 else 2),
        [row_label(r) for r in range(0, n_rows, 1 if n_rows <= 16 else 2)],
    )
    ax.set_xticks(np.arange(-0.5, n_cols), minor=True)
    ax.set_yticks(np.arange(-0.5, n_rows), minor=True)
    ax.grid(which="minor", color="#dddddd", linewidth=0.5)
    ax.tick_params(which="both", labelsize=7, length=0)
    ax.set_title(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.4g}"


def _robust_z(values: pd.Series) -> pd.Series:
    median = values.median()
    mad = 1.4826 * (values - median).abs().median()
    if not math.isfinite(mad) or mad == 0:
        return pd.Series(0.0, index=values.index)
    return (values - median) / mad


def _check(well_qc: pd.DataFrame, metrics: list[str]) -> None:
    if WELL_COLUMN not in well_qc.columns:
        raise InputDataError(
            f"per-well QC table has no {WELL_COLUMN} column; columns: {list(well_qc.columns)}"
        )
    if well_qc.empty:
        raise InputDataError("per-well QC table is empty: no wells to report")
    if "Metadata_Plate" in well_qc.columns and well_qc["Metadata_Plate"].nunique() > 1:
        raise InputDataError(
            f"per-well QC table holds {well_qc['Metadata_Plate'].nunique()} plates; "
            "report one plate at a time"
        )
    dupes = well_qc[WELL_COLUMN][well_qc[WELL_COLUMN].duplicated()].unique().tolist()
    if dupes:
        raise InputDataError(f"wells {dupes} appear more than once in the per-well QC table")
    missing = [m for m in metrics if m not in well_qc.columns]
    if missing:
        raise InputDataError(
            f"metrics {missing} not in the per-well QC table; columns: {list(well_qc.columns)}"
        )
    wrong = [m for m in metrics if not pd.api.types.is_numeric_dtype(well_qc[m])]
    if wrong:
        raise InputDataError(f"metrics {wrong} are not numeric")


def plate_report(
    well_qc: pd.DataFrame, *, plate_name: str | None = None, options: ReportOptions | None = None
) -> str:
    """Markdown with a heat map, summary and outlier wells per QC metric."""
    options = options or ReportOptions()
    metrics = (
        options.metrics if options.metrics is not None else default_metrics(list(well_qc.columns))
    )
    _check(well_qc, metrics)
    well_qc = well_qc.reset_index(drop=True)
    if plate_name is None and "Metadata_Plate" in well_qc.columns:
        plate_name = str(well_qc["Metadata_Plate"].iloc[0])
    rows, cols = _positions(well_qc[WELL_COLUMN])
    shape = plate_shape(rows, cols, options.plate_format)
    present = np.zeros(shape, bool)
    present[rows, cols] = True
    wells = well_qc[WELL_COLUMN].astype(str).tolist()

    lines = [f"# Plate report: {plate_name or 'plate'}", ""]
    summary = f"{len(wells)} wells with data on a {shape[0]} x {shape[1]} grid"
    if "Metadata_FieldCount" in well_qc.columns:
        summary += f", {int(well_qc['Metadata_FieldCount'].fillna(0).sum())} fields"
    if COUNT_COLUMN in well_qc.columns:
        summary += f", {int(well_qc[COUNT_COLUMN].fillna(0).sum())} cells"
    lines += [summary + ". Grey: well without a value; white: no data.", ""]
    if not metrics:
        lines += ["No QC metric columns found (cell counts, focus scores, PCC).", ""]
    for metric in metrics:
        values = pd.to_numeric(well_qc[metric], errors="coerce").astype(float)
        values = values.where(np.isfinite(values))
        grid = np.full(shape, np.nan)
        grid[rows, cols] = values.to_numpy()
        png = heat_map_png(grid, present, title=metric_title(metric), dpi=options.dpi)
        uri = base64.b64encode(png).decode("ascii")
        lines += [f"## {metric_title(metric)}", "", f"![{metric}](data:image/png;base64,{uri})", ""]
        valid = values.dropna()
        if valid.empty:
            lines += ["No well has a value.", ""]
            continue
        z = _robust_z(valid)
        lo, hi = valid.idxmin(), valid.idxmax()
        lines += [
            "| median | min | max | wells without value |",
            "|---|---|---|---|",
            f"| {_fmt(valid.median())} | {_fmt(valid[lo])} ({wells[lo]}) "
            f"| {_fmt(valid[hi])} ({wells[hi]}) | {len(values) - len(valid)} |",
            "",
        ]
        outliers = z[z.abs() > options.outlier_z].sort_values(key=abs, ascending=False)
        if len(outliers):
            flagged = ", ".join(f"{wells[i]} (z={z[i]:+.1f})" for i in outliers.index)
            lines += [f"Outlier wells (|robust z| > {options.outlier_z:g}): {flagged}", ""]
    return "\n".join(lines)
