"""Quality gate: a model trained on a plate ships only if it beats the classical baseline.

Both are run on fields held back from training and scored against the best reference the
plate offers: ground-truth labels (AP@0.5, AP = TP/(TP+FP+FN)), else markers found by blob
detection in the real nucleus stain, which neither method produced. Without ground truth
the scores are proxies and say so: nuclei by one-to-one marker matching (F1 within half a
nucleus diameter), cells by how many hold exactly one marker (F1) times the overlap of
their union with the stain's foreground M (the Yu-lab foreground). The model must lead by
a margin plus one standard error of the per-field differences; the baseline keeps ties,
unresolvable leads and field sets with nothing to score: nothing ships unverified.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from hcsseg.config import ProcessConfig
from hcsseg.errors import HcssegError
from hcsseg.evaluate.metrics import instance_metrics
from hcsseg.io.plate import FieldRef, Plate, open_plate
from hcsseg.learning.data import validate_labels
from hcsseg.markers.detect import detect_markers
from hcsseg.markers.qc import match_markers
from hcsseg.pipeline.plan import PipelinePlan, TrainStage
from hcsseg.pipeline.wells import (
    Segmenter,
    make_segmenter,
    readable_channels,
    segmentation_pixel_size,
    segmenter_input,
)
from hcsseg.segment.methods import centroids


def truth_score(pred: Sequence[np.ndarray], truth: Sequence[np.ndarray]) -> float:
    """Mean AP@0.5 over fields (a field with nothing true nor predicted does not count)."""
    scores = [
        float(instance_metrics(p, t, thresholds=(0.5,)).ap[0])
        for p, t in zip(pred, truth, strict=True)
    ]
    scores = [s for s in scores if math.isfinite(s)]
    return float(np.mean(scores)) if scores else float("nan")


def marker_f1(labels: np.ndarray, markers_yx: np.ndarray, *, max_distance_px: float) -> float:
    """F1 of object centres matched one-to-one to reference markers."""
    _, centres = centroids(labels)
    if not len(centres) and not len(markers_yx):
        return float("nan")
    pairs, _, _ = match_markers(centres, markers_yx, max_distance_px=max_distance_px)
    return 2 * len(pairs) / (len(centres) + len(markers_yx))


def cell_proxy_score(cells: np.ndarray, markers_yx: np.ndarray, stain_fg: np.ndarray) -> float:
    """(F1 of cells holding exactly one marker) × IoU(union of cells, stain foreground)."""
    ids = np.unique(cells)
    ids = ids[ids > 0]
    yx = np.asarray(markers_yx, float).reshape(-1, 2).round().astype(int)
    if not len(ids) and not len(yx):
        return float("nan")
    yx = yx[
        (yx[:, 0] >= 0)
        & (yx[:, 0] < cells.shape[0])
        & (yx[:, 1] >= 0)
        & (yx[:, 1] < cells.shape[1])
    ]
    hit = cells[yx[:, 0], yx[:, 1]] if len(yx) else np.empty(0, cells.dtype)
    per_cell = np.bincount(hit[hit > 0].astype(np.int64), minlength=int(cells.max()) + 1)
    single = per_cell == 1
    precision = float(single[ids].mean()) if len(ids) else 0.0
    recall = float(np.mean([single[h] for h in hit])) if len(hit) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    fg = cells > 0
    union = np.logical_or(fg, stain_fg).sum()
    iou = float(np.logical_and(fg, stain_fg).sum() / union) if union else 0.0
    return f1 * iou


def verdict(
    compartment: str,
    candidate: str,
    baseline: str,
    metric: str,
    pairs: Sequence[tuple[float, float]],
    *,
    margin: float = 0.01,
    note: str = "",
) -> dict[str, Any]:
    """The gate's decision from per-field (candidate, baseline) scores, as a plain record.

    The candidate wins only if its mean per-field lead exceeds `margin` plus one standard
    error of the per-field differences: a handful of fields cannot tell 0.843 from 0.843,
    and the baseline is what a plate gets when nothing is shown to be better."""
    finite = [(c, b) for c, b in pairs if math.isfinite(c) and math.isfinite(b)]
    n = len(finite)
    cand = float(np.mean([c for c, _ in finite])) if n else float("nan")
    base = float(np.mean([b for _, b in finite])) if n else float("nan")
    diff = np.array([c - b for c, b in finite])
    lead = float(diff.mean()) if n else float("nan")
    se = float(diff.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0
    if n == 0:
        winner, why = "baseline", "nothing to score on the held-back fields: keeping the baseline"
    else:
        winner = "candidate" if lead > margin + se else "baseline"
        verb = "beats" if winner == "candidate" else "does not beat"
        why = (
            f"{candidate} {metric} {cand:.3f} {verb} {baseline} {base:.3f} "
            f"(lead {lead:+.3f}, needed > {margin:.3f} + s.e. {se:.3f})"
        )
    return {
        "compartment": compartment,
        "candidate": candidate,
        "baseline": baseline,
        "metric": metric,
        "candidate_score": cand,
        "baseline_score": base,
        "lead": lead,
        "lead_se": se,
        "n_fields": n,
        "winner": winner,
        "reason": f"{why} on {n} held-back field(s){note}",
    }


def _ref(plate: Plate, path: str) -> FieldRef:
    for ref in plate.iter_fields():
        if ref.path == path:
            return ref
    raise HcssegError(f"plate {plate.name}: gate field {path} not found")


def run_gate(
    plan: PipelinePlan,
    stage: TrainStage,
    model_id: str,
    config: ProcessConfig,
    *,
    nuclei: Segmenter | None = None,
) -> dict[str, Any]:
    """Score the new model and the classical baseline on the stage's held-back fields.

    `nuclei` is the nucleus segmenter chosen by the nuclei gate; cells of both contenders
    grow from the same nuclei, so only the cell model differs."""
    plate = open_plate(plan.plate_url)
    store = plan.model_store
    candidate = make_segmenter(stage.compartment, stage.method, model_id, store, config)
    baseline = make_segmenter(stage.compartment, "classical", None, store, config)
    nuclei_seg = nuclei or make_segmenter("nuclei", "classical", None, store, config)
    pairs: list[tuple[float, float]] = []
    for path in stage.gate_fields:
        ref = _ref(plate, path)
        names = plate.channel_names(ref)
        nucleus = readable_channels([plan.nucleus_channel], names)[0]
        image = plate.read_channels(ref, [nucleus])[0]
        px = config.pixel_size_um or plate.pixel_size_um(ref)
        seg_px = segmentation_pixel_size(image, px, config)
        if stage.compartment == "nuclei":
            cand = candidate.nuclei(
                segmenter_input(candidate, plate, ref, image), pixel_size_um=seg_px
            )
            base = baseline.nuclei(image, pixel_size_um=seg_px)
        else:
            found = nuclei_seg.nuclei(
                segmenter_input(nuclei_seg, plate, ref, image), pixel_size_um=seg_px
            )
            cell_image = (
                plate.read_channels(ref, [plan.cell_channel])[0] if plan.cell_channel else None
            )
            cand = candidate.cells(
                found, segmenter_input(candidate, plate, ref, cell_image), pixel_size_um=seg_px
            )
            base = baseline.cells(found, cell_image, pixel_size_um=seg_px)
        if stage.truth is not None:
            truth = validate_labels(
                plate.read_labels(ref, stage.truth),
                name=f"{stage.truth} of field {ref.path}",
                shape=image.shape,
            )
            pairs.append((truth_score([cand], [truth]), truth_score([base], [truth])))
            continue
        if plan.nucleus_channel not in names:
            continue  # no real stain here: nothing independent to score against
        real = (
            image
            if nucleus == plan.nucleus_channel
            else plate.read_channels(ref, [plan.nucleus_channel])[0]
        )
        markers = detect_markers(real, pixel_size_um=seg_px)[["y", "x"]].to_numpy()
        if stage.compartment == "nuclei":
            radius = 0.5 * config.typical_nucleus_um / seg_px
            pairs.append(
                (
                    marker_f1(cand, markers, max_distance_px=radius),
                    marker_f1(base, markers, max_distance_px=radius),
                )
            )
        else:
            from hcsseg.segment.unsupervised import foreground_mask  # torch module

            fg = foreground_mask(cell_image[None] if cell_image.ndim == 2 else cell_image)
            pairs.append((cell_proxy_score(cand, markers, fg), cell_proxy_score(base, markers, fg)))
    note = " (in-sample: the plate has one field)" if stage.in_sample_gate else ""
    if stage.truth is not None:
        metric = f"AP@0.5 vs {stage.truth}"
    elif stage.compartment == "nuclei":
        metric = "marker F1 vs real-stain markers"
    else:
        metric = "one-marker-per-cell F1 x stain-foreground IoU"
    training = plan.training
    return verdict(
        stage.compartment,
        f"{stage.method} {model_id}",
        "classical",
        metric,
        pairs,
        margin=training.gate_margin if training is not None else 0.01,
        note=note,
    )
