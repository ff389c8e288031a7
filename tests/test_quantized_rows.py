"""A model whose rows depend on each other (bitsandbytes' 8-bit layers under LLM.int8's outlier
threshold) never puts one party's data in a forward with another's: no clients batched (the
one-step cohort path, lockstep), no frozen-prefix states computed beside other examples, no
record-level DP over batched records. 4-bit NF4 computes each row on its own and keeps them."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_config

from fedsec.config import ModelConfig
from fedsec.devices import rows_independent
from fedsec.errors import ConfigError
from fedsec.models import load_base_model
from fedsec.setup import prepare

ONE_SGD_STEP = {"optimizer": "sgd", "local_steps": 1, "batch_size": 4, "lockstep": True}


def _first_int8_layer(model):
    return next(m for m in model.modules() if type(m).__name__ == "Linear8bitLt")


def test_an_int8_rows_numbers_depend_on_the_rows_beside_it_and_nf4s_do_not():
    """What the rule rests on, shown on the tiny model's first projection: a row computed alone
    and beside a row with one entry over the threshold (6.0)."""
    torch.manual_seed(0)
    for quantization, dependent in (("8bit", True), ("4bit", False)):
        model, _ = load_base_model(ModelConfig(name="tiny", quantization=quantization))
        layer = next(m for m in model.modules() if type(m).__name__ in ("Linear8bitLt", "Linear4bit"))
        row = torch.randn(1, layer.in_features)
        other = torch.randn(1, layer.in_features)
        other[0, :16] = 40.0  # outlier columns for the whole batch under LLM.int8
        with torch.no_grad():
            alone = layer(row)[0]
            beside = layer(torch.cat([row, other]))[0]
        moved = float((alone - beside).abs().max() / alone.abs().max())
        # measured: 8-bit 3e-3 of the row's largest entry, 4-bit 8e-8 (float rounding)
        assert (moved > 1e-5) == dependent, (quantization, moved)
        assert rows_independent(model) == (not dependent)


def test_int8_without_an_outlier_threshold_is_row_by_row():
    model, _ = load_base_model(ModelConfig(name="tiny", quantization="8bit"))
    assert not rows_independent(model)
    for m in model.modules():
        if type(m).__name__ == "Linear8bitLt":
            m.state.threshold = 0.0
    assert rows_independent(model)
    assert rows_independent(load_base_model(ModelConfig(name="tiny"))[0])


def test_int8_clients_train_one_at_a_time_and_4bit_ones_together(tmp_path):
    data = {"benchmark": {"num_clients": 3, "examples_per_client": 4, "test_size": 3, "client_test_size": 0,
                          "num_probes": 0}}
    for quantization, batched in (("8bit", False), ("4bit", True)):
        setup = prepare(tiny_config(tmp_path / quantization, model={"name": "tiny", "quantization": quantization},
                                    training=ONE_SGD_STEP, data=data))
        trainer = setup.trainer
        assert trainer.one_step_batchable == batched
        trainer.cfg = dataclasses.replace(trainer.cfg, local_steps=2)  # several steps: lockstep's
        assert trainer.lockstep_batchable == batched


def test_int8_with_the_frozen_prefix_cache_or_record_level_dp_is_refused_in_one_line(tmp_path):
    int8 = {"name": "tiny", "quantization": "8bit"}
    with pytest.raises(ConfigError, match="LLM.int8") as err:
        prepare(tiny_config(tmp_path / "cache", model=int8, lora={"top_layers": 1, "cache_frozen_layers": True}))
    assert err.value.field == "lora.cache_frozen_layers" and "model.quantization: 4bit" in str(err.value)
    record = {"mode": "record", "noise_multiplier": 1.0, "clip_norm": 1.0}
    with pytest.raises(ConfigError, match="LLM.int8") as err:
        prepare(tiny_config(tmp_path / "record", model=int8, privacy=record))
    assert err.value.field == "privacy.mode" and "a record's gradient would depend" in str(err.value)
    # 4-bit keeps both
    prepare(tiny_config(tmp_path / "nf4", model={"name": "tiny", "quantization": "4bit"}, privacy=record,
                        lora={"top_layers": 1, "cache_frozen_layers": True}))
