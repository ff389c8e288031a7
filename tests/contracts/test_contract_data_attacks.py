"""Every data attack (built-in or plugin), at its default parameters, on one client of
the embedded benchmark."""

from __future__ import annotations

import pytest

from fedsec.config import BenchmarkConfig, DataConfig
from fedsec.data import build_federated_data
from fedsec.registry import registry

DATA_ATTACKS = registry("data_attack")
TASKS = ("sft", "dpo")


def _client(task: str):
    data = build_federated_data(DataConfig(benchmark=BenchmarkConfig(num_clients=3, examples_per_client=8)),
                                0, task)
    return data.clients[1]


def _records(client, task: str):
    return client.train if task == "sft" else client.preference


@pytest.mark.parametrize("name, task", [(name, task) for name in DATA_ATTACKS
                                        for task in DATA_ATTACKS.entry(name).options["tasks"]])
def test_the_attack_replaces_a_share_of_the_clients_data_and_keeps_its_size(name, task):
    entry = DATA_ATTACKS.entry(name)
    client = _client(task)
    poisoned = entry.obj(client, 7, **entry.params)
    assert poisoned.client_id == client.client_id
    before, after = _records(client, task), _records(poisoned, task)
    assert len(after) == len(before) and after != before
    other = "dpo" if task == "sft" else "sft"
    assert _records(poisoned, other) == _records(client, other)  # the other task's data is not touched
    assert poisoned.test == client.test  # evaluation data stays clean


@pytest.mark.parametrize("name", list(DATA_ATTACKS))
def test_the_same_seed_poisons_the_same_way(name):
    entry = DATA_ATTACKS.entry(name)
    task = entry.options["tasks"][0]
    client = _client(task)
    assert entry.obj(client, 7, **entry.params) == entry.obj(client, 7, **entry.params)


@pytest.mark.parametrize("name", list(DATA_ATTACKS))
def test_the_declared_tasks_are_known(name):
    tasks = DATA_ATTACKS.entry(name).options["tasks"]
    assert tasks and set(tasks) <= set(TASKS)
