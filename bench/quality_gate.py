"""Does the pipeline's quality gate pick the method that is really better on unseen fields?

A plate is built from 40 training fields of nuclei-dsb2018 (bench/accuracy.py's fixed split:
SHA-1 order, first 100 are training; ground truth stored as `nuclei_gt`, pixel size 1 µm as
`hcsseg import-pairs` writes for DSB, which carries none). On it the product code runs as the
`plate-pipeline` flow does (`preset_config` -> `plan_pipeline` -> `train_config` ->
`train_plate_segmentation` -> `run_gate`), for the `supervised` preset (the gate scores AP@0.5
against `nuclei_gt`) and the `annotation-free` one (the model learns from classical
pseudo-labels; the gate scores one-to-one marker F1 against blobs detected in the real stain),
each at a weak and a reasonable step budget (`train.steps`). Every verdict is then checked
against the truth: AP@0.5 and mean AP of the model and of the classical baseline on the 40
test fields of the split (bench/seg_common.score, the scoring of bench/accuracy.py), segmented
by the product's `Segmenter` (`make_segmenter`) at the scale the gate uses. Nothing is tuned
on the test fields.

    python bench/quality_gate.py            # about 20 min on a 2-core CPU, 1 torch thread
    python bench/quality_gate.py --quick    # smoke version for the tests (under a minute)
    python bench/quality_gate.py --render   # re-write the markdown from the JSON

Writes bench/results/quality_gate.{json,md} (quality_gate_quick.* for --quick).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from seg_common import DATA, RESULTS, hash_order, load_pairs, score, timed

from hcsseg.config import ProcessConfig
from hcsseg.io.labels import write_labels
from hcsseg.io.plate import Plate, open_plate
from hcsseg.io.tiff_import import plate_from_arrays
from hcsseg.model_store import load_card
from hcsseg.pipeline.gate import run_gate
from hcsseg.pipeline.plan import PipelinePlan, TrainStage, plan_pipeline, train_config
from hcsseg.pipeline.presets import preset_config
from hcsseg.pipeline.training import TrainConfig, gather, train_plate_segmentation
from hcsseg.pipeline.wells import make_segmenter, segmentation_pixel_size
from hcsseg.segment.methods import Segmenter

TRUTH = "nuclei_gt"
CHANNEL = "DNA"
PLATE_PIXEL_UM = 1.0  # hcsseg import-pairs' default; DSB fields carry no pixel size
SCENARIOS = ("supervised", "annotation-free")  # preset names


# ---------------------------------------------------------------------------- data


def split(quick: bool) -> tuple[dict[str, dict[str, np.ndarray]], list[str], list[str]]:
    """bench/accuracy.py's split: SHA-1 order, first 100 training, last 40 test. The plate
    takes the first 40 training fields; --quick a few small ones of each."""
    data = load_pairs(DATA / "nuclei-dsb2018")
    order = hash_order(list(data))
    train, test = order[:100], order[-40:]
    if quick:  # small fields: the watershed tuning and inference stay cheap
        small = [s for s in train if data[s]["img"].size <= 256**2]
        return data, small[:6], [s for s in test if data[s]["img"].size <= 256**2][:3]
    return data, train[:40], test


def build_plate(root: Path, data: dict[str, dict[str, np.ndarray]], names: list[str]) -> Plate:
    """One field per DSB image, five per well (fields may differ in shape), truth as
    `nuclei_gt`, as tests/test_pipeline.py's dsb_plate does."""
    fields = [
        ((chr(ord("B") + i // 20), 2 + (i % 20) // 5), data[s]["img"][None])
        for i, s in enumerate(names)
    ]
    plate = plate_from_arrays(
        root / "dsb-gate.zarr",
        name="dsb-gate",
        fields=fields,
        channels=[CHANNEL],
        pixel_size_um=PLATE_PIXEL_UM,
    )
    writable = open_plate(plate.url, mode="r+")
    refs = list(writable.iter_fields())
    for ref, s in zip(refs, names, strict=True):
        write_labels(writable, ref, TRUTH, data[s]["lab"].astype(np.uint32))
    return open_plate(plate.url)


# ---------------------------------------------------------------------------- segmenting


def segment_field(seg: Segmenter, image: np.ndarray, config: ProcessConfig) -> np.ndarray:
    """Nuclei of one test field as run_gate segments a plate field: the model on its input
    channels (here the one stain), the classical baseline at the field's estimated scale."""
    px = config.pixel_size_um or PLATE_PIXEL_UM
    seg_px = segmentation_pixel_size(image, px, config)
    x = image[None] if (seg.card or {}).get("input_channels") else image
    return seg.nuclei(x, pixel_size_um=seg_px)


def score_test(
    seg: Segmenter, data: dict, names: list[str], config: ProcessConfig
) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    with timed(rec, "predict"):
        preds = [segment_field(seg, data[s]["img"], config) for s in names]
    return score(preds, [data[s]["lab"] for s in names], names) | rec


def pseudo_label_quality(plate: Plate, plan: PipelinePlan, stage: TrainStage) -> dict[str, Any]:
    """What the annotation-free model is taught: its pseudo-labels (`gather`, as training
    reads them) against `nuclei_gt` on its training fields (never the test fields)."""
    config = train_config(plan, stage)
    refs, _, targets = gather(plate, config)
    truths = [plate.read_labels(r, TRUTH) for r in refs]
    return score(targets, truths, [r.path for r in refs])


# ---------------------------------------------------------------------------- one model


def gate_breakdown(
    plan: PipelinePlan, stage: TrainStage, model_id: str, config: ProcessConfig
) -> list[dict[str, Any]]:
    """Per held-back field, both the truth (AP@0.5 vs nuclei_gt) and the proxy (marker F1),
    each by run_gate on that one field: how well the proxy tracks the truth."""
    rows = []
    for path in stage.gate_fields:
        one = dataclasses.replace(stage, gate_fields=[path])
        truth = run_gate(plan, dataclasses.replace(one, truth=TRUTH), model_id, config)
        proxy = run_gate(plan, dataclasses.replace(one, truth=None), model_id, config)
        rows.append(
            {
                "field": path,
                "ap50_model": truth["candidate_score"],
                "ap50_classical": truth["baseline_score"],
                "proxy_model": proxy["candidate_score"],
                "proxy_classical": proxy["baseline_score"],
            }
        )
    return rows


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def run_model(
    plate: Plate,
    preset: str,
    steps: int,
    store: Path,
    args: argparse.Namespace,
    data: dict,
    test: list[str],
    classical: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Train one model as the pipeline does, take the gate's verdict, check it on test."""
    overrides: dict[str, Any] = {
        "model_store": str(store),
        "train": {"steps": steps, "gate_fields": args.gate_fields},
    }
    config = preset_config(preset, overrides)
    plan = plan_pipeline(plate.url, config)
    stage = plan.stage("nuclei")
    assert stage is not None and [s.compartment for s in plan.train] == ["nuclei"], plan.notes
    tc: TrainConfig = train_config(plan, stage)
    if not args.tta:  # the one change from the pipeline: no test-time flips (4x cheaper)
        tc = tc.model_copy(update={"options": tc.options | {"tta": False}})
    rec: dict[str, Any] = {}
    with timed(rec, "train"):
        model_id = train_plate_segmentation(plan.plate_url, tc, store=plan.model_store)
    card = load_card(plan.model_store, model_id)
    with timed(rec, "gate"):
        verdict = run_gate(plan, stage, model_id, config)
    with timed(rec, "breakdown"):
        fields = gate_breakdown(plan, stage, model_id, config)
    model = make_segmenter("nuclei", stage.method, model_id, plan.model_store, config)
    key = config.model_dump_json(include={"nuclei", "scale", "pixel_size_um", "typical_nucleus_um"})
    if key not in classical:  # the same baseline options in both presets: scored once
        base = make_segmenter("nuclei", "classical", None, plan.model_store, config)
        classical[key] = score_test(base, data, test, config)
    test_model = score_test(model, data, test, config)
    test_base = classical[key]
    better = (
        "candidate"
        if test_model["ap50_image_mean"] > test_base["ap50_image_mean"]
        else ("baseline")
    )
    history = card.get("history", {})
    return {
        "preset": preset,
        "budget": steps,
        "model_id": model_id,
        "steps_done": history.get("steps"),
        "train_loop_wall_s": round(history.get("seconds", float("nan")), 1),
        "train_loop_cpu_s": round(history.get("cpu_seconds", float("nan")), 1),
        "s_per_step": round(
            history.get("seconds", float("nan")) / max(history.get("steps", 1), 1), 3
        ),
        "tuned": {k: card["options"].get(k) for k in ("h", "foreground_threshold", "min_area")},
        "tta": card["options"].get("tta"),
        "training_fields": len(stage.fields),
        "gate_field_paths": stage.gate_fields,
        "gate": verdict,
        "held_back": {
            "ap50_model": _mean([f["ap50_model"] for f in fields]),
            "ap50_classical": _mean([f["ap50_classical"] for f in fields]),
            "proxy_model": _mean([f["proxy_model"] for f in fields]),
            "proxy_classical": _mean([f["proxy_classical"] for f in fields]),
            "per_field": fields,
        },
        "test": {
            "ap50_model": test_model["ap50_image_mean"],
            "ap50_classical": test_base["ap50_image_mean"],
            "ap_mean_model": test_model["ap_mean_image_mean"],
            "ap_mean_classical": test_base["ap_mean_image_mean"],
            "n_pred_model": test_model["n_pred"],
            "n_pred_classical": test_base["n_pred"],
            "n_true": test_model["n_true"],
            "predict_wall_s_model": test_model["predict_wall_s"],
            "better": better,
        },
        "right": verdict["winner"] == better,
        "timing": rec,
    }


# ---------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": "cpu",
        "device_name": platform.processor() or platform.machine(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _f(x: float | None) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.3f}"


def _d(a: float, b: float) -> str:
    """Signed difference with 4 decimals: near-ties must be visible as such."""
    return "–" if not (math.isfinite(a) and math.isfinite(b)) else f"{a - b:+.4f}"


def markdown(result: dict[str, Any]) -> str:
    env = result["machine"]
    setup = " ".join((__doc__ or "").split("\n\n")[1].split())
    lines = [
        "# Quality gate: does it pick the better method on unseen fields?",
        "",
        setup,
        "",
        f"Run {env['date']} on {env['device']} ({env['device_name']}, {env['cpu_count']} "
        f"cores), {env['threads']} torch thread(s), load average at start "
        f"{env['load_average_at_start']}; {result['wall_s']:.0f} s wall, {result['cpu_s']:.0f} s "
        f"CPU in all. Plate: {result['plate_fields']} fields; gate fields "
        f"{result['gate_fields']} (`train.gate_fields` {result['args']['gate_fields']}), "
        f"the rest train (the recipe holds 15 % of them out for early stopping and for "
        f"picking the watershed settings). Test: {len(result['test'])} fields. "
        + (
            "Test-time flips off (`TrainConfig.options['tta'] = False`, the only change from "
            "the pipeline's training config; in the pipeline: `train.nuclei_options`), so gate and "
            "test see the same inference."
            if not result["args"]["tta"]
            else "Test-time flips on (the recipe's default)."
        ),
        "",
    ]
    for scenario, runs in result["scenarios"].items():
        lines += [
            f"## {scenario}",
            "",
            "| budget | steps done | gate metric | gate model / classical (Δ) | winner | "
            "test AP@0.5 model / classical (Δ) | test mean AP model / classical | right? | "
            "held-back AP@0.5 model / classical | held-back marker F1 model / classical |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in runs:
            g, t, h = r["gate"], r["test"], r["held_back"]
            winner = "model" if g["winner"] == "candidate" else "classical"
            lines.append(
                f"| {r['budget']} | {r['steps_done']} | {g['metric']} | "
                f"{_f(g['candidate_score'])} / {_f(g['baseline_score'])} "
                f"({_d(g['candidate_score'], g['baseline_score'])}, n={g['n_fields']}) | "
                f"{winner} | {_f(t['ap50_model'])} / {_f(t['ap50_classical'])} "
                f"({_d(t['ap50_model'], t['ap50_classical'])}) | "
                f"{_f(t['ap_mean_model'])} / {_f(t['ap_mean_classical'])} | "
                f"{'yes' if r['right'] else '**no**'} | "
                f"{_f(h['ap50_model'])} / {_f(h['ap50_classical'])} | "
                f"{_f(h['proxy_model'])} / {_f(h['proxy_classical'])} |"
            )
        lines.append("")
    pl = result.get("pseudo_labels")
    if pl:
        lines += [
            f"Pseudo-labels the annotation-free model learns from, against `nuclei_gt` on its "
            f"{pl['n_fields']} training fields: AP@0.5 {pl['ap50']:.3f}, mean AP "
            f"{pl['ap_mean']:.3f} (the classical teacher as `hcsseg.pipeline.training.gather` "
            f"runs it); the baseline at the estimated scale on "
            f"the same fields: {pl['baseline_ap50']:.3f} / {pl['baseline_ap_mean']:.3f}.",
            "",
        ]
    lines += [
        "Per held-back field (AP@0.5 vs `nuclei_gt` and marker F1, model / classical, each "
        "from `run_gate` on that field alone):",
        "",
        "| scenario | budget | field | AP@0.5 | marker F1 |",
        "|---|---|---|---|---|",
    ]
    stems = result.get("plate_fields_by_path", {})
    for scenario, runs in result["scenarios"].items():
        for r in runs:
            for f in r["held_back"]["per_field"]:
                name = f"{f['field']} ({stems.get(f['field'], '?')[:10]})"
                lines.append(
                    f"| {scenario} | {r['budget']} | {name} | "
                    f"{_f(f['ap50_model'])} / {_f(f['ap50_classical'])} | "
                    f"{_f(f['proxy_model'])} / {_f(f['proxy_classical'])} |"
                )
    lines += [
        "",
        "Time per step of the benchmark (wall / CPU s):",
        "",
        "| step | wall s | CPU s |",
        "|---|---|---|",
    ]
    for name, t in result["timing"].items():
        lines.append(f"| {name} | {t['wall_s']:.1f} | {t['cpu_s']:.1f} |")
    for scenario, runs in result["scenarios"].items():
        for r in runs:
            tm = r["timing"]
            for part in ("train", "gate", "breakdown"):
                lines.append(
                    f"| {scenario} {r['budget']} steps: {part} | {tm[f'{part}_wall_s']:.1f} | "
                    f"{tm[f'{part}_cpu_s']:.1f} |"
                )
            lines.append(
                f"| {scenario} {r['budget']} steps: test inference (model) | "
                f"{r['test']['predict_wall_s_model']:.1f} | – |"
            )
    steps = [
        f"{s} {r['budget']}: {r['s_per_step']:.2f} s"
        for s, runs in result["scenarios"].items()
        for r in runs
    ]
    lines += ["", f"Training loop per step (wall): {', '.join(steps)}.", ""]
    if result.get("reading"):
        lines += ["## Reading", "", *[f"- {x}" for x in result["reading"]], ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------- main


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    timing: dict[str, dict[str, float]] = {}

    def step(name: str) -> Any:
        rec: dict[str, float] = {}
        timing[name] = rec
        return rec

    rec = step("load data")
    with timed(rec, "x"):
        data, fields, test = split(args.quick)
    rec = step("build plate")
    with timed(rec, "x"):
        plate = build_plate(work, data, fields)
    budgets = args.budgets or ([2, 4] if args.quick else [40, 600])
    classical: dict[str, dict[str, Any]] = {}
    scenarios: dict[str, list[dict[str, Any]]] = {}
    pseudo: dict[str, Any] | None = None
    for preset in SCENARIOS:
        scenario = preset
        if preset == "annotation-free":
            rec = step("pseudo-label check (training fields)")
            with timed(rec, "x"):
                cfg = preset_config(preset, {"model_store": str(work / "models-check")})
                plan = plan_pipeline(plate.url, cfg)
                stage = plan.stage("nuclei")
                assert stage is not None
                s = pseudo_label_quality(plate, plan, stage)
                base = make_segmenter("nuclei", "classical", None, None, cfg)
                refs = [r for r in plate.iter_fields() if r.path in set(stage.fields)]
                images = [plate.read_channels(r, [CHANNEL])[0] for r in refs]
                b = score(
                    [segment_field(base, im, cfg) for im in images],
                    [plate.read_labels(r, TRUTH) for r in refs],
                    [r.path for r in refs],
                )
            pseudo = {
                "n_fields": len(s["per_image_ap50"]),
                "ap50": s["ap50_image_mean"],
                "ap_mean": s["ap_mean_image_mean"],
                "baseline_ap50": b["ap50_image_mean"],
                "baseline_ap_mean": b["ap_mean_image_mean"],
            }
        runs = []
        for steps in budgets:
            store = work / f"models-{scenario}-{steps}"
            r = run_model(plate, preset, steps, store, args, data, test, classical)
            g = r["gate"]
            print(
                f"[{scenario} {steps}] gate {g['metric']}: {g['candidate_score']:.3f} vs "
                f"{g['baseline_score']:.3f} -> {g['winner']}; test AP@0.5 "
                f"{r['test']['ap50_model']:.3f} vs {r['test']['ap50_classical']:.3f}; "
                f"right: {r['right']}",
                flush=True,
            )
            runs.append(r)
        scenarios[scenario] = runs
    for rec in timing.values():  # one timed block each, named "x"
        rec["wall_s"], rec["cpu_s"] = rec.pop("x_wall_s"), rec.pop("x_cpu_s")
    first = next(iter(classical.values()))
    timing["classical on the test fields (once)"] = {
        "wall_s": first["predict_wall_s"],
        "cpu_s": first["predict_cpu_s"],
    }
    return {
        "plate_fields": len(fields),
        "plate_fields_by_path": {
            r.path: s for r, s in zip(plate.iter_fields(), fields, strict=True)
        },
        "gate_fields": len(scenarios["supervised"][0]["gate_field_paths"]),
        "test": test,
        "pseudo_labels": pseudo,
        "scenarios": scenarios,
        "timing": timing,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke version for the tests")
    p.add_argument("--budgets", type=int, nargs="+", default=None, help="default 40 600")
    p.add_argument("--gate-fields", type=int, default=8, help="train.gate_fields")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--keep", type=Path, default=None, help="keep plate and models here")
    p.add_argument("--render", action="store_true", help="only re-write the markdown")
    args = p.parse_args(argv)
    stem = "quality_gate_quick" if args.quick else "quality_gate"
    if args.render:
        result = json.loads((RESULTS / f"{stem}.json").read_text())
        (RESULTS / f"{stem}.md").write_text(markdown(result))
        return 0
    torch.set_num_threads(args.threads)
    if not (DATA / "nuclei-dsb2018").is_dir():
        print(f"data not found: {DATA / 'nuclei-dsb2018'}; nothing to benchmark")
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = machine()
    work = args.keep or Path(tempfile.mkdtemp(prefix="hcsseg-gate-"))
    work.mkdir(parents=True, exist_ok=True)
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        result = {"machine": env, "args": vars(args) | {"keep": str(args.keep)}} | run(args, work)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    result |= {
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(time.process_time() - c0, 1),
    }
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
