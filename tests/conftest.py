"""Shared fixtures: offline hub, a private model cache, the tiny-model config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run unless asked otherwise: a suite that
# gates a landing must not pass or fail by chance. FEDSEC_HYPOTHESIS=explore draws fresh
# ones (how the unknown-key newline bug was found); a failure it finds becomes a test.
settings.register_profile("fixed", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("FEDSEC_HYPOTHESIS", "fixed"))

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"

# The contract suites (tests/contracts) check every entry of every registry, built-in or
# plugin: FEDSEC_PLUGINS=my_rules,other_module pytest tests/contracts imports those
# modules first, so their entries are checked beside fedsec's own.
if os.environ.get("FEDSEC_PLUGINS"):
    from fedsec.registry import load_plugins

    load_plugins([m.strip() for m in os.environ["FEDSEC_PLUGINS"].split(",") if m.strip()])


@pytest.fixture(scope="session", autouse=True)
def _fedsec_cache(tmp_path_factory):
    """Without FEDSEC_CACHE set, the session builds its models (the tiny one, SmolLM2's conversion)
    and frozen-prefix states in a private cache of its own, as a fresh machine would."""
    if "FEDSEC_CACHE" not in os.environ:
        os.environ["FEDSEC_CACHE"] = str(tmp_path_factory.mktemp("fedsec-cache"))
    yield


def shared_file(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"../shared/data/{name} is not present (public test data lives outside the repo)")
    return path


TINY = {
    "name": "tiny",
    "seed": 3,
    "model": {"name": "tiny"},
    "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "data": {"benchmark": {"num_clients": 4, "examples_per_client": 8, "test_size": 9,
                           "client_test_size": 2, "num_probes": 2}, "max_length": 160},
    "federation": {"rounds": 3, "clients_per_round": 2, "local_only_clients": 0},
    "training": {"local_steps": 2, "batch_size": 4, "lr": 1e-3},
    "eval": {"batch_size": 16},
}


def tiny_config(tmp_path: Path, **sections):
    """The tiny experiment with some sections replaced/merged, writing under tmp_path."""
    from fedsec.config import ExperimentConfig, from_mapping

    raw = {k: (dict(v) if isinstance(v, dict) else v) for k, v in TINY.items()}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    raw["output_dir"] = str(tmp_path / "runs")
    return from_mapping(ExperimentConfig, raw)
