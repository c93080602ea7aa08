"""Per-field feature tables where ngio and Fractal look for them: ``<field>/tables/<name>``.

The Parquet dataset beside the plate (`hcsseg.export.tables`) is what pandas, DuckDB and
pycytominer read; ngio (``open_ome_zarr_container(field).list_tables()``) and Fractal
tasks only see tables inside the image. So each field image also gets a Fractal-style
feature table (table spec v1): the group ``tables`` lists its tables in
``{"tables": [...]}``; the group ``tables/<name>`` says ``type: feature_table``, which label
image its rows describe (``region.path: ../labels/cells``) and that the ``label`` column
holds the label values; the rows are in ``tables/<name>/table.parquet``, ngio's ``parquet``
backend (no AnnData needed to write or read them).

Pure I/O on local stores: a well's rows are written as its run finishes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import zarr

from hcsseg.export.tables import write_parquet
from hcsseg.io.plate import FieldRef

TABLE_NAME = "cells"
LABEL_COLUMN = "label"
BACKEND = "parquet"
PARQUET_FILE = "table.parquet"


def table_attrs(region: str, columns: list[str]) -> dict[str, Any]:
    """Attributes of a feature table group, as ngio's FeatureTableV1 writes them."""
    return {
        "type": "feature_table",
        "table_version": "1",
        "fractal_table_version": "1",
        "backend": BACKEND,
        "region": {"path": f"../labels/{region}"},
        "instance_key": LABEL_COLUMN,
        "index_key": LABEL_COLUMN,
        "index_type": "int",
        "metadata_columns": [c for c in columns if c.startswith("Metadata_")],
        "measurement_columns": [
            c for c in columns if c != LABEL_COLUMN and not c.startswith("Metadata_")
        ],
    }


def field_table_path(plate_url: str, ref: FieldRef, name: str = TABLE_NAME) -> Path:
    """Where a field's feature table `name` keeps its rows."""
    return Path(plate_url) / ref.path / "tables" / name / PARQUET_FILE


def write_field_table(
    plate_url: str,
    ref: FieldRef,
    rows: pd.DataFrame,
    *,
    name: str = TABLE_NAME,
    region: str = "cells",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``rows`` (one per object, ``Metadata_ObjectNumber`` = label value) as the
    feature table ``name`` of one field image; replaces an earlier table of that name."""
    table = rows.reset_index(drop=True)
    table.insert(0, LABEL_COLUMN, table["Metadata_ObjectNumber"].astype("int64"))
    image = zarr.open_group(str(Path(plate_url) / ref.path), mode="r+")
    tables = image.require_group("tables")
    group = tables.require_group(name)
    path = write_parquet(
        table,
        field_table_path(plate_url, ref, name),
        metadata={"field": ref.path, **(metadata or {})},
    )
    group.attrs.update(table_attrs(region, list(table.columns)))
    listed = list(tables.attrs.get("tables", []))
    if name not in listed:  # listed last: a reader never finds a table without its rows
        tables.attrs.update({"tables": [*listed, name]})
    return path


def write_well_field_tables(
    plate_url: str, refs: Sequence[FieldRef], cells: pd.DataFrame, *, source: Path
) -> None:
    """Each field of one well gets its rows of the well's cell table (`Metadata_Site` picks
    them) as its feature table; `source` is the well's Parquet file, named in the metadata."""
    for ref in refs:
        rows = cells[cells["Metadata_Site"] == ref.site]
        write_field_table(plate_url, ref, rows, metadata={"source_table": str(source)})
