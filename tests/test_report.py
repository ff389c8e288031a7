"""`fedsec report`: the PDF's text and tables match the run files; missing pieces are skipped."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from fedsec.cli import main
from fedsec.reports.pdf import build_report, collect, findings, run_table

pypdf = pytest.importorskip("pypdf")


def _write_run(path, seed, final, untuned=0.44, privacy=None, local=None, ledger=None, finished=True,
               audit=None, defense="mean"):
    path.mkdir(parents=True)
    cfg = {"name": "fx", "seed": seed, "task": "sft", "model": {"name": "tiny"},
           "data": {"source": "embedded", "benchmark": {"num_clients": 16}},
           "federation": {"rounds": 2, "clients_per_round": 4, "algorithm": "fedavg"},
           "defense": {"aggregator": defense}}
    (path / "config.resolved.yaml").write_text(yaml.safe_dump(cfg))
    (path / "env.json").write_text(json.dumps({"versions": {"fedsec": "0.1.0"}, "git_revision": "abc123",
                                               "started": "2026-11-22T08:00:00+0000"}))
    rows = [{"phase": "federated", "round": 0, "global_eval": {"accuracy": untuned, "loss": 4.0}},
            {"phase": "federated", "round": 2, "global_eval": {"accuracy": final, "loss": 0.5}}]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if ledger is not None:
        (path / "privacy_ledger.json").write_text(json.dumps(ledger))
    result = {"run_dir": str(path), "rounds_done": 2, "finished": finished,
              "untuned": {"accuracy": untuned, "loss": 4.0}, "final": {"accuracy": final, "loss": 0.5},
              "local_only": {"mean_accuracy": local, "per_client": {}} if local is not None else None,
              "algorithm": "fedavg", "privacy": privacy, "audit": audit}
    (path / "result.json").write_text(json.dumps(result))


def _privacy(eps, sigma, certified=True):
    return {"certified": certified, "reason": None if certified else "no noise", "delta": 1e-5,
            "accountant": "rdp", "epsilon": eps if certified else None,
            "epsilons": {"rdp": eps, "prv": eps * 0.9, "pld": eps * 0.89} if certified else None,
            "noise_multiplier": sigma, "sample_rate": 0.25, "clip_norm": 1.0, "adaptive_clipping": False,
            "rounds": 2}


def _ledger(eps):
    return {"delta": 1e-5, "accountants": ["rdp", "prv", "pld"], "primary": "rdp", "certified": True,
            "reason": None, "entries": [
                {"round": r, "noise_multiplier": 1.1, "sample_rate": 0.25, "clip_norm": 1.0,
                 "clients_sampled": 3 + r, "epsilon": {"rdp": eps * r / 2, "prv": eps * r / 2.2,
                                                      "pld": eps * r / 2.25}} for r in (1, 2)]}


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    _write_run(root / "non-private-s0", 0, 0.70, local=0.40)
    _write_run(root / "non-private-s1", 1, 0.66, local=0.36)
    _write_run(root / "eps4-s0", 0, 0.60, privacy=_privacy(3.9931, 1.1), ledger=_ledger(3.9931))
    _write_run(root / "eps4-s1", 1, 0.56, privacy=_privacy(3.9931, 1.1), ledger=_ledger(3.9931))
    _write_run(root / "epsinf-s0", 0, 0.69, privacy=_privacy(None, 0.0, certified=False))
    rows = [{"variant": v, "seed": s, "run_dir": str(root / f"{v}-s{s}")}
            for v, s in (("non-private", 0), ("non-private", 1), ("eps4", 0), ("eps4", 1), ("epsinf", 0))]
    for row in rows:
        result = json.loads((root / f"{row['variant']}-s{row['seed']}" / "result.json").read_text())
        p = result["privacy"] or {}
        row.update({"final_accuracy": result["final"]["accuracy"], "untuned_accuracy": 0.44,
                    "local_only_accuracy": (result["local_only"] or {}).get("mean_accuracy"),
                    "epsilon": p.get("epsilon"), "certified": p.get("certified") if p else None,
                    "noise_multiplier": p.get("noise_multiplier")})
    (root / "results.json").write_text(json.dumps(rows))
    return root


def _text(pdf_path) -> str:
    reader = pypdf.PdfReader(str(pdf_path))
    return "\n".join(page.extract_text() for page in reader.pages)


def test_findings_are_computed_from_the_runs(sweep):
    from fedsec.reports.pdf import collect

    _, runs = collect(sweep)
    table = run_table(runs)
    assert [r["epsilon"] for r in table] == [None, None, "4.00", "4.00", None]  # rounded up, never down
    text = " ".join(findings(table))
    # eps4 mean 0.58, non-private mean 0.68, untuned 0.44: 0.100 below, keeps (0.58-0.44)/(0.68-0.44) = 58%
    assert "At epsilon 4.00 (delta 1e-05, eps4) the global accuracy is 0.580 ± 0.028 over 2 seeds, 0.100 below " \
           "non-private (0.680 ± 0.028 over 2 seeds); it keeps 58% of the non-private gain over the untuned " \
           "model (0.440)." in text  # sd of (0.60, 0.56) and of (0.70, 0.66): 0.02 * sqrt(2)
    assert "local-only) reach 0.380 ± 0.028 over 2 seeds, 0.300 below the non-private federated runs" in text
    assert "1 run(s) carry no epsilon" in text


def test_a_dpo_sweeps_findings_speak_of_its_preference_accuracy(tmp_path):
    """A DPO sweep's summary compares epsilon 8 with non-private on the preference accuracy (its
    report's table once lost the column, and the summary said nothing); no share of a gain over
    the untuned model, which has no preference accuracy (its own reference: every reward 0)."""
    root = tmp_path / "dpo"
    rows = []
    for variant, seed, accuracy, private in (("non-private", 0, 0.70, False), ("non-private", 1, 0.60, False),
                                             ("eps8", 0, 0.55, True), ("eps8", 1, 0.45, True)):
        path = root / f"{variant}-s{seed}"
        _write_run(path, seed, 0.0, privacy=_privacy(7.9993, 0.7) if private else None,
                   ledger=_ledger(7.9993) if private else None)
        result = json.loads((path / "result.json").read_text())
        result["untuned"] = {"preference": {"preference_accuracy": 0.0, "reward_margin": 0.0,
                                            "likelihood_accuracy": 0.5}}
        result["final"] = {"preference": {"preference_accuracy": accuracy, "reward_margin": 0.1,
                                          "likelihood_accuracy": 0.55}}
        (path / "result.json").write_text(json.dumps(result))
        rows.append({"variant": variant, "seed": seed, "run_dir": str(path)})
    (root / "results.json").write_text(json.dumps(rows))
    table = run_table(collect(root)[1])
    assert [r["preference_accuracy"] for r in table] == [0.70, 0.60, 0.55, 0.45]
    assert {r["untuned_likelihood_accuracy"] for r in table} == {0.5}
    text = " ".join(findings(table))
    # means 0.65 and 0.50, each sd 0.05 * sqrt(2)
    assert "At epsilon 8.00 (delta 1e-05, eps8) the preference accuracy is 0.500 ± 0.071 over 2 seeds, 0.150 " \
           "below non-private (0.650 ± 0.071 over 2 seeds)." in text
    assert "keeps" not in text
    # the PDF says it, and its runs table has no column of dashes for the untuned preference accuracy
    pdf = " ".join(_text(build_report(root, tmp_path / "dpo.pdf")).split())
    assert "the preference accuracy is 0.500 ± 0.071" in pdf and "final preference accuracy" in pdf
    assert "untuned preference" not in pdf


def test_a_grids_non_private_cells_are_said_to_be_runs_of_variants_not_seeds(tmp_path):
    """A DP x defense grid's non-private baseline is the runs of several cells of one seed: its
    spread is over those runs, not over seeds (the summary said '2 seeds')."""
    root = tmp_path / "grid"
    rows = []
    for variant, final, private in (("off-a", 0.70, False), ("off-b", 0.60, False), ("eps8-a", 0.55, True)):
        _write_run(root / f"{variant}-s0", 0, final, privacy=_privacy(7.9993, 0.7) if private else None,
                   ledger=_ledger(7.9993) if private else None)
        rows.append({"variant": variant, "seed": 0, "run_dir": str(root / f"{variant}-s0")})
    (root / "results.json").write_text(json.dumps(rows))
    text = " ".join(findings(run_table(collect(root)[1])))
    assert "below non-private (0.650 ± 0.071 over 2 runs of 2 variants)" in text and "seeds)" not in text


def test_a_dp_x_defense_grid_compares_each_private_cell_with_its_own_defense_without_dp(tmp_path):
    """Like for like: epsilon 8 under the median is compared with the median without DP, not
    with the mean of the non-private mean and median runs (0.650), in the summary and on the
    claims page; a defense never run without DP falls back to all non-private runs."""
    from fedsec.reports.pdf import claims

    root = tmp_path / "grid"
    rows = []
    for variant, final, defense, private in (("off-mean", 0.70, "mean", False), ("off-median", 0.60, "median", False),
                                             ("eps8-mean", 0.55, "mean", True), ("eps8-median", 0.52, "median", True),
                                             ("eps8-krum", 0.40, "krum", True)):
        _write_run(root / f"{variant}-s0", 0, final, privacy=_privacy(7.9993, 0.7) if private else None,
                   ledger=_ledger(7.9993) if private else None, defense=defense)
        rows.append({"variant": variant, "seed": 0, "run_dir": str(root / f"{variant}-s0")})
    (root / "results.json").write_text(json.dumps(rows))
    table = run_table(collect(root)[1])
    assert [r["defense"] for r in table] == ["mean", "median", "mean", "median", "krum"]
    text = " ".join(findings(table))
    # (0.55 - 0.44) / (0.70 - 0.44) = 42%; (0.52 - 0.44) / (0.60 - 0.44) = 50%; krum: (0.40 - 0.44) < 0
    assert ("eps8-mean) the global accuracy is 0.550, 0.150 below non-private under mean (0.700); "
            "it keeps 42% of the non-private gain") in text
    assert ("eps8-median) the global accuracy is 0.520, 0.080 below non-private under median (0.600); "
            "it keeps 50% of the non-private gain") in text
    assert "eps8-krum) the global accuracy is 0.400, 0.250 below non-private (0.650 ± 0.071 over 2 runs" in text
    pdf = " ".join(_text(build_report(root, tmp_path / "grid.pdf")).split())
    runs_table = pdf[pdf.index("Runs variant"):pdf.index("Figures")]
    assert "defense" in runs_table and "krum" in runs_table  # each run's rule, where the runs differ in it
    said = {c["claim"]: c["value"] for c in claims(table, collect(root)[1])}
    assert said["eps8-mean (epsilon 8.00): global accuracy minus off-mean's"] == "-0.150 +- 0.000"
    assert said["eps8-median (epsilon 8.00): global accuracy minus off-median's"] == "-0.080 +- 0.000"
    assert said["eps8-krum (epsilon 8.00): global accuracy minus off-mean's"] == "-0.300 +- 0.000"


def test_report_pdf_holds_the_summary_tables_and_figures(sweep, tmp_path, capsys):
    out = tmp_path / "out" / "report.pdf"
    assert main(["report", str(sweep), "-o", str(out)]) == 0
    text = _text(out)
    assert "fedsec report: sweep" in text and "abc123" in text and "tiny" in text
    assert "it keeps 58% of the non-private gain" in text
    for value in ("0.700", "0.660", "0.600", "0.560", "0.690", "1.1"):  # every run's row
        assert value in text
    assert "not certified" not in text or "no epsilon" in text
    ledger_csv = list(csv.DictReader((out.parent / "report_files" / "ledger_eps4.csv").open()))
    assert [r["epsilon rdp"] for r in ledger_csv] == ["1.997", "3.994"]  # printed epsilons round up
    assert "clients" not in ledger_csv[0]  # the realised sample size is not the mechanism's to publish
    assert "1.997" in text and "3.994" in text  # the ledger: epsilon after rounds 1, 2 (rounded up)
    figures = sorted(p.name for p in (out.parent / "report_files").glob("*.png"))
    assert figures == ["epsilon_eps4.png", "privacy_utility.png", "training_eps4.png",
                       "training_epsinf.png", "training_non-private.png", "variants_by_round.png"]
    assert all((out.parent / "report_files" / f.replace(".png", ".svg")).is_file() for f in figures)
    assert len(pypdf.PdfReader(str(out)).pages) >= 5
    # never overwritten without --force
    assert main(["report", str(sweep), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_report_of_one_run_with_missing_pieces(tmp_path):
    run = tmp_path / "run"
    _write_run(run, 0, 0.5, finished=False)
    (run / "metrics.jsonl").unlink()
    (run / "env.json").unlink()
    out = build_report(run)
    assert out == run / "report.pdf"
    text = _text(out)
    assert "1 run(s) are unfinished" in text and "git revision" in text
    assert not list((run / "report_files").glob("*.png"))  # nothing to draw, nothing drawn


def test_report_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedsec: error: report DIR = ")


def test_report_pages_render_and_none_is_blank(sweep, tmp_path):
    """Render every page (pypdfium2, the PDFium engine of Chrome) and look: ink on each
    page, and the figure pages carry a large drawn area."""
    pdfium = pytest.importorskip("pypdfium2")
    import numpy as np

    out = build_report(sweep, tmp_path / "report.pdf")
    document, pages = pdfium.PdfDocument(str(out)), pypdf.PdfReader(str(out)).pages
    assert len(document) == len(pages)
    with_figure = [i for i, page in enumerate(pages) if page.images]
    assert len(with_figure) >= 3  # privacy-utility, epsilon over rounds, training curves
    inked = []
    for i in range(len(document)):
        image = document[i].render(scale=0.5).to_pil().convert("L")  # as printed in black and white
        image.save(tmp_path / f"page{i + 1}.png")
        inked.append(float((np.asarray(image) < 200).mean()))
    assert min(inked) > 0.002, inked  # every page has text or drawing on it
    assert all(inked[i] > 0.01 for i in with_figure), inked  # figures drew lines, markers, labels


def test_findings_say_when_dp_falls_below_the_untuned_model(sweep):
    from fedsec.reports.pdf import collect

    _write_run(sweep / "eps1-s0", 0, 0.40, privacy=_privacy(0.9993, 2.6), ledger=_ledger(0.9993))
    rows = json.loads((sweep / "results.json").read_text())
    rows.append({"variant": "eps1", "seed": 0, "run_dir": str(sweep / "eps1-s0"), "final_accuracy": 0.40,
                 "untuned_accuracy": 0.44, "local_only_accuracy": None, "epsilon": 0.9993,
                 "certified": True, "noise_multiplier": 2.6})
    (sweep / "results.json").write_text(json.dumps(rows))
    text = " ".join(findings(run_table(collect(sweep)[1])))
    # non-private mean 0.68; 0.40 is 0.280 below it and 0.040 below the untuned 0.44
    assert "At epsilon 1.00 (delta 1e-05, eps1) the global accuracy is 0.400, 0.280 below non-private " \
           "(0.680 ± 0.028 over 2 seeds), and 0.040 below the untuned model (0.440): at this epsilon the noise " \
           "costs more than federated training gains." in text
    assert "keeps -" not in text


def _audit(correct, bound, accountant):
    return {"kind": "update", "canaries": 200, "included": 101, "guesses": 80, "correct": correct,
            "delta": 1e-5, "confidence": 0.95, "epsilon_lower_bound": bound, "accountant_epsilon": accountant,
            "bound_exceeds_accountant": accountant is not None and bound > accountant}


def test_audit_findings_and_columns_come_from_the_runs_and_a_violation_is_named(tmp_path):
    from fedsec.reports.pdf import audit_findings, collect

    root = tmp_path / "audited"
    _write_run(root / "plain", 0, 0.6, audit=_audit(60, 0.653, None))
    _write_run(root / "eps8", 0, 0.6, privacy=_privacy(8.0, 0.74), audit=_audit(47, 0.0, 8.0))
    _write_run(root / "eps2", 0, 0.6, privacy=_privacy(2.0, 1.5), audit=_audit(52, 0.3012, 2.0))
    runs = [collect(root / name)[1][0] for name in ("plain", "eps8", "eps2")]
    assert audit_findings(runs) == [
        "Privacy audit (update canaries, 200 per run): runs without a certified epsilon show epsilon >= 0.653.",
        "On all 2 DP run(s) the audit's bound stays below the accountant's epsilon; closest: epsilon >= 0.301 "
        "((eps, delta) test) against 2.00 (eps2: 15% of it)."]
    table = run_table(runs)
    assert [(r["audit"], r["audit_bound"]) for r in table] == [("60/80 update", 0.653), ("47/80 update", 0.0),
                                                               ("52/80 update", 0.3012)]
    _write_run(root / "broken", 0, 0.6, privacy=_privacy(1.0, 2.3), audit=_audit(80, 1.2345, 1.0))
    broken = collect(root / "broken")[1]
    assert audit_findings(broken)[-1] == ("AUDIT VIOLATION in broken (seed 0): the lower bound 1.23 (confidence "
                                          "0.95) exceeds the accountant's epsilon 1.00; its privacy claim does not "
                                          "hold.")
    assert audit_findings(runs[1:2]) == ["On all 1 DP run(s) the audit's bound is 0: under the noise the guesses "
                                         "are too close to chance to prove any epsilon."]
    _write_run(root / "unaudited", 0, 0.6)
    assert audit_findings(collect(root / "unaudited")[1]) == []
    # the f-DP bound counts against the accountant only where the run is the Gaussian curve it tests
    fdp = {"fdp_epsilon_lower_bound": 2.5, "gaussian_mechanism": False}
    _write_run(root / "poisson", 0, 0.6, privacy=_privacy(2.0, 1.5), audit={**_audit(70, 1.5, 2.0), **fdp})
    assert audit_findings(collect(root / "poisson")[1])[-1].endswith("epsilon >= 1.50 ((eps, delta) test) "
                                                                      "against 2.00 (poisson: 75% of it).")
    _write_run(root / "gaussian", 0, 0.6, privacy=_privacy(2.0, 1.5),
               audit={**_audit(70, 1.5, 2.0), **fdp, "gaussian_mechanism": True, "bound_exceeds_accountant": True})
    assert audit_findings(collect(root / "gaussian")[1])[-1].startswith(
        "AUDIT VIOLATION in gaussian (seed 0): the lower bound 2.50 (confidence 0.95) exceeds")


def test_a_sweep_flags_an_audit_only_after_correcting_for_its_number_of_runs(tmp_path):
    from fedsec.accountants.audit import one_run_bound
    from fedsec.reports.pdf import audit_findings, collect

    # 20 certified runs at epsilon 0.5; one has 60 of 80 right: epsilon >= 0.653 at confidence 0.95
    # (which a correct implementation shows in up to 5% of runs), >= 0.372 at 1 - 0.05 / 20
    runs = []
    for k in range(20):
        correct = 60 if k == 0 else 41
        bound = one_run_bound(200, 80, correct, 1e-5, 0.95).epsilon_lower_bound
        _write_run(tmp_path / f"run{k}", 0, 0.6, privacy=_privacy(0.5, 3.0), audit=_audit(correct, bound, 0.5))
        runs += collect(tmp_path / f"run{k}")[1]
    found = audit_findings(runs)
    assert found[0] == ("Audit: 1 of 20 DP runs exceed the accountant's epsilon at confidence 0.95 each (a correct "
                        "implementation does so in up to 5% of runs); corrected for 20 runs (Bonferroni, "
                        "confidence 0.9975 each), 0 still do.")
    assert not any("VIOLATION" in line for line in found)
    # 70 of 80 right: epsilon >= 1.03 even at the corrected confidence, above 0.5: named
    bound = one_run_bound(200, 80, 70, 1e-5, 0.95).epsilon_lower_bound
    _write_run(tmp_path / "run0b", 0, 0.6, privacy=_privacy(0.5, 3.0), audit=_audit(70, bound, 0.5))
    found = audit_findings(collect(tmp_path / "run0b")[1] + runs[1:])
    assert any(line.startswith("AUDIT VIOLATION in run0b") and "confidence 0.9975" in line for line in found)


def test_a_dp_runs_uncovered_measurements_are_on_their_own_labelled_page(tmp_path):
    from fedsec.disclosure import UNCOVERED
    from fedsec.reports.pdf import uncovered_rows

    run = tmp_path / "dp"
    _write_run(run, 0, 0.6, privacy=_privacy(3.9931, 1.1), ledger=_ledger(3.9931))
    (run / UNCOVERED).mkdir()
    (run / UNCOVERED / "result.json").write_text(json.dumps({
        "local_only": {"mean_accuracy": 0.4321, "mean_loss": 1.2345, "per_client": {}},
        "membership": {"loss": {"auc": 0.5432}, "reference": {"auc": 0.6543}, "blind": {"auc": 0.5123}},
        "final": {"memorization": {"exposure_mean": 7.25, "extraction_rate": 0.125}}}))
    assert uncovered_rows(collect(run)[1]) == [
        {"variant": "dp", "seed": 0, "epsilon": "4.00", "local_only_accuracy": 0.4321, "local_only_loss": 1.2345,
         "exposure": 7.25,
         "extraction_rate": 0.125, "mia_auc": 0.5432, "mia_reference_auc": 0.6543, "mia_blind_auc": 0.5123}]
    out = build_report(run)
    reader = pypdf.PdfReader(str(out))
    pages = [page.extract_text() for page in reader.pages]
    hidden = [k for k, text in enumerate(pages) if "Not covered by the DP guarantee" in text]
    assert len(hidden) == 1 and "NOT COVERED BY THE DP GUARANTEE" in pages[hidden[0]]
    assert "0.432" in pages[hidden[0]] and "0.654" in pages[hidden[0]]
    assert not any("0.432" in text or "0.654" in text for k, text in enumerate(pages) if k != hidden[0])
    # a run without DP has no such page
    plain = tmp_path / "plain"
    _write_run(plain, 0, 0.6, local=0.4)
    assert not any("Not covered by the DP guarantee" in p.extract_text()
                   for p in pypdf.PdfReader(str(build_report(plain))).pages)


def test_an_adaptive_run_from_before_the_centred_count_is_named_as_understated(tmp_path):
    from fedsec.reports.pdf import stale_findings

    old = tmp_path / "old"
    _write_run(old, 0, 0.6, privacy={**_privacy(3.9931, 1.1), "adaptive_clipping": True}, ledger=_ledger(3.9931))
    new = tmp_path / "new"
    ledger = _ledger(3.9931)
    for e in ledger["entries"]:
        e.pop("clients_sampled")
        e.update(update_noise_multiplier=1.2, count_stddev=1.0, count_sensitivity=0.5)
    _write_run(new, 0, 0.6, privacy={**_privacy(3.9931, 1.1), "adaptive_clipping": True}, ledger=ledger)
    fixed = tmp_path / "fixed-clip"
    _write_run(fixed, 0, 0.6, privacy=_privacy(3.9931, 1.1), ledger=_ledger(3.9931))
    runs = [collect(p)[1][0] for p in (old, new, fixed)]
    found = stale_findings(runs)
    assert len(found) == 1 and found[0].startswith("UNDERSTATED EPSILON in old:")
    assert "Re-run" in found[0] and "new" not in found[0].split(":")[0]


def test_the_guarantee_names_its_unit_and_assumptions():
    from fedsec.disclosure import guarantee_statement

    user = {"mode": "user"}
    iid = guarantee_statement({"data": {"source": "x.jsonl", "partition": {"scheme": "iid"}}}, user)
    assert "group privacy" in iid and "k e^((k-1) epsilon) delta" in iid and "N is treated as public" in iid
    natural = guarantee_statement({"data": {"source": "x.jsonl", "partition": {"scheme": "natural"}}}, user)
    assert "per person" in natural and "group privacy" not in natural
    record = guarantee_statement({"data": {}}, {"mode": "record"})
    assert "one training example" in record and "n_k is treated as public" in record


def test_a_dp_sweep_draws_a_privacy_utility_figure_for_every_utility_it_measured(sweep, tmp_path):
    """Beside the headline: each benchmark metric and the harmless rate, with error bars over
    seeds and the untuned model's value as the reference."""
    rows = json.loads((sweep / "results.json").read_text())
    for row in rows:
        eps4 = row["variant"] == "eps4"
        row.update({"benchmark:fpb:accuracy": 0.5 + (0.1 if eps4 else 0.2) + 0.01 * row["seed"],
                    "untuned_benchmark:fpb:accuracy": 0.4, "refusal_rate": 0.9 if eps4 else 0.8,
                    "untuned_refusal_rate": 0.95})
    (sweep / "results.json").write_text(json.dumps(rows))
    out = tmp_path / "out" / "report.pdf"
    assert main(["report", str(sweep), "-o", str(out)]) == 0
    figures = {p.name for p in (out.parent / "report_files").glob("privacy_utility*.png")}
    assert figures == {"privacy_utility.png", "privacy_utility_benchmark_fpb_accuracy.png",
                       "privacy_utility_refusal_rate.png"}
    from fedsec.reports.plots import privacy_utility_data

    data = privacy_utility_data(rows, "benchmark:fpb:accuracy")
    (variant, _, stat), = data.curve
    assert variant == "eps4" and stat.mean == pytest.approx(0.605) and stat.n == 2
    assert data.non_private.mean == pytest.approx(0.705) and data.untuned.mean == pytest.approx(0.4)


def test_a_report_holds_one_figure_open_at_a_time_and_leaves_none(sweep, tmp_path, monkeypatch):
    """Each figure is drawn when it is saved: a grid of many variants drew them all first
    and matplotlib warned past 20 open figures."""
    import matplotlib.pyplot as plt

    from fedsec.reports import plots

    plt.close("all")
    real, open_at_save = plots.save, []

    def save(fig, stem):
        open_at_save.append(len(plt.get_fignums()))
        return real(fig, stem)

    monkeypatch.setattr(plots, "save", save)
    assert main(["report", str(sweep), "-o", str(tmp_path / "report.pdf")]) == 0
    assert len(open_at_save) >= 3 and max(open_at_save) == 1
    assert plt.get_fignums() == []


def test_the_claims_page_pairs_seeds_and_says_when_a_claim_holds_only_on_the_mean(sweep, tmp_path):
    from fedsec.reports.pdf import claims, collect

    _, runs = collect(sweep)
    table = run_table(runs)
    got = claims(table, runs)
    # eps4: seeds 0, 1 at 0.60, 0.56 against non-private's 0.70, 0.66 and the untuned 0.44
    assert [(c["claim"], c["value"], c["seeds"], c["holds"]) for c in got] == [
        ("eps4 (epsilon 4.00): global accuracy minus non-private's", "-0.100 +- 0.000", 2, "every seed"),
        ("eps4 (epsilon 4.00): global accuracy minus the untuned model's", "+0.140 +- 0.028", 2, "every seed")]
    assert got[0]["reproduce"].endswith("(git abc123)")
    for row in table:  # seed 1 of eps4 now above non-private's seed 1: the claim holds on the mean only
        if row["variant"] == "eps4" and row["seed"] == 1:
            row["final_accuracy"] = 0.67
    assert claims(table, runs)[0]["holds"] == "the mean only (1 of 2 seeds)"
    out = tmp_path / "out" / "report.pdf"
    assert main(["report", str(sweep), "-o", str(out)]) == 0
    assert "Claims" in _text(out) and (out.parent / "report_files" / "claims.csv").is_file()


def test_findings_and_claims_compare_privacy_on_the_runs_without_attackers(sweep):
    """Where some runs have attackers (a DP x robustness grid), epsilon is compared with the
    clean non-private run, not the mean of clean and attacked ones: here the non-private
    seed 1 gets 3 attackers (its 0.66 leaves the non-private reference at 0.70)."""
    from fedsec.reports.pdf import claims, collect

    result = sweep / "non-private-s1" / "result.json"
    data = json.loads(result.read_text())
    result.write_text(json.dumps({**data, "attack": {"malicious": [1, 2, 3]}}))
    _, runs = collect(sweep)
    table = run_table(runs)
    assert [r["attackers"] for r in table] == [0, 3, 0, 0, 0]
    text = " ".join(findings(table))
    assert "the global accuracy is 0.580 ± 0.028 over 2 seeds, 0.120 below non-private (0.700)" in text
    pages = claims(table, runs)
    versus = next(c for c in pages if c["claim"].endswith("minus non-private's"))
    assert versus["seeds"] == 1 and versus["value"] == "-0.100 +- 0.000"  # seed 0 alone: 0.60 - 0.70


def test_a_figure_taller_than_a_page_is_scaled_to_fit_it(tmp_path):
    """A grid of panels (the attack-fraction figure of a 4-defense grid was 24 cm high at
    16 cm wide) is scaled down, proportions kept, instead of failing the whole report."""
    import matplotlib.pyplot as plt
    from reportlab.lib.units import cm

    from fedsec.reports.pdf import _figure

    tall, wide = plt.figure(figsize=(6.0, 12.0)), plt.figure(figsize=(8.0, 4.0))
    image = _figure(tall, tmp_path / "tall")
    assert image.drawHeight == pytest.approx(22 * cm) and image.drawWidth == pytest.approx(11 * cm)
    image = _figure(wide, tmp_path / "wide")
    assert image.drawWidth == pytest.approx(16 * cm) and image.drawHeight == pytest.approx(8 * cm)
    assert (tmp_path / "tall.png").is_file()
    plt.close("all")


def test_a_comparison_of_single_seed_runs_says_each_number_is_one_draw(sweep):
    from fedsec.reports.pdf import collect

    _, runs = collect(sweep)
    table = run_table(runs)
    said = " ".join(findings(table))
    assert "ran one seed" not in said  # non-private and eps4 ran two seeds each (epsinf is not compared)
    one = [r for r in table if r["seed"] == 0]
    said = " ".join(findings(one))
    assert "Every variant compared here ran one seed: each such number is one draw" in said
    assert "it keeps" in said  # the comparison itself is still made
    mixed = [r for r in table if not (r["variant"] == "eps4" and r["seed"] == 1)]
    assert "eps4 ran one seed" in " ".join(findings(mixed))


def test_the_variant_ranking_says_ties_spreads_and_single_draws():
    """The best and weakest variants carry their seeds' spread; a tie is called a tie, and a gap
    inside the spread or between single draws is not read as a ranking (a report on a sweep whose
    variants all scored 0.889 said 'the best variant is fedavg ... the weakest is signsgd')."""
    from fedsec.reports.pdf import _ranking

    def runs(*values):
        return [{"acc": v} for v in values]

    assert _ranking({"a": runs(0.889, 0.889), "b": runs(0.889, 0.889)}, "acc", "accuracy", 1.0) == [
        "Every variant has accuracy 0.889: it does not tell them apart here."]
    assert _ranking({"a": runs(0.5, 0.7), "b": runs(0.55, 0.65)}, "acc", "accuracy", 1.0) == [
        "Every variant has accuracy 0.600: it does not tell them apart here."]  # equal means, unequal spreads
    within = _ranking({"a": runs(0.60, 0.70), "b": runs(0.58, 0.66)}, "acc", "accuracy", 1.0)
    assert within == ["The best variant is a with accuracy 0.650 ± 0.071 over 2 seeds; the weakest is b with "
                      "0.620 ± 0.057 over 2 seeds: the gap is within the seeds' spread."]
    clear = _ranking({"a": runs(0.80, 0.82), "b": runs(0.50, 0.52)}, "acc", "accuracy", 1.0)
    assert clear == ["The best variant is a with accuracy 0.810 ± 0.014 over 2 seeds; the weakest is b with "
                     "0.510 ± 0.014 over 2 seeds."]
    single = _ranking({"a": runs(0.8), "b": runs(0.5)}, "loss", "held-out loss", -1.0)
    assert single == []  # no value under the key
    lower = _ranking({"a": [{"loss": 2.0}], "b": [{"loss": 3.0}]}, "loss", "held-out loss", -1.0)
    assert lower == ["The best variant is a with held-out loss 2.000 (one seed); the weakest is b with 3.000 "
                     "(one seed): a single draw on at least one side, no spread to weigh the gap against; run more "
                     "seeds first."]


def test_a_plugin_metric_that_declares_its_direction_is_what_the_summary_speaks_of(tmp_path, monkeypatch):
    """Own data has no accuracy: a registered metric with higher_is_better=True becomes the
    summary's utility (its share of the non-private gain, by hand), where one that declares
    nothing never is. The report reads the direction the run recorded in result.json, not this
    process's registry: a metric registered here but recorded by no run stays unweighed."""
    import sys

    import fedsec
    from fedsec.utility import describe, metric_directions

    (tmp_path / "plugs").mkdir()
    (tmp_path / "plugs" / "scored.py").write_text('''
import fedsec


@fedsec.register("metric", "report_score", covered=True, higher_is_better=True)
def report_score(ctx):
    return 0.0


@fedsec.register("metric", "report_pair", covered=True, higher_is_better={"hits": True, "misses": False})
def report_pair(ctx):
    return {"hits": 0.0, "misses": 0.0}


@fedsec.register("metric", "report_unrecorded", covered=True, higher_is_better=True)
def report_unrecorded(ctx):
    return 0.0
''')
    monkeypatch.syspath_prepend(str(tmp_path / "plugs"))
    sys.modules.pop("scored", None)
    import scored  # noqa: F401 - registers them in this process

    assert describe("metric:report_score").higher_is_better is True
    assert describe("metric:adapter_norm").higher_is_better is None  # declares nothing
    assert describe("metric:report_pair:misses").higher_is_better is False
    assert describe("metric:report_pair:hits").higher_is_better is True
    assert metric_directions(["report_score", "adapter_norm", "report_pair"]) == {
        "report_score": True, "report_pair": {"hits": True, "misses": False}}
    root, rows = tmp_path / "own", []
    for variant, score, private in (("non-private", 0.80, False), ("eps8", 0.60, True)):
        path = root / f"{variant}-s0"
        _write_run(path, 0, None, privacy=_privacy(7.9993, 0.7) if private else None,
                   ledger=_ledger(7.9993) if private else None)
        result = json.loads((path / "result.json").read_text())
        values = {"report_score": score, "report_unrecorded": score, "adapter_norm": 3.0}
        result.update(untuned={"loss": 4.0, "metrics": {**values, "report_score": 0.40}},
                      final={"loss": 0.5, "metrics": values}, metric_directions={"report_score": True})
        (path / "result.json").write_text(json.dumps(result))
        rows.append({"variant": variant, "seed": 0, "run_dir": str(path)})
    (root / "results.json").write_text(json.dumps(rows))
    pdf = " ".join(_text(build_report(root, tmp_path / "own.pdf")).split())
    # (0.60 - 0.40) / (0.80 - 0.40) = 50%
    assert ("the report_score is 0.600, 0.200 below non-private (0.800); it keeps 50% of the non-private "
            "gain over the untuned model (0.400)") in pdf
    for path in root.glob("*/result.json"):  # the runs recorded nothing: the held-out loss is the utility
        result = json.loads(path.read_text())
        path.write_text(json.dumps({**result, "metric_directions": None}))
    pdf = " ".join(_text(build_report(root, tmp_path / "unrecorded.pdf")).split())
    assert "report_score is" not in pdf and "report_unrecorded is" not in pdf and "the held-out loss is" in pdf
    with pytest.raises(ValueError, match="higher_is_better='yes'"):
        fedsec.register("metric", "report_bad", higher_is_better="yes")
    sys.modules.pop("scored", None)
