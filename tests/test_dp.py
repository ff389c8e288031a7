"""User-level DP: clipping, noise, adaptive clipping, and DP runs of the loop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_config
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from scipy import stats

from fedsec.accountants import DpEvent, epsilon
from fedsec.cli import main
from fedsec.defenses.dp import (
    COUNT_SENSITIVITY,
    adapt_clip_norm,
    adaptive_update_noise,
    clip_to_norm,
    gaussian_noise,
    joint_noise_multiplier,
    noisy_centred_count,
    private_mean,
)
from fedsec.errors import ConfigError
from fedsec.loop import run_experiment
from fedsec.pipeline import build_pipeline
from fedsec.privacy import UserLevelDp, plan_privacy
from fedsec.rundir import RunDir
from fedsec.seeding import torch_generator
from fedsec.server import poisson_sample


@settings(max_examples=60, deadline=None)
@given(rows=st.lists(st.lists(st.floats(-1e3, 1e3, width=32), min_size=5, max_size=5),
                     min_size=1, max_size=6),
       clip=st.floats(1e-3, 1e3))
def test_clipping_leaves_no_delta_above_c_and_small_ones_untouched(rows, clip):
    deltas = torch.tensor(rows, dtype=torch.float32)
    result = clip_to_norm(deltas, clip)
    norms = torch.linalg.vector_norm(result.clipped.double(), dim=1)
    assert bool((norms <= clip).all())
    small = torch.linalg.vector_norm(deltas.double(), dim=1) <= clip
    assert torch.equal(result.clipped[small], deltas[small])
    # a clipped row keeps its direction
    for i in (~small).nonzero().flatten().tolist():
        cos = torch.nn.functional.cosine_similarity(result.clipped[i].double(), deltas[i].double(), dim=0)
        assert float(cos) > 1 - 1e-6


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.lists(st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False),
                                        st.floats(-2.0 ** -133, 2.0 ** -133, width=32, allow_subnormal=True)),
                              min_size=3, max_size=40), min_size=1, max_size=5).filter(
                                  lambda rows: len({len(r) for r in rows}) == 1),
       clip=st.one_of(st.floats(1e-30, 1e30), st.floats(1e-45, 1e-30)),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
@example(rows=[[0.0, 0.0, 2045658368.0]], clip=1e-30, dtype=torch.float32)  # found by a random draw in CI:
# the scale 5e-40 is subnormal in float32 and its cast lost the margin (norm 1.0000000000000002e-30)
def test_clipping_holds_for_extreme_magnitudes_and_every_path(rows, clip, dtype):
    """The fast float32/64 path's proof (defenses/dp.py) and the float64 fallback (tiny C or
    scale, bfloat16)."""
    deltas = torch.tensor(rows, dtype=torch.float32).to(dtype)
    assume(bool(torch.isfinite(deltas).all()))  # 3.4e38 is inf in bfloat16; the sanitizer rejects that upstream
    result = clip_to_norm(deltas, clip)
    assert result.clipped.dtype == dtype and torch.isfinite(result.clipped).all()
    assert bool((torch.linalg.vector_norm(result.clipped.double(), dim=1) <= clip).all())
    small = result.norms <= clip
    assert torch.equal(result.clipped[small], deltas[small])


def test_private_mean_by_hand():
    deltas = torch.tensor([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0]])
    out = private_mean(deltas, clip_norm=1.0, noise_multiplier=0.0, expected_clients=4.0,
                       generator=torch.Generator().manual_seed(0))
    # row 0 (norm 5) clipped to (0.6, 0.8); divided by the fixed denominator 4, not by 3
    torch.testing.assert_close(out.aggregate, torch.tensor([(0.6 + 0.3) / 4, (0.8 + 0.4) / 4]))
    assert (out.num_clipped, out.num_unclipped) == (1, 2)
    torch.testing.assert_close(out.norms, torch.tensor([5.0, 0.5, 0.0], dtype=torch.float64))


def test_no_noise_and_no_clipping_is_the_plain_mean():
    deltas = torch.randn(5, 7, generator=torch.Generator().manual_seed(1))
    out = private_mean(deltas, math.inf, 0.0, 5.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.aggregate, deltas.mean(0))
    empty = private_mean(torch.zeros(0, 7), 1.0, 0.0, 3.0, torch.Generator())
    assert torch.equal(empty.aggregate, torch.zeros(7))


def test_added_noise_is_gaussian_with_std_sigma_c():
    sigma, clip, m = 1.3, 0.25, 8.0
    deltas = torch.zeros(3, 20_000)
    out = private_mean(deltas, clip, sigma, m, torch.Generator().manual_seed(42))
    noise_on_sum = out.aggregate.double() * m
    torch.testing.assert_close(noise_on_sum, out.noise.double(), rtol=1e-5, atol=1e-7)
    assert stats.kstest(noise_on_sum.numpy(), "norm", args=(0, sigma * clip)).pvalue > 0.01
    # and it is not the noise of another scale
    assert stats.kstest(noise_on_sum.numpy(), "norm", args=(0, 1.2 * sigma * clip)).pvalue < 1e-6
    # the noise is the DP stream's: same generator seed, same noise; different seed, different
    again = gaussian_noise(20_000, sigma * clip, torch.Generator().manual_seed(42))
    assert torch.equal(again, out.noise)


def test_noise_needs_a_finite_clip_norm():
    with pytest.raises(ValueError):
        private_mean(torch.zeros(1, 3), math.inf, 1.0, 1.0, torch.Generator())


def test_adaptive_clipping_by_hand():
    # Andrew et al. 2021, Thm. 1: z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2
    assert adaptive_update_noise(1.0, 1.0) == pytest.approx((1 - 0.25) ** -0.5)
    with pytest.raises(ValueError):
        adaptive_update_noise(1.0, 0.5)
    gen_seed = 7
    noise = float(torch.randn((), generator=torch.Generator().manual_seed(gen_seed), dtype=torch.float64))
    # 6 unclipped, 2 clipped: the centred sum is 6 (+1/2) + 2 (-1/2) = 2, then / (q N) + 1/2
    new_c, frac = adapt_clip_norm(2.0, 6, 2, 8.0, 0.5, 0.2, 0.4, torch.Generator().manual_seed(gen_seed))
    assert frac == pytest.approx((2 + 0.4 * noise) / 8 + 0.5)
    assert new_c == pytest.approx(2.0 * math.exp(-0.2 * (frac - 0.5)))
    # with no noise and q N clients, b~ is exactly the unclipped share
    assert adapt_clip_norm(1.0, 6, 2, 8.0, 0.5, 0.2, 0.0, torch.Generator())[1] == 6 / 8
    # the sign: most deltas already under C (b~ > gamma) -> C shrinks; few -> C grows
    assert adapt_clip_norm(1.0, 8, 0, 8.0, 0.5, 0.2, 1e-9, torch.Generator())[0] < 1.0
    assert adapt_clip_norm(1.0, 0, 8, 8.0, 0.5, 0.2, 1e-9, torch.Generator())[0] > 1.0


def test_one_client_moves_the_released_count_by_at_most_its_sensitivity():
    # neighbouring rounds: one client more, clipped or not; the noise drawn is the same
    for unclipped, clipped in [(0, 0), (3, 5), (7, 0), (0, 4)]:
        base = noisy_centred_count(unclipped, clipped, 1.0, torch.Generator().manual_seed(1))
        for more in (noisy_centred_count(unclipped + 1, clipped, 1.0, torch.Generator().manual_seed(1)),
                     noisy_centred_count(unclipped, clipped + 1, 1.0, torch.Generator().manual_seed(1))):
            assert abs(more - base) == pytest.approx(COUNT_SENSITIVITY)
    assert COUNT_SENSITIVITY == 0.5


@pytest.mark.parametrize("z, sigma_b", [(1.0, 1.0), (1.0, 0.6), (0.7, 3.0), (2.5, 1.3)])
def test_the_update_and_the_count_together_are_the_accounted_mechanism(z, sigma_b):
    # Andrew et al. Thm. 1 with the count's sensitivity 1/2: the joint multiplier is z exactly
    z_delta = adaptive_update_noise(z, sigma_b)
    assert joint_noise_multiplier(z_delta, sigma_b, COUNT_SENSITIVITY) == pytest.approx(z, rel=1e-12)
    # the uncentred count (sensitivity 1) would be a weaker mechanism than the one accounted
    assert joint_noise_multiplier(z_delta, sigma_b, 1.0) < z


def test_adaptive_clip_norm_tracks_the_target_quantile():
    gen = torch.Generator().manual_seed(3)
    norms = torch.rand(2000, generator=gen) * 4  # uniform on [0, 4]: the median is 2
    clip = 0.1
    for t in range(300):
        batch = norms[torch.randint(0, 2000, (50,), generator=gen)]
        under = int((batch <= clip).sum())
        clip, _ = adapt_clip_norm(clip, under, 50 - under, 50.0, 0.5, 0.2, 2.5,
                                  torch.Generator().manual_seed(t))
    assert 1.6 < clip < 2.4


def test_poisson_sampling_rate():
    counts = torch.zeros(20)
    sizes = []
    for r in range(3000):
        picked = poisson_sample(20, 0.15, torch.Generator().manual_seed(r))
        counts[picked] += 1
        sizes.append(len(picked))
    assert (counts / 3000 - 0.15).abs().max() < 0.03
    assert len(set(sizes)) > 3 and abs(sum(sizes) / 3000 - 3.0) < 0.1  # the count varies, mean qN


# ---------------------------------------------------------------------------
# The loop under DP (tiny model).

_EQUAL = {"benchmark": {"num_clients": 4, "examples_per_client": 8, "size_alpha": 0, "test_size": 9,
                        "client_test_size": 2, "num_probes": 2}, "max_length": 160}


def _final(run_dir) -> dict:
    ckpts = sorted((run_dir / "checkpoints").glob("round_*.pt"))
    return torch.load(ckpts[-1], weights_only=False)


def _metrics(run_dir) -> list[dict]:
    rows = RunDir(run_dir).read_metrics()  # a DP run's two files merged
    for row in rows:
        row.pop("seconds", None)
        row.pop("compute", None)
        row.pop("privacy", None)
    return rows


def test_dp_with_zero_noise_and_infinite_clip_equals_the_plain_run(tmp_path):
    # every client every round (q = 1), equal client sizes: FedAvg's weights are 1/N, the
    # DP denominator q N = N; with sigma = 0 and C = inf the DP path must give the same bits
    common = dict(data=_EQUAL, federation={"rounds": 2, "clients_per_round": 4, "local_only_clients": 0})
    plain = tiny_config(tmp_path / "a", **common)
    dp = tiny_config(tmp_path / "b", **common,
                     privacy={"mode": "user", "noise_multiplier": 0.0, "clip_norm": math.inf})
    a = run_experiment(plain, out=tmp_path / "plain", progress=False, log=lambda _: None)
    b = run_experiment(dp, out=tmp_path / "dp", progress=False, log=lambda _: None)
    assert torch.equal(_final(tmp_path / "plain")["global"], _final(tmp_path / "dp")["global"])
    assert _metrics(tmp_path / "plain") == _metrics(tmp_path / "dp")
    assert a.final == b.final
    assert b.privacy["certified"] is False and "no noise" in b.privacy["reason"]
    assert a.privacy is None


def test_dp_run_keeps_a_ledger_and_resumes_to_the_same_epsilon(tmp_path):
    privacy = {"mode": "user", "reproducible": True, "epsilon": 50.0, "delta": 1e-3, "clip_norm": 0.05,
               "adaptive_clipping": True, "clip_count_stddev": 2.0}
    fed = {"rounds": 3, "clients_per_round": 2, "local_only_clients": 0}
    cfg = tiny_config(tmp_path, privacy=privacy, federation=fed)
    whole = run_experiment(cfg, out=tmp_path / "whole", progress=False, log=lambda _: None)
    ledger = json.loads((tmp_path / "whole" / "privacy_ledger.json").read_text())
    assert [e["round"] for e in ledger["entries"]] == [1, 2, 3]
    z, q = whole.privacy["noise_multiplier"], whole.privacy["sample_rate"]
    assert q == 0.5 and z > 0
    assert whole.privacy["certified"] and whole.privacy["epsilon"] <= 50.0
    assert whole.privacy["epsilon"] == pytest.approx(epsilon([DpEvent(z, q, 3)], 1e-3, "rdp"))
    assert set(whole.privacy["epsilons"]) == {"rdp", "prv", "pld"}
    clips = [e["clip_norm"] for e in ledger["entries"]]
    assert clips[0] == 0.05 and len(set(clips)) == 3  # adaptive clipping moved C

    run_experiment(cfg, out=tmp_path / "parts", stop_after=1, progress=False, log=lambda _: None)
    resumed = run_experiment(cfg, out=tmp_path / "parts", resume=True, progress=False, log=lambda _: None)
    assert resumed.privacy == whole.privacy
    assert json.loads((tmp_path / "parts" / "privacy_ledger.json").read_text()) == ledger
    assert torch.equal(_final(tmp_path / "whole")["global"], _final(tmp_path / "parts")["global"])


def test_scaffold_under_dp_is_not_certified(tmp_path):
    cfg = tiny_config(tmp_path, privacy={"mode": "user", "noise_multiplier": 1.0, "delta": 1e-3},
                      federation={"rounds": 1, "clients_per_round": 2, "algorithm": "scaffold"})
    result = run_experiment(cfg, out=tmp_path / "r", progress=False, log=lambda _: None)
    assert not result.privacy["certified"] and "SCAFFOLD" in result.privacy["reason"]
    assert result.privacy["epsilon"] is None


@pytest.mark.parametrize("sets, field", [
    (["privacy.mode=user", "privacy.epsilon=1", "federation.sampling=fixed"], "federation.sampling"),
    (["privacy.mode=user", "privacy.epsilon=1", "privacy.noise_multiplier=1"], "privacy.epsilon"),
    (["privacy.mode=user", "privacy.epsilon=-1"], "privacy.epsilon"),
    (["privacy.mode=user", "privacy.epsilon=1", "privacy.delta=0.5"], "privacy.delta"),
    (["privacy.mode=user", "privacy.noise_multiplier=1", "privacy.clip_norm=inf"], "privacy.clip_norm"),
    (["privacy.mode=user", "privacy.epsilon=1", "privacy.clip_norm=0"], "privacy.clip_norm"),
])
def test_bad_privacy_config_is_one_line(tmp_path, capsys, sets, field):
    import yaml
    from conftest import TINY

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump({**TINY, "output_dir": str(tmp_path / "runs")}))
    argv = ["run", str(path), "--no-progress"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and field in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing was created


def test_delta_must_be_below_one_over_clients(tmp_path):
    cfg = tiny_config(tmp_path, privacy={"mode": "user", "epsilon": 1.0, "delta": 0.3})
    with pytest.raises(ConfigError, match="privacy.delta"):
        run_experiment(cfg, out=tmp_path / "r", progress=False, log=lambda _: None)
    assert not (tmp_path / "r").exists()


def test_the_ledger_records_the_noise_split_and_the_noise_has_the_recorded_std(tmp_path):
    # adaptive clipping at q 0.1, sigma_b 1: the setting where the uncentred count understated epsilon
    cfg = tiny_config(tmp_path, privacy={"mode": "user", "noise_multiplier": 1.0, "clip_norm": 0.5,
                                         "adaptive_clipping": True, "clip_count_stddev": 1.0},
                      federation={"rounds": 4, "clients_per_round": 2})
    plan = plan_privacy(cfg, 20)
    dp = UserLevelDp(cfg, plan, root=11)
    dim = 200_000
    clips = []
    for round_idx in range(4):
        clips.append(dp.clip_norm)
        batch = build_pipeline(cfg, tmp_path, dim, dp)([], round_idx)  # nobody sampled: noise alone
        aggregate, info = batch.aggregate, dp.record(batch)
        entry = dp.ledger.entries[-1]
        z = (entry.update_noise_multiplier ** -2 + (entry.count_stddev / entry.count_sensitivity) ** -2) ** -0.5
        assert z == pytest.approx(entry.noise_multiplier, rel=1e-12) and entry.noise_multiplier == 1.0
        assert entry.count_sensitivity == 0.5 and entry.count_stddev == 1.0
        # the update noise: N(0, (z_delta C)^2) on the sum, / q N
        std = float((aggregate.double() * plan.expected_clients).std())
        assert std == pytest.approx(entry.update_noise_multiplier * entry.clip_norm, rel=0.01)
        assert "clipped" not in info and "median_norm" not in info and set(info["hidden"]) == {
            "clipped", "unclipped", "median_norm"}
    # the count noise: C_{t+1} = C_t exp(-eta (s~ / qN + 1/2 - gamma)); with nobody sampled s~ is noise alone
    eta, gamma = cfg.privacy.clip_lr, cfg.privacy.target_quantile
    released = [(-math.log(clips[t + 1] / clips[t]) / eta + gamma - 0.5) * plan.expected_clients
                for t in range(3)]
    draws = [noisy_centred_count(0, 0, 1.0, torch_generator(11, "dp-clip-count", t)) for t in range(3)]
    assert released == pytest.approx(draws, rel=1e-9)
    many = torch.tensor([noisy_centred_count(0, 0, 1.0, torch_generator(11, "dp-clip-count", t))
                         for t in range(4000)])
    assert float(many.std()) == pytest.approx(1.0, rel=0.05)


def test_an_impossible_noise_split_is_refused_in_one_line(tmp_path, capsys):
    cfg = tiny_config(tmp_path, privacy={"mode": "user", "noise_multiplier": 1.0, "clip_norm": 0.5,
                                         "adaptive_clipping": True, "clip_count_stddev": 0.5})
    with pytest.raises(ConfigError) as err:
        plan_privacy(cfg, 20)
    assert err.value.field == "privacy.clip_count_stddev" and "\n" not in str(err.value)


def test_the_pipeline_clips_with_sanitizes_norms_in_place_on_its_own_copy_and_equals_the_plain_computation():
    """Sanitize reads each delta once, copying it into its stack with its float64 norm taken on
    the way (block by block: rows longer than one block here), and Clip scales the stacked copy
    in place: the norms within float64's summation bound d 2^-53 of the plain ones, the rows
    exactly what clipping with those norms gives, the clients' own deltas untouched."""
    from fedsec.defenses.dp import NORM_BLOCK
    from fedsec.pipeline import Batch, Clip, Sanitize
    from fedsec.results import ClientUpdate

    d = NORM_BLOCK + 17
    g = torch.Generator().manual_seed(5)
    rows = [torch.randn(d, generator=g) * scale for scale in (1e-3, 0.2, 3.0, 50.0)]
    originals = [r.clone() for r in rows]
    updates = [ClientUpdate(k, r, 4) for k, r in enumerate(rows)]
    batch = Clip(lambda: 1.0)(Sanitize(None)(Batch(0, d, tuple(updates))))
    by_hand = torch.stack([torch.linalg.vector_norm(r.to(torch.float64)) for r in originals])
    assert torch.allclose(batch.norms, by_hand, rtol=d * 2.0 ** -53, atol=0)
    assert torch.equal(batch.deltas, clip_to_norm(torch.stack(originals), 1.0, batch.norms).clipped)
    assert all(torch.equal(r, o) for r, o in zip(rows, originals))
    assert float(torch.linalg.vector_norm(batch.deltas.double(), dim=1).max()) <= 1.0
    assert batch.info["clip"]["clipped"] == 3 and batch.info["clip"]["unclipped"] == 1  # norms 0.5, 100, 1500, 26000


def test_sanitize_reuses_its_stack_across_rounds_and_an_aggregate_that_is_a_row_survives_the_next_round():
    import dataclasses

    from fedsec.pipeline import Sanitize, ServerPipeline
    from fedsec.results import ClientUpdate

    def first_row(b):  # a rule that returns one client's delta as it is: a view of the stack
        return dataclasses.replace(b, aggregate=b.deltas[0])

    pipeline = ServerPipeline([Sanitize(None), first_row], 5, None)
    g = torch.Generator().manual_seed(0)
    rounds = [[torch.randn(5, generator=g) for _ in range(k)] for k in (3, 2, 4)]
    batches = [pipeline([ClientUpdate(c, d, 1) for c, d in enumerate(r)], t) for t, r in enumerate(rounds)]
    assert [b.deltas.shape[0] for b in batches] == [3, 2, 4]
    assert batches[1].deltas.data_ptr() == batches[0].deltas.data_ptr()  # the same buffer, round after round
    for b, r in zip(batches, rounds):
        assert torch.equal(b.aggregate, r[0])  # copied out of the buffer before the next round overwrote it
    assert torch.equal(batches[2].deltas, torch.stack(rounds[2]))


def test_dp_fedavgs_mean_weights_unscaled_rows_by_their_clipping_factors_within_the_bound():
    """The certified path leaves the stacked rows as they are (Clip with scale_rows=False) and
    the fixed-denominator mean applies each row's clipping factor in its one product: the same
    aggregate as summing the clipped rows (to float32 rounding), and one client's term
    w_k d_k is still within C / (q N)."""
    from fedsec.pipeline import Batch, Clip, FixedDenominatorMean, Sanitize
    from fedsec.results import ClientUpdate

    g = torch.Generator().manual_seed(8)
    rows = [torch.randn(5000, generator=g) * scale for scale in (1e-3, 0.5, 4.0, 70.0, 2.0)]
    updates = tuple(ClientUpdate(k, r, 3) for k, r in enumerate(rows))
    mean = FixedDenominatorMean(4.0)
    lazy = Clip(lambda: 1.5, scale_rows=False)(Sanitize(None)(Batch(0, 5000, updates)))
    assert all(torch.equal(a, b) for a, b in zip(lazy.deltas, rows))  # the rows untouched
    terms = (lazy.weights / 4.0).float()[:, None] * lazy.deltas
    assert float(torch.linalg.vector_norm(terms.double(), dim=1).max()) <= 1.5 / 4.0
    got = mean(lazy).aggregate
    scaled = mean(Clip(lambda: 1.5)(Sanitize(None)(Batch(0, 5000, updates)))).aggregate
    plain = private_mean(torch.stack(rows), 1.5, 0.0, 4.0, torch.Generator()).aggregate
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-7)
    assert torch.equal(scaled, plain)  # the scaled path is DP-FedAvg's formula bit for bit


def test_gaussian_noise_draws_the_values_of_randn_times_std():
    for std in (0.3, 2.0, 1e-3):
        old = (torch.randn(10_000, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * std).float()
        assert torch.equal(gaussian_noise(10_000, std, torch.Generator().manual_seed(9)), old)
