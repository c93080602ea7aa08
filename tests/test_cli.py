"""The `hcsseg` command line: one clear line and exit code 2 on bad input."""

from __future__ import annotations

from typer.testing import CliRunner

from hcsseg.cli import app
from hcsseg.demo import synthetic_plate
from tests.conftest import dataset

runner = CliRunner()


def test_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("import", "import-pairs", "process", "virtual-stain", "evaluate", "info"):
        assert command in result.output


def test_import_info_process(shared_data, tmp_path):
    src = dataset(shared_data, "hcs-sbs-transfluor")
    out = tmp_path / "tf.zarr"
    result = runner.invoke(
        app, ["import", str(src), str(out), "-c", "2=GFP", "--pixel-size", "0.7"]
    )
    assert result.exit_code == 0, result.output
    assert "24 wells, 72 fields" in result.output
    info = runner.invoke(app, ["info", str(out)])
    assert "channels: GFP" in info.output and "O24: 3 fields" in info.output
    # GFP is the only channel: it is not a nucleus stain, so the user must say so.
    bad = runner.invoke(app, ["process", str(out)])
    assert bad.exit_code == 2
    assert "nucleus" in bad.output and "'GFP'" in bad.output
    ok = runner.invoke(app, ["process", str(out), "--nucleus-channel", "GFP", "--well", "O01"])
    assert ok.exit_code == 0, ok.output
    assert "1 wells processed" in ok.output


def test_bad_inputs_exit_2(tmp_path):
    result = runner.invoke(app, ["import", str(tmp_path), str(tmp_path / "x.zarr")])
    assert result.exit_code == 2 and "matched none" in result.output
    result = runner.invoke(app, ["info", str(tmp_path / "missing.zarr")])
    assert result.exit_code == 2 and "does not exist" in result.output
    plate = synthetic_plate(
        tmp_path / "p.zarr", wells=("B02",), fields_per_well=1, shape=(128, 128)
    )
    result = runner.invoke(app, ["process", plate.url, "--nucleus-channel", "Hoechst"])
    assert result.exit_code == 2
    assert "'Hoechst'" in result.output and "'DNA', 'Cytoplasm'" in result.output
    result = runner.invoke(app, ["import", str(tmp_path), str(tmp_path / "y.zarr"), "-c", "zero"])
    assert result.exit_code == 2 and "KEY=NAME" in result.output


def test_config_file_methods_survive_and_flags_override(tmp_path):
    """Flags given on the command line win over --config; flags not given never do."""
    import json

    from hcsseg.cli import _load_config
    from hcsseg.errors import HcssegError

    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"nuclei_method": "distance_unet", "cells_method": "unsupervised"}))
    cfg = _load_config(path, {"nuclei_method": None, "cells_method": None})
    assert (cfg.nuclei_method, cfg.cells_method) == ("distance_unet", "unsupervised")
    cfg = _load_config(path, {"nuclei_method": "classical", "cells_method": None})
    assert (cfg.nuclei_method, cfg.cells_method) == ("classical", "unsupervised")
    path.write_text("[1, 2]")
    for bad, match in [(path, "JSON list"), (tmp_path / "none.json", "does not exist")]:
        try:
            _load_config(bad, {})
        except HcssegError as exc:
            assert match in str(exc)
        else:
            raise AssertionError(f"{bad} was accepted")
    path.write_text(json.dumps({"nuclei_method": "watershed"}))
    result = runner.invoke(app, ["process", str(tmp_path / "x.zarr"), "--config", str(path)])
    assert result.exit_code == 2 and "nuclei_method" in result.output


def test_demo_command_runs_end_to_end(shared_data, tmp_path):
    """The README's first command ends in `hcsseg demo`: it must process its plate."""
    result = runner.invoke(app, ["demo", str(tmp_path / "demo"), "--shared-data", str(shared_data)])
    assert result.exit_code == 0, result.output
    assert "1 wells processed" in result.output and "cells in total" in result.output
