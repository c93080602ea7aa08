"""Shared pieces of the segmentation benchmarks: data, splits, scoring, timing, reports.

Benchmarks run on the CPU of a shared machine (torch limited to 1 or 2 threads) within about ten
minutes each, so the learned models get a few hundred optimiser steps, not the days of GPU
training of the papers they come from; the numbers measure what a per-plate model reaches on
that budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hcsseg.evaluate.metrics import evaluate_images, summarize_images  # noqa: E402

DATA = Path(os.environ.get("HCSSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = Path(os.environ.get("HCSSEG_BENCH_RESULTS", REPO / "bench" / "results"))
# One torch thread by default: the 2 cores are shared with other jobs, and with 2 threads
# under that contention a U-Net forward pass took 1.6 s instead of 0.17 s (thread barriers
# waiting for a preempted thread). Set HCSSEG_BENCH_THREADS=2 on an idle machine.
THREADS = int(os.environ.get("HCSSEG_BENCH_THREADS", "1"))


def setup() -> None:
    torch.set_num_threads(THREADS)
    RESULTS.mkdir(parents=True, exist_ok=True)


def hash_order(names: Sequence[str]) -> list[str]:
    """Names sorted by the SHA-1 of the name: a fixed split that ignores naming patterns."""
    return sorted(names, key=lambda s: hashlib.sha1(s.encode()).hexdigest())


def load_pairs(folder: Path, extra: Sequence[str] = ()) -> dict[str, dict[str, np.ndarray]]:
    """{stem: {"img", "lab", *extra}} for every `<stem>_img.tif` in `folder`."""
    if not folder.is_dir():
        sys.exit(f"data set not found: {folder}")
    out = {}
    for f in sorted(folder.glob("*_img.tif")):
        stem = f.name.removesuffix("_img.tif")
        item = {"img": tifffile.imread(f), "lab": tifffile.imread(folder / f"{stem}_lab.tif")}
        for key in extra:
            item[key] = tifffile.imread(folder / f"{stem}_{key}.tif")
        out[stem] = item
    return out


@contextlib.contextmanager
def timed(record: dict[str, float], key: str) -> Iterator[None]:
    """Adds `<key>_wall_s` and `<key>_cpu_s` (process CPU time, all threads) to `record`."""
    w, c = time.perf_counter(), time.process_time()
    yield
    record[f"{key}_wall_s"] = round(time.perf_counter() - w, 1)
    record[f"{key}_cpu_s"] = round(time.process_time() - c, 1)


def score(preds: Sequence[np.ndarray], truths: Sequence[np.ndarray], names: Sequence[str]) -> dict:
    """AP@0.5 and mean AP(0.5:0.95) as mean over images (DSB, Han et al.) and pooled."""
    table = evaluate_images(zip(preds, truths, strict=True), list(names))
    s = summarize_images(table)
    return {
        "ap50_image_mean": round(s["ap_50_image_mean"], 4),
        "ap_mean_image_mean": round(s["ap_mean_image_mean"], 4),
        "ap50_pooled": round(s["ap_50_pooled"], 4),
        "ap_mean_pooled": round(s["ap_mean_pooled"], 4),
        "n_pred": int(s["n_pred"]),
        "n_true": int(s["n_true"]),
        "per_image_ap50": {
            str(r["image"]): round(float(r["ap_50"]), 4) for _, r in table.iterrows()
        },
    }


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": THREADS,
        "cpu_count": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def write_result(name: str, payload: dict[str, Any]) -> Path:
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    write_summary()
    for k, v in payload["methods"].items():
        print(f"{k}: AP50 {v['ap50_image_mean']:.3f}  mAP {v['ap_mean_image_mean']:.3f}")
    return path


def _row(method: str, r: dict[str, Any], extra: str = "") -> str:
    cpu = r.get("train_cpu_s", 0) + r.get("predict_cpu_s", 0)
    return (
        f"| {method} | {r['ap50_image_mean']:.3f} | {r['ap_mean_image_mean']:.3f} | "
        f"{r['ap50_pooled']:.3f} | {r['n_pred']} / {r['n_true']} | {cpu:.0f} | {extra} |"
    )


def write_summary() -> None:
    """bench/results/segmentation.md from whichever result files exist."""
    lines = ["# Segmentation benchmarks", "", (__doc__ or "").strip(), ""]
    header = [
        "| method | AP@0.5 (image mean) | mean AP 0.5:0.95 | AP@0.5 pooled | pred / true | "
        "CPU s (train + predict) | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    # nuclei and dense-cell accuracy moved to bench/accuracy.py (bench/results/accuracy.md)
    for name, title in [
        ("isl_pretraining", "In-silico-labelling pretraining (Bonte et al. 2024)"),
    ]:
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            continue
        res = json.loads(path.read_text())
        lines += [f"## {title}", "", res["setup"], "", *header]
        for method, r in res["methods"].items():
            lines.append(_row(method, r, r.get("note", "")))
        lines += ["", *res.get("findings", []), ""]
    (RESULTS / "segmentation.md").write_text("\n".join(lines).rstrip() + "\n")
