"""What a run prints: one line per round and the closing summary."""

from __future__ import annotations

import math

from fedsec.accountants import format_epsilon, format_lower_bound
from fedsec.disclosure import COVERED_GLOBAL_EVAL_DROP, UNCOVERED
from fedsec.results import RoundResult, RunResult
from fedsec.utility import BENCHMARK_METRICS, perplexity


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _privacy_cell(privacy: dict) -> str:
    if privacy.get("mode") == "record":
        eps = privacy["epsilon"]
        cell = f"DP-SGD sigma {privacy['noise_multiplier']:.3g} C {privacy['clip_norm']:.3g}"
        if eps is None:
            return f"{cell}  epsilon not certified"
        return f"{cell}  worst-record eps " + " ".join(f"{a} {format_epsilon(eps[a])}" for a in eps)
    clip = f"C {privacy['clip_norm']:.3g}"
    if privacy["epsilon"] is None:
        return f"{clip}  epsilon not certified"
    eps = privacy["epsilon"]
    return f"{clip}  eps " + " ".join(f"{a} {format_epsilon(eps[a])}" for a in eps)


def round_line(done: int, total: int, result: RoundResult | None, global_eval: dict | None,
               clients_eval: dict | None, private: bool = False, averaged: bool = False) -> str:
    """One round's progress line. `private` (a DP run): only what the mechanism releases,
    the schedule, the privacy cell and the global evaluation without canary exposure (the
    rest is in the run's not_covered_by_dp_guarantee/ folder). `averaged`
    (federation.ema_decay): the evaluations are of the moving average of the globals, and
    the global one is labelled so ("global (moving average) acc")."""
    parts = [f"round {done:>3}/{total}"]
    averaged = averaged and result is not None  # round 0 evaluates the untuned model itself
    if private:
        if result is None:
            parts.append("untuned model")
        else:
            parts.append(f"lr {result.lr:.2e}")
            if result.privacy is not None:
                parts.append(_privacy_cell(result.privacy))
        if global_eval is not None:
            parts += _global_parts({k: v for k, v in global_eval.items() if k not in COVERED_GLOBAL_EVAL_DROP},
                                   averaged)
        return "  ".join(parts)
    if result is None:
        parts.append("untuned model")
    else:
        clients = list(result.clients) if len(result.clients) <= 8 else f"{len(result.clients)} sampled"
        parts.append(f"lr {result.lr:.2e}  clients {clients}  train loss {result.train_loss:.3f}")
        if result.rejected:
            parts.append(f"rejected {list(result.rejected)}")
        if result.defense is not None:
            d = result.defense
            parts.append(f"{d['aggregator']} skipped: {d['skipped']}" if "skipped" in d else
                         f"{d['aggregator']} excluded {len(d.get('excluded', []))}")
        if result.attack is not None:
            a = result.attack
            parts.append(f"malicious {a['malicious']} caught {len(a['true_positives'])} "
                         f"false+ {len(a['false_positives'])}")
        if result.privacy is not None:
            parts.append(_privacy_cell(result.privacy))
    if global_eval is not None:
        parts += _global_parts(global_eval, averaged)
    if clients_eval is not None:
        if clients_eval["mean_accuracy"] is not None:
            parts.append(f"client acc mean {_fmt(clients_eval['mean_accuracy'])} "
                         f"min {_fmt(clients_eval['min_accuracy'])}")
        else:
            parts.append(f"client loss mean {_fmt(clients_eval['mean_loss'])}")
    if result is not None:
        parts.append(f"{result.seconds:.1f}s")
    return "  ".join(parts)


def _global_parts(global_eval: dict, averaged: bool = False) -> list[str]:
    parts, who = [], "global (moving average)" if averaged else "global"
    if global_eval.get("accuracy") is not None:
        parts.append(f"{who} acc {_fmt(global_eval['accuracy'])} loss {_fmt(global_eval['loss'])}")
    elif global_eval.get("loss") is not None:  # free-text answers: the loss and its perplexity
        parts.append(f"{who} loss {_fmt(global_eval['loss'])} ppl {perplexity(global_eval['loss']):.4g}")
    if "preference" in global_eval:
        pref = global_eval["preference"]
        parts.append(f"pref acc {_fmt(pref['preference_accuracy'])} "
                     f"margin {_fmt(pref['reward_margin'])} "
                     f"likelihood acc {_fmt(pref['likelihood_accuracy'])}")
    if "backdoor" in global_eval:
        b = global_eval["backdoor"]
        parts.append(f"backdoor asr {_fmt(b['attack_success_rate'])} clean {_fmt(b['clean_target_rate'])}")
    if "refusal_rate" in global_eval:
        parts.append(f"refusal {_fmt(global_eval['refusal_rate'])}")
    if "memorization" in global_eval:
        m = global_eval["memorization"]
        parts.append(f"exposure {m['exposure_mean']:.1f} bits extracted {_fmt(m['extraction_rate'])}")
    for task, metric, value in _benchmark_scores(global_eval):
        parts.append(f"{task} {metric} {_fmt(value)}")
    for block in ("metrics", "metrics_uncovered"):  # plugins' metrics, a number or a few per metric
        for name, value in global_eval.get(block, {}).items():
            values = value if isinstance(value, dict) else {"": value}
            parts.append(f"{name} " + " ".join(f"{k} {v:.4g}".strip() for k, v in values.items()))
    return parts


def _benchmark_scores(global_eval: dict) -> list[tuple[str, str, float]]:
    """(task, metric, value) of each eval.benchmarks task evaluated: its headline metric, the
    first of fedsec.utility.BENCHMARK_METRICS it reports (accuracy, exact match, pass@1, ...)."""
    out = []
    for task, metrics in (global_eval.get("benchmarks") or {}).items():
        metric = next((m for m in BENCHMARK_METRICS if isinstance(metrics.get(m), (int, float))), None)
        if metric is not None:
            out.append((task, metric.replace("_", " "), float(metrics[metric])))
    return out


def audit_exceedance(confidence: float) -> str:
    """What a lower bound above the accountant's epsilon means, with its confidence."""
    chance = 1 - confidence
    return (f"privacy audit: the lower bound exceeds the accountant's epsilon. The bound holds with confidence "
            f"{confidence:g}: a correct implementation shows this in at most {chance:.0%} of runs, so this run "
            f"is evidence of a broken privacy claim, not proof; rerun with another seed (a correct one exceeds "
            f"twice with probability at most {chance ** 2:.2g}) and report it as a bug if it holds")


def summary_lines(result: RunResult) -> list[str]:
    """The closing summary. Under DP, what the guarantee does not cover (canary exposure,
    membership inference, local-only baselines) is named, not printed: it is in the run's
    not_covered_by_dp_guarantee/ folder."""
    lines = [f"run directory: {result.run_dir}"]
    # the federated model's label: the algorithm, and the server's rule where it is not the mean
    name = result.algorithm if result.aggregator == "mean" else f"{result.algorithm} with {result.aggregator}"
    private = result.privacy is not None
    if result.untuned and result.final:
        before, after = result.untuned, result.final
        if before.get("accuracy") is not None and after.get("accuracy") is not None:
            u, f = before["accuracy"], after["accuracy"]
            lines.append(f"global test accuracy: untuned {u:.3f} -> {name} {f:.3f} ({f - u:+.3f})")
        if before.get("loss") is not None:
            lines.append(f"global test loss:     untuned {before['loss']:.3f} -> {name} "
                         f"{after['loss']:.3f}")
        if "preference" in before:
            # the untuned model is its own reference: its implicit reward is 0 on every pair, a tie
            # everywhere, so it has no preference accuracy to compare with (its 0.0 is the ties)
            f = after["preference"]["preference_accuracy"]
            lines.append(f"preference accuracy:  {name} {_fmt(f)} (implicit reward of chosen > rejected; "
                         "the untuned model, its own reference, ties every pair)")
            u, f = (before["preference"]["likelihood_accuracy"], after["preference"]["likelihood_accuracy"])
            lines.append(f"likelihood accuracy:  untuned {_fmt(u)} -> {name} {_fmt(f)} "
                         "(policy prefers chosen, no reference)")
        if "memorization" in before and "memorization" in after and not private:
            lines.append(f"canary exposure (bits):      untuned {before['memorization']['exposure_mean']:.1f} -> "
                         f"{name} {after['memorization']['exposure_mean']:.1f}; extracted "
                         f"{_fmt(after['memorization']['extraction_rate'])}")
        if "refusal_rate" in before:
            lines.append(f"refusal rate (unsafe probes): untuned {_fmt(before['refusal_rate'])} -> "
                         f"{name} {_fmt(after['refusal_rate'])}")
        untuned = {(task, metric): value for task, metric, value in _benchmark_scores(before)}
        for task, metric, value in _benchmark_scores(after):
            if (task, metric) in untuned:
                lines.append(f"{task} {metric} (eval.benchmarks): untuned {_fmt(untuned[task, metric])} -> "
                             f"{name} {_fmt(value)}")
    if result.audit is not None:
        a = result.audit
        versus = (f"; the accountant's epsilon is {format_epsilon(a['accountant_epsilon'], 4)}"
                  if a["accountant_epsilon"] is not None else "; the run has no certified epsilon")
        lines.append(f"privacy audit ({a.get('kind', 'secret')} canaries): {a['correct']} of {a['guesses']} "
                     f"guesses right on {a['canaries']} canary "
                     f"clients ({a['included']} included): epsilon >= "
                     f"{format_lower_bound(a['epsilon_lower_bound'])} with "
                     f"confidence {a['confidence']:g}"
                     + (f" (f-DP, Gaussian curve: {format_lower_bound(a['fdp_epsilon_lower_bound'])})"
                        if a.get("fdp_epsilon_lower_bound") is not None else "") + versus)
        if a["bound_exceeds_accountant"]:
            lines.append(audit_exceedance(a["confidence"]))
    if private:
        hidden = [what for what, there in (("canary exposure", "memorization" in (result.final or {})),
                                           ("membership inference", result.membership is not None),
                                           ("local-only baselines", bool(result.local_only))) if there]
        lines.append(f"not covered by the DP guarantee: {', '.join(hidden + ['per-round client ids and counts'])}"
                     f": in {result.run_dir}/{UNCOVERED}/ (never publish it beside the model)")
    if result.membership is not None and not private:
        attacks = {name: m for name, m in result.membership.items() if "auc" in m and name != "blind"}
        scores = ", ".join(f"{name} {m['auc']:.3f}" for name, m in attacks.items())
        first = next(iter(attacks.values()))
        if result.membership.get("level") == "user":
            lines.append(f"user-level inference AUC ({first['members']} clients in the federation vs "
                         f"{first['non_members']} kept out): {scores}")
        else:
            lines.append(f"membership inference AUC ({first['members']} members vs {first['non_members']} "
                         f"held out): {scores}")
        blind = result.membership.get("blind")
        if blind is not None:
            lines.append(f"  blind baseline (text alone, no model) AUC {blind['auc']:.3f}: " + (
                "the split is shifted; the AUCs above measure that shift as much as memorization"
                if blind["shifted"] else "members and non-members look alike without the model"))
        if "answer_extraction" in result.membership:
            e = result.membership["answer_extraction"]
            lines.append(f"greedy replies reproduce {_fmt(e['members'])} of training answers, "
                         f"{_fmt(e['non_members'])} of held-out ones")
    if result.privacy is not None:
        p = result.privacy
        setting = (f"noise multiplier {p['noise_multiplier']:.4g}, sample rate {p['sample_rate']:.4g}, "
                   f"clip norm {p['clip_norm']:.4g}{' (adaptive)' if p['adaptive_clipping'] else ''}, "
                   f"{p['rounds']} rounds")
        if p.get("mode") == "record":
            setting = (f"DP-SGD in every client: noise multiplier {p['noise_multiplier']:.4g}, "
                       f"largest sample rate {p['sample_rate']:.4g}, per-example clip norm "
                       f"{p['clip_norm']:.4g}, {p['rounds']} rounds")
        unit = "each training example" if p.get("mode") == "record" else "each client's whole data"
        if p["certified"]:
            others = ", ".join(f"{a} {format_epsilon(v, 4)}" for a, v in p["epsilons"].items()
                               if a != p["accountant"])
            lines.append(f"privacy: ({format_epsilon(p['epsilon'], 4)}, {p['delta']:g})-DP for {unit} "
                         f"({p['accountant']}; {others}); {setting}")
        else:
            lines.append(f"privacy: epsilon not certified: {p['reason']}; {setting}")
    if result.local_only and not private:
        per = result.local_only["per_client"]
        key, mean = (("accuracy", result.local_only["mean_accuracy"]) if result.local_only["mean_accuracy"] is not None
                     else ("loss", result.local_only.get("mean_loss")))
        values = " ".join(_fmt(v["global_eval"].get(key)) for v in per.values())
        lines.append(f"local-only ({len(per)} clients, each trained alone): mean global {key} "
                     f"{_fmt(mean)}  [{values}]")
    return lines
