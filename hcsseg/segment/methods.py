"""One interface over every segmentation method, so a plate run picks one per compartment.

``train_method`` fits a model on (image, labels) pairs or (image, markers) fields and
returns what a model card needs; ``Segmenter`` applies a trained model (or the classical
baseline) to one field. Cells always get the id of the nucleus they contain, so the
per-cell table can link compartments; a cell that contains no detected nucleus keeps an
id above every nucleus id and has no parent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from scipy import ndimage as ndi

from hcsseg.errors import InputDataError, ModelError
from hcsseg.segment.classical import CellOptions, NucleiOptions, segment_cells, segment_nuclei

if TYPE_CHECKING:
    import torch

# The learned methods' modules (and torch, ~800 MB per process) load on first use: a
# classical run, and each of its Dask workers, never pays for them.
Method = Literal["classical", "distance_unet", "fpn2ws", "unsupervised", "cellpose"]
TRAINABLE = ("distance_unet", "fpn2ws", "unsupervised", "cellpose")
OPTIONED = ("distance_unet", "fpn2ws", "unsupervised")


def option_model(method: str) -> type:
    """The pydantic options class of a trainable method (imports its module)."""
    if method not in OPTIONED:
        raise ModelError(f"method {method!r} has no trainable options; choose {list(OPTIONED)}")
    from hcsseg.segment import distance_unet, fpn2ws, unsupervised

    return {
        "distance_unet": distance_unet.DistanceUNetOptions,
        "fpn2ws": fpn2ws.FPN2WSOptions,
        "unsupervised": unsupervised.UnsupervisedOptions,
    }[method]


def parse_options(method: str, options: dict[str, Any] | None) -> Any:
    return option_model(method).model_validate(options or {})


def train_method(
    method: str,
    images: Sequence[np.ndarray],
    targets: Sequence[np.ndarray],
    *,
    options: dict[str, Any] | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
    parent_state: dict[str, torch.Tensor] | None = None,
    weights: Sequence[np.ndarray] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Train `method` on images with labels (supervised) or marker arrays (unsupervised).

    `init_state`: a virtual-staining U-Net to initialise from (smp methods); `parent_state`:
    the whole model of the same method from an earlier plate, to fine-tune; `weights`:
    per-field loss weights (distance_unet only), 0 where labels are not to be trusted."""
    from hcsseg.segment import distance_unet, fpn2ws, unsupervised

    opts = parse_options(method, options)
    if weights is not None and method != "distance_unet":
        raise ModelError(f"per-pixel loss weights apply to distance_unet, not {method!r}")
    if method == "distance_unet":
        return distance_unet.train_distance_unet(
            images,
            targets,
            options=opts,
            init_state=init_state,
            parent_state=parent_state,
            weights=weights,
        )
    if method == "fpn2ws":
        return fpn2ws.train_fpn2ws(
            images, targets, options=opts, init_state=init_state, parent_state=parent_state
        )
    if init_state is not None and parent_state is not None:
        raise ModelError("give init_state or parent_state, not both")
    # the annotation-free model's init_state already is a whole patch U-Net to start from
    start = parent_state if parent_state is not None else init_state
    return unsupervised.train_unsupervised(images, targets, options=opts, init_state=start)


def centroids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids, (N, 2) y/x centres) of the objects in a label image."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if not len(ids):
        return ids, np.empty((0, 2))
    return ids, np.array(ndi.center_of_mass(labels > 0, labels, ids)).reshape(-1, 2)


def adopt_nucleus_ids(cells: np.ndarray, nuclei: np.ndarray) -> np.ndarray:
    """Renumber model-made cells to the id of the nucleus they contain most of.

    Each nucleus goes to the cell that holds most of its pixels; a cell claimed by no
    nucleus gets a fresh id above every nucleus id. Nuclei are stamped into their cells so
    a cell always contains its nucleus.
    """
    fg = (cells > 0) & (nuclei > 0)
    mapping: dict[int, int] = {}
    taken: set[int] = set()
    if fg.any():
        pairs, counts = np.unique(
            np.stack([nuclei[fg], cells[fg]]).astype(np.int64), axis=1, return_counts=True
        )
        order = np.argsort(-counts, kind="stable")
        for n_id, c_id in pairs[:, order].T:
            if int(c_id) not in mapping and int(n_id) not in taken:
                mapping[int(c_id)] = int(n_id)
                taken.add(int(n_id))
    next_id = int(nuclei.max()) + 1
    cell_ids = np.unique(cells)
    lut = np.zeros(int(cell_ids.max()) + 1 if len(cell_ids) else 1, np.uint32)
    for c_id in cell_ids[cell_ids > 0]:
        if int(c_id) in mapping:
            lut[c_id] = mapping[int(c_id)]
        else:
            lut[c_id] = next_id
            next_id += 1
    out = lut[cells]
    return np.where(nuclei > 0, nuclei, out).astype(np.uint32)


@dataclass
class Segmenter:
    """A method ready to run on fields: classical options, or a stored model + its card."""

    method: str
    state: dict[str, torch.Tensor] | None = None
    card: dict[str, Any] | None = None
    nuclei_options: NucleiOptions | None = None
    cell_options: CellOptions | None = None

    @property
    def options(self) -> Any:
        options = dict((self.card or {}).get("options") or {})
        if self.method == "distance_unet":
            # cards written before scale normalisation: the model saw fields at their scale
            options.setdefault("canonical_diameter", None)
        return parse_options(self.method, options)

    def nuclei(
        self, image: np.ndarray, *, pixel_size_um: float, tile_size: int | None = None
    ) -> np.ndarray:
        """Nucleus labels of one field. `tile_size`: the classical method segments larger
        fields tile by tile (bounded memory); the models tile their own inference."""
        if self.method == "classical":
            return segment_nuclei(
                image,
                pixel_size_um=pixel_size_um,
                options=self.nuclei_options,
                tile_size=tile_size,
            )
        from hcsseg.segment import distance_unet, fpn2ws

        if self.method == "distance_unet":
            return distance_unet.segment_distance_unet(self.state, image, options=self.options)
        if self.method == "fpn2ws":
            return fpn2ws.segment_fpn2ws(self.state, image, options=self.options)
        if self.method == "cellpose":
            from hcsseg.segment.cellpose_backend import run_cellpose

            return run_cellpose(image, model=(self.card or {}).get("weights", "nuclei"))
        raise ModelError(f"method {self.method!r} does not segment nuclei")

    def cells(
        self,
        nuclei: np.ndarray,
        image: np.ndarray | None,
        *,
        pixel_size_um: float,
        tile_size: int | None = None,
    ) -> np.ndarray:
        """Cell labels with their nucleus's ids; `tile_size` as in `nuclei`."""
        if self.method == "classical":
            if image is not None and image.ndim == 3:
                image = image[0]
            return segment_cells(
                nuclei,
                image,
                pixel_size_um=pixel_size_um,
                options=self.cell_options,
                tile_size=tile_size,
            )
        if image is None:
            raise InputDataError(f"cell method {self.method!r} needs a cell image channel")
        from hcsseg.segment import distance_unet, unsupervised

        if self.method == "unsupervised":
            ids, centres = centroids(nuclei)
            raw = unsupervised.segment_unsupervised(
                self.state, image, centres, options=self.options, allow_empty=True
            )
            lut = np.concatenate([[0], ids]).astype(np.uint32)
            return np.where(nuclei > 0, nuclei, lut[raw]).astype(np.uint32)
        if self.method == "distance_unet":
            raw = distance_unet.segment_distance_unet(self.state, image, options=self.options)
        elif self.method == "cellpose":
            from hcsseg.segment.cellpose_backend import run_cellpose

            raw = run_cellpose(image, model=(self.card or {}).get("weights", "cyto"))
        else:
            raise ModelError(f"method {self.method!r} does not segment cells")
        return adopt_nucleus_ids(raw, nuclei)
