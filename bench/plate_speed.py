"""Plate-scale speed and memory of the classical path: `hcsseg process` against a plain
loop over the same library calls, in the same run.

Plates of 6, 24 and 96 wells (2 fields each, 512²) and one of 2160² fields are built from
the real CellProfiler example field of ../shared/data (DNA + cell stain; each field a
different flip/rotation/tile of it). For each plate:

* per-stage ms per field (read, nuclei, cells, features, image QC, labels) from a loop
  over the library functions in this process;
* the plain loop (`plan_plate` → `process_well` per well → `finalize_plate`) in a child
  process, and `hcsseg process` (embedded Prefect server included) in a child process:
  wall, CPU of the whole process tree, peak RSS of the tree (sampled every 0.1 s), the
  ratio CLI / plain loop;
* `--workers 2` on the 24-well plate against `--workers 1`.

The 384-well x 9-field x 2160² plate on 16 cores is extrapolated from the CPU seconds
per 2160² field. One torch/BLAS thread per process; the load average is recorded.

    python bench/plate_speed.py            # ~15-25 min on 2 cores
    python bench/plate_speed.py --quick    # smoke version (CI)

Writes bench/results/plate_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("HCSSEG_SHARED_DATA", REPO.parent / "shared" / "data"))
RESULTS = Path(os.environ.get("HCSSEG_BENCH_RESULTS", REPO / "bench" / "results"))
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
ENV = {**os.environ, **THREADS, "PYTHONPATH": str(REPO)}
FIELD_SIZES = {"512": 512, "2160": 2160}


def source_field() -> np.ndarray:
    """(2, 512, 512) uint8: Hoechst and the cell-body stain of CellProfiler's ExampleHuman."""
    import tifffile

    folder = DATA / "cellprofiler-human"
    planes = [tifffile.imread(next(folder.glob(f"*d{c}.tif"))) for c in (0, 2)]
    return np.stack(planes)


def variant(base: np.ndarray, k: int, size: int) -> np.ndarray:
    """The k-th field: one of the 8 flips/rotations, mirrored out to `size` px."""
    field = np.rot90(base, k % 4, axes=(1, 2))
    if (k // 4) % 2:
        field = field[:, :, ::-1]
    reps = -(-size // field.shape[1])
    tiled = np.concatenate(
        [
            np.concatenate([field if (i + j) % 2 == 0 else field[:, ::-1] for j in range(reps)], 2)
            for i in range(reps)
        ],
        1,
    )
    return np.ascontiguousarray(tiled[:, :size, :size])


def build_plate(out: Path, n_wells: int, fields: int, size: int) -> str:
    from hcsseg.io.plate_writer import row_name
    from hcsseg.io.tiff_import import plate_from_arrays

    base = source_field()
    wells = [(row_name(1 + i // 12), 1 + i % 12) for i in range(n_wells)]
    items = [
        (w, variant(base, i * fields + f, size)) for i, w in enumerate(wells) for f in range(fields)
    ]
    plate_from_arrays(
        out,
        name=out.stem,
        fields=items,
        channels=["DNA", "Cyto"],
        pixel_size_um=0.65,
        overwrite=True,
    )
    return str(out)


# ------------------------------------------------------------------ measured in a child

PLAIN = """
import json, sys, time
from hcsseg.config import ProcessConfig
from hcsseg.pipeline.wells import finalize_plate, plan_plate, plate_lock, process_well
url, out = sys.argv[1], sys.argv[2]
config = ProcessConfig(output=out)
plan = plan_plate(url, config)
with plate_lock(plan):
    for well in plan.wells:
        process_well(plan, well, config)
    finalize_plate(plan)
"""


def measured(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Wall, CPU and peak RSS of `cmd` and all its descendants.

    CPU: the growth of this process's RUSAGE_CHILDREN, which holds every descendant its
    parent waited for (the CLI waits for its embedded server, worker processes too).
    RSS: the tree's summed resident memory, sampled every 0.1 s."""
    import resource

    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        root = psutil.Process(proc.pid)
        peak = 0
        while proc.poll() is None:
            rss = 0
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                tree = []
            for node in tree:
                with contextlib.suppress(psutil.NoSuchProcess):
                    rss += node.memory_info().rss
            peak = max(peak, rss)
            time.sleep(0.1)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(f"{cmd[:4]} failed: {log.read().decode()[-1500:]}")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "peak_rss_mb": round(peak / 2**20, 1)}


STAGES = """
import json, sys, time
from hcsseg.config import ProcessConfig
from hcsseg.io.labels import write_labels
from hcsseg.io.plate import open_plate
from hcsseg.measure.features import measure_objects
from hcsseg.measure.quality import image_quality
from hcsseg.pipeline.wells import segmentation_pixel_size
from hcsseg.segment.classical import segment_cells, segment_nuclei

plate = open_plate(sys.argv[1], mode="r+")
config = ProcessConfig()
refs = list(plate.iter_fields())[: int(sys.argv[2])]
acc = {}


def tick(key, t0):
    acc[key] = acc.get(key, 0.0) + time.process_time() - t0
    return time.process_time()


for ref in refs:
    t = time.process_time()
    dna, cyto = plate.read_channels(ref, ["DNA", "Cyto"])
    t = tick("read", t)
    px = segmentation_pixel_size(dna, plate.pixel_size_um(ref), config)
    nuclei = segment_nuclei(dna, pixel_size_um=px)
    t = tick("nuclei", t)
    cells = segment_cells(nuclei, cyto, pixel_size_um=px)
    t = tick("cells", t)
    measure_objects(nuclei, cells, {"DNA": dna, "Cyto": cyto}, pixel_size_um=px,
                    typical_diameter_px=config.typical_nucleus_um / px)
    t = tick("features", t)
    for image in (dna, cyto):
        image_quality(image, saturation_value=255.0)
    t = tick("image_qc", t)
    write_labels(plate, ref, "bench_nuclei", nuclei)
    write_labels(plate, ref, "bench_cells", cells)
    tick("labels", t)
print(json.dumps({k: round(1000 * v / len(refs), 1) for k, v in acc.items()}))
"""


def per_stage(plate_url: str, n: int, code: Path = REPO) -> dict[str, float]:
    """ms of CPU per field of each stage `process_well` runs (the scale estimate counts with
    nuclei), for the code checked out at `code`, in a child process."""
    env = {**ENV, "PYTHONPATH": str(code)}
    out = subprocess.run(
        [sys.executable, "-c", STAGES, plate_url, str(n)],
        env=env,
        cwd=code,
        capture_output=True,
        text=True,
        check=True,
    )
    stages = json.loads(out.stdout.strip().splitlines()[-1])
    stages["total"] = round(sum(stages.values()), 1)
    stages["fields_per_s_per_core"] = round(1000 / stages["total"], 3)
    return stages


LEARNED = """
import json, sys, time
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
from plate_speed import source_field, variant
from hcsseg.learning.devices import cpu_has_bf16
from hcsseg.learning.options import TrainOptions
from hcsseg.segment.classical import segment_nuclei
from hcsseg.segment.distance_unet import (
    DistanceUNetOptions, labels_from_maps, predict_distance_unet, train_distance_unet,
)
device, size, steps, ttas = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
if device == "cpu":
    torch.set_num_threads(1)
base = source_field()
# a few steps on the classical nuclei of the 512² field: the network's output looks like
# nuclei, so the post-processing does the work it does for a trained model
train = TrainOptions(n_steps=steps, batch_size=8, crop_size=128, val_fraction=0.0, device=device)
opts = DistanceUNetOptions(train=train)
state, _ = train_distance_unet(
    [base[0]], [segment_nuclei(base[0], pixel_size_um=0.65)], options=opts
)
field = variant(base, 1, size)[0]
out = {"device": device, "torch_threads": torch.get_num_threads(), "size": size, "runs": []}
if device == "cuda":
    out["gpu"] = torch.cuda.get_device_name(0)
out["cpu_bf16"] = cpu_has_bf16()
# bfloat16 where the device has it natively (the shipped default), float32 beside it
runs = [(t == "1", amp) for t in ttas.split(",") for amp in (True, False)]
for tta, amp in runs:
    o = opts.model_copy(update={"tta": tta, "train": train.model_copy(update={"amp": amp})})
    predict_distance_unet(state, field[:256, :256], options=o)  # warm-up (kernels, caches)
    if device == "cuda":
        torch.cuda.synchronize()
    w, c = time.perf_counter(), time.process_time()
    maps = predict_distance_unet(state, field, options=o)
    if device == "cuda":
        torch.cuda.synchronize()
    w1, c1 = time.perf_counter(), time.process_time()
    labels = labels_from_maps(maps, o)
    w2, c2 = time.perf_counter(), time.process_time()
    out["runs"].append({
        "tta": tta, "amp": amp, "working_shape": list(maps.dist.shape),
        "objects": int(labels.max()),
        "network_wall_s": round(w1 - w, 2), "network_cpu_s": round(c1 - c, 2),
        "post_wall_s": round(w2 - w1, 2), "post_cpu_s": round(c2 - c1, 2),
    })
print(json.dumps(out))
"""


def learned_inference(device: str, size: int, steps: int, ttas: str) -> dict[str, Any]:
    """Per-field time of the distance U-Net (network, then post-processing) on one field of
    `size`², in a child process (one torch thread on the CPU)."""
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            LEARNED,
            str(Path(__file__).parent),
            device,
            str(size),
            str(steps),
            ttas,
        ],
        env=ENV,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@contextmanager
def checkout(rev: str | None) -> Iterator[Path | None]:
    """A worktree of `rev` (the baseline measured beside this code), removed afterwards."""
    if not rev:
        yield None
        return
    path = Path(tempfile.mkdtemp(prefix="hcsseg-baseline-")) / "tree"
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(path), rev],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    try:
        yield path
    finally:
        subprocess.run(
            ["git", "worktree", "remove", "--force", str(path)],
            cwd=REPO,
            check=False,
            capture_output=True,
        )


def field_bytes(size: int) -> int:
    return 2 * size * size  # two uint8 channels at level 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument(
        "--baseline",
        default=None,
        help="git revision whose classical stages are timed in the same run (e.g. ba7c9ef)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="device of the learned-inference timing (cpu, cuda); `--only-learned` on a GPU "
        "machine times that alone",
    )
    p.add_argument("--only-learned", action="store_true", help="skip the classical plates")
    args = p.parse_args(argv)
    if not (DATA / "cellprofiler-human").is_dir():
        print(f"data not found: {DATA}; nothing to benchmark")
        return 0
    for k, v in THREADS.items():
        os.environ[k] = v
    plates = [(6, 2, 512), (24, 2, 512), (96, 2, 512), (6, 1, 2160)]
    if args.quick:
        plates = [(2, 1, 512), (1, 1, 1024)]
    if args.only_learned:
        plates = []
    result: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads_per_process": 1,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d %H:%M"),
        },
        "plates": [],
    }
    hcsseg = [sys.executable, "-m", "hcsseg.cli"]
    with (
        checkout(args.baseline) as baseline,
        tempfile.TemporaryDirectory(prefix="hcsseg-speed-") as tmp,
    ):
        result["baseline"] = args.baseline
        for n_wells, fields, size in plates:
            url = build_plate(Path(tmp) / f"w{n_wells}_{size}.zarr", n_wells, fields, size)
            n_fields = n_wells * fields
            rec: dict[str, Any] = {"wells": n_wells, "fields": n_fields, "size": size}
            rec["stage_ms_per_field"] = per_stage(url, min(n_fields, 4))
            if baseline is not None:
                rec["baseline_stage_ms_per_field"] = per_stage(url, min(n_fields, 4), baseline)
                rec["classical_speedup"] = round(
                    rec["baseline_stage_ms_per_field"]["total"]
                    / rec["stage_ms_per_field"]["total"],
                    2,
                )
            rec["plain"] = measured([sys.executable, "-c", PLAIN, url, f"{tmp}/plain"], ENV)
            cli = [*hcsseg, "process", url, "--output", f"{tmp}/cli", "--force"]
            rec["cli_1"] = measured([*cli, "--workers", "1"], ENV)
            if n_wells == 24 or args.quick:
                rec["cli_2"] = measured([*cli, "--workers", "2"], ENV)
            for key in ("plain", "cli_1", "cli_2"):
                if key in rec:
                    r = rec[key]
                    r["fields_per_s_per_core"] = round(n_fields / max(r["cpu_s"], 1e-9), 3)
                    r["rss_per_field_bytes"] = round(
                        r["peak_rss_mb"] * 2**20 / field_bytes(size), 1
                    )
            rec["cli_over_plain_cpu"] = round(rec["cli_1"]["cpu_s"] / rec["plain"]["cpu_s"], 3)
            if "cli_2" in rec:
                rec["workers2_over_workers1_wall"] = round(
                    rec["cli_2"]["wall_s"] / rec["cli_1"]["wall_s"], 3
                )
            result["plates"].append(rec)
            print(json.dumps(rec))
    result["learned"] = (
        learned_inference(args.device, 512, 3, "0")
        if args.quick
        else learned_inference(args.device, 2160, 40, "0,1")
    )
    print(json.dumps(result["learned"]))
    big = [r for r in result["plates"] if r["size"] == 2160]
    if big:
        cpu_per_field = big[0]["stage_ms_per_field"]["total"] / 1000
        result["extrapolation_384x9_2160_16_cores_min"] = round(
            384 * 9 * cpu_per_field / 16 / 60, 1
        )
        result["cpu_s_per_2160_field"] = round(cpu_per_field, 2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = "plate_speed" + ("_quick" if args.quick else "")
    if args.only_learned:
        stem += f"_learned_{args.device}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    return 0


def _stages(s: dict[str, float]) -> str:
    keys = ("read", "nuclei", "cells", "features", "image_qc", "labels")
    return " / ".join(f"{s.get(k, 0):.0f}" for k in keys) + f" = **{s['total']:.0f}**"


def markdown(r: dict[str, Any]) -> str:
    m = r["machine"]
    base = r.get("baseline")
    lines = [
        "# Plate speed: classical path, `hcsseg process` vs a plain loop",
        "",
        f"Run {m['date']}, {m['cpu']} x {m['cpu_count']} cores, one thread per process, load "
        f"average at start {m['load_average_at_start']}. Stage times are CPU ms per field in "
        "a child process (the scale estimate counts with nuclei)"
        + (
            f"; the baseline is commit `{base}`, timed in the same run on the same plates"
            if base
            else ""
        )
        + ". CPU of a run = user + system of the whole process tree (the CLI's embedded "
        "Prefect server included); RSS = peak of the tree's summed resident memory, sampled.",
        "",
        "## Classical stages",
        "",
        "| plate | read / nuclei / cells / features / QC / labels = total ms | fields/s/core "
        + ("| baseline ms | baseline fields/s/core | speed-up |" if base else "|"),
        "|---|---|---|" + ("---|---|---|" if base else ""),
    ]
    for p in r["plates"]:
        s = p["stage_ms_per_field"]
        row = f"| {p['wells']} wells x {p['fields'] // p['wells']}, {p['size']}² | {_stages(s)} | "
        row += f"{s['fields_per_s_per_core']:.2f} |"
        if "baseline_stage_ms_per_field" in p:
            b = p["baseline_stage_ms_per_field"]
            row += f" {_stages(b)} | {b['fields_per_s_per_core']:.2f} |"
            row += f" {p['classical_speedup']:.2f}x |"
        lines.append(row)
    lines += [
        "",
        "## Whole runs",
        "",
        "| plate | fields | plain loop: wall s, CPU s, peak RSS MB (x field bytes) | "
        "`hcsseg process --workers 1`: wall, CPU, RSS | CLI / plain CPU | `--workers 2` wall "
        "(/ 1 worker) |",
        "|---|---|---|---|---|---|",
    ]
    for p in r["plates"]:
        a, c = p["plain"], p["cli_1"]
        two = (
            f"{p['cli_2']['wall_s']:.1f} ({p['workers2_over_workers1_wall']:.2f}x)"
            if "cli_2" in p
            else "–"
        )
        lines.append(
            f"| {p['wells']} wells, {p['size']}² | {p['fields']} | {a['wall_s']:.1f}, "
            f"{a['cpu_s']:.1f}, {a['peak_rss_mb']:.0f} ({a['rss_per_field_bytes']:.0f}x) | "
            f"{c['wall_s']:.1f}, {c['cpu_s']:.1f}, {c['peak_rss_mb']:.0f} | "
            f"{p['cli_over_plain_cpu']:.2f} | {two} |"
        )
    if "extrapolation_384x9_2160_16_cores_min" in r:
        lines += [
            "",
            f"384 wells x 9 fields of 2160² on 16 cores, from {r['cpu_s_per_2160_field']} CPU s "
            f"per 2160² field (classical stages): **{r['extrapolation_384x9_2160_16_cores_min']} "
            "min** (CPU only).",
        ]
    if r.get("learned"):
        le = r["learned"]
        where = le.get("gpu") or f"CPU, {le['torch_threads']} torch thread(s)"
        lines += [
            "",
            f"## Learned inference: distance U-Net per {le['size']}² field ({where})",
            "",
            "| test-time flips | precision | working field | objects | network wall / CPU s | "
            "post-processing wall / CPU s |",
            "|---|---|---|---|---|---|",
        ]
        low = "bfloat16" if le.get("gpu") or le.get("cpu_bf16") else "float32 (no native bf16)"
        for run in le["runs"]:
            lines.append(
                f"| {'on (4 flips)' if run['tta'] else 'off'} | "
                f"{low if run.get('amp', True) else 'float32'} | "
                f"{run['working_shape'][0]}x{run['working_shape'][1]} | {run['objects']} | "
                f"{run['network_wall_s']} / {run['network_cpu_s']} | "
                f"{run['post_wall_s']} / {run['post_cpu_s']} |"
            )
    lines += ["", *[f"- {f}" for f in r.get("findings", [])]]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.exit(main())
