"""`fedsec report`: the PDF's text and tables match the run files; missing pieces are skipped."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from fedsec.cli import main
from reports.pdf import build_report, findings, run_table

pypdf = pytest.importorskip("pypdf")


def _write_run(path, seed, final, untuned=0.44, privacy=None, local=None, ledger=None, finished=True,
               audit=None):
    path.mkdir(parents=True)
    cfg = {"name": "fx", "seed": seed, "task": "sft", "model": {"name": "tiny"},
           "data": {"source": "embedded", "benchmark": {"num_clients": 16}},
           "federation": {"rounds": 2, "clients_per_round": 4, "algorithm": "fedavg"}}
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
    from reports.pdf import collect

    _, runs = collect(sweep)
    table = run_table(runs)
    assert [r["epsilon"] for r in table] == [None, None, "4.00", "4.00", None]  # rounded up, never down
    text = " ".join(findings(table))
    # eps4 mean 0.58, non-private mean 0.68, untuned 0.44: 0.100 below, keeps (0.58-0.44)/(0.68-0.44) = 58%
    assert "At epsilon 4.00 (delta 1e-05, eps4) the global accuracy is 0.580, 0.100 below non-private " \
           "(0.680); it keeps 58% of the non-private gain over the untuned model (0.440)." in text
    assert "local-only) reach 0.380, 0.300 below the non-private federated runs" in text
    assert "1 run(s) carry no epsilon" in text


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
    assert [float(r["epsilon rdp"]) for r in ledger_csv] == pytest.approx([3.9931 / 2, 3.9931])
    assert "1.997" in text and "3.994" in text  # the ledger: epsilon after rounds 1, 2 (rounded up)
    figures = sorted(p.name for p in (out.parent / "report_files").glob("*.png"))
    assert figures == ["epsilon_eps4.png", "privacy_utility.png", "training_eps4.png",
                       "training_epsinf.png", "training_non-private.png"]
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
    from reports.pdf import collect

    _write_run(sweep / "eps1-s0", 0, 0.40, privacy=_privacy(0.9993, 2.6), ledger=_ledger(0.9993))
    rows = json.loads((sweep / "results.json").read_text())
    rows.append({"variant": "eps1", "seed": 0, "run_dir": str(sweep / "eps1-s0"), "final_accuracy": 0.40,
                 "untuned_accuracy": 0.44, "local_only_accuracy": None, "epsilon": 0.9993,
                 "certified": True, "noise_multiplier": 2.6})
    (sweep / "results.json").write_text(json.dumps(rows))
    text = " ".join(findings(run_table(collect(sweep)[1])))
    # non-private mean 0.68; 0.40 is 0.280 below it and 0.040 below the untuned 0.44
    assert "At epsilon 1.00 (delta 1e-05, eps1) the global accuracy is 0.400, 0.280 below non-private " \
           "(0.680), and 0.040 below the untuned model (0.440): at this epsilon the noise costs more " \
           "than federated training gains." in text
    assert "keeps -" not in text


def _audit(correct, bound, accountant):
    return {"kind": "update", "canaries": 200, "included": 101, "guesses": 80, "correct": correct,
            "delta": 1e-5, "confidence": 0.95, "epsilon_lower_bound": bound, "accountant_epsilon": accountant,
            "bound_exceeds_accountant": accountant is not None and bound > accountant}


def test_audit_findings_and_columns_come_from_the_runs_and_a_violation_is_named(tmp_path):
    from reports.pdf import audit_findings, collect

    root = tmp_path / "audited"
    _write_run(root / "plain", 0, 0.6, audit=_audit(60, 0.653, None))
    _write_run(root / "eps8", 0, 0.6, privacy=_privacy(8.0, 0.74), audit=_audit(47, 0.0, 8.0))
    _write_run(root / "eps2", 0, 0.6, privacy=_privacy(2.0, 1.5), audit=_audit(52, 0.3, 2.0))
    runs = [collect(root / name)[1][0] for name in ("plain", "eps8", "eps2")]
    assert audit_findings(runs) == [
        "Privacy audit (update canaries, 200 per run): runs without a certified epsilon show epsilon >= 0.653.",
        "On all 2 DP run(s) the audit's bound stays below the accountant's epsilon; closest: epsilon >= 0.300 "
        "against 2.00 (eps2)."]
    table = run_table(runs)
    assert [(r["audit"], r["audit_bound"]) for r in table] == [("60/80 update", 0.653), ("47/80 update", 0.0),
                                                               ("52/80 update", 0.3)]
    _write_run(root / "broken", 0, 0.6, privacy=_privacy(1.0, 2.3), audit=_audit(80, 1.2, 1.0))
    broken = collect(root / "broken")[1]
    assert audit_findings(broken)[-1] == ("AUDIT VIOLATION in broken (seed 0): the lower bound 1.200 exceeds the "
                                          "accountant's epsilon 1.00; its privacy claim does not hold.")
    assert audit_findings(runs[1:2]) == ["On all 1 DP run(s) the audit's bound is 0: under the noise the guesses "
                                         "are too close to chance to prove any epsilon."]
    _write_run(root / "unaudited", 0, 0.6)
    assert audit_findings(collect(root / "unaudited")[1]) == []
