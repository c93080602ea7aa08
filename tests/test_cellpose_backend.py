from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hcsseg.errors import InputDataError, ModelError
from hcsseg.segment import cellpose_backend
from hcsseg.segment.cellpose_backend import finetune_cellpose, run_cellpose
from tests.conftest import dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


pytest.importorskip("cellpose")


@pytest.fixture
def no_builtin_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty Cellpose model folder: built-in weights must be downloaded."""
    from cellpose import models

    folder = tmp_path / "cellpose-models"
    monkeypatch.setattr(models, "MODEL_DIR", folder)
    return folder


@pytest.fixture(scope="module")
def dsb_pair(shared_data: Path) -> tuple[np.ndarray, np.ndarray]:
    root = dataset(shared_data, "nuclei-dsb2018")
    for f in sorted(root.glob("*_img.tif")):
        image = tifffile.imread(f)
        labels = tifffile.imread(f.with_name(f.name.replace("_img", "_lab")))
        if image.shape == (256, 256) and len(np.unique(labels)) > 20:
            return image, labels
    pytest.skip("no 256x256 nuclei-dsb2018 field with 20+ nuclei")


def test_missing_builtin_weights_offline_fails_fast(
    no_builtin_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cellpose_backend, "reachable", lambda *a, **k: False)
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match=r"'cyto'.*cannot be reached"):
        run_cellpose(np.zeros((64, 64)), model="cyto")
    assert time.perf_counter() - t0 < 5
    assert str(no_builtin_weights) in str(cellpose_backend.builtin_weights_path("cyto"))


def test_failed_download_is_a_model_error(
    no_builtin_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Online or not, a download that fails surfaces as ModelError, within seconds."""
    from cellpose import utils

    def refuse(url: str, dst: str, progress: bool = True) -> None:
        raise OSError(f"no route to {url}")

    monkeypatch.setattr(utils, "download_url_to_file", refuse)
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="nuclei"):
        run_cellpose(np.zeros((64, 64)), model="nuclei", download_timeout=2.0)
    assert time.perf_counter() - t0 < 10


def test_unknown_model_and_bad_weights_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="neither a weights file nor a built-in"):
        run_cellpose(np.zeros((64, 64)), model="cyto9000")
    bad = tmp_path / "broken_model"
    bad.write_bytes(b"these are not torch weights")
    with pytest.raises(ModelError, match=str(bad)):
        run_cellpose(np.zeros((64, 64)), model=bad)


def test_bad_inputs() -> None:
    with pytest.raises(InputDataError, match="NaN"):
        run_cellpose(np.full((32, 32), np.nan), model="cyto")
    with pytest.raises(InputDataError, match="diameter"):
        run_cellpose(np.zeros((32, 32)), model="cyto", diameter=-3)
    with pytest.raises(InputDataError, match="non-integer"):
        finetune_cellpose([np.zeros((32, 32))], [np.full((32, 32), 0.5)], save_path="unused")


def test_train_from_scratch_and_run(dsb_pair: tuple, tmp_path: Path) -> None:
    """Offline, Cellpose can still be trained from random weights; the saved file then runs
    through the same path as a user's fine-tuned model."""
    image, labels = dsb_pair[0][:128, :128], dsb_pair[1][:128, :128]
    path, losses = finetune_cellpose(
        [image, image[::-1]],
        [labels, labels[::-1]],
        base_model=None,
        save_path=tmp_path,
        n_epochs=1,
        batch_size=2,
        min_train_masks=1,
        model_name="scratch",
        device="cpu",
    )
    assert path == tmp_path / "models" / "scratch" and path.is_file()
    assert losses.shape == (1,) and np.isfinite(losses).all()
    masks = run_cellpose(image, model=path, diameter=20, device="cpu")
    assert masks.dtype == np.uint32 and masks.shape == image.shape
