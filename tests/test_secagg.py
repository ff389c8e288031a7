"""Secure aggregation (flower.secagg): Flower's own SecAgg+ workflow and client mod drive
the round; fedsec's part is what each node sums (its clients' clipped deltas), what the
server makes of the unmasked total, and the noise scaled to a sensitivity that includes
SecAgg+'s rounding. The protocol runs here over an in-memory grid (no processes): each
SuperNode is its ClientApp stack with a Context that persists across messages."""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, Error, Message, RecordDict  # noqa: E402

import fedsec.engine.flower_client as flower_client  # noqa: E402
from fedsec.config import FlowerConfig  # noqa: E402
from fedsec.engine.flower import FlowerClients  # noqa: E402
from fedsec.engine.worker import secure_sum  # noqa: E402
from fedsec.pipeline import Batch, Noise, SecureMean  # noqa: E402

DIM, CLIP, RANGE, BITS = 64, 0.5, 1.0, 16
STEP = 2 * RANGE / 2 ** BITS  # one quantization level


@pytest.fixture(autouse=True)
def _inside_a_run(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _delta(client: int) -> torch.Tensor:
    return torch.randn(DIM, generator=torch.Generator().manual_seed(client)) * (0.1 + 0.2 * client)


class MemoryGrid:
    """SuperNodes as ClientApp stacks in this process: the SecAgg+ mod, then fedsec's train
    handler, whose worker is played by `secure_sum` over fixed deltas. A node in `drop`
    fails when asked for its masked vector."""

    def __init__(self, hosts: dict[int, list[int]], drop: set[int] = frozenset()):
        self.hosts, self.drop = hosts, drop
        self.contexts = {n: Context(1, n, {"partition-id": p, "num-partitions": len(hosts)}, RecordDict(),
                                    {"config": "", "workdir": "."}) for p, n in enumerate(hosts)}

    def get_node_ids(self):
        return list(self.hosts)

    def send_and_receive(self, messages, timeout=None):
        return [self._answer(copy.deepcopy(m)) for m in messages]  # each node gets its own copy, as on a wire

    def _answer(self, message):
        node = message.metadata.dst_node_id
        try:
            return flower_client._secure_when_asked(message, self.contexts[node], self._train)
        except Exception as err:  # what Flower sends back for a ClientApp that raised
            return Message(Error(code=0, reason=str(err)), reply_to=message)

    def _train(self, message, context):
        if context.node_id in self.drop:
            raise RuntimeError("node lost mid-round")
        return flower_client.train(message, context)

    def worker_call(self, supernode, meta, arrays):
        asked = [c for c in meta["clients"] if c in sum(self.hosts.values(), [])]
        deltas = torch.stack([_delta(c) for c in asked]) if asked else torch.zeros(0, DIM)
        reply = {"clients": asked, "num_examples": [4] * len(asked), "loss": [1.0] * len(asked),
                 "loss_terms": [4] * len(asked), "tokens": [32] * len(asked)}
        return reply, {"sum": secure_sum(deltas, meta["secure"]["clip"]).numpy()}


def _round(grid: MemoryGrid, sampled: list[int], threshold: float = 0.5):
    runner = FlowerClients(grid, FlowerConfig(secagg=True, secagg_clip_range=RANGE, secagg_bits=BITS,
                                              secagg_threshold=threshold, round_timeout=5),
                           context=grid.contexts[next(iter(grid.hosts))])
    runner.routes = {n: (p, len(grid.hosts)) for p, n in enumerate(grid.hosts)}
    runner._hosted = lambda node: (lambda c: c in grid.hosts[node])
    clients = sum(len(v) for v in grid.hosts.values())
    setup = SimpleNamespace(population=clients, trainable=clients,
                            cfg=SimpleNamespace(privacy=SimpleNamespace(mode="user", clip_norm=CLIP)))
    return runner._secure_updates(setup, torch.zeros(DIM), sampled, 1e-3, 0, 0.0)


def _plain(clients: list[int]) -> torch.Tensor:
    return secure_sum(torch.stack([_delta(c) for c in clients]), CLIP)


def test_the_secure_sum_is_the_plain_sum_of_clipped_deltas_within_the_rounding_bound(monkeypatch):
    grid = MemoryGrid({11: [0, 1, 2], 12: [3, 4], 13: [5]})
    monkeypatch.setattr(flower_client.worker, "call", grid.worker_call)
    secure, failed = _round(grid, [0, 2, 3, 4])  # node 13 has no sampled client: it adds zeros
    assert failed == () and [u.client_id for u in secure.updates] == [0, 2, 3, 4]
    assert all(u.delta.numel() == 0 for u in secure.updates)  # no single delta reaches the server
    plain = _plain([0, 2, 3, 4])
    error = (secure.total - plain).abs()
    assert float(error.max()) < 3 * STEP + 1e-6  # each of the 3 nodes' rounding: under one step
    assert float(error.max()) > 0  # it was quantized, not passed through
    assert float(torch.linalg.vector_norm(secure.total - plain)) < math.sqrt(DIM) * 3 * STEP


def test_a_node_lost_mid_round_fails_its_clients_and_the_others_sum_is_unmasked(monkeypatch):
    grid = MemoryGrid({11: [0, 1], 12: [2, 3], 13: [4, 5]}, drop={12})
    monkeypatch.setattr(flower_client.worker, "call", grid.worker_call)
    secure, failed = _round(grid, [0, 2, 4, 5])  # threshold 2 of 3 shares: one node may drop
    assert failed == (2,) and [u.client_id for u in secure.updates] == [0, 4, 5]
    assert float((secure.total - _plain([0, 4, 5])).abs().max()) < 2 * STEP + 1e-6
    two = MemoryGrid({11: [0, 1], 12: [2, 3]}, drop={12})  # 2 nodes: both shares are needed
    monkeypatch.setattr(flower_client.worker, "call", two.worker_call)
    secure, failed = _round(two, [0, 2])
    assert failed == (0, 2) and secure.updates == () and not secure.total.any()


def test_under_dp_the_noise_is_scaled_to_the_sensitivity_with_rounding_and_the_ledger_keeps_the_clip_norm():
    from fedsec.defenses.dp import secagg_sensitivity

    bound = secagg_sensitivity(CLIP, DIM, RANGE, BITS)
    assert bound == pytest.approx(0.5 + 8 * 2 / 65536)  # C + sqrt(64) * 2r / 2^16, by hand
    plan = SimpleNamespace(update_noise=1.3, noise_multiplier=1.3, sample_rate=0.5, expected_clients=2.0,
                           count_stddev=None, correlated=None)
    dp = SimpleNamespace(plan=plan, root=7, cfg=SimpleNamespace(privacy=SimpleNamespace(adaptive_clipping=False)),
                         round_multiplier=lambda rounds_done: plan.noise_multiplier)
    from fedsec.results import SecureSum

    batch = Batch(0, 500, (), secure=SecureSum(torch.zeros(500), ()))
    for stage in (SecureMean(CLIP, 2.0, bound), Noise(dp)):
        batch = stage(batch)
    clipped_only = Noise(dp)(Batch(0, 500, (), aggregate=torch.zeros(500), info={"clip": {"clip_norm": CLIP}}))
    ratio = batch.aggregate / clipped_only.aggregate  # the same DP stream, scaled to the bound instead of C
    assert torch.allclose(ratio, torch.full((500,), bound / CLIP), rtol=1e-6)
    assert float(clipped_only.aggregate.std()) * 2.0 == pytest.approx(1.3 * CLIP, rel=0.1)  # z C / (q N)
    assert batch.release.clip_norm == CLIP and batch.info["clip"]["sensitivity"] == bound
    plain = SecureMean()(Batch(0, 3, (), secure=SecureSum(torch.tensor([2.0, 4.0, 6.0]), tuple(
        SimpleNamespace(client_id=c) for c in (1, 2)))))
    assert plain.aggregate.tolist() == [1.0, 2.0, 3.0]  # without DP: each client weighs 1
