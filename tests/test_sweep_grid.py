"""Grid sweeps: attack x fraction x defense cells, shared clean runs, one row per cell."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from conftest import TINY

from fedsec.attacks.clients import detection_rates
from fedsec.errors import ConfigError
from fedsec.sweeps import expand, run_sweep, summary_table

GRID = {
    "attack": {"sign_flip": ["attack.kind=sign_flip", "attack.params={scale: 20}"],
               "gaussian": ["attack.kind=gaussian", "attack.params={std: 1}"]},
    "fraction": {0: ["attack.kind=none", "attack.fraction=0", "attack.params={}"],
                 0.33: ["attack.fraction=0.33"]},
    "defense": {"mean": ["defense.aggregator=mean"],
                "krum": ["defense.aggregator=krum", "defense.f=1"]},
}


def _spec(tmp_path, **extra):
    bench = {**TINY["data"]["benchmark"], "num_clients": 6, "num_probes": 0}
    base = {**TINY, "data": {**TINY["data"], "benchmark": bench},
            "federation": {"rounds": 2, "clients_per_round": 6, "local_only_clients": 0},
            "training": {**TINY["training"], "local_steps": 1}, "eval": {"clients": False}}
    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump({"name": "g", "base": base, "seeds": [0], "output_dir": str(tmp_path / "runs"),
                                    "grid": GRID, **extra}, sort_keys=False))
    return spec


def test_grid_expands_to_the_product_of_its_axes_in_order(tmp_path):
    root, runs, _, _ = expand(_spec(tmp_path, seeds=[0, 1]))
    names = list(dict.fromkeys(r.variant for r in runs))
    assert names == ["sign_flip-0-mean", "sign_flip-0-krum", "sign_flip-0.33-mean", "sign_flip-0.33-krum",
                     "gaussian-0-mean", "gaussian-0-krum", "gaussian-0.33-mean", "gaussian-0.33-krum"]
    assert len(runs) == 16
    run = next(r for r in runs if r.variant == "gaussian-0-krum" and r.seed == 1)
    assert run.cell == (("attack", "gaussian"), ("fraction", "0"), ("defense", "krum"))
    assert run.overrides == ("attack.kind=gaussian", "attack.params={std: 1}", "attack.kind=none",
                             "attack.fraction=0", "attack.params={}", "defense.aggregator=krum",
                             "defense.f=1", "seed=1")
    assert run.out == root / "gaussian-0-krum-s1"


@pytest.mark.parametrize("grid, field", [
    ({"seed": {"a": []}}, "sweep.grid"),                       # a column of the table
    ({"attack": {"a/b": []}}, "sweep.grid.attack"),             # not a directory name
    ({"attack": []}, "sweep.grid.attack"),                      # levels must be a mapping
    ({"attack": {"a": "attack.kind=gaussian"}}, "sweep.grid.attack.a"),  # overrides must be a list
])
def test_bad_grids_name_the_field(tmp_path, grid, field):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump({"name": "g", "base": TINY, "grid": grid}))
    with pytest.raises(ConfigError) as err:
        expand(spec)
    assert err.value.field == field


def test_detection_rates_by_hand():
    rounds = [{"malicious": [1, 4], "true_positives": [4], "false_positives": [], "honest": 3},
              {"malicious": [1], "true_positives": [1], "false_positives": [0, 2], "honest": 4},
              {"malicious": [], "true_positives": [], "false_positives": [], "honest": 5}]
    assert detection_rates(rounds) == {"true_positive_rate": 2 / 3, "false_positive_rate": 2 / 12}
    assert detection_rates([]) == {"true_positive_rate": None, "false_positive_rate": None}


def test_grid_sweep_shares_clean_runs_resumes_and_has_one_row_per_cell(tmp_path):
    spec = _spec(tmp_path)
    lines = []
    root = run_sweep(spec, progress=False, log=lines.append)
    # the gaussian column's 0% cells are the sign_flip column's: the same experiment
    assert sum("starting" in line for line in lines) == 6
    assert sum("shared" in line for line in lines) == 2
    assert not (root / "gaussian-0-mean-s0").exists()
    summary = list(csv.DictReader((root / "summary.csv").open()))
    assert [(r["attack"], r["fraction"], r["defense"]) for r in summary] == [
        (a, f, d) for a in ("sign_flip", "gaussian") for f in ("0", "0.33") for d in ("mean", "krum")]
    rows = {r["variant"]: r for r in json.loads((root / "results.json").read_text())}
    assert rows["gaussian-0-mean"]["run_dir"] == rows["sign_flip-0-mean"]["run_dir"]
    assert rows["gaussian-0-mean"]["final_accuracy"] == rows["sign_flip-0-mean"]["final_accuracy"]
    for name, row in rows.items():
        attacked = "-0.33-" in name
        assert row["malicious_count"] == (2 if attacked else 0) and row["num_clients"] == 6
        assert row["attack_kind"] == (name.split("-")[0] if attacked else "none")
        assert row["aggregator"] == name.split("-")[-1]
        # the mean drops nobody; the table's rates are the rounds' detections, recounted
        metrics = [json.loads(x) for x in open(f"{row['run_dir']}/metrics.jsonl")]
        detected = detection_rates([m["attack"] for m in metrics if m.get("attack")])
        assert row["true_positive_rate"] == detected["true_positive_rate"]
        if attacked and name.endswith("mean"):
            assert row["true_positive_rate"] == 0.0 and row["false_positive_rate"] == 0.0
        if not attacked:
            assert row["true_positive_rate"] is None
    assert rows["sign_flip-0.33-krum"]["true_positive_rate"] > 0  # x20 sign flips stand out
    table = summary_table(root)
    assert table.splitlines()[0].startswith("| variant | attack | fraction | defense | seeds | final accuracy")
    assert "malicious dropped" in table and len(table.splitlines()) == 2 + 8

    # an interrupted run resumes from its checkpoint, the others are skipped; same table
    before = (root / "results.csv").read_text()
    (root / "gaussian-0.33-krum-s0" / "result.json").unlink()
    again = []
    run_sweep(spec, progress=False, log=again.append)
    assert [line for line in again if line.startswith("[sweep]") and "resuming" in line] == [
        "[sweep] gaussian-0.33-krum seed 0: resuming"]
    assert sum("finished earlier" in line for line in again) == 5
    assert (root / "results.csv").read_text() == before

    # the report reads the grid: one table row per cell, heatmaps and fraction curves
    from fedsec.reports.pdf import build_report
    pdf = build_report(root)
    files = root / "report_files"
    grid = list(csv.DictReader((files / "grid.csv").open()))
    assert [g["cell"] for g in grid] == [r["variant"] for r in summary]
    assert grid[2]["malicious"] == "2 of 6" and grid[0]["malicious"] == "0 of 6"
    assert (files / "attack_grid.png").is_file() and (files / "attack_fractions.svg").is_file()
    assert (files / "training_sign_flip-0.33-mean.png").is_file()  # dots in cell names survive
    import pypdfium2
    text = "".join(page.get_textpage().get_text_range() for page in pypdfium2.PdfDocument(pdf))
    assert "Malicious-client grid" in text and "sign_flip at 33% malicious clients" in text


def _row(seed, kind, count, aggregator, acc, run_dir, refusal=None):
    return {"variant": f"{kind}-{count}-{aggregator}", "seed": seed, "run_dir": run_dir, "attack_kind": kind,
            "malicious_count": count, "num_clients": 10, "aggregator": aggregator, "final_accuracy": acc,
            "refusal_rate": refusal, "true_positive_rate": None if count == 0 else 0.5}


def test_attack_grid_data_counts_clean_runs_once_per_attack():
    from fedsec.reports.plots import attack_grid_data

    rows = [
        # the clean run of each defense, listed under two attacks' 0% cells (one directory)
        _row(0, "none", 0, "mean", 0.6, "c-mean", 0.9), _row(0, "none", 0, "mean", 0.6, "c-mean", 0.9),
        _row(0, "none", 0, "median", 0.5, "c-med", 0.8), _row(0, "none", 0, "median", 0.5, "c-med", 0.8),
        _row(0, "alie", 3, "mean", 0.2, "a1"), _row(1, "alie", 3, "mean", 0.4, "a2"),
        _row(0, "alie", 3, "median", 0.45, "a3"),
        _row(0, "alignment_poison", 3, "mean", 0.58, "p1", refusal=0.1),
        _row(0, "alignment_poison", 3, "median", 0.57, "p2", refusal=0.2),
    ]
    data = attack_grid_data(rows)
    assert data.attacks == ["alie", "alignment_poison"] and data.defenses == ["mean", "median"]
    assert data.fractions == [0.0, 0.3]
    clean = data.get("final_accuracy", "alie", "mean", 0.0)
    assert (clean.mean, clean.n) == (0.6, 1)
    assert data.get("final_accuracy", "alignment_poison", "median", 0.0).mean == 0.5
    two_seeds = data.get("final_accuracy", "alie", "mean", 0.3)
    assert two_seeds.n == 2 and abs(two_seeds.mean - 0.3) < 1e-12 and abs(two_seeds.std - 0.1414213562) < 1e-9
    assert data.get("refusal_rate", "alignment_poison", "median", 0.3).mean == 0.2
    assert data.get("refusal_rate", "alie", "mean", 0.3) is None
    assert attack_grid_data([_row(0, "none", 0, "mean", 0.6, "c")]) is None

    from fedsec.reports.pdf import grid_findings
    lines = grid_findings(data)
    assert lines[0] == ("alie at 30% malicious clients: global test accuracy 0.300 under mean against 0.600 "
                        "without attackers; median holds it at 0.450 (its clean run: 0.500).")
    assert lines[1] == ("alignment_poison at 30% malicious clients: harmless (refusal) rate 0.100 under mean "
                        "against 0.900 without attackers; median holds it at 0.200 (its clean run: 0.800).")


def test_grid_findings_compare_every_defense_when_the_one_clean_run_is_under_the_mean():
    """make demo's grid shape: one clean run (under the plain mean) beside the attack under the
    mean, the median and the re-alignment. Every defense is weighed on its attacked value (the
    summary once named the mean alone: the others had no clean run of their own)."""
    from fedsec.reports.pdf import grid_findings
    from fedsec.reports.plots import attack_grid_data

    rows = [_row(0, "none", 0, "mean", 0.6, "clean", 0.15),
            _row(0, "alignment_poison", 3, "mean", 0.58, "p-mean", 0.0),
            _row(0, "alignment_poison", 3, "median", 0.57, "p-median", 0.0),
            _row(0, "alignment_poison", 3, "mean+realign", 0.55, "p-realign", 1.0)]
    assert grid_findings(attack_grid_data(rows)) == [
        "alignment_poison at 30% malicious clients: harmless (refusal) rate 0.000 under mean against 0.150 "
        "without attackers; mean+realign holds it at 1.000."]
    rows[3]["refusal_rate"] = 0.0  # nothing holds: every defense's value is said
    assert grid_findings(attack_grid_data(rows)) == [
        "alignment_poison at 30% malicious clients: harmless (refusal) rate 0.000 under mean against 0.150 "
        "without attackers; no other defense does better (median 0.000, mean+realign 0.000)."]


def test_a_grid_over_a_file_dataset_knows_its_clients_and_keeps_its_cells(tmp_path):
    """Attack grids on a researcher's own file: the true client count comes from the run
    (federation.json), so the table's count, the fractions and the grid's cells are there."""
    from fedsec.reports.plots import attack_grid_data

    data = tmp_path / "own.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{k}?", "response": f"a{k}", "user": f"u{k % 6}"}) + "\n"
                            for k in range(48)))
    base = {**TINY, "data": {"source": str(data), "partition": {"scheme": "natural", "by": "user"},
                             "max_length": 160},
            "federation": {"rounds": 1, "clients_per_round": 6, "local_only_clients": 0},
            "training": {**TINY["training"], "local_steps": 1}, "eval": {"clients": False}}
    grid = {"attack": {"sign_flip": ["attack.kind=sign_flip"]},
            "fraction": {0: ["attack.kind=none", "attack.fraction=0"], 0.34: ["attack.fraction=0.34"]},
            "defense": {"mean": ["defense.aggregator=mean"]}}
    spec = tmp_path / "grid.yaml"
    spec.write_text(yaml.safe_dump({"name": "own", "base": base, "seeds": [0], "output_dir": str(tmp_path / "runs"),
                                    "grid": grid}, sort_keys=False))
    root = run_sweep(spec, progress=False, log=lambda _: None)
    rows = list(csv.DictReader((root / "results.csv").open()))
    assert {r["num_clients"] for r in rows} == {"6"} and {r["malicious_count"] for r in rows} == {"0", "2"}
    run = root / rows[-1]["run_dir"].split("/")[-1]
    assert json.loads((run / "federation.json").read_text())["num_clients"] == 6
    clients = json.loads((run / "clients.json").read_text())["clients"]
    assert sorted(u for c in clients for u in c["users"]) == [f"u{k}" for k in range(6)]
    assert sum(c["train_examples"] + c["test_examples"] for c in clients) < 48  # the global test split is held out
    grid = attack_grid_data(json.loads((root / "results.json").read_text()))
    assert grid is not None and grid.fractions == [0.0, round(2 / 6, 6)]  # the rows are no longer dropped
    # the defense's detection is scored on file data too (no accuracy here: utility heatmaps on
    # the loss are issue 25's next step)
    assert grid.get("true_positive_rate", "sign_flip", "mean", round(2 / 6, 6)) is not None


def test_a_dp_x_robustness_grid_separates_privacy_settings_and_reads_detection_from_the_hidden_tables(tmp_path):
    """attack x privacy x aggregator in one sweep: the DP x robustness data keeps the three
    privacy settings apart (non-private, clipping alone, noise), names the noise by the
    epsilon the mean certifies at that sigma, takes the DP runs' detection rates from
    not_covered_by_dp_guarantee/ (the public table leaves them empty), and the plain
    attack grid keeps the non-private runs only."""
    from fedsec.disclosure import UNCOVERED
    from fedsec.reports.pdf import build_report, dp_robustness_findings
    from fedsec.reports.plots import attack_grid_data, dp_robustness_data

    grid = {"attack": {"none": ["attack.kind=none"],
                       "flip": ["attack.kind=sign_flip", "attack.fraction=0.33", "attack.params={scale: 20}"]},
            "privacy": {"off": [], "clip": ["privacy.mode=user", "privacy.epsilon=.inf"],
                        "noise": ["privacy.mode=user", "privacy.noise_multiplier=0.5"]},
            "defense": {"mean": ["defense.aggregator=mean"],
                           "krum": ["defense.aggregator=krum", "defense.f=1"]}}
    spec = _spec(tmp_path)
    raw = yaml.safe_load(spec.read_text())
    raw["grid"] = grid
    raw["base"]["federation"]["sampling"] = "poisson"
    raw["base"]["privacy"] = {"delta": 1.0e-3, "clip_norm": 0.5}
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    root = run_sweep(spec, progress=False, log=lambda _: None)
    rows = json.loads((root / "results.json").read_text())
    hidden = json.loads((root / UNCOVERED / "results.json").read_text())
    assert len(rows) == 12
    by = {r["variant"]: r for r in rows}
    eps = by["none-noise-mean"]["epsilon"]
    assert by["none-noise-mean"]["certified"] is True and by["none-noise-krum"]["certified"] is False
    assert by["flip-noise-krum"]["true_positive_rate"] is None  # a DP run's detection is not public

    data = dp_robustness_data(rows, hidden)
    noise = f"eps {eps:.3g} (sigma 0.50)"
    assert data.privacy == ["non-private", "clip only", noise]
    assert data.attacks == ["no attack", "sign_flip 33%"] and data.aggregators == ["mean", "krum"]
    for variant, (attack, privacy) in {"none-off-krum": ("no attack", "non-private"),
                                       "flip-clip-mean": ("sign_flip 33%", "clip only"),
                                       "flip-noise-krum": ("sign_flip 33%", noise)}.items():
        cell = data.get("final_accuracy", attack, privacy, variant.split("-")[-1])
        assert (cell.mean, cell.n) == (by[variant]["final_accuracy"], 1)
    secret = {r["variant"]: r for r in hidden}["flip-noise-krum"]["true_positive_rate"]
    assert secret is not None
    assert data.get("true_positive_rate", "sign_flip 33%", noise, "krum").mean == secret
    assert data.get("true_positive_rate", "sign_flip 33%", "non-private", "krum").mean > 0  # x20 flips stand out
    assert data.get("true_positive_rate", "sign_flip 33%", "clip only", "mean").mean == 0.0  # the mean drops none
    assert data.get("true_positive_rate", "no attack", "non-private", "krum") is None
    lines, hidden_lines = dp_robustness_findings(data)
    off, clip = by["none-off-mean"]["final_accuracy"], by["flip-off-mean"]["final_accuracy"]
    assert lines[0].startswith(f"sign_flip 33% against the mean (global test accuracy, clean -> attacked): "
                               f"non-private: {off:.3f} -> {clip:.3f}; clip only: ")
    # the summary's detection sentence names the non-private runs only; the DP runs' rates go to the hidden page
    assert lines[1].startswith("krum under sign_flip 33% dropped ") and lines[1].endswith("(non-private).")
    assert len(lines) == 2
    assert hidden_lines[0].startswith("krum under sign_flip 33% dropped ") and "(clip only)" in hidden_lines[0]
    assert f"({noise})" in hidden_lines[0] and "non-private" not in hidden_lines[0]
    assert UNCOVERED in hidden_lines[-1]

    plain = attack_grid_data(rows)  # non-private runs only
    cell = plain.get("final_accuracy", "sign_flip", "krum", round(2 / 6, 6))
    assert (cell.mean, cell.n) == (by["flip-off-krum"]["final_accuracy"], 1)

    import pypdf

    build_report(root)
    files = root / "report_files"
    assert (files / "dp_robustness.png").is_file() and (files / "dp_detection.png").is_file()
    pages = [page.extract_text() for page in pypdf.PdfReader(str(root / "report.pdf")).pages]
    first_hidden = next(k for k, text in enumerate(pages) if "Not covered by the DP guarantee" in text)
    said = [k for k, text in enumerate(pages) if "(clip only)" in " ".join(text.split())]
    assert said and min(said) >= first_hidden  # the DP runs' detection rates only on the uncovered page


def test_the_servers_realignment_is_part_of_the_defense_in_the_tables(tmp_path):
    """A run whose server re-aligns (defense.realign_steps) is its own column of the attack
    grid: 'mean+realign' beside 'mean', not pooled with it."""
    from fedsec.reports.plots import attack_grid_data

    grid = {"fraction": {"0.33": ["attack.kind=alignment_poison", "attack.fraction=0.33"]},
            "defense": {"mean": ["defense.aggregator=mean"],
                        "realign": ["defense.aggregator=mean", "defense.realign_steps=1",
                                    "defense.realign_examples=4"]}}
    spec = _spec(tmp_path)
    raw = yaml.safe_load(spec.read_text())
    raw["grid"] = grid
    raw["base"]["federation"]["rounds"] = 1
    raw["variants"] = {"clean": []}
    spec.write_text(yaml.safe_dump(raw, sort_keys=False))
    root = run_sweep(spec, progress=False, log=lambda _: None)
    rows = {r["variant"]: r for r in json.loads((root / "results.json").read_text())}
    assert [rows[v]["aggregator"] for v in ("clean", "0.33-mean", "0.33-realign")] == ["mean", "mean",
                                                                                       "mean+realign"]
    data = attack_grid_data(list(rows.values()))
    assert data.defenses == ["mean", "mean+realign"]
    assert data.get("final_accuracy", "alignment_poison", "mean+realign", round(2 / 6, 6)).mean == \
        rows["0.33-realign"]["final_accuracy"]


def test_a_sweep_stopped_halfway_has_the_tables_of_its_finished_runs(tmp_path, monkeypatch):
    """The tables are rewritten after every run, so `fedsec report` works on a sweep that was
    stopped (here: interrupted as its second run starts) with the runs it finished."""
    import fedsec.api

    real, calls = fedsec.api.run, []

    def run_then_stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(fedsec.api, "run", run_then_stop)
    spec = _spec(tmp_path, grid={"defense": {"mean": ["defense.aggregator=mean"],
                                             "median": ["defense.aggregator=median"]}})
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec, progress=False, log=lambda _: None)
    rows = json.loads((tmp_path / "runs" / "g" / "results.json").read_text())
    assert [(r["variant"], r["seed"]) for r in rows] == [("mean", 0)]
    assert rows[0]["final_accuracy"] is not None


def test_a_preference_loss_is_part_of_the_defense_so_its_runs_are_not_pooled_with_dpos():
    """experiments/flip_losses.yaml's shape: flipped pairs under dpo, cdpo and rdpo, all with the
    server's plain mean. Each loss is its own column of the attack grid (before, the three
    flipped runs were one 'mean' cell: their mean)."""
    from fedsec.reports.plots import attack_grid_data
    from fedsec.sweeps import defense_label

    def cfg(loss, params=None, task="dpo", aggregator="mean"):
        return {"task": task, "defense": {"aggregator": aggregator, "realign_steps": 0},
                "dpo": {"loss": loss, "params": params or {}}}

    assert defense_label(cfg("dpo")) == "mean"
    assert defense_label(cfg("cdpo", {"label_smoothing": 0.2})) == "mean+cdpo(label_smoothing=0.2)"
    assert defense_label(cfg("ipo", aggregator="median")) == "median+ipo"
    assert defense_label(cfg("cdpo", {"label_smoothing": 0.2}, task="sft")) == "mean"  # not used under sft
    labels = [defense_label(cfg("dpo")), defense_label(cfg("cdpo", {"label_smoothing": 0.2})),
              defense_label(cfg("rdpo", {"label_noise": 0.2}))]
    rows = [_row(0, "none", 0, labels[0], 0.7, "clean"),
            *(_row(0, "preference_flip", 3, label, acc, f"flip-{k}")
              for k, (label, acc) in enumerate(zip(labels, (0.4, 0.5, 0.6))))]
    data = attack_grid_data(rows)
    assert data.defenses == labels
    assert [data.get("final_accuracy", "preference_flip", label, 0.3).mean for label in labels] == [0.4, 0.5, 0.6]
