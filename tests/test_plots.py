"""Figures read run and sweep directories; their data are checked against the files."""

from __future__ import annotations

import json
import statistics

import pytest

from fedsec.reports.plots import (
    epsilon_by_round,
    epsilon_over_rounds,
    grid_axes,
    privacy_utility,
    privacy_utility_data,
    save,
    sweep_rows,
    training_curve_data,
    training_curves,
)


def _row(variant, seed, acc, eps=None, certified=None, local=None, untuned=0.40):
    return {"variant": variant, "seed": seed, "final_accuracy": acc, "epsilon": eps,
            "certified": certified, "local_only_accuracy": local, "untuned_accuracy": untuned,
            "noise_multiplier": None if certified is None else 1.0}


@pytest.fixture
def sweep_dir(tmp_path):
    rows = [_row("non-private", 0, 0.70, local=0.35), _row("non-private", 1, 0.60, local=0.45),
            _row("eps8", 0, 0.62, 7.99, True), _row("eps8", 1, 0.58, 7.99, True),
            _row("eps1", 0, 0.45, 0.998, True), _row("eps1", 1, 0.47, 0.998, True),
            _row("epsinf", 0, 0.69, None, False), _row("epsinf", 1, 0.61, None, False)]
    (tmp_path / "results.json").write_text(json.dumps(rows))
    return tmp_path


def test_privacy_utility_data_by_hand(sweep_dir):
    data = privacy_utility_data(sweep_rows(sweep_dir))
    assert [(v, e) for v, e, _ in data.curve] == [("eps1", 0.998), ("eps8", 7.99)]  # sorted; epsinf out
    eps8 = data.curve[1][2]
    assert eps8.mean == pytest.approx(0.60) and eps8.std == pytest.approx(statistics.stdev([0.62, 0.58]))
    assert data.non_private.mean == pytest.approx(0.65) and data.non_private.n == 2
    assert data.local_only.mean == pytest.approx(0.40)
    assert data.untuned.mean == pytest.approx(0.40) and data.untuned.std == 0


def test_privacy_utility_figure_draws_the_means(sweep_dir):
    fig = privacy_utility(sweep_dir)
    ax = fig.axes[0]
    curve = [line for line in ax.lines if line.get_marker() == "o"][0]
    assert list(curve.get_xdata()) == [0.998, 7.99]
    assert list(curve.get_ydata()) == pytest.approx([0.46, 0.60])
    flat = sorted(round(line.get_ydata()[0], 6) for line in ax.lines if line.get_marker() != "o"
                  and len(set(line.get_ydata())) == 1 and len(line.get_ydata()) == 2)
    assert flat == pytest.approx([0.40, 0.40, 0.65])  # untuned, local-only, non-private
    assert ax.get_xscale() == "log"


def _cell(variant, seed, loss, eps=None, **axes):
    return {"variant": variant, **axes, "seed": seed, "final_loss": loss, "epsilon": eps,
            "certified": None if eps is None else True, "untuned_loss": 4.0}


def test_a_grid_draws_one_curve_per_mechanism_along_the_budget(tmp_path):
    rows = [_cell("non-private", s, 0.3 + s / 10, mechanism=None, budget=None) for s in (0, 1)]
    for mechanism, base in (("tree", 3.0), ("banded_mf", 2.0)):
        for budget, eps in (("8", 7.99), ("2", 1.998)):
            rows += [_cell(f"{mechanism}-{budget}", s, base + (eps < 2) + s / 10, eps,
                           mechanism=mechanism, budget=budget) for s in (0, 1)]
    (tmp_path / "results.json").write_text(json.dumps(rows))
    assert grid_axes(rows) == ["mechanism", "budget"]
    data = privacy_utility_data(rows, "final_loss")
    assert list(data.curves) == ["tree", "banded_mf"]  # the sweep's order
    assert [(v, e, s.mean) for v, e, s in data.curves["banded_mf"]] == [
        ("banded_mf-2", 1.998, pytest.approx(3.05)), ("banded_mf-8", 7.99, pytest.approx(2.05))]
    assert data.non_private.mean == pytest.approx(0.35) and data.untuned.mean == 4.0
    fig = privacy_utility(tmp_path, "final_loss")
    drawn = {line.get_marker(): list(line.get_ydata()) for line in fig.axes[0].lines if len(line.get_xdata()) == 2
             and line.get_marker() in ("o", "s")}
    assert drawn == {"o": pytest.approx([4.05, 3.05]), "s": pytest.approx([3.05, 2.05])}
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["2.00", "8.00"]  # rounded up, never down


def test_series_are_the_axes_that_leave_epsilon_in_place(tmp_path):
    rows = [_cell(f"{clip}-{noise}", 0, 1.0, eps, clip=clip, noise=noise)
            for clip in ("c1", "c5") for noise, eps in (("z1", 6.0), ("z2", 2.0))]
    assert list(privacy_utility_data(rows, "final_loss").curves) == ["c1", "c5"]  # noise moves epsilon
    rows = [_cell(f"{v}", 0, 1.0, 4.0, aggregator=v) for v in ("mean", "median")]
    assert list(privacy_utility_data(rows, "final_loss").curves) == ["mean", "median"]  # one point each
    plain = [{"variant": "eps1", "seed": 0, "final_loss": 1.0, "epsilon": 1.0, "certified": True}]
    assert list(privacy_utility_data(plain, "final_loss").curves) == ["user-level DP"]
    # a plain variant beside a grid (no levels of its own) is its own series, by its name
    rows = [_cell("clean-eps8", 0, 1.0, 8.0, attack=None, defense=None),
            _cell("ipm-mean", 0, 2.0, 8.0, attack="ipm", defense="mean")]
    assert list(privacy_utility_data(rows, "final_loss").curves) == ["clean-eps8", "ipm, mean"]


def test_figures_skip_what_the_directory_lacks(tmp_path):
    assert privacy_utility(tmp_path) is None
    (tmp_path / "results.json").write_text(json.dumps([_row("fedavg", 0, 0.6)]))
    assert privacy_utility(tmp_path) is None  # no DP run: no curve
    assert epsilon_over_rounds(tmp_path) is None and training_curves(tmp_path) is None


def test_epsilon_by_round_reads_both_ledger_kinds(tmp_path):
    user = {"certified": True, "primary": "rdp", "entries": [
        {"round": 1, "epsilon": {"rdp": 1.0, "pld": 0.8}}, {"round": 2, "epsilon": {"rdp": 1.5, "pld": 1.2}}]}
    (tmp_path / "privacy_ledger.json").write_text(json.dumps(user))
    assert epsilon_by_round(tmp_path) == {"rdp": [(1, 1.0), (2, 1.5)], "pld": [(1, 0.8), (2, 1.2)]}
    fig = epsilon_over_rounds(tmp_path)
    assert sorted(tuple(line.get_ydata()) for line in fig.axes[0].lines) == [(0.8, 1.2), (1.0, 1.5)]
    record = {"kind": "record", "certified": True, "primary": "prv",
              "rounds": [{"round": 1, "epsilon": 0.5}, {"round": 2, "epsilon": 0.7}]}
    (tmp_path / "privacy_ledger.json").write_text(json.dumps(record))
    assert epsilon_by_round(tmp_path) == {"prv": [(1, 0.5), (2, 0.7)]}
    (tmp_path / "privacy_ledger.json").write_text(json.dumps({**user, "certified": False}))
    assert epsilon_by_round(tmp_path) == {}  # not certified: no epsilon is drawn


def test_training_curve_data_by_hand(tmp_path):
    def clients(*accs):
        return {"per_client": {str(i): {"accuracy": a, "loss": 1.0} for i, a in enumerate(accs)}}

    rows = [{"phase": "federated", "round": 0, "global_eval": {"accuracy": 0.4, "loss": 4.0},
             "client_eval": clients(0.2, 0.6)},
            {"phase": "federated", "round": 1, "global_eval": None},
            {"phase": "federated", "round": 2, "global_eval": {"accuracy": 0.7, "loss": 0.5},
             "client_eval": clients(0.5, 0.8, 0.9)},
            {"phase": "local_only_final", "round": 2, "mean_accuracy": 0.3}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    data = training_curve_data(tmp_path)
    assert data.rounds == [0, 2] and data.accuracy == [0.4, 0.7] and data.loss == [4.0, 0.5]
    assert data.client_min == [0.2, 0.5] and data.client_max == [0.6, 0.9]
    assert data.client_mean == pytest.approx([0.4, 2.2 / 3])
    paths = save(training_curves(tmp_path), tmp_path / "fig" / "training")
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_text().lstrip().startswith("<?xml")


def test_exposure_against_epsilon_uses_the_same_curve_machinery(tmp_path):
    rows = []
    for variant, eps, certified, exposure in (("non-private", None, None, 14.0), ("eps8", 8.0, True, 5.0),
                                              ("eps1", 1.0, True, 2.5)):
        for seed, shift in ((0, -0.5), (1, 0.5)):
            rows.append({**_row(variant, seed, 0.5, eps, certified), "exposure": exposure + shift,
                         "untuned_exposure": 2.0})
    (tmp_path / "results.json").write_text(json.dumps(rows))
    data = privacy_utility_data(sweep_rows(tmp_path), "exposure")
    assert [(v, e, s.mean) for v, e, s in data.curve] == [("eps1", 1.0, 2.5), ("eps8", 8.0, 5.0)]
    assert data.non_private.mean == 14.0 and abs(data.non_private.std - 2 ** 0.5 / 2) < 1e-12
    assert data.untuned.mean == 2.0 and data.local_only is None
    fig = privacy_utility(tmp_path, "exposure")
    assert fig.axes[0].get_title() == f"Memorization: {tmp_path.name}"
    assert fig.axes[0].get_ylabel() == "canary exposure (bits)"


def test_audit_bounds_by_hand_and_the_figure_draws_y_equals_x(tmp_path):
    from fedsec.reports.plots import audit_bounds, audit_bounds_data

    rows = [{**_row("non-private", 0, 0.5), "audit_bound": 0.6}, {**_row("non-private", 1, 0.5), "audit_bound": 0.8},
            {**_row("eps8", 0, 0.5, 8.0, True), "audit_bound": 0.2},
            {**_row("eps8", 1, 0.5, 8.0, True), "audit_bound": 0.0},
            {**_row("eps1", 0, 0.5, 1.0, True), "audit_bound": 0.0},
            {**_row("epsinf", 0, 0.5, None, False), "audit_bound": 3.0},  # not certified: neither
            {**_row("unaudited", 0, 0.5, 2.0, True), "audit_bound": None}]
    (tmp_path / "results.json").write_text(json.dumps(rows))
    data = audit_bounds_data(sweep_rows(tmp_path))
    assert [(v, e, s.mean) for v, e, s in data.points] == [("eps1", 1.0, 0.0), ("eps8", 8.0, 0.1)]
    assert abs(data.non_private.mean - 0.7) < 1e-12 and data.non_private.n == 2
    ax = audit_bounds(tmp_path).axes[0]
    diagonal = ax.get_lines()[0]
    assert list(diagonal.get_xdata()) == list(diagonal.get_ydata())  # y = x
    assert ax.get_xlabel() == "accountant's epsilon"
    assert audit_bounds_data([_row("eps8", 0, 0.5, 8.0, True)]) is None


def test_privacy_comparisons_leave_out_attacked_runs_where_clean_ones_exist():
    """A DP x robustness sweep: the non-private reference is the clean run, not the mean of
    clean and attacked ones; the attacked DP runs are the attack pages' business."""
    from fedsec.reports.plots import without_attacks

    rows = [{**_cell("clean-off", 0, 0.55, None), "certified": None, "malicious_count": 0},
            {**_cell("ipm-off", 0, 0.41, None), "certified": None, "malicious_count": 16},
            {**_cell("clean-eps8", 0, 0.47, 8.0), "malicious_count": 0},
            {**_cell("ipm-eps8", 0, 0.48, 8.0), "malicious_count": 16}]
    assert [r["variant"] for r in without_attacks(rows)] == ["clean-off", "clean-eps8"]
    data = privacy_utility_data(rows, "final_loss")
    assert data.non_private.mean == 0.55 and [p[0] for p in data.curve] == ["clean-eps8"]
    attacked = [r for r in rows if r["malicious_count"]]
    assert without_attacks(attacked) == attacked  # all attacked: nothing to leave out
