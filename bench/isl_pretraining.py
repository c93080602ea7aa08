"""In-silico-labelling pretraining (Bonte et al. 2024) on dense-cells: does initialising the
cell-segmentation U-Net from a virtual-staining U-Net help when few fields are annotated?

For 1 and 5 annotated training fields (the first by SHA-1 order, as in
accuracy.py's dense section; test = the same 2 fields), the distance U-Net segments cells
from the surface stain alone, starting either from random weights or from a U-Net with the
same encoder and decoder first trained to predict DAPI from the surface stain. As in Bonte
et al., the pretraining sees more images than are annotated: all 5 training fields (it
needs only their DAPI, no annotation), never the test fields. Same seed and segmentation
step budget for every init; the pretraining's CPU is added to its rows. Run from the
repository root: `python bench/isl_pretraining.py` (about 30 min on one CPU thread).
Writes bench/results/isl_pretraining.json and segmentation.md.
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

VS_STEPS, SEG_STEPS = 400, 400
TRAIN_OPTS = TrainOptions(n_steps=SEG_STEPS, batch_size=8, crop_size=128, learning_rate=2e-3)
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
    import argparse

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--seed", type=int, default=0, help="seed of every training (0: the default)")
    seed = p.parse_args().seed
    global TRAIN_OPTS, SEG_OPTS
    TRAIN_OPTS = TRAIN_OPTS.model_copy(update={"seed": seed})
    SEG_OPTS = SEG_OPTS.model_copy(update={"train": TRAIN_OPTS})
    setup()
    data = load_pairs(DATA / "dense-cells", extra=["dapi"])
    order = hash_order(list(data))
    test = order[-2:]
    truths = [data[s]["lab"] for s in test]
    opts = SEG_OPTS
    methods: dict[str, dict] = {}
    pool = order[:5]  # the training fields; the pretraining reads their DAPI only
    vs_rec: dict = {}
    with timed(vs_rec, "pretrain"):
        vs_state, vs_hist = pretrain_virtual_staining(
            [data[s]["img"] for s in pool], [data[s]["dapi"] for s in pool], pool
        )
    vs_loss = [
        round(float(np.mean(part)), 4) for part in (vs_hist["loss"][:10], vs_hist["loss"][-10:])
    ]
    inits = [
        ("random", None, opts),
        ("virtual staining", vs_state, opts),
        (
            "virtual staining, encoder only",
            vs_state,
            opts.model_copy(update={"isl_transfer": "encoder"}),
        ),
    ]
    for n in (1, 5):
        train = order[:n]
        images = [data[s]["img"] for s in train]
        labels = [data[s]["lab"] for s in train]
        for init, init_state, run_opts in inits:
            rec: dict = {}
            with timed(rec, "train"):
                state, hist = train_distance_unet(
                    images, labels, options=run_opts, init_state=init_state
                )
            if init_state is not None:
                rec["train_cpu_s"] += vs_rec["pretrain_cpu_s"]
                rec["train_wall_s"] += vs_rec["pretrain_wall_s"]
            with timed(rec, "predict"):
                preds = [
                    segment_distance_unet(state, data[s]["img"], options=run_opts) for s in test
                ]
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
                        f"VS pretraining on {len(pool)} fields, {vs_hist['steps']} steps, L1 "
                        f"{vs_loss[0]} -> {vs_loss[1]}; CPU s include it"
                        if init_state is not None
                        else f"{SEG_STEPS} steps x {TRAIN_OPTS.batch_size} crops of 128 px"
                    ),
                }
            )

    gains = {
        (n, init): methods[f"{n} field(s), {init} init"]["ap50_image_mean"]
        - methods[f"{n} field(s), random init"]["ap50_image_mean"]
        for n in (1, 5)
        for init in ("virtual staining", "virtual staining, encoder only")
    }
    write_result(
        "isl_pretraining" + (f"_seed{seed}" if seed else ""),
        {
            "setup": (
                "dense-cells, cell segmentation from the surface stain only (distance U-Net, "
                f"{opts.encoder_name}, decoder {list(opts.decoder_channels)}), {SEG_STEPS} "
                "steps; test fields "
                f"{', '.join(test)}. Virtual-staining pretraining: surface stain -> DAPI on "
                "all 5 training fields, DAPI only (hcsseg.virtual_stain, up to "
                f"{VS_STEPS} steps with early stopping); encoder and decoder, or the encoder "
                "only, transferred."
            ),
            "test": test,
            "environment": environment(),
            "methods": methods,
            "findings": [
                "AP@0.5 change from virtual-staining initialisation (encoder and decoder / "
                f"encoder only): {gains[1, 'virtual staining']:+.3f} / "
                f"{gains[1, 'virtual staining, encoder only']:+.3f} with 1 annotated field, "
                f"{gains[5, 'virtual staining']:+.3f} / "
                f"{gains[5, 'virtual staining, encoder only']:+.3f} with 5 (2 test fields)."
            ],
        },
    )


if __name__ == "__main__":
    main()
