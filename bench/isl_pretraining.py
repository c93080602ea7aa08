"""In-silico-labelling pretraining (Bonte et al. 2024) on dense-cells: does initialising the
cell-segmentation U-Net from a virtual-staining U-Net help when few fields are annotated?

For 1 and 5 annotated training fields (the first by SHA-1 order, as in
accuracy.py's dense section; test = the same 2 fields), the distance U-Net segments cells
from the surface stain alone, starting either from random weights or from a U-Net with the
same encoder and decoder first trained to predict DAPI from the surface stain of those
training fields (no annotation needed for that step). Same seed and step budget for both.
Run from the repository root: `python bench/isl_pretraining.py` (about 10 min on one CPU
thread). Writes bench/results/isl_pretraining.json and segmentation.md.
"""

from __future__ import annotations

import numpy as np
import torch
from seg_common import DATA, environment, hash_order, load_pairs, score, setup, timed, write_result

from hcsseg.learning.options import TrainOptions
from hcsseg.segment.distance_unet import (
    DistanceUNetOptions,
    segment_distance_unet,
    train_distance_unet,
)
from hcsseg.virtual_stain.model import train_virtual_stain
from hcsseg.virtual_stain.options import VirtualStainOptions

VS_STEPS, SEG_STEPS = 150, 200
TRAIN_OPTS = TrainOptions(n_steps=SEG_STEPS, batch_size=4, crop_size=128, learning_rate=2e-3)
# resnet18, decoder as virtual staining's; native scale, as the virtual-staining U-Net sees it
SEG_OPTS = DistanceUNetOptions(
    train=TRAIN_OPTS, canonical_diameter=None, tta=False, tune_postprocessing=False
)


def pretrain_virtual_staining(
    surfaces: list[np.ndarray], dapis: list[np.ndarray], keys: list[str]
) -> tuple[dict[str, torch.Tensor], dict]:
    """The plate's virtual-staining model (hcsseg.virtual_stain, L1 loss, its own validation
    split) trained to predict DAPI from the surface stain, with the segmentation model's
    encoder and decoder."""
    opts = VirtualStainOptions(
        source_channels=["surface"],
        target_channel="DAPI",
        encoder_name=SEG_OPTS.encoder_name,
        decoder_channels=list(SEG_OPTS.decoder_channels),
        training=TRAIN_OPTS.model_copy(
            update={"n_steps": VS_STEPS, "val_fraction": 0.2, "val_every": 50, "val_crops": 8}
        ),
    )
    model = train_virtual_stain([s[None] for s in surfaces], dapis, keys, options=opts)
    state = {k: v.detach().cpu() for k, v in model.network.state_dict().items()}
    return state, model.history


def main() -> None:
    setup()
    data = load_pairs(DATA / "dense-cells", extra=["dapi"])
    order = hash_order(list(data))
    test = order[-2:]
    truths = [data[s]["lab"] for s in test]
    opts = SEG_OPTS
    methods: dict[str, dict] = {}
    for n in (1, 5):
        train = order[:n]
        images = [data[s]["img"] for s in train]
        labels = [data[s]["lab"] for s in train]
        vs_rec: dict = {}
        with timed(vs_rec, "pretrain"):
            vs_state, vs_hist = pretrain_virtual_staining(
                images, [data[s]["dapi"] for s in train], train
            )
        vs_loss = [
            round(float(np.mean(part)), 4) for part in (vs_hist["loss"][:10], vs_hist["loss"][-10:])
        ]
        for init in ("random", "virtual staining"):
            rec: dict = {}
            with timed(rec, "train"):
                state, hist = train_distance_unet(
                    images,
                    labels,
                    options=opts,
                    init_state=vs_state if init != "random" else None,
                )
            if init != "random":
                rec["train_cpu_s"] += vs_rec["pretrain_cpu_s"]
                rec["train_wall_s"] += vs_rec["pretrain_wall_s"]
            with timed(rec, "predict"):
                preds = [segment_distance_unet(state, data[s]["img"], options=opts) for s in test]
            loss = hist["loss"]
            methods[f"{n} field(s), {init} init"] = (
                score(preds, truths, test)
                | rec
                | {
                    "train_fields": train,
                    "first_last_loss": [
                        round(float(np.mean(loss[:10])), 4),
                        round(float(np.mean(loss[-10:])), 4),
                    ],
                    "note": (
                        f"VS pretraining {vs_hist['steps']} steps, L1 {vs_loss[0]} -> "
                        f"{vs_loss[1]}; "
                        "CPU s include it"
                        if init != "random"
                        else f"{SEG_STEPS} steps x 4 crops of 128 px"
                    ),
                }
            )

    gains = {
        n: methods[f"{n} field(s), virtual staining init"]["ap50_image_mean"]
        - methods[f"{n} field(s), random init"]["ap50_image_mean"]
        for n in (1, 5)
    }
    write_result(
        "isl_pretraining",
        {
            "setup": (
                "dense-cells, cell segmentation from the surface stain only (distance U-Net, "
                f"{opts.encoder_name}, decoder {list(opts.decoder_channels)}), {SEG_STEPS} "
                "steps; test fields "
                f"{', '.join(test)}. Virtual-staining pretraining: surface stain -> DAPI on "
                f"the same training fields (hcsseg.virtual_stain, up to {VS_STEPS} steps with "
                "early stopping), encoder and decoder transferred."
            ),
            "test": test,
            "environment": environment(),
            "methods": methods,
            "findings": [
                f"AP@0.5 change from virtual-staining initialisation: {gains[1]:+.3f} with 1 "
                f"training field, {gains[5]:+.3f} with 5 (2 test fields; CPU budgets of a few "
                "hundred steps, so differences of a few hundredths are within run-to-run noise)."
            ],
        },
    )


if __name__ == "__main__":
    main()
