"""One plate, one run: plan -> virtual stain -> train -> quality gate -> segment -> report.

Pure planning and bookkeeping live here (presets, the stage ledger, the quality gate);
`flows/plate_pipeline.py` is the thin Prefect wrapper that runs the stages.
"""
