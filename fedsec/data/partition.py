"""Partitions of a dataset into clients: pure functions of (sizes or keys, rng).

Each returns a list of index arrays, one per client, that together hold every
example index exactly once.

- `iid`: a random permutation cut into near-equal shards.
- `dirichlet`: label/topic skew (Hsu et al. 2019, "Measuring the Effects of
  Non-Identical Data Distribution"): for each label value, client shares are drawn
  from Dirichlet(alpha) and that label's examples are dealt out accordingly;
  redrawn until every client has at least `min_size` examples.
- `quantity`: client sizes from Dirichlet(alpha) over a random permutation.
- `natural`: one client per distinct user id, in order of first appearance
  (FedLLM-Bench's realistic splits).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np

from fedsec.errors import ConfigError

_MAX_REDRAWS = 1000


def iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    _check_counts(num_examples, num_clients, 1)
    return [np.sort(s) for s in np.array_split(rng.permutation(num_examples), num_clients)]


def dirichlet(labels: Sequence[Hashable], num_clients: int, alpha: float,
              rng: np.random.Generator, min_size: int = 1) -> list[np.ndarray]:
    _check_counts(len(labels), num_clients, min_size)
    keys = np.array([str(v) for v in labels])
    classes = sorted(set(keys.tolist()))
    for _ in range(_MAX_REDRAWS):
        shards: list[list[int]] = [[] for _ in range(num_clients)]
        for cls in classes:
            idx = rng.permutation(np.flatnonzero(keys == cls))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, part in enumerate(np.split(idx, cuts)):
                shards[client].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.array(s, dtype=int)) for s in shards]
    raise ConfigError("data.partition.min_size", min_size,
                      f"no Dirichlet({alpha}) split gave every client that many examples; "
                      "lower min_size, raise alpha, or use fewer clients")


def quantity(num_examples: int, num_clients: int, alpha: float,
             rng: np.random.Generator, min_size: int = 1) -> list[np.ndarray]:
    _check_counts(num_examples, num_clients, min_size)
    spare = num_examples - min_size * num_clients
    shares = rng.dirichlet(np.full(num_clients, alpha))
    sizes = min_size + np.floor(shares * spare).astype(int)
    sizes[np.argsort(-shares)[: num_examples - sizes.sum()]] += 1  # deal out the remainder
    cuts = np.cumsum(sizes)[:-1]
    return [np.sort(s) for s in np.split(rng.permutation(num_examples), cuts)]


def natural(user_ids: Sequence[Hashable]) -> list[np.ndarray]:
    groups: dict[Hashable, list[int]] = {}
    for i, uid in enumerate(user_ids):
        groups.setdefault(uid, []).append(i)
    return [np.array(v, dtype=int) for v in groups.values()]


def _check_counts(num_examples: int, num_clients: int, min_size: int) -> None:
    if num_clients < 1:
        raise ConfigError("data.partition.num_clients", num_clients, "must be >= 1")
    if num_examples < num_clients * max(min_size, 1):
        raise ConfigError("data.partition.num_clients", num_clients,
                          f"{num_examples} examples cannot give every client "
                          f"{max(min_size, 1)}; use fewer clients or more data")
