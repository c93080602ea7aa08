"""Virtual-staining benchmark on real data (not part of the test suite).

(a) isl-phase-dapi: 13 phase-contrast z-planes -> DAPI. Train on the left two thirds of
    the field (cut into 4 pseudo-fields, one held out for early stopping), score on the
    right third, which training never saw.
(b) dense-cells: CD3/CD4/CD8 surface stain -> DAPI. Train on 5 images, score on 2.

Scores: Pearson correlation with the real DAPI and marker FN/FP rates (one-to-one
matching within 15 µm, as in the annotation-free segmentation paper), for the model and
for the trivial baseline "Gaussian-smoothed source channel(s)" in the same run; CPU time
per training step and per megapixel of prediction.

Pixel sizes are not in the files; they are estimated from object sizes (ISL neuron nuclei
~23 px across ≈ 11 µm -> 0.5 µm/px; dense-cells T cells ~15 px across ≈ 7 µm -> 0.5 µm/px).

    python bench/virtual_stain.py [--steps 600] [--threads 1] [--sets isl dense]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import tifffile
import torch
from scipy import ndimage as ndi

from hcsseg.markers.detect import MarkerOptions
from hcsseg.markers.qc import marker_qc
from hcsseg.segment.training import TrainOptions
from hcsseg.virtual_stain.model import (
    VirtualStainOptions,
    predict_virtual_stain,
    train_virtual_stain,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RESULTS = Path(__file__).resolve().parent / "results"


def baseline(source: np.ndarray, sigma: float = 2.0) -> np.ndarray:
    """The trivial 'prediction': smoothed mean of the percentile-normalised source channels."""
    chans = []
    for c in source.astype(np.float32):
        lo, hi = np.percentile(c, (1, 99.8))
        chans.append((c - lo) / max(hi - lo, 1e-6))
    return ndi.gaussian_filter(np.mean(chans, axis=0), sigma)


def score(pred: np.ndarray, real: np.ndarray, px: float, markers: MarkerOptions) -> dict:
    return marker_qc(pred, real.astype(np.float32), pixel_size_um=px, marker_options=markers)


def run_set(name, train, test, options, px, markers) -> dict:
    keys = [f"{name}-{i}" for i in range(len(train))]
    t0, c0 = time.perf_counter(), time.process_time()
    model = train_virtual_stain([s for s, _ in train], [t for _, t in train], keys, options=options)
    train_wall, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    steps = model.history["steps"]
    rows = []
    pred_wall = pred_pixels = 0.0
    for i, (source, real) in enumerate(test):
        t1 = time.perf_counter()
        pred = predict_virtual_stain(model.network, source, options)
        pred_wall += time.perf_counter() - t1
        pred_pixels += real.size
        rows.append(
            {
                "image": i,
                "model": score(pred, real, px, markers),
                "baseline": score(baseline(source), real, px, markers),
            }
        )

    def mean(kind: str, key: str) -> float:
        return float(np.nanmean([r[kind][key] for r in rows]))

    summary = {
        kind: {k: mean(kind, k) for k in ("pcc", "fn_rate", "fp_rate")}
        for kind in ("model", "baseline")
    }
    return {
        "set": name,
        "n_train_fields": len(train),
        "n_test_images": len(test),
        "pixel_size_um": px,
        "steps": steps,
        "best_val_loss": model.history.get("best_val_loss"),
        "train_seconds": train_wall,
        "train_cpu_seconds": train_cpu,
        "seconds_per_step": train_wall / max(steps, 1),
        "predict_seconds_per_megapixel": pred_wall / (pred_pixels / 1e6),
        "summary": summary,
        "per_image": rows,
        "options": options.model_dump(mode="json"),
    }


def isl_set(steps: int, threads: int) -> dict:
    src = DATA / "isl-phase-dapi"
    names = json.loads((src / "channels.json").read_text())["channels"]
    data = tifffile.imread(src / "field_A4.tif")
    phase_names = [n for n in names if n.startswith("PHASE")]
    phase = data[[names.index(n) for n in phase_names]]
    dapi = data[names.index("DAPI")]
    cut = 2 * dapi.shape[1] // 3
    half = cut // 2
    train = [
        (phase[:, y : y + 256, x : x + half], dapi[y : y + 256, x : x + half])
        for y in (0, 256)
        for x in (0, half)
    ]
    test = [(phase[:, :, cut:], dapi[:, cut:])]
    options = VirtualStainOptions(
        source_channels=phase_names,
        training=TrainOptions(
            n_steps=steps,
            batch_size=8,
            crop_size=128,
            learning_rate=2e-3,
            val_fraction=0.25,
            val_every=50,
            patience=6,
            val_crops=16,
        ),
    )
    return run_set("isl-phase-dapi", train, test, options, 0.5, MarkerOptions())


def dense_set(steps: int, threads: int) -> dict:
    src = DATA / "dense-cells"
    stems = sorted(p.name[: -len("_img.tif")] for p in src.glob("*_img.tif"))
    pairs = [
        (tifffile.imread(src / f"{s}_img.tif")[None], tifffile.imread(src / f"{s}_dapi.tif"))
        for s in stems
    ]
    train, test = pairs[:5], pairs[5:]
    options = VirtualStainOptions(
        source_channels=["surface"],
        training=TrainOptions(
            n_steps=steps,
            batch_size=8,
            crop_size=128,
            learning_rate=2e-3,
            val_fraction=0.2,
            val_every=50,
            patience=6,
            val_crops=16,
        ),
    )
    markers = MarkerOptions(min_diameter_um=3.0, max_diameter_um=10.0)
    return run_set("dense-cells", train, test, options, 0.5, markers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sets", nargs="+", default=["isl", "dense"])
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": args.threads,
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    runs = {"isl": isl_set, "dense": dense_set}
    lines = [
        f"# Virtual staining benchmark ({args.tag})",
        "",
        f"Machine: {machine}. Baseline = Gaussian-smoothed normalised source, same run.",
        "",
        "| set | steps | s/step | s/MPx predict | PCC model | PCC baseline | "
        "marker FN model | FN baseline | marker FP model | FP baseline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key in args.sets:
        result = runs[key](args.steps, args.threads)
        result["machine"] = machine
        out = RESULTS / f"virtual_stain_{key}_{args.tag}.json"
        out.write_text(json.dumps(result, indent=2, default=float))
        m, b = result["summary"]["model"], result["summary"]["baseline"]
        lines.append(
            f"| {result['set']} | {result['steps']} | {result['seconds_per_step']:.2f} | "
            f"{result['predict_seconds_per_megapixel']:.2f} | {m['pcc']:.3f} | {b['pcc']:.3f} | "
            f"{m['fn_rate']:.3f} | {b['fn_rate']:.3f} | {m['fp_rate']:.3f} | {b['fp_rate']:.3f} |"
        )
        print(lines[-1], flush=True)
    (RESULTS / f"virtual_stain_{args.tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
