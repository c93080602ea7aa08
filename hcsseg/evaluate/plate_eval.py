"""Score label images stored in a plate against ground truth stored beside them.

Reads one field at a time, so evaluating a plate costs the memory of one field.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hcsseg.errors import HcssegError
from hcsseg.evaluate.metrics import evaluate_images, summarize_images
from hcsseg.export.tables import safe_name, write_parquet
from hcsseg.io.plate import open_plate

# provenance keys `hcsseg process` writes into the label images it segments
SEGMENTED_BY = ("nuclei_method", "cells_method")


def evaluate_plate(
    plate_url: str, *, pred: str, truth: str, wells: list[str] | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-field metrics table and dataset summary for labels `pred` vs `truth`."""
    plate = open_plate(plate_url)
    if pred == truth:
        raise HcssegError(f"plate {plate.name}: pred and truth are both {truth!r}")
    refs = [r for r in plate.iter_fields(wells) if truth in plate.label_names(r)]
    if not refs:
        labels = sorted({n for r in plate.iter_fields(wells) for n in plate.label_names(r)})
        raise HcssegError(
            f"plate {plate.name}: no field has ground-truth labels {truth!r}; "
            f"label images present: {', '.join(labels) or '(none)'}"
        )
    for ref in refs:  # a segmentation scored against another scores nothing: refuse it
        made = {k: v for k, v in plate.label_provenance(ref, truth).items() if k in SEGMENTED_BY}
        if made:
            how = ", ".join(f"{k}={v!r}" for k, v in made.items())
            raise HcssegError(
                f"plate {plate.name} field {ref.path}: label image {truth!r} is not ground "
                f"truth, `hcsseg process` segmented it ({how}); name imported annotations "
                "(hcsseg import-pairs), e.g. nuclei_gt"
            )
    lacking = [r.path for r in refs if pred not in plate.label_names(r)]
    if lacking:
        raise HcssegError(
            f"plate {plate.name}: fields {', '.join(lacking[:5])} have {truth!r} but no "
            f"{pred!r} labels (run `hcsseg process` first)"
        )

    from hcsseg.learning.data import read_truth_labels  # imports torch

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for ref in refs:  # a stack of planes or a damaged chunk is refused, never cut
            yield plate.read_labels(ref, pred), read_truth_labels(plate, ref, truth)

    table = evaluate_images(pairs(), [r.path for r in refs])
    meta = pd.DataFrame(
        {
            "Metadata_Plate": plate.name,
            "Metadata_Well": [r.well for r in refs],
            "Metadata_Site": [r.site for r in refs],
        }
    )
    table = pd.concat([meta, table], axis=1)
    summary = {"plate": plate.name, "pred": pred, "truth": truth, **summarize_images(table)}
    return table, summary


def write_evaluation(
    table: pd.DataFrame, summary: dict[str, Any], out_dir: str | Path
) -> tuple[Path, Path]:
    out = Path(out_dir)
    name = f"{safe_name(str(summary['plate']))}_{summary['pred']}_vs_{summary['truth']}"
    parquet = write_parquet(table, out / f"{name}.parquet", metadata={"summary": summary})
    js = out / f"{name}.json"
    js.write_text(json.dumps(summary, indent=2, default=float))
    return parquet, js
