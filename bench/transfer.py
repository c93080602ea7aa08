"""Transfer across plates: a distance U-Net for plate 2 fine-tuned from plate 1's model, against
one trained on plate 2 from scratch.

The 100 training fields of nuclei-dsb2018 (the accuracy benchmark's split: SHA-1 order, first
100; its 40 test fields are not used here at all) are dealt alternately into two "plates" of
50. Each plate keeps its last 12 fields (SHA-1 order) for scoring only; the other 38 are its
training fields, of which the recipe holds out 15 % for early stopping and for picking the
watershed settings. Plate 1 trains the product's recipe (`distance_unet.recipe()`, the
`hcsseg train` defaults) with a budget of N steps; plate 2 trains (a) from scratch with N steps
and (b) from plate 1's model with the budget and options `hcsseg.pipeline.training` gives a
fine-tuned model (`fine_tune_options`: `fine_tune_fraction` x N). Plate 1's model applied to
plate 2 unchanged is the zero-shot point (step 0 of the fine-tuning curve). Curves come from
weight snapshots of each run, scored with that run's final post-processing settings.
Inference without test-time flips (4x cheaper; the flips add about +0.01 AP@0.5 in
bench/results/accuracy.md, alike for every model here).

    python bench/transfer.py            # about 20 min on a 2-core CPU, 1 torch thread
    python bench/transfer.py --quick    # smoke version for the tests (well under a minute)

Writes bench/results/transfer.{json,md} (transfer_quick.* for --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
from accuracy import learned_run
from seg_common import DATA, RESULTS, hash_order, load_pairs, score, timed

from hcsseg.pipeline.training import TrainConfig, fine_tune_options
from hcsseg.segment.distance_unet import (
    DistanceUNetOptions,
    recipe,
    segment_distance_unet,
    train_distance_unet,
)

SCORE_FIELDS = 12
CURVE = (0.125, 0.25, 0.5, 1.0)  # of each run's own budget


def _snapshots(n_steps: int, quick: bool) -> list[int]:
    """Curve points; the smoke run keeps only the last (each costs a prediction)."""
    return [n_steps] if quick else sorted({max(1, round(n_steps * f)) for f in CURVE})


def _plates(quick: bool) -> tuple[dict, dict[str, dict[str, list[str]]]]:
    data = load_pairs(DATA / "nuclei-dsb2018")
    train = hash_order(list(data))[:100]  # bench/accuracy.py's training fields
    plates = {}
    for k, fields in (("plate1", train[0::2]), ("plate2", train[1::2])):
        fit, held = fields[:-SCORE_FIELDS], fields[-SCORE_FIELDS:]
        if quick:  # a few small fields: on large ones the watershed tuning takes longest
            fit = [s for s in fit if data[s]["img"].size <= 256**2][:4]
            held = [s for s in held if data[s]["img"].size <= 256**2][:2]
        plates[k] = {"fit": fit, "score": held}
    return data, plates


def _options(n_steps: int, device: str, snapshots: list[int]) -> DistanceUNetOptions:
    """The product recipe with this run's budget; weight snapshots for the curve."""
    train = recipe().model_copy(
        update={
            "n_steps": n_steps,
            "snapshot_steps": snapshots,
            "device": device,
        }
    )
    return DistanceUNetOptions(tta=False, train=train)


def _reach(curve: list[dict[str, Any]], target: float) -> int | None:
    """First curve step whose AP@0.5 is at least `target`."""
    return next((c["step"] for c in curve if c["ap50"] >= target), None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    data, plates = _plates(args.quick)
    n = args.steps or (8 if args.quick else 800)

    def pairs(plate: str) -> tuple[list, list]:
        fit = plates[plate]["fit"]
        return [data[s]["img"] for s in fit], [data[s]["lab"] for s in fit]

    def scoring(plate: str) -> dict[str, Any]:
        names = plates[plate]["score"]
        return {
            "test_images": [data[s]["img"] for s in names],
            "truths": [data[s]["lab"] for s in names],
            "names": names,
        }

    runs: dict[str, dict[str, Any]] = {}
    # plate 1: N steps from scratch, scored on its own held-out fields
    rec: dict[str, Any] = {}
    s1 = scoring("plate1")
    opts1 = _options(n, args.device, [])
    with timed(rec, "train"):
        state1, hist1 = train_distance_unet(*pairs("plate1"), options=opts1)
    final1 = opts1.model_copy(update=hist1.get("tuned_options", {}))
    with timed(rec, "predict"):
        preds = [segment_distance_unet(state1, im, options=final1) for im in s1["test_images"]]
    runs["plate 1, from scratch"] = (
        score(preds, s1["truths"], s1["names"])
        | rec
        | {"steps": hist1["steps"], "note": f"{n} steps, scored on plate 1's held-out fields"}
    )
    # zero-shot: plate 1's model on plate 2, nothing retrained
    rec = {}
    s2 = scoring("plate2")
    with timed(rec, "predict"):
        preds = [segment_distance_unet(state1, im, options=final1) for im in s2["test_images"]]
    runs["plate 2, plate 1's model (zero-shot)"] = (
        score(preds, s2["truths"], s2["names"]) | rec | {"steps": 0, "note": "no training"}
    )
    # plate 2 from scratch with the full budget
    runs["plate 2, from scratch"] = learned_run(
        train_fn=train_distance_unet,
        segment_fn=segment_distance_unet,
        options=_options(n, args.device, _snapshots(n, args.quick)),
        train_data=pairs("plate2"),
        note=f"{n} steps on plate 2",
        **s2,
    )
    # plate 2 fine-tuned from plate 1: the options the product derives for a fine-tuned model
    fraction = TrainConfig.model_fields["fine_tune_fraction"].default
    tuned_options = fine_tune_options(
        "distance_unet",
        {"train": recipe().model_copy(update={"n_steps": n}).model_dump(mode="json")},
        {"options": final1.model_dump(mode="json")},
        fraction,
    )
    ft = DistanceUNetOptions.model_validate(tuned_options | {"tta": False})
    m = ft.train.n_steps
    ft = ft.model_copy(
        update={
            "train": ft.train.model_copy(
                update={"snapshot_steps": _snapshots(m, args.quick), "device": args.device}
            )
        }
    )
    fine = learned_run(
        train_fn=train_distance_unet,
        segment_fn=segment_distance_unet,
        options=ft,
        train_data=pairs("plate2"),
        note=f"{m} steps ({fraction:g} x {n}) on plate 2, from plate 1's model",
        extra_train_kwargs={"parent_state": state1},
        **s2,
    )
    zero = runs["plate 2, plate 1's model (zero-shot)"]
    fine["learning_curve"].insert(
        0, {"step": 0, "ap50": zero["ap50_image_mean"], "ap_mean": zero["ap_mean_image_mean"]}
    )
    runs["plate 2, fine-tuned from plate 1"] = fine
    scratch = runs["plate 2, from scratch"]
    plate1 = runs["plate 1, from scratch"]
    reach = {
        f"{target_name} (AP@0.5 {target:.3f})": {
            "from scratch": _reach(scratch["learning_curve"], target),
            "fine-tuned": _reach(fine["learning_curve"], target),
        }
        for target_name, target in (
            ("plate 1's own accuracy", plate1["ap50_image_mean"]),
            ("plate 2 from scratch, full budget", scratch["ap50_image_mean"]),
        )
    }
    return {
        "budget": n,
        "fine_tune_steps": m,
        "fine_tune_fraction": fraction,
        "plates": plates,
        "runs": runs,
        "steps_to_reach": reach,
    }


def machine(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": args.device,
        "device_name": platform.processor() or platform.machine(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def markdown(result: dict[str, Any]) -> str:
    env = result["machine"]
    lines = [
        "# Transfer across plates (distance U-Net, nuclei-dsb2018)",
        "",
        " ".join((__doc__ or "").split("\n\n")[1].split()),
        "",
        f"Run {env['date']} on {env['device']} ({env['device_name']}, {env['cpu_count']} "
        f"cores), {env['threads']} torch thread(s), load average at start "
        f"{env['load_average_at_start']}; {result['wall_s']:.0f} s wall, "
        f"{result['cpu_s']:.0f} s CPU in all. Budget N = {result['budget']} steps of 8 crops, "
        f"fine-tuning {result['fine_tune_steps']} steps. Plate 1: "
        f"{len(result['plates']['plate1']['fit'])} training / "
        f"{len(result['plates']['plate1']['score'])} scoring fields; plate 2: "
        f"{len(result['plates']['plate2']['fit'])} / {len(result['plates']['plate2']['score'])}.",
        "",
        "| run | steps | AP@0.5 | mean AP 0.5:0.95 | pred / true | train wall / CPU s | "
        "learning curve (step: AP@0.5 / mean AP) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in result["runs"].items():
        curve = ", ".join(
            f"{c['step']}: {c['ap50']:.3f} / {c['ap_mean']:.3f}"
            for c in r.get("learning_curve", [])
        )
        train = f"{r['train_wall_s']:.0f} / {r['train_cpu_s']:.0f}" if "train_wall_s" in r else "–"
        lines.append(
            f"| {name} | {r['steps']} | {r['ap50_image_mean']:.3f} | "
            f"{r['ap_mean_image_mean']:.3f} | {r['n_pred']} / {r['n_true']} | {train} | "
            f"{curve or '–'} |"
        )
    lines += ["", "Steps until plate 2's curve reaches an accuracy (AP@0.5, image mean):", ""]
    lines += ["| target | from scratch | fine-tuned |", "|---|---|---|"]
    for target, steps in result["steps_to_reach"].items():
        cells = [
            "not within the budget" if steps[k] is None else str(steps[k])
            for k in ("from scratch", "fine-tuned")
        ]
        lines.append(f"| {target} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke version for the tests")
    p.add_argument("--steps", type=int, default=None, help="budget N (default 800, quick 8)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not (DATA / "nuclei-dsb2018").is_dir():
        print(f"data not found: {DATA / 'nuclei-dsb2018'}; nothing to benchmark")
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = machine(args)
    t0, c0 = time.perf_counter(), time.process_time()
    result = {"machine": env, "args": vars(args)} | run(args)
    result |= {
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(time.process_time() - c0, 1),
    }
    stem = "transfer_quick" if args.quick else "transfer"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    for name, r in result["runs"].items():
        print(f"{name}: {r['steps']} steps, AP@0.5 {r['ap50_image_mean']:.3f}")
    print(json.dumps(result["steps_to_reach"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
