"""Markdown reports: per-well QC heat maps, training curves, the models and quality gate.

Pure: a DataFrame (or a model card, or gate verdicts) in, a markdown string out. The PNGs
are base64 ``data:`` URIs, so a report renders anywhere markdown does (a Prefect markdown
artifact, a notebook, a browser) with no file next to it. matplotlib is used through its
object API on the Agg canvas: no pyplot state, safe in worker threads.
"""

from __future__ import annotations

import base64
import io
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from hcsseg.errors import HcssegError, InputDataError
from hcsseg.io.plate import parse_well

WELL_COLUMN = "Metadata_Well"
COUNT_COLUMN = "Image_Count_Cells"
FOCUS_PREFIX = "Image_ImageQuality_FocusScore_"
SATURATED_PREFIX = "Image_ImageQuality_Saturated_"
MAX_SATURATED_ROWS = 48  # longer lists are cut: a plate saturated everywhere needs no list
PCC_PATTERN = re.compile(r"(^|_)PCC(_|$)")
MARKER_FN_COLUMN = "Image_VirtualStain_MarkerFNRate"
MARKER_FP_COLUMN = "Image_VirtualStain_MarkerFPRate"
MISSING = "–"
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
    metrics += [c for c in (MARKER_FN_COLUMN, MARKER_FP_COLUMN) if c in columns]
    return metrics


def metric_title(column: str) -> str:
    if column == COUNT_COLUMN:
        return "Cell count"
    if column.startswith(FOCUS_PREFIX):
        return f"Focus score ({column.removeprefix(FOCUS_PREFIX)})"
    if PCC_PATTERN.search(column):
        return f"Virtual staining PCC ({column})"
    if column == MARKER_FN_COLUMN:
        return "Virtual staining marker FN rate (real nuclei without a virtual marker)"
    if column == MARKER_FP_COLUMN:
        return "Virtual staining marker FP rate (virtual markers without a real nucleus)"
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


def _plate_sections(
    well_qc: pd.DataFrame, plate_name: str | None, options: ReportOptions
) -> tuple[str, list[str], list[str]]:
    """Plate name, summary lines and per-metric sections, so other reports can put their
    own sections between the summary and the heat maps."""
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

    summary = f"{len(wells)} wells with data on a {shape[0]} x {shape[1]} grid"
    if "Metadata_FieldCount" in well_qc.columns:
        summary += f", {int(well_qc['Metadata_FieldCount'].fillna(0).sum())} fields"
    if COUNT_COLUMN in well_qc.columns:
        summary += f", {int(well_qc[COUNT_COLUMN].fillna(0).sum())} cells"
    head = [summary + ". Grey: well without a value; white: no data.", ""]
    head += saturation_lines(well_qc)
    lines: list[str] = []
    if not metrics:
        lines += ["No QC metric columns found (cell counts, focus scores, PCC).", ""]
    for metric in metrics:
        values = pd.to_numeric(well_qc[metric], errors="coerce").astype(float)
        values = values.where(np.isfinite(values))
        grid = np.full(shape, np.nan)
        grid[rows, cols] = values.to_numpy()
        png = heat_map_png(grid, present, title=metric_title(metric), dpi=options.dpi)
        lines += [f"## {metric_title(metric)}", "", f"![{metric}]({png_data_uri(png)})", ""]
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
    return plate_name or "plate", head, lines


def saturated_fields(well_qc: pd.DataFrame) -> pd.DataFrame:
    """Wells with saturated fields: columns well, channel, fields (count, or NaN when the
    table has no field count) and share, one row per well and channel with any.

    The per-well QC holds each field flag ``Image_ImageQuality_Saturated_<Ch>`` as its mean
    over the well's fields, so the count is that share times ``Metadata_FieldCount``."""
    rows: list[dict[str, Any]] = []
    columns = sorted(c for c in well_qc.columns if c.startswith(SATURATED_PREFIX))
    n_fields = (
        pd.to_numeric(well_qc["Metadata_FieldCount"], errors="coerce")
        if "Metadata_FieldCount" in well_qc.columns
        else pd.Series(np.nan, index=well_qc.index)
    )
    for column in columns:
        share = pd.to_numeric(well_qc[column], errors="coerce").astype(float)
        for i in share.index[share > 0]:
            total = n_fields[i]
            rows.append(
                {
                    "well": str(well_qc[WELL_COLUMN][i]),
                    "channel": column.removeprefix(SATURATED_PREFIX),
                    "fields": round(share[i] * total) if math.isfinite(total) else np.nan,
                    "of": total,
                    "share": float(share[i]),
                }
            )
    return pd.DataFrame(rows, columns=["well", "channel", "fields", "of", "share"])


def saturation_lines(well_qc: pd.DataFrame) -> list[str]:
    """Report lines naming the wells with saturated fields (nothing when the table has no
    saturation flags, e.g. one written before they existed)."""
    if not any(c.startswith(SATURATED_PREFIX) for c in well_qc.columns):
        return []
    found = saturated_fields(well_qc)
    if found.empty:
        return ["Saturated fields: none.", ""]
    wells = found["well"].nunique()
    counted = found["fields"].notna().all()
    in_wells = f"{wells} well{'s' if wells > 1 else ''}"
    what = f"{int(found['fields'].sum())} in {in_wells}" if counted else f"in {in_wells}"
    lines = [
        f"**Saturated fields: {what}** (more than `saturation_fraction` of the pixels of a "
        "channel at the camera maximum: nuclei there merge and intensities are clipped; the "
        f"per-field image QC flags them in `{SATURATED_PREFIX}<Channel>`).",
        "",
    ]
    shown = found.head(MAX_SATURATED_ROWS)
    lines += md_table(
        ["well", "channel", "saturated fields"],
        [
            (
                r.well,
                r.channel,
                f"{int(r.fields)} of {int(r.of)}" if math.isfinite(r.fields) else f"{r.share:.0%}",
            )
            for r in shown.itertuples()
        ],
    )
    if len(found) > len(shown):
        lines += [f"... and {len(found) - len(shown)} more well/channel pairs.", ""]
    return lines


def plate_report(
    well_qc: pd.DataFrame, *, plate_name: str | None = None, options: ReportOptions | None = None
) -> str:
    """Markdown with a heat map, summary and outlier wells per QC metric."""
    name, head, sections = _plate_sections(well_qc, plate_name, options or ReportOptions())
    return "\n".join([f"# Plate report: {name}", "", *head, *sections])


# ---------------------------------------------------------------- markdown tables


def png_data_uri(png: bytes) -> str:
    """A ``data:`` URI, so the image travels inside the markdown."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float | np.floating):
        return not math.isfinite(float(value))
    if isinstance(value, str):
        return not value.strip()
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # lists, dicts: not a missing scalar
        return False


def md_cell(value: Any) -> str:
    """One table cell: "–" for a missing/NaN value, numbers to 4 digits, ``|`` escaped
    (it would otherwise end the cell) and line breaks flattened (they would end the row)."""
    if _missing(value):
        return MISSING
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(int(value))
    if isinstance(value, float | np.floating):
        return _fmt(float(value))
    return md_escape(str(value))


def md_escape(text: str) -> str:
    """Text safe inside a table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def md_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """GitHub-flavoured markdown table lines (a blank line after it)."""
    lines = [
        "| " + " | ".join(md_escape(h) for h in header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(md_cell(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


# ---------------------------------------------------------------- training curves


def _floats(values: Any) -> np.ndarray:
    """A JSON list as floats; anything unreadable becomes NaN instead of failing the report."""
    if not isinstance(values, list | tuple | np.ndarray):
        return np.empty(0)
    return np.asarray(
        [np.nan if _number(x) is None else float(x) for x in values],
        dtype=float,
    )


def _history(card: dict[str, Any]) -> dict[str, Any]:
    history = card.get("history")
    return history if isinstance(history, dict) else {}


def _kept(history: dict[str, Any]) -> str | None:
    """Which weights training kept: the last, or an earlier check that was clearly better."""
    kept, steps = history.get("kept_step"), history.get("steps")
    if kept is None:
        return None
    return f"step {kept}" + (" (last)" if kept == steps else " (clearly lower validation loss)")


def _number(value: Any) -> float | None:
    """A finite number from a card (JSON or numpy), else None."""
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        return None
    return float(value) if math.isfinite(float(value)) else None


def _n_steps(card: dict[str, Any]) -> int | None:
    """Optimizer steps the loss was recorded over: ``history.steps`` (U-Net fits), else the
    length of a per-step list (the annotation-free model keeps its loss terms unthinned)."""
    history = _history(card)
    steps = _number(history.get("steps"))
    if steps is not None and steps > 0:
        return int(steps)
    for key in ("loss", "area"):
        if isinstance(history.get(key), list) and history[key]:
            return len(history[key])
    return None


def curve_steps(n_points: int, n_steps: int | None) -> np.ndarray | None:
    """Step numbers of a loss curve thinned as `learning.loop.thin_curve` does (every
    ``max(1, n // 200)``-th step from step 1); None when the steps are unknown."""
    if not n_points or not n_steps:
        return None
    stride = max(1, n_steps // 200)
    if math.ceil(n_steps / stride) == n_points:
        return np.arange(n_points) * stride + 1.0
    return np.linspace(1.0, float(n_steps), n_points)  # thinned some other way: spread evenly


def _curves(
    card: dict[str, Any],
) -> tuple[np.ndarray | None, np.ndarray, str, np.ndarray, np.ndarray, float | None]:
    """(train x, train loss, x label, validation steps, validation loss, final train loss)."""
    history = _history(card)
    loss = _floats(card.get("loss_curve"))
    if not loss.size:
        loss = _floats(history.get("loss"))
    x = curve_steps(loss.size, _n_steps(card))
    label = "step" if x is not None or not loss.size else "point"
    val, val_step = _floats(history.get("val_loss")), _floats(history.get("val_step"))
    if val.size != val_step.size:
        val, val_step = np.empty(0), np.empty(0)
    keep = np.isfinite(val) & np.isfinite(val_step)
    final = _number(card.get("final_train_loss"))
    return x, loss, label, val_step[keep], val[keep], final


def has_training_curve(card: dict[str, Any]) -> bool:
    """Whether the card holds anything to plot (per-step loss or validation losses)."""
    _, loss, _, _, val, _ = _curves(card)
    return bool(np.isfinite(loss).any() or val.size)


def training_curve_png(card: dict[str, Any], *, dpi: int = 80) -> bytes:
    """Training loss vs step and validation loss vs step, on one axis: both are the same
    loss function, so a shared scale shows over-fitting (validation rising while training
    falls) that two scales would hide. The kept (best-validation) step is starred."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x, loss, xlabel, val_step, val, final = _curves(card)
    if not has_training_curve(card):
        raise InputDataError(
            f"model card {card.get('model_id')} holds no training curve "
            "(no loss_curve, no history.val_loss)"
        )
    fig = Figure(figsize=(6.0, 3.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    shown: list[np.ndarray] = []
    if loss.size:
        xs = x if x is not None else np.arange(1.0, loss.size + 1)
        ax.plot(xs, loss, color="#1f77b4", linewidth=1.0, label="training loss")
        shown.append(loss)
    elif final is not None and val_step.size:
        steps = _n_steps(card) or float(val_step.max())
        ax.plot(
            [steps], [final], "s", color="#1f77b4", label="final training loss (mean of last steps)"
        )
        shown.append(np.asarray([final]))
    if val.size:
        ax.plot(val_step, val, "o-", color="#d62728", markersize=3, label="validation loss")
        best = int(np.argmin(val))
        ax.plot(
            val_step[best],
            val[best],
            "*",
            color="black",
            markersize=10,
            label="kept (best validation)",
        )
        shown.append(val)
    values = np.concatenate(shown)
    values = values[np.isfinite(values)]
    if values.size and values.min() > 0 and values.max() / values.min() > 20:
        ax.set_yscale("log")  # a loss falling by decades is flat on a linear axis
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(color="#dddddd", linewidth=0.5)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(str(card.get("model_id", "model")), fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


def _what(card: dict[str, Any]) -> str:
    if card.get("target_channel"):
        mode = (card.get("normalisation") or {}).get("target_mode") or (
            card.get("options") or {}
        ).get("target_mode")
        return f"virtual staining of {card['target_channel']}" + (f" ({mode})" if mode else "")
    parts = [str(card[k]) for k in ("compartment", "method") if card.get(k)]
    return " / ".join(parts) if parts else MISSING


def _channels(card: dict[str, Any]) -> str:
    channels = card.get("input_channels") or card.get("source_channels") or []
    text = ", ".join(map(str, channels)) if isinstance(channels, list) else str(channels)
    if card.get("target_channel"):
        text += f" → {card['target_channel']}"
    return text


def _parent(card: dict[str, Any]) -> str | None:
    for key in ("parent_model", "fine_tuned_from", "init_model"):
        if card.get(key):
            return str(card[key])
    return None


def _init(card: dict[str, Any]) -> str:
    """What the weights started from: the card's `init`, the fit's detail, or for a
    virtual-staining model (always random unless fine-tuned) its parent."""
    history = _history(card)
    init = str(card["init"]) if card.get("init") else None
    detail = history.get("init")
    if init and isinstance(detail, str) and detail != init:
        init = f"{init} ({detail})"
    if not init:
        init = (
            "fine-tuned"
            if card.get("fine_tuned_from")
            else ("random" if card.get("target_channel") else None)
        )
    moved = _number(history.get("transferred_tensors"))
    if init and moved:
        init = f"{init}, {int(moved)} tensors transferred"
    return init or MISSING


def _fields(card: dict[str, Any]) -> str | None:
    """Virtual staining keeps validation fields apart from training fields; a segmentation
    fit holds some of its training fields out (`history.validation_images`)."""
    n_train = len(card.get("training_fields") or [])
    if card.get("validation_fields"):
        return f"{n_train} training, {len(card['validation_fields'])} validation"
    held_out = _history(card).get("validation_images")
    if isinstance(held_out, list) and held_out:
        return f"{n_train}, of which {len(held_out)} held out for validation"
    return f"{n_train} training" if n_train else None


def _planned_steps(card: dict[str, Any]) -> int | None:
    options = card.get("options") or {}
    train = options.get("train") or options.get("training") or {}
    planned = _number(train.get("n_steps")) if isinstance(train, dict) else None
    if planned is None:
        planned = _number(options.get("n_steps"))
    return int(planned) if planned else None


def training_report(card: dict[str, Any], *, dpi: int = 80) -> str:
    """Markdown for one trained model: what it is, how long it trained, and its curve
    (or a note that the card stores none), for a Prefect artifact or the model store."""
    history = _history(card)
    steps = _n_steps(card)
    planned = _planned_steps(card)
    steps_text: Any = steps
    if steps and planned and steps < planned:
        steps_text = f"{steps} of {planned} (early stop)"
    seconds = _number(history.get("seconds"))
    seconds_text: Any = None
    if seconds is not None:
        seconds_text = f"{seconds:.1f}" + (
            f" on {history['device']}" if history.get("device") else ""
        )
    fields = _fields(card)
    rows: list[tuple[str, Any]] = [
        ("kind", card.get("kind")),
        ("compartment / method", _what(card)),
        ("channels", _channels(card)),
        ("labels", card.get("truth")),
        ("plate", card.get("plate")),
        ("fields", fields),
        ("steps", steps_text),
        ("seconds", seconds_text),
        ("init", _init(card)),
        ("parent model", _parent(card)),
        ("best validation loss", _number(history.get("best_val_loss"))),
        ("weights kept", _kept(history)),
        ("validation score", _number(history.get("validation_score"))),
        ("final training loss", _number(card.get("final_train_loss"))),
    ]
    optional = {
        "labels",
        "plate",
        "parent model",
        "weights kept",
        "validation score",
        "final training loss",
    }
    rows = [(k, v) for k, v in rows if k not in optional or not _missing(v)]
    lines = [f"# Training: {card.get('model_id', 'model')}", "", *md_table(["", ""], rows)]
    if has_training_curve(card):
        png = training_curve_png(card, dpi=dpi)
        lines += [f"![training curve]({png_data_uri(png)})", ""]
        if not _floats(card.get("loss_curve")).size and not _floats(history.get("loss")).size:
            lines += ["The card stores no per-step training loss, only validation losses.", ""]
    else:
        lines += ["No training curve: this model card stores no loss curve.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- pipeline report


def _verdict(gate: dict[str, Any]) -> str:
    """One line per gate for the summary: which model a compartment ends up with."""
    where = gate.get("compartment") or "?"
    winner = gate.get("winner")
    if winner not in ("candidate", "baseline"):
        return f"{where}: no verdict"
    name = gate.get(winner)
    named = "" if _missing(name) else f" {name}"
    return f"{where}: {winner}{named} {'adopted' if winner == 'candidate' else 'kept'}"


def pipeline_report(
    well_qc: pd.DataFrame,
    *,
    plate_name: str,
    models: dict[str, dict[str, Any]],
    gates: list[dict[str, Any]],
    stages: list[dict[str, Any]] | None = None,
    options: ReportOptions | None = None,
) -> str:
    """The plate report with what produced it: the model per compartment and why, the
    quality-gate verdicts and the stages run, ahead of the heat maps so they are read
    first."""
    name, head, sections = _plate_sections(well_qc, plate_name, options or ReportOptions())
    lines = [f"# Plate report: {name}", "", *head]
    if gates:
        lines += ["Quality gate: " + "; ".join(_verdict(g) for g in gates) + ".", ""]
    lines += ["## Models", ""]
    if models:
        lines += md_table(
            ["compartment", "method", "model", "why"],
            [
                (
                    compartment,
                    m.get("method"),
                    m.get("model_id") if not _missing(m.get("model_id")) else "classical",
                    m.get("reason"),
                )
                for compartment, m in models.items()
            ],
        )
    else:
        lines += ["No model information.", ""]
    lines += ["## Quality gate", ""]
    if gates:
        lines += md_table(
            [
                "compartment",
                "candidate",
                "baseline",
                "metric",
                "candidate score",
                "baseline score",
                "fields",
                "winner",
                "reason",
            ],
            [
                (
                    g.get("compartment"),
                    g.get("candidate"),
                    g.get("baseline"),
                    g.get("metric"),
                    g.get("candidate_score"),
                    g.get("baseline_score"),
                    g.get("n_fields"),
                    g.get("winner"),
                    g.get("reason"),
                )
                for g in gates
            ],
        )
    else:
        lines += ["No quality gate ran.", ""]
    if stages is not None:
        lines += ["## Stages", ""]
        lines += md_table(
            ["stage", "state", "seconds"],
            [(s.get("stage"), s.get("state"), _seconds(s.get("seconds"))) for s in stages],
        )
    return "\n".join([*lines, *sections])


def _seconds(value: Any) -> Any:
    number = _number(value)
    return None if number is None else f"{number:.1f}"
