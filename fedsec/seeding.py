"""Explicit randomness: every stream derives from one root seed.

Library code never reseeds the global RNG. Each consumer asks for its own stream
by a key path, e.g. `derive_seed(root, "client", round_idx, client_id)`, so the
streams of different rounds and clients are independent of call order, and a
resumed run draws exactly what an uninterrupted run would have drawn.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator

import numpy as np
import torch


def derive_seed(root: int, *keys: object) -> int:
    """A 63-bit seed determined by the root seed and a key path."""
    text = "/".join([str(int(root))] + [str(k) for k in keys])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def torch_generator(root: int, *keys: object) -> torch.Generator:
    gen = torch.Generator()
    gen.manual_seed(derive_seed(root, *keys))
    return gen


def numpy_generator(root: int, *keys: object) -> np.random.Generator:
    return np.random.default_rng(derive_seed(root, *keys))


@contextlib.contextmanager
def scoped_torch_seed(seed: int) -> Iterator[None]:
    """Seed torch's global CPU RNG inside the block and restore it afterwards.

    Modules such as dropout draw from the global RNG and take no generator; this
    makes them deterministic per (round, client) without touching anyone else's
    random state.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed % (2**63))
        yield
