"""Checkpoint choice and post-processing tuning, judged on held-out *training* fields.

The 100 DSB training fields of bench/accuracy.py's split are cut 70 / 30 (never a test
field). The product's recipe trains on the 70 (it holds out its own 15 % for validation and
tuning, as a user's run does) with weight snapshots; each snapshot's maps on the 30 are
scored at every post-processing grid point, so one can ask offline:

- is the last snapshot or the best validation-loss one the better model?
- does tuning on the internal validation fields beat the defaults on the 30, and at what
  lead (in standard errors) should it be allowed to move?

    python bench/holdout_nuclei.py train --seed 0      # ~20 min on one CPU thread
    python bench/holdout_nuclei.py score --seed 0      # ~4 min per snapshot
    python bench/holdout_nuclei.py summary             # bench/results/holdout_nuclei.{json,md}
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from seg_common import DATA, hash_order, load_pairs

from hcsseg.evaluate.metrics import instance_metrics
from hcsseg.learning.data import split_train_val
from hcsseg.learning.devices import seed_everything
from hcsseg.segment.distance_unet import (
    H_GRID,
    MIN_AREA_GRID,
    THRESHOLD_GRID,
    DistanceUNetOptions,
    clear_winner,
    labels_from_maps,
    min_area_px,
    predict_distance_unet,
    recipe,
    train_distance_unet,
)
from hcsseg.segment.scale import median_diameter, scale_factor

RESULTS = Path(__file__).parent / "results"
STEPS = 2400
SNAPSHOTS = (1600, 2000, 2400)
LEADS = (0.0, 1.0, 1.5, 2.0, 2.5, 3.0)


def _split() -> tuple[dict, list[str], list[str]]:
    data = load_pairs(DATA / "nuclei-dsb2018")
    train = hash_order(list(data))[:100]
    return data, train[:70], train[70:]


def _options(seed: int) -> DistanceUNetOptions:
    train = recipe().model_copy(
        update={
            "n_steps": STEPS,
            "val_every": STEPS // 10,
            "patience": 100,
            "seed": seed,
            "snapshot_steps": list(SNAPSHOTS),
        }
    )
    return DistanceUNetOptions(train=train)


def train(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file

    data, a, _ = _split()
    _, hist = train_distance_unet(
        [data[s]["img"] for s in a], [data[s]["lab"] for s in a], options=_options(args.seed)
    )
    args.work.mkdir(parents=True, exist_ok=True)
    for step, state in hist["snapshots"].items():
        path = args.work / f"s{args.seed}_{step}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    info = {k: hist[k] for k in ("val_step", "val_loss", "kept_step", "steps")}
    (args.work / f"s{args.seed}_history.json").write_text(json.dumps(info))


def _grid() -> list[tuple[float, float, int]]:
    return [(h, t, a) for h in H_GRID for t in THRESHOLD_GRID for a in {*MIN_AREA_GRID, 95}]


def score(args: argparse.Namespace) -> None:
    from safetensors.torch import load_file

    data, a, b = _split()
    opts = _options(args.seed)
    labs = [data[s]["lab"] for s in a]
    _, val_idx = split_train_val(len(a), opts.train.val_fraction, seed_everything(args.seed))
    factors = [scale_factor(median_diameter(lab), opts.canonical_diameter) for lab in labs]
    prior = float(np.median([f for i, f in enumerate(factors) if i not in val_idx]))
    base = opts.model_copy(update={"prior_factor": prior, "tta": False})
    out: dict[str, dict] = {}
    for step in SNAPSHOTS:
        state = load_file(str(args.work / f"s{args.seed}_{step}.safetensors"))
        sets = {"val": [(data[a[i]]["img"], labs[i]) for i in val_idx]}
        sets["holdout"] = [(data[s]["img"], data[s]["lab"]) for s in b]
        out[str(step)] = {}
        for name, pairs in sets.items():
            maps = [predict_distance_unet(state, img, options=base) for img, _ in pairs]
            out[str(step)][name] = {
                f"{h},{t},{ar}": [
                    _ap(labels_from_maps(m, base, h=h, threshold=t, min_area=ar), lab)
                    for m, (_, lab) in zip(maps, pairs, strict=True)
                ]
                for h, t, ar in _grid()
            }
        print(f"seed {args.seed} step {step} scored", flush=True)
    (args.work / f"s{args.seed}_grid.json").write_text(json.dumps(out))


def _ap(pred: np.ndarray, truth: np.ndarray) -> list[float]:
    res = instance_metrics(pred, truth)
    return [float(res.ap[0]), float(res.mean_ap)]


def _pick(val: dict[str, np.ndarray], keys: list[str], reference: str, lead: float) -> str:
    """tune_postprocessing's rule with a given lead in standard errors."""
    return clear_winner({k: val[k] for k in keys}, reference, lead)


def summary(args: argparse.Namespace) -> None:
    d = DistanceUNetOptions()
    ref = f"{d.h},{d.foreground_threshold},{min_area_px(d)}"
    rows = []
    for path in sorted(args.work.glob("s*_grid.json")):
        seed = int(path.name[1:].split("_")[0])
        for step, sets in json.loads(path.read_text()).items():
            val = {k: np.asarray(v).mean(1) for k, v in sets["val"].items()}
            hold = {k: np.asarray(v).mean(0) for k, v in sets["holdout"].items()}
            row = {"seed": seed, "step": int(step), "default": [round(x, 4) for x in hold[ref]]}
            for lead in LEADS:
                h, t, _ = _pick(val, [k for k in val if k.endswith(",95")], ref, lead).split(",")
                area_keys = [k for k in val if k.startswith(f"{h},{t},")]
                picked = _pick(val, area_keys, f"{h},{t},95", lead)
                row[f"lead {lead:g} se"] = {"picked": picked, "ap50": round(hold[picked][0], 4)}
            rows.append(row)
    args.out.mkdir(exist_ok=True)
    (args.out / "holdout_nuclei.json").write_text(json.dumps(rows, indent=1))
    head = ["seed", "step", "defaults AP@0.5", *(f"lead {x:g} se" for x in LEADS)]
    lines = [
        "# Post-processing tuning on held-out DSB training fields",
        "",
        "Trained on 70 of the 100 training fields (the recipe's own 15 % held out for "
        "validation and tuning), scored on the other 30; no test field. Each cell: AP@0.5 "
        "on the 30 with the setting the tuning rule picks at that lead (h, threshold, "
        f"min area; defaults {ref}).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [str(r["seed"]), str(r["step"]), f"{r['default'][0]:.3f}"]
        for lead in LEADS:
            c = r[f"lead {lead:g} se"]
            cells.append(f"{c['ap50']:.3f}" + ("" if c["picked"] == ref else f" ({c['picked']})"))
        lines.append("| " + " | ".join(cells) + " |")
    (args.out / "holdout_nuclei.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["train", "score", "summary"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("/tmp/hcsseg-holdout"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"train": train, "score": score, "summary": summary}[args.what](args)


if __name__ == "__main__":
    main()
