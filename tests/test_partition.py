from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsec.data import partition
from fedsec.errors import ConfigError


def _exactly_once(shards, n):
    flat = np.concatenate([s for s in shards]) if shards else np.array([])
    assert sorted(flat.tolist()) == list(range(n))


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_iid_keeps_every_example_once(n, k, seed):
    if n < k:
        return
    shards = partition.iid(n, k, np.random.default_rng(seed))
    _exactly_once(shards, n)
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@settings(max_examples=60, deadline=None)
@given(labels=st.lists(st.sampled_from("abcd"), min_size=10, max_size=200),
       k=st.integers(1, 5), alpha=st.floats(0.05, 10), seed=st.integers(0, 2**32 - 1))
def test_dirichlet_keeps_every_example_once(labels, k, alpha, seed):
    shards = partition.dirichlet(labels, k, alpha, np.random.default_rng(seed), min_size=1)
    _exactly_once(shards, len(labels))
    assert min(map(len, shards)) >= 1


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), k=st.integers(1, 20), alpha=st.floats(0.05, 10),
       min_size=st.integers(0, 5), seed=st.integers(0, 2**32 - 1))
def test_quantity_keeps_every_example_once(n, k, alpha, min_size, seed):
    if n < k * max(min_size, 1):
        return
    shards = partition.quantity(n, k, alpha, np.random.default_rng(seed), min_size)
    _exactly_once(shards, n)
    assert len(shards) == k and min(map(len, shards)) >= min_size


@given(users=st.lists(st.sampled_from(["u1", "u2", "u3", 7]), min_size=1, max_size=100))
def test_natural_groups_by_user_in_first_seen_order(users):
    shards = partition.natural(users)
    _exactly_once(shards, len(users))
    for shard in shards:
        assert len({users[i] for i in shard}) == 1
    firsts = [users[s[0]] for s in shards]
    assert firsts == list(dict.fromkeys(users))


def test_dirichlet_small_alpha_skews_labels():
    labels = ["a"] * 500 + ["b"] * 500
    shards = partition.dirichlet(labels, 10, 0.1, np.random.default_rng(0))
    shares = [np.mean([labels[i] == "a" for i in s]) for s in shards if len(s) > 20]
    assert max(shares) > 0.9 and min(shares) < 0.1


def test_too_many_clients_is_a_config_error():
    with pytest.raises(ConfigError, match="num_clients"):
        partition.iid(3, 5, np.random.default_rng(0))
