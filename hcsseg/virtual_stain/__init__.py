"""Per-plate virtual nucleus staining (in-silico labelling)."""
