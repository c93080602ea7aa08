"""Model store: round trip, provenance, atomicity and damaged files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hcsseg.errors import ModelError
from hcsseg.model_store import (
    check_card_channels,
    latest_model,
    list_models,
    load_model,
    model_dir,
    save_model,
)


def test_round_trip_and_listing(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "b": torch.zeros(3)}
    model_id = save_model(
        tmp_path, "virtual_stain", state, {"plate": "P1", "source_channels": ["BF"]}
    )
    loaded, card = load_model(tmp_path, model_id)
    assert torch.equal(loaded["w"], state["w"])
    assert card["kind"] == "virtual_stain" and card["plate"] == "P1" and card["code_version"]
    other = save_model(tmp_path, "virtual_stain", {"w": torch.ones(1)}, {"plate": "P2"})
    assert latest_model(tmp_path, "virtual_stain", plate="P1") == model_id
    assert {c["model_id"] for c in list_models(tmp_path)} == {model_id, other}
    assert latest_model(tmp_path, "cells") is None
    # A folder path works as well as an id.
    assert load_model(tmp_path, str(model_dir(tmp_path, model_id)))[1]["model_id"] == model_id


def test_half_written_model_is_invisible(tmp_path):
    (tmp_path / ".tmp-virtual_stain-x").mkdir()
    assert list_models(tmp_path) == []
    with pytest.raises(ModelError, match="no model 'nope'"):
        load_model(tmp_path, "nope")


def test_crash_while_saving_leaves_no_model(tmp_path, monkeypatch):
    """A failure after the weights are written (here: while writing the card) must leave
    neither a listed model nor a temporary folder behind."""
    import hcsseg.model_store as store_module

    real_write = store_module._write_synced

    def fail_on_card(path, data):
        if path.name == "model_card.json":
            raise OSError("disk full")
        real_write(path, data)

    monkeypatch.setattr(store_module, "_write_synced", fail_on_card)
    with pytest.raises(OSError, match="disk full"):
        save_model(tmp_path, "virtual_stain", {"w": torch.ones(4)}, {})
    assert list(tmp_path.iterdir()) == [] and list_models(tmp_path) == []


def test_card_keeps_numpy_numbers_as_numbers(tmp_path):
    card = {"metrics": {"pcc": np.float32(0.5)}, "percentiles": np.array([1.0, 99.8])}
    _, saved = load_model(
        tmp_path, save_model(tmp_path, "virtual_stain", {"w": torch.ones(1)}, card)
    )
    assert saved["metrics"]["pcc"] == 0.5 and saved["percentiles"] == [1.0, 99.8]


def test_damaged_weights_are_a_clear_error(tmp_path):
    model_id = save_model(tmp_path, "virtual_stain", {"w": torch.ones(4)}, {})
    weights = tmp_path / model_id / "weights.safetensors"
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="cannot be loaded"):
        load_model(tmp_path, model_id)


def test_card_channels_must_exist():
    card = {"model_id": "m1", "source_channels": ["PHASE", "BF"]}
    check_card_channels(card, ["BF", "PHASE", "DAPI"], where="field A/1/0")
    with pytest.raises(ModelError, match=r"lacks \['BF'\]"):
        check_card_channels(card, ["PHASE", "DAPI"], where="field A/1/0")
