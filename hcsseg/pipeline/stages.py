"""Completion markers of pipeline stages, so a re-run resumes at the first unfinished one.

A stage is done when its marker exists and records the same key (a hash of everything the
stage's output depends on); a changed option or input redoes it. Markers sit in a hidden
folder of the tables root, where Parquet readers of the table folders never see them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from hcsseg.export.tables import safe_name

LEDGER_DIR = ".hcsseg"


def stage_key(*parts: Any) -> str:
    """Stable hash of JSON-able parts (pydantic models dumped first)."""
    payload = [p.model_dump(mode="json") if hasattr(p, "model_dump") else p for p in parts]
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class StageLedger:
    """The markers of one plate's pipeline stages under ``<tables>/.hcsseg/stages/<plate>/``."""

    def __init__(self, output_root: str | Path, plate_name: str) -> None:
        self.root = Path(output_root) / LEDGER_DIR / "stages" / safe_name(plate_name)

    def _path(self, stage: str) -> Path:
        return self.root / f"{safe_name(stage)}.json"

    def get(self, stage: str, key: str) -> dict[str, Any] | None:
        """The recorded result of a finished stage with this key, else None."""
        try:
            marker = json.loads(self._path(stage).read_text())
        except (OSError, ValueError):
            return None
        return marker.get("result") if marker.get("key") == key else None

    def record(self, stage: str, key: str, result: dict[str, Any], *, seconds: float) -> None:
        """Atomic write, last thing a stage does: a killed stage leaves no marker."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self._path(stage)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        marker = {
            "stage": stage,
            "key": key,
            "result": result,
            "seconds": round(seconds, 3),
            "finished": dt.datetime.now(dt.UTC).isoformat(),
        }
        try:
            tmp.write_text(json.dumps(marker, indent=2, default=str))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def clear(self) -> None:
        """Forget every stage (a forced re-run)."""
        for path in self.root.glob("*.json"):
            path.unlink(missing_ok=True)
