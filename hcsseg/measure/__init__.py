"""Per-object features and per-image quality metrics from pixel arrays."""
