"""Small helpers shared by the flows."""

from __future__ import annotations

import re


def artifact_key(prefix: str, plate_name: str) -> str:
    """Artifact keys allow lowercase letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9-]+", "-", plate_name.lower()).strip("-") or "plate"
    return f"{prefix}-{slug}"[:120]
