"""Per-cell, per-field and per-well tables as a Parquet dataset.

Layout (one file per well, so a re-run of a well replaces its rows, never adds to them):

    <root>/cells/<plate>/<well>.parquet       one row per cell (pycytominer/CytoTable naming)
    <root>/image_qc/<plate>/<well>.parquet    one row per field (CellProfiler Image_ names)
    <root>/markers/<plate>/<well>.parquet     nucleus markers (virtual-staining step)
    <root>/well_qc/<plate>.parquet            one row per well, written when a plate finishes
    <root>/.hcsseg/                           bookkeeping: stage and well markers, locks, runs

Each table folder holds Parquet files only (a write's temporary file is a dot-file, which
readers skip), so each is a dataset of one schema; `.hcsseg` is hidden for the same reason.
Directory names carry no ``key=value`` so readers do not add categorical partition
columns that clash with the ``Metadata_`` columns kept inside each file: pandas,
pyarrow, DuckDB (``read_parquet('<root>/cells/**/*.parquet')``) and pycytominer read it
as-is.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from hcsseg.errors import HcssegError

TableKind = Literal["cells", "image_qc", "markers", "virtual_stain_qc"]


def producer_version() -> str:
    try:
        return version("hcsseg")
    except PackageNotFoundError:  # running from a source tree without install
        return "0+unknown"


def safe_name(name: str) -> str:
    """Plate names become folder names: keep them readable but path-safe."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "plate"


def well_table_path(root: str | Path, kind: TableKind, plate: str, well: str) -> Path:
    return Path(root) / kind / safe_name(plate) / f"{well}.parquet"


def write_parquet(df: pd.DataFrame, path: Path, *, metadata: Mapping[str, Any]) -> Path:
    """Atomic zstd Parquet write with key-value metadata (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    if any(pa.types.is_null(f.type) for f in table.schema):
        # An empty text column (a well without cells) has no type to infer: string, as in
        # the other files of the dataset, so each table folder keeps one schema.
        fields = [f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in table.schema]
        table = table.cast(pa.schema(fields, metadata=table.schema.metadata))
    kv = {
        b"producer": b"hcsseg",
        b"producer_version": producer_version().encode(),
        **{
            k.encode(): (v if isinstance(v, str) else json.dumps(v, default=str)).encode()
            for k, v in metadata.items()
        },
    }
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **kv})
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    except OSError as exc:  # full disk, read-only mount: name the table, keep the old one
        detail = " ".join(str(exc).split())[:200]
        raise HcssegError(
            f"cannot write table {path} ({detail}); the previous file is intact"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_well_table(
    df: pd.DataFrame,
    root: str | Path,
    kind: TableKind,
    *,
    plate: str,
    well: str,
    metadata: Mapping[str, Any],
) -> Path:
    return write_parquet(df, well_table_path(root, kind, plate, well), metadata=metadata)


def read_table(root: str | Path, kind: str, plate: str | None = None) -> pd.DataFrame:
    """All rows of one table kind (optionally one plate); empty frame when none exist."""
    base = Path(root) / kind
    if plate is not None:
        base = base / safe_name(plate)
    files = sorted(base.rglob("*.parquet")) if base.is_dir() else []
    if not files:
        return pd.DataFrame()
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def file_metadata(path: str | Path) -> dict[str, str]:
    """Decoded key-value metadata of one Parquet file (provenance for analysts)."""
    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if k != b"pandas"}
