"""Small helpers shared by the flows."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path


def store_tag(plate_url: str) -> str:
    """8 hex digits naming one store: the same acquisition copied to two places (or two
    plates that share a name) must not overwrite each other's artifacts."""
    where = plate_url if "://" in plate_url else str(Path(plate_url).expanduser().resolve())
    return hashlib.sha256(where.rstrip("/").encode()).hexdigest()[:8]


def artifact_key(prefix: str, plate_name: str, plate_url: str) -> str:
    """``<prefix>-<plate name>-<store tag>``; keys allow lowercase letters, digits, dashes."""
    slug = re.sub(r"[^a-z0-9-]+", "-", plate_name.lower()).strip("-") or "plate"
    return f"{prefix}-{slug}"[:110].rstrip("-") + f"-{store_tag(plate_url)}"
