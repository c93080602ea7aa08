"""Every mistake gets a clear answer fast: the real `hcsseg` CLI, as a user runs it.

Each refused input must be one line on stderr naming the problem, exit code 2, nothing
written, and come back in seconds (before any Prefect server could be up).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from hcsseg.cli import _config_data, _load_config
from hcsseg.config import ProcessConfig
from hcsseg.demo import synthetic_plate
from hcsseg.errors import InputDataError, PlateFormatError
from hcsseg.io import tiff_import
from hcsseg.io.labels import write_labels
from hcsseg.io.plate import open_plate
from hcsseg.io.tiff_import import ImportOptions, import_tiff_folder
from hcsseg.pipeline.training import TrainConfig
from hcsseg.virtual_stain.plate import VirtualStainConfig

REPO = Path(__file__).resolve().parents[1]
FAST_S = 30  # a refusal on this slow machine; Prefect's embedded server takes longer


def hcsseg(args: list[str], prefect_home: Path, timeout: float = 600) -> tuple[int, str, str]:
    """Run the CLI in a fresh interpreter against the embedded-server setup a laptop has."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(prefect_home)
    proc = subprocess.run(
        [sys.executable, "-m", "hcsseg.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc.returncode, proc.stdout, proc.stderr


def snapshot(root: Path) -> dict[str, str]:
    """Every folder and file under `root`, files by content."""
    return {
        str(p.relative_to(root)): "dir"
        if p.is_dir()
        else hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
    }


def write_tiffs(folder: Path, wells: list[str], *, corrupt: int | None = None) -> Path:
    """ImageXpress-named single-channel fields; file number `corrupt` is not a TIFF."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, well in enumerate(wells):
        path = folder / f"P1_{well}f00d0.tif"
        if i == corrupt:
            path.write_bytes(b"this is no TIFF")
        else:
            tifffile.imwrite(path, rng.integers(0, 4000, (32, 32), dtype=np.uint16))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good plate (DNA, Cytoplasm; labels `hcsseg process` made, no ground truth) and the
    bad inputs beside it."""
    root = tmp_path_factory.mktemp("world")
    plate = synthetic_plate(root / "plate.zarr", wells=("B02",), fields_per_well=1, shape=(64, 64))
    writable = open_plate(plate.url, mode="r+")
    ref = next(writable.iter_fields())
    made = {"nucleus_channel": "DNA", "nuclei_method": "classical", "cells_method": "classical"}
    labels = np.zeros((64, 64), np.uint32)
    labels[10:20, 10:20] = 1
    write_labels(writable, ref, "nuclei", labels, properties=made)
    write_labels(writable, ref, "cells", labels, properties={**made, "parent": "nuclei"})
    (root / "empty").mkdir()
    (root / "notzarr").mkdir()
    (root / "notzarr" / "precious.txt").write_text("keep me")
    (root / "x.zarr").write_text("a file, not a plate")
    (root / "cfgdir").mkdir()
    (root / "list.json").write_text("[1, 2]")
    (root / "watershed.json").write_text(json.dumps({"nuclei_method": "watershed"}))
    (root / "unet.json").write_text(json.dumps({"nuclei_method": "distance_unet"}))
    (root / "hoechst_unet.json").write_text(
        json.dumps({"nucleus_channel": "Hoechst", "nuclei_method": "distance_unet"})
    )
    write_tiffs(root / "tiffs", ["B02", "B03"])
    return root


PLATE = "{root}/plate.zarr"
BAD_PATHS = [
    (
        "field",
        "{root}/plate.zarr/B/02/0",
        "is a field of plate demo-synthetic; pass the plate: " + PLATE,
    ),
    (
        "well",
        "{root}/plate.zarr/B/02",
        "is a well of plate demo-synthetic; pass the plate: " + PLATE,
    ),
    ("empty-folder", "{root}/empty", "not an OME-Zarr HCS plate: an empty folder"),
    ("non-zarr-folder", "{root}/notzarr", "not an OME-Zarr HCS plate: a folder without zarr"),
    ("file", "{root}/x.zarr", "x.zarr is a file, not an OME-Zarr HCS plate"),
    ("missing", "{root}/missing.zarr", "missing.zarr: path does not exist"),
]
CASES = [
    *[(f"process-{name}", ["process", path], want) for name, path, want in BAD_PATHS],
    *[(f"info-{name}", ["info", path], want) for name, path, want in BAD_PATHS],
    ("process-unknown-well", ["process", PLATE, "--well", "Z99"], "wells ['Z99'] not in the plate"),
    (
        "process-channel",
        ["process", PLATE, "--nucleus-channel", "DAPI"],
        "channel(s) 'DAPI' not found in plate demo-synthetic",
    ),
    (
        "config-folder",
        ["process", PLATE, "--config", "{root}/cfgdir"],
        "cfgdir does not exist or is not a file",
    ),
    ("config-list", ["process", PLATE, "--config", "{root}/list.json"], "holds a JSON list"),
    (
        "config-missing",
        ["process", PLATE, "--config", "{root}/none.json"],
        "none.json does not exist",
    ),
    (
        "config-invalid",
        ["process", PLATE, "--config", "{root}/watershed.json"],
        "nuclei_method: Input should be 'classical'",
    ),
    (
        "config-untrained",
        ["process", PLATE, "--config", "{root}/unet.json"],
        "needs a trained model, and the model store {root}/plate_models has none for plate "
        "demo-synthetic: run `hcsseg train` first",
    ),
    (
        "evaluate-missing-truth",
        ["evaluate", PLATE, "--truth", "nope"],
        "no field has ground-truth labels 'nope'; label images present: cells, nuclei",
    ),
    (
        "evaluate-not-truth",
        ["evaluate", PLATE, "--pred", "cells", "--truth", "nuclei"],
        "label image 'nuclei' is not ground truth",
    ),
    ("run-preset", ["run", PLATE, "--preset", "fancy"], "unknown preset 'fancy'"),
    ("models-missing", ["models", "{root}/nonexistent"], "nonexistent does not exist"),
    (
        "import-exists",
        ["import", "{root}/tiffs", PLATE],
        "plate.zarr already exists; pass --overwrite",
    ),
    (
        "import-overwrite-folder",
        ["import", "{root}/tiffs", "{root}/notzarr", "--overwrite"],
        "notzarr is a folder, not an OME-Zarr HCS plate; --overwrite replaces only a plate",
    ),
    (
        "import-overwrite-file",
        ["import", "{root}/tiffs", "{root}/x.zarr", "--overwrite"],
        "x.zarr is a file, not an OME-Zarr HCS plate; --overwrite replaces only a plate",
    ),
]


@pytest.mark.parametrize(("args", "want"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_input_is_one_line_early_and_writes_nothing(
    world: Path, tmp_path: Path, args: list[str], want: str
) -> None:
    before = snapshot(world)
    start = time.monotonic()
    code, out, err = hcsseg([a.format(root=world) for a in args], tmp_path / "prefect")
    elapsed = time.monotonic() - start
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert want.format(root=world) in lines[0]
    assert out.strip() == ""
    assert elapsed < FAST_S, f"took {elapsed:.1f} s"
    assert snapshot(world) == before  # no tables, models, labels or changed plate files
    assert not list((tmp_path / "prefect").rglob("*.db"))  # Prefect's server never started


@pytest.mark.parametrize("version", ["0.4", "0.5"])
def test_a_path_inside_a_plate_names_the_plate(tmp_path: Path, version: str) -> None:
    plate = synthetic_plate(
        tmp_path / "p.zarr", wells=("B02",), fields_per_well=1, shape=(64, 64), version=version
    )
    for inner, kind in [("B/02/0", "field"), ("B/02", "well"), ("B", "part"), ("B/02/0/0", "part")]:
        with pytest.raises(PlateFormatError, match=f"is a {kind} of plate demo-synthetic") as err:
            open_plate(f"{plate.url}/{inner}")
        assert str(err.value).endswith(f"pass the plate: {plate.url}")


def test_config_flags_given_override_the_file_and_flags_not_given_never_do(
    tmp_path: Path,
) -> None:
    path = tmp_path / "run.json"
    path.write_text(
        json.dumps(
            {
                "nucleus_channel": "Hoechst",
                "nuclei_method": "distance_unet",
                "cells": {"method": "distance", "max_expansion_um": 20},
            }
        )
    )
    flags = {"nucleus_channel": "DNA", "nuclei_method": None, "wells": None, "output": None}
    data = _config_data(path, {**flags, "cells": {"method": None, "max_expansion_um": 5}})
    assert data["nucleus_channel"] == "DNA"  # given: wins
    assert data["nuclei_method"] == "distance_unet"  # not given: the file's value stays
    assert data["cells"] == {"method": "distance", "max_expansion_um": 5}  # merged per key
    assert "wells" not in data and "output" not in data  # not given, not in the file
    cfg = _load_config(path, flags)
    assert (cfg.nucleus_channel, cfg.nuclei_method) == ("DNA", "distance_unet")
    assert _load_config(None, flags).nuclei_method == "classical"  # no file: defaults


def test_config_file_method_used_and_flag_channel_wins_on_the_cli(
    world: Path, tmp_path: Path
) -> None:
    """The file asks for Hoechst (absent) and distance_unet; --nucleus-channel DNA wins, so
    the run gets past the channel check and stops at the file's untrained method."""
    code, _, err = hcsseg(
        [
            "process",
            f"{world}/plate.zarr",
            "--config",
            f"{world}/hoechst_unet.json",
            "--nucleus-channel",
            "DNA",
        ],
        tmp_path,
    )
    assert code == 2
    assert "nuclei_method='distance_unet' needs a trained model" in err
    assert "Hoechst" not in err


@pytest.mark.parametrize("model", [ProcessConfig, TrainConfig, VirtualStainConfig])
def test_no_description_has_angle_brackets(model: type) -> None:
    """Prefect's UI renders descriptions as HTML: `<plate>_tables` showed as `_tables`."""
    found: list[str] = []

    def walk(node: object, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                text = value if key == "description" and isinstance(value, str) else ""
                if "<" in text or ">" in text:
                    found.append(f"{where}: {value}")
                walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]")

    walk(model.model_json_schema(), model.__name__)
    assert not found, found


def siblings(plate: Path) -> list[str]:
    """Staging or backup folders an import would leave beside the plate."""
    return sorted(p.name for p in plate.parent.iterdir() if p.name.startswith(f"{plate.name}."))


def test_overwrite_replaces_a_plate_only_once_the_new_one_is_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "plate.zarr"
    good = write_tiffs(tmp_path / "good", ["B02", "B03"])
    code, _, err = hcsseg(["import", str(good), str(out)], tmp_path / "prefect")
    assert code == 0, err
    before = snapshot(out)

    # a corrupt second TIFF: one line naming it, the old plate untouched
    corrupt = write_tiffs(tmp_path / "corrupt", ["C02", "C03"], corrupt=1)
    code, _, err = hcsseg(["import", str(corrupt), str(out), "--overwrite"], tmp_path / "p")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "P1_C03f00d0.tif" in lines[0], err
    assert snapshot(out) == before and siblings(out) == []

    # a failure while pixels are written (the new plate half done): same
    real_read = tiff_import._read_plane
    calls = {"n": 0}

    def fail_second(path: Path) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 2:
            raise InputDataError(f"cannot read TIFF {path}: simulated")
        return real_read(path)

    monkeypatch.setattr(tiff_import, "_read_plane", fail_second)
    other = write_tiffs(tmp_path / "other", ["D02", "D03", "D04"])
    with pytest.raises(InputDataError, match="simulated"):
        import_tiff_folder(other, out, options=ImportOptions(), overwrite=True)
    assert calls["n"] == 2
    assert snapshot(out) == before and siblings(out) == []
    monkeypatch.undo()

    # a good import replaces it
    plate = import_tiff_folder(other, out, options=ImportOptions(), overwrite=True)
    assert plate.url == str(out)
    assert open_plate(out).wells() == ["D02", "D03", "D04"] and siblings(out) == []


def test_plain_process_is_quiet(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A normal run: no ERROR line, no traceback, and none of Prefect's INFO lines (a few
    per task run; they still reach the UI, and `-v` shows them)."""
    plate = synthetic_plate(
        tmp_path / "quiet.zarr", wells=("B02",), fields_per_well=1, shape=(128, 128)
    )
    monkeypatch.delenv("PREFECT_LOGGING_LEVEL", raising=False)  # the CLI's default, not ours
    code, out, err = hcsseg(["process", plate.url], tmp_path / "prefect")
    both = out + err
    assert code == 0, both
    assert "processed plate demo-synthetic: 1 wells processed" in out
    assert "Traceback" not in both and "ERROR" not in both, both
    assert not [line for line in both.splitlines() if "INFO" in line], both
